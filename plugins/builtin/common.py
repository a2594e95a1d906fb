"""Numeric helpers the built-in families share. Not a family: it registers no operators.

Every family module imports its helpers from here (and from ``chainrule.core`` and
``chainrule.plugins.authoring``), never from another family, so each table can be
read, loaded or left out on its own.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from chainrule.core import OpError
from chainrule.core.engine import current_run
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


# --- long work in blocks, with a stop check between them --------------------------------------
#
# The engine checks the call's stop token between nodes, but one node can hold seconds of work (a
# 6400 x 6400 product is one BLAS call of 5 s), and a call is promised to stop within 0.2 s of CPU
# once its deadline passes or it is cancelled (issue 14). Rules whose single call can be that long
# work in blocks of about BLOCK_SECONDS when (and only when) the work is large, and check the
# running evaluation's token between blocks. Work is counted in operations (a multiply-add is two,
# an element written or copied MOVE_COST) at the rate of the code that does it, measured on the
# development machine (2 cores).

#: Seconds of work in one block: the longest a stop waits for a rule that works in blocks (twice
#: that in CPU while BLAS runs on both cores).
BLOCK_SECONDS = 0.04
#: Operations per second of BLAS's float products (numpy's OpenBLAS: about 100 GFLOP/s in float64 on
#: two cores, twice that in float32; the float64 rate keeps float32 blocks shorter still).
BLAS_RATE = 1e11
#: Operations per second of numpy's own loops: integer and bool products (1.5-1.9 GOP/s), einsum
#: without BLAS (2-3).
LOOP_RATE = 1.5e9
#: Operations one element written, or copied, costs at BLAS_RATE: memory moves about 7e8 elements
#: a second (numpy copying an operand BLAS cannot read, fresh pages of a result).
MOVE_COST = 150.0
#: Operations one element read costs at BLAS_RATE (about 2e9 elements a second).
READ_COST = 50.0
#: How many times larger a product's blocks are when nothing can stop the run (no token): the blocks
#: are then there only for the layouts they read better than numpy (broadcast and batched operands),
#: and larger ones cost less (two calls' packing instead of a hundred's).
UNSTOPPABLE_BLOCKS = 16


def block_operations(blas: bool) -> float:
    """The operations one block may hold: at BLAS's rate for float products, numpy's loops' else."""
    return BLOCK_SECONDS * (BLAS_RATE if blas else LOOP_RATE)


def stop_check() -> Callable[[], None] | None:
    """The running evaluation's stop check (it raises CancelledError or DeadlineError once the call's
    token says stop), fetched once per rule call and called per block; None when nothing can stop the
    run (no token: outside an evaluation, or a local call without deadline or cancel), which then has
    no reason to cut its work into blocks."""
    run = current_run()
    return run.check if run.token is not None else None


def stop_check_for(operations: float) -> Callable[[], None]:
    """stop_check() for a rule about to do ``operations`` (elements passed over by numpy's loops) in
    steps, a loop over a kernel's offsets say; a no-op when they fit in one block or nothing can stop
    the run, so that such calls pay nothing per step."""
    check = stop_check() if operations > block_operations(False) else None
    return check or _no_check


def _no_check() -> None:
    """A stop check for work too short to need one."""


def even_step(size: int, most: float) -> int:
    """A step of at most ``most`` (at least 1) that cuts ``size`` into equal parts, give or take one:
    no block much smaller than the others."""
    parts = math.ceil(size / max(1, int(most)))
    return math.ceil(size / parts) if parts else 1


