"""Helpers for derivatives built as graphs (docs/derivatives.md): sum_to, broadcast_like, zeros_like,
ones_like, scalar_like, unreduce, group_size, step, extremum_weights, prod_except, xmul.

The symbolic rules of the other families (``vjp_graph``, ``jvp_graph``) write derivatives with
these, so that a rule needs no static shape: ``sum_to(g, like)`` undoes broadcasting by reading
like's shape when the graph runs. Each helper is an ordinary operator (numpy forward, vjp and infer
rules, usable in any graph) and has symbolic rules of its own, so derivatives built from them can
be differentiated again. Those whose value does not vary with a float input's values (zeros_like,
ones_like, scalar_like, group_size) or varies in steps (step, extremum_weights) have no gradient.

``sum_to`` and ``broadcast_like`` also cast to like's dtype when like is a float (a float32
input's gradient stays float32 when the output is float64); ``like``'s values are never read.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from chainrule.core import Attr, OpDef, OpError, TensorSpec, broadcast_shapes, unbroadcast
from chainrule.core.dtypes import FLOAT_DTYPES, NUMBER_DTYPES, float_result, is_differentiable
from chainrule.core.symbolic import no_jvp_graph, no_vjp_graph, with_symbolic
from chainrule.plugins.authoring import table_hookimpl

from .common import normalize_axes


# --- sum_to, broadcast_like: unbroadcasting and broadcasting to another value's shape ---------------

def _to_dtype(x: TensorSpec, like: TensorSpec) -> np.dtype:
    return like.dtype if is_differentiable(like.dtype) else x.dtype


def _float_only(spec: TensorSpec, what: str) -> None:
    if not is_differentiable(spec.dtype):
        raise OpError(f"{what} must be float32 or float64, got {spec.dtype.name}", reason="DTYPE_MISMATCH")


def _sum_to_infer(g: TensorSpec, like: TensorSpec) -> TensorSpec:
    _float_only(g, "g")
    if len(like.shape) > len(g.shape) or broadcast_shapes(like.shape, g.shape) != g.shape:
        raise OpError(f"g of shape {list(g.shape)} cannot be summed to shape {list(like.shape)}: that shape does not "
                      f"broadcast to g's", reason="SHAPE_MISMATCH")
    return TensorSpec(like.shape, _to_dtype(g, like))


def _sum_to(g, like):
    dtype = like.dtype if like.dtype.kind == "f" else g.dtype
    if np.shape(g) == np.shape(like):
        return g if g.dtype == dtype else g.astype(dtype)
    return np.asarray(unbroadcast(g, np.shape(like)), dtype=dtype)


def _sum_to_vjp(gg, out, g, like):
    return np.broadcast_to(gg, np.shape(g)).astype(g.dtype, copy=False), None


def _broadcast_like_infer(x: TensorSpec, like: TensorSpec) -> TensorSpec:
    _float_only(x, "x")
    if broadcast_shapes(x.shape, like.shape) != like.shape:
        raise OpError(f"x of shape {list(x.shape)} does not broadcast to shape {list(like.shape)}",
                      reason="SHAPE_MISMATCH")
    return TensorSpec(like.shape, _to_dtype(x, like))


def _broadcast_like(x, like):
    dtype = like.dtype if like.dtype.kind == "f" else x.dtype
    if np.shape(x) == np.shape(like):
        return x if x.dtype == dtype else x.astype(dtype)
    return np.broadcast_to(x, np.shape(like)).astype(dtype, copy=False)


def _broadcast_like_vjp(g, out, x, like):
    return np.asarray(unbroadcast(g, np.shape(x)), dtype=x.dtype), None


def _sum_to_vjp_graph(b, gg, out, g, like):
    return b.op("broadcast_like", gg, g), None


def _sum_to_jvp_graph(b, tangents, out, g, like):
    return None if tangents[0] is None else b.op("sum_to", tangents[0], like)


def _broadcast_like_vjp_graph(b, g, out, x, like):
    return b.op("sum_to", g, x), None


def _broadcast_like_jvp_graph(b, tangents, out, x, like):
    return None if tangents[0] is None else b.op("broadcast_like", tangents[0], like)


# --- literals shaped like a value ------------------------------------------------------------------

def _zeros_like(x):
    return np.zeros(np.shape(x), x.dtype)


def _ones_like(x):
    return np.ones(np.shape(x), x.dtype)


def _scalar_like(x, *, value):
    return np.asarray(value, dtype=float_result(x.dtype))


def _none(g, out, *inputs, **attrs):
    return (None,) * len(inputs)


# --- unreduce, group_size: undoing a reduction over some axes ---------------------------------------

def _reduced_shape(shape: tuple[int, ...], axis: Any, keepdims: bool) -> tuple[int, ...]:
    axes = normalize_axes(axis, len(shape))
    if keepdims:
        return tuple(1 if i in axes else n for i, n in enumerate(shape))
    return tuple(n for i, n in enumerate(shape) if i not in axes)


def _unreduce_infer(g: TensorSpec, like: TensorSpec, *, axis=None, keepdims=False) -> TensorSpec:
    _float_only(g, "g")
    expected = _reduced_shape(like.shape, axis, keepdims)
    if g.shape != expected:
        raise OpError(f"g has shape {list(g.shape)}; a reduction of shape {list(like.shape)} over axis "
                      f"{None if axis is None else list(axis)} (keepdims {keepdims}) has shape {list(expected)}",
                      reason="SHAPE_MISMATCH")
    return TensorSpec(like.shape, g.dtype)


def _unreduce(g, like, *, axis=None, keepdims=False):
    shape = np.shape(like)
    axes = normalize_axes(axis, len(shape))
    kept = g if keepdims else np.expand_dims(g, axes)
    return np.broadcast_to(kept, shape)


def _unreduce_vjp(gg, out, g, like, *, axis=None, keepdims=False):
    axes = normalize_axes(axis, np.ndim(like))
    return np.sum(gg, axis=axes, keepdims=keepdims, dtype=g.dtype), None


def _unreduce_vjp_graph(b, gg, out, g, like, *, axis=None, keepdims=False):
    return b.op("sum", gg, axis=axis, keepdims=keepdims), None


def _unreduce_jvp_graph(b, tangents, out, g, like, *, axis=None, keepdims=False):
    t = tangents[0]
    return None if t is None else b.op("unreduce", t, like, axis=axis, keepdims=keepdims)


def _group_size_infer(x: TensorSpec, *, axis=None, ddof=0) -> TensorSpec:
    normalize_axes(axis, len(x.shape))
    return TensorSpec((), float_result(x.dtype))


def _group_size(x, *, axis=None, ddof=0):
    shape = np.shape(x)
    count = math.prod(shape[a] for a in normalize_axes(axis, len(shape)))
    return np.asarray(count - ddof, dtype=float_result(x.dtype))


# --- step, extremum_weights: piecewise-constant weights (masks) -------------------------------------

def _float_of(*dtypes: np.dtype) -> np.dtype:
    dtype = np.result_type(*dtypes)
    return dtype if is_differentiable(dtype) else np.dtype(np.float64)


def _step_infer(x: TensorSpec, y: TensorSpec, *, tie=0.0) -> TensorSpec:
    return TensorSpec(broadcast_shapes(x.shape, y.shape), _float_of(x.dtype, y.dtype))


def _step(x, y, *, tie=0.0):
    dtype = _float_of(np.asarray(x).dtype, np.asarray(y).dtype)
    out = np.asarray(np.greater(x, y), dtype=dtype)
    if tie:
        out = out + np.equal(x, y) * dtype.type(tie)
    return out


def _step_float(x, y, *, tie=0.0):
    return 1.0 if x > y else tie if x == y else 0.0


def _extremum_infer(x: TensorSpec, out: TensorSpec, *, axis=None, keepdims=False) -> TensorSpec:
    expected = _reduced_shape(x.shape, axis, keepdims)
    if out.shape != expected:
        raise OpError(f"out has shape {list(out.shape)}; a reduction of shape {list(x.shape)} over axis "
                      f"{None if axis is None else list(axis)} (keepdims {keepdims}) has shape {list(expected)}",
                      reason="SHAPE_MISMATCH")
    return TensorSpec(x.shape, _float_of(x.dtype, out.dtype))


def _extremum_weights(x, out, *, axis=None, keepdims=False):
    axes = normalize_axes(axis, np.ndim(x))
    kept = out if keepdims else np.expand_dims(out, axes)
    hit = np.equal(x, kept)
    dtype = _float_of(np.asarray(x).dtype, np.asarray(out).dtype)
    ties = hit.sum(axis=axes, keepdims=True, dtype=dtype)
    weights = np.zeros(np.shape(hit), dtype=dtype)
    np.divide(hit, ties, out=weights, where=np.broadcast_to(ties > 0, weights.shape))  # 0 in a group out misses
    return weights


# --- prod_except: the product of the other elements of each group -----------------------------------

def _prod_except_infer(x: TensorSpec, *, axis=None) -> TensorSpec:
    _float_only(x, "x")
    normalize_axes(axis, len(x.shape))
    return x


def _rows(x: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, list[int]]:
    """x with the reduced axes last, as rows (lead..., n); and the permutation used."""
    rest = [i for i in range(x.ndim) if i not in axes]
    order = rest + list(axes)
    moved = np.transpose(x, order)
    return moved.reshape(moved.shape[:len(rest)] + (-1,)), order


def _back(rows: np.ndarray, x: np.ndarray, order: list[int]) -> np.ndarray:
    moved = rows.reshape(tuple(x.shape[i] for i in order))
    return np.transpose(moved, np.argsort(order))


def _others(rows: np.ndarray) -> np.ndarray:
    """Per element of each row, the product of the row's other elements (prefix times suffix products)."""
    before = np.ones_like(rows)
    if rows.shape[-1] > 1:
        np.cumprod(rows[..., :-1], axis=-1, out=before[..., 1:])
        after = np.ones_like(rows)
        np.cumprod(rows[..., :0:-1], axis=-1, out=after[..., -2::-1])
        before *= after
    return before


