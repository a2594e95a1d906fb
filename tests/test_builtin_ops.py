"""Every built-in operator: vjp against finite differences, infer against forward, dtypes and edge cases.

The heart of the file is CASES, a table of hand-picked inputs per operator
(broadcasting, size-1 axes, 0-d scalars, negative axes); each case is checked
for its gradient, for infer agreeing with forward in five dtypes, and for
float32 staying float32. The operators' own ``sample`` rules are checked too.
"""
from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest

from chainrule.core import (
    GraphIR, OpError, Registry, ShapeError, TensorSpec, check_attrs, compile_graph, evaluate, unbroadcast,
)
from chainrule.plugins.builtin import (
    arith, common, compare, control, conv, derivative, elementwise, index, linalg, nn, reduce, select, shape,
)
from chainrule.plugins.testing import assert_vjp, check_operator, check_vjp

from rule_checks import assert_accepts_numpy_scalars, assert_layout_independent

FAMILIES = (arith, elementwise, linalg, reduce, shape, nn, select, compare, index, conv, control, derivative)
OPS = {op.name: op for family in FAMILIES for op in family.OPERATORS}
BUILTIN_DIR = Path(common.__file__).parent


# --- input makers: a kind of values and a shape, made with the case's own rng ----------------

class In:
    """A recipe for one input; ``repr`` gives the short form used in test ids."""

    def __init__(self, kind: str, shape: tuple[int, ...], make) -> None:
        self.kind, self.shape, self.make = kind, shape, make

    def __repr__(self) -> str:
        return f"{self.kind}{list(self.shape)}"


def N(*shape):
    """Standard-normal floats."""
    return In("N", shape, lambda rng: np.asarray(rng.standard_normal(shape)))


def P(*shape):
    """Positive floats in [0.5, 2] (log, sqrt, pow's base)."""
    return In("P", shape, lambda rng: np.asarray(rng.uniform(0.5, 2.0, shape)))


def A(*shape):
    """Floats at least 0.2 away from 0 (kinks of abs and relu; divisors)."""
    return In("A", shape, lambda rng: np.asarray(rng.choice([-1.0, 1.0], shape) * rng.uniform(0.2, 2.0, shape)))


def C(*shape):
    """Floats at least 0.15 away from the clip bounds ±0.5 used below."""
    return In("C", shape, lambda rng: np.asarray(rng.integers(-3, 3, shape) * 0.5 + 0.25 + rng.uniform(-0.1, 0.1, shape)))


