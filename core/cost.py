"""A lower bound of a run's time, from the shapes inference gives: what cannot fit a deadline is refused
before it starts.

No stop check can interrupt one node (a 6400 x 6400 matmul is one BLAS call of seconds), so a call
whose work surely outlasts its deadline is refused up front instead of running on after its caller
has gone. The bound is honest in one direction only: it counts each operator's arithmetic (its
``OpDef.cost``: matmul, einsum and conv declare theirs; other operators count one operation per
element they produce) at this machine's peak rate and the bytes of every value and gradient at its
peak memory bandwidth. Each rate is measured once, multiplied by :data:`MARGIN`, and never taken
below a floor per CPU (:data:`FLOOR_FLOPS_PER_CPU`, :data:`FLOOR_BYTES_PER_SECOND`): a measurement
taken while other processes share the CPUs reads several times too slow (a 3000² matmul was once
refused as needing 10 s, and took 3), and a bound too high refuses calls that would have finished,
while one too low only admits calls that the stop token then ends (between nodes, and between the
blocks of a large matmul or convolution). A run refused by it could not have finished.
"""
from __future__ import annotations

import os
import threading
import time

import numpy as np

from .compile import Plan, Shapes

_rates: tuple[float, float] | None = None
_lock = threading.Lock()

#: How much faster than measured the machine is assumed to be: the measurement may run beside other work.
MARGIN = 4.0
#: The least rates assumed whatever the measurement: about a core's double-precision peak through BLAS
#: (two cores measured 1.2e11 on a 4000² product), so that no legal call is refused for a slow reading.
FLOOR_FLOPS_PER_CPU = 64e9
FLOOR_BYTES_PER_SECOND = 20e9


def peak_rates() -> tuple[float, float]:
    """(floating-point operations per second, bytes per second): this machine's best of a few short
    measurements (a 256 x 256 matmul; an 8 MiB copy), times MARGIN and at least the floors, so that
    a bound using them stays low."""
    global _rates
    if _rates is not None:  # measured once: every call with a deadline asks
        return _rates
    with _lock:
        if _rates is None:
            a = np.ones((256, 256))
            source, target = np.ones(1 << 20), np.empty(1 << 20)
            best_matmul = best_copy = float("inf")
            for _ in range(5):
                start = time.perf_counter()
                np.matmul(a, a)
                best_matmul = min(best_matmul, time.perf_counter() - start)
                start = time.perf_counter()
                np.copyto(target, source)
                best_copy = min(best_copy, time.perf_counter() - start)
            cpus = os.cpu_count() or 1
            _rates = (max(MARGIN * 2 * 256 ** 3 / best_matmul, FLOOR_FLOPS_PER_CPU * cpus),
                      max(MARGIN * 2 * source.nbytes / best_copy, FLOOR_BYTES_PER_SECOND))
        return _rates


def minimum_seconds(plan: Plan, shapes: Shapes, gradients: bool) -> tuple[float, float, int]:
    """(seconds, operations, bytes): a lower bound of the run's time, with what it counts. A backward
    pass counts twice the forward's arithmetic (a vjp computes about two products per forward one)."""
    operations = shapes.operations if shapes.operations is not None else forward_operations(plan, shapes)
    shapes.operations = operations  # (the same for every run of these shapes)
    if gradients:
        operations *= 3
    nbytes = shapes.value_bytes + (shapes.grad_bytes if gradients else 0)
    flops, bandwidth = peak_rates()
    return operations / flops + nbytes / bandwidth, operations, nbytes


def forward_operations(plan: Plan, shapes: Shapes) -> float:
    """The floating-point operations of one forward pass with these shapes (declared, or one per element)."""
    operations = 0.0
    for k in range(plan.n_inputs, len(plan.names)):
        op, count = plan.ops[k], plan.n_out[k]
        if op is None or not count:
            continue
        outs = shapes.specs[k:k + count]
        if any(s is None for s in outs):
            continue
        ins = [shapes.specs[j] for j in plan.in_slots[k]]
        declared = None
        if op.cost is not None and all(s is not None for s in ins):
            try:
                declared = float(op.cost(*ins, **plan.attrs[k]))
            except Exception:  # a plugin's broken cost rule only loses its precision here
                declared = None
        operations += declared if declared is not None else sum(s.size for s in outs)
    return operations
