"""Diagnostics of one evaluation: where values or gradients stop being finite,
how large each parameter's gradient is, and which nodes look sick.

Always on, so it has to stay cheap: one read of each value and gradient
(a sum, or a dot product with itself, which BLAS reads faster and which for
graph inputs also gives their norm; a NaN or an infinity anywhere makes it
non-finite; memory shared by several slots, such as the gradient ``a + b``
passes on unchanged, is read once), then an exact search only when that
found something. Saturation is measured on the sigmoid and tanh values alone,
on a fixed random sample of large tensors.

Flags, with the defaults of :class:`Thresholds` (documented in docs/debugging.md):

- VANISHING: a parameter (a float graph input with a gradient) whose gradient
  norm is below ``vanishing`` (1e-6) times ``max(value norm, 1)``: gradient
  descent would barely move it.
- EXPLODING: a parameter whose gradient norm is above ``exploding`` (1e6)
  times ``max(value norm, 1)``.
- SATURATED: a sigmoid or tanh node where at least ``saturated_fraction``
  (50%) of the elements have a local gradient (σ(1-σ), 1-tanh²) below
  ``saturated_local_grad`` (1e-4): gradients through it all but vanish.
"""
from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .compile import Plan
from .engine import Evaluation


@dataclass(frozen=True)
class Thresholds:
    """When a flag is raised (see the module docstring)."""

    vanishing: float = 1e-6
    exploding: float = 1e6
    saturated_local_grad: float = 1e-4
    saturated_fraction: float = 0.5


DEFAULT_THRESHOLDS = Thresholds()

#: Tensors of more than this many elements have their saturated fraction estimated from a sample
#: of this many; smaller ones are judged whole.
SATURATION_SAMPLE = 1 << 16


@dataclass
class NonFinite:
    """The first node (in evaluation order) whose value or gradient is not finite.

    ``inputs_summary`` describes the node's inputs (for a value: what the
    operator was given); ``consumers_summary`` the consumers whose gradient
    rules sent a non-finite gradient back (for a gradient).
    """

    node: str
    op: str
    count: int
    inputs_summary: str = ""
    consumers_summary: str = ""


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
class DiagnosticReport:
    first_nonfinite_value: NonFinite | None = None
    first_nonfinite_gradient: NonFinite | None = None
    grad_norms: list[GradNorm] = field(default_factory=list)
    flags: list[Flag] = field(default_factory=list)


# --- summaries ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stats:
    """What a tensor looks like at a glance; min/max/mean/norm ignore non-finite elements."""

    shape: tuple[int, ...]
    dtype: str
    min: float
    max: float
    mean: float
    norm: float
    nonfinite: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def stats(value: Any) -> Stats:
    """Shape, dtype, min/max/mean/norm of the finite elements, and how many are not finite."""
    array = np.asarray(value)
    if array.dtype.kind == "f":
        finite = np.isfinite(array)
        nonfinite = int(array.size - np.count_nonzero(finite))
        kept = array[finite] if nonfinite else array.ravel()
    else:
        nonfinite, kept = 0, array.ravel().astype(np.float64)
    if kept.size == 0:
        lo = hi = mean = norm = math.nan
    else:
        lo, hi, mean = float(kept.min()), float(kept.max()), float(kept.mean(dtype=np.float64))
        norm = float(np.linalg.norm(kept.astype(np.float64, copy=False)))
    return Stats(tuple(array.shape), array.dtype.name, lo, hi, mean, norm, nonfinite)


def number(x: float) -> str:
    """A number to 4 significant digits, as in the diagrams."""
    return f"{x:.4g}"


def summarize(value: Any) -> str:
    """One line: the number for a one-element tensor, else shape, dtype and statistics."""
    array = np.asarray(value)
    if array.size == 1:
        shown = number(array.item())
        return shown if array.ndim == 0 else f"{array.dtype.name}{list(array.shape)} {shown}"
    s = stats(array)
    text = (f"{s.dtype}{list(s.shape)} min {number(s.min)} max {number(s.max)} "
            f"mean {number(s.mean)} norm {number(s.norm)}")
    return text + (f" ({s.nonfinite} non-finite)" if s.nonfinite else "")


# --- the pass ------------------------------------------------------------------------------------