def nest_blocks(shape: Sequence[int], unit: float, budget: float) -> Iterator[tuple[Any, ...]]:
    """Cut a loop nest over ``shape`` (outer axes first), each element costing ``unit`` operations,
    into blocks of at most ``budget`` (at least one element each): index tuples of ints for the outer
    axes and one slice, the axes after it whole. The outer axes are as few as the budget allows, so
    each block does as much as it may in one call."""
    inner = [1] * (len(shape) + 1)  # inner[i]: elements of the axes from i on
    for i in range(len(shape) - 1, -1, -1):
        inner[i] = inner[i + 1] * shape[i]
    if not shape or unit * inner[0] <= budget:
        yield ()
        return
    axis = next(i for i in range(len(shape)) if unit * inner[i + 1] <= budget or i == len(shape) - 1)
    step = even_step(shape[axis], budget / (unit * inner[axis + 1]))
    for outer in np.ndindex(*shape[:axis]):
        for start in range(0, shape[axis], step):
            yield outer + (slice(start, min(start + step, shape[axis])),)


# --- matrix products in blocks -----------------------------------------------------------------

def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """np.matmul(a, b) with numpy's rules (1-D inputs, broadcast batch axes), computed in blocks of
    about BLOCK_SECONDS with a stop check between them when the product is large; one np.matmul call
    otherwise, as before (a product too small for a block costs only a bound read off the sizes). A
    large product that nothing can stop goes through blocks too, UNSTOPPABLE_BLOCKS times larger:
    they read broadcast operands once, not once per product of the batch as numpy does."""
    if _surely_small(a, b):
        return np.matmul(a, b)
    check = stop_check()
    blas = a.dtype.kind == "f" or b.dtype.kind == "f"   # else numpy's own integer (bool) loop
    budget = block_operations(blas) * (1 if check else UNSTOPPABLE_BLOCKS)
    a2 = a[np.newaxis, :] if a.ndim == 1 else a        # 1-D inputs as a row and a column: views
    b2 = b[:, np.newaxis] if b.ndim == 1 else b
    batch = np.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
    if product_cost(a2, b2) * math.prod(batch) <= budget:
        return np.matmul(a, b)
    out = np.empty(batch + (a2.shape[-2], b2.shape[-1]), np.result_type(a, b))
    matmul_into(a2, b2, out, budget, check or _no_check)
    if b.ndim == 1:
        out = out[..., 0]                              # dropping a size-1 axis keeps out contiguous
    return out[..., 0, :] if a.ndim == 1 else out


