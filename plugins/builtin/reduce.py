"""Reductions: sum, mean, max, min, prod, var, std, logsumexp over some axes (``axis``) or all
of them, and argmax, argmin along one axis.

``axis`` is a list of ints (negative counts from the end; None, the default,
means every axis) and ``keepdims`` keeps the reduced axes with size 1, as in
numpy. The vjp rules put the reduced axes back and spread the gradient over
them into a fresh array of the input's shape.

max and min route the gradient to the extrema; when several elements tie they
split it evenly (``[1, 3, 3]`` gives ``[0, 0.5, 0.5]`` for max). max, min and
logsumexp refuse a reduction over an axis of size 0 (numpy raises; there is
no value), with reason SHAPE_MISMATCH.

Integer sum and prod refuse a result outside their dtype's range (numpy wraps it
silently: the sum of ``[max, max]`` is -2) with reason OUT_OF_RANGE; float
reductions are not checked.

prod's gradient is the product of the other elements, computed from prefix and
suffix products and never by dividing by x: with one zero in a group only that
element gets a gradient (the product of the others), with two or more zeros
the whole group gets 0. A product over no elements is 1, as in numpy.

var and std take ``ddof`` (the divisor is ``count - ddof``, as numpy's). They
refuse what numpy answers with nan or inf: a reduction over no elements
(SHAPE_MISMATCH) and ``ddof >= count`` (BAD_ATTRIBUTE on ``attrs.ddof``),
both in infer, before anything runs. The values are centred on the first
element of each group before the mean is taken (var does not change under a
shift), so a constant group has a variance of exactly 0 whatever its value.
std is not differentiable where it is 0 (a cone, like abs at 0): its gradient
there is defined as 0, the smallest subgradient (PyTorch gives nan), so one
constant row does not poison the whole gradient.

argmax and argmin take one ``axis`` (an int, default 0) and ``keepdims``, as
ONNX ArgMax/ArgMin: the first index of the extremum (numpy's), as int64, with
no gradient. A 0-d input has no axis to search and is refused.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from chainrule.core import Attr, OpDef, OpError, TensorSpec
from chainrule.core.dtypes import float_result
from chainrule.core.symbolic import no_jvp_graph, no_vjp_graph, with_symbolic
from chainrule.plugins.authoring import table_hookimpl

from .common import as_float, logsumexp, normalize_axes, writable


# --- shapes and spreading -------------------------------------------------------------------

def _reduced_spec(x: TensorSpec, axis, keepdims: bool, dtype: np.dtype, *, nonempty: str | None = None) -> TensorSpec:
    axes = normalize_axes(axis, len(x.shape))
    if nonempty is not None:
        for a in axes:
            if x.shape[a] == 0:
                raise OpError(f"{nonempty} over axis {a} of size 0 has no value", reason="SHAPE_MISMATCH")
    if keepdims:
        shape = tuple(1 if i in axes else n for i, n in enumerate(x.shape))
    else:
        shape = tuple(n for i, n in enumerate(x.shape) if i not in axes)
    return TensorSpec(shape, np.dtype(dtype))


def _kept(g: Any, axes: tuple[int, ...], keepdims: bool) -> np.ndarray:
    """A reduced value with its reduced axes back (as size 1), ready to broadcast against the input."""
    return g if keepdims else np.expand_dims(g, axes)


def _spread(g: Any, x: Any, axes: tuple[int, ...], keepdims: bool) -> np.ndarray:
    """g broadcast over the reduced axes to x's shape: a read-only view, no copy.

    Rules never write into their ``g`` and the engine adds into fresh buffers
    only, so sum's gradient costs no pass over memory at all."""
    return np.broadcast_to(_kept(g, axes, keepdims), np.shape(x))


def _count(x: Any, axes: tuple[int, ...]) -> int:
    return math.prod(np.shape(x)[a] for a in axes)


# --- sum, mean -------------------------------------------------------------------------------