def diagnose(evaluation: Evaluation, thresholds: Thresholds = DEFAULT_THRESHOLDS) -> DiagnosticReport:
    """First non-finite value and gradient, every parameter's gradient norm, and the flags."""
    plan, values, grads = evaluation.plan, evaluation.values, evaluation.grads
    n_in = plan.n_inputs
    diagnostics = DiagnosticReport()
    with np.errstate(all="ignore"):
        value_sq = [_square_sum(values[k]) for k in range(n_in)]
        if not (math.isfinite(_total(values[n_in:])) and all(_finite(s) for s in value_sq)):
            diagnostics.first_nonfinite_value = _first_nonfinite_value(plan, values)
        if grads is not None:
            grad_sq = [_square_sum(grads[k]) for k in range(n_in)]
            if not (math.isfinite(_total(grads[n_in:])) and all(_finite(s) for s in grad_sq)):
                diagnostics.first_nonfinite_gradient = _first_nonfinite_gradient(plan, values, grads)
            diagnostics.grad_norms = [
                GradNorm(plan.names[k], _norm_of(grads[k], sq), _norm_of(values[k], value_sq[k]))
                for k, sq in enumerate(grad_sq) if sq is not None
            ]
            diagnostics.flags.extend(_gradient_flags(evaluation, diagnostics.grad_norms, thresholds))
        diagnostics.flags.extend(_saturation_flags(plan, values, thresholds))
    return diagnostics


def _total(items: list[Any]) -> float:
    """Sum of every float element: finite exactly when all are (barring overflow, rechecked exactly)."""
    scalars = [v for v in items if type(v) in _FLOAT_SCALARS]  # the common case of many scalar nodes, vectorised
    total = float(np.fromiter(scalars, np.float64, len(scalars)).sum())
    if len(scalars) < len(items):
        seen: set[Any] = set()
        for v in [v for v in items if type(v) not in _FLOAT_SCALARS]:
            if type(v) is np.ndarray:
                if v.dtype.kind == "f" and _first_read(v, seen):
                    total += _finite_probe(v)
            elif isinstance(v, (float, np.floating)):
                total += float(v)
    return total


#: Scalar node values taken in bulk (one vectorised pass instead of a numpy call per node).
_FLOAT_SCALARS = frozenset({np.float64, np.float32, float})  # float: plans run on Python floats


def _first_read(array: np.ndarray, seen: set[Any]) -> bool:
    """False when an array over exactly the same memory was already read (always True for
    small arrays, which are cheaper to read again than to recognise)."""
    if array.size < 4096:
        return True
    key = (array.__array_interface__["data"][0], array.shape, array.strides, array.dtype.str)  # byte order too
    if key in seen:
        return False
    seen.add(key)
    return True


def _finite_probe(array: np.ndarray) -> float:
    """A number that is finite when every element of the float array is (barring overflow).

    Large contiguous arrays go through BLAS's dot product with themselves, which
    reads memory about twice as fast as numpy's sum; squares overflow sooner than
    sums, but an overflow only costs the exact recheck.
    """
    if array.size >= 4096 and array.flags.c_contiguous and array.dtype in _BLAS_FLOATS:
        flat = array.reshape(-1)
        return float(np.dot(flat, flat))
    return float(np.add.reduce(array, axis=None))


_BLAS_FLOATS = (np.dtype(np.float64), np.dtype(np.float32))


def _square_sum(value: Any) -> float | None:
    """Sum of squares of a float tensor (its squared norm; non-finite if any element is); None otherwise."""
    if value is None:
        return None
    array = np.asarray(value)
    if array.dtype.kind != "f":
        return None
    if array.size == 1:  # scalars: Python arithmetic is several times cheaper than a dot product
        x = array.item()
        return x * x
    flat = array.ravel().astype(np.float64, copy=False)
    return float(np.dot(flat, flat))


def _finite(square_sum: float | None) -> bool:
    return square_sum is None or math.isfinite(square_sum)


#: Below this (and above 0), a sum of squares may have lost elements to underflow.
_TINY_SQUARE_SUM = 1e-280