def D(*shape, offset=0.0):
    """Distinct values a whole unit apart (plus offset): no ties for max. Offsets 0 and 0.5 never meet."""
    size = math.prod(shape)
    return In("D", shape, lambda rng: np.asarray(
        (rng.permutation(size) - size // 2 + offset + rng.uniform(-0.1, 0.1, size)).reshape(shape)))


def L(classes, *shape, dtype=np.int64):
    """Integer class labels in [0, classes)."""
    return In(f"L{np.dtype(dtype).name}", shape, lambda rng: np.asarray(rng.integers(0, classes, shape), dtype=dtype))


def M(*shape):
    """A bool mask."""
    return In("M", shape, lambda rng: np.asarray(rng.random(shape) < 0.5))


def case(op: str, *inputs: In, **attrs):
    text = ",".join(f"{k}={v}" for k, v in attrs.items() if k != "value")
    return pytest.param(op, inputs, attrs, id=f"{op}({', '.join(map(repr, inputs))}){'{' + text + '}' if text else ''}")


# --- the table of cases --------------------------------------------------------------------------

UNARY_FLOAT = ("exp", "sin", "cos", "tanh", "sigmoid", "softplus")

CASES = [
    # arithmetic: broadcasting, size-1 axes, 0-d scalars
    case("add", N(2, 3), N(3)),
    case("add", N(), N(2, 2)),
    case("add", N(4, 1), N(1, 3)),
    case("sub", N(2, 3), N(2, 1)),
    case("sub", N(), N()),
    case("mul", N(2, 3), N(3)),
    case("mul", N(1), N(2, 1, 3)),
    case("div", N(2, 3), A(3)),
    case("div", N(), A(2, 2)),
    case("neg", N()),
    case("neg", N(2, 3)),
    case("pow", P(2, 3), N(3)),
    case("pow", P(), N(2)),
    case("pow", P(2, 1), N(1, 3)),
    case("maximum", D(2, 3), D(3, offset=0.5)),
    case("maximum", D(), D(2, 2, offset=0.5)),
    case("minimum", D(2, 3), D(2, 1, offset=0.5)),
    case("minimum", D(4), D(offset=0.5)),

    # elementwise
    *[case(name, N(2, 3)) for name in UNARY_FLOAT],
    *[case(name, N()) for name in UNARY_FLOAT],
    case("sigmoid", N(1, 4)),
    case("log", P(2, 3)),
    case("log", P()),
    case("sqrt", P(2, 3)),
    case("sqrt", P()),
    case("abs", A(2, 3)),
    case("abs", A()),
    case("relu", A(2, 3)),
    case("relu", A()),
    case("leaky_relu", A(2, 3)),
    case("leaky_relu", A(), alpha=0.2),
    case("clip", C(2, 3), min=-0.5, max=0.5),
    case("clip", C(), min=-0.5),
    case("clip", C(5), max=0.5),

    # linear algebra: every 1-D case of numpy's matmul, and broadcast batches
    case("matmul", N(3), N(3)),
    case("matmul", N(2, 3), N(3)),
    case("matmul", N(3), N(3, 4)),
    case("matmul", N(2, 3), N(3, 4)),
    case("matmul", N(1, 3), N(3, 1)),
    case("matmul", N(2, 2, 3), N(3, 4)),
    case("matmul", N(3), N(2, 3, 4)),
    case("matmul", N(2, 2, 3), N(3)),
    case("matmul", N(2, 1, 2, 3), N(3, 3, 1)),
    case("transpose", N(2, 3)),
    case("transpose", N(2, 3, 4), axes=(1, -1, 0)),
    case("transpose", N()),

    # reductions: all axes, negative axes, keepdims, 0-d, size-1 axes
    *[c for name, X in (("sum", N), ("mean", N), ("max", D), ("logsumexp", N)) for c in (
        case(name, X(2, 3, 4)),
        case(name, X(2, 3, 4), axis=(-1,)),
        case(name, X(2, 3, 4), axis=(0, 2), keepdims=True),
        case(name, X(2, 3, 4), axis=(-3, 1)),
        case(name, X()),
        case(name, X(1, 3), axis=(0,)),
        case(name, X(3, 1), keepdims=True),
    )],

    # shape
    case("reshape", N(2, 3, 4), shape=(4, -1)),
    case("reshape", N(2, 3), shape=(1, 6)),
    case("reshape", N(), shape=(1, 1)),
    case("reshape", N(1), shape=()),
    case("broadcast_to", N(3, 1), shape=(2, 3, 4)),
    case("broadcast_to", N(), shape=(2,)),
    case("broadcast_to", N(1, 3), shape=(1, 3)),
    case("concat", N(2, 1), N(2, 3), axis=-1),
    case("concat", N(1, 2), N(2, 2), N(3, 2)),
    case("concat", N(4)),
    case("stack", N(3), N(3), axis=-1),
    case("stack", N(), N(), N()),
    case("stack", N(2, 3), N(2, 3), axis=1),
    case("slice", N(5), starts=(-2,), ends=(100,)),
    case("slice", N(4, 5), starts=(3,), ends=(-100,), steps=(-1,)),
    case("slice", N(4, 5), starts=(1, 0), ends=(3, 5), axes=(-1, 0), steps=(1, 2)),
    case("slice", N(3, 4), starts=(0, -3), ends=(3, -1)),
    case("squeeze", N(1, 3, 1)),
    case("squeeze", N(1, 3, 1), axis=(-1,)),
    case("squeeze", N(1)),
    case("expand_dims", N(), axis=(0,)),
    case("expand_dims", N(2, 3), axis=(-1,)),
    case("expand_dims", N(2, 3), axis=(0, 2)),

    # neural-network functions and losses
    *[c for name in ("softmax", "log_softmax") for c in (
        case(name, N(2, 3)),
        case(name, N(2, 3), axis=0),
        case(name, N(2, 3, 4), axis=1),
        case(name, N(1)),
        case(name, N(4, 1), axis=-2),
    )],
    case("cross_entropy", N(4, 5), L(5, 4)),
    case("cross_entropy", N(2, 3, 4), L(4, 2, 3, dtype=np.int32)),
    case("cross_entropy", N(3), L(3)),
    case("mse", N(2, 3), N(2, 3)),
    case("mse", N(2, 3), N(3)),
    case("mse", N(), N()),
    case("mse", N(2, 3), N(1, 3)),

    # selection
    case("where", M(2, 3), N(2, 3), N(3)),
    case("where", M(3), N(2, 1), N()),
    case("where", M(), N(2), N(2)),
    case("const", value=np.arange(6.0).reshape(2, 3)),
    case("const", value=np.array(2.5)),

    # comparisons and logic: bool results, no gradient
    *[case(n, N(2, 3), N(3)) for n in ("less", "less_equal", "greater", "greater_equal", "equal", "not_equal")],
    case("less", N(), N(2, 2)),
    case("logical_and", M(2, 3), M(3)),
    case("logical_or", M(4, 1), M(1, 3)),
    case("logical_not", M(2, 3)),

    # more elementwise functions
    case("erf", N(2, 3)),
    case("erf", N()),
    case("gelu", N(2, 3)),
    case("gelu", N(), approximate="tanh"),
    case("log1p", P(2, 3)),
    case("expm1", N(2, 3)),
    case("sign", A(2, 3)),
    case("sign", A()),

    # more reductions
    case("min", D(2, 3)),
    case("min", D(2, 3, 4), axis=(0, -1), keepdims=True),
    case("prod", P(2, 3)),
    case("prod", N(2, 3, 4), axis=(1,)),
    case("var", N(3, 4)),
    case("var", N(2, 3, 4), axis=(-1,), keepdims=True, ddof=1),
    case("std", N(3, 4), axis=(0,)),
    case("std", N(2, 5), ddof=1),
    case("argmax", D(3, 4)),
    case("argmax", D(2, 3), axis=1, keepdims=True),
    case("argmin", D(3, 4), axis=-1),

    # indexing
    case("gather", N(5, 3), L(5, 4)),
    case("gather", N(2, 5), L(5, 3), axis=1),
    case("gather", N(4), L(4, 2, 3, dtype=np.int32)),
    case("one_hot", L(4, 3), depth=4),
    case("one_hot", L(3, 2, 2), depth=3, dtype="float32"),

    # more shape operators
    case("pad", N(3), pads=(1, 2)),
    case("pad", N(2, 1, 3), pads=(1, 0, -1, 0, 2, -2), value=-1.0),
    case("pad", N(), pads=()),
    case("tile", N(2, 1, 3), repeats=(1, 3, 2)),
    case("tile", N(), repeats=()),
    case("cumsum", N(2, 3, 4), axis=-1, exclusive=True),
    case("cumsum", N(3, 4), axis=0, reverse=True),
    case("cumsum", N(1, 4), axis=-2, exclusive=True, reverse=True),
    case("flip", N(2, 3)),
    case("flip", N(2, 3, 4), axes=(0, -1)),
    case("flip", N()),

    # normalization, einsum, convolution and pooling
    case("layer_norm", N(2, 5), N(5), N(5)),
    case("layer_norm", N(2, 3, 4), N(3, 4), N(4), axis=1, epsilon=0.1),
    case("einsum", N(2, 3), N(3, 4), equation="ij,jk->ik"),
    case("einsum", N(3, 3), equation="ii->"),
    case("einsum", N(2, 1, 3), N(4, 3), equation="...i,...i"),
    case("einsum", N(), N(3), equation=",i->i"),
    case("conv", N(2, 3, 5, 5), N(4, 3, 3, 3), pads=(1, 1, 1, 1)),
    case("conv", N(1, 4, 6, 5), N(4, 2, 2, 3), strides=(2, 1), pads=(1, 0, 0, 2), dilations=(1, 2), group=2),
    case("conv", N(2, 2, 7), N(3, 2, 3), strides=(2,), pads=(1, 2), dilations=(2,)),
    case("max_pool", D(2, 2, 5, 5), kernel_shape=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1)),
    case("max_pool", D(2, 2, 7), kernel_shape=(2,)),
    case("avg_pool", N(1, 2, 5, 4), kernel_shape=(3, 2), pads=(1, 0, 1, 1)),
    case("avg_pool", N(2, 2, 7), kernel_shape=(3,), strides=(2,), pads=(1, 1), count_include_pad=True),
]

#: Operators whose result is bool or an integer whatever the float width of their inputs.
NOT_FLOAT_RESULT = frozenset({"less", "less_equal", "greater", "greater_equal", "equal", "not_equal",
                              "logical_and", "logical_or", "logical_not", "argmax", "argmin", "one_hot"})


def make(inputs, seed: int = 1234) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [recipe.make(rng) for recipe in inputs]


def cast_floats(xs: list[np.ndarray], dtype) -> list[np.ndarray]:
    return [x.astype(dtype) if x.dtype.kind == "f" else x for x in xs]


# --- gradients -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, inputs, attrs", CASES)
def test_vjp_matches_finite_differences(name, inputs, attrs):
    assert_vjp(OPS[name], make(inputs), attrs)


@pytest.mark.parametrize("name", sorted(OPS))
def test_operator_samples_pass_the_gradient_check(name):
    reports = check_operator(OPS[name])
    if name == "stop_gradient":
        assert reports == []  # exempt: its gradient is zero by design
        return
    assert reports
    for report in reports:
        assert report.passed, str(report)


CASE_NAMES = {p.values[0] for p in CASES}


#: Operators tested in files of their own: scan (tests/test_scan.py, against the unrolled graph); the
#: derivative helpers of shape, index and conv (tests/test_symbolic_rules_more.py).
OWN_FILES = {"scan", "reshape_like", "unslice", "untile", "concat_part", "scatter_add", "one_hot_like",
             "conv_grad_x", "conv_grad_w", "max_pool_grad", "max_pool_pick", "avg_pool_grad",
             # builtin.derivative: tests/test_symbolic.py
             "sum_to", "broadcast_like", "unreduce", "zeros_like", "ones_like", "scalar_like", "group_size", "step",
             "extremum_weights", "prod_except", "xmul"}


def test_every_operator_has_hand_picked_cases():
    assert CASE_NAMES | {"stop_gradient"} | OWN_FILES == set(OPS)


def test_stop_gradient_passes_the_value_and_blocks_the_gradient():
    op = OPS["stop_gradient"]
    x = np.array([1.0, -2.0])
    assert op.forward(x) is x
    assert op.vjp(np.ones(2), x, x) == (None,)
    report = check_vjp(op, [x])  # the checker sees the identity's derivative, and zeros from the vjp
    worst = report.inputs[0]
    assert not report.passed and worst.analytic == 0.0 and abs(worst.numeric) > 0.1


# --- infer against forward, in every dtype -----------------------------------------------------

@pytest.mark.parametrize("dtype", ["float64", "float32", "int64", "int32", "bool"])
@pytest.mark.parametrize("name, inputs, attrs", CASES)
def test_infer_gives_exactly_what_forward_returns(name, inputs, attrs, dtype):
    op = OPS[name]
    xs = cast_floats(make(inputs), dtype)
    attrs = check_attrs(op, attrs)
    try:
        spec = op.infer(*[TensorSpec.of(x) for x in xs], **attrs)
    except OpError as exc:  # a refusal is fine for int and bool inputs, never for floats
        assert dtype in ("int64", "int32", "bool"), exc
        assert exc.reason == "DTYPE_MISMATCH", exc
        return
    with np.errstate(all="ignore"):
        try:
            out = np.asarray(op.apply(*xs, **attrs)[0])
        except OpError as exc:  # e.g. integers to negative integer powers
            assert dtype in ("int64", "int32"), exc
            return
    assert TensorSpec.of(out) == TensorSpec(tuple(spec.shape), np.dtype(spec.dtype))


MIXED = [("float32", "float64"), ("float64", "float32"), ("float32", "int32"), ("int64", "float32"),
         ("int32", "int64"), ("bool", "float32"), ("float32", "bool")]
# (cross_entropy and gather take integer indices; logical_* take bools only)
BINARY = [p for p in CASES if len(p.values[1]) == 2
          and p.values[0] not in ("cross_entropy", "gather", "logical_and", "logical_or")]


@pytest.mark.parametrize("dtypes", MIXED, ids="-".join)
@pytest.mark.parametrize("name, inputs, attrs", BINARY)
def test_infer_follows_numpy_promotion_for_mixed_dtypes(name, inputs, attrs, dtypes):
    op = OPS[name]
    xs = [x.astype(dt) for x, dt in zip(make(inputs), dtypes)]
    attrs = check_attrs(op, attrs)
    try:
        spec = op.infer(*[TensorSpec.of(x) for x in xs], **attrs)
    except OpError as exc:
        pytest.fail(f"{name} refused {dtypes}: {exc}")
    with np.errstate(all="ignore"):
        try:
            out = np.asarray(op.apply(*xs, **attrs)[0])
        except OpError as exc:  # integers to negative integer powers
            assert name == "pow" and all(x.dtype.kind in "iub" for x in xs), exc
            return
    assert TensorSpec.of(out) == spec


@pytest.mark.parametrize("name, inputs, attrs", [p for p in CASES if any(not r.shape for r in p.values[1])])
def test_rules_accept_numpy_scalars(name, inputs, attrs):
    """The engine keeps 0-d results as numpy scalars (np.float64), and may pass g as one."""
    op = OPS[name]
    assert_accepts_numpy_scalars(op, make(inputs), check_attrs(op, attrs))



@pytest.mark.parametrize("name, inputs, attrs", [p for p in CASES if any(len(r.shape) > 1 for r in p.values[1])])
def test_rules_do_not_depend_on_memory_layout(name, inputs, attrs):
    """Fortran-ordered and strided inputs (transposes, slices of other values) give the same results."""
    op = OPS[name]
    assert_layout_independent(op, make(inputs), check_attrs(op, attrs))



def test_integer_inputs_of_float_functions_give_float64():
    x = np.array([1, 2, 3], dtype=np.int32)
    for name in ("exp", "log", "sqrt", "sin", "cos", "tanh", "sigmoid", "softplus", "leaky_relu", "clip"):
        op = OPS[name]
        assert op.forward(x, **check_attrs(op, {})).dtype == np.float64, name
        assert op.infer(TensorSpec.of(x), **check_attrs(op, {})).dtype == np.float64, name
    assert OPS["div"].forward(x, x).dtype == np.float64
    assert OPS["relu"].forward(x).dtype == np.int32
    assert OPS["sum"].infer(TensorSpec.of(x), axis=None, keepdims=False).dtype == np.int64


# --- float32 stays float32 -------------------------------------------------------------------

@pytest.mark.parametrize("name, inputs, attrs", CASES)
def test_float32_inputs_give_float32_values_and_gradients(name, inputs, attrs):
    op = OPS[name]
    attrs = check_attrs(op, attrs)
    if name == "const":
        attrs["value"] = attrs["value"].astype(np.float32)
    xs64 = make(inputs)
    xs32 = cast_floats(xs64, np.float32)
    with np.errstate(all="ignore"):
        out32, saved32 = op.apply(*xs32, **attrs)
        out32 = np.asarray(out32)
        out64, saved64 = op.apply(*xs64, **attrs)
        if name in NOT_FLOAT_RESULT:  # bool or integer whatever the inputs' float width; no gradient
            assert out32.dtype == np.asarray(out64).dtype and out32.dtype.kind != "f" \
                or attrs.get("dtype") is not None
            return
        assert out32.dtype == np.float32
        g64 = np.random.default_rng(7).standard_normal(out32.shape)
        grads32 = op.apply_vjp(g64.astype(np.float32), out32, *xs32, saved=saved32, **attrs)
        grads64 = op.apply_vjp(g64, np.asarray(out64), *xs64, saved=saved64, **attrs)
    for x, g32, g_ref in zip(xs32, grads32, grads64):
        if x.dtype.kind != "f":
            continue
        assert np.asarray(g32).dtype == np.float32
        np.testing.assert_allclose(unbroadcast(g32, x.shape), unbroadcast(g_ref, x.shape), rtol=1e-4, atol=1e-5)


# --- forward values against plain numpy ----------------------------------------------------------

X = np.array([[0.5, -1.5, 2.0], [3.0, -0.25, 1.0]])
Y = np.array([1.5, 2.0, -4.0])

FORWARD = [
    ("add", [X, Y], {}, X + Y),
    ("div", [X, Y], {}, X / Y),
    ("pow", [np.abs(X), Y], {}, np.abs(X) ** Y),
    ("maximum", [X, Y], {}, np.maximum(X, Y)),
    ("sigmoid", [X], {}, 1 / (1 + np.exp(-X))),
    ("softplus", [X], {}, np.log1p(np.exp(X))),
    ("leaky_relu", [X], {"alpha": 0.1}, np.where(X > 0, X, 0.1 * X)),
    ("clip", [X], {"min": -1.0, "max": 1.0}, np.clip(X, -1, 1)),
    ("matmul", [X, Y], {}, X @ Y),
    ("transpose", [X[None]], {"axes": (2, 0, 1)}, np.transpose(X[None], (2, 0, 1))),
    ("sum", [X], {"axis": (-1,), "keepdims": True}, X.sum(axis=-1, keepdims=True)),
    ("mean", [X], {}, X.mean()),
    ("max", [X], {"axis": (0,)}, X.max(axis=0)),
    ("logsumexp", [X], {"axis": (1,)}, np.log(np.exp(X).sum(axis=1))),
    ("slice", [np.arange(10.0)], {"starts": (-3,), "ends": (2,), "steps": (-2,)}, np.arange(10.0)[-3:2:-2]),
    ("concat", [X, X[:1]], {"axis": 0}, np.concatenate([X, X[:1]])),
    ("stack", [Y, Y], {"axis": -1}, np.stack([Y, Y], axis=-1)),
    ("softmax", [X], {"axis": 0}, np.exp(X) / np.exp(X).sum(axis=0, keepdims=True)),
    ("log_softmax", [X], {}, X - np.log(np.exp(X).sum(axis=-1, keepdims=True))),
    ("cross_entropy", [X, np.array([2, 0])], {},
     -np.mean(np.log((np.exp(X) / np.exp(X).sum(-1, keepdims=True))[[0, 1], [2, 0]]))),
    ("mse", [X, Y], {}, np.mean((X - Y) ** 2)),
    ("where", [X > 0, X, Y], {}, np.where(X > 0, X, Y)),
]


@pytest.mark.parametrize("name, xs, attrs, expected", FORWARD, ids=[f[0] for f in FORWARD])
def test_forward_agrees_with_numpy(name, xs, attrs, expected):
    op = OPS[name]
    np.testing.assert_allclose(op.apply(*xs, **check_attrs(op, attrs))[0], expected, rtol=1e-12, atol=1e-12)


def test_stable_for_large_magnitudes_without_overflow():
    big = np.array([-1000.0, -40.0, 0.0, 40.0, 1000.0])
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        s = OPS["sigmoid"].forward(big)
        sp = OPS["softplus"].forward(big)
        lse = OPS["logsumexp"].forward(np.array([1000.0, 1000.0]))
        sm = OPS["softmax"].forward(np.array([1000.0, 0.0, -1000.0]))
        ce = OPS["cross_entropy"].forward(np.array([[1000.0, -1000.0]]), np.array([1]))
    np.testing.assert_allclose(s, [0.0, 4.248354255291589e-18, 0.5, 1.0, 1.0], rtol=1e-15)
    np.testing.assert_allclose(sp, [0.0, 4.248354255291589e-18, math.log(2), 40.0, 1000.0], rtol=1e-15)
    assert lse == pytest.approx(1000 + math.log(2))
    np.testing.assert_allclose(sm, [1.0, 0.0, 0.0])
    assert ce == pytest.approx(2000.0)


# --- gradient semantics --------------------------------------------------------------------------

def test_max_gate_ties_split_the_gradient_evenly():
    three = np.array(3.0)
    for name in ("maximum", "minimum"):
        dx, dy = OPS[name].vjp(np.array(2.0), three, three, three)
        assert (float(dx), float(dy)) == (1.0, 1.0)
    x = np.array([1.0, 3.0, 3.0])
    (dx,) = OPS["max"].vjp(np.array(1.0), np.array(3.0), x, axis=None, keepdims=False)
    np.testing.assert_array_equal(dx, [0.0, 0.5, 0.5])
    rows = np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 0.0]])
    (dx,) = OPS["max"].vjp(np.ones(2), rows.max(axis=1), rows, axis=(1,), keepdims=False)
    np.testing.assert_array_equal(dx, [[0.0, 0.5, 0.5], [0.5, 0.5, 0.0]])


