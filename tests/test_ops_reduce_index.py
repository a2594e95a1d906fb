"""The reductions min, prod, var, std, argmax, argmin (builtin.reduce) and the indexing family
gather, one_hot (builtin.index): gradients against finite differences, infer against forward,
float32, the edge cases each operator defines (zeros in prod, std at zero variance, ties in
min, repeated and negative indices), every refusal, and the client's builder end to end.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from chainrule.client import GraphBuilder, InvalidArgument, ops
from chainrule.core import OpError, TensorSpec, check_attrs, unbroadcast
from chainrule.core.errors import BadAttributeError
from chainrule.plugins.builtin import index, reduce
from chainrule.plugins.testing import assert_vjp, check_operator, check_vjp
from chainrule.server import LocalClient

from rule_checks import assert_accepts_numpy_scalars, assert_layout_independent

OPS = {op.name: op for op in reduce.OPERATORS + index.OPERATORS}
NEW = ("min", "prod", "var", "std", "argmax", "argmin", "gather", "one_hot")
DTYPES = ("float64", "float32", "int64", "int32", "bool")


# --- inputs: a recipe per input, made with the case's own rng ------------------------------------

def normal(*shape):
    return lambda rng: np.asarray(rng.standard_normal(shape))


def distinct(*shape):
    """Values a whole unit apart: no ties for a minimum or a maximum."""
    size = math.prod(shape)
    return lambda rng: np.asarray((rng.permutation(size) - size // 2 + rng.uniform(-0.1, 0.1, size)).reshape(shape))


def ints(values, dtype=np.int64):
    return lambda rng: np.asarray(values, dtype=dtype)


def case(name, inputs, attrs):
    text = ",".join(f"{k}={v}" for k, v in attrs.items())
    shapes = ";".join(str(list(np.shape(recipe(np.random.default_rng(0))))) for recipe in inputs)
    return pytest.param(name, inputs, attrs, id=f"{name}({shapes}){'{' + text + '}' if text else ''}")


def _reduction_cases(name, maker, extra=None):
    extra = extra or {}
    return [
        (name, (maker(2, 3, 4),), {**extra}),
        (name, (maker(2, 3, 4),), {"axis": (-1,), **extra}),
        (name, (maker(2, 3, 4),), {"axis": (0, 2), "keepdims": True, **extra}),
        (name, (maker(2, 3, 4),), {"axis": (-3, 1), **extra}),
        (name, (maker(1, 3),), {"axis": (0,)}),              # a size-1 axis (ddof 0: one element)
        (name, (maker(3, 1),), {"keepdims": True, **extra}),
        (name, (maker(),), {}),                              # 0-d
        (name, (maker(4),), {"axis": ()}),                   # no axes: the identity's reduction
    ]


RAW = [
    *_reduction_cases("min", distinct),
    *_reduction_cases("prod", normal),
    *_reduction_cases("var", normal),
    *_reduction_cases("var", normal, {"ddof": 1})[:4],
    ("var", (normal(2, 5),), {"axis": (1,), "ddof": 3}),
    ("var", (normal(3, 4),), {"axis": (-2,), "ddof": -1}),   # numpy allows a negative ddof: divisor n + 1
    *_reduction_cases("std", normal),
    *_reduction_cases("std", normal, {"ddof": 1})[:4],
    ("std", (normal(2, 5),), {"axis": (1,), "keepdims": True, "ddof": 2}),
    ("argmax", (distinct(2, 3, 4),), {}),
    ("argmax", (distinct(2, 3, 4),), {"axis": -1}),
    ("argmax", (distinct(2, 3, 4),), {"axis": 1, "keepdims": True}),
    ("argmax", (distinct(1),), {}),
    ("argmin", (distinct(2, 3),), {"axis": -2}),
    ("argmin", (distinct(3, 1),), {"axis": 1, "keepdims": True}),
    ("argmin", (distinct(5),), {}),
    ("gather", (normal(5), ints([4, -1, 0, 4, -5, 2])), {}),
    ("gather", (normal(5, 3), ints([[0, 1], [1, -1]], np.int32)), {}),
    ("gather", (normal(4, 3), ints([2, 2, -3, 0])), {"axis": 1}),
    ("gather", (normal(2, 3, 4), ints([[3, -1, 3], [0, 0, 1]])), {"axis": -1}),
    ("gather", (normal(2, 3, 4), ints([1, -2, 1])), {"axis": -2}),
    ("gather", (normal(4, 3), ints(-2)), {}),                # 0-d indices drop the axis
    ("gather", (normal(1, 3), ints([0, 0, -1])), {}),        # a size-1 axis, repeated
    ("gather", (normal(4, 3), ints([], np.int64)), {}),      # no indices
    ("one_hot", (ints([0, 3, -1, 7, -9, 2]),), {"depth": 4}),
    ("one_hot", (ints([[1, 0], [2, -2]], np.int32),), {"depth": 3, "dtype": "float32"}),
    ("one_hot", (ints(2),), {"depth": 3, "dtype": "int32"}),
]
CASES = [case(*raw) for raw in RAW]
DIFFERENTIABLE = [c for c in CASES if c.values[0] not in ("argmax", "argmin", "one_hot")]


def make(inputs, seed=1234):
    rng = np.random.default_rng(seed)
    return [recipe(rng) for recipe in inputs]


def cast_floats(xs, dtype):
    return [x.astype(dtype) if x.dtype.kind == "f" else x for x in xs]


def test_every_new_operator_is_in_the_cases():
    assert {c.values[0] for c in CASES} == set(NEW)
    assert set(NEW) <= set(OPS)


# --- gradients -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, inputs, attrs", DIFFERENTIABLE)
def test_vjp_matches_finite_differences(name, inputs, attrs):
    assert_vjp(OPS[name], make(inputs), attrs)


@pytest.mark.parametrize("name", NEW)
def test_operator_samples_pass_the_gradient_check(name):
    reports = check_operator(OPS[name])
    assert len([r for r in reports if r.kind == "sample"]) == 3  # the sample's; then varied, symbolic, float32
    for report in reports:
        assert report.passed, str(report)


@pytest.mark.parametrize("name, inputs, attrs", [c for c in CASES if c not in DIFFERENTIABLE])
def test_argmax_argmin_and_one_hot_have_no_gradient(name, inputs, attrs):
    xs = make(inputs)
    attrs = check_attrs(OPS[name], attrs)
    out = OPS[name].forward(*xs, **attrs)
    assert OPS[name].vjp(np.ones(np.shape(out)), out, *xs, **attrs) == (None,)
    assert check_vjp(OPS[name], xs, attrs).passed


def test_gather_gives_its_indices_no_gradient():
    x, i = np.arange(5.0), np.array([1, 1, 3])
    dx, di = OPS["gather"].vjp(np.ones(3), x[i], x, i, axis=0)
    assert di is None
    np.testing.assert_array_equal(dx, [0, 2, 0, 1, 0])


# --- infer against forward, in every dtype, and numpy's values -----------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, inputs, attrs", CASES)
def test_infer_gives_exactly_what_forward_returns(name, inputs, attrs, dtype):
    op = OPS[name]
    xs = make(inputs)
    xs = [x.astype(dtype) if x.dtype.kind == "f" else x for x in xs]
    attrs = check_attrs(op, attrs)
    spec = op.infer(*[TensorSpec.of(x) for x in xs], **attrs)  # every dtype is accepted for the data
    out = np.asarray(op.forward(*xs, **attrs))
    assert TensorSpec.of(out) == TensorSpec(tuple(spec.shape), np.dtype(spec.dtype))


def _numpy_reference(name, xs, attrs):
    axis = attrs.get("axis")
    keepdims = attrs.get("keepdims", False)
    if name in ("argmax", "argmin"):
        return getattr(np, name)(xs[0], axis=attrs.get("axis", 0), keepdims=keepdims)
    if name == "gather":
        return np.take(xs[0], xs[1], axis=attrs.get("axis", 0))
    if name == "one_hot":
        depth = attrs["depth"]
        i = np.where(xs[0] < 0, xs[0] + depth, xs[0])
        return ((i[..., None] == np.arange(depth)) & (i[..., None] >= 0)).astype(attrs.get("dtype", "float64"))
    extra = {"ddof": attrs.get("ddof", 0)} if name in ("var", "std") else {}
    return getattr(np, name)(xs[0], axis=axis, keepdims=keepdims, **extra)


@pytest.mark.parametrize("name, inputs, attrs", CASES)
def test_forward_agrees_with_numpy(name, inputs, attrs):
    xs = make(inputs)
    op = OPS[name]
    got = op.forward(*xs, **check_attrs(op, attrs))
    expected = _numpy_reference(name, xs, attrs)
    assert np.shape(got) == np.shape(expected)
    np.testing.assert_allclose(got, expected, rtol=1e-13, atol=1e-15)


def test_int_and_bool_inputs_follow_numpy():
    x = np.array([[3, 1, 2], [0, 5, 5]], dtype=np.int32)
    assert OPS["prod"].forward(x, axis=None, keepdims=False).dtype == np.prod(x).dtype == np.int64
    assert OPS["min"].forward(x, axis=(1,), keepdims=False).dtype == np.int32
    assert OPS["var"].forward(x, axis=None, keepdims=False, ddof=0) == pytest.approx(np.var(x))
    assert OPS["std"].forward(x > 1, axis=None, keepdims=False, ddof=1) == pytest.approx(np.std(x > 1, ddof=1))
    np.testing.assert_array_equal(OPS["argmax"].forward(x, axis=1, keepdims=False), [0, 1])  # the first of tied 5s
    np.testing.assert_array_equal(OPS["argmin"].forward(x > 2, axis=0, keepdims=False), [1, 0, 0])


# --- float32 stays float32; numpy scalars; memory layout ----------------------------------------

@pytest.mark.parametrize("name, inputs, attrs", CASES)
def test_float32_inputs_give_float32_values_and_gradients(name, inputs, attrs):
    op = OPS[name]
    attrs = check_attrs(op, attrs)
    xs64 = make(inputs)
    xs32 = cast_floats(xs64, np.float32)
    out32 = np.asarray(op.forward(*xs32, **attrs))
    out64 = np.asarray(op.forward(*xs64, **attrs))
    if name in ("argmax", "argmin"):
        assert out32.dtype == np.int64
    elif name == "one_hot":
        assert out32.dtype == np.dtype(attrs["dtype"])
    else:
        assert out32.dtype == np.float32
        np.testing.assert_allclose(out32, out64, rtol=1e-5, atol=1e-6)
    g64 = np.random.default_rng(7).standard_normal(out32.shape)
    grads32 = op.vjp(g64.astype(np.float32), out32, *xs32, **attrs)
    grads64 = op.vjp(g64, out64, *xs64, **attrs)
    for x, g32, g_ref in zip(xs32, grads32, grads64):
        if x.dtype.kind != "f" or name in ("argmax", "argmin"):
            assert g32 is None and g_ref is None
            continue
        assert np.asarray(g32).dtype == np.float32
        np.testing.assert_allclose(unbroadcast(g32, x.shape), unbroadcast(g_ref, x.shape), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, inputs, attrs", [c for c in CASES if any(np.ndim(x) == 0 for x in make(c.values[1]))])
def test_rules_accept_numpy_scalars(name, inputs, attrs):
    """The engine keeps 0-d results as numpy scalars (np.float64), and may pass g as one."""
    op = OPS[name]
    assert_accepts_numpy_scalars(op, make(inputs), check_attrs(op, attrs))



@pytest.mark.parametrize("name, inputs, attrs", [c for c in CASES if any(np.ndim(x) > 1 for x in make(c.values[1]))])
def test_rules_do_not_depend_on_memory_layout(name, inputs, attrs):
    """Fortran-ordered and strided inputs (transposes, slices of other values) give the same results."""
    op = OPS[name]
    assert_layout_independent(op, make(inputs), check_attrs(op, attrs))



# --- min: ties ------------------------------------------------------------------------------------

def test_min_ties_split_the_gradient_evenly():
    op = OPS["min"]
    x = np.array([3.0, 1.0, 1.0])
    (dx,) = op.vjp(np.array(1.0), np.array(1.0), x, axis=None, keepdims=False)
    np.testing.assert_array_equal(dx, [0.0, 0.5, 0.5])
    rows = np.array([[2.0, 2.0, 2.0], [5.0, 4.0, 6.0]])
    (dx,) = op.vjp(np.array([3.0, 1.0]), rows.min(axis=1), rows, axis=(1,), keepdims=False)
    np.testing.assert_array_equal(dx, [[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])


# --- prod: zeros ----------------------------------------------------------------------------------

def test_prod_with_one_zero_gives_only_that_element_the_product_of_the_others():
    op = OPS["prod"]
    x = np.array([2.0, 0.0, 3.0, 4.0])
    (dx,) = op.vjp(np.array(1.0), np.array(0.0), x, axis=None, keepdims=False)
    np.testing.assert_array_equal(dx, [0.0, 24.0, 0.0, 0.0])
    assert_vjp(op, [x])                                         # and finite differences agree
    rows = np.array([[1.5, -2.0, 0.0], [0.5, 3.0, 2.0], [0.0, 4.0, -1.0]])
    assert_vjp(op, [rows], {"axis": (1,)})
    assert_vjp(op, [rows], {"axis": (0,), "keepdims": True})
    assert_vjp(op, [rows.reshape(3, 1, 3)], {"axis": (0, -1)})


def test_prod_with_two_zeros_has_a_zero_gradient():
    op = OPS["prod"]
    x = np.array([0.0, 2.0, 0.0, 3.0])
    (dx,) = op.vjp(np.array(1.0), np.array(0.0), x, axis=None, keepdims=False)
    np.testing.assert_array_equal(dx, np.zeros(4))
    assert_vjp(op, [x])
    rows = np.array([[0.0, 0.0, 5.0], [0.0, 2.0, 0.0], [1.0, 2.0, 3.0]])
    (dx,) = op.vjp(np.ones(3), rows.prod(axis=1), rows, axis=(1,), keepdims=False)
    np.testing.assert_array_equal(dx, [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [6.0, 3.0, 2.0]])
    assert_vjp(op, [rows], {"axis": (1,)})
    assert_vjp(op, [rows], {"axis": (-2,)})


def test_prod_gradient_does_not_divide():
    """Values whose product underflows: out / x would give 0 where the product of the others is 1."""
    x = np.array([1e-200, 1e-200, 1e200])
    (dx,) = OPS["prod"].vjp(np.array(1.0), np.array(0.0), x, axis=None, keepdims=False)
    np.testing.assert_allclose(dx, [1.0, 1.0, 0.0], rtol=1e-12)  # the last: 1e-400, underflowed


def test_prod_over_an_empty_axis_is_one_with_an_empty_gradient():
    op = OPS["prod"]
    x = np.zeros((2, 0))
    out = op.forward(x, axis=(1,), keepdims=False)
    np.testing.assert_array_equal(out, [1.0, 1.0])
    (dx,) = op.vjp(np.ones(2), out, x, axis=(1,), keepdims=False)
    assert dx.shape == (2, 0)


# --- var and std: zero variance, ddof -----------------------------------------------------------

def test_std_gradient_at_zero_variance_is_zero_and_finite():
    op = OPS["std"]
    x = np.array([[0.1, 0.1, 0.1], [1.0, 2.0, 4.0], [-7.3, -7.3, -7.3]])
    out = op.forward(x, axis=(1,), keepdims=False, ddof=0)
    assert out[0] == 0.0 and out[2] == 0.0                   # exactly, though mean([0.1] * 3) != 0.1
    (dx,) = op.vjp(np.ones(3), out, x, axis=(1,), keepdims=False, ddof=0)
    assert np.all(np.isfinite(dx))
    np.testing.assert_array_equal(dx[[0, 2]], 0.0)
    d = x[1] - x[1].mean()
    np.testing.assert_allclose(dx[1], d / (3 * x[1].std()), rtol=1e-14)
    (dx,) = op.vjp(np.array(2.0), np.array(0.0), np.full(4, 0.1, np.float32), axis=None, keepdims=False, ddof=1)
    assert dx.dtype == np.float32 and not np.any(dx)
    (dx,) = op.vjp(np.array(1.0), np.array(0.0), np.array(5.0), axis=None, keepdims=False, ddof=0)  # 0-d
    assert dx == 0.0
    (dx,) = OPS["var"].vjp(np.ones(3), out ** 2, x, axis=(1,), keepdims=False, ddof=0)
    np.testing.assert_array_equal(dx[[0, 2]], 0.0)            # var is differentiable there: 2 (x - mean) / n = 0


def test_var_is_accurate_far_from_zero():
    """Centring on the first element first: no digits lost to a large common offset."""
    x = 1e9 + np.array([1.0, 2.0, 3.0, 4.0])
    assert OPS["var"].forward(x, axis=None, keepdims=False, ddof=0) == 1.25
    assert OPS["std"].forward(x, axis=None, keepdims=False, ddof=1) == pytest.approx(np.sqrt(5 / 3), rel=1e-15)


def test_std_with_a_constant_row_through_the_engine_gives_finite_gradients():
    g = GraphBuilder()
    x = g.input("x", (2, 3))
    f = x.std(axis=1).sum(name="f")
    with LocalClient() as client:
        r = client.evaluate(f, x=np.array([[0.1, 0.1, 0.1], [1.0, 2.0, 4.0]]))
    assert np.all(np.isfinite(r.grad[x])) and not np.any(r.grad[x][0])
    assert r.value == pytest.approx(np.std([1.0, 2.0, 4.0]))


# --- argmax, argmin -------------------------------------------------------------------------------

def test_argmax_and_argmin_pick_the_first_extremum_as_int64():
    x = np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 0.0]])
    am = OPS["argmax"].forward(x, axis=1, keepdims=False)
    assert am.dtype == np.int64
    np.testing.assert_array_equal(am, [1, 0])
    np.testing.assert_array_equal(OPS["argmin"].forward(x, axis=-1, keepdims=True), [[0], [2]])
    np.testing.assert_array_equal(OPS["argmax"].forward(x, **check_attrs(OPS["argmax"], {})), [1, 0, 0])  # axis 0


# --- gather ---------------------------------------------------------------------------------------

def _scatter_reference(x_shape, indices, g, axis):
    """np.add.at, one index at a time: the plain meaning of gather's gradient."""
    dx = np.zeros(x_shape)
    moved = np.moveaxis(dx, axis, 0)
    gm = np.moveaxis(g.reshape(x_shape[:axis] + (indices.size,) + x_shape[axis + 1:]), axis, 0)
    np.add.at(moved, indices.reshape(-1) % x_shape[axis], gm)
    return dx