def _norm_of(value: Any, square_sum: float | None) -> float:
    """The Euclidean norm from the sum of squares already taken; where the squares overflowed
    (elements beyond 1e154) or partly underflowed, computed again scaled by the largest. A sum of
    exactly 0 is taken as a zero tensor, the common case (zero biases, unreached gradients), not
    read again: a tensor whose every element is below 1e-162 then reads 0, which changes no flag."""
    if square_sum is not None and math.isfinite(square_sum) and (square_sum > _TINY_SQUARE_SUM or square_sum == 0):
        return math.sqrt(square_sum)
    array = np.abs(np.ravel(value).astype(np.float64))
    largest = float(array.max()) if array.size else 0.0
    if largest == 0.0 or not math.isfinite(largest):  # all zero, or an infinity or NaN among them
        return largest
    scaled = array / largest
    return largest * math.sqrt(float(np.dot(scaled, scaled)))


def _count_nonfinite(value: Any) -> int:
    if value is None:
        return 0
    array = np.asarray(value)
    if array.dtype.kind != "f":
        return 0
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def _op_name(plan: Plan, k: int) -> str:
    op = plan.ops[k]
    return op.name if op is not None else "input"


def _first_nonfinite_value(plan: Plan, values: list[Any]) -> NonFinite | None:
    for k in range(len(plan.names)):
        count = _count_nonfinite(values[k])
        if count:
            inputs = "; ".join(f"{plan.names[j]} = {summarize(values[j])}" for j in plan.in_slots[k])
            return NonFinite(plan.names[k], _op_name(plan, k), count, inputs_summary=inputs)
    return None


def _first_nonfinite_gradient(plan: Plan, values: list[Any], grads: list[Any]) -> NonFinite | None:
    """Gradients flow backwards: the origin of a non-finite gradient is the last such slot.

    Its consumers are listed with their value and gradient: one of their
    gradient rules turned finite numbers into a NaN or an infinity.
    """
    for k in range(len(plan.names) - 1, -1, -1):
        count = _count_nonfinite(grads[k])
        if not count:
            continue
        inputs = "; ".join(f"{plan.names[j]} = {summarize(values[j])}" for j in plan.in_slots[k])
        consumers = "; ".join(
            f"{_op_name(plan, c)} '{plan.names[c]}' (value {summarize(values[c])}, gradient {summarize(grads[c])})"
            for c in range(k + 1, len(plan.names)) if k in plan.in_slots[c] and grads[c] is not None
        )
        return NonFinite(plan.names[k], _op_name(plan, k), count, inputs_summary=inputs, consumers_summary=consumers)
    return None


# --- flags ---------------------------------------------------------------------------------------

def _gradient_flags(evaluation: Evaluation, norms: list[GradNorm], thresholds: Thresholds) -> list[Flag]:
    flags: list[Flag] = []
    for n in norms:
        scale = max(n.value_norm, 1.0) if math.isfinite(n.value_norm) else math.inf
        if n.grad_norm > thresholds.exploding * scale:
            flags.append(Flag("EXPLODING", n.node,
                              f"gradient norm {number(n.grad_norm)} exceeds {thresholds.exploding:g} × "
                              f"max(value norm {number(n.value_norm)}, 1): one gradient step would throw it far away"))
        elif n.grad_norm < thresholds.vanishing * scale and math.isfinite(scale):
            plan = evaluation.plan
            if n.grad_norm == 0 and not _facts(plan).reaches(plan, evaluation.output)[plan.index[n.node]]:
                continue  # the output does not depend on it: its zero gradient is no sickness
            flags.append(Flag("VANISHING", n.node,
                              f"gradient norm {number(n.grad_norm)} is below {thresholds.vanishing:g} × "
                              f"max(value norm {number(n.value_norm)}, 1): gradient descent would barely move it"))
    return flags


class _PlanFacts:
    """What diagnostics need to know about a plan, found once per plan: its sigmoid and
    tanh slots, and (on demand, per output) which slots the output depends on."""

    def __init__(self, plan: Plan) -> None:
        self.saturating = tuple(k for k, op in enumerate(plan.ops) if op is not None and op.name in ("sigmoid", "tanh"))
        self._reaches: dict[int, list[bool]] = {}

    def reaches(self, plan: Plan, output: int) -> list[bool]:
        reached = self._reaches.get(output)
        if reached is None:  # one backward sweep; plans are shared across threads, a race only repeats it
            reached = [False] * len(plan.names)
            reached[output] = True
            in_slots = plan.in_slots
            for k in range(output, -1, -1):
                if reached[k]:
                    for j in in_slots[k]:
                        reached[j] = True
            self._reaches[output] = reached
        return reached


_FACTS: "weakref.WeakKeyDictionary[Plan, _PlanFacts]" = weakref.WeakKeyDictionary()


