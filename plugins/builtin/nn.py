"""Neural-network functions and losses: softmax, log_softmax, cross_entropy, mse, layer_norm.

All are computed stably (shifted by the maximum before ``exp``) and keep
float32 as float32. The losses return a 0-d value: the mean over the batch.
layer_norm (ONNX LayerNormalization) normalizes over the axes ``axis``..last.
log_softmax and layer_norm hand their vjps what the forward pass computed
(softmax; x̂ and 1/std) as residuals (``OpDef.residuals``) instead of having
them recompute it.

Their symbolic rules (``vjp_graph``, ``jvp_graph``; docs/derivatives.md) are the
same formulas written with registered operators; a symbolic rule has no
residuals, so softmax is recomputed as exp(out) and x̂ and 1/std from means and
a square root (the derived graph computes them once). cross_entropy's use
one_hot_like (builtin.index) and group_size (builtin.derivative), so that a
batch of free size needs no static shape.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from chainrule.core import Attr, OpDef, OpError, TensorSpec, broadcast_shapes
from chainrule.core.dtypes import DIFFERENTIABLE, INT_DTYPES, float_result
from chainrule.core.symbolic import with_symbolic
from chainrule.plugins.authoring import table_hookimpl

from .common import as_float, logsumexp, normalize_axes, writable


# --- softmax, log_softmax ----------------------------------------------------------------------

def softmax(x: Any, axis: int = -1) -> np.ndarray:
    """exp(x) / sum(exp(x)) along ``axis``, shifted by the maximum so that exp never overflows."""
    x = as_float(x)
    e = writable(x - np.max(x, axis=axis, keepdims=True))
    np.exp(e, out=e)
    e /= np.sum(e, axis=axis, keepdims=True)
    return e


def _softmax_vjp(g, out, x, *, axis=-1):
    d = writable(g - np.sum(g * out, axis=axis, keepdims=True))
    d *= out                                           # out * (g - <g, out>)
    return (d,)


def _log_softmax(x: Any, *, axis: int = -1) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """x - logsumexp(x) along ``axis``; and, as the vjp's residuals, the shifted exponentials and
    their sums (softmax = e / total): computed here anyway, so the vjp takes no exp of its own."""
    x = as_float(x)
    axes = normalize_axes((axis,), x.ndim)
    top = np.max(x, axis=axes, keepdims=True)
    top = np.where(np.isfinite(top), top, 0)  # all -inf (or an inf): no shift, the log gives -inf (inf)
    shifted = writable(x - top)
    e = np.exp(shifted)
    total = np.sum(e, axis=axes, keepdims=True)
    shifted -= np.log(total)
    return shifted, (e, total)


def _log_softmax_vjp(g, out, x, *, axis=-1, saved):
    e, total = saved
    d = e * (np.sum(g, axis=axis, keepdims=True) / total)  # softmax * sum(g), softmax from the forward pass
    np.subtract(g, d, out=d)                                # g - softmax * sum(g)
    return (d,)


def _along_axis(x: TensorSpec, *, axis: int = -1) -> TensorSpec:
    normalize_axes((axis,), len(x.shape))
    return TensorSpec(x.shape, float_result(x.dtype))


# --- cross_entropy ---------------------------------------------------------------------------

def _cross_entropy_infer(logits: TensorSpec, labels: TensorSpec) -> TensorSpec:
    if not logits.shape or logits.shape[-1] == 0:
        raise OpError(f"logits need a last axis of classes, got shape {list(logits.shape)}", reason="SHAPE_MISMATCH")
    if labels.dtype.kind not in "iu":
        raise OpError(f"labels must be int32 or int64, got {labels.dtype.name}", reason="DTYPE_MISMATCH")
    if labels.shape != logits.shape[:-1]:
        raise OpError(f"labels of shape {list(labels.shape)} do not match logits of shape {list(logits.shape)} "
                      f"(expected {list(logits.shape[:-1])})", reason="SHAPE_MISMATCH")
    return TensorSpec((), float_result(logits.dtype))


def _check_labels(labels: np.ndarray, classes: int) -> None:
    bad = (labels < 0) | (labels >= classes)
    if np.any(bad):
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        at = f" at position {where}" if where else ""
        raise OpError(f"label {labels[where]}{at} is out of range for {classes} classes (0..{classes - 1})",
                      reason="OUT_OF_RANGE")


def _cross_entropy(logits, labels):
    logits, labels = as_float(logits), np.asarray(labels)
    _check_labels(labels, logits.shape[-1])
    picked = np.take_along_axis(logits, labels[..., np.newaxis], axis=-1)[..., 0]
    return np.mean(logsumexp(logits, axis=(-1,)) - picked)   # mean of -log softmax(logits)[label]


def _cross_entropy_vjp(g, out, logits, labels):
    p = softmax(logits, axis=-1)
    p[(*np.indices(np.shape(labels), sparse=True), labels)] -= 1   # softmax - one_hot(labels)
    p *= g / max(np.size(labels), 1)
    return p, None


# --- mse -------------------------------------------------------------------------------------

def _difference(prediction, target) -> np.ndarray:
    """prediction - target in the promoted dtype, as float (int and bool inputs give float64)."""
    dtype = getattr(prediction, "dtype", None)
    if dtype is not None and dtype is getattr(target, "dtype", None) and dtype in DIFFERENTIABLE:
        return np.subtract(prediction, target)  # the common case: one float dtype, nothing to promote
    return np.subtract(prediction, target, dtype=float_result(np.result_type(prediction, target)))


def _mse(prediction, target):
    d = _difference(prediction, target)
    return np.vdot(d, d) / np.size(d)          # mean((p - t)²) as one dot product; nan when empty


def _mse_vjp(g, out, prediction, target):
    d = writable(_difference(prediction, target))
    d *= g * (2 / max(d.size, 1))
    return d, -d


def _mse_infer(prediction: TensorSpec, target: TensorSpec) -> TensorSpec:
    """A scalar, from operands of which one broadcasts to the other: the difference the rule builds
    is then no larger than an operand, which the memory budget has already counted. (A [n,1] against
    a [1,n] would make an n×n temporary behind a scalar result, and is almost always a mistake.)"""
    shape = broadcast_shapes(prediction.shape, target.shape)
    if shape not in (tuple(prediction.shape), tuple(target.shape)):
        raise OpError(f"prediction {list(prediction.shape)} and target {list(target.shape)} broadcast to "
                      f"{list(shape)}, larger than either; give them the same shape", reason="SHAPE_MISMATCH")
    return TensorSpec((), float_result(np.result_type(prediction.dtype, target.dtype)))


# --- layer_norm ------------------------------------------------------------------------------

def _normalized_axes(x: tuple[int, ...], scale: tuple[int, ...], bias: tuple[int, ...], axis: int,
                     epsilon: float) -> tuple[int, ...]:
    """Axes ``axis``..last (ONNX LayerNormalization), with the shapes and epsilon checked."""
    if not epsilon >= 0 or epsilon == float("inf"):
        raise OpError(f"epsilon must be a finite number >= 0, got {epsilon}", reason="BAD_ATTRIBUTE",
                      field="attrs.epsilon")
    first = normalize_axes((axis,), len(x))[0]
    normalized = tuple(x[first:])
    for name, shape in (("scale", tuple(scale)), ("bias", tuple(bias))):
        if len(shape) > len(normalized) or any(a not in (1, b) for a, b in zip(shape[::-1], normalized[::-1])):
            raise OpError(f"{name} of shape {list(shape)} does not broadcast to the normalized shape "
                          f"{list(normalized)} (axes {first}.. of x {list(x)})", reason="SHAPE_MISMATCH")
    return tuple(range(first, len(x)))


def _layer_norm_infer(x: TensorSpec, scale: TensorSpec, bias: TensorSpec, *, axis: int = -1,
                      epsilon: float = 1e-5) -> TensorSpec:
    _normalized_axes(x.shape, scale.shape, bias.shape, axis, epsilon)
    return TensorSpec(tuple(x.shape), float_result(np.result_type(x.dtype, scale.dtype, bias.dtype)))


def _standardized(x, axes: tuple[int, ...], epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """(x - mean) / sqrt(var + epsilon) over ``axes``, and 1 / sqrt(var + epsilon) (kept dims)."""
    xhat = writable(x - np.mean(x, axis=axes, keepdims=True))
    rstd = writable(np.mean(np.square(xhat), axis=axes, keepdims=True))
    rstd += epsilon
    np.sqrt(rstd, out=rstd)
    np.reciprocal(rstd, out=rstd)
    xhat *= rstd
    return xhat, rstd


def _layer_norm_dtype(x, scale, bias) -> np.dtype:
    return float_result(np.result_type(x, scale, bias))


def _layer_norm(x, scale, bias, *, axis=-1, epsilon=1e-5):
    """The normalized x̂ * scale + bias, and (x̂, 1/std) as the vjp's residuals."""
    dtype = _layer_norm_dtype(x, scale, bias)
    axes = _normalized_axes(np.shape(x), np.shape(scale), np.shape(bias), axis, epsilon)
    xhat, rstd = _standardized(np.asarray(x).astype(dtype, copy=False), axes, epsilon)
    y = xhat * np.asarray(scale).astype(dtype, copy=False)
    y += np.asarray(bias).astype(dtype, copy=False)
    return y, (xhat, rstd)


