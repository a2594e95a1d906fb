"""Gradient checking for operator authors: compare a vjp with central finite differences.

Use it in your own test suite::

    from chainrule.plugins.testing import assert_vjp, check_operator

    def test_swish_gradient():
        assert_vjp(swish_op, [np.random.default_rng(0).standard_normal((2, 3))], {"beta": 1.5})

    def test_swish_samples():
        for report in check_operator(swish_op):
            assert report.passed, report

How it works (as HIPS autograd's ``check_vjp``): the output is projected on a
fixed random cotangent ``v``, so ``f(inputs) = sum(forward(inputs) * v)`` is a
scalar whatever the output's shape. Its gradient is exactly what the vjp
returns for ``v``, and every element of it is compared with the central
difference ``(f(x + eps) - f(x - eps)) / 2 eps`` at that position.

The check runs in float64 (float32 inputs are promoted: finite differences need
the precision) and, like the engine, under ``np.errstate(all="ignore")``.
Inputs of int and bool dtype have no gradient and are skipped. A vjp's
gradient may have the output's broadcast shape: it is summed back to the
input's shape with :func:`chainrule.core.unbroadcast`, as the engine does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from chainrule.core import OpDef, TensorSpec, check_attrs, unbroadcast

__all__ = [
    "DEFAULT_SHAPES", "GradCheckReport", "GradientCheckError", "InputCheck",
    "SAMPLES_PER_OPERATOR", "assert_vjp", "check_operator", "check_vjp", "gradient_exemption", "sample_inputs",
]

#: Shapes of the random float64 inputs made up for an operator without ``sample``.
DEFAULT_SHAPES: tuple[tuple[int, ...], ...] = ((), (4,), (2, 3))

#: How many times :func:`sample_inputs` calls an operator's own ``sample`` rule.
SAMPLES_PER_OPERATOR = 3

class GradientCheckError(AssertionError):
    """A vjp disagrees with finite differences (or breaks the vjp contract)."""

    def __init__(self, message: str, report: "GradCheckReport") -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class InputCheck:
    """The result for one input: the worst position and the numbers there."""

    index: int
    shape: tuple[int, ...]
    dtype: str
    #: False for inputs without a gradient (int, bool): nothing was compared.
    checked: bool
    passed: bool
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    #: The position with the largest error relative to the tolerance (None: nothing compared).
    position: tuple[int, ...] | None = None
    analytic: float = 0.0
    numeric: float = 0.0
    #: A broken contract (e.g. a gradient of the wrong shape), if any.
    problem: str = ""

    def describe(self) -> str:
        head = f"input {self.index} {self.dtype}{list(self.shape)}"
        if not self.checked:
            return f"{head}: skipped (no gradient for {self.dtype})"
        if self.problem:
            return f"{head}: FAILED: {self.problem}"
        if self.position is None:
            return f"{head}: ok (no elements)"
        verdict = "ok" if self.passed else "FAILED"
        return (f"{head}: {verdict}: max abs error {self.max_abs_error:.3g}, max rel error {self.max_rel_error:.3g}; "
                f"worst at {self.position}: vjp {self.analytic:.6g}, finite differences {self.numeric:.6g}")


@dataclass(frozen=True)
class GradCheckReport:
    """What :func:`check_vjp` found for one operator at one point."""

    op: str
    inputs: tuple[InputCheck, ...]
    attrs: Mapping[str, Any] = field(default_factory=dict)
    output_shape: tuple[int, ...] = ()
    #: A problem with the operator as a whole: the vjp returned the wrong number of
    #: gradients, or infer disagrees with what forward returned.
    problem: str = ""

    @property
    def passed(self) -> bool:
        return not self.problem and all(c.passed for c in self.inputs)

    @property
    def failures(self) -> list[InputCheck]:
        return [c for c in self.inputs if not c.passed]

    def describe(self) -> str:
        """A header line, then one line per input."""
        head = f"{self.op}: {'passed' if self.passed else 'FAILED'} (output shape {list(self.output_shape)})"
        if self.problem:
            head += f": {self.problem}"
        return "\n".join([head] + [f"  {c.describe()}" for c in self.inputs])

    __str__ = describe

    def failure_message(self) -> str:
        """The first failure as one sentence, naming the operator, input, position and both numbers."""
        if self.problem:
            return f"{self.op}: {self.problem}"
        for c in self.failures:
            if c.problem:
                return f"{self.op}: input {c.index}: {c.problem}"
            return (f"{self.op}: input {c.index} at {c.position}: vjp gives {c.analytic:.6g}, "
                    f"finite differences give {c.numeric:.6g} (abs error {abs(c.analytic - c.numeric):.3g})")
        return f"{self.op}: passed"


def check_vjp(
    op: OpDef,
    inputs: Sequence[np.ndarray],
    attrs: Mapping[str, Any] | None = None,
    *,
    eps: float = 1e-6,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    seed: int = 0,
) -> GradCheckReport:
    """Compare ``op.vjp`` with central finite differences at ``inputs``, for every element of every float input.

    An element passes when ``|vjp - numeric| <= atol + rtol * |numeric|``. ``attrs``
    are checked and completed with their defaults as the engine does. The input
    arrays are not modified.
    """
    attrs = check_attrs(op, dict(attrs or {}))
    given = [np.asarray(x) for x in inputs]
    xs = [x.astype(np.float64) if x.dtype == np.float32 else x.copy() for x in given]
    pristine = [x.copy() for x in xs]
    with np.errstate(all="ignore"):
        problem = _infer_problem(op, [x.copy() for x in given], attrs)
        out = np.asarray(op.forward(*xs, **attrs))
        problem = problem or _written("forward", pristine, xs)
        floats = [i for i, x in enumerate(xs) if x.dtype.kind == "f"]
        if not floats or out.dtype.kind != "f":
            checks = tuple(_unchecked(i, x) for i, x in enumerate(xs))
            return GradCheckReport(op.name, checks, attrs, out.shape, problem)
        v = np.random.default_rng(seed).standard_normal(out.shape)
        kept = [v.copy(), out.copy()]
        if getattr(op, "selective_vjp", False):  # ask for the float inputs' gradients, as the engine does
            needs = tuple(x.dtype.kind == "f" for x in xs)
            raw = op.vjp(v, out, *xs, needs=needs, **attrs)
        else:
            raw = op.vjp(v, out, *xs, **attrs)
        if isinstance(raw, np.ndarray) or not hasattr(raw, "__iter__"):
            problem = (f"vjp returned a bare {type(raw).__name__}, not a tuple with one gradient per input "
                       f"(return (g * ...,))")
            return GradCheckReport(op.name, tuple(_unchecked(i, x) for i, x in enumerate(xs)), attrs, out.shape, problem)
        grads = tuple(raw)
        if len(grads) != len(xs):
            problem = f"vjp returned {len(grads)} gradients for {len(xs)} inputs"
            return GradCheckReport(op.name, tuple(_unchecked(i, x) for i, x in enumerate(xs)), attrs, out.shape, problem)
        problem = problem or _written("vjp", kept + pristine, [v, out, *xs])
        checks = tuple(
            _check_input(op, xs, attrs, i, grads[i], v, eps, rtol, atol) if i in floats else _unchecked(i, xs[i])
            for i in range(len(xs))
        )
    return GradCheckReport(op.name, checks, attrs, out.shape, problem)


def assert_vjp(
    op: OpDef,
    inputs: Sequence[np.ndarray],
    attrs: Mapping[str, Any] | None = None,
    **tolerances: Any,
) -> GradCheckReport:
    """:func:`check_vjp`, raising :class:`GradientCheckError` on the first disagreement.

    The message names the operator, the input, the position and both numbers, e.g.
    ``acme.swish: input 0 at (1, 2): vjp gives 0.1234, finite differences give -0.1234 (abs error 0.247)``.
    ``tolerances`` are ``eps``, ``rtol``, ``atol`` and ``seed`` of :func:`check_vjp`.
    """
    report = check_vjp(op, inputs, attrs, **tolerances)
    if not report.passed:
        raise GradientCheckError(report.failure_message(), report)
    return report


def sample_inputs(op: OpDef, rng: np.random.Generator) -> list[tuple[list[np.ndarray], dict[str, Any]]]:
    """Valid ``(inputs, attrs)`` cases for checking ``op``.

    Calls the operator's own ``sample(rng)`` rule :data:`SAMPLES_PER_OPERATOR`
    times when it has one; otherwise makes up standard-normal float64 inputs
    of each of :data:`DEFAULT_SHAPES` (all inputs the same shape, two inputs for
    a variadic operator) with the default attributes. An operator with a
    required attribute, or whose inputs need a domain (log), a dtype (labels) or
    matching shapes (matmul), should provide ``sample``.
    """
    if op.sample is not None:
        cases = []
        for _ in range(SAMPLES_PER_OPERATOR):
            inputs, attrs = op.sample(rng)
            cases.append(([np.asarray(x) for x in inputs], dict(attrs)))
        return cases
    required = [name for name, schema in op.attrs.items() if schema.required]
    if required:
        raise ValueError(f"{op.name}: attribute '{required[0]}' is required, so inputs cannot be made up; "
                         f"give the operator a sample= rule")
    if op.arity == 0:
        return [([], {})]
    count = 2 if op.variadic else op.arity
    return [([np.asarray(rng.standard_normal(shape)) for _ in range(count)], {}) for shape in DEFAULT_SHAPES]


def gradient_exemption(op: OpDef) -> str | None:
    """Why ``op``'s vjp is deliberately not the derivative of its forward rule (None: it is)."""
    return None if op.gradcheck else f"{op.name} declares gradcheck=False: its vjp is not meant to be the derivative"