def _facts(plan: Plan) -> _PlanFacts:
    facts = _FACTS.get(plan)
    if facts is None:
        facts = _FACTS[plan] = _PlanFacts(plan)
    return facts


#: The sample is this many runs of consecutive elements, one in each equal part of the tensor.
SATURATION_RUNS = 64


@functools.lru_cache(maxsize=64)
def _sample_indices(size: int) -> np.ndarray:
    """SATURATION_SAMPLE positions below ``size`` (over SATURATION_SAMPLE), drawn once per size:
    one run of consecutive elements at a random place in each SATURATION_RUNS-th of the tensor,
    in increasing order. Runs read whole cache lines (scattered single elements cost ~0.5 ms per
    16 MiB tensor, runs ~0.05 ms); one per part covers the tensor evenly (a saturated block
    is seen in proportion to its size), and random places keep the sample from aliasing with
    the tensor's layout (rows of a batch, say)."""
    run = SATURATION_SAMPLE // SATURATION_RUNS
    part = size // SATURATION_RUNS
    offsets = np.random.default_rng(0).integers(0, part - run + 1, SATURATION_RUNS)
    starts = np.arange(SATURATION_RUNS) * part + offsets
    indices = (starts[:, None] + np.arange(run)).reshape(-1)
    indices.flags.writeable = False
    return indices


def _saturation_sample(array: np.ndarray) -> np.ndarray:
    """The elements a tensor's saturation is judged on: all of them up to SATURATION_SAMPLE,
    else the sample, gathered without copying the whole tensor (which order does not matter)."""
    if array.size <= SATURATION_SAMPLE:
        return array.ravel()
    indices = _sample_indices(array.size)
    if array.flags.c_contiguous or array.flags.f_contiguous:
        return array.ravel(order="K")[indices]  # a view for a transpose, too
    return array[np.unravel_index(indices, array.shape)]


def _saturation_flags(plan: Plan, values: list[Any], thresholds: Thresholds) -> list[Flag]:
    """σ(1-σ) < t  ⟺  |σ - 1/2| > sqrt(1/4 - t);  1 - tanh² < t  ⟺  |tanh| > sqrt(1 - t)."""
    t = thresholds.saturated_local_grad
    rules = {"sigmoid": (0.5, math.sqrt(max(0.25 - t, 0.0)), "σ(1-σ)"),
             "tanh": (0.0, math.sqrt(max(1.0 - t, 0.0)), "1-tanh²")}
    slots = _facts(plan).saturating
    scalar = [k for k in slots if type(values[k]) in _FLOAT_SCALARS]
    flags: list[Flag] = []
    if scalar:  # the common case of many scalar units: one vectorised test
        v = np.fromiter((values[k] for k in scalar), np.float64, len(scalar))
        names = [plan.ops[k].name for k in scalar]  # type: ignore[union-attr]
        sigmoid = np.fromiter((name == "sigmoid" for name in names), bool, len(scalar))
        stuck = np.abs(v - np.where(sigmoid, 0.5, 0.0)) > np.where(sigmoid, rules["sigmoid"][1], rules["tanh"][1])
        for i in np.flatnonzero(stuck):
            op = "sigmoid" if sigmoid[i] else "tanh"
            flags.append(Flag("SATURATED", plan.names[scalar[i]], f"{op}: its value {number(v[i])} sits where the "
                              f"local gradient {rules[op][2]} < {t:g}, so almost no gradient flows back through it"))
    for k in slots:
        if type(values[k]) in _FLOAT_SCALARS:
            continue
        array = np.asarray(values[k])
        if array.dtype.kind != "f" or array.size == 0:
            continue
        op = plan.ops[k].name  # type: ignore[union-attr]
        center, bound, local = rules[op]
        sample = _saturation_sample(array)
        if sample.dtype.itemsize < 4:  # float16 cannot hold the bounds (0.49995 rounds to 0.5)
            sample = sample.astype(np.float64)
        fraction = np.count_nonzero(np.abs(sample - center) > bound) / sample.size
        if fraction >= thresholds.saturated_fraction:
            what = f"its value {number(array.item())} sits" if array.size == 1 else \
                f"{fraction:.0%} of its {array.size} elements sit"
            flags.append(Flag("SATURATED", plan.names[k], f"{op}: {what} where the local gradient {local} < {t:g}, "
                              "so almost no gradient flows back through it"))
    return flags
