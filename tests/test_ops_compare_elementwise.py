"""The comparison and logic family (builtin.compare) and the new elementwise operators erf, gelu,
log1p, expm1 and sign (builtin.elementwise): gradients against finite differences, infer against
forward in every dtype, float32 kept float32, values against numpy, math.erf and gelu's formulas,
every refusal, and the builder's comparison syntax end to end through LocalClient.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from chainrule.client import GraphBuilder, InvalidArgument, ops
from chainrule.core import OpError, TensorSpec, check_attrs, unbroadcast
from chainrule.core.errors import BadAttributeError
from chainrule.plugins.builtin import compare, elementwise
from chainrule.plugins.manager import load_plugins
from chainrule.plugins.testing import assert_vjp, check_operator, check_vjp
from chainrule.server import LocalClient

from rule_checks import assert_accepts_numpy_scalars

OPS = {op.name: op for op in compare.OPERATORS + elementwise.OPERATORS}
COMPARISONS = {"less": np.less, "less_equal": np.less_equal, "greater": np.greater,
               "greater_equal": np.greater_equal, "equal": np.equal, "not_equal": np.not_equal}
LOGICAL = {"logical_and": np.logical_and, "logical_or": np.logical_or, "logical_not": np.logical_not}
UNARY = ("erf", "gelu", "log1p", "expm1", "sign")
NEW = (*COMPARISONS, *LOGICAL, *UNARY)
DTYPES = ("float64", "float32", "int64", "int32", "bool")
LARGE = elementwise.ERF_LIBM_MAX + 1     # the first size erf computes with its polynomials


# --- inputs: a recipe per input, made with the case's own rng ------------------------------------

def normal(*shape, scale=1.0):
    return lambda rng: np.asarray(rng.standard_normal(shape) * scale)


def uniform(low, high, *shape):
    return lambda rng: np.asarray(rng.uniform(low, high, shape))


def off_zero(*shape):
    """At least 0.1 away from 0, the kink of sign."""
    return lambda rng: np.asarray(rng.choice([-1.0, 1.0], shape) * rng.uniform(0.1, 2.0, shape))


def grid(*shape):
    """Floats on a coarse grid: ties for the comparisons."""
    return lambda rng: np.asarray(rng.integers(-2, 3, shape) * 0.5)


def mask(*shape):
    return lambda rng: np.asarray(rng.random(shape) < 0.5)


def case(name, inputs, attrs=None):
    attrs = attrs or {}
    text = ",".join(f"{k}={v}" for k, v in attrs.items())
    shapes = ";".join(str(list(np.shape(recipe(np.random.default_rng(0))))) for recipe in inputs)
    return pytest.param(name, inputs, attrs, id=f"{name}({shapes}){'{' + text + '}' if text else ''}")


def make(inputs, seed=1234):
    rng = np.random.default_rng(seed)
    return [recipe(rng) for recipe in inputs]


PAIRS = [((2, 3), (3,)), ((4, 1), (1, 3)), ((), (2, 2)), ((3,), ()), ((), ()), ((1, 3), (2, 1, 3))]

CASES = [
    # comparisons: broadcasting, size-1 axes, 0-d
    *[case(name, (grid(*a), grid(*b))) for name in COMPARISONS for a, b in PAIRS],
    # logic on masks
    *[case(name, (mask(*a), mask(*b))) for name in ("logical_and", "logical_or") for a, b in PAIRS],
    *[case("logical_not", (mask(*shape),)) for shape in [(), (5,), (2, 1, 3)]],
    # erf: every piece of the approximation, 0-d, size-1 axes, and the polynomial path of large arrays
    case("erf", (normal(),)),
    case("erf", (normal(2, 3),)),
    case("erf", (normal(1, 4, scale=2.0),)),
    case("erf", (uniform(-5.0, 5.0, 3, 5),)),
    case("erf", (normal(LARGE, scale=2.0),)),
    # gelu, both modes
    *[c for mode in ("none", "tanh") for c in (
        case("gelu", (normal(),), {"approximate": mode}),
        case("gelu", (uniform(-6.0, 6.0, 2, 3),), {"approximate": mode}),
        case("gelu", (normal(1, 4, scale=3.0),), {"approximate": mode}),
    )],
    case("gelu", (normal(5),)),                                 # the default: approximate="none"
    case("gelu", (normal(LARGE, scale=3.0),), {"approximate": "none"}),
    # log1p on its domain (away from the pole at -1), expm1, sign off its kink
    case("log1p", (uniform(-0.5, 3.0),)),
    case("log1p", (uniform(-0.5, 3.0, 2, 3),)),
    case("log1p", (uniform(-1e-3, 1e-3, 1, 4),)),
    case("expm1", (normal(),)),
    case("expm1", (normal(2, 3),)),
    case("expm1", (normal(4, 1, scale=1e-3),)),
    case("sign", (off_zero(),)),
    case("sign", (off_zero(2, 3),)),
    case("sign", (off_zero(1, 5),)),
]


def cast_floats(xs, dtype):
    return [x.astype(dtype) if x.dtype.kind == "f" else x for x in xs]


def test_every_new_operator_is_a_builtin_with_cases():
    registry = load_plugins(env={}, entry_points=False, only=["builtin"]).registry
    for name in NEW:
        assert registry[name].plugin in ("builtin.compare", "builtin.elementwise"), name
    assert {p.values[0] for p in CASES} == set(NEW)
    assert {op.name for op in compare.OPERATORS} == set(COMPARISONS) | set(LOGICAL)


# --- gradients ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, inputs, attrs", CASES)
def test_vjp_matches_finite_differences(name, inputs, attrs):
    report = assert_vjp(OPS[name], make(inputs), attrs)
    if name in COMPARISONS or name in LOGICAL:  # bool results: nothing to differentiate
        assert not any(check.checked for check in report.inputs)


@pytest.mark.parametrize("name", NEW)
def test_operator_samples_pass_the_gradient_check(name):
    assert OPS[name].gradcheck  # none is exempt: sign's zero gradient is its true derivative off 0
    reports = check_operator(OPS[name])
    assert reports
    for report in reports:
        assert report.passed, str(report)


@pytest.mark.parametrize("name", [*COMPARISONS, *LOGICAL])
def test_comparisons_and_logic_give_no_gradient(name):
    op = OPS[name]
    xs = [np.array([True, False])] * op.arity if name in LOGICAL else [np.array([1.0, 2.0])] * op.arity
    out = op.forward(*xs)
    assert op.vjp(np.ones(2), out, *xs) == (None,) * op.arity


def test_sign_has_a_zero_gradient_array_not_none():
    op = OPS["sign"]
    x = np.array([-2.0, 0.5, 3.0], dtype=np.float32)
    (d,) = op.vjp(np.ones(3, np.float32), op.forward(x), x)
    assert isinstance(d, np.ndarray) and d.dtype == np.float32 and not d.any()
    report = check_vjp(op, [np.array([-1.0, 0.25, 2.0])])
    assert report.passed and report.inputs[0].checked


def test_gelu_gradient_at_its_known_points():
    op = OPS["gelu"]
    x = np.array([0.0, 1.0, -1.0])
    (d,) = op.vjp(np.ones(3), op.forward(x, approximate="none"), x, approximate="none")
    phi = math.exp(-0.5) / math.sqrt(2 * math.pi)
    cdf = 0.5 * math.erfc(-1 / math.sqrt(2))
    np.testing.assert_allclose(d, [0.5, cdf + phi, (1 - cdf) - phi], rtol=1e-15)


# --- infer against forward, in every dtype --------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, inputs, attrs", CASES)
def test_infer_gives_exactly_what_forward_returns(name, inputs, attrs, dtype):
    op = OPS[name]
    xs = [x.astype(dtype) for x in make(inputs)]
    attrs = check_attrs(op, attrs)
    try:
        spec = op.infer(*[TensorSpec.of(x) for x in xs], **attrs)
    except OpError as exc:  # only logic refuses, and only inputs that are not bool
        assert name in LOGICAL and dtype != "bool", exc
        assert exc.reason == "DTYPE_MISMATCH", exc
        return
    with np.errstate(all="ignore"):
        out = np.asarray(op.forward(*xs, **attrs))
    assert TensorSpec.of(out) == TensorSpec(tuple(spec.shape), np.dtype(spec.dtype))
    if name in COMPARISONS or name in LOGICAL:
        assert out.dtype == np.bool_
    elif dtype in ("float64", "float32"):
        assert out.dtype == np.dtype(dtype)
    else:
        assert out.dtype == np.float64  # float functions: int and bool inputs give float64


MIXED = [("float32", "float64"), ("float64", "float32"), ("float32", "int32"), ("int64", "float32"),
         ("int32", "int64"), ("bool", "float32"), ("float32", "bool"), ("int64", "bool")]


@pytest.mark.parametrize("dtypes", MIXED, ids="-".join)
@pytest.mark.parametrize("name", list(COMPARISONS))
def test_comparisons_promote_mixed_dtypes_as_numpy(name, dtypes):
    op = OPS[name]
    x = np.array([[0.5, 1.0, -2.0], [3.0, 0.0, 1.0]]).astype(dtypes[0])
    y = np.array([1.0, 0.0, -2.0]).astype(dtypes[1])
    spec = op.infer(TensorSpec.of(x), TensorSpec.of(y))
    out = op.forward(x, y)
    assert TensorSpec.of(out) == spec == TensorSpec((2, 3), np.dtype(bool))
    np.testing.assert_array_equal(out, COMPARISONS[name](x, y))


@pytest.mark.parametrize("name, inputs, attrs", [p for p in CASES if any(not np.shape(r(np.random.default_rng(0)))
                                                                         for r in p.values[1])])
def test_rules_accept_numpy_scalars(name, inputs, attrs):
    """The engine keeps 0-d results as numpy scalars (np.float64), and may pass g as one."""
    op = OPS[name]
    assert_accepts_numpy_scalars(op, make(inputs), check_attrs(op, attrs))



@pytest.mark.parametrize("name", UNARY)
def test_rules_do_not_depend_on_memory_layout_or_modify_inputs(name):
    op = OPS[name]
    x = np.random.default_rng(5).uniform(-0.9, 3.0, (40, 60))   # 2400 elements: erf's polynomial path
    attrs = check_attrs(op, {})
    out = op.forward(x, **attrs)
    g = np.random.default_rng(6).standard_normal(out.shape)
    (expected,) = op.vjp(g, out, x, **attrs)
    for other in (np.asfortranarray(x), np.repeat(x, 2, axis=-1)[..., ::2]):
        kept = other.copy()
        np.testing.assert_allclose(op.forward(other, **attrs), out, rtol=1e-15)
        np.testing.assert_allclose(op.vjp(g, out, other, **attrs)[0], expected, rtol=1e-14, atol=1e-300)
        np.testing.assert_array_equal(other, kept)


# --- float32 stays float32 -------------------------------------------------------------------

@pytest.mark.parametrize("name, inputs, attrs", [p for p in CASES if p.values[0] in UNARY])
def test_float32_inputs_give_float32_values_and_gradients(name, inputs, attrs):
    op = OPS[name]
    attrs = check_attrs(op, attrs)
    xs64 = make(inputs)
    xs32 = cast_floats(xs64, np.float32)
    out32 = np.asarray(op.forward(*xs32, **attrs))
    out64 = np.asarray(op.forward(*xs64, **attrs))
    assert out32.dtype == np.float32 and out64.dtype == np.float64
    np.testing.assert_allclose(out32, out64, rtol=2e-6, atol=1e-6)
    g = np.random.default_rng(7).standard_normal(out32.shape)
    (d32,) = op.vjp(g.astype(np.float32), out32, *xs32, **attrs)
    (d64,) = op.vjp(g, out64, *xs64, **attrs)
    assert np.asarray(d32).dtype == np.float32
    np.testing.assert_allclose(unbroadcast(d32, xs32[0].shape), d64, rtol=1e-4, atol=1e-5)


def test_integer_and_bool_inputs_give_float64():
    for x in (np.array([1, -2, 0], dtype=np.int32), np.array([3, 0, -1], dtype=np.int64), np.array([True, False, True])):
        for name in UNARY:
            op = OPS[name]
            attrs = check_attrs(op, {})
            with np.errstate(all="ignore"):   # log1p(-2) is nan, as in the engine
                out = op.forward(x, **attrs)
                expected = op.forward(x.astype(np.float64), **attrs)
            assert out.dtype == np.float64 == op.infer(TensorSpec.of(x), **attrs).dtype, (name, x.dtype)
            np.testing.assert_allclose(out, expected, rtol=1e-15)


# --- values --------------------------------------------------------------------------------------

X = np.array([[0.5, -1.5, 2.0, np.nan], [3.0, -0.25, 1.0, 2.0]])
Y = np.array([1.5, -1.5, -4.0, 2.0])


@pytest.mark.parametrize("name", list(COMPARISONS))
def test_comparisons_agree_with_numpy(name):
    op = OPS[name]
    cases = [(X, Y), (Y, X), (X, np.array(2.0)), (np.array(0.0), np.array(-0.0)),
             (np.array([1, 2, 3], np.int32), np.array([1.0, 2.5, 2.0], np.float32)),
             (np.array([True, False]), np.array([[1], [0]], np.int64)),
             (np.array(2 ** 40 + 1, np.int64), np.array(2 ** 40, np.int64))]
    for x, y in cases:
        out = op.forward(x, y)
        np.testing.assert_array_equal(out, COMPARISONS[name](x, y))
        assert np.asarray(out).dtype == np.bool_
    nan = op.forward(np.array(np.nan), np.array(np.nan))
    assert bool(nan) is (name == "not_equal")  # nan compares unequal to everything, itself included


@pytest.mark.parametrize("name", list(LOGICAL))
def test_logic_agrees_with_numpy(name):
    op = OPS[name]
    a = np.array([[True, False, True, False]])
    b = np.array([[True], [False]])
    args = (a,) if name == "logical_not" else (a, b)
    out = op.forward(*args)
    np.testing.assert_array_equal(out, LOGICAL[name](*args))
    assert out.dtype == np.bool_ and out.shape == np.broadcast_shapes(*(x.shape for x in args))


def _points() -> np.ndarray:
    """Dense over each piece of erf's approximation, both sides of every boundary, tiny and huge values."""
    rng = np.random.default_rng(11)
    edges = np.array([1.0, 2.0, 3.0, 4.0])
    around = np.concatenate([np.nextafter(edges, 0), edges, np.nextafter(edges, 9),
                             edges - 1e-9, edges + 1e-9])
    tiny = 10.0 ** rng.uniform(-310, -1, 2000)
    values = np.concatenate([rng.uniform(0, 1, 20000), rng.uniform(1, 4, 20000), rng.uniform(4, 6.5, 5000),
                             rng.uniform(6.5, 27, 2000), np.linspace(0, 6, 6001), around, tiny,
                             [0.0, 5e-324, 1e-300, 0.5, 0.84375, 1.25, 2.857, 5.9, 6.0, 26.5, 30.0, 1e10, 1e300]])
    return np.concatenate([values, -values])