def _layer_norm_vjp(g, out, x, scale, bias, *, axis=-1, epsilon=1e-5, needs=(True, True, True), saved):
    """dx = rstd * (ĝ - mean(ĝ) - x̂ * mean(ĝ * x̂)) with ĝ = g * scale (the means over the normalized
    axes); dscale = g * x̂ and dbias = g, in the output's shape (the engine sums them back to their own).
    x̂ and 1/std come from the forward pass (``saved``); neither is written to."""
    dtype = _layer_norm_dtype(x, scale, bias)
    axes = _normalized_axes(np.shape(x), np.shape(scale), np.shape(bias), axis, epsilon)
    xhat, rstd = saved
    g = np.asarray(g).astype(dtype, copy=False)
    dx = dscale = None
    if needs[1]:
        dscale = g * xhat
    if needs[0]:
        dxhat = writable(g * np.asarray(scale).astype(dtype, copy=False))
        projection = xhat * np.mean(dxhat * xhat, axis=axes, keepdims=True)   # x̂ * mean(ĝ x̂)
        dxhat -= np.mean(dxhat, axis=axes, keepdims=True)
        dxhat -= projection
        dxhat *= rstd
        dx = dxhat
    return dx, dscale, (g if needs[2] else None)


# --- symbolic rules (docs/derivatives.md): plain formulas, what the residuals held recomputed ---------