def _prod_except(x, *, axis=None):
    x = np.asarray(x)
    if not x.size:
        return np.ones_like(x)
    rows, order = _rows(x, normalize_axes(axis, x.ndim))
    return _back(_others(rows), x, order)


def _prod_except_vjp(g, out, x, *, axis=None):
    """d/dx_j of sum_i g_i prod_{k != i} x_k = sum_{i != j} g_i prod_{k != i, j} x_k: (S - g_j P_j) / x_j with
    S = sum_i g_i P_i, and, in the rare rows holding a zero, each element computed exactly."""
    x = np.asarray(x)
    if not x.size:
        return (np.zeros_like(x),)
    axes = normalize_axes(axis, x.ndim)
    rows, order = _rows(x, axes)
    grows = _rows(np.broadcast_to(np.asarray(g, dtype=x.dtype), x.shape), axes)[0]
    prows = _others(rows)
    t = grows * prows
    with np.errstate(all="ignore"):
        d = (t.sum(axis=-1, keepdims=True) - t) / rows
    flat_rows, flat_g, flat_d = rows.reshape(-1, rows.shape[-1]), grows.reshape(-1, rows.shape[-1]), \
        d.reshape(-1, rows.shape[-1])
    for r in np.flatnonzero((flat_rows == 0).any(axis=-1)):
        row, gr = flat_rows[r], flat_g[r]
        for j in range(row.size):
            other = row.copy()
            other[j] = 1
            p = _others(other)
            p[j] = 0
            flat_d[r, j] = np.dot(gr, p)
    return (_back(flat_d.reshape(rows.shape), x, order),)