def test_max_gate_routes_to_the_winner():
    dx, dy = OPS["maximum"].vjp(np.array(2.0), np.array(4.0), np.array(4.0), np.array(2.0))
    assert (float(dx), float(dy)) == (2.0, 0.0)


def test_kinks_have_zero_gradient():
    zero = np.zeros(3)
    assert not np.any(OPS["abs"].vjp(np.ones(3), zero, zero)[0])
    assert not np.any(OPS["relu"].vjp(np.ones(3), zero, zero)[0])


def test_pow_gradient_for_the_exponent_is_zero_at_a_zero_base():
    x, y = np.array([0.0, 2.0]), np.array([2.0, 3.0])
    with np.errstate(all="ignore"):  # as in the engine: log(0) is computed, then masked
        dx, dy = OPS["pow"].vjp(np.ones(2), x ** y, x, y)
        np.testing.assert_allclose(dy, [0.0, 8 * math.log(2)])
        np.testing.assert_allclose(dx, [0.0, 12.0])
        dx, _ = OPS["pow"].vjp(np.ones(1), np.ones(1), np.zeros(1), np.zeros(1))  # d(x**0)/dx = 0, not nan
    assert dx[0] == 0.0


# --- errors ------------------------------------------------------------------------------------

def test_matmul_shape_mismatch_names_the_inner_dimensions():
    with pytest.raises(OpError, match="inner dimensions 4 and 3 do not match"):
        OPS["matmul"].infer(TensorSpec((2, 4), np.dtype("float64")), TensorSpec((3, 5), np.dtype("float64")))
    with pytest.raises(OpError, match="batch dimensions"):
        OPS["matmul"].infer(TensorSpec((2, 2, 3), np.dtype("float64")), TensorSpec((4, 3, 1), np.dtype("float64")))