def _sum_dtype(dtype: np.dtype) -> np.dtype:
    """numpy's: floats keep their dtype; bool and ints narrower than the platform int widen to it."""
    return dtype if dtype.kind == "f" else np.result_type(dtype, np.int_)


def _sum(x, *, axis=None, keepdims=False):
    axes = normalize_axes(axis, np.ndim(x))
    out = np.sum(x, axis=axes, keepdims=keepdims)
    if out.dtype.kind in "iu" and np.size(x):
        _check_int_sum(x, out, axes, keepdims)
    return out


def _check_int_sum(x: Any, out: Any, axes: tuple[int, ...], keepdims: bool) -> None:
    """Refuse an integer sum whose true value is outside its dtype's range (numpy wraps it).

    Cheap bound first: count * max|x| inside the range means no group can overflow (two passes,
    min and max, no allocation). Otherwise each group is summed exactly with Python ints; a wrapped
    partial sum does not matter, only whether the true total fits (integer addition is modular)."""
    info = np.iinfo(out.dtype)
    largest = max(abs(int(np.max(x))), abs(int(np.min(x))))
    if largest * _count(x, axes) <= info.max:
        return
    exact = np.sum(np.asarray(x).astype(object), axis=axes, keepdims=keepdims)
    for v in np.asarray(exact, dtype=object).reshape(-1).tolist():
        if not info.min <= v <= info.max:
            raise OpError(f"sum overflows {out.dtype} (its range is {info.min} to {info.max}): numpy would "
                          f"wrap it silently; use a float input", reason="OUT_OF_RANGE")


def _sum_vjp(g, out, x, *, axis=None, keepdims=False):
    return (_spread(g, x, normalize_axes(axis, np.ndim(x)), keepdims),)


def _mean(x, *, axis=None, keepdims=False):
    return np.mean(x, axis=normalize_axes(axis, np.ndim(x)), keepdims=keepdims)


def _mean_vjp(g, out, x, *, axis=None, keepdims=False):
    axes = normalize_axes(axis, np.ndim(x))
    return (_spread(g / _count(x, axes), x, axes, keepdims),)


# --- max -------------------------------------------------------------------------------------

def _max(x, *, axis=None, keepdims=False):
    return np.max(x, axis=normalize_axes(axis, np.ndim(x)), keepdims=keepdims)


def _max_vjp(g, out, x, *, axis=None, keepdims=False):
    axes = normalize_axes(axis, np.ndim(x))
    g = _kept(g, axes, keepdims)
    hit = x == _kept(out, axes, keepdims)                   # where the maxima are
    ties = hit.sum(axis=axes, keepdims=True, dtype=g.dtype)  # how many share each maximum
    return (hit * (g / ties),)


# --- min (the same gradient as max: to the minima, ties split evenly) -------------------------

def _min(x, *, axis=None, keepdims=False):
    return np.min(x, axis=normalize_axes(axis, np.ndim(x)), keepdims=keepdims)


# --- prod ------------------------------------------------------------------------------------

def _prod(x, *, axis=None, keepdims=False):
    axes = normalize_axes(axis, np.ndim(x))
    out = np.prod(x, axis=axes, keepdims=keepdims)
    if out.dtype.kind in "iu" and np.size(x):
        _check_int_prod(x, out, axes)
    return out


def _check_int_prod(x: Any, out: Any, axes: tuple[int, ...]) -> None:
    """Refuse an integer product whose true value is outside its dtype's range (numpy wraps it).

    The product of |x| in float64 (one conversion and one reduction) clears every group below
    2**(bits-2); a group above it (or inf, or nan from 0 * inf) is multiplied exactly with Python
    ints, stopping as soon as it leaves the range: no zero left means |product| only grows."""
    info = np.iinfo(out.dtype)
    x = np.asarray(x)
    rest = [i for i in range(x.ndim) if i not in axes]
    rows = np.transpose(x, rest + list(axes)).reshape(-1, _count(x, axes))   # one row per group
    with np.errstate(over="ignore", invalid="ignore"):
        approx = np.prod(np.abs(rows.astype(np.float64)), axis=-1)
    near = ~(approx < 2.0 ** (info.bits - 2))
    for row in rows[near].tolist():
        if 0 in row:
            continue
        p = 1
        for v in row:
            p *= v
            if not info.min <= p <= info.max:
                raise OpError(f"prod overflows {out.dtype} (its range is {info.min} to {info.max}): numpy "
                              f"would wrap it silently; use a float input", reason="OUT_OF_RANGE")


