"""Indexing: gather (np.take along an axis) and one_hot.

gather(x, indices, axis=0) is ``np.take(x, indices, axis=axis)``: the result has
shape ``x.shape[:axis] + indices.shape + x.shape[axis + 1:]``. Indices are int32
or int64 (DTYPE_MISMATCH otherwise) and get no gradient; negative ones count
from the end, as in numpy. An index outside ``-n .. n - 1`` is refused with
reason OUT_OF_RANGE, naming the index and its position. infer sees only the
indices' shape and dtype, never their values (not even those of a const node:
a const's value is an attribute of the const node, and infer rules receive
TensorSpecs), so that check happens in gather's forward rule, before the take,
when the forward pass reaches the node; the engine names the node in the
error (INVALID_ARGUMENT).

gather's gradient adds g back at the indices, so a repeated index receives
the sum of its rows. With one element per index (a 1-D x) it is ``np.add.at``
as it is; with rows (or along an inner axis) it is ``np.add.at`` on the
flattened gradient buffer with flat element indices, built in chunks of at
most SCATTER_CHUNK elements. Measured on 1e6 random indices, negatives
included (numpy 2.4.6, 2 cores, best of 5), against np.bincount (negatives
wrapped first; flat element indices for rows) and a sort-based segment sum
(argsort + np.add.reduceat); the alternatives on rows were timed on
non-negative indices, which spares them the wrap (about 3 ms):

=======================  ============  ==============  ===========  =========
x                        chosen        add.at on rows  bincount     sort
=======================  ============  ==============  ===========  =========
[1000] float64           4.2 ms        (the same)      8.3 ms       81 ms
[1000000] float64        5.1 ms        (the same)      7.2 ms       104 ms
[1000, 8] float64        34 ms         86 ms           30 ms        155 ms
[50000, 16] float32      58 ms         171 ms          70-87 ms     189 ms
[1000, 64] float32       145 ms        745 ms          241 ms       632 ms
=======================  ============  ==============  ===========  =========

bincount ties only on short float64 rows, sums in float64 (a float32 gradient
would need a cast back) and needs its flat indices and float64 weights whole,
8 + 8 bytes per element of g; the chunked add.at keeps float32 in float32
and its index memory bounded.

one_hot(indices, depth, dtype="float64") follows ONNX OneHot with axis -1:
the result has shape ``indices.shape + (depth,)``, 1 at the index and 0
elsewhere; negative indices count from the end (-depth .. -1) and an index
out of range gives a row of zeros, not an error. dtype is one of float64,
float32, int64, int32, bool. The indices get no gradient.

Derivatives as graphs (docs/derivatives.md): gather's ``vjp_graph`` is
``scatter_add(zeros_like(x), indices, g)`` and its ``jvp_graph`` gather of the
tangent. scatter_add (x plus updates added at the indices, gather's adjoint)
is an operator of this table with rules of its own (its vjp gathers), and so
is one_hot_like (one_hot with the depth and dtype of another value's last
axis), which cross_entropy's derivative uses. one_hot has no derivative.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from chainrule.core import Attr, OpDef, OpError, TensorSpec
from chainrule.core.dtypes import FLOAT_DTYPES, INT_DTYPES, is_differentiable
from chainrule.core.symbolic import linear_jvp, no_jvp_graph, no_vjp_graph, with_symbolic
from chainrule.plugins.authoring import table_hookimpl

from .common import normalize_axes

#: Elements of flat indices built at a time by gather's vjp (about 512 KiB of int64).
SCATTER_CHUNK = 1 << 16

_ONE_HOT_DTYPES = ("float64", "float32", "int64", "int32", "bool")


def _check_indices(indices: TensorSpec, what: str) -> None:
    if indices.dtype not in (np.dtype(np.int32), np.dtype(np.int64)):
        raise OpError(f"{what} indices must be int32 or int64, got {indices.dtype.name}", reason="DTYPE_MISMATCH")


# --- gather ----------------------------------------------------------------------------------

def _gather_infer(x: TensorSpec, indices: TensorSpec, *, axis: int = 0) -> TensorSpec:
    _check_indices(indices, "gather")
    if not x.shape:
        raise OpError("gather needs an axis to index; a 0-d tensor has none", reason="SHAPE_MISMATCH")
    (a,) = normalize_axes((axis,), len(x.shape))
    return TensorSpec(x.shape[:a] + tuple(indices.shape) + x.shape[a + 1:], x.dtype)


def _in_range(indices: np.ndarray, n: int) -> None:
    """OpError naming the first index outside -n .. n - 1 (two fast reductions when all are fine)."""
    if indices.size == 0 or (n > 0 and indices.min() >= -n and indices.max() < n):
        return
    bad = (indices < -n) | (indices >= n)
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    at = f" at position {where}" if where else ""
    valid = f"-{n}..{n - 1}" if n else "none: the axis is empty"
    raise OpError(f"index {int(indices[where])}{at} is out of range for an axis of size {n} (valid: {valid})",
                  reason="OUT_OF_RANGE")


def _gather(x, indices, *, axis=0):
    x, indices = np.asarray(x), np.asarray(indices)
    (a,) = normalize_axes((axis,), x.ndim)
    _in_range(indices, x.shape[a])
    return np.take(x, indices, axis=a)


def _gather_vjp(g, out, x, indices, *, axis=0):
    """g added back at the indices: np.add.at on the flat buffer, repeated indices summed."""
    x, indices, g = np.asarray(x), np.asarray(indices), np.asarray(g)
    (a,) = normalize_axes((axis,), x.ndim)
    n = x.shape[a]
    before, after = int(np.prod(x.shape[:a])), int(np.prod(x.shape[a + 1:]))
    m = indices.size
    rows = indices.reshape(-1)
    dx = np.zeros(x.size, dtype=g.dtype)
    if dx.size and m:
        if before == 1 and after == 1:                      # one element per index: np.add.at as it is
            np.add.at(dx, rows, g.reshape(-1))              # (negative indices count from the end there too)
        else:
            # flat position of (p, i, q) in dx: p * n * after + rows[i] * after + q
            parts = g.reshape(before, m, after)
            base = (np.arange(before, dtype=np.intp) * (n * after))[:, None, None] + np.arange(after, dtype=np.intp)
            step = max(1, SCATTER_CHUNK // (before * after))
            for start in range(0, m, step):
                chunk = rows[start:start + step].astype(np.intp)
                chunk[chunk < 0] += n
                flat = base + (chunk * after)[None, :, None]
                np.add.at(dx, flat.reshape(-1), parts[:, start:start + step, :].reshape(-1))
    return dx.reshape(x.shape), None


def _gather_sample(rng: np.random.Generator):
    """Repeated and negative indices, along each axis."""
    x = rng.standard_normal((4, 3))
    axis = int(rng.choice([0, 1, -1]))
    n = x.shape[axis]
    shape = [(), (5,), (2, 3)][rng.integers(3)]
    indices = rng.integers(-n, n, shape).astype([np.int64, np.int32][rng.integers(2)])
    return [x, indices], {"axis": axis}


# --- one_hot ---------------------------------------------------------------------------------

def _one_hot_dtype(dtype: str) -> np.dtype:
    if dtype not in _ONE_HOT_DTYPES:
        raise OpError(f"dtype {dtype!r} is not one of {', '.join(_ONE_HOT_DTYPES)}",
                      reason="BAD_ATTRIBUTE", field="attrs.dtype")
    return np.dtype(dtype)


def _one_hot_infer(indices: TensorSpec, *, depth: int, dtype: str = "float64") -> TensorSpec:
    _check_indices(indices, "one_hot")
    if depth < 0:
        raise OpError(f"depth must be >= 0, got {depth}", reason="BAD_ATTRIBUTE", field="attrs.depth")
    return TensorSpec(tuple(indices.shape) + (depth,), _one_hot_dtype(dtype))


def _one_hot(indices, *, depth, dtype="float64"):
    indices = np.asarray(indices)
    out = np.zeros(indices.shape + (depth,), dtype=_one_hot_dtype(dtype))
    if out.size == 0:
        return out
    hot = indices.reshape(-1).astype(np.int64, copy=True)
    hot[hot < 0] += depth                                   # ONNX: negative indices count from the end
    rows = np.flatnonzero((hot >= 0) & (hot < depth))       # out of range: a row of zeros
    out.reshape(-1, depth)[rows, hot[rows]] = 1
    return out


def _one_hot_sample(rng: np.random.Generator):
    return [rng.integers(-5, 5, (2, 3))], {"depth": 4, "dtype": ["float64", "float32"][rng.integers(2)]}


# --- derivative helpers: scatter_add (gather's gradient), one_hot_like --------------------------------

def _scatter_add_infer(x: TensorSpec, indices: TensorSpec, updates: TensorSpec, *, axis: int = 0) -> TensorSpec:
    taken = _gather_infer(x, indices, axis=axis).shape
    if tuple(updates.shape) != taken:
        raise OpError(f"updates have shape {list(updates.shape)}; gather(x, indices) of x {list(x.shape)} and "
                      f"indices {list(indices.shape)} along axis {axis} has shape {list(taken)}",
                      reason="SHAPE_MISMATCH")
    for name, spec in (("x", x), ("updates", updates)):
        if not is_differentiable(spec.dtype):
            raise OpError(f"scatter_add adds gradients: {name} must be float32 or float64, got {spec.dtype.name}",
                          reason="DTYPE_MISMATCH")
    return x


def _scatter_add(x, indices, updates, *, axis=0):
    """x with updates added at the indices along axis (repeated indices add up): gather's adjoint."""
    x = np.asarray(x)
    (a,) = normalize_axes((axis,), x.ndim)
    _in_range(np.asarray(indices), x.shape[a])
    out = _gather_vjp(np.asarray(updates, dtype=x.dtype), None, x, indices, axis=axis)[0]
    out += x
    return out