def _rel_error(got: np.ndarray, want: np.ndarray) -> float:
    normal = np.abs(want) >= np.finfo(np.float64).tiny   # subnormal results have fewer bits to be right in
    return float(np.max(np.abs(got[normal] - want[normal]) / np.abs(want[normal])))


def test_erf_agrees_with_math_erf_to_a_few_ulp():
    x = _points()
    want = np.array([math.erf(v) for v in x])
    got = elementwise.erf(x)                       # the polynomials: x is large
    assert x.size > elementwise.ERF_LIBM_MAX
    assert _rel_error(got, want) <= 5e-16          # measured 2.7e-16 (math.erf is within 1 ulp itself)
    assert np.max(np.abs(got - want)) <= 2.3e-16
    subnormal = np.abs(want) < np.finfo(np.float64).tiny
    np.testing.assert_allclose(got[subnormal], want[subnormal], rtol=1e-6, atol=1e-323)
    small = x[np.abs(x) < 3][: elementwise.ERF_LIBM_MAX]   # the small-array path: math.erf itself
    np.testing.assert_array_equal(elementwise.erf(small), [math.erf(v) for v in small])


def test_erfc_of_the_normal_cdf_agrees_with_math_erfc():
    x = _points()
    want = np.array([math.erfc(v) for v in x])
    got = elementwise._erf_or_erfc(x, complement=True)
    assert _rel_error(got, want) <= 2e-15          # measured 1.0e-15 (erfc near 1 is 1 - erf)