def _prod_vjp(g, out, x, *, axis=None, keepdims=False):
    """g times the product of the other elements of each group: prefix products times suffix
    products, so zeros need no special case and nothing is divided by x."""
    x = np.asarray(x)
    axes = normalize_axes(axis, x.ndim)
    rest = [i for i in range(x.ndim) if i not in axes]
    order = rest + list(axes)                               # the reduced axes last, in one row
    moved = np.transpose(x, order)
    lead = moved.shape[:len(rest)]
    rows = moved.reshape(lead + (_count(x, axes),))
    others = np.ones_like(rows, dtype=np.result_type(rows.dtype, np.asarray(g).dtype))
    np.cumprod(rows[..., :-1], axis=-1, out=others[..., 1:])    # others[k] = x[0] ... x[k-1]
    after = np.ones_like(others)
    np.cumprod(rows[..., :0:-1], axis=-1, out=after[..., -2::-1])  # after[k] = x[k+1] ... x[n-1]
    others *= after
    others *= np.transpose(_kept(g, axes, keepdims), order).reshape(lead + (1,))
    return (np.transpose(others.reshape(moved.shape), [order.index(i) for i in range(x.ndim)]),)


# --- var, std --------------------------------------------------------------------------------

def _dof(shape: tuple[int, ...], axes: tuple[int, ...], ddof: int, what: str) -> int:
    """count - ddof, the divisor of the variance; OpError where numpy would give nan or inf."""
    count = math.prod(shape[a] for a in axes)
    if count == 0:
        raise OpError(f"{what} over no elements (axis {next(a for a in axes if shape[a] == 0)} has size 0) "
                      f"has no value", reason="SHAPE_MISMATCH")
    if ddof >= count:
        raise OpError(f"ddof {ddof} leaves no degrees of freedom: {what} reduces {count} element(s) per value, "
                      f"so ddof must be less than {count}", reason="BAD_ATTRIBUTE", field="attrs.ddof")
    return count - ddof