def _scatter_add_vjp(g, out, x, indices, updates, *, axis=0):
    return g, None, _gather(g, indices, axis=axis)


def _one_hot_like_infer(indices: TensorSpec, like: TensorSpec) -> TensorSpec:
    _check_indices(indices, "one_hot_like")
    if not like.shape:
        raise OpError("like needs a last axis (the classes); a 0-d like has none", reason="SHAPE_MISMATCH")
    return TensorSpec(tuple(indices.shape) + (like.shape[-1],), like.dtype)


def _one_hot_like(indices, like):
    return _one_hot(indices, depth=np.shape(like)[-1], dtype=np.asarray(like).dtype.name)


def _scatter_add_sample(rng: np.random.Generator):
    [x, indices], attrs = _gather_sample(rng)
    return [rng.standard_normal(x.shape), indices, np.take(rng.standard_normal(x.shape), indices, attrs["axis"])], attrs


def _one_hot_like_sample(rng: np.random.Generator):
    like = rng.standard_normal([(4,), (2, 3), (3, 1, 5)][rng.integers(3)])
    return [rng.integers(-like.shape[-1], like.shape[-1], [(), (3,), (2, 2)][rng.integers(3)]), like], {}


# --- symbolic rules (docs/derivatives.md) --------------------------------------------------------------