def test_matmul_skips_the_gradient_nobody_needs():
    op = OPS["matmul"]
    assert op.selective_vjp
    a, b = np.ones((2, 3)), np.ones((3, 4))
    g = np.ones((2, 4))
    da, db = op.vjp(g, a @ b, a, b, needs=(False, True))
    assert da is None and db.shape == (3, 4)
    da, db = op.vjp(np.array(1.0), np.array(3.0), np.ones(3), np.ones(3), needs=(True, False))
    assert db is None and da.shape == (3,)
    graph = GraphIR.build([("x", "float64", (2, 3)), ("w", "float64", (3, 4))],
                        [("h", "matmul", ("x", "w")), ("loss", "sum", ("h",))], "loss")
    result = evaluate(compile_graph(graph, Registry(OPS.values())), {"x": a, "w": b}, wrt=["w"])
    np.testing.assert_array_equal(result.grad("w"), np.full((3, 4), 2.0))


def test_matmul_mismatch_in_a_graph_names_the_node():
    graph = GraphIR.build([("a", "float64", (2, 4)), ("b", "float64", (3, 5))], [("h", "matmul", ("a", "b"))], "h")
    with pytest.raises(ShapeError, match=r"node 'h' \(matmul\): inner dimensions 4 and 3"):
        compile_graph(graph, Registry(OPS.values()))