def check_operator(op: OpDef, rng: np.random.Generator | None = None) -> list[GradCheckReport]:
    """:func:`check_vjp` on every case of :func:`sample_inputs` (none for an exempt operator)."""
    if gradient_exemption(op) is not None:
        return []
    rng = rng if rng is not None else np.random.default_rng(0)
    return [check_vjp(op, inputs, attrs) for inputs, attrs in sample_inputs(op, rng)]


# --- internals -------------------------------------------------------------------------------

def _unchecked(i: int, x: np.ndarray) -> InputCheck:
    return InputCheck(i, x.shape, x.dtype.name, checked=False, passed=True)


def _written(rule: str, before: list[np.ndarray], after: list[np.ndarray]) -> str:
    """'' unless ``rule`` wrote into an argument (the engine shares those arrays between rules)."""
    names = [f"input {i}" for i in range(len(after))]
    if rule == "vjp":
        names = ["g", "out"] + names[:-2]
    for name, old, new in zip(names, before, after):
        if not np.array_equal(old, new, equal_nan=True):
            return f"{rule} wrote into its argument {name}; rules must not modify their arguments"
    return ""


def _infer_problem(op: OpDef, inputs: list[np.ndarray], attrs: dict[str, Any]) -> str:
    """'' when infer promises exactly what forward returns (in the inputs' own dtypes)."""
    if op.infer is None:
        return ""
    spec = op.infer(*[TensorSpec.of(x) for x in inputs], **attrs)
    out = np.asarray(op.forward(*inputs, **attrs))
    promised = TensorSpec(tuple(spec[0]), np.dtype(spec[1]))
    if promised != TensorSpec.of(out):
        return f"infer promised {promised} but forward returned {TensorSpec.of(out)}"
    return ""