def test_erf_against_mpmath_when_available():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    x = np.concatenate([_points()[::20], np.linspace(-6, 6, 1201)])
    want = np.array([float(mpmath.erf(mpmath.mpf(float(v)))) for v in x])
    got = elementwise.erf(x)
    ulps = np.abs(got - want) / np.spacing(np.maximum(np.abs(want), np.finfo(np.float64).tiny))
    assert np.max(ulps) <= 2


def test_erf_special_values():
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e300, -1e300, 5e-324, 27.0, -6.0])
    for x in (specials, np.resize(specials, LARGE)):           # both paths
        got = elementwise.erf(x)[: specials.size]
        np.testing.assert_array_equal(got[[0, 2, 3, 5, 6, 8, 9]], [0.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
        assert np.signbit(got[1]) and np.isnan(got[4]) and got[7] == 5e-324
    x = np.full(LARGE, 0.5)
    x[::7] = np.nan
    got = elementwise.erf(x)
    assert np.isnan(got[::7]).all() and not np.isnan(np.delete(got, np.s_[::7])).any()


def test_erf_keeps_shapes_and_float32():
    for shape in [(), (0,), (3, 0), (2, 3), (LARGE,), (2, LARGE)]:
        x = np.random.default_rng(0).standard_normal(shape)
        out = elementwise.erf(x)
        assert out.shape == shape and out.dtype == np.float64
        x32 = x.astype(np.float32)
        out32 = elementwise.erf(x32)
        assert out32.shape == shape and out32.dtype == np.float32
        np.testing.assert_array_equal(out32, elementwise.erf(x32.astype(np.float64)).astype(np.float32))


def _gelu_exact(x: float) -> float:
    return 0.5 * x * math.erfc(-x / math.sqrt(2))


def _gelu_tanh(x: float) -> float:
    return 0.5 * x * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


@pytest.mark.parametrize("size", [7, LARGE])
def test_gelu_agrees_with_its_formulas(size):
    op = OPS["gelu"]
    x = np.linspace(-9.0, 9.0, size)
    exact = op.forward(x, approximate="none")
    np.testing.assert_allclose(exact, [_gelu_exact(v) for v in x], rtol=1e-13, atol=0)
    np.testing.assert_allclose(op.forward(x, **check_attrs(op, {})), exact, rtol=0)   # "none" is the default
    # the textbook form 0.5 x (1 + erf(x / sqrt 2)) agrees where 1 + erf does not cancel
    right = x > -2
    np.testing.assert_allclose(exact[right], [0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x[right]],
                               rtol=1e-13, atol=1e-15)
    approx = op.forward(x, approximate="tanh")
    np.testing.assert_allclose(approx, [_gelu_tanh(v) for v in x], rtol=1e-12, atol=1e-15)
    assert np.max(np.abs(approx - exact)) < 1e-3                # the approximation is close to the real thing


def test_gelu_far_left_keeps_its_relative_accuracy():
    """x Phi(x) for x << 0 is tiny but not zero: computed with erfc, not 1 + erf (which gives 0). (The
    rounding of x / sqrt(2) alone moves erfc by x² eps relative: 1e-13 at x = -30, in either computation.)"""
    x = np.array([-10.0, -20.0, -30.0])
    np.testing.assert_allclose(OPS["gelu"].forward(x), [_gelu_exact(v) for v in x], rtol=3e-13)
    assert (OPS["gelu"].forward(x) < 0).all()
    assert (OPS["gelu"].forward(x[:2], approximate="tanh") < 0).all()  # x sigmoid(2z) rather than 1 + tanh(z)


def test_log1p_expm1_and_sign_values():
    tiny = np.array([1e-20, -1e-17, 3e-10])
    np.testing.assert_array_equal(OPS["log1p"].forward(tiny), np.log1p(tiny))
    np.testing.assert_array_equal(OPS["expm1"].forward(tiny), np.expm1(tiny))
    np.testing.assert_allclose(OPS["log1p"].forward(tiny), tiny, rtol=1e-9)    # where log(1 + x) would give 0
    with np.errstate(all="ignore"):
        edge = OPS["log1p"].forward(np.array([-1.0, -2.0]))
    assert edge[0] == -np.inf and np.isnan(edge[1])
    x = np.array([-3.5, -0.0, 0.0, 2.0, np.nan, -np.inf])
    np.testing.assert_array_equal(OPS["sign"].forward(x), np.sign(x))


# --- refusals ------------------------------------------------------------------------------------

F64 = np.dtype("float64")


@pytest.mark.parametrize("name", list(LOGICAL))
@pytest.mark.parametrize("dtype", ["float64", "float32", "int64", "int32"])
def test_logic_refuses_inputs_that_are_not_bool(name, dtype):
    op = OPS[name]
    good, bad = TensorSpec((3,), np.dtype(bool)), TensorSpec((3,), np.dtype(dtype))
    combos = [(bad,)] if op.arity == 1 else [(bad, good), (good, bad), (bad, bad)]
    for specs in combos:
        with pytest.raises(OpError, match=rf"{name} needs bool inputs, but (its input|input [01]) is {dtype}") as info:
            op.infer(*specs)
        assert info.value.reason == "DTYPE_MISMATCH"
        assert "comparison" in str(info.value)


@pytest.mark.parametrize("name", ["less", "equal", "logical_or"])
def test_shapes_that_do_not_broadcast_are_refused(name):
    dtype = np.dtype(bool) if name in LOGICAL else F64
    with pytest.raises(OpError, match="cannot be broadcast") as info:
        OPS[name].infer(TensorSpec((2, 3), dtype), TensorSpec((4,), dtype))
    assert info.value.reason == "SHAPE_MISMATCH"


def test_gelu_refuses_an_unknown_approximation():
    op = OPS["gelu"]
    for mode in ("fast", "Tanh", "", "sigmoid"):
        with pytest.raises(OpError, match=r"approximate must be one of 'none', 'tanh', got") as info:
            op.infer(TensorSpec((3,), F64), **check_attrs(op, {"approximate": mode}))
        assert info.value.reason == "BAD_ATTRIBUTE" and info.value.field == "attrs.approximate"
        with pytest.raises(OpError, match="approximate must be one of"):
            op.forward(np.ones(3), approximate=mode)
    with pytest.raises(BadAttributeError, match="expected a string"):
        check_attrs(op, {"approximate": True})
    assert op.attrs["approximate"].kind == "string" and op.attrs["approximate"].default == "none"


# --- the builder's syntax, end to end through LocalClient ----------------------------------------

@pytest.fixture(scope="module")
def local():
    with LocalClient() as client:
        yield client


def test_where_with_a_comparison_gives_relus_gradient(local):
    g = GraphBuilder()
    x = g.input("x", (6,))
    f = ops.where(x > 0, x, 0.0).sum(name="f")
    value = np.array([-2.0, -0.5, 0.0, 0.5, 1.0, 3.0])
    result = local.evaluate(f, x=value)
    assert result.value == pytest.approx(4.5)
    np.testing.assert_array_equal(result.grad[x], [0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    relu = local.evaluate(x.relu().sum(name="r"), x=value)
    np.testing.assert_array_equal(result.grad[x], relu.grad[x])


def test_each_comparison_operator_and_its_reflected_form(local):
    g = GraphBuilder()
    x = g.input("x", (5,))
    y = g.input("y", (5,))
    xv = np.array([-1.0, 0.0, 0.5, 2.0, 3.0])
    yv = np.array([0.0, 0.0, 1.0, 1.0, 3.0])
    built = {
        "x < y": (x < y, xv < yv, "less"), "x <= y": (x <= y, xv <= yv, "less_equal"),
        "x > y": (x > y, xv > yv, "greater"), "x >= y": (x >= y, xv >= yv, "greater_equal"),
        "x < 0.5": (x < 0.5, xv < 0.5, "less"), "0.5 < x": (0.5 < x, 0.5 < xv, "greater"),
        "1 >= x": (1 >= x, 1 >= xv, "less_equal"), "0 <= x": (0 <= x, 0 <= xv, "greater_equal"),
        "array < x": (np.full(5, 0.25) < x, 0.25 < xv, "greater"),
        "numpy scalar > x": (np.float64(0.25) > x, 0.25 > xv, "less"),
        "equal": (ops.equal(x, y), xv == yv, "equal"), "not_equal": (ops.not_equal(x, 0.0), xv != 0, "not_equal"),
    }
    for text, (var, expected, op) in built.items():
        assert var.op == op and var.dtype == "bool", text
        got = local.evaluate(var, x=xv, y=yv, grads="none").value
        np.testing.assert_array_equal(got, expected, err_msg=text)


def test_and_or_not_on_masks(local):
    g = GraphBuilder()
    x = g.input("x", (6,))
    xv = np.array([-6.0, -1.0, 0.0, 0.5, 2.0, 7.0])
    inside = (x > -1) & (x < 1)
    outside = ~inside
    either = (x < -5) | (x > 5)
    for var, expected, op in ((inside, (xv > -1) & (xv < 1), "logical_and"), (outside, ~((xv > -1) & (xv < 1)), "logical_not"),
                              (either, (xv < -5) | (xv > 5), "logical_or"), (True & (x > 0), xv > 0, "logical_and"),
                              ((x > 0) | False, xv > 0, "logical_or"), (ops.logical_not(x > 0), xv <= 0, "logical_not")):
        assert var.op == op and var.dtype == "bool"
        np.testing.assert_array_equal(local.evaluate(var, x=xv, grads="none").value, expected)
    f = ops.where(inside, x * x, 0.0).sum(name="f")      # a mask built from x: only the selected branch gets a gradient
    result = local.evaluate(f, x=xv)
    np.testing.assert_array_equal(result.grad[x], np.where((xv > -1) & (xv < 1), 2 * xv, 0.0))


def test_logic_on_a_float_is_refused_by_the_server(local):
    g = GraphBuilder()
    x = g.input("x", (3,))
    for var in (x & (x > 0), ~x, ops.logical_or(x > 0, x)):
        with pytest.raises(InvalidArgument, match="needs bool inputs") as info:
            local.evaluate(var, x=np.ones(3), grads="none")
        assert info.value.reason == "DTYPE_MISMATCH" and info.value.node == var.name


def test_double_equals_stays_identity_and_points_to_ops_equal():
    g = GraphBuilder()
    x, y = g.input("x"), g.input("y")
    for comparison in (lambda: x == 0, lambda: x != 0.0, lambda: np.float64(0) == x, lambda: x == np.zeros(3)):
        with pytest.raises(TypeError, match=r"ops\.equal\(a, b\) or ops\.not_equal\(a, b\)"):
            comparison()
    assert x == x and x != y and {x: 1, y: 2}[y] == 2 and y in [x, y]
    assert "ops.equal" in type(x).__doc__ and "identity" in type(x).__doc__
    with pytest.raises(TypeError, match=r"\(x > 0\) & \(x < 1\)"):
        0 < x < 1  # noqa: B015 - a chained comparison asks for the truth value of 0 < x


def test_literals_take_the_dtype_of_the_compared_var(local):
    g = GraphBuilder()
    x = g.input("x", (3,), "float32")
    n = g.input("n", (3,), "int32")
    m = x > 0.5
    assert m.inputs[1].dtype == "float32" and m.dtype == "bool"
    k = n >= 2
    assert k.inputs[1].dtype == "int32"
    result = local.evaluate(ops.logical_and(m, k), x=np.array([0.0, 1.0, 2.0], np.float32),
                            n=np.array([5, 1, 2], np.int32), grads="none")
    np.testing.assert_array_equal(result.value, [False, False, True])


def test_var_methods_and_ops_functions_of_the_new_elementwise_operators(local):
    g = GraphBuilder()
    x = g.input("x", (5,))
    xv = np.array([-0.9, -0.5, 0.1, 0.7, 1.5])
    exact = np.array([_gelu_exact(v) for v in xv])
    built = [
        (x.erf(), ops.erf(x), np.array([math.erf(v) for v in xv]), "erf"),
        (x.gelu(), ops.gelu(x), exact, "gelu"),
        (x.gelu("tanh"), ops.gelu(x, approximate="tanh"), np.array([_gelu_tanh(v) for v in xv]), "gelu"),
        (x.log1p(), ops.log1p(x), np.log1p(xv), "log1p"),
        (x.expm1(), ops.expm1(x), np.expm1(xv), "expm1"),
        (x.sign(), ops.sign(x), np.sign(xv), "sign"),
    ]
    for method, function, expected, op in built:
        assert method.op == function.op == op and method.dtype == function.dtype == "float64"
        for var in (method, function):
            result = local.evaluate(var.sum(), x=xv)
            assert result.value == pytest.approx(expected.sum(), rel=1e-13)
            assert result.grad[x].shape == (5,)
    erf_grad = local.evaluate(x.erf().sum(), x=xv).grad[x]
    np.testing.assert_allclose(erf_grad, 2 / math.sqrt(math.pi) * np.exp(-xv * xv), rtol=1e-14)
    sign_grad = local.evaluate(x.sign().sum(), x=xv).grad[x]
    np.testing.assert_array_equal(sign_grad, np.zeros(5))
    assert x.gelu().attrs == {} and x.gelu("tanh").attrs["approximate"].s == "tanh"


def test_float32_through_the_builder_and_the_server(local):
    g = GraphBuilder()
    x = g.input("x", (4,), "float32")
    for var in (x.erf(), x.gelu(), x.gelu("tanh"), x.log1p(), x.expm1(), x.sign()):
        assert var.dtype == "float32"
        result = local.evaluate(var.sum(), x=np.array([-0.5, 0.25, 0.5, 2.0], np.float32), values="all")
        assert result.values[var.name].dtype == np.float32 and result.grad[x].dtype == np.float32


def test_gelu_with_an_unknown_approximation_is_refused_by_the_server(local):
    g = GraphBuilder()
    x = g.input("x", (3,))
    with pytest.raises(InvalidArgument, match=r"approximate must be one of 'none', 'tanh', got 'fast'") as info:
        local.evaluate(x.gelu("fast").sum(), x=np.ones(3))
    assert info.value.reason == "BAD_ATTRIBUTE"