def _prod_except_rule(b, s, out, x, axis):
    """sum_{i != j} s_i P_{-i-j} as (sum_i s_i P_i - s_j P_j) / x_j (exact where x_j != 0)."""
    t = s * out
    total = b.op("unreduce", b.op("sum", t, axis=axis, keepdims=True), x, axis=axis, keepdims=True)
    return (total - t) / x


def _prod_except_vjp_graph(b, g, out, x, *, axis=None):
    return (_prod_except_rule(b, g, out, x, axis),)


def _prod_except_jvp_graph(b, tangents, out, x, *, axis=None):
    return None if tangents[0] is None else _prod_except_rule(b, tangents[0], out, x, axis)


# --- xmul: a product that is 0 where its first factor is, whatever the second ------------------------

def _xmul_infer(a: TensorSpec, b: TensorSpec) -> TensorSpec:
    for spec, what in ((a, "a"), (b, "b")):
        if spec.dtype == np.bool_:
            raise OpError(f"{what} is bool; xmul needs numbers", reason="DTYPE_MISMATCH")
    return TensorSpec(broadcast_shapes(a.shape, b.shape), _float_of(a.dtype, b.dtype))


def _xmul(a, b):
    dtype = _float_of(np.asarray(a).dtype, np.asarray(b).dtype)
    with np.errstate(all="ignore"):
        out = np.multiply(a, b, dtype=dtype)
    zero = np.equal(a, 0)
    if np.any(zero):
        out = np.where(zero, dtype.type(0), out)
    return out


def _xmul_float(a, b):
    return 0.0 if a == 0 else a * b


def _xmul_vjp(g, out, a, b):
    return g * b, _xmul(a, g)


def _xmul_vjp_graph(bb, g, out, a, b):
    return g * b, bb.op("xmul", a, g)


def _xmul_jvp_graph(bb, tangents, out, a, b):
    ta, tb = tangents
    return bb.add_tangents(None if ta is None else ta * b, None if tb is None else bb.op("xmul", a, tb))