def _gather_vjp_graph(b, g, out, x, indices, *, axis=0):
    return b.op("scatter_add", b.zeros_like(x), indices, g, axis=axis), None


def _scatter_add_vjp_graph(b, g, out, x, indices, updates, *, axis=0):
    return g, None, b.op("gather", g, indices, axis=axis)


# --- the table -------------------------------------------------------------------------------

def _no_gradient(g: Any, out: Any, indices: Any, **_: Any) -> tuple[None]:
    return (None,)


OPERATORS: list[OpDef] = [
    OpDef("gather", 2, _gather, _gather_vjp, _gather_infer,
          attrs={"axis": Attr("int", 0, "the axis to index (negative counts from the end)")},
          doc="np.take(x, indices, axis): int indices, negative from the end; repeated indices sum their gradients.",
          sample=_gather_sample, input_dtypes={"indices": INT_DTYPES}),
    OpDef("one_hot", 1, _one_hot, _no_gradient, _one_hot_infer,
          attrs={"depth": Attr("int", doc="the number of classes: the length of the new last axis"),
                 "dtype": Attr("string", "float64", "float64, float32, int64, int32 or bool")},
          doc="One-hot rows of length depth on a new last axis (ONNX OneHot); out-of-range indices give zeros.",
          sample=_one_hot_sample, input_dtypes={"indices": INT_DTYPES}),

    # derivative helpers: gather's gradient, and one_hot of a depth read from another value's shape
    OpDef("scatter_add", 3, _scatter_add, _scatter_add_vjp, _scatter_add_infer,
          attrs={"axis": Attr("int", 0, "the axis the indices index (negative counts from the end)")},
          doc="x with updates added at the indices along axis, repeated indices adding up (gather's adjoint: "
              "updates have the shape of gather(x, indices, axis)).",
          sample=_scatter_add_sample, input_names=("x", "indices", "updates"),
          input_dtypes={"x": FLOAT_DTYPES, "indices": INT_DTYPES, "updates": FLOAT_DTYPES}),
    OpDef("one_hot_like", 2, _one_hot_like, lambda g, out, indices, like: (None, None), _one_hot_like_infer,
          doc="one_hot(indices) with depth like's last axis, in like's dtype (like's values are not read); "
              "no gradient.", sample=_one_hot_like_sample, input_names=("indices", "like"),
          input_dtypes={"indices": INT_DTYPES}),
]

SYMBOLIC = {
    #  name:          (vjp_graph,                  jvp_graph)
    "gather":         (_gather_vjp_graph,          linear_jvp("gather")),
    "one_hot":        (no_vjp_graph,               no_jvp_graph),
    "scatter_add":    (_scatter_add_vjp_graph,     linear_jvp("scatter_add")),
    "one_hot_like":   (no_vjp_graph,               no_jvp_graph),
}

OPERATORS = with_symbolic(OPERATORS, SYMBOLIC)

register_operators = table_hookimpl(OPERATORS)
