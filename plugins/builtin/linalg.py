"""Linear algebra: matmul with numpy's batching rules, and transpose.

matmul follows ``np.matmul``: a 1-D first input is a row vector and a 1-D
second input a column vector (the added axis is dropped from the result), and
leading "batch" axes broadcast. Its vjp promotes 1-D inputs to 2-D, computes
``g @ bᵀ`` and ``aᵀ @ g``, and drops the added axis again; gradients keep the
broadcast batch axes, which the engine sums back to each input's shape.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from chainrule.core import Attr, OpDef, OpError, TensorSpec, broadcast_shapes
from chainrule.plugins.authoring import table_hookimpl


# --- matmul ----------------------------------------------------------------------------------

def _matmul_infer(a: TensorSpec, b: TensorSpec) -> TensorSpec:
    if not a.shape or not b.shape:
        raise OpError(f"matmul needs inputs with at least one axis, got shapes {a.shape} and {b.shape}",
                      reason="SHAPE_MISMATCH")
    inner_a = a.shape[-1]
    inner_b = b.shape[-2] if len(b.shape) > 1 else b.shape[0]
    if inner_a != inner_b:
        raise OpError(f"inner dimensions {inner_a} and {inner_b} do not match (shapes {a.shape} and {b.shape})",
                      reason="SHAPE_MISMATCH")
    try:
        batch = broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except OpError:
        raise OpError(f"batch dimensions {a.shape[:-2]} and {b.shape[:-2]} cannot be broadcast together "
                      f"(shapes {a.shape} and {b.shape})", reason="SHAPE_MISMATCH") from None
    rows = a.shape[-2:-1]                          # () for a 1-D first input
    cols = b.shape[-1:] if len(b.shape) > 1 else ()  # () for a 1-D second input
    return TensorSpec(batch + rows + cols, np.result_type(a.dtype, b.dtype))


def _matmul_vjp(g, out, a, b, *, needs=(True, True)):
    """``g @ bᵀ`` and ``aᵀ @ g``; ``needs`` (from the engine) skips a product nobody wants, e.g. for a data batch."""
    if a.ndim == 1 and b.ndim == 1:                 # vector · vector: out is a scalar
        return (g * b if needs[0] else None), (g * a if needs[1] else None)
    a2 = a[np.newaxis, :] if a.ndim == 1 else a     # row vector (1, k)
    b2 = b[:, np.newaxis] if b.ndim == 1 else b     # column vector (k, 1)
    g2 = np.expand_dims(g, -2) if a.ndim == 1 else g
    g2 = np.expand_dims(g2, -1) if b.ndim == 1 else g2
    da = db = None
    if needs[0]:
        da = np.matmul(g2, np.swapaxes(b2, -1, -2))
        da = da[..., 0, :] if a.ndim == 1 else da   # drop the added row axis
    if needs[1] and b.ndim == 2 and a.ndim > 2:    # a batch times one matrix (a dense layer): one product
        db = np.matmul(a.reshape(-1, a.shape[-1]).T, g.reshape(-1, g.shape[-1]))  # no (batch, k, n) temporary
    elif needs[1]:
        db = np.matmul(np.swapaxes(a2, -1, -2), g2)
        db = db[..., 0] if b.ndim == 1 else db      # drop the added column axis
    return da, db


def _matmul_sample(rng: np.random.Generator):
    shapes = [((3,), (3,)), ((2, 3), (3,)), ((3,), (3, 2)), ((2, 3), (3, 4)),
              ((2, 2, 3), (3, 2)), ((3,), (2, 3, 2)), ((2, 1, 2, 3), (3, 3, 2))]
    a, b = shapes[rng.integers(len(shapes))]
    return [rng.standard_normal(a), rng.standard_normal(b)], {}


# --- transpose -------------------------------------------------------------------------------

def _permutation(ndim: int, axes: tuple[int, ...] | None) -> tuple[int, ...]:
    if axes is None:
        return tuple(reversed(range(ndim)))
    perm = tuple(a + ndim if a < 0 else a for a in axes)
    if sorted(perm) != list(range(ndim)):
        raise OpError(f"axes {list(axes)} are not a permutation of the {ndim} axes of the input",
                      reason="BAD_ATTRIBUTE", field="attrs.axes")
    return perm


def _transpose_infer(x: TensorSpec, *, axes: Any = None) -> TensorSpec:
    perm = _permutation(len(x.shape), axes)
    return TensorSpec(tuple(x.shape[p] for p in perm), x.dtype)


def _transpose_sample(rng: np.random.Generator):
    axes = [None, (1, 0, 2), (2, 0, 1), (-1, 0, 1)][rng.integers(4)]
    return [rng.standard_normal((2, 3, 4))], {"axes": axes}


# --- the table -------------------------------------------------------------------------------

OPERATORS: list[OpDef] = [
    OpDef("matmul", 2, np.matmul, _matmul_vjp, _matmul_infer,
          doc="Matrix product with numpy's rules: 1-D vectors, broadcast batch axes.", sample=_matmul_sample,
          selective_vjp=True),
    OpDef("transpose", 1,
          lambda x, *, axes=None: np.transpose(x, _permutation(np.ndim(x), axes)),
          lambda g, out, x, *, axes=None: (np.transpose(g, np.argsort(_permutation(np.ndim(x), axes))),),
          _transpose_infer,
          attrs={"axes": Attr("ints", None, "the new order of the axes (negative allowed); none: reversed")},
          doc="Permute the axes (reverse them by default).", sample=_transpose_sample),
]

register_operators = table_hookimpl(OPERATORS)