def _centred(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """x minus its mean over the axes, shifted by each group's first element first: exact zeros for
    a constant group (x - mean(x) is off by rounding for most constants, 0.1 say), and fewer digits
    lost when the values sit far from 0."""
    first = x[tuple(slice(0, 1) if i in axes else slice(None) for i in range(x.ndim))]
    d = writable(x - first)
    d -= np.mean(d, axis=axes, keepdims=True)
    return d


def _var(x, *, axis=None, keepdims=False, ddof=0):
    x = as_float(np.asarray(x))
    axes = normalize_axes(axis, x.ndim)
    n = _dof(x.shape, axes, ddof, "var")
    d = _centred(x, axes)
    np.square(d, out=d)
    return np.divide(np.sum(d, axis=axes, keepdims=keepdims), n, dtype=x.dtype)


def _var_vjp(g, out, x, *, axis=None, keepdims=False, ddof=0):
    x = as_float(np.asarray(x))
    axes = normalize_axes(axis, x.ndim)
    n = _dof(x.shape, axes, ddof, "var")
    d = _centred(x, axes)
    d *= _kept(g, axes, keepdims) * (2.0 / n)                # 2 (x - mean) / (count - ddof)
    return (d,)


def _std(x, *, axis=None, keepdims=False, ddof=0):
    v = writable(_var(x, axis=axis, keepdims=keepdims, ddof=ddof))
    np.sqrt(v, out=v)
    return v


def _std_vjp(g, out, x, *, axis=None, keepdims=False, ddof=0):
    """(x - mean) / ((count - ddof) std), and 0 where std is 0 (the gradient is not defined there)."""
    x = as_float(np.asarray(x))
    axes = normalize_axes(axis, x.ndim)
    n = _dof(x.shape, axes, ddof, "std")
    out = np.asarray(out)
    zero = out == 0
    scale = np.where(zero, 0.0, g / (np.where(zero, 1.0, out) * n))  # on the reduced shape: small
    d = _centred(x, axes)
    d *= _kept(scale.astype(d.dtype, copy=False), axes, keepdims)
    return (d,)


def _var_infer(x: TensorSpec, *, axis=None, keepdims=False, ddof=0, what: str = "var") -> TensorSpec:
    spec = _reduced_spec(x, axis, keepdims, float_result(x.dtype))
    _dof(x.shape, normalize_axes(axis, len(x.shape)), ddof, what)
    return spec


# --- argmax, argmin --------------------------------------------------------------------------

def _arg_infer(x: TensorSpec, *, axis=0, keepdims=False, what: str = "argmax") -> TensorSpec:
    if not x.shape:
        raise OpError(f"{what} needs an axis to search; a 0-d tensor has none", reason="SHAPE_MISMATCH")
    return _reduced_spec(x, (axis,), keepdims, np.dtype(np.int64), nonempty=what)


def _argmax(x, *, axis=0, keepdims=False):
    return np.argmax(x, axis=axis, keepdims=keepdims).astype(np.int64, copy=False)


def _argmin(x, *, axis=0, keepdims=False):
    return np.argmin(x, axis=axis, keepdims=keepdims).astype(np.int64, copy=False)


def _no_gradient(g, out, x, **_):
    return (None,)


# --- logsumexp (the forward rule is common.logsumexp, which nn shares) ----------------------

def _logsumexp_vjp(g, out, x, *, axis=None, keepdims=False):
    axes = normalize_axes(axis, np.ndim(x))
    d = writable(x - _kept(out, axes, keepdims))
    np.exp(d, out=d)                                    # softmax of x over the axes
    d *= _kept(g, axes, keepdims)
    return (d,)


# --- gradient-check samples ------------------------------------------------------------------

def _axis_choice(rng: np.random.Generator) -> dict[str, Any]:
    return [{}, {"axis": (1,)}, {"axis": (0, -1), "keepdims": True}, {"axis": (-2,)}][rng.integers(4)]


def _sample(rng):
    return [rng.standard_normal((2, 3, 4))], _axis_choice(rng)


def _distinct(rng):
    """Well-separated values, so no two elements tie for a maximum."""
    x = rng.permutation(24).reshape(2, 3, 4) * 0.5 + rng.uniform(-0.1, 0.1, (2, 3, 4))
    return [x], _axis_choice(rng)


def _var_sample(rng):
    return [rng.standard_normal((2, 3, 4))], {**_axis_choice(rng), "ddof": int(rng.integers(2))}


def _arg_sample(rng):
    x = rng.permutation(24).reshape(2, 3, 4) * 0.5
    return [x], [{}, {"axis": 1}, {"axis": -1, "keepdims": True}][rng.integers(3)]


# --- the table -------------------------------------------------------------------------------

_AXIS = Attr("ints", None, "axes to reduce (negative counts from the end); none: all axes")
_KEEPDIMS = Attr("bool", False, "keep the reduced axes with size 1")
_ATTRS = {"axis": _AXIS, "keepdims": _KEEPDIMS}
_DDOF = Attr("int", 0, "delta degrees of freedom: the divisor is count - ddof")
_ARG_ATTRS = {"axis": Attr("int", 0, "the axis to search (negative counts from the end)"), "keepdims": _KEEPDIMS}

OPERATORS: list[OpDef] = [
    OpDef("sum", 1, _sum, _sum_vjp,
          lambda x, *, axis=None, keepdims=False: _reduced_spec(x, axis, keepdims, _sum_dtype(x.dtype)),
          attrs=_ATTRS, doc="Sum over axes (all by default); ints and bools sum to int64.", sample=_sample),
    OpDef("mean", 1, _mean, _mean_vjp,
          lambda x, *, axis=None, keepdims=False: _reduced_spec(x, axis, keepdims, float_result(x.dtype)),
          attrs=_ATTRS, doc="Mean over axes (all by default).", sample=_sample),
    OpDef("max", 1, _max, _max_vjp,
          lambda x, *, axis=None, keepdims=False: _reduced_spec(x, axis, keepdims, x.dtype, nonempty="max"),
          attrs=_ATTRS, doc="Maximum over axes; tied maxima split the gradient evenly.", sample=_distinct),
    OpDef("min", 1, _min, _max_vjp,
          lambda x, *, axis=None, keepdims=False: _reduced_spec(x, axis, keepdims, x.dtype, nonempty="min"),
          attrs=_ATTRS, doc="Minimum over axes; tied minima split the gradient evenly.", sample=_distinct),
    OpDef("prod", 1, _prod, _prod_vjp,
          lambda x, *, axis=None, keepdims=False: _reduced_spec(x, axis, keepdims, _sum_dtype(x.dtype)),
          attrs=_ATTRS, doc="Product over axes (all by default); exact gradient with zeros; ints and bools give int64.",
          sample=_sample),
    OpDef("var", 1, _var, _var_vjp, _var_infer,
          attrs={**_ATTRS, "ddof": _DDOF}, doc="Variance over axes, divided by count - ddof (numpy's var).",
          sample=_var_sample),
    OpDef("std", 1, _std, _std_vjp, lambda x, **attrs: _var_infer(x, **attrs, what="std"),
          attrs={**_ATTRS, "ddof": _DDOF}, doc="Standard deviation over axes (numpy's std); its gradient is 0 where it is 0.",
          sample=_var_sample),
    OpDef("argmax", 1, _argmax, _no_gradient, lambda x, **attrs: _arg_infer(x, **attrs, what="argmax"),
          attrs=_ARG_ATTRS, doc="Index of the first maximum along one axis, as int64; no gradient.", sample=_arg_sample),
    OpDef("argmin", 1, _argmin, _no_gradient, lambda x, **attrs: _arg_infer(x, **attrs, what="argmin"),
          attrs=_ARG_ATTRS, doc="Index of the first minimum along one axis, as int64; no gradient.", sample=_arg_sample),
    OpDef("logsumexp", 1, logsumexp, _logsumexp_vjp,
          lambda x, *, axis=None, keepdims=False: _reduced_spec(x, axis, keepdims, float_result(x.dtype), nonempty="logsumexp"),
          attrs=_ATTRS, doc="log(sum(exp(x))) over axes, computed without overflow.", sample=_sample),
]


# --- symbolic rules (docs/derivatives.md): the gradients as graphs of registered operators. ``unreduce``
# (builtin.derivative) broadcasts a reduced value back over the reduced axes, reading the input's shape at
# run time; ``group_size`` is the count (minus ddof) per group; ``extremum_weights`` routes max and min
# (ties split evenly); ``prod_except`` is the product of the other elements. std's gradient is 0 where
# std is 0, as the numpy rule's (xmul). argmax and argmin have no derivative. -------------------------------

def _spread_graph(b, g, x, axis, keepdims):
    return b.op("unreduce", g, x, axis=axis, keepdims=keepdims)


def _sum_vjp_graph(b, g, out, x, *, axis=None, keepdims=False):
    return (_spread_graph(b, g, x, axis, keepdims),)


def _sum_jvp_graph(b, tangents, out, x, *, axis=None, keepdims=False):
    return b.op("sum", tangents[0], axis=axis, keepdims=keepdims)


def _mean_vjp_graph(b, g, out, x, *, axis=None, keepdims=False):
    return (_spread_graph(b, g, x, axis, keepdims) / b.op("group_size", x, axis=axis),)


def _mean_jvp_graph(b, tangents, out, x, *, axis=None, keepdims=False):
    return b.op("mean", tangents[0], axis=axis, keepdims=keepdims)


def _weighted_graphs(weights):
    """(vjp_graph, jvp_graph) of a reduction whose gradient is ``weights(b, out, x, axis, keepdims)`` times
    the spread g: vjp w * unreduce(g), jvp sum(w * t)."""
    def vjp_graph(b, g, out, x, *, axis=None, keepdims=False):
        return (weights(b, out, x, axis, keepdims) * _spread_graph(b, g, x, axis, keepdims),)

    def jvp_graph(b, tangents, out, x, *, axis=None, keepdims=False):
        return b.op("sum", weights(b, out, x, axis, keepdims) * tangents[0], axis=axis, keepdims=keepdims)
    return vjp_graph, jvp_graph


def _extremum(b, out, x, axis, keepdims):
    return b.op("extremum_weights", x, out, axis=axis, keepdims=keepdims)


def _softmax_weights(b, out, x, axis, keepdims):
    return b.op("exp", x - _spread_graph(b, out, x, axis, keepdims))


def _prod_weights(b, out, x, axis, keepdims):
    return b.op("prod_except", x, axis=axis)


def _centred_graph(b, x, axis):
    return x - b.op("mean", x, axis=axis, keepdims=True)


def _var_vjp_graph(b, g, out, x, *, axis=None, keepdims=False, ddof=0):
    scale = 2.0 / b.op("group_size", x, axis=axis, ddof=ddof)
    return (_spread_graph(b, g, x, axis, keepdims) * _centred_graph(b, x, axis) * scale,)


def _var_jvp_graph(b, tangents, out, x, *, axis=None, keepdims=False, ddof=0):
    scale = 2.0 / b.op("group_size", x, axis=axis, ddof=ddof)     # the mean's tangent drops: sum(x - mean) = 0
    return b.op("sum", _centred_graph(b, x, axis) * tangents[0], axis=axis, keepdims=keepdims) * scale


def _std_vjp_graph(b, g, out, x, *, axis=None, keepdims=False, ddof=0):
    n = b.op("group_size", x, axis=axis, ddof=ddof)
    spread = _spread_graph(b, g / out, x, axis, keepdims)        # inf where std is 0, where x - mean is 0 too
    return (b.op("xmul", _centred_graph(b, x, axis), spread) / n,)


def _std_jvp_graph(b, tangents, out, x, *, axis=None, keepdims=False, ddof=0):
    n = b.op("group_size", x, axis=axis, ddof=ddof)
    dot = b.op("sum", _centred_graph(b, x, axis) * tangents[0], axis=axis, keepdims=keepdims)
    return b.op("xmul", dot / n, 1.0 / out)                         # 0 where std is 0


SYMBOLIC = {
    #  name:      (vjp_graph,        jvp_graph)
    "sum":        (_sum_vjp_graph,   _sum_jvp_graph),
    "mean":       (_mean_vjp_graph,  _mean_jvp_graph),
    "max":        _weighted_graphs(_extremum),
    "min":        _weighted_graphs(_extremum),
    "logsumexp":  _weighted_graphs(_softmax_weights),
    "prod":       _weighted_graphs(_prod_weights),
    "var":        (_var_vjp_graph,   _var_jvp_graph),
    "std":        (_std_vjp_graph,   _std_jvp_graph),
    "argmax":     (no_vjp_graph,     no_jvp_graph),
    "argmin":     (no_vjp_graph,     no_jvp_graph),
}

OPERATORS = with_symbolic(OPERATORS, SYMBOLIC)

register_operators = table_hookimpl(OPERATORS)
