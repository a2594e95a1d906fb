"""Shape: reshape, broadcast_to, concat, stack, slice, squeeze, expand_dims, pad, tile, cumsum, flip.

These move values without changing them (cumsum adds them up along an axis),
so their vjp rules move the gradient back: reshape it, sum it (broadcast_to,
tile), split it (concat, stack), scatter it into zeros (slice) or cut it out
of the padded gradient (pad), flip it (flip), or sum it up the other way
(cumsum). Forward results are numpy views where numpy gives views; no rule
writes into a value it did not create.

pad follows ONNX Pad in constant mode, negative pads included: a negative pad
crops that side, after the positive pads are applied (so a crop larger than
the axis may eat into the other side's padding), and only a result with a
negative size is refused. cumsum follows ONNX CumSum: ``exclusive`` leaves
each element out of its own sum, ``reverse`` sums from the end, and the
result keeps the input's dtype (int32 stays int32, bool is refused).

Derivatives as graphs (docs/derivatives.md): every operator here is linear, so
its ``jvp_graph`` is the operator itself on the tangent (pad's pads it with 0)
and its ``vjp_graph`` the adjoint: reshape_like (reshape, squeeze), squeeze
(expand_dims), concat_part (concat), slice then squeeze (stack), unslice
(slice), pad with the pads negated (pad: ``out[i] = x[i - begin]``), untile
(tile), cumsum the other way, flip. reshape_like, unslice, untile and
concat_part are operators of this table: they read the shape they restore from
an input (``like``) whose values they never read, so that a derivative needs
no static shape (inputs declared with -1 sizes), and the adjoint of each is the
operator it undoes, so derivatives built from them differentiate again.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from chainrule.core import VARIADIC, Attr, OpDef, OpError, TensorSpec, unbroadcast
from chainrule.core.dtypes import NUMBER_DTYPES
from chainrule.core.tensor_spec import MAX_RANK
from chainrule.core.symbolic import linear_jvp, with_symbolic
from chainrule.plugins.authoring import table_hookimpl

from .common import normalize_axes


def _axis(axis: int, ndim: int) -> int:
    """One axis attribute as a non-negative axis (OpError naming it and the rank)."""
    return normalize_axes((axis,), ndim)[0]


def _reshape_back(g, out, x, **_):
    """vjp of every operator that only relabels the axes of its input."""
    return (np.reshape(g, np.shape(x)),)


# --- reshape, broadcast_to -------------------------------------------------------------------

def _target_shape(x: TensorSpec, shape: Sequence[int]) -> tuple[int, ...]:
    if sum(n == -1 for n in shape) > 1 or any(n < -1 for n in shape):
        raise OpError(f"shape {list(shape)}: sizes are >= 0, with at most one -1",
                      reason="BAD_ATTRIBUTE", field="attrs.shape")
    known = math.prod(n for n in shape if n != -1)
    if -1 in shape:
        if known == 0 or x.size % known:
            raise OpError(f"cannot reshape {list(x.shape)} ({x.size} elements) into {list(shape)}",
                          reason="BAD_ATTRIBUTE", field="attrs.shape")
        return tuple(x.size // known if n == -1 else n for n in shape)
    if known != x.size:
        raise OpError(f"cannot reshape {list(x.shape)} ({x.size} elements) into {list(shape)} ({known} elements)",
                      reason="BAD_ATTRIBUTE", field="attrs.shape")
    return tuple(shape)


def _broadcast_target(x: TensorSpec, shape: Sequence[int]) -> tuple[int, ...]:
    fits = len(shape) >= len(x.shape) and all(
        n in (1, m) for n, m in zip(reversed(x.shape), reversed(shape))
    )
    if any(n < 0 for n in shape) or not fits:
        raise OpError(f"cannot broadcast shape {list(x.shape)} to {list(shape)}",
                      reason="BAD_ATTRIBUTE", field="attrs.shape")
    return tuple(shape)


# --- concat, stack ---------------------------------------------------------------------------

def _concat_infer(*xs: TensorSpec, axis: int = 0) -> TensorSpec:
    first = xs[0].shape
    if not first:
        raise OpError("cannot concatenate 0-d tensors (stack them instead)", reason="SHAPE_MISMATCH")
    ax = _axis(axis, len(first))
    for i, x in enumerate(xs[1:], 1):
        if len(x.shape) != len(first) or any(n != m for j, (n, m) in enumerate(zip(x.shape, first)) if j != ax):
            raise OpError(f"input {i} has shape {list(x.shape)}, which does not match input 0's "
                          f"{list(first)} outside axis {axis}", reason="SHAPE_MISMATCH")
    shape = first[:ax] + (sum(x.shape[ax] for x in xs),) + first[ax + 1:]
    return TensorSpec(shape, np.result_type(*(x.dtype for x in xs)))


def _concat_vjp(g, out, *xs, axis=0):
    ends = np.cumsum([np.shape(x)[axis] for x in xs[:-1]])
    return tuple(np.split(g, ends, axis=axis))


def _stack_infer(*xs: TensorSpec, axis: int = 0) -> TensorSpec:
    first = xs[0].shape
    ax = _axis(axis, len(first) + 1)
    for i, x in enumerate(xs[1:], 1):
        if x.shape != first:
            raise OpError(f"input {i} has shape {list(x.shape)}, input 0 has {list(first)}; stack needs equal shapes",
                          reason="SHAPE_MISMATCH")
    return TensorSpec(first[:ax] + (len(xs),) + first[ax:], np.result_type(*(x.dtype for x in xs)))


# --- slice -----------------------------------------------------------------------------------

def _index(ndim: int, starts, ends, axes=None, steps=None) -> tuple[slice, ...]:
    """The slice attributes as a numpy index: one ``slice`` per axis (whole axes where untouched)."""
    n = len(starts)
    for name, values in (("ends", ends), ("axes", axes), ("steps", steps)):
        if values is not None and len(values) != n:
            raise OpError(f"{name} has {len(values)} entries but starts has {n}", reason="BAD_ATTRIBUTE",
                          field=f"attrs.{name}")
    if axes is None:
        if n > ndim:
            raise OpError(f"starts has {n} entries for a tensor of rank {ndim}", reason="BAD_ATTRIBUTE",
                          field="attrs.starts")
        axes = range(n)
    steps = steps if steps is not None else (1,) * n
    index = [slice(None)] * ndim
    seen: set[int] = set()
    for a, start, end, step in zip(axes, starts, ends, steps):
        ax = normalize_axes((a,), ndim, field="attrs.axes")[0]
        if ax in seen:
            raise OpError(f"axis {a} is given twice", reason="BAD_ATTRIBUTE", field="attrs.axes")
        if step == 0:
            raise OpError(f"step for axis {a} is 0", reason="BAD_ATTRIBUTE", field="attrs.steps")
        seen.add(ax)
        index[ax] = slice(start, end, step)
    return tuple(index)


def _slice_infer(x: TensorSpec, **attrs: Any) -> TensorSpec:
    index = _index(len(x.shape), **attrs)
    return TensorSpec(tuple(len(range(*s.indices(n))) for s, n in zip(index, x.shape)), x.dtype)


def _slice_vjp(g, out, x, **attrs):
    dx = np.zeros(np.shape(x), g.dtype)
    dx[_index(np.ndim(x), **attrs)] = g
    return (dx,)


# --- squeeze, expand_dims ----------------------------------------------------------------------

def _squeezed(shape: tuple[int, ...], axis) -> tuple[int, ...]:
    if axis is None:
        return tuple(i for i, n in enumerate(shape) if n == 1)
    axes = normalize_axes(axis, len(shape))
    for a in axes:
        if shape[a] != 1:
            raise OpError(f"cannot squeeze axis {a} of size {shape[a]}", reason="BAD_ATTRIBUTE", field="attrs.axis")
    return axes


def _squeeze_infer(x: TensorSpec, *, axis=None) -> TensorSpec:
    axes = _squeezed(x.shape, axis)
    return TensorSpec(tuple(n for i, n in enumerate(x.shape) if i not in axes), x.dtype)


def _expand_dims_infer(x: TensorSpec, *, axis) -> TensorSpec:
    ndim = len(x.shape) + len(axis)
    if ndim > MAX_RANK:
        raise OpError(f"expand_dims would make {ndim} dimensions; at most {MAX_RANK} are supported",
                      reason="BAD_ATTRIBUTE", field="attrs.axis")
    axes = normalize_axes(axis, ndim)
    rest = iter(x.shape)
    return TensorSpec(tuple(1 if i in axes else next(rest) for i in range(ndim)), x.dtype)


# --- pad, tile ---------------------------------------------------------------------------------

def _pad_boxes(shape: tuple[int, ...], pads: Sequence[int]):
    """The pad attribute as ``(result shape, source box, destination box)``: the result is the pad
    value everywhere but ``result[destination] = x[source]`` (ONNX order: all begins, then all ends)."""
    ndim = len(shape)
    if len(pads) != 2 * ndim:
        raise OpError(f"pads has {len(pads)} entries; a tensor of rank {ndim} needs {2 * ndim} "
                      f"(all begins, then all ends)", reason="BAD_ATTRIBUTE", field="attrs.pads")
    result, source, destination = [], [], []
    for axis, (n, begin, end) in enumerate(zip(shape, pads[:ndim], pads[ndim:])):
        m = n + begin + end
        if m < 0:
            raise OpError(f"pads {begin} and {end} crop axis {axis} of size {n} to {m} elements",
                          reason="BAD_ATTRIBUTE", field="attrs.pads")
        start = max(0, -begin)
        kept = max(0, n + min(end, 0) - start)  # elements of x that survive the crops
        result.append(m)
        source.append(slice(start, start + kept))
        destination.append(slice(max(0, begin), max(0, begin) + kept))
    return tuple(result), tuple(source), tuple(destination)


def _pad(x, *, pads, value=0.0):
    shape, source, destination = _pad_boxes(np.shape(x), pads)
    x = np.asarray(x)
    out = np.full(shape, value, dtype=x.dtype)
    out[destination] = x[source]
    return out


def _pad_vjp(g, out, x, *, pads, value=0.0):
    _, source, destination = _pad_boxes(np.shape(x), pads)
    g = np.asarray(g)
    dx = np.zeros(np.shape(x), g.dtype)
    dx[source] = g[destination]
    return (dx,)


def _pad_infer(x: TensorSpec, *, pads, value=0.0) -> TensorSpec:
    shape, _, _ = _pad_boxes(x.shape, pads)
    if x.dtype.kind != "f" and any(n > 0 for n in pads):  # the value must fit the dtype, as ONNX's does
        fits = value in (0.0, 1.0) if x.dtype.kind == "b" else (
            float(value).is_integer() and np.iinfo(x.dtype).min <= value <= np.iinfo(x.dtype).max)
        if not fits:
            raise OpError(f"value {value} does not fit a {x.dtype.name} tensor (the padding takes the input's "
                          f"dtype)", reason="DTYPE_MISMATCH", field="attrs.value")
    return TensorSpec(shape, x.dtype)


def _tile_infer(x: TensorSpec, *, repeats) -> TensorSpec:
    if len(repeats) != len(x.shape):
        raise OpError(f"repeats has {len(repeats)} entries for a tensor of rank {len(x.shape)}",
                      reason="BAD_ATTRIBUTE", field="attrs.repeats")
    if any(r < 0 for r in repeats):
        raise OpError(f"repeats {list(repeats)}: a repeat count is >= 0", reason="BAD_ATTRIBUTE",
                      field="attrs.repeats")
    return TensorSpec(tuple(n * r for n, r in zip(x.shape, repeats)), x.dtype)


def _tile_vjp(g, out, x, *, repeats):
    shape = np.shape(x)
    split = [k for r, n in zip(repeats, shape) for k in (r, n)]  # tile i of axis a is out[i*n:(i+1)*n]
    return (np.sum(np.reshape(g, split), axis=tuple(range(0, 2 * len(shape), 2))),)


# --- cumsum, flip ------------------------------------------------------------------------------

def _cumsum(x, *, axis, exclusive=False, reverse=False):
    """ONNX CumSum: running sums along ``axis`` in the input's dtype, from the end with ``reverse``,
    each element left out of its own sum with ``exclusive``."""
    x = np.asarray(x)
    ax = _axis(axis, x.ndim)
    if reverse:
        x = np.flip(x, ax)
    out = np.cumsum(x, axis=ax, dtype=x.dtype)
    if out.dtype.kind in "iu" and out.size:
        _check_int_cumsum(x, ax, out.dtype)
    if exclusive:
        before = (slice(None),) * ax
        shifted = np.zeros_like(out)
        shifted[before + (slice(1, None),)] = out[before + (slice(None, -1),)]
        out = shifted
    return np.flip(out, ax) if reverse else out


def _check_int_cumsum(x: np.ndarray, ax: int, dtype: np.dtype) -> None:
    """Refuse integer running sums that leave the dtype's range (numpy wraps them silently), as sum
    does: a cheap bound first (length x max|x|), the exact sums with Python ints only past it."""
    info = np.iinfo(dtype)
    largest = max(abs(int(np.max(x))), abs(int(np.min(x))))
    if largest * x.shape[ax] <= info.max:
        return
    exact = np.cumsum(x.astype(object), axis=ax)
    if any(not info.min <= v <= info.max for v in exact.reshape(-1).tolist()):
        raise OpError(f"cumsum overflows {dtype} (its range is {info.min} to {info.max}): numpy would wrap it "
                      f"silently; use a float input", reason="OUT_OF_RANGE")


def _cumsum_vjp(g, out, x, *, axis, exclusive=False, reverse=False):
    """Each x[i] enters the sums the other way along the axis: the cumsum of g in reverse."""
    return (_cumsum(g, axis=axis, exclusive=exclusive, reverse=not reverse),)


def _cumsum_infer(x: TensorSpec, *, axis, exclusive=False, reverse=False) -> TensorSpec:
    _axis(axis, len(x.shape))
    if x.dtype == np.bool_:
        raise OpError("cumsum of a bool tensor; running sums need an int or float input",
                      reason="DTYPE_MISMATCH")
    return x


def _flip(x, *, axes=None):
    return np.flip(x, normalize_axes(axes, np.ndim(x), field="attrs.axes"))


def _flip_infer(x: TensorSpec, *, axes=None) -> TensorSpec:
    normalize_axes(axes, len(x.shape), field="attrs.axes")
    return x


# --- derivative helpers: the shape-moving vjps as operators of their own ----------------------------
#
# A symbolic vjp (docs/derivatives.md) may not know shapes statically (an input declared with -1
# sizes), so the gradients of reshape, squeeze, slice, concat and tile are operators that read the
# shape they restore from an input ``like`` whose values they never read. Each is linear in its
# first input, and the adjoint of one is the operator it undoes: their rules are one line each.

def _reshape_like_infer(x: TensorSpec, like: TensorSpec) -> TensorSpec:
    if x.size != like.size:
        raise OpError(f"cannot reshape {list(x.shape)} ({x.size} elements) into {list(like.shape)} "
                      f"({like.size} elements)", reason="SHAPE_MISMATCH")
    return TensorSpec(like.shape, x.dtype)


def _unslice(g, like, **attrs):
    """g written into zeros of like's shape (g's dtype) where slice(like, **attrs) reads."""
    dx = np.zeros(np.shape(like), np.asarray(g).dtype)
    dx[_index(np.ndim(like), **attrs)] = g
    return dx


def _unslice_infer(g: TensorSpec, like: TensorSpec, **attrs: Any) -> TensorSpec:
    cut = _slice_infer(like, **attrs).shape
    if tuple(g.shape) != cut:
        raise OpError(f"g has shape {list(g.shape)}; this slice of shape {list(like.shape)} has shape {list(cut)}",
                      reason="SHAPE_MISMATCH")
    return TensorSpec(like.shape, g.dtype)


def _untile_infer(g: TensorSpec, like: TensorSpec, *, repeats) -> TensorSpec:
    tiled = _tile_infer(like, repeats=repeats).shape
    if tuple(g.shape) != tiled:
        raise OpError(f"g has shape {list(g.shape)}; tiling shape {list(like.shape)} by {list(repeats)} gives "
                      f"{list(tiled)}", reason="SHAPE_MISMATCH")
    return TensorSpec(like.shape, g.dtype)


def _part_bounds(likes: Sequence[Any], part: int, axis: int) -> tuple[int, slice]:
    """(the axis, the range of it that input ``part`` of a concat of ``likes`` fills)."""
    ax = _axis(axis, len(np.shape(likes[0])))
    start = sum(np.shape(x)[ax] for x in likes[:part])
    return ax, slice(start, start + np.shape(likes[part])[ax])


def _concat_part(g, *likes, part, axis=0):
    ax, span = _part_bounds(likes, part, axis)
    return np.asarray(g)[(slice(None),) * ax + (span,)]


def _concat_part_vjp(h, out, g, *likes, part, axis=0):
    ax, span = _part_bounds(likes, part, axis)
    dg = np.zeros(np.shape(g), np.asarray(h).dtype)
    dg[(slice(None),) * ax + (span,)] = h
    return (dg,) + (None,) * len(likes)


def _concat_part_infer(g: TensorSpec, *likes: TensorSpec, part, axis=0) -> TensorSpec:
    if not likes:
        raise OpError("concat_part takes g, then the concatenated inputs (at least one)", reason="BAD_ARITY")
    if not 0 <= part < len(likes):
        raise OpError(f"part {part} is not one of the {len(likes)} concatenated inputs", reason="BAD_ATTRIBUTE",
                      field="attrs.part")
    joined = _concat_infer(*likes, axis=axis).shape
    if tuple(g.shape) != joined:
        raise OpError(f"g has shape {list(g.shape)}; the concatenation of the inputs has shape {list(joined)}",
                      reason="SHAPE_MISMATCH")
    return TensorSpec(likes[part].shape, g.dtype)


# --- symbolic rules (docs/derivatives.md) --------------------------------------------------------------

def _reshape_vjp_graph(b, g, out, x, **_):
    return (b.op("reshape_like", g, x),)


def _expand_dims_vjp_graph(b, g, out, x, *, axis):
    return (b.op("squeeze", g, axis=axis),)      # the same axes: both count them in the result's rank


def _broadcast_to_vjp_graph(b, g, out, x, *, shape):
    return (g,)                                  # the deriver sums it back to x (sum_to)


def _concat_vjp_graph(b, g, out, *xs, axis=0):
    if len(xs) == 1:
        return (g,)
    return tuple(b.op("concat_part", g, *xs, part=i, axis=axis) for i in range(len(xs)))


def _stack_vjp_graph(b, g, out, *xs, axis=0):
    return tuple(b.op("squeeze", b.op("slice", g, starts=(i,), ends=(i + 1,), axes=(axis,)), axis=(axis,))
                 for i in range(len(xs)))


def _slice_vjp_graph(b, g, out, x, **attrs):
    return (b.op("unslice", g, x, **attrs),)


def _pad_vjp_graph(b, g, out, x, *, pads, value=0.0):
    return (b.op("pad", g, pads=tuple(-p for p in pads)),)   # out[i] = x[i - begin]: the adjoint shifts back


def _pad_jvp_graph(b, tangents, out, x, *, pads, value=0.0):
    return b.op("pad", tangents[0], pads=pads)               # the padding is constant: its tangent is 0


def _tile_vjp_graph(b, g, out, x, *, repeats):
    return (b.op("untile", g, x, repeats=repeats),)


def _cumsum_vjp_graph(b, g, out, x, *, axis, exclusive=False, reverse=False):
    return (b.op("cumsum", g, axis=axis, exclusive=exclusive, reverse=not reverse),)


def _flip_vjp_graph(b, g, out, x, *, axes=None):
    return (b.op("flip", g, axes=axes),)


def _first_linear_jvp(name: str):
    """The jvp_graph of a helper linear in its first input whose other inputs give only shapes."""
    def jvp_graph(b, tangents, out, first, *rest, **attrs):
        return None if tangents[0] is None else b.op(name, tangents[0], *rest, **attrs)
    return jvp_graph


def _reshape_like_vjp_graph(b, h, out, x, like):
    return b.op("reshape_like", h, x), None


def _unslice_vjp_graph(b, h, out, g, like, **attrs):
    return b.op("slice", h, **attrs), None


def _untile_vjp_graph(b, h, out, g, like, *, repeats):
    return b.op("tile", h, repeats=repeats), None


def _concat_part_vjp_graph(b, h, out, g, *likes, part, axis=0):
    parts = [h if i == part else b.zeros_like(x) for i, x in enumerate(likes)]
    return (b.op("concat", *parts, axis=axis),) + (None,) * len(likes)


def _joined_jvp(name: str):
    """The jvp_graph of concat and stack: the operator on the tangents, zeros for an input without one
    (an int input too: it is a constant, whatever linear_jvp would pass)."""
    def jvp_graph(b, tangents, out, *xs, **attrs):
        return b.op(name, *(b.zeros_like(x) if t is None else t for t, x in zip(tangents, xs)), **attrs)
    return jvp_graph


# --- gradient-check samples ------------------------------------------------------------------

def _pick(rng: np.random.Generator, options: list) -> Any:
    return options[rng.integers(len(options))]


def _reshape_sample(rng):
    return [rng.standard_normal((2, 3, 4))], {"shape": _pick(rng, [(6, 4), (-1,), (4, -1, 2), (1, 24)])}


def _broadcast_sample(rng):
    source, target = _pick(rng, [((3, 1), (2, 3, 4)), ((), (2, 2)), ((1, 3), (1, 3)), ((4,), (2, 4))])
    return [np.asarray(rng.standard_normal(source))], {"shape": target}


def _concat_sample(rng):
    axis = _pick(rng, [0, 1, -1])
    shapes = [tuple(k if i == axis % 3 else n for i, n in enumerate((2, 3, 2))) for k in (1, 2, 3)]
    return [rng.standard_normal(s) for s in shapes[: rng.integers(1, 4)]], {"axis": axis}


def _stack_sample(rng):
    return [rng.standard_normal((2, 3)) for _ in range(rng.integers(1, 4))], {"axis": _pick(rng, [0, 1, -1, -3])}


def _slice_sample(rng):
    attrs = _pick(rng, [
        {"starts": (1,), "ends": (3,)},
        {"starts": (-3, 0), "ends": (100, 5), "axes": (2, 0), "steps": (2, 1)},
        {"starts": (3,), "ends": (-100,), "axes": (-1,), "steps": (-2,)},
        {"starts": (0, 1, 1), "ends": (4, 4, -1), "steps": (3, 2, 1)},
    ])
    return [rng.standard_normal((4, 5, 6))], attrs


def _squeeze_sample(rng):
    return [rng.standard_normal((2, 1, 3, 1))], _pick(rng, [{}, {"axis": (1,)}, {"axis": (-1, 1)}])


def _expand_dims_sample(rng):
    return [rng.standard_normal((2, 3))], {"axis": _pick(rng, [(0,), (-1,), (1, 3), (-4,)])}


def _pad_sample(rng):
    source, attrs = _pick(rng, [
        ((3,), {"pads": (1, 2)}),
        ((2, 3), {"pads": (0, 2, 1, 0), "value": 1.5}),
        ((2, 1, 3), {"pads": (1, 0, -1, 0, 2, -2), "value": -1.0}),  # crops, and a size-1 axis padded
        ((4, 3), {"pads": (-1, 0, -2, 3)}),
        ((2,), {"pads": (-3, 2), "value": 2.0}),                     # the crop eats into the end padding
        ((), {"pads": ()}),
    ])
    return [np.asarray(rng.standard_normal(source))], attrs


def _tile_sample(rng):
    source, repeats = _pick(rng, [((3,), (2,)), ((2, 1, 3), (1, 3, 2)), ((2, 3), (2, 1)), ((), ()), ((2, 2), (0, 2))])
    return [np.asarray(rng.standard_normal(source))], {"repeats": repeats}


def _cumsum_sample(rng):
    source, axis = _pick(rng, [((5,), 0), ((2, 3, 4), -1), ((2, 3, 4), 1), ((3, 4), -2), ((1, 4), 0), ((3, 1), -1)])
    attrs = {"axis": axis}
    attrs.update(_pick(rng, [{}, {"exclusive": True}, {"reverse": True}, {"exclusive": True, "reverse": True}]))
    return [rng.standard_normal(source)], attrs


def _flip_sample(rng):
    source, attrs = _pick(rng, [
        ((2, 3), {}), ((2, 3, 4), {"axes": (0, -1)}), ((1, 4), {"axes": (0,)}), ((), {}), ((3, 4), {"axes": ()}),
        ((5,), {"axes": (-1,)}),
    ])
    return [np.asarray(rng.standard_normal(source))], attrs


def _reshape_like_sample(rng):
    x, like = _pick(rng, [((2, 3, 4), (6, 4)), ((2, 3, 4), (24,)), ((6,), (3, 1, 2)), ((), (1, 1))])
    return [np.asarray(rng.standard_normal(x)), rng.standard_normal(like)], {}


def _unslice_sample(rng):
    [like], attrs = _slice_sample(rng)
    return [rng.standard_normal(_slice_infer(TensorSpec.of(like), **attrs).shape), like], attrs


def _untile_sample(rng):
    [like], attrs = _tile_sample(rng)
    return [rng.standard_normal(_tile_infer(TensorSpec.of(like), **attrs).shape), like], attrs


def _concat_part_sample(rng):
    likes, attrs = _concat_sample(rng)
    g = rng.standard_normal(_concat_infer(*map(TensorSpec.of, likes), **attrs).shape)
    return [g, *likes], {**attrs, "part": int(rng.integers(len(likes)))}


# --- the table -------------------------------------------------------------------------------

_SLICE_ATTRS = {"starts": Attr("ints", doc="first index per sliced axis (negative counts from the end)"),
                "ends": Attr("ints", doc="end index (exclusive) per sliced axis; clamped like numpy"),
                "axes": Attr("ints", None, "the sliced axes; none: the leading len(starts) axes"),
                "steps": Attr("ints", None, "step per sliced axis (negative walks backwards); none: 1s")}
_REPEATS = Attr("ints", doc="copies along each axis (one entry per axis, >= 0)")

OPERATORS: list[OpDef] = [
    # same elements, new shape
    OpDef("reshape", 1,
          lambda x, *, shape: np.reshape(x, shape), _reshape_back,
          lambda x, *, shape: TensorSpec(_target_shape(x, shape), x.dtype),
          attrs={"shape": Attr("ints", doc="the new shape; one entry may be -1 (inferred)")},
          doc="Same elements in a new shape (one size may be -1).", sample=_reshape_sample),
    OpDef("squeeze", 1,
          lambda x, *, axis=None: np.squeeze(x, axis=_squeezed(np.shape(x), axis)), _reshape_back, _squeeze_infer,
          attrs={"axis": Attr("ints", None, "size-1 axes to remove; none: all of them")},
          doc="Remove size-1 axes (all of them by default).", sample=_squeeze_sample),
    OpDef("expand_dims", 1,
          lambda x, *, axis: np.expand_dims(x, normalize_axes(axis, np.ndim(x) + len(axis))), _reshape_back,
          _expand_dims_infer,
          attrs={"axis": Attr("ints", doc="positions of the new size-1 axes in the result")},
          doc="Insert size-1 axes at the given positions of the result.", sample=_expand_dims_sample),

    # repeat along new or size-1 axes: the gradient sums over them
    OpDef("broadcast_to", 1,
          lambda x, *, shape: np.broadcast_to(x, shape),
          lambda g, out, x, *, shape: (unbroadcast(g, np.shape(x)),),
          lambda x, *, shape: TensorSpec(_broadcast_target(x, shape), x.dtype),
          attrs={"shape": Attr("ints", doc="the target shape")},
          doc="Repeat along new leading and size-1 axes to reach a shape (numpy rules).", sample=_broadcast_sample),

    # join: the gradient is split back
    OpDef("concat", VARIADIC,
          lambda *xs, axis=0: np.concatenate(xs, axis=axis), _concat_vjp, _concat_infer,
          attrs={"axis": Attr("int", 0, "the axis to join along (negative allowed)")},
          doc="Join inputs along an existing axis.", sample=_concat_sample),
    OpDef("stack", VARIADIC,
          lambda *xs, axis=0: np.stack(xs, axis=axis),
          lambda g, out, *xs, axis=0: tuple(np.moveaxis(g, axis, 0)),
          _stack_infer,
          attrs={"axis": Attr("int", 0, "position of the new axis in the result (negative allowed)")},
          doc="Join equal-shaped inputs along a new axis.", sample=_stack_sample),

    # select a box: the gradient is scattered into zeros
    OpDef("slice", 1,
          lambda x, **attrs: x[_index(np.ndim(x), **attrs)], _slice_vjp, _slice_infer,
          attrs=_SLICE_ATTRS,
          doc="x[start:end:step] along some axes, with numpy's negative indices and clamping.", sample=_slice_sample),

    # pad with a constant (negative pads crop), tile: the gradient is cut out, or summed over the tiles
    OpDef("pad", 1, _pad, _pad_vjp, _pad_infer,
          attrs={"pads": Attr("ints", doc="ONNX order: the begin of every axis, then the end of every axis; "
                                          "negative pads crop"),
                 "value": Attr("float", 0.0, "the constant the padding holds (inf and -inf too)", allow_nonfinite=True)},
          doc="Pad with a constant value, ONNX order (all begins, then all ends); negative pads crop.",
          sample=_pad_sample),
    OpDef("tile", 1,
          lambda x, *, repeats: np.tile(x, repeats), _tile_vjp, _tile_infer,
          attrs={"repeats": _REPEATS},
          doc="Repeat the whole tensor along each axis, as np.tile and ONNX Tile.", sample=_tile_sample),

    # running sums along an axis, and reversal: the gradient runs the other way
    OpDef("cumsum", 1, _cumsum, _cumsum_vjp, _cumsum_infer,
          attrs={"axis": Attr("int", doc="the axis to sum along (negative counts from the end)"),
                 "exclusive": Attr("bool", False, "leave each element out of its own sum (the first is 0)"),
                 "reverse": Attr("bool", False, "sum from the end of the axis")},
          doc="Running sums along an axis, ONNX CumSum (exclusive and reverse flags).", sample=_cumsum_sample,
          input_dtypes={"x": NUMBER_DTYPES}),
    OpDef("flip", 1, _flip,
          lambda g, out, x, *, axes=None: (_flip(g, axes=axes),), _flip_infer,
          attrs={"axes": Attr("ints", None, "the axes to reverse (negative allowed); none: all of them")},
          doc="Reverse the order of elements along some axes (all by default), as np.flip.", sample=_flip_sample),

    # derivative helpers: the gradients above as operators, shaped by an input whose values they never read
    OpDef("reshape_like", 2,
          lambda x, like: np.reshape(x, np.shape(like)),
          lambda g, out, x, like: (np.reshape(g, np.shape(x)), None),
          _reshape_like_infer, input_names=("x", "like"),
          doc="x reshaped to like's shape (like's values are not read): the gradient of reshape and squeeze.",
          sample=_reshape_like_sample),
    OpDef("unslice", 2, _unslice,
          lambda h, out, g, like, **attrs: (np.asarray(h)[_index(np.ndim(like), **attrs)], None),
          _unslice_infer, attrs=_SLICE_ATTRS, input_names=("g", "like"),
          doc="Zeros of like's shape with g where slice(like, ...) reads (like's values are not read): "
              "slice's gradient.", sample=_unslice_sample),
    OpDef("untile", 2,
          lambda g, like, *, repeats: _tile_vjp(g, None, like, repeats=repeats)[0],
          lambda h, out, g, like, *, repeats: (np.tile(h, repeats), None),
          _untile_infer, attrs={"repeats": _REPEATS}, input_names=("g", "like"),
          doc="g, a tiling of like's shape, summed over its tiles (like's values are not read): tile's gradient.",
          sample=_untile_sample),
    OpDef("concat_part", VARIADIC, _concat_part, _concat_part_vjp, _concat_part_infer,
          attrs={"part": Attr("int", doc="which of the concatenated inputs (0 for the first)"),
                 "axis": Attr("int", 0, "the axis they were joined along (negative allowed)")},
          input_names=("g_then_likes",),
          doc="concat_part(g, *likes): the part of g, a concatenation of values shaped like the likes, that "
              "likes[part] fills (the likes' values are not read): concat's gradient.", sample=_concat_part_sample),
]

SYMBOLIC = {
    #  name:          (vjp_graph,                  jvp_graph)
    "reshape":        (_reshape_vjp_graph,         linear_jvp("reshape")),
    "squeeze":        (_reshape_vjp_graph,         linear_jvp("squeeze")),
    "expand_dims":    (_expand_dims_vjp_graph,     linear_jvp("expand_dims")),
    "broadcast_to":   (_broadcast_to_vjp_graph,    linear_jvp("broadcast_to")),
    "concat":         (_concat_vjp_graph,          _joined_jvp("concat")),
    "stack":          (_stack_vjp_graph,           _joined_jvp("stack")),
    "slice":          (_slice_vjp_graph,           linear_jvp("slice")),
    "pad":            (_pad_vjp_graph,             _pad_jvp_graph),
    "tile":           (_tile_vjp_graph,            linear_jvp("tile")),
    "cumsum":         (_cumsum_vjp_graph,          linear_jvp("cumsum")),
    "flip":           (_flip_vjp_graph,            linear_jvp("flip")),
    # the derivative helpers: each one's adjoint is the operator it undoes
    "reshape_like":   (_reshape_like_vjp_graph,    _first_linear_jvp("reshape_like")),
    "unslice":        (_unslice_vjp_graph,         _first_linear_jvp("unslice")),
    "untile":         (_untile_vjp_graph,          _first_linear_jvp("untile")),
    "concat_part":    (_concat_part_vjp_graph,     _first_linear_jvp("concat_part")),
}

OPERATORS = with_symbolic(OPERATORS, SYMBOLIC)

register_operators = table_hookimpl(OPERATORS)
