"""Shape: reshape, broadcast_to, concat, stack, slice, squeeze, expand_dims.

These move values without changing them, so their vjp rules move the
gradient back: reshape it, sum it (broadcast_to), split it (concat, stack) or
scatter it into zeros (slice). Forward results are numpy views where numpy
gives views; no rule writes into a value it did not create.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from chainrule.core import VARIADIC, Attr, OpDef, OpError, TensorSpec, unbroadcast
from chainrule.core.tensor_spec import MAX_RANK
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


# --- the table -------------------------------------------------------------------------------

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
          attrs={"starts": Attr("ints", doc="first index per sliced axis (negative counts from the end)"),
                 "ends": Attr("ints", doc="end index (exclusive) per sliced axis; clamped like numpy"),
                 "axes": Attr("ints", None, "the sliced axes; none: the leading len(starts) axes"),
                 "steps": Attr("ints", None, "step per sliced axis (negative walks backwards); none: 1s")},
          doc="x[start:end:step] along some axes, with numpy's negative indices and clamping.", sample=_slice_sample),
]

register_operators = table_hookimpl(OPERATORS)