def _objective(op: OpDef, args: list[np.ndarray], attrs: dict[str, Any], v: np.ndarray) -> float:
    """sum(forward(args) * v): the output projected on the cotangent."""
    return float(np.sum(np.asarray(op.forward(*args, **attrs), dtype=np.float64) * v))


def _numeric_gradient(op: OpDef, xs: list[np.ndarray], attrs: dict[str, Any], i: int,
                      v: np.ndarray, eps: float) -> np.ndarray:
    work = np.array(xs[i], dtype=np.float64, copy=True)
    flat = work.reshape(-1)  # a view: work is a fresh contiguous array
    args = list(xs)
    args[i] = work
    grad = np.empty(work.size)
    for k in range(work.size):
        centre = flat[k]
        flat[k] = up = centre + eps
        f_up = _objective(op, args, attrs, v)
        flat[k] = down = centre - eps
        f_down = _objective(op, args, attrs, v)
        flat[k] = centre
        grad[k] = (f_up - f_down) / (up - down)
    return grad.reshape(work.shape)


def _check_input(op: OpDef, xs: list[np.ndarray], attrs: dict[str, Any], i: int, grad: Any, v: np.ndarray,
                 eps: float, rtol: float, atol: float) -> InputCheck:
    x = xs[i]
    head = dict(index=i, shape=x.shape, dtype=x.dtype.name, checked=True)
    if grad is None:
        analytic = np.zeros(x.shape)           # "no gradient" must then be the truth
    else:
        try:
            analytic = unbroadcast(np.asarray(grad, dtype=np.float64), x.shape)
        except (TypeError, ValueError) as exc:
            return InputCheck(**head, passed=False, problem=f"vjp gave a bad gradient: {exc}")
    numeric = _numeric_gradient(op, xs, attrs, i, v, eps)
    if x.size == 0:
        return InputCheck(**head, passed=True)
    err = np.abs(analytic - numeric)
    allowed = atol + rtol * np.abs(numeric)
    with np.errstate(all="ignore"):
        badness = np.where(err == 0, 0.0, err / allowed)
        rel = np.where(err == 0, 0.0, err / np.maximum(np.abs(analytic), np.abs(numeric)))
    badness = np.where(np.isnan(badness), np.inf, badness)
    worst = np.unravel_index(int(np.argmax(badness)), x.shape)
    position = tuple(int(k) for k in worst)
    return InputCheck(
        **head,
        passed=bool(np.all(err <= allowed)),
        max_abs_error=_largest(err),
        max_rel_error=_largest(rel),
        position=position,
        analytic=float(analytic[position]),
        numeric=float(numeric[position]),
    )


def _largest(values: np.ndarray) -> float:
    """The maximum, with nan (a non-finite gradient) counted as the largest."""
    return math.nan if np.isnan(values).any() else float(np.max(values))