# --- gradient-check samples ----------------------------------------------------------------------

_BROADCAST = [((2, 3), (2, 3)), ((2, 3), (3,)), ((4, 1, 3), (1, 3)), ((2, 2), ()), ((3, 2), (3, 1))]


def _pick(rng: np.random.Generator, items: list) -> Any:
    return items[int(rng.integers(len(items)))]


def _sum_to_sample(rng):
    big, small = _pick(rng, _BROADCAST)
    return [rng.standard_normal(big), rng.standard_normal(small)], {}


def _broadcast_like_sample(rng):
    big, small = _pick(rng, _BROADCAST)
    return [rng.standard_normal(small), rng.standard_normal(big)], {}


_REDUCTIONS = [((2, 3, 4), {}), ((2, 3, 4), {"axis": (1,)}), ((2, 3, 4), {"axis": (0, -1), "keepdims": True}),
               ((3, 4), {"axis": (-1,)}), ((5,), {"keepdims": True})]


def _unreduce_sample(rng):
    shape, attrs = _pick(rng, _REDUCTIONS)
    g = rng.standard_normal(_reduced_shape(shape, attrs.get("axis"), attrs.get("keepdims", False)))
    return [np.asarray(g), rng.standard_normal(shape)], attrs


def _extremum_sample(rng):
    """out a quarter above each group's maximum: the weights (all 0) stay put under the checker's small steps
    (at out == max(x) they jump, which is what "no gradient" means for a step function)."""
    shape, attrs = _pick(rng, _REDUCTIONS)
    x = rng.permutation(math.prod(shape)).reshape(shape) * 0.5 + rng.uniform(-0.1, 0.1, shape)
    out = np.max(x, axis=normalize_axes(attrs.get("axis"), len(shape)), keepdims=attrs.get("keepdims", False))
    return [x, np.asarray(out + 0.25)], attrs


def _group_size_sample(rng):
    shape, attrs = _pick(rng, _REDUCTIONS)
    attrs = {k: v for k, v in attrs.items() if k != "keepdims"}
    return [rng.standard_normal(shape)], {**attrs, "ddof": int(rng.integers(2))}


def _step_sample(rng):
    a, c = _pick(rng, _BROADCAST)
    x = rng.integers(-3, 3, a) + rng.uniform(-0.1, 0.1, a)          # never within 0.3 of y
    y = rng.integers(-3, 3, c) + 0.5 + rng.uniform(-0.1, 0.1, c)
    return [np.asarray(x), np.asarray(y)], {"tie": 0.5}


def _prod_except_sample(rng):
    shape, attrs = _pick(rng, _REDUCTIONS)
    attrs = {k: v for k, v in attrs.items() if k != "keepdims"}
    # No zeros: the symbolic rules divide by x (exact only away from zeros, docs/derivatives.md), and the
    # checker runs them on these cases too. The numpy vjp's exact path at zeros has its own test
    # (tests/test_symbolic.py::test_prod_except_numpy_gradient_is_exact_at_zeros).
    return [rng.uniform(0.5, 1.5, shape) * rng.choice([-1.0, 1.0], shape)], attrs


def _xmul_sample(rng):
    a, c = _pick(rng, _BROADCAST)
    return [rng.standard_normal(a), rng.standard_normal(c)], {}


def _scalar_like_sample(rng):
    return [rng.standard_normal(_pick(rng, [(), (3,), (2, 3)]))], {"value": float(rng.uniform(-2, 2))}


# --- the table -------------------------------------------------------------------------------

_AXIS = Attr("ints", None, "the reduced axes (negative counts from the end); none: all axes")
_KEEPDIMS = Attr("bool", False, "the reduction kept its axes with size 1")


def _identity2(a, b, **_):
    return a


def _pass_first(g, out, a, b, **_):
    return g, None


