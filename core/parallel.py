"""Intra-op threads: a large elementwise node runs in slices on several threads at once.

numpy runs a ufunc on one core and lets go of the GIL while it loops, so slices of one
elementwise node (``OpDef.forward_into``, and ``OpDef.vjp_into`` backward: each element depends
only on the same element of the inputs) can run on every core, each slice written into its
part of the result: the same bits as one pass, in a fraction of the time (the sigmoid sum at
10^6 elements through ``LocalClient.evaluate``: 1.08x hand-written numpy on one thread, 0.70x
on two, with a warm heap). PyTorch does the same for its CPU kernels
(``at::parallel_for``, as many threads as cores). A vjp without ``vjp_into`` is not cut: its
slices would be copied into whole gradients, an extra pass that eats the gain.

Blocks are handed out one at a time to whichever thread is free (dynamic scheduling, as
OpenMP's ``schedule(dynamic)``): on a busy machine a helper that gets no core leaves its blocks
to the others instead of making them wait.

``set_threads(1)`` turns it off: for a server running one process per core (``--workers``),
or a caller that runs its own threads.
"""
from __future__ import annotations

import contextvars
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator, Sequence


def _cores() -> int:
    """The cores this process may run on (its affinity, where the platform tells)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # (macOS, Windows)
        return max(1, os.cpu_count() or 1)


_threads = _cores()
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _forget_pool_in_child() -> None:
    """A forked child has none of its parent's helper threads: it starts a pool of its own when needed."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def threads() -> int:
    """How many threads a large elementwise node runs on (the calling one included)."""
    return _threads


def set_threads(count: int) -> None:
    """Run large elementwise nodes on ``count`` threads (1: on the calling thread only)."""
    global _threads, _pool
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"threads: expected a whole number of at least 1, got {count!r}")
    with _pool_lock:
        _threads = count
        old, _pool = _pool, None
    if old is not None:
        old.shutdown(wait=False)


def _helpers() -> ThreadPoolExecutor:
    global _pool
    pool = _pool
    if pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(max_workers=max(1, _threads - 1),
                                           thread_name_prefix="chainrule-intra-op")
            pool = _pool
    return pool


def run_shares(work: Callable[[Any], None], blocks: Sequence[Any], check: Callable[[], None] | None = None) -> None:
    """``work(block)`` for every block, on up to :func:`threads` threads: each takes the next block
    not yet taken until none is left (so a helper that gets no core costs nothing: the others take
    its blocks), ``check`` (a stop token's) before each block. The calling thread works too, then
    cancels the helpers that have not started and waits for those that have, so no thread still
    writes when this returns or raises; raises the first exception. Helpers run in a copy of the
    caller's context: numpy's errstate (a context variable) and the engine's run come along."""
    count = min(_threads, len(blocks))
    if count <= 1:
        _take(work, blocks, iter(range(len(blocks))), check)
        return
    taken = iter(range(len(blocks)))  # next() on it is atomic under the GIL: each block goes to one thread
    pool = _helpers()
    futures: list[Future[None]] = [
        pool.submit(contextvars.copy_context().run, _take, work, blocks, taken, check) for _ in range(count - 1)]
    try:
        _take(work, blocks, taken, check)
    finally:
        for future in futures:  # a helper not started yet has nothing left to do; one started is waited for
            if not future.cancel():
                future.exception()
    for future in futures:
        if not future.cancelled():
            future.result()


def _take(work: Callable[[Any], None], blocks: Sequence[Any], taken: Iterator[int],
          check: Callable[[], None] | None) -> None:
    for index in taken:
        try:
            if check is not None:
                check()
            work(blocks[index])
        except BaseException:
            for _ in taken:  # leave the others no block: they end at once
                pass
            raise
