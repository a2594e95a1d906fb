"""Diagnostics of one evaluation: where values or gradients stop being finite,
and how large the gradients of the inputs are.

Kept cheap enough to run on every request: one pass over each value and
gradient, stopping at the first non-finite one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .engine import Evaluation


@dataclass
class NonFinite:
    """The first node (in evaluation order) whose value or gradient is not finite."""

    node: str
    op: str
    count: int


@dataclass
class GradNorm:
    node: str
    grad_norm: float
    value_norm: float


@dataclass
class Flag:
    kind: str  # VANISHING, EXPLODING, SATURATED
    node: str
    message: str


@dataclass
class Diagnostics:
    first_nonfinite_value: NonFinite | None = None
    first_nonfinite_gradient: NonFinite | None = None
    grad_norms: list[GradNorm] = field(default_factory=list)
    flags: list[Flag] = field(default_factory=list)


def _nonfinite_count(value: object) -> int:
    array = np.asarray(value)
    if array.dtype.kind != "f":
        return 0
    if array.size <= 1 or np.isfinite(array.sum()):
        return 0 if np.all(np.isfinite(array)) else int(array.size - np.count_nonzero(np.isfinite(array)))
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def _first_nonfinite(evaluation: Evaluation, arrays: list[object] | None, order: range) -> NonFinite | None:
    if arrays is None:
        return None
    plan = evaluation.plan
    for k in order:
        a = arrays[k]
        if a is None:
            continue
        count = _nonfinite_count(a)
        if count:
            op = plan.ops[k]
            return NonFinite(plan.names[k], op.name if op is not None else "input", count)
    return None


def diagnose(evaluation: Evaluation) -> Diagnostics:
    """First non-finite value and gradient, and the gradient norm of every float input."""
    plan = evaluation.plan
    n = len(plan.names)
    diagnostics = Diagnostics(
        first_nonfinite_value=_first_nonfinite(evaluation, evaluation.values, range(n)),
        # Gradients flow backwards: the origin of a non-finite gradient is the last slot.
        first_nonfinite_gradient=_first_nonfinite(evaluation, evaluation.grads, range(n - 1, -1, -1)),
    )
    if evaluation.grads is not None:
        for k in range(plan.n_inputs):
            g = evaluation.grads[k]
            if g is not None:
                diagnostics.grad_norms.append(
                    GradNorm(plan.names[k], float(np.linalg.norm(np.ravel(g))),
                             float(np.linalg.norm(np.ravel(evaluation.values[k]).astype(np.float64))))
                )
    return diagnostics