@pytest.mark.parametrize("shape, indices, axis", [
    ((6,), [5, -1, 0, 5, 5, -6, 2], 0),
    ((5, 3), [[0, -1], [4, 4], [-5, 0]], 0),
    ((4, 5), [4, -1, 4, 0, 1, 1], 1),
    ((2, 3, 4), [[-1, 3], [3, 0]], -1),
    ((3, 4, 2), [1, 1, -4, 3], 1),
    ((3, 2), 1, 0),
])
def test_gather_matches_np_take_and_its_gradient_np_add_at(shape, indices, axis):
    rng = np.random.default_rng(0)
    op = OPS["gather"]
    x = rng.standard_normal(shape)
    for dtype in (np.int64, np.int32):
        i = np.asarray(indices, dtype=dtype)
        out = op.forward(x, i, axis=axis)
        np.testing.assert_array_equal(out, np.take(x, i, axis=axis))
        g = rng.standard_normal(out.shape)
        dx, di = op.vjp(g, out, x, i, axis=axis)
        assert di is None
        np.testing.assert_allclose(dx, _scatter_reference(shape, i, g, axis % len(shape)), rtol=1e-14, atol=1e-15)
        assert_vjp(op, [x, i], {"axis": axis})


def test_gather_gradient_in_many_chunks(monkeypatch):
    """The vjp builds flat indices a chunk at a time: small chunks give the same sums."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 7, 4))
    i = rng.integers(-7, 7, 50)
    out = OPS["gather"].forward(x, i, axis=1)
    g = rng.standard_normal(out.shape)
    expected = _scatter_reference(x.shape, i, g, 1)
    for chunk in (1, 5, 12, 1 << 16):
        monkeypatch.setattr(index, "SCATTER_CHUNK", chunk)
        (dx, _) = OPS["gather"].vjp(g, out, x, i, axis=1)
        np.testing.assert_allclose(dx, expected, rtol=1e-14, atol=1e-15)
    (dx32, _) = OPS["gather"].vjp(g.astype(np.float32), out.astype(np.float32), x.astype(np.float32), i, axis=1)
    assert dx32.dtype == np.float32
    np.testing.assert_allclose(dx32, expected, rtol=1e-5, atol=1e-5)


def test_gather_refuses_an_out_of_range_index_naming_it():
    op = OPS["gather"]
    x = np.zeros((4, 3))
    with pytest.raises(OpError, match=r"index 4 at position \(1,\) is out of range for an axis of size 4 "
                                      r"\(valid: -4..3\)") as info:
        op.forward(x, np.array([0, 4, 9]), axis=0)
    assert info.value.reason == "OUT_OF_RANGE"
    with pytest.raises(OpError, match=r"index -4 at position \(0, 1\) is out of range for an axis of size 3"):
        op.forward(x, np.array([[2, -4]], dtype=np.int32), axis=1)
    with pytest.raises(OpError, match=r"index 0 is out of range for an axis of size 0 \(valid: none"):
        op.forward(np.zeros((0, 2)), np.array(0), axis=0)
    assert op.forward(np.zeros((0, 2)), np.zeros(0, np.int64), axis=0).shape == (0, 2)


# --- one_hot --------------------------------------------------------------------------------------

def test_one_hot_follows_onnx():
    op = OPS["one_hot"]
    out = op.forward(np.array([0, 2, -1, 3, -4, 7]), depth=3, dtype="float64")
    np.testing.assert_array_equal(out, [[1, 0, 0], [0, 0, 1], [0, 0, 1], [0, 0, 0], [0, 0, 0], [0, 0, 0]])
    for dtype in DTYPES:
        out = op.forward(np.array([[1], [0]], np.int32), depth=2, dtype=dtype)
        assert out.dtype == np.dtype(dtype) and out.shape == (2, 1, 2)
        np.testing.assert_array_equal(out, [[[0, 1]], [[1, 0]]])
    assert op.forward(np.array([1, 2]), depth=0, dtype="float64").shape == (2, 0)


# --- refusals -------------------------------------------------------------------------------------

F64 = "float64"


@pytest.mark.parametrize("name, specs, attrs, message, reason, field", [
    ("min", [((2, 0), F64)], {"axis": (1,)}, "min over axis 1 of size 0", "SHAPE_MISMATCH", None),
    ("min", [((0,), F64)], {}, "size 0", "SHAPE_MISMATCH", None),
    ("min", [((2, 3), F64)], {"axis": (2,)}, "axis 2 is out of range for a tensor of rank 2", "BAD_ATTRIBUTE",
     "attrs.axis"),
    ("prod", [((2, 3), F64)], {"axis": (0, -2)}, "given twice", "BAD_ATTRIBUTE", "attrs.axis"),
    ("argmax", [((3, 0), F64)], {"axis": 1}, "argmax over axis 1 of size 0", "SHAPE_MISMATCH", None),
    ("argmin", [((0, 3), "int32")], {}, "argmin over axis 0 of size 0", "SHAPE_MISMATCH", None),
    ("argmax", [((), F64)], {}, "a 0-d tensor has none", "SHAPE_MISMATCH", None),
    ("argmin", [((2, 3), F64)], {"axis": -3}, "axis -3 is out of range for a tensor of rank 2", "BAD_ATTRIBUTE",
     "attrs.axis"),
    ("var", [((2, 3), F64)], {"axis": (1,), "ddof": 3}, "ddof 3 leaves no degrees of freedom: var reduces 3",
     "BAD_ATTRIBUTE", "attrs.ddof"),
    ("std", [((), F64)], {"ddof": 1}, "std reduces 1 element", "BAD_ATTRIBUTE", "attrs.ddof"),
    ("var", [((2, 0), F64)], {"axis": (1,)}, r"var over no elements \(axis 1 has size 0\)", "SHAPE_MISMATCH", None),
    ("std", [((0, 3), F64)], {}, "std over no elements", "SHAPE_MISMATCH", None),
    ("gather", [((4,), F64), ((2,), F64)], {}, "gather indices must be int32 or int64, got float64",
     "DTYPE_MISMATCH", None),
    ("gather", [((4,), F64), ((2,), "bool")], {}, "got bool", "DTYPE_MISMATCH", None),
    ("gather", [((4, 2), F64), ((2,), "int64")], {"axis": 2}, "axis 2 is out of range for a tensor of rank 2",
     "BAD_ATTRIBUTE", "attrs.axis"),
    ("gather", [((), F64), ((2,), "int64")], {}, "a 0-d tensor has none", "SHAPE_MISMATCH", None),
    ("one_hot", [((3,), F64)], {"depth": 2}, "one_hot indices must be int32 or int64", "DTYPE_MISMATCH", None),
    ("one_hot", [((3,), "int64")], {"depth": 2, "dtype": "float16"}, "dtype 'float16' is not one of",
     "BAD_ATTRIBUTE", "attrs.dtype"),
    ("one_hot", [((3,), "int32")], {"depth": -1}, "depth must be >= 0", "BAD_ATTRIBUTE", "attrs.depth"),
])
def test_infer_refuses(name, specs, attrs, message, reason, field):
    op = OPS[name]
    with pytest.raises(OpError, match=message) as info:
        op.infer(*[TensorSpec(s, np.dtype(d)) for s, d in specs], **check_attrs(op, attrs))
    assert (info.value.reason, info.value.field) == (reason, field)


def test_forward_refuses_what_infer_refuses_for_var_and_std():
    """Called directly (without infer first), var and std still refuse rather than give inf or nan."""
    for name in ("var", "std"):
        with pytest.raises(OpError, match="no degrees of freedom"):
            OPS[name].forward(np.ones((2, 3)), axis=(1,), keepdims=False, ddof=3)


def test_one_hot_needs_a_depth():
    with pytest.raises(BadAttributeError, match="missing required attribute 'depth'"):
        check_attrs(OPS["one_hot"], {})


# --- the client: builder, ops, end to end ----------------------------------------------------------

def test_builder_methods_and_functions_make_the_operators():
    g = GraphBuilder()
    x = g.input("x", (2, 3), "float32")
    ids = g.input("ids", (4,), "int32")
    for name in ("min", "prod", "var", "std", "argmax", "argmin"):
        for var in (getattr(x, name)(), getattr(ops, name)(x)):
            assert var.op == name
    assert (x.min().dtype, x.prod().dtype, x.var().dtype, x.argmax().dtype) == ("float32", "float32", "float32", "int64")
    v = x.var(axis=-1, keepdims=True, ddof=1)
    assert set(v.attrs) == {"axis", "keepdims", "ddof"}
    assert set(x.argmin(1).attrs) == {"axis"}
    gathered = ops.gather(x, ids, axis=1)
    assert gathered.op == "gather" and gathered.inputs == (x, ids) and gathered.dtype == "float32"
    emb = ops.embedding(x, [1, 0, 1])
    assert emb.op == "gather" and emb.inputs[1].op == "const" and emb.inputs[1].dtype == "int64"
    assert "axis" not in emb.attrs
    hot = ops.one_hot(ids, 5, dtype=np.float32)
    assert hot.op == "one_hot" and hot.dtype == "float32" and ops.one_hot(ids, 5).dtype == "float64"


def test_indexing_with_int_vars_lists_and_arrays_builds_a_gather():
    g = GraphBuilder()
    x = g.input("x", (5, 2))
    ids = g.input("ids", (3,), "int64")
    for key in (ids, [4, 0, -1], np.array([1, 1], np.int32), np.array([2], np.uint8), []):
        picked = x[key]
        assert picked.op == "gather" and picked.inputs[0] is x and picked.inputs[1].dtype in ("int64", "int32")
    assert x[np.array([1], np.int32)].inputs[1].dtype == "int32"
    assert x[1].op == "squeeze" and x[1:3].op == "slice"                 # unchanged
    with pytest.raises(TypeError, match="must be int32 or int64"):
        x[x]
    with pytest.raises(TypeError, match="indices must be integers"):
        x[[0.5, 1.0]]
    with pytest.raises(TypeError, match="indices must be integers"):
        x[np.array([True, False])]
    with pytest.raises(TypeError, match="ops.gather"):
        x[ids, 0]


def test_embedding_end_to_end_through_a_local_client():
    table = np.arange(15.0).reshape(5, 3) / 10
    ids = np.array([[4, 0, -1], [1, 4, 4]])              # repeated and negative
    weights = np.random.default_rng(0).standard_normal((2, 3, 3))
    g = GraphBuilder()
    t = g.input("table", (5, 3))
    i = g.input("ids", (2, 3), "int64")
    rows = ops.embedding(t, i, name="rows")
    loss = (rows * weights).sum(name="loss")
    with LocalClient() as client:
        r = client.evaluate(loss, table=table, ids=ids, values=[rows])
    np.testing.assert_array_equal(r.values[rows], table[ids])
    assert r.value == pytest.approx(float(np.sum(table[ids] * weights)), rel=1e-14)
    expected = np.zeros_like(table)
    np.add.at(expected, ids % 5, weights)
    np.testing.assert_allclose(r.grad[t], expected, rtol=1e-14)
    assert "ids" in r.no_gradient and "table" not in r.no_gradient


def test_indexing_a_var_end_to_end():
    data = np.arange(8.0).reshape(4, 2)
    g = GraphBuilder()
    x = g.input("x", (4, 2))
    picked = x[[3, 3, -4]]
    with LocalClient() as client:
        r = client.evaluate(picked.sum(), x=data, values=[picked])
    np.testing.assert_array_equal(r.values[picked], data[[3, 3, 0]])
    np.testing.assert_array_equal(r.grad[x], [[1, 1], [0, 0], [0, 0], [2, 2]])


def test_reductions_end_to_end():
    data = np.array([[1.0, 5.0, 2.0], [0.0, 3.0, 3.0]])
    g = GraphBuilder()
    x = g.input("x", (2, 3))
    f = (x.min(axis=1).sum() + x.prod(axis=0).sum() + x.var(ddof=1) + x.std(axis=-1).sum()).named("f")
    am = x.argmax(axis=1)
    with LocalClient() as client:
        r = client.evaluate(f, x=data, values=[am])
    expected = data.min(axis=1).sum() + data.prod(axis=0).sum() + data.var(ddof=1) + data.std(axis=-1).sum()
    assert r.value == pytest.approx(expected, rel=1e-14)
    assert r.values[am].dtype == np.int64
    np.testing.assert_array_equal(r.values[am], [1, 1])
    assert np.all(np.isfinite(r.grad[x]))


def test_an_out_of_range_index_is_invalid_argument_naming_the_node():
    g = GraphBuilder()
    t = g.input("table", (5, 3))
    i = g.input("ids", (3,), "int64")
    loss = ops.embedding(t, i, name="emb").sum(name="loss")
    const_loss = ops.gather(t, [0, 9], name="picked").sum()           # indices from a const node
    with LocalClient() as client:
        with pytest.raises(InvalidArgument, match=r"node 'emb' \(gather\): index 5 at position \(2,\) is out of "
                                                  r"range for an axis of size 5") as info:
            client.evaluate(loss, table=np.zeros((5, 3)), ids=np.array([0, -5, 5]))
        assert (info.value.node, info.value.reason) == ("emb", "OUT_OF_RANGE")
        with pytest.raises(InvalidArgument, match="node 'picked'") as info:
            client.evaluate(const_loss, table=np.zeros((5, 3)))
        assert info.value.reason == "OUT_OF_RANGE"


def test_refusals_reach_the_client_before_anything_runs():
    g = GraphBuilder()
    x = g.input("x", (2, 3))
    labels = g.input("labels", (2,), "float64")
    with LocalClient() as client:
        with pytest.raises(InvalidArgument, match="ddof 3 leaves no degrees of freedom") as info:
            client.evaluate(x.var(axis=1, ddof=3, name="v").sum(), x=np.ones((2, 3)))
        assert (info.value.node, info.value.reason, info.value.field) == ("v", "BAD_ATTRIBUTE",
                                                                          "graph.nodes[0].attrs.ddof")
        with pytest.raises(InvalidArgument, match="gather indices must be int32 or int64") as info:
            client.evaluate(ops.gather(x, labels, name="gx").sum(), x=np.ones((2, 3)), labels=np.zeros(2))
        assert (info.value.node, info.value.reason) == ("gx", "DTYPE_MISMATCH")
        with pytest.raises(InvalidArgument, match="missing required attribute 'depth'"):
            client.evaluate(g.op("one_hot", g.input("k", (2,), "int64")).sum(), k=np.zeros(2, np.int64))