def _surely_small(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether the product of a and b fits the smallest block whatever its dtype and layout, by a bound
    of product_cost over the batch from the sizes alone: its multiply-adds (batch x m x k x n) are at
    most a.size x b.size / k, the elements it writes that over k, and those it may copy that over n and m.
    The bound at its largest (k = m = n = 1) is tried first: one multiplication settles a small product."""
    products = a.size * b.size
    if products * (2.0 + 3 * MOVE_COST) <= block_operations(False):
        return True
    k = max(a.shape[-1], 1)
    m = max(a.shape[-2], 1) if a.ndim > 1 else 1
    n = max(b.shape[-1], 1) if b.ndim > 1 else 1
    products = products / k
    return products * (2.0 + MOVE_COST * (1 / k + 1 / m + 1 / n)) <= block_operations(False)


def blasable(x: np.ndarray) -> bool:
    """Whether BLAS reads x's matrices (its last two axes) where they are, as numpy's matmul decides:
    one axis of unit stride, the other a multiple of the item size spanning a row (a transposed view
    counts). Anything else (a stride of 0 from broadcast_to, a step) numpy copies for every product."""
    (rows, cols), (s0, s1), size = x.shape[-2:], x.strides[-2:], x.itemsize
    if rows <= 1 or cols <= 1:
        return x.size <= 1 or (s0 if cols <= 1 else s1) == size
    return (s1 == size and s0 % size == 0 and s0 >= cols * size) or \
        (s0 == size and s1 % size == 0 and s1 >= rows * size)


def product_cost(a: np.ndarray, b: np.ndarray) -> float:
    """Operations of one matrix product of a batch, a (.., m, k) by b (.., k, n): 2 m k n, the elements
    it reads and writes (a product of few rows is bound by them: a batch of vector-matrix products
    reads a whole matrix per vector), and the matrices numpy copies out of a layout BLAS cannot read
    (a strided or broadcast view), which it does for every product of the batch."""
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    copies = (0 if blasable(a) else m * k) + (0 if blasable(b) else k * n)
    return 2.0 * m * k * n + READ_COST * (m * k + k * n) + MOVE_COST * (m * n + copies)


def matmul_into(a: np.ndarray, b: np.ndarray, out: np.ndarray, budget: float,
                check: Callable[[], None] | None) -> None:
    """out[...] = a @ b for a (..., m, k) and b (..., k, n) whose batch axes broadcast to out's, in
    blocks of at most ``budget`` operations with a ``check`` for a stop before each (None: at once,
    nothing can stop the run). A batch that multiplies one matrix (a dense layer) is one 2-D product of
    its stacked rows, in tiles; other batches go in groups of whole products when one product is
    small, else each product tile by tile."""
    batch = out.shape[:-2]
    if check is None or product_cost(a, b) * math.prod(batch) <= budget:  # (one block: as numpy would)
        np.matmul(a, b, out=out)
        return
    a, b = _readable(a), _readable(b)
    if _shared(b) and a.shape[:-2] == batch and out.flags.c_contiguous and batch:
        _stacked_rows(a, b[(0,) * (b.ndim - 2)], out, budget, check)
        return
    per = product_cost(a, b)
    if per <= budget:
        for index in nest_blocks(batch, per, budget):
            check()
            np.matmul(a[_operand_index(index, a, len(batch))], b[_operand_index(index, b, len(batch))],
                      out=out[index])
        return
    for index in np.ndindex(*batch):
        matmul_tiles(a[_operand_index(index, a, len(batch))], b[_operand_index(index, b, len(batch))],
                     out[index], budget, check)


def _stacked_rows(a: np.ndarray, b: np.ndarray, out: np.ndarray, budget: float, check: Callable[[], None]) -> None:
    """out = a @ b for a batch a (..., m, k) times one matrix b (k, n), as one 2-D product of a's rows
    stacked (BLAS's best case: numpy's matmul would make one small product per matrix of the batch):
    in tiles when a's rows stack without a copy, else in groups of a's matrices copied a group at a time."""
    (m, k), n = a.shape[-2:], b.shape[-1]
    if a.flags.c_contiguous:
        matmul_tiles(a.reshape(-1, k), b, out.reshape(-1, n), budget, check)
        return
    per = 2.0 * m * k * n + READ_COST * m * k + MOVE_COST * (m * k + m * n)
    if per > budget:  # one matrix of the batch is a block's work or more: each one in tiles
        for index in np.ndindex(*a.shape[:-2]):
            matmul_tiles(a[index], b, out[index], budget, check)
        return
    for index in nest_blocks(a.shape[:-2], per, budget):
        check()
        target = out[index]  # (leading axes fixed, one sliced, the rest whole: contiguous)
        np.matmul(np.ascontiguousarray(a[index]).reshape(-1, k), b, out=target.reshape(-1, n))


def _shared(x: np.ndarray) -> bool:
    """Whether all x's batch axes are broadcast (a stride of 0, or size 1): one matrix for every product."""
    return not any(stride and size > 1 for stride, size in zip(x.strides[:-2], x.shape[:-2]))


def _readable(x: np.ndarray) -> np.ndarray:
    """x, or its one matrix copied once where BLAS cannot read it and it is shared by every product
    (_shared): numpy would otherwise copy that matrix again for every product."""
    if blasable(x) or not _shared(x):
        return x
    return np.broadcast_to(np.ascontiguousarray(x[(0,) * (x.ndim - 2)]), x.shape)


def _operand_index(index: tuple[Any, ...], x: np.ndarray, nbatch: int) -> tuple[Any, ...]:
    """An index of the output's ``nbatch`` batch axes as an index of x's (right-aligned, broadcast): x's
    axes of size 1 take 0 (all of it, for a slice), axes x lacks are left out."""
    offset = nbatch - (x.ndim - 2)
    picked = []
    for t, i in enumerate(index):
        axis = t - offset
        if axis >= 0:
            picked.append(i if x.shape[axis] != 1 else (0 if isinstance(i, int) else slice(None)))
    return tuple(picked)


def tile_sizes(m: int, k: int, n: int, budget: float) -> tuple[int, int, int]:
    """Rows, inner length and columns of the tiles of an m x k by k x n product, of about ``budget``
    operations each. Near cubes: each call re-reads (BLAS packs) its two operand blocks, and a cube
    does the most work per element read. The inner length is cut only where the tile's rows and
    columns at the cube's side would not fit the budget otherwise (the partial products are then
    added up through a tile-sized buffer). A thin product (a matrix times a vector) is bound by the
    elements it reads, not its arithmetic: its tiles are cut to fit those too."""
    side = (budget / 2) ** (1 / 3)
    kb = min(k, max(1, int(budget / (2 * min(m, side) * min(n, side)))))
    kb = even_step(k, kb)
    cb = min(n, max(1, int(math.sqrt(budget / (2 * kb)))))
    rb = min(m, max(1, int(budget // (2 * kb * cb))))
    if rb == m:                                        # few rows: the tile takes more columns instead
        cb = min(n, max(1, int(budget // (2 * kb * m))))
    over = _tile_cost(rb, kb, cb) / budget
    if over > 1:                                       # reads and writes too: fewer rows, then a shorter inner axis
        rb = max(1, int(rb / over))
        over = _tile_cost(rb, kb, cb) / budget
        kb = even_step(k, kb / over) if over > 1 else kb
    return even_step(m, rb), kb, even_step(n, cb)


def _tile_cost(rows: int, inner: int, cols: int) -> float:
    """product_cost of one tile whose operands BLAS reads where they are."""
    return 2.0 * rows * inner * cols + READ_COST * (rows + cols) * inner + MOVE_COST * rows * cols


def matmul_tiles(a: np.ndarray, b: np.ndarray, out: np.ndarray, budget: float, check: Callable[[], None],
                 accumulate: bool = False) -> None:
    """out = a @ b (``accumulate``: out += a @ b) for 2-D a and b, tile by tile (tile_sizes) with a stop
    check before each. Tiles are written in place in ``out``; partial products over a cut inner axis
    (and all of them, accumulating) go through one buffer of a tile's size."""
    (m, k), n = a.shape, b.shape[1]
    rb, kb, cb = tile_sizes(m, k, n, budget)
    buffer = np.empty(rb * cb, out.dtype) if kb < k or accumulate else None
    for r0 in range(0, m, rb):
        for c0 in range(0, n, cb):
            tile = out[r0:r0 + rb, c0:c0 + cb]
            for k0 in range(0, k, kb):
                check()
                left, right = a[r0:r0 + rb, k0:k0 + kb], b[k0:k0 + kb, c0:c0 + cb]
                if k0 == 0 and not accumulate:
                    np.matmul(left, right, out=tile)
                else:
                    part = buffer[:tile.size].reshape(tile.shape)
                    np.matmul(left, right, out=part)
                    tile += part


# --- products summed over broadcast batch axes (the gradient of a broadcast input) ---------------

_LETTERS = "abcdefghijklmnopqrstuvw"  # batch axes (x, y, z name the matrix axes)
#: Elements of the products before their sum up to which summed_matmul takes np.matmul and a sum: an
#: einsum finding its contraction path costs 50-100 µs, far more than such a product.
SMALL_TEMPORARY = 1 << 16


def summed_matmul(x: np.ndarray, y: np.ndarray, batch: tuple[int, ...]) -> np.ndarray:
    """``x @ y`` summed over the batch axes the input of batch shape ``batch`` was broadcast along: the
    gradient of an input that was broadcast, computed without the broadcast-shaped temporary (a
    (1, k, n) weight against an (N, m, k) batch: k x n, not N x k x n). Plain matmul when no axis is
    summed; one einsum through BLAS when small, in blocks with stop checks when large."""
    if x.ndim == y.ndim == len(batch) + 2 and x.shape[:-2] == y.shape[:-2] == tuple(batch):
        return matmul(x, y)  # nothing broadcast (plain matrices among them): the common case, at once
    if _products(x, y) * x.shape[-2] * y.shape[-1] <= SMALL_TEMPORARY:  # numpy's product, then its sum
        return _summed_to(np.matmul(x, y), tuple(batch))
    full = np.broadcast_shapes(x.shape[:-2], y.shape[:-2])
    padded = (1,) * (len(full) - len(batch)) + tuple(batch)
    summed = [i for i, (n, m) in enumerate(zip(full, padded)) if m == 1 and n != 1]
    if not summed or len(full) > len(_LETTERS):  # (more batch axes than letters: the engine sums them back)
        return matmul(x, y)
    (m, k), n = x.shape[-2:], y.shape[-1]
    x = np.broadcast_to(x, full + x.shape[-2:])
    y = np.broadcast_to(y, full + y.shape[-2:])
    if math.prod(full) * (2.0 * m * k * n) + MOVE_COST * math.prod(batch) * m * n > block_operations(True):
        check = stop_check()
        if check is not None:  # (else one einsum as below: nothing can stop the run)
            return _summed_blocks(x, y, tuple(batch), summed, check)
    axes = _LETTERS[:len(full)]
    kept = "".join(a for i, a in enumerate(axes) if i not in summed and i >= len(full) - len(batch))
    # einsum with optimize contracts through BLAS (tensordot), so the summed axes never exist at full size
    product = np.einsum(f"{axes}xy,{axes}yz->{kept}xz", x, y, optimize=True)
    return product.reshape(tuple(batch) + product.shape[-2:]) if len(batch) else product


def _products(x: np.ndarray, y: np.ndarray) -> int:
    """How many matrix products x @ y makes: the size of their batch axes broadcast together (read off
    the shapes, quicker than np.broadcast_shapes)."""
    nx, ny = x.ndim - 2, y.ndim - 2
    count = 1
    for i in range(1, max(nx, ny) + 1):
        count *= max(x.shape[-2 - i] if i <= nx else 1, y.shape[-2 - i] if i <= ny else 1)
    return count


def _summed_to(product: np.ndarray, batch: tuple[int, ...]) -> np.ndarray:
    """A product summed over the batch axes where ``batch`` has size 1 or none (right-aligned)."""
    lead = product.ndim - 2 - len(batch)
    axes = tuple(range(lead)) + tuple(lead + i for i, size in enumerate(batch)
                                      if size == 1 and product.shape[lead + i] != 1)
    return product.sum(axis=axes).reshape(batch + product.shape[-2:]) if axes else product


def _summed_blocks(x: np.ndarray, y: np.ndarray, batch: tuple[int, ...], summed: list[int],
                   check: Callable[[], None]) -> np.ndarray:
    """summed_matmul of x and y broadcast to one batch shape, in blocks with a stop check before each,
    into one result of ``batch`` + (m, n). Each kept product (an index of the batch axes not summed)
    is a sum over the summed axes. Small ones go several to a block, one einsum each (numpy's own loop:
    no BLAS for axes kept); larger ones one einsum each (BLAS, through tensordot); the largest are cut
    into tiles of the result and blocks of the summed axes (_sum_into)."""
    full = x.shape[:-2]
    (m, k), n = x.shape[-2:], y.shape[-1]
    kept = [i for i in range(len(full)) if i not in summed and full[i] != 1]
    out = np.empty(batch + (m, n), np.result_type(x, y))
    per_kept = 2.0 * math.prod(full[i] for i in summed) * m * k * n + MOVE_COST * m * n
    fast, loop = block_operations(True), block_operations(False)
    if per_kept <= loop:
        blocks: Iterator[tuple[Any, ...]] = nest_blocks([full[i] for i in kept], per_kept, loop)
    elif per_kept <= fast and m * n <= (fast / 2) ** (2 / 3):  # (einsum's result: at most a tile's size)
        blocks = np.ndindex(*[full[i] for i in kept])
    else:
        for index in np.ndindex(*[full[i] for i in kept]):
            where = _spread(index, kept, full)
            _sum_into(x[where], y[where], out[_result_index(where, batch)], check)
        return out
    for index in blocks:
        check()
        where = _spread(index, kept, full)
        _sum_einsum(x[where], y[where], [i for i, w in enumerate(where) if not isinstance(w, int)], kept,
                    out[_result_index(where, batch)])
    return out


def _spread(index: tuple[Any, ...], kept: list[int], full: tuple[int, ...]) -> tuple[Any, ...]:
    """An index of the kept axes as one of all batch axes: axes of size 1 take 0, summed axes whole."""
    where: list[Any] = [0 if size == 1 else slice(None) for size in full]
    for axis, i in zip(kept, index):
        where[axis] = i
    return tuple(where)


def _result_index(where: tuple[Any, ...], batch: tuple[int, ...]) -> tuple[Any, ...]:
    """The result's index (its batch axes are ``batch``, the last of ``where``'s) for the block ``where``
    of the broadcast batch axes: an axis the result keeps takes the block's index, one of size 1 takes 0."""
    offset = len(where) - len(batch)
    return tuple(where[offset + t] if size != 1 else 0 for t, size in enumerate(batch))


def _sum_einsum(x: np.ndarray, y: np.ndarray, axes: list[int], kept: list[int], out: np.ndarray) -> None:
    """out = x @ y (blocks whose remaining batch axes are ``axes``), summed over the summed ones and kept
    along the kept ones; through BLAS (tensordot) when no kept axis remains."""
    letters = _LETTERS[:len(axes)]
    keep = "".join(letter for letter, axis in zip(letters, axes) if axis in kept)
    np.copyto(out, np.einsum(f"{letters}xy,{letters}yz->{keep}xz", x, y, optimize=True))


def _sum_into(x: np.ndarray, y: np.ndarray, out: np.ndarray, check: Callable[[], None]) -> None:
    """out = x @ y summed over all of x's and y's batch axes, in blocks of at most a block's work with
    a stop check before each: tiles of out, each the sum of one einsum (BLAS) per block of the summed
    axes, added up through a tile-sized part; or each term alone in tiles when its inner axis is long."""
    budget = block_operations(True)
    terms = x.shape[:-2]
    (m, k), n = x.shape[-2:], y.shape[-1]
    rb, kb, cb = tile_sizes(m, k * math.prod(terms), n, budget)
    if kb < k:  # one term's inner axis alone is longer than a block's: each term in tiles, added up
        for number, index in enumerate(np.ndindex(*terms)):
            matmul_tiles(x[index], y[index], out, budget, check, accumulate=number > 0)
        return
    letters = _LETTERS[:len(terms)]
    for r0 in range(0, m, rb):
        for c0 in range(0, n, cb):
            tile = out[r0:r0 + rb, c0:c0 + cb]
            (rows, cols), spare = tile.shape, max(budget / 2, budget - MOVE_COST * tile.size)
            unit = 2.0 * rows * k * cols + MOVE_COST * (rows + cols) * k  # (einsum copies its operands)
            for number, index in enumerate(nest_blocks(terms, unit, spare)):
                check()
                rest = letters[len(index) - 1:] if index else letters
                part = np.einsum(f"{rest}xy,{rest}yz->xz", x[index][..., r0:r0 + rb, :],
                                 y[index][..., c0:c0 + cb], optimize=True)
                if number == 0:
                    np.copyto(tile, part)
                else:
                    tile += part
