"""Allocator tuning for the server process.

numpy gets each large array from malloc, and glibc serves blocks above its
mmap threshold with fresh mmap'd pages, so every large temporary pays a page
fault per 4 KiB on first touch and is unmapped again when freed. Raising the
thresholds keeps freed blocks in the heap for the next request (as jemalloc or
tcmalloc would): measured here, a naive numpy sigmoid forward+backward on 1e7
elements went from 101 ms to 60 ms, and joining 32 MiB of response bytes from
18 ms to 1.7 ms. The cost: memory freed after a large request stays with the
process (up to the trim threshold) instead of going back to the system.

It also keeps glibc to one arena. Each thread that mallocs otherwise gets an arena of its own
(up to eight per core), each a heap of its own to fault in and trim, and gRPC runs each call on
whichever thread of its pool is free: a 4096x512 MLP call, whose numpy arrays are 16 MiB each,
took 161-188 ms in the server against 144-151 ms with one arena (and 135-157 ms in a LocalClient,
whose calls run on the caller's one thread). One arena means one malloc lock, which numpy's
large arrays take rarely; Python's small objects come from its own allocator, not malloc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("chainrule.server")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def tune_allocator(mmap_threshold: int = 256 << 20, trim_threshold: int = 1 << 30, arenas: int = 1) -> bool:
    """Raise glibc's mmap and trim thresholds and cap its arenas (call it before any thread starts);
    False (and nothing changed) elsewhere."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): leave the allocator alone
        return False
    ok = (bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
          and bool(mallopt(_M_ARENA_MAX, arenas)))
    log.debug("allocator tuning %s", "applied" if ok else "refused")
    return ok
