"""Numeric helpers the built-in families share. Not a family: it registers no operators.

Every family module imports its helpers from here (and from ``chainrule.core`` and
``chainrule.plugins.authoring``), never from another family, so each table can be
read, loaded or left out on its own.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from chainrule.core import OpError
from chainrule.core.tensor_spec import MAX_RANK


# --- dtypes and buffers ----------------------------------------------------------------------

def as_float(x: Any) -> np.ndarray:
    """``x`` itself when it is float, else ``x`` as float64 (int and bool inputs of float functions)."""
    return x if x.dtype.kind == "f" else x.astype(np.float64)


def writable(value: Any) -> np.ndarray:
    """A fresh ufunc result as an array that in-place ufuncs (``out=``) may write into.

    numpy hands back a scalar instead of a 0-d array; this wraps it. Only pass
    results the caller owns, never an input.
    """
    return value if type(value) is np.ndarray else np.array(value)


# --- shapes and axes -------------------------------------------------------------------------

def normalize_axes(axis: Sequence[int] | None, ndim: int, *, field: str = "attrs.axis") -> tuple[int, ...]:
    """The ``axis`` attribute as sorted non-negative axes (None: all of them).

    Raises OpError naming the axis and the rank when an axis is out of range or repeated.
    """
    if axis is None:
        return tuple(range(ndim))
    if len(axis) > MAX_RANK:  # some axis repeats or is out of range; said before any long scan
        raise OpError(f"{len(axis)} axes given; a tensor has at most {MAX_RANK}", reason="BAD_ATTRIBUTE", field=field)
    axes: set[int] = set()
    for a in axis:
        if not -ndim <= a < ndim:
            raise OpError(f"axis {a} is out of range for a tensor of rank {ndim}", reason="BAD_ATTRIBUTE", field=field)
        if a % ndim in axes:
            raise OpError(f"axis {a} is given twice (rank {ndim})", reason="BAD_ATTRIBUTE", field=field)
        axes.add(a % ndim)
    return tuple(sorted(axes))


# --- reductions ------------------------------------------------------------------------------

def logsumexp(x: Any, *, axis: Sequence[int] | None = None, keepdims: bool = False) -> np.ndarray:
    """log(sum(exp(x))) over ``axis``, shifted by the maximum so that exp never overflows."""
    x = as_float(x)
    axes = normalize_axes(axis, x.ndim)
    top = np.max(x, axis=axes, keepdims=True)
    top = np.where(np.isfinite(top), top, 0)  # all -inf (or an inf): no shift, the log gives -inf (inf)
    e = writable(x - top)
    np.exp(e, out=e)
    s = writable(np.sum(e, axis=axes, keepdims=True))
    np.log(s, out=s)
    s += top
    return s if keepdims else np.squeeze(s, axis=axes)