def test_cross_entropy_rejects_an_out_of_range_label():
    logits = np.zeros((3, 4))
    with pytest.raises(OpError, match=r"label 7 at position \(1,\) is out of range for 4 classes"):
        OPS["cross_entropy"].forward(logits, np.array([0, 7, 1]))
    with pytest.raises(OpError, match="label -1"):
        OPS["cross_entropy"].forward(logits, np.array([0, 1, -1]))
    with pytest.raises(OpError, match="int32 or int64") as info:
        OPS["cross_entropy"].infer(TensorSpec((3, 4), np.dtype("float64")), TensorSpec((3,), np.dtype("float64")))
    assert info.value.reason == "DTYPE_MISMATCH"


@pytest.mark.parametrize("name, shapes, attrs, message, reason", [
    ("sum", [(2, 3)], {"axis": (2,)}, "axis 2 is out of range for a tensor of rank 2", "BAD_ATTRIBUTE"),
    ("max", [(2, 3)], {"axis": (-3,)}, "axis -3 is out of range for a tensor of rank 2", "BAD_ATTRIBUTE"),
    ("mean", [(2, 3)], {"axis": (1, -1)}, "given twice", "BAD_ATTRIBUTE"),
    ("max", [(2, 0)], {"axis": (1,)}, "size 0", "SHAPE_MISMATCH"),
    ("softmax", [()], {}, "axis -1 is out of range for a tensor of rank 0", "BAD_ATTRIBUTE"),
    ("transpose", [(2, 3)], {"axes": (0, 0)}, "not a permutation", "BAD_ATTRIBUTE"),
    ("reshape", [(2, 3)], {"shape": (4, -1)}, "cannot reshape", "BAD_ATTRIBUTE"),
    ("reshape", [(2, 3)], {"shape": (-1, -1)}, "at most one -1", "BAD_ATTRIBUTE"),
    ("broadcast_to", [(2, 3)], {"shape": (3, 3)}, "cannot broadcast", "BAD_ATTRIBUTE"),
    ("concat", [(2, 3), (3, 2)], {"axis": 0}, "input 1 has shape", "SHAPE_MISMATCH"),
    ("concat", [(), ()], {}, "cannot concatenate 0-d tensors", "SHAPE_MISMATCH"),
    ("stack", [(2,), (3,)], {}, "equal shapes", "SHAPE_MISMATCH"),
    ("slice", [(4,)], {"starts": (0,), "ends": (2,), "steps": (0,)}, "step for axis 0 is 0", "BAD_ATTRIBUTE"),
    ("slice", [(4,)], {"starts": (0, 0), "ends": (2, 2)}, "starts has 2 entries", "BAD_ATTRIBUTE"),
    ("squeeze", [(2, 1)], {"axis": (0,)}, "cannot squeeze axis 0 of size 2", "BAD_ATTRIBUTE"),
    ("expand_dims", [(2,)], {"axis": (2,)}, "axis 2 is out of range for a tensor of rank 2", "BAD_ATTRIBUTE"),
    ("clip", [(2,)], {"min": 1.0, "max": 0.0}, "min 1.0 is greater than max 0.0", "BAD_ATTRIBUTE"),
    ("add", [(2, 3), (4,)], {}, "cannot be broadcast", "SHAPE_MISMATCH"),
    ("where", [(2,), (3,), (3,)], {}, "cannot be broadcast", "SHAPE_MISMATCH"),
    ("mse", [(2, 1), (1, 2)], {}, "larger than either", "SHAPE_MISMATCH"),
    ("mse", [(2,), (3,)], {}, "cannot be broadcast", "SHAPE_MISMATCH"),
    ("matmul", [(), (3,)], {}, "at least one axis", "SHAPE_MISMATCH"),
    ("matmul", [(2, 2, 3), (4, 3, 1)], {}, "batch dimensions", "SHAPE_MISMATCH"),
    ("cross_entropy", [(3, 4), (4,)], {}, "do not match logits", "SHAPE_MISMATCH"),
    ("cross_entropy", [(), ()], {}, "last axis of classes", "SHAPE_MISMATCH"),
])
def test_infer_rejects_bad_shapes_and_attributes(name, shapes, attrs, message, reason):
    op = OPS[name]
    dtypes = {"cross_entropy": ("float64", "int64"), "where": ("bool", "float64", "float64")}.get(name, ("float64",) * 3)
    specs = [TensorSpec(s, np.dtype(dtypes[i])) for i, s in enumerate(shapes)]
    with pytest.raises(OpError, match=message) as info:
        op.infer(*specs, **check_attrs(op, attrs))
    assert info.value.reason == reason


