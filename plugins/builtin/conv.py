"""Convolution and pooling on NCW and NCHW tensors (ONNX Conv, MaxPool, AveragePool).

``x`` is ``[N, C, W]`` or ``[N, C, H, W]``; a 1-D input is handled as a 2-D one
with ``H = 1`` (a view, no copy). The attributes follow ONNX: ``strides`` and
``dilations`` have one entry per spatial axis (default all 1), ``pads`` all the
begins then all the ends (default all 0), ``group`` splits the channels.
Output size per spatial axis: ``(size + begin + end - dilation * (kernel - 1) - 1) // stride + 1``.

How the rules compute (all with numpy and BLAS, no Python loop over pixels):

* conv forward: im2col. The padded input is viewed (``as_strided``, no copy) as
  ``[n, C, KH, KW, OH, OW]`` windows; one copy makes the columns contiguous, and
  one batched matmul ``w[G, M/G, C/G*KH*KW] @ cols[n, G, C/G*KH*KW, OH*OW]`` writes
  the output directly in NCHW order (no transpose afterwards). The batch runs in
  chunks of samples whose columns fit in ``WORKSPACE_BYTES``, through one reused
  buffer: the workspace is bounded (shape inference counts the output, not the
  columns) and stays in cache between the copy and the matmul.
* conv vjp for ``w``: the columns again (rebuilt chunk by chunk, not kept from
  forward: a conv holds no hidden buffers between the passes), then
  ``g @ colsᵀ`` per sample, summed over the batch.
* conv vjp for ``x``: the transposed convolution. ``wᵀ @ g`` gives the columns'
  gradient, which col2im scatters back by one strided ``+=`` per kernel offset
  (KH*KW vectorised adds, faster than ``np.add.at``), each clipped to the
  unpadded input, so nothing is cropped; for a stride-1 "same" convolution each
  offset is a constant shift of the flattened H*W axis and its add one long
  contiguous run. ``selective_vjp``: an input nobody needs is skipped, and
  without ``w``'s gradient no columns are built at all.
* max_pool: the padding is ``-inf`` (it never wins); forward is a running
  ``np.maximum`` over the kernel offsets. Its vjp finds, offset by offset in
  row-major window order, the first position holding the maximum (a strict
  ``>`` keeps the earliest on ties) and routes ``g`` there.
* avg_pool: separable box sums (KW strided adds along W, then KH along H),
  divided by the kernel size or, with ``count_include_pad=False`` (the
  default), by the number of real (unpadded) elements in each window; its vjp
  spreads ``g / count`` back the same separable way.

Integer and bool inputs give float64, float32 stays float32.

Derivatives as graphs (docs/derivatives.md): the gradients are operators of
this table too, with the rules above as their forward rules: conv_grad_x and
conv_grad_w (conv's gradients for x and w), max_pool_grad (g routed to each
window's first maximum) and max_pool_pick (a value read there: max_pool's
jvp), avg_pool_grad. Each is linear in the value it moves, and the adjoint of
one is another of them, conv or avg_pool, so derivatives built from them
differentiate again; the positions of the maxima are piecewise constant in x,
which gets no gradient through them.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
from numpy.lib.stride_tricks import as_strided

from chainrule.core import Attr, OpDef, OpError, TensorSpec
from chainrule.core.dtypes import float_result
from chainrule.core.symbolic import linear_jvp, with_symbolic
from chainrule.plugins.authoring import table_hookimpl

from .common import MOVE_COST, block_operations, matmul_into, stop_check, stop_check_for, summed_matmul


# --- geometry: attributes checked once, the 1-D case as 2-D --------------------------------------

class _Geometry(NamedTuple):
    """One convolution or pooling window layout, always 2-D (a 1-D input has H = 1, KH = 1)."""

    spatial: int                       # 1 or 2: the caller's number of spatial axes
    size: tuple[int, int]              # H, W of the input
    kernel: tuple[int, int]            # KH, KW
    strides: tuple[int, int]
    dilations: tuple[int, int]
    pads: tuple[int, int, int, int]    # top, left, bottom, right
    out: tuple[int, int]               # OH, OW

    @property
    def padded(self) -> tuple[int, int]:
        return self.size[0] + self.pads[0] + self.pads[2], self.size[1] + self.pads[1] + self.pads[3]

    def out_shape(self, n: int, c: int) -> tuple[int, ...]:
        return (n, c) + (self.out if self.spatial == 2 else self.out[1:])

    def rows(self, kh: int) -> slice:
        """The padded input's rows that kernel row ``kh`` meets, one per output row."""
        start = kh * self.dilations[0]
        return slice(start, start + self.strides[0] * (self.out[0] - 1) + 1, self.strides[0])

    def cols(self, kw: int) -> slice:
        start = kw * self.dilations[1]
        return slice(start, start + self.strides[1] * (self.out[1] - 1) + 1, self.strides[1])

    def span(self, axis: int, k: int) -> tuple[slice, slice, bool] | None:
        """Where kernel offset ``k`` along ``axis`` meets the unpadded input: (output positions,
        input positions, whether those cover the whole input axis); None when only padding."""
        size, out, stride = self.size[axis], self.out[axis], self.strides[axis]
        shift = k * self.dilations[axis] - self.pads[axis]         # input index = o * stride + shift
        lo, hi = max(0, -(shift // stride)), min(out, (size - 1 - shift) // stride + 1)
        if hi <= lo:
            return None
        start = lo * stride + shift
        whole = hi - lo == size and (stride == 1 or size == 1)
        return slice(lo, hi), slice(start, start + (hi - lo - 1) * stride + 1, stride), whole


def _bad(message: str, name: str) -> OpError:
    return OpError(message, reason="BAD_ATTRIBUTE", field=f"attrs.{name}")


def _per_axis(name: str, value: tuple[int, ...] | None, k: int, default: int, minimum: int) -> tuple[int, ...]:
    """An ints attribute with one entry per spatial axis (``pads``: two), checked against ``minimum``."""
    count = 2 * k if name == "pads" else k
    if value is None:
        return (default,) * count
    if len(value) != count:
        layout = " (all begins, then all ends)" if name == "pads" else ""
        raise _bad(f"{name} has {len(value)} entries; the input has {k} spatial "
                   f"{'axis' if k == 1 else 'axes'}, so {name} needs {count}{layout}", name)
    if any(v < minimum for v in value):
        raise _bad(f"{name} must all be >= {minimum}, got {list(value)}", name)
    return tuple(value)


def _spatial_rank(x: tuple[int, ...], op: str) -> int:
    if len(x) not in (3, 4):
        raise OpError(f"{op} takes an NCW or NCHW input (rank 3 or 4), got shape {list(x)}", reason="SHAPE_MISMATCH")
    return len(x) - 2


@lru_cache(maxsize=1024)
def _geometry(x: tuple[int, ...], kernel: tuple[int, ...] | None, kernel_from: str, strides: Any, pads: Any,
              dilations: Any) -> _Geometry:
    """Check the attributes against an input shape ``x``; the output size per axis, or OpError.

    ``kernel_from`` names where the kernel comes from in messages: ``"kernel_shape"``
    (pools) or ``"w"`` (conv, whose kernel is w's spatial shape).
    """
    k = len(x) - 2
    strides = _per_axis("strides", strides, k, 1, 1)
    pads = _per_axis("pads", pads, k, 0, 0)
    dilations = _per_axis("dilations", dilations, k, 1, 1)
    if kernel_from == "kernel_shape":
        kernel = _per_axis("kernel_shape", kernel, k, 1, 1)
        for axis in range(k):
            if pads[axis] >= kernel[axis] or pads[axis + k] >= kernel[axis]:
                raise _bad(f"pads {list(pads)} must be smaller than kernel_shape {list(kernel)} along each axis "
                           f"(a window would hold padding only)", "pads")
    elif any(v < 1 for v in kernel):
        raise OpError(f"w has a kernel of size 0: spatial shape {list(kernel)}", reason="SHAPE_MISMATCH")
    out = []
    for axis in range(k):
        size, padded = x[2 + axis], x[2 + axis] + pads[axis] + pads[axis + k]
        extent = dilations[axis] * (kernel[axis] - 1) + 1
        if extent > padded:
            what = f"{kernel_from} {kernel[axis]}" + (f" dilated by {dilations[axis]}" if dilations[axis] > 1 else "")
            raise OpError(f"the kernel ({what}: extent {extent}) is larger than the padded input along spatial axis "
                          f"{axis} ({size} + pads {pads[axis]} + {pads[axis + k]} = {padded}); input shape {list(x)}",
                          reason="SHAPE_MISMATCH")
        out.append((padded - extent) // strides[axis] + 1)
    if k == 1:
        return _Geometry(1, (1, x[2]), (1, kernel[0]), (1, strides[0]), (1, dilations[0]),
                         (0, pads[0], 0, pads[1]), (1, out[0]))
    return _Geometry(2, (x[2], x[3]), tuple(kernel), strides, dilations,  # type: ignore[arg-type]
                     (pads[0], pads[1], pads[2], pads[3]), (out[0], out[1]))


def _ints(value: Any) -> tuple[int, ...] | None:
    """An ints attribute as a tuple (hashable, for the geometry cache); None stays None."""
    return None if value is None else tuple(int(v) for v in value)


def _as_2d(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """x in the compute dtype, NCW viewed as NC1W (no copy)."""
    x = np.asarray(x).astype(dtype, copy=False)
    return x[:, :, np.newaxis, :] if x.ndim == 3 else x


def _padded(x: np.ndarray, geo: _Geometry, fill: float) -> np.ndarray:
    """x [N, C, H, W] padded with ``fill``: x itself without pads, else a new array (only the border is filled)."""
    top, left, bottom, right = geo.pads
    if not (top or left or bottom or right):
        return x
    n, c, h, w = x.shape
    xp = np.empty((n, c, h + top + bottom, w + left + right), x.dtype)
    xp[:, :, :top] = fill
    xp[:, :, top + h:] = fill
    xp[:, :, top:top + h, :left] = fill
    xp[:, :, top:top + h, left + w:] = fill
    xp[:, :, top:top + h, left:left + w] = x
    return xp


def _cropped(dxp: np.ndarray, geo: _Geometry, spatial: int) -> np.ndarray:
    """The gradient of the padded input, cut back to the input (and to NCW for a 1-D input)."""
    top, left = geo.pads[0], geo.pads[1]
    h, w = geo.size
    dx = dxp[:, :, top:top + h, left:left + w]
    return dx[:, :, 0, :] if spatial == 1 else dx


# --- conv ------------------------------------------------------------------------------------------

def _conv_check(x: tuple[int, ...], w: tuple[int, ...], strides, pads, dilations, group: int) -> _Geometry:
    k = _spatial_rank(x, "conv")
    if len(w) != len(x):
        raise OpError(f"w of shape {list(w)} must have the rank of x {list(x)}: [M, C/group"
                      f"{', KW' if k == 1 else ', KH, KW'}]", reason="SHAPE_MISMATCH")
    if group < 1:
        raise _bad(f"group must be >= 1, got {group}", "group")
    channels, maps = x[1], w[0]
    if channels % group:
        raise _bad(f"the {channels} input channels of x {list(x)} are not divisible by group {group}", "group")
    if maps % group:
        raise _bad(f"the {maps} output channels of w {list(w)} are not divisible by group {group}", "group")
    if w[1] * group != channels:
        raise OpError(f"w {list(w)} takes {w[1]} channels per group; x {list(x)} has {channels} channels in "
                      f"{group} group{'s' if group > 1 else ''}, i.e. {channels // group} per group",
                      reason="SHAPE_MISMATCH")
    return _geometry(tuple(x), tuple(w[2:]), "w", _ints(strides), _ints(pads), _ints(dilations))


def _conv_infer(x: TensorSpec, w: TensorSpec, *, strides=None, pads=None, dilations=None, group=1) -> TensorSpec:
    geo = _conv_check(tuple(x.shape), tuple(w.shape), strides, pads, dilations, group)
    return TensorSpec(geo.out_shape(x.shape[0], w.shape[0]), float_result(np.result_type(x.dtype, w.dtype)))


def _conv_cost(x: TensorSpec, w: TensorSpec, **attrs: Any) -> float:
    """Floating-point operations: a multiply and an add per output element per weight of its group."""
    return 2.0 * math.prod(_conv_infer(x, w, **attrs).shape) * math.prod(w.shape[1:])


#: Bytes of im2col columns built at a time. conv runs over the batch in chunks of samples whose
#: columns fit in about this much, in one buffer reused chunk after chunk (also for the columns'
#: gradient): the workspace stays bounded whatever the batch (shape inference counts the output,
#: not the columns, which are KH*KW*C/M times larger), stays in cache between the copy and the
#: matmul, and the allocator hands out no fresh pages per call.
WORKSPACE_BYTES = 2 << 20


def _columns_bytes(x: TensorSpec, kernel: tuple[int, ...], out: tuple[int, ...]) -> int:
    """What _Im2col holds for x: one chunk of columns (at least a whole sample's, C * kernel * out
    elements, however large) and the padded copy of the chunk, counted as large again."""
    per_sample = x.shape[1] * math.prod(kernel) * math.prod(out) * x.dtype.itemsize
    return 2 * max(per_sample, WORKSPACE_BYTES)


def _conv_workspace(x: TensorSpec, w: TensorSpec, **attrs: Any) -> int:
    out = _conv_infer(x, w, **attrs).shape
    return _columns_bytes(x, tuple(w.shape[2:]), tuple(out[2:]))


def _conv_grad_x_workspace(g: TensorSpec, w: TensorSpec, like: TensorSpec, **attrs: Any) -> int:
    return _columns_bytes(TensorSpec(like.shape, g.dtype), tuple(w.shape[2:]), tuple(g.shape[2:]))


def _conv_grad_w_workspace(x: TensorSpec, g: TensorSpec, like: TensorSpec, **attrs: Any) -> int:
    return _columns_bytes(x, tuple(like.shape[2:]), tuple(g.shape[2:]))


class _Im2col:
    """im2col of x [N, C, H, W] over the batch in chunks, into one reused workspace."""

    def __init__(self, x: np.ndarray, geo: _Geometry, group: int) -> None:
        n, c = x.shape[:2]
        (kh, kw), (oh, ow) = geo.kernel, geo.out
        self.x, self.geo, self.group = x, geo, group
        self.k, self.l = (c // group) * kh * kw, oh * ow
        per_sample = max(c * kh * kw * oh * ow * x.dtype.itemsize, 1)
        self.chunk = max(1, min(n, WORKSPACE_BYTES // per_sample))
        self.n = n
        self.buffer = np.empty((self.chunk, c, kh, kw, oh, ow), x.dtype)
        self.padded: np.ndarray | None = None   # the padded chunk: border zeroed once, interior per chunk

    def stop_check(self, rows: int) -> Callable[[], None] | None:
        """The run's stop check for products of ``rows`` rows per group with the columns of every sample
        (and building those columns), or None when they take less than a block or nothing can stop the run."""
        columns = self.n * self.group * self.k * self.l
        return stop_check() if columns * (2.0 * rows + MOVE_COST) > block_operations(True) else None

    def chunks(self, check: Callable[[], None] | None) -> Iterator[tuple[int, int]]:
        """(first, last + 1) sample of each chunk, after a stop ``check`` (None: nothing can stop the run)."""
        for n0 in range(0, self.n, self.chunk):
            if check is not None:
                check()
            yield n0, min(self.n, n0 + self.chunk)

    def workspace(self, count: int) -> np.ndarray:
        """The buffer as [count, G, K, L], for the columns' gradient."""
        return self.buffer[:count].reshape(count, self.group, self.k, self.l)

    def columns(self, n0: int, n1: int) -> np.ndarray:
        """The windows of samples n0..n1 as contiguous columns [n1 - n0, G, C/G*KH*KW, OH*OW]."""
        geo, count = self.geo, n1 - n0
        if not any(geo.pads):
            xp = self.x[n0:n1]
        else:
            if self.padded is None:
                self.padded = np.zeros((self.chunk, self.x.shape[1]) + geo.padded, self.x.dtype)
            top, left = geo.pads[:2]
            xp = self.padded[:count]
            xp[:, :, top:top + geo.size[0], left:left + geo.size[1]] = self.x[n0:n1]
        (kh, kw), (sh, sw), (dh, dw), (oh, ow) = geo.kernel, geo.strides, geo.dilations, geo.out
        s_n, s_c, s_h, s_w = xp.strides
        windows = as_strided(xp, (count, xp.shape[1], kh, kw, oh, ow),
                             (s_n, s_c, s_h * dh, s_w * dw, s_h * sh, s_w * sw), writeable=False)
        cols = self.buffer[:count]
        np.copyto(cols, windows)
        return cols.reshape(count, self.group, self.k, self.l)


def _kernels(w: Any, group: int, dtype: np.dtype) -> np.ndarray:
    """w [M, C/G, KH, KW] as G matrices [G, M/G, C/G*KH*KW]."""
    w = np.asarray(w).astype(dtype, copy=False)
    return w.reshape(group, w.shape[0] // group, -1)


def _conv(x, w, *, strides=None, pads=None, dilations=None, group=1):
    dtype = float_result(np.result_type(x, w))
    geo = _conv_check(np.shape(x), np.shape(w), strides, pads, dilations, group)
    kernels = _kernels(w, group, dtype)
    im2col = _Im2col(_as_2d(x, dtype), geo, group)
    out = np.empty((im2col.n, group, kernels.shape[1], im2col.l), dtype)
    budget, check = block_operations(True), im2col.stop_check(kernels.shape[1])
    for n0, n1 in im2col.chunks(check):  # [n, G, M/G, OH*OW]: NCHW already; large products in blocks
        matmul_into(kernels, im2col.columns(n0, n1), out[n0:n1], budget, check)
    return out.reshape(geo.out_shape(im2col.n, np.shape(w)[0]))


def _conv_vjp(g, out, x, w, *, strides=None, pads=None, dilations=None, group=1, needs=(True, True)):
    dtype = float_result(np.result_type(x, w))
    x_shape, w_shape = np.shape(x), np.shape(w)
    geo = _conv_check(x_shape, w_shape, strides, pads, dilations, group)
    if not (needs[0] or needs[1]):
        return None, None
    kernels = _kernels(w, group, dtype)
    im2col = _Im2col(_as_2d(x, dtype), geo, group)
    g = np.asarray(g).astype(dtype, copy=False).reshape(im2col.n, group, kernels.shape[1], im2col.l)
    dx = np.empty((im2col.n, x_shape[1]) + geo.size, dtype) if needs[0] else None
    dw = np.zeros(kernels.shape, dtype) if needs[1] else None
    budget, check = block_operations(True), im2col.stop_check(2 * kernels.shape[1])
    for n0, n1 in im2col.chunks(check):  # large products in blocks with stop checks (common.matmul_into)
        if needs[0]:   # the transposed convolution: wᵀ @ g, then col2im
            dcols = im2col.workspace(n1 - n0)
            matmul_into(kernels.swapaxes(-1, -2), g[n0:n1], dcols, budget, check)
            _col2im(dcols, geo, dx[n0:n1])
        if needs[1]:   # g @ colsᵀ, summed over the samples (no [n, G, M/G, K] temporary)
            dw += summed_matmul(g[n0:n1], im2col.columns(n0, n1).swapaxes(-1, -2), (group,)).reshape(dw.shape)
    return (None if dx is None else dx.reshape(x_shape)), (None if dw is None else dw.reshape(w_shape))


class _ScatterPlan(NamedTuple):
    """col2im's steps for one geometry (see :func:`_col2im`)."""

    #: The offset that meets every input position, or None: (kh, kw, output rows, output columns, input
    #: rows, input columns); or, when ``flat``, (kh, kw, first, last, shift) of the flattened H*W axis.
    first: tuple | None
    #: The other offsets that meet the input, in the same form (offsets meeting only padding are left out).
    steps: tuple
    #: True for stride 1 with OW == W (a "same" convolution): each offset is then a constant shift of
    #: the flattened H*W axis, and its ``+=`` one contiguous run per (sample, channel) instead of one
    #: short run per row.
    flat: bool
    #: (kw, lo, hi) when flat: output columns outside lo..hi of kernel column kw meet only padding and
    #: would wrap into the neighbouring row of the flattened axis; they are zeroed first.
    wraps: tuple


@lru_cache(maxsize=1024)
def _scatter_plan(geo: _Geometry) -> _ScatterPlan:
    (h, w), (_, ow) = geo.size, geo.out
    flat = geo.strides == (1, 1) and ow == w
    steps, first, wraps = [], None, {}
    for i in range(geo.kernel[0]):
        rows = geo.span(0, i)
        for j in range(geo.kernel[1]):
            cols = geo.span(1, j)
            if rows is None or cols is None:
                continue
            if flat:
                shift = (i * geo.dilations[0] - geo.pads[0]) * w + j * geo.dilations[1] - geo.pads[1]
                lo, hi = max(rows[0].start * ow, -shift), min(rows[0].stop * ow, h * w - shift)
                step = (i, j, lo, hi, shift)
                if cols[0].start > 0 or cols[0].stop < ow:
                    wraps[j] = (j, cols[0].start, cols[0].stop)
            else:
                step = (i, j, rows[0], cols[0], rows[1], cols[1])
            if first is None and rows[2] and cols[2]:
                first = step
            else:
                steps.append(step)
    return _ScatterPlan(first, tuple(steps), flat, tuple(wraps.values()))


def _col2im(dcols: np.ndarray, geo: _Geometry, dx: np.ndarray) -> None:
    """Sum the columns' gradient [n, G, C/G*KH*KW, OH*OW] back onto the input's, written into dx [n, C, H, W].

    One strided ``+=`` per kernel offset, clipped to the unpadded input (no padded
    buffer, nothing to crop). An offset that meets every input position (the centre
    of a stride-1 "same" conv) starts the sum as a copy instead of zeros plus an add.
    ``dcols`` is a workspace: its padding-only columns may be zeroed.
    """
    plan = _scatter_plan(geo)
    n, c = dx.shape[:2]
    if plan.flat:
        by_offset = dcols.reshape((n, c) + geo.kernel + geo.out)
        for j, lo, hi in plan.wraps:
            by_offset[:, :, :, j, :, :lo] = 0
            by_offset[:, :, :, j, :, hi:] = 0
        dcols = dcols.reshape((n, c) + geo.kernel + (-1,))
        dx = np.reshape(dx, (n, c, -1), copy=False)                  # a view: dx is C-contiguous
        if plan.first is None:
            dx[...] = 0
        else:
            i, j, lo, hi, shift = plan.first
            np.copyto(dx[:, :, lo + shift:hi + shift], dcols[:, :, i, j, lo:hi])
        for i, j, lo, hi, shift in plan.steps:
            dx[:, :, lo + shift:hi + shift] += dcols[:, :, i, j, lo:hi]
        return
    dcols = dcols.reshape((n, c) + geo.kernel + geo.out)
    if plan.first is None:
        dx[...] = 0
    else:
        i, j, out_rows, out_cols, _, _ = plan.first
        np.copyto(dx, dcols[:, :, i, j, out_rows, out_cols])
    for i, j, out_rows, out_cols, in_rows, in_cols in plan.steps:
        dx[:, :, in_rows, in_cols] += dcols[:, :, i, j, out_rows, out_cols]


# --- pooling ---------------------------------------------------------------------------------------

def _pool_check(op: str, x: tuple[int, ...], kernel_shape, strides, pads) -> _Geometry:
    _spatial_rank(x, op)
    return _geometry(tuple(x), _ints(kernel_shape), "kernel_shape", _ints(strides), _ints(pads), None)


def _pool_infer(op: str):
    def infer(x: TensorSpec, *, kernel_shape, strides=None, pads=None, **_: Any) -> TensorSpec:
        geo = _pool_check(op, tuple(x.shape), kernel_shape, strides, pads)
        return TensorSpec(geo.out_shape(*x.shape[:2]), float_result(x.dtype))
    return infer


def _offsets(geo: _Geometry):
    """(row slice, column slice) of the padded input per kernel offset, in row-major window order."""
    return [(geo.rows(i), geo.cols(j)) for i in range(geo.kernel[0]) for j in range(geo.kernel[1])]


def _max_pool(x, *, kernel_shape, strides=None, pads=None):
    dtype = float_result(np.asarray(x).dtype)
    geo = _pool_check("max_pool", np.shape(x), kernel_shape, strides, pads)
    xp = _padded(_as_2d(x, dtype), geo, -np.inf)
    (rows, cols), *rest = _offsets(geo)
    out = xp[:, :, rows, cols].copy()
    check = stop_check_for(out.size * len(rest))  # (a large kernel: work far beyond the output's size)
    for rows, cols in rest:
        check()
        np.maximum(out, xp[:, :, rows, cols], out=out)
    return out.reshape(geo.out_shape(*np.shape(x)[:2]))


def _max_pool_winners(x, geo: _Geometry, dtype: np.dtype) -> tuple[tuple[int, ...], list, np.ndarray]:
    """The padded input's shape, the kernel offsets, and per output the offset of its window's first
    maximum (a strict ``>``: on a tie the earlier offset wins; forward's np.maximum lets nan win, and
    so does the first nan here)."""
    x2 = _as_2d(x, dtype)
    xp = _padded(x2, geo, -np.inf)
    offsets = _offsets(geo)
    nan = bool(np.isnan(x2).any())
    best = xp[:, :, offsets[0][0], offsets[0][1]].copy()
    winner = np.zeros(best.shape, np.int32)
    check = stop_check_for(4 * best.size * len(offsets))
    for k, (rows, cols) in enumerate(offsets[1:], 1):
        check()
        candidate = xp[:, :, rows, cols]
        better = candidate > best
        if nan:
            better |= np.isnan(candidate) & ~np.isnan(best)
        np.copyto(best, candidate, where=better)
        np.copyto(winner, k, where=better)
    return xp.shape, offsets, winner


def _max_pool_vjp(g, out, x, *, kernel_shape, strides=None, pads=None):
    """g routed to each window's first maximum (the rule of max_pool_grad too)."""
    dtype = float_result(np.asarray(x).dtype)
    geo = _pool_check("max_pool", np.shape(x), kernel_shape, strides, pads)
    padded, offsets, winner = _max_pool_winners(x, geo, dtype)
    g2 = np.asarray(g).astype(dtype, copy=False).reshape(winner.shape)
    dxp = np.zeros(padded, dtype)
    zero = dtype.type(0)
    check = stop_check_for(3 * winner.size * len(offsets))
    for k, (rows, cols) in enumerate(offsets):
        check()
        dxp[:, :, rows, cols] += np.where(winner == k, g2, zero)
    return (_cropped(dxp, geo, geo.spatial),)


def _max_pool_pick(h, x, *, kernel_shape, strides=None, pads=None):
    """Per window of x, h's value at the window's first maximum (max_pool_grad's adjoint; max_pool(x) is
    max_pool_pick(x, x)). The padding holds 0 in h."""
    dtype = float_result(np.result_type(h, x))
    geo = _pool_check("max_pool_pick", np.shape(x), kernel_shape, strides, pads)
    _, offsets, winner = _max_pool_winners(x, geo, dtype)
    hp = _padded(_as_2d(h, dtype), geo, 0.0)
    out = np.zeros(winner.shape, dtype)
    check = stop_check_for(2 * winner.size * len(offsets))
    for k, (rows, cols) in enumerate(offsets):
        check()
        np.copyto(out, hp[:, :, rows, cols], where=winner == k)
    return out.reshape(geo.out_shape(*np.shape(x)[:2]))


def _pool_counts(geo: _Geometry, include_pad: bool, dtype: np.dtype) -> Any:
    """What each window's sum is divided by: the kernel size, or its real (unpadded) elements."""
    if include_pad or not any(geo.pads):
        return dtype.type(geo.kernel[0] * geo.kernel[1])

    def per_axis(axis: int) -> np.ndarray:
        size, begin, kernel, stride = geo.size[axis], geo.pads[axis], geo.kernel[axis], geo.strides[axis]
        start = np.arange(geo.out[axis]) * stride - begin
        return np.minimum(start + kernel, size) - np.maximum(start, 0)

    return np.multiply.outer(per_axis(0), per_axis(1)).astype(dtype)


def _avg_pool(x, *, kernel_shape, strides=None, pads=None, count_include_pad=False):
    dtype = float_result(np.asarray(x).dtype)
    geo = _pool_check("avg_pool", np.shape(x), kernel_shape, strides, pads)
    xp = _padded(_as_2d(x, dtype), geo, 0.0)
    rows = xp[:, :, :, geo.cols(0)].copy()                  # separable: sum along W, then along H
    check = stop_check_for(rows.size * sum(geo.kernel))
    for j in range(1, geo.kernel[1]):
        check()
        rows += xp[:, :, :, geo.cols(j)]
    out = rows[:, :, geo.rows(0), :].copy()
    for i in range(1, geo.kernel[0]):
        check()
        out += rows[:, :, geo.rows(i), :]
    out /= _pool_counts(geo, count_include_pad, dtype)
    return out.reshape(geo.out_shape(*np.shape(x)[:2]))


def _avg_pool_vjp(g, out, x, *, kernel_shape, strides=None, pads=None, count_include_pad=False):
    dtype = float_result(np.asarray(x).dtype)
    x_shape = np.shape(x)
    geo = _pool_check("avg_pool", x_shape, kernel_shape, strides, pads)
    n, c = x_shape[:2]
    share = np.asarray(g).astype(dtype).reshape((n, c) + geo.out)  # a copy: divided in place next
    share /= _pool_counts(geo, count_include_pad, dtype)
    height, width = geo.padded
    rows = np.zeros((n, c, height, geo.out[1]), dtype)            # spread along H, then along W
    check = stop_check_for(rows.size * sum(geo.kernel))
    for i in range(geo.kernel[0]):
        check()
        rows[:, :, geo.rows(i), :] += share
    dxp = np.zeros((n, c, height, width), dtype)
    for j in range(geo.kernel[1]):
        check()
        dxp[:, :, :, geo.cols(j)] += rows
    return (_cropped(dxp, geo, geo.spatial),)


# --- gradient-check samples ------------------------------------------------------------------------

def _pick(rng: np.random.Generator, options: list) -> Any:
    return options[rng.integers(len(options))]


def _conv_sample(rng):
    x, w, attrs = _pick(rng, [
        ((2, 3, 5, 5), (4, 3, 3, 3), {}),
        ((1, 2, 6, 5), (3, 2, 2, 3), {"strides": (2, 1), "pads": (1, 0, 0, 2), "dilations": (1, 2)}),
        ((2, 4, 5, 4), (4, 2, 3, 2), {"group": 2, "pads": (1, 1, 1, 1)}),
        ((2, 2, 7), (3, 2, 3), {"strides": (2,), "pads": (1, 2), "dilations": (2,)}),
        ((1, 4, 6), (4, 1, 2), {"group": 4}),
    ])
    return [rng.standard_normal(x), rng.standard_normal(w)], attrs


def _distinct(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Values at least 0.8 apart (no ties within a window, so max_pool is differentiable there)."""
    size = math.prod(shape)
    return ((rng.permutation(size) - size // 2) + rng.uniform(-0.1, 0.1, size)).reshape(shape)


_POOL_CASES = [
    ((2, 2, 5, 5), {"kernel_shape": (2, 2)}),
    ((1, 3, 6, 5), {"kernel_shape": (3, 2), "strides": (2, 1), "pads": (1, 0, 2, 1)}),
    ((2, 2, 7), {"kernel_shape": (3,), "strides": (2,), "pads": (1, 1)}),
    ((1, 2, 4, 6), {"kernel_shape": (2, 3), "strides": (2, 3)}),
]


def _max_pool_sample(rng):
    shape, attrs = _pick(rng, _POOL_CASES)
    return [_distinct(rng, shape)], attrs


def _avg_pool_sample(rng):
    shape, attrs = _pick(rng, _POOL_CASES)
    return [rng.standard_normal(shape)], {**attrs, "count_include_pad": bool(rng.integers(2))}


# --- derivative helpers: the vjps as operators, for derivatives built as graphs ----------------------
#
# conv_grad_x and conv_grad_w are conv's two gradients (the transposed convolution, and the
# correlation of x with g); max_pool_grad routes g to each window's maximum and max_pool_pick reads
# a value there; avg_pool_grad spreads g over the windows. Each is linear in the value it moves,
# and the adjoint of one is another of them (or conv, avg_pool): the symbolic rules below.

def _stand_in(like, dtype: np.dtype) -> np.ndarray:
    """Zeros of like's shape in ``dtype`` as a read-only broadcast view: like's shape, none of its values."""
    return np.broadcast_to(np.zeros((), dtype), np.shape(like))


def _conv_grad_check(op: str, x, w, g, strides, pads, dilations, group) -> np.dtype:
    geo = _conv_check(tuple(x.shape), tuple(w.shape), strides, pads, dilations, group)
    expected = geo.out_shape(x.shape[0], w.shape[0])
    if tuple(g.shape) != expected:
        raise OpError(f"{op}: g has shape {list(g.shape)}; conv of x {list(x.shape)} with w {list(w.shape)} gives "
                      f"{list(expected)}", reason="SHAPE_MISMATCH")
    return float_result(np.result_type(x.dtype, w.dtype, g.dtype))


def _conv_grad_x_infer(g: TensorSpec, w: TensorSpec, like: TensorSpec, *, strides=None, pads=None, dilations=None,
                       group=1) -> TensorSpec:
    return TensorSpec(like.shape, _conv_grad_check("conv_grad_x", like, w, g, strides, pads, dilations, group))


def _conv_grad_w_infer(x: TensorSpec, g: TensorSpec, like: TensorSpec, *, strides=None, pads=None, dilations=None,
                       group=1) -> TensorSpec:
    return TensorSpec(like.shape, _conv_grad_check("conv_grad_w", x, like, g, strides, pads, dilations, group))


def _conv_grad_x(g, w, like, **attrs):
    """conv's gradient for x with cotangent g (like: x's shape and dtype, values not read)."""
    dtype = float_result(np.result_type(g, w, like))
    return _conv_vjp(g, None, _stand_in(like, dtype), np.asarray(w).astype(dtype, copy=False),
                     needs=(True, False), **attrs)[0]


def _conv_grad_w(x, g, like, **attrs):
    """conv's gradient for w with cotangent g (like: w's shape and dtype, values not read)."""
    dtype = float_result(np.result_type(x, g, like))
    return _conv_vjp(g, None, np.asarray(x).astype(dtype, copy=False), _stand_in(like, dtype),
                     needs=(False, True), **attrs)[1]


def _conv_grad_x_vjp(h, out, g, w, like, **attrs):
    """<h, conv_grad_x(g, w)> = <conv(h, w), g>."""
    return _conv(h, w, **attrs), _conv_grad_w(h, g, w, **attrs), None


def _conv_grad_w_vjp(h, out, x, g, like, **attrs):
    """<h, conv_grad_w(x, g)> = <conv(x, h), g>."""
    return _conv_grad_x(g, h, x, **attrs), _conv(x, h, **attrs), None


def _pool_grad_infer(op: str):
    """infer of max_pool_grad and avg_pool_grad (g, x): g of the pool's output shape; x's shape, in a float."""
    def infer(g: TensorSpec, x: TensorSpec, *, kernel_shape, strides=None, pads=None, **_: Any) -> TensorSpec:
        geo = _pool_check(op, tuple(x.shape), kernel_shape, strides, pads)
        expected = geo.out_shape(*x.shape[:2])
        if tuple(g.shape) != expected:
            raise OpError(f"g has shape {list(g.shape)}; pooling x {list(x.shape)} gives {list(expected)}",
                          reason="SHAPE_MISMATCH")
        return TensorSpec(x.shape, float_result(x.dtype))
    return infer


def _max_pool_pick_infer(h: TensorSpec, x: TensorSpec, *, kernel_shape, strides=None, pads=None) -> TensorSpec:
    if tuple(h.shape) != tuple(x.shape):
        raise OpError(f"h has shape {list(h.shape)}, x {list(x.shape)}; max_pool_pick reads h where x's windows "
                      f"have their maxima", reason="SHAPE_MISMATCH")
    geo = _pool_check("max_pool_pick", tuple(x.shape), kernel_shape, strides, pads)
    return TensorSpec(geo.out_shape(*x.shape[:2]), float_result(np.result_type(h.dtype, x.dtype)))


def _conv_grad_sample(rng, which: int):
    [x, w], attrs = _conv_sample(rng)
    g = rng.standard_normal(_conv_infer(TensorSpec.of(x), TensorSpec.of(w), **attrs).shape)
    return ([g, w, x] if which == 0 else [x, g, w]), attrs


def _pool_grad_sample(make):
    def sample(rng):
        [x], attrs = make(rng)
        out = _pool_infer("max_pool")(TensorSpec.of(x), **attrs)
        return [rng.standard_normal(out.shape), x], attrs
    return sample


def _max_pool_pick_sample(rng):
    [x], attrs = _max_pool_sample(rng)
    return [rng.standard_normal(x.shape), x], attrs


# --- symbolic rules (docs/derivatives.md) --------------------------------------------------------------

def _conv_vjp_graph(b, g, out, x, w, **attrs):
    return b.op("conv_grad_x", g, w, x, **attrs), b.op("conv_grad_w", x, g, w, **attrs)


def _conv_jvp_graph(b, tangents, out, x, w, **attrs):
    tx, tw = tangents
    return b.add_tangents(None if tx is None else b.op("conv", tx, w, **attrs),
                          None if tw is None else b.op("conv", x, tw, **attrs))


def _conv_grad_x_vjp_graph(b, h, out, g, w, like, **attrs):
    return b.op("conv", h, w, **attrs), b.op("conv_grad_w", h, g, w, **attrs), None


def _conv_grad_x_jvp_graph(b, tangents, out, g, w, like, **attrs):
    tg, tw, _ = tangents
    return b.add_tangents(None if tg is None else b.op("conv_grad_x", tg, w, like, **attrs),
                          None if tw is None else b.op("conv_grad_x", g, tw, like, **attrs))


def _conv_grad_w_vjp_graph(b, h, out, x, g, like, **attrs):
    return b.op("conv_grad_x", g, h, x, **attrs), b.op("conv", x, h, **attrs), None


def _conv_grad_w_jvp_graph(b, tangents, out, x, g, like, **attrs):
    tx, tg, _ = tangents
    return b.add_tangents(None if tx is None else b.op("conv_grad_w", tx, g, like, **attrs),
                          None if tg is None else b.op("conv_grad_w", x, tg, like, **attrs))


def _max_pool_vjp_graph(b, g, out, x, **attrs):
    return (b.op("max_pool_grad", g, x, **attrs),)


def _max_pool_jvp_graph(b, tangents, out, x, **attrs):
    return b.op("max_pool_pick", tangents[0], x, **attrs)    # the winners do not move: x's tangent there


def _max_pool_grad_vjp_graph(b, h, out, g, x, **attrs):
    return b.op("max_pool_pick", h, x, **attrs), None        # piecewise constant in x: no gradient for it


def _max_pool_pick_vjp_graph(b, h, out, v, x, **attrs):
    return b.op("max_pool_grad", h, x, **attrs), None


def _avg_pool_vjp_graph(b, g, out, x, **attrs):
    return (b.op("avg_pool_grad", g, x, **attrs),)


def _avg_pool_grad_vjp_graph(b, h, out, g, like, **attrs):
    return b.op("avg_pool", h, **attrs), None


def _first_linear_jvp(name: str):
    """The jvp_graph of a helper linear in its first input whose other inputs do not move it (shapes,
    or the positions of maxima): the operator on the first tangent."""
    def jvp_graph(b, tangents, out, first, *rest, **attrs):
        return None if tangents[0] is None else b.op(name, tangents[0], *rest, **attrs)
    return jvp_graph


# --- the table -------------------------------------------------------------------------------------

_STRIDES = Attr("ints", None, "step per spatial axis (default all 1)")
_PADS = Attr("ints", None, "zero padding: all begins, then all ends (default all 0)")
_KERNEL = Attr("ints", doc="window size per spatial axis")

_CONV_ATTRS = {"strides": _STRIDES, "pads": _PADS,
               "dilations": Attr("ints", None, "kernel dilation per spatial axis (default all 1)"),
               "group": Attr("int", 1, "channel groups: C and M divisible by it, w is [M, C/group, ...]")}
_MAX_POOL_ATTRS = {"kernel_shape": _KERNEL, "strides": _STRIDES,
                   "pads": Attr("ints", None, "padding that never wins: all begins, then all ends (default all 0)")}
_AVG_POOL_ATTRS = {"kernel_shape": _KERNEL, "strides": _STRIDES, "pads": _PADS,
                   "count_include_pad": Attr("bool", False, "divide by the kernel size even where it covers padding")}

OPERATORS: list[OpDef] = [
    OpDef("conv", 2, _conv, _conv_vjp, _conv_infer, attrs=_CONV_ATTRS, cost=_conv_cost, workspace=_conv_workspace,
          doc="ONNX Conv without bias: x [N, C, (H,) W] with w [M, C/group, (KH,) KW]; strides, pads, dilations, group.",
          sample=_conv_sample, selective_vjp=True),
    OpDef("max_pool", 1, _max_pool, _max_pool_vjp, _pool_infer("max_pool"), attrs=_MAX_POOL_ATTRS,
          doc="ONNX MaxPool on NCW/NCHW: the maximum of each window; on ties the first maximum gets the gradient.",
          sample=_max_pool_sample),
    OpDef("avg_pool", 1, _avg_pool, _avg_pool_vjp, _pool_infer("avg_pool"), attrs=_AVG_POOL_ATTRS,
          doc="ONNX AveragePool on NCW/NCHW: the mean of each window (padding not counted unless count_include_pad).",
          sample=_avg_pool_sample),

    # derivative helpers: the gradients above as operators (like: a value whose shape alone is read)
    OpDef("conv_grad_x", 3, _conv_grad_x, _conv_grad_x_vjp, _conv_grad_x_infer, attrs=_CONV_ATTRS,
          workspace=_conv_grad_x_workspace,
          input_names=("g", "w", "like"),
          doc="conv's gradient for x (the transposed convolution of g with w), of like's shape: like is x "
              "(its values are not read).", sample=lambda rng: _conv_grad_sample(rng, 0)),
    OpDef("conv_grad_w", 3, _conv_grad_w, _conv_grad_w_vjp, _conv_grad_w_infer, attrs=_CONV_ATTRS,
          workspace=_conv_grad_w_workspace,
          input_names=("x", "g", "like"),
          doc="conv's gradient for w (the correlation of x with g), of like's shape: like is w (its values are "
              "not read).", sample=lambda rng: _conv_grad_sample(rng, 1)),
    OpDef("max_pool_grad", 2,
          lambda g, x, **attrs: _max_pool_vjp(g, None, x, **attrs)[0],
          lambda h, out, g, x, **attrs: (_max_pool_pick(h, x, **attrs), None),
          _pool_grad_infer("max_pool_grad"), attrs=_MAX_POOL_ATTRS, input_names=("g", "x"),
          doc="max_pool's gradient: g routed to the first maximum of each window of x; none for x.",
          sample=_pool_grad_sample(_max_pool_sample)),
    OpDef("max_pool_pick", 2, _max_pool_pick,
          lambda g, out, h, x, **attrs: (_max_pool_vjp(g, None, x, **attrs)[0], None),
          _max_pool_pick_infer, attrs=_MAX_POOL_ATTRS, input_names=("h", "x"),
          doc="Per window of x, h's value at the window's first maximum (max_pool(x) is max_pool_pick(x, x)); "
              "none for x.", sample=_max_pool_pick_sample),
    OpDef("avg_pool_grad", 2,
          lambda g, like, **attrs: _avg_pool_vjp(g, None, like, **attrs)[0],
          lambda h, out, g, like, **attrs: (_avg_pool(h, **attrs), None),
          _pool_grad_infer("avg_pool_grad"), attrs=_AVG_POOL_ATTRS, input_names=("g", "like"),
          doc="avg_pool's gradient: g spread evenly over each window, of like's shape (like is x; its values "
              "are not read).", sample=_pool_grad_sample(_avg_pool_sample)),
]

SYMBOLIC = {
    #  name:          (vjp_graph,                  jvp_graph)
    "conv":           (_conv_vjp_graph,            _conv_jvp_graph),
    "max_pool":       (_max_pool_vjp_graph,        _max_pool_jvp_graph),
    "avg_pool":       (_avg_pool_vjp_graph,        linear_jvp("avg_pool")),
    # the derivative helpers: adjoint pairs (conv_grad_x with conv, max_pool_grad with max_pool_pick...)
    "conv_grad_x":    (_conv_grad_x_vjp_graph,     _conv_grad_x_jvp_graph),
    "conv_grad_w":    (_conv_grad_w_vjp_graph,     _conv_grad_w_jvp_graph),
    "max_pool_grad":  (_max_pool_grad_vjp_graph,   _first_linear_jvp("max_pool_grad")),
    "max_pool_pick":  (_max_pool_pick_vjp_graph,   _first_linear_jvp("max_pool_pick")),
    "avg_pool_grad":  (_avg_pool_grad_vjp_graph,   _first_linear_jvp("avg_pool_grad")),
}

OPERATORS = with_symbolic(OPERATORS, SYMBOLIC)

register_operators = table_hookimpl(OPERATORS)