OPERATORS: list[OpDef] = [
    # broadcasting and its undoing, by another value's shape read at run time
    OpDef("sum_to", 2, _sum_to, _sum_to_vjp, _sum_to_infer, input_names=("g", "like"),
          input_dtypes={"g": FLOAT_DTYPES},
          doc="g summed over its broadcast axes down to like's shape, in like's dtype when it is a float "
              "(like's values are not read): the unbroadcast of a gradient.",
          sample=_sum_to_sample, scalar=(_identity2, _pass_first)),
    OpDef("broadcast_like", 2, _broadcast_like, _broadcast_like_vjp, _broadcast_like_infer, input_names=("x", "like"),
          input_dtypes={"x": FLOAT_DTYPES},
          doc="x broadcast to like's shape, in like's dtype when it is a float (like's values are not read).",
          sample=_broadcast_like_sample, scalar=(_identity2, _pass_first)),
    OpDef("unreduce", 2, _unreduce, _unreduce_vjp, _unreduce_infer, input_names=("g", "like"),
          input_dtypes={"g": FLOAT_DTYPES}, attrs={"axis": _AXIS, "keepdims": _KEEPDIMS},
          doc="g, a reduction of like over axis (sum's attributes), broadcast back to like's shape.",
          sample=_unreduce_sample, scalar=(_identity2, _pass_first)),

    # values of a fixed shape and dtype: no gradient
    OpDef("zeros_like", 1, _zeros_like, _none, lambda x: x, input_names=("x",),
          doc="Zeros of x's shape and dtype; no gradient.", scalar=(lambda x: 0.0, _none)),
    OpDef("ones_like", 1, _ones_like, _none, lambda x: x, input_names=("x",),
          doc="Ones of x's shape and dtype; no gradient.", scalar=(lambda x: 1.0, _none)),
    OpDef("scalar_like", 1, _scalar_like, _none, lambda x, *, value: TensorSpec((), float_result(x.dtype)),
          input_names=("x",), attrs={"value": Attr("float", doc="the value", allow_nonfinite=True)},
          doc="The 0-d value of x's float dtype (float64 for int and bool x); no gradient.",
          sample=_scalar_like_sample, scalar=(lambda x, *, value: value, _none)),
    OpDef("group_size", 1, _group_size, _none, _group_size_infer, input_names=("x",),
          attrs={"axis": _AXIS, "ddof": Attr("int", 0, "subtracted from the count")},
          doc="The number of elements per group of a reduction of x over axis, minus ddof, as a 0-d float; "
              "no gradient.", sample=_group_size_sample),

    # piecewise-constant weights: no gradient
    OpDef("step", 2, _step, _none, _step_infer, input_names=("x", "y"),
          attrs={"tie": Attr("float", 0.0, "the value where x == y")},
          doc="1 where x > y, tie where x == y, 0 elsewhere, as a float (numpy broadcasting); no gradient.",
          sample=_step_sample, scalar=(_step_float, _none)),
    OpDef("extremum_weights", 2, _extremum_weights, _none, _extremum_infer, input_names=("x", "out"),
          attrs={"axis": _AXIS, "keepdims": _KEEPDIMS},
          doc="Where x equals its group's extremum out (a max or min of x over axis): 1 / the number of "
              "elements that tie; else 0. No gradient.", sample=_extremum_sample),

    # products
    OpDef("prod_except", 1, _prod_except, _prod_except_vjp, _prod_except_infer, input_names=("x",),
          input_dtypes={"x": FLOAT_DTYPES}, attrs={"axis": Attr("ints", None, "the groups' axes; none: all axes")},
          doc="Per element, the product of the other elements of its group (over axis), computed without "
              "division: prod's gradient.", sample=_prod_except_sample),
    OpDef("xmul", 2, _xmul, _xmul_vjp, _xmul_infer, input_names=("a", "b"),
          input_dtypes={"a": NUMBER_DTYPES, "b": NUMBER_DTYPES},
          doc="a * b as a float with numpy broadcasting, and 0 where a == 0 whatever b (inf, nan), as xlogy.",
          sample=_xmul_sample, scalar=(_xmul_float, lambda g, out, a, b: (g * b, _xmul_float(a, g)))),
]

SYMBOLIC = {
    #  name:              (vjp_graph,                  jvp_graph)
    "sum_to":             (_sum_to_vjp_graph,          _sum_to_jvp_graph),
    "broadcast_like":     (_broadcast_like_vjp_graph,  _broadcast_like_jvp_graph),
    "unreduce":           (_unreduce_vjp_graph,        _unreduce_jvp_graph),
    "zeros_like":         (no_vjp_graph,               no_jvp_graph),
    "ones_like":          (no_vjp_graph,               no_jvp_graph),
    "scalar_like":        (no_vjp_graph,               no_jvp_graph),
    "group_size":         (no_vjp_graph,               no_jvp_graph),
    "step":               (no_vjp_graph,               no_jvp_graph),
    "extremum_weights":   (no_vjp_graph,               no_jvp_graph),
    "prod_except":        (_prod_except_vjp_graph,     _prod_except_jvp_graph),
    "xmul":               (_xmul_vjp_graph,            _xmul_jvp_graph),
}

OPERATORS = with_symbolic(OPERATORS, SYMBOLIC)

register_operators = table_hookimpl(OPERATORS)