def test_every_refusal_of_a_builtin_rule_names_its_reason():
    """OpError without a reason reads OPERATOR_REFUSED: a built-in always says which kind of refusal it is."""
    for path in sorted(BUILTIN_DIR.glob("*.py")):
        for call in ast.walk(ast.parse(path.read_text())):
            if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "OpError":
                assert any(k.arg == "reason" for k in call.keywords), f"{path.name}:{call.lineno}: OpError without reason="


def test_families_share_helpers_through_common_only():
    """Each family imports chainrule.core, chainrule.plugins.authoring and .common, never another family."""
    families = {path.stem for path in BUILTIN_DIR.glob("*.py")} - {"__init__", "common"}
    assert families == {family.__name__.rsplit(".", 1)[1] for family in FAMILIES}
    for family in sorted(families):
        tree = ast.parse((BUILTIN_DIR / f"{family}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and node.module == "common", f"{family}.py imports .{node.module}"
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                for name in names:
                    assert not name.startswith("chainrule.plugins.builtin"), f"{family}.py imports {name}"
    assert not hasattr(common, "OPERATORS") and not hasattr(common, "register_operators")


def test_bool_arithmetic_is_refused():
    spec = TensorSpec((2,), np.dtype("bool"))
    for name in ("add", "sub", "neg", "pow", "maximum"):
        with pytest.raises(OpError, match="bool") as info:
            OPS[name].infer(*[spec] * OPS[name].arity)
        assert info.value.reason == "DTYPE_MISMATCH"


def test_integer_pow_with_a_negative_exponent_is_refused():
    with pytest.raises(OpError, match="exponent -2 is negative"):
        OPS["pow"].forward(np.array([2, 3]), np.array([1, -2]))


def test_const_value_cannot_be_changed_through_the_result():
    value = np.arange(3.0)
    out = OPS["const"].forward(value=value)
    with pytest.raises(ValueError):
        out[0] = 5.0
    assert value[0] == 0.0


# --- the tables as a whole ----------------------------------------------------------------------

def test_tables_fill_a_registry_and_follow_the_contract():
    ops = [op for family in FAMILIES for op in family.OPERATORS]
    registry = Registry(ops)  # validates every OpDef; a duplicate name would raise
    assert len(registry) == len(ops) == len(CASE_NAMES | {"stop_gradient"} | OWN_FILES)
    for op in ops:
        assert op.infer is not None, op.name
        assert op.doc and "\n" not in op.doc and op.doc.endswith("."), op.name
    for family in FAMILIES:
        assert callable(family.register_operators)


def test_sigmoid_neuron_through_the_engine():
    """Worked example 3 of the lecture notes, built from slice, matmul, add, sum and sigmoid."""
    graph = GraphIR.build(
        [("w", "float64", (3,)), ("x", "float64", (2,))],
        [
            ("w01", "slice", ("w",), {"starts": [0], "ends": [2]}),
            ("bias", "slice", ("w",), {"starts": [2], "ends": [3]}),
            ("dot", "matmul", ("w01", "x")),
            ("z", "add", ("dot", "bias")),
            ("zs", "sum", ("z",)),
            ("f", "sigmoid", ("zs",)),
        ],
        "f",
    )
    result = evaluate(compile_graph(graph, Registry(OPS.values())), {"w": np.array([2.0, -3.0, -3.0]), "x": np.array([-1.0, -2.0])})
    assert float(result.output_value) == pytest.approx(0.7310585786300049, abs=1e-15)
    np.testing.assert_allclose(result.grad("x"), [0.3932238664829637, -0.5898357997244456], rtol=1e-14)
    np.testing.assert_allclose(result.grad("w"), [-0.19661193324148185, -0.3932238664829637, 0.19661193324148185],
                               rtol=1e-14)


def test_mse_refuses_operands_that_broadcast_past_both():
    """[n,1] against [1,n] would build an n×n difference behind a scalar result, which no memory
    budget would see (inference says "a scalar"): refused at compile, naming both shapes."""
    from chainrule.client import GraphBuilder, InvalidArgument, ops
    from chainrule.server import LocalClient

    g = GraphBuilder()
    p, t = g.input("p", (8000, 1)), g.input("t", (1, 8000))
    with pytest.raises(InvalidArgument, match=r"prediction \[8000, 1\] and target \[1, 8000\] broadcast to "
                                              r"\[8000, 8000\], larger than either") as info:
        LocalClient().evaluate(ops.mse(p, t, name="loss"), p=np.zeros((8000, 1)), t=np.zeros((1, 8000)))
    assert info.value.node == "loss" and info.value.reason == "SHAPE_MISMATCH"


def test_axis_lists_longer_than_any_rank_are_refused_at_once():
    from chainrule.client import GraphBuilder, InvalidArgument
    from chainrule.server import LocalClient

    g = GraphBuilder()
    x = g.input("x", (2,))
    for build, message in ((lambda: x.expand_dims(list(range(1, 60_001))), "at most 32"),
                           (lambda: x.sum(axis=[0] * 60_000), "60000 axes given; a tensor has at most 32"),
                           (lambda: x.sum(axis=[0] * 100_000), "100000 values; a list attribute holds at most 65536")):
        g = GraphBuilder()
        x = g.input("x", (2,))
        with pytest.raises(InvalidArgument, match=message):
            LocalClient().evaluate(build().sum(name="f"), x=np.ones(2))