def _softmax_rule(b, v, y, axis):
    """y * (v - sum(v * y)) along axis: softmax's Jacobian (symmetric) times v, for the vjp and the jvp."""
    return y * (v - b.op("sum", v * y, axis=(axis,), keepdims=True))


def _softmax_vjp_graph(b, g, out, x, *, axis=-1):
    return (_softmax_rule(b, g, out, axis),)


def _softmax_jvp_graph(b, tangents, out, x, *, axis=-1):
    return _softmax_rule(b, tangents[0], out, axis)


def _log_softmax_vjp_graph(b, g, out, x, *, axis=-1):
    return (g - b.op("exp", out) * b.op("sum", g, axis=(axis,), keepdims=True),)   # g - softmax * sum(g)


def _log_softmax_jvp_graph(b, tangents, out, x, *, axis=-1):
    t = tangents[0]
    return t - b.op("sum", b.op("exp", out) * t, axis=(axis,), keepdims=True)       # t - <softmax, t>


def _cross_entropy_parts(b, logits, labels):
    """softmax(logits) - one_hot(labels), and the batch size (the number of labels) as a float."""
    p = b.op("softmax", logits, axis=-1)
    return p - b.op("one_hot_like", labels, p), b.op("group_size", labels)


def _cross_entropy_vjp_graph(b, g, out, logits, labels):
    d, n = _cross_entropy_parts(b, logits, labels)
    return d * (g / n), None


def _cross_entropy_jvp_graph(b, tangents, out, logits, labels):
    d, n = _cross_entropy_parts(b, logits, labels)
    return b.op("sum", d * tangents[0]) / n


def _mse_vjp_graph(b, g, out, prediction, target):
    d = prediction - target
    dp = d * (2 * g / b.op("group_size", d))
    return dp, -dp


def _mse_jvp_graph(b, tangents, out, prediction, target):
    tp, tt = tangents
    dt = tp if tt is None else -tt if tp is None else tp - tt
    return b.op("mean", 2 * (prediction - target) * dt)


def _layer_norm_parts(b, x, axis, epsilon):
    """x̂ and 1/std recomputed (a symbolic rule has no residuals), and the normalized axes counted from
    the end (so that they need no rank where axis is negative)."""
    if axis < 0:
        axes = tuple(range(axis, 0))
    else:
        spec = b.spec(x)
        if spec is None:
            raise ValueError(f"layer_norm with axis {axis} needs the rank of x, which shape inference cannot tell; "
                             f"give axis counted from the end (axis={axis} - rank)")
        axes = tuple(range(axis - len(spec.shape), 0))
    xc = x - b.op("mean", x, axis=axes, keepdims=True)
    rstd = 1 / b.op("sqrt", b.op("mean", xc * xc, axis=axes, keepdims=True) + epsilon)
    return xc * rstd, rstd, (lambda v: b.op("mean", v, axis=axes, keepdims=True))


def _layer_norm_vjp_graph(b, g, out, x, scale, bias, *, axis=-1, epsilon=1e-5):
    xhat, rstd, mean = _layer_norm_parts(b, x, axis, epsilon)
    gh = g * scale
    return rstd * (gh - mean(gh) - xhat * mean(gh * xhat)), g * xhat, g


