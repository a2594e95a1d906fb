"""Reductions: sum, mean, max, logsumexp over some axes (``axis``) or all of them.

``axis`` is a list of ints (negative counts from the end; None, the default,
means every axis) and ``keepdims`` keeps the reduced axes with size 1, as in
numpy. The vjp rules put the reduced axes back and spread the gradient over
them into a fresh array of the input's shape.

max routes the gradient to the maxima; when several elements tie for the
maximum they split it evenly (``[1, 3, 3]`` gives ``[0, 0.5, 0.5]``).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from chainrule.core import Attr, OpDef, OpError, TensorSpec
from chainrule.core.dtypes import float_result
from chainrule.plugins.authoring import table_hookimpl

from .common import logsumexp, normalize_axes, writable


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
    return np.sum(x, axis=normalize_axes(axis, np.ndim(x)), keepdims=keepdims)


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


# --- the table -------------------------------------------------------------------------------

_AXIS = Attr("ints", None, "axes to reduce (negative counts from the end); none: all axes")
_KEEPDIMS = Attr("bool", False, "keep the reduced axes with size 1")
_ATTRS = {"axis": _AXIS, "keepdims": _KEEPDIMS}

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
    OpDef("logsumexp", 1, logsumexp, _logsumexp_vjp,
          lambda x, *, axis=None, keepdims=False: _reduced_spec(x, axis, keepdims, float_result(x.dtype), nonempty="logsumexp"),
          attrs=_ATTRS, doc="log(sum(exp(x))) over axes, computed without overflow.", sample=_sample),
]

register_operators = table_hookimpl(OPERATORS)