def _layer_norm_jvp_graph(b, tangents, out, x, scale, bias, *, axis=-1, epsilon=1e-5):
    tx, tscale, tbias = tangents
    xhat, rstd, mean = _layer_norm_parts(b, x, axis, epsilon)
    txhat = None
    if tx is not None:
        centred = tx - mean(tx)
        txhat = rstd * (centred - xhat * mean(xhat * centred))   # the tangent of x̂
    return b.add_tangents(None if txhat is None else txhat * scale, None if tscale is None else xhat * tscale, tbias)


# --- gradient-check samples ------------------------------------------------------------------

def _pick(rng: np.random.Generator, options: list) -> Any:
    return options[rng.integers(len(options))]


def _softmax_sample(rng):
    shape, axis = _pick(rng, [((5,), -1), ((2, 3), -1), ((2, 3), 0), ((2, 3, 4), 1), ((2, 1, 3), -2)])
    return [rng.standard_normal(shape) * 2], {"axis": axis}


def _cross_entropy_sample(rng):
    batch, classes, dtype = _pick(rng, [((4,), 5, np.int64), ((2, 3), 4, np.int32), ((), 3, np.int64)])
    logits = rng.standard_normal(batch + (classes,)) * 2
    return [logits, np.asarray(rng.integers(0, classes, batch), dtype=dtype)], {}


def _mse_sample(rng):
    a, b = _pick(rng, [((2, 3), (2, 3)), ((2, 3), (3,)), ((), ()), ((4, 2), (1, 2))])
    return [np.asarray(rng.standard_normal(a)), np.asarray(rng.standard_normal(b))], {}


def _layer_norm_sample(rng):
    x, scale, bias, attrs = _pick(rng, [
        ((2, 5), (5,), (5,), {}),
        ((2, 3, 4), (3, 4), (4,), {"axis": 1}),
        ((3, 4), (1,), (3, 4), {"axis": 0, "epsilon": 0.1}),
        ((2, 3, 4), (3, 1), (), {"axis": -2}),
    ])
    return [rng.standard_normal(x), rng.standard_normal(scale), rng.standard_normal(bias)], attrs


# --- the table -------------------------------------------------------------------------------

_AXIS = {"axis": Attr("int", -1, "the axis of classes (negative counts from the end)")}

OPERATORS: list[OpDef] = [
    OpDef("softmax", 1, lambda x, *, axis=-1: softmax(x, axis), _softmax_vjp, _along_axis, attrs=_AXIS,
          doc="exp(x) / sum(exp(x)) along an axis (default the last), computed stably.", sample=_softmax_sample),
    OpDef("log_softmax", 1, _log_softmax, _log_softmax_vjp, _along_axis, attrs=_AXIS,
          doc="x - logsumexp(x) along an axis (default the last), computed stably.", sample=_softmax_sample,
          residuals=True),
    OpDef("cross_entropy", 2, _cross_entropy, _cross_entropy_vjp, _cross_entropy_infer,
          doc="Mean over the batch of -log softmax(logits)[label]; logits [..., C], int labels [...].",
          sample=_cross_entropy_sample, input_dtypes={"labels": INT_DTYPES}),
    OpDef("mse", 2, _mse, _mse_vjp, _mse_infer,
          doc="Mean squared error mean((prediction - target)**2), with broadcasting.", sample=_mse_sample),
    OpDef("layer_norm", 3, _layer_norm, _layer_norm_vjp, _layer_norm_infer,
          attrs={"axis": Attr("int", -1, "the first normalized axis: axes axis..last are normalized"),
                 "epsilon": Attr("float", 1e-5, "added to the variance before the square root")},
          doc="ONNX LayerNormalization: (x - mean) / sqrt(var + epsilon) * scale + bias over axes axis..last.",
          sample=_layer_norm_sample, selective_vjp=True, residuals=True),
]

SYMBOLIC = {
    #  name:          (vjp_graph,                  jvp_graph)
    "softmax":        (_softmax_vjp_graph,         _softmax_jvp_graph),
    "log_softmax":    (_log_softmax_vjp_graph,     _log_softmax_jvp_graph),
    "cross_entropy":  (_cross_entropy_vjp_graph,   _cross_entropy_jvp_graph),
    "mse":            (_mse_vjp_graph,             _mse_jvp_graph),
    "layer_norm":     (_layer_norm_vjp_graph,      _layer_norm_jvp_graph),
}

OPERATORS = with_symbolic(OPERATORS, SYMBOLIC)

register_operators = table_hookimpl(OPERATORS)
