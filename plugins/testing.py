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

Which cases :func:`check_operator` (and ``chainrule check``, and ``chainrule serve``'s start-up
check) tries, :func:`check_cases`:

* the operator's own ``sample`` cases (or made-up inputs of :data:`DEFAULT_SHAPES`);
* **attribute variations**: each attribute the sample cases leave at one value is varied on
  the sample case of highest rank, where its kind allows (:func:`automatic_values`): a bool
  both ways, an int ``d`` also as ``d + 1`` (stride 1 and 2), an axis-like int (``axis``,
  ``dim``...) over every axis of the input and -1, axis-like ints one axis at a time, other
  ints each plus one, a float ``d`` also as ``1.5 d`` (0.5 for 0), and the default when the
  sample always draws another value. String, float-list and tensor attributes are varied only
  over the values the author declares with :class:`Sample` (``vary=``), which also replace
  the automatic ones (``()``: never vary it). A varied case whose attributes infer or forward
  refuse is *skipped*, not failed: the schema does not say which values are valid;
* **the symbolic rules** (:func:`check_symbolic`), on the first :data:`SYMBOLIC_CASES` sample
  cases, in float64, for an operator that has them (docs/derivatives.md): "second order" for a
  ``vjp_graph`` (:func:`check_second_order`: the gradient graph it builds must give the vjp's
  gradient, and that graph derived again a Hessian-vector product matching finite differences of
  the vjp's gradients) and "jvp" for a ``jvp_graph`` (:func:`check_jvp`: the forward-mode graph
  must match finite differences of forward along random tangents). An operator without them is
  "first order only" (:func:`derivatives_text`), not a failure;
* **float32**: the first case with float inputs, in float32, must give a float32 output (or
  the dtype infer promises) and float32 gradients (:func:`check_float32`); a float64 constant
  in a rule silently doubles its memory and time and is caught here.

:func:`vjp_contract_problem` is the first check, run when a plugin loads: one forward and one
vjp call on the first case, judging only the vjp result's type and count.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from chainrule.core import OpDef, OpError, TensorSpec, check_attrs, coerce_attr, unbroadcast

__all__ = [
    "DEFAULT_SHAPES", "Case", "GradCheckReport", "GradientCheckError", "InputCheck", "MAX_VARIATIONS",
    "SAMPLES_PER_OPERATOR", "Sample", "assert_vjp", "automatic_values", "check_case", "check_cases",
    "check_float32", "check_jvp", "check_operator", "check_second_order", "check_symbolic", "check_vjp",
    "declared_variations", "derivatives_text", "gradient_exemption", "sample_inputs", "sample_rule",
    "symbolic_registry", "symbolic_rules", "vjp_contract_problem", "with_builtins", "FIRST_ORDER_ONLY",
    "SYMBOLIC_CASES", "SYMBOLIC_KINDS",
]

#: Shapes of the random float64 inputs made up for an operator without ``sample``.
DEFAULT_SHAPES: tuple[tuple[int, ...], ...] = ((), (4,), (2, 3))

#: How many times :func:`sample_inputs` calls an operator's own ``sample`` rule.
SAMPLES_PER_OPERATOR = 3

#: At most this many values are tried per attribute beyond those the sample cases draw.
MAX_VARIATIONS = 4

#: Attribute names read as "an axis of the first input" (also any name ending in ``_axis`` or ``_dim``).
AXIS_NAMES = frozenset({"axis", "axes", "dim", "dims"})


class Sample:
    """An operator's ``sample`` rule and the attribute values the checker should try (``vary``).

    ``Sample(rule, vary={"padding": ("valid", "same"), "stride": (1, 2, 3)})`` is a valid
    ``OpDef.sample``: calling it calls ``rule``. ``vary`` maps attribute names to the values the
    gradient checker tries besides those ``rule`` draws, replacing the values it would choose
    itself (see :func:`automatic_values`); ``()`` turns the variation of that attribute off.
    ``rule`` may be None (the checker then makes up inputs, as for an operator without
    ``sample``). ``OperatorSet.operator(..., vary={...})`` builds one for you.
    """

    def __init__(self, rule: Callable[[np.random.Generator], tuple[Sequence[Any], Mapping[str, Any]]] | None = None,
                 vary: Mapping[str, Iterable[Any]] | None = None) -> None:
        if rule is not None and not callable(rule):
            raise TypeError(f"Sample: rule must be callable, got {type(rule).__name__}")
        self.rule = rule
        self.vary: dict[str, tuple[Any, ...]] = {}
        for name, values in dict(vary or {}).items():
            if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
                raise TypeError(f"Sample: vary[{name!r}] must be a list of values, got {values!r}")
            self.vary[name] = tuple(values)

    def __call__(self, rng: np.random.Generator) -> tuple[Sequence[Any], Mapping[str, Any]]:
        if self.rule is None:
            raise TypeError("this Sample has no rule (only vary=); use chainrule.plugins.testing.sample_inputs(op, rng)")
        return self.rule(rng)

    def __repr__(self) -> str:
        return f"Sample({getattr(self.rule, '__name__', self.rule)!r}, vary={self.vary!r})"


def sample_rule(op: OpDef) -> Callable[[np.random.Generator], Any] | None:
    """The operator's own sample rule (unwrapped from a :class:`Sample`), or None."""
    return op.sample.rule if isinstance(op.sample, Sample) else op.sample


def declared_variations(op: OpDef) -> dict[str, tuple[Any, ...]]:
    """The attribute values the author asked the checker to try (``Sample.vary``)."""
    return dict(op.sample.vary) if isinstance(op.sample, Sample) else {}


@dataclass
class Case:
    """One point the checker tries: inputs, attributes (as given: defaults not filled in) and where they came from."""

    inputs: list[np.ndarray]
    attrs: dict[str, Any]
    #: "sample" (the operator's own rule), "default" (made-up inputs), "varied" (one attribute
    #: changed by the checker), "float32" (a case in float32, for the dtype check).
    kind: str = "sample"
    #: For kind "varied": the attribute changed.
    varied: str = ""


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
    #: What was compared, for the symbolic checks: "output" for a JVP (the output's tangent), and the
    #: names of the two numbers (default: the vjp against finite differences).
    label: str = ""
    analytic_name: str = "vjp"
    numeric_name: str = "finite differences"

    @property
    def what(self) -> str:
        """``input 0`` (or the label: ``output``)."""
        return self.label or f"input {self.index}"

    def describe(self) -> str:
        head = f"{self.what} {self.dtype}{list(self.shape)}"
        if not self.checked:
            return f"{head}: skipped (no gradient for {self.dtype})"
        if self.problem:
            return f"{head}: FAILED: {self.problem}"
        if self.position is None:
            return f"{head}: ok (no elements)"
        verdict = "ok" if self.passed else "FAILED"
        return (f"{head}: {verdict}: max abs error {self.max_abs_error:.3g}, max rel error {self.max_rel_error:.3g}; "
                f"worst at {self.position}: {self.analytic_name} {self.analytic:.6g}, {self.numeric_name} {self.numeric:.6g}")


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
    #: Which case this is (:class:`Case`'s kind) and, for a varied one, the attribute varied.
    kind: str = "sample"
    varied: str = ""
    #: Non-empty when the case was not checked: the reason (a varied attribute value the
    #: operator refuses). A skipped case counts as passed.
    skipped: str = ""
    #: The case's inputs as ``(dtype, shape)`` pairs, for a report whose ``inputs`` are not one per
    #: input (a JVP's are the output's tangents); empty: read them off ``inputs``.
    case_inputs: tuple[tuple[str, tuple[int, ...]], ...] = ()

    @property
    def passed(self) -> bool:
        return not self.problem and all(c.passed for c in self.inputs)

    @property
    def failures(self) -> list[InputCheck]:
        return [c for c in self.inputs if not c.passed]

    def inputs_text(self) -> str:
        """``float64[2, 3], int64[2]``: the case's inputs."""
        pairs = self.case_inputs or tuple((c.dtype, tuple(c.shape)) for c in self.inputs)
        return ", ".join(f"{dtype}{list(shape)}" for dtype, shape in pairs)

    def case_text(self) -> str:
        """``varied case, attrs stride=2, padding=0``: which case this is, with every attribute."""
        label = {"varied": f"case varying {self.varied}", "float32": "float32 case"}.get(self.kind, f"{self.kind} case")
        return f"{label}, attrs {attrs_text(self.attrs)}" if self.attrs else label

    def describe(self) -> str:
        """A header line (the case and its attributes), then one line per input."""
        if self.skipped:
            return f"{self.op} ({self.case_text()}): skipped: {self.skipped}"
        verdict = "passed" if self.passed else "FAILED"
        head = f"{self.op} ({self.case_text()}): {verdict} (output shape {list(self.output_shape)})"
        if self.problem:
            head += f": {self.problem}"
        if self.kind == "float32":  # a dtype check: nothing compared per input
            return f"{head}; inputs {self.inputs_text()}" + ("" if self.problem else "; float32 output and gradients")
        if self.case_inputs:
            head += f"; inputs {self.inputs_text()}"
        return "\n".join([head] + [f"  {c.describe()}" for c in self.inputs])

    __str__ = describe

    def failure_message(self) -> str:
        """The first failure as one sentence, naming the operator, input, position and both numbers
        (and, for a symbolic check, its kind: ``acme.cube: second order: input 0 at (1,): ...``)."""
        head = f"{self.op}: {self.kind}: " if self.kind in SYMBOLIC_KINDS else f"{self.op}: "
        if self.problem:
            return f"{head}{self.problem}"
        for c in self.failures:
            if c.problem:
                return f"{head}{c.what}: {c.problem}"
            return (f"{head}{c.what} at {c.position}: {c.analytic_name} gives {c.analytic:.6g}, "
                    f"{c.numeric_name} {_verb(c.numeric_name)} {c.numeric:.6g} (abs error {abs(c.analytic - c.numeric):.3g})")
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
        outs, saved = _forward(op, xs, attrs)
        problem = problem or _written("forward", pristine, xs)
        floats = [i for i, x in enumerate(xs) if x.dtype.kind == "f"]
        if not floats or not any(out.dtype.kind == "f" for out in outs):
            checks = tuple(_unchecked(i, x) for i, x in enumerate(xs))
            return GradCheckReport(op.name, checks, attrs, outs[0].shape, problem)
        rng = np.random.default_rng(seed)
        vs = [rng.standard_normal(out.shape) if out.dtype.kind == "f" else None for out in outs]
        kept = [*(v.copy() for v in vs if v is not None), *(out.copy() for out in outs)]
        raw = _vjp(op, vs, outs, xs, attrs, saved)
        if isinstance(raw, np.ndarray) or not hasattr(raw, "__iter__"):
            problem = (f"vjp returned a bare {type(raw).__name__}, not a tuple with one gradient per input "
                       f"(return (g * ...,))")
            return GradCheckReport(op.name, tuple(_unchecked(i, x) for i, x in enumerate(xs)), attrs, outs[0].shape,
                                   problem)
        grads = tuple(raw)
        if len(grads) != len(xs):
            problem = f"vjp returned {len(grads)} gradients for {len(xs)} inputs"
            return GradCheckReport(op.name, tuple(_unchecked(i, x) for i, x in enumerate(xs)), attrs, outs[0].shape,
                                   problem)
        several = len(outs) > 1
        names = [f"g[{j}]" if several else "g" for j, v in enumerate(vs) if v is not None]
        names += [f"out[{j}]" if several else "out" for j in range(len(outs))] + [f"input {i}" for i in range(len(xs))]
        problem = problem or _written("vjp", kept + pristine, [*(v for v in vs if v is not None), *outs, *xs], names)
        checks = tuple(
            _check_input(op, xs, attrs, i, grads[i], vs, eps, rtol, atol) if i in floats else _unchecked(i, xs[i])
            for i in range(len(xs))
        )
    return GradCheckReport(op.name, checks, attrs, outs[0].shape, problem)


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
    rule = sample_rule(op)
    if rule is not None:
        cases = []
        for _ in range(SAMPLES_PER_OPERATOR):
            inputs, attrs = rule(rng)
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


def check_cases(op: OpDef, rng: np.random.Generator) -> list[Case]:
    """Every case the checker tries on ``op`` by finite differences: :func:`sample_inputs`, then one
    case per attribute value varied (see the module's doc). Raises what the sample rule raises, and
    BadAttributeError for a sample case whose attributes break the schema."""
    kind = "sample" if sample_rule(op) is not None else "default"
    base = [Case(inputs, attrs, kind) for inputs, attrs in sample_inputs(op, rng)]
    return base + variation_cases(op, base)


def variation_cases(op: OpDef, base: Sequence[Case]) -> list[Case]:
    """The cases varying one attribute each, on the base case whose first input has the highest rank."""
    if not base or not op.attrs:
        return []
    completed = [check_attrs(op, case.attrs) for case in base]
    anchor = max(range(len(base)), key=lambda k: (np.ndim(base[k].inputs[0]) if base[k].inputs else 0, -k))
    declared = declared_variations(op)
    cases: list[Case] = []
    for name, schema in op.attrs.items():
        tried = _distinct(c[name] for c in completed)
        if name in declared:
            values = list(declared[name])
        elif len(tried) == 1:
            values = automatic_values(name, schema, tried[0], base[anchor].inputs)
        else:  # the sample already draws several values
            continue
        added = 0
        for value in values:
            if added == MAX_VARIATIONS and name not in declared:
                break
            if any(_same(value, t) for t in tried):
                continue
            tried.append(value)
            added += 1
            inputs = [np.array(x, copy=True) for x in base[anchor].inputs]
            cases.append(Case(inputs, {**base[anchor].attrs, name: value}, "varied", name))
    return cases


def automatic_values(name: str, schema: Any, current: Any, inputs: Sequence[np.ndarray]) -> list[Any]:
    """The values the checker tries for attribute ``name`` (an :class:`~chainrule.core.Attr`) when every
    sample case gives it the value ``current``: see the module's doc. The schema's default is
    included when ``current`` is another value."""
    kind = schema.kind
    ndim = int(np.ndim(inputs[0])) if len(inputs) else 0
    axis_like = name.lower() in AXIS_NAMES or name.lower().endswith(("_axis", "_dim"))
    values: list[Any] = []
    if kind == "bool":
        values = [False, True]
    elif kind == "int" and axis_like:
        values = list(range(ndim)) + ([-1] if ndim else [])
    elif kind == "int" and isinstance(current, int):
        values = [current + 1]
    elif kind == "ints" and axis_like:
        values = [(k,) for k in range(ndim)] + ([tuple(reversed(range(ndim)))] if ndim > 1 else [])
    elif kind == "ints" and isinstance(current, tuple) and current:
        values = [tuple(v + 1 for v in current)]
    elif kind == "float" and isinstance(current, float) and math.isfinite(current):
        values = [current * 1.5 if current else 0.5]
    if not schema.required and schema.default is not None and not _same(schema.default, current):
        values.insert(0, schema.default)
    return values


def check_case(op: OpDef, case: Case, *, seed: int = 0, **tolerances: Any) -> GradCheckReport:
    """:func:`check_vjp` on one case; a varied case whose attributes infer or forward refuse is
    returned as skipped (``report.skipped`` says why)."""
    if case.kind == "varied":
        refusal = _refusal(op, case)
        if refusal:
            try:
                attrs = check_attrs(op, case.attrs)
            except Exception:  # noqa: BLE001 - the refusal says why
                attrs = dict(case.attrs)
            return GradCheckReport(op.name, tuple(_unchecked(i, np.asarray(x)) for i, x in enumerate(case.inputs)),
                                   attrs, (), kind=case.kind, varied=case.varied, skipped=refusal)
    report = check_vjp(op, case.inputs, case.attrs, seed=seed, **tolerances)
    return _with_case(report, case)


def check_float32(op: OpDef, cases: Sequence[Case], *, seed: int = 0) -> GradCheckReport | None:
    """Do float32 inputs give a float32 output and float32 gradients? On the first case with a
    float input, cast to float32 (None when no case has one).

    The output may have another dtype only when infer promises it (a cast; an infer rule read
    off the forward computation, marked ``derived_from_forward``, as from_jax's, promises
    nothing); a gradient for a float32 input must be float32 (or None).
    """
    source = next((c for c in cases if c.kind != "varied" and any(np.asarray(x).dtype.kind == "f" for x in c.inputs)),
                  None)
    if source is None:
        return None
    xs = [np.asarray(x).astype(np.float32) if np.asarray(x).dtype.kind == "f" else np.array(x, copy=True)
          for x in source.inputs]
    attrs = check_attrs(op, source.attrs)
    report = GradCheckReport(op.name, tuple(_unchecked(i, x) for i, x in enumerate(xs)), attrs, (), kind="float32")
    stage = "infer"
    try:
        with np.errstate(all="ignore"):
            declared = op.infer is not None and not getattr(op.infer, "derived_from_forward", False)
            promised = _promised(op, xs, attrs) if declared else None
            stage = "forward"
            outs, saved = _forward(op, xs, attrs)
            report = _replace(report, output_shape=outs[0].shape)
            for j, out in enumerate(outs):
                expected = promised[j].dtype if promised is not None and j < len(promised) else np.dtype(np.float32)
                if out.dtype.kind == "f" and out.dtype != expected:
                    which = f" output {j}" if len(outs) > 1 else " output"
                    said = "" if promised is None else f" (infer promised {expected.name})"
                    return _replace(report, problem=f"float32 inputs gave a {out.dtype.name}{which}{said}: a float64 "
                                                    f"constant or dtype in forward promotes the result; keep to the "
                                                    f"inputs' dtype (x.dtype, NumPy scalars of it, or Python floats)")
            if not any(out.dtype.kind == "f" for out in outs):
                return report
            stage = "vjp"
            rng = np.random.default_rng(seed)
            gs = [rng.standard_normal(out.shape).astype(out.dtype) if out.dtype.kind == "f" else None for out in outs]
            raw = _vjp(op, gs, outs, xs, attrs, saved)
    except OpError as exc:  # the operator refuses float32 inputs on purpose: nothing to compare
        return _replace(report, skipped=f"{stage} refuses float32 inputs: {exc}")
    except Exception as exc:  # noqa: BLE001 - a plugin's rule may raise anything
        return _replace(report, problem=f"{stage} raised on float32 inputs: {type(exc).__name__}: {exc}")
    if isinstance(raw, np.ndarray) or not hasattr(raw, "__iter__"):
        return _replace(report, problem=f"vjp returned a bare {type(raw).__name__}, not a tuple with one "
                                        f"gradient per input (return (g * ...,))")
    for i, (x, grad) in enumerate(zip(xs, raw)):
        if grad is None or x.dtype != np.float32:
            continue
        dtype = np.asarray(grad).dtype
        if dtype != np.float32:
            return _replace(report, problem=f"vjp gave float32 input {i} a {dtype.name} gradient: a float64 "
                                            f"constant or dtype in the vjp promotes it; keep to g's dtype")
    return report


def check_operator(op: OpDef, rng: np.random.Generator | None = None, registry: Any = None) -> list[GradCheckReport]:
    """:func:`check_case` on every case of :func:`check_cases`, then the symbolic rules' checks
    (:func:`check_symbolic`: reports of kinds "second order" and "jvp", none for an operator without
    vjp_graph and jvp_graph), then :func:`check_float32` (no report for an exempt operator). Skipped
    varied cases are reported, as passed with ``skipped`` set. ``registry``: the operators the symbolic
    rules may use besides the built-in ones (:func:`symbolic_registry`)."""
    if gradient_exemption(op) is not None:
        return []
    rng = rng if rng is not None else np.random.default_rng(0)
    cases = check_cases(op, rng)
    reports = [check_case(op, case) for case in cases]
    reports += check_symbolic(op, cases, registry)
    f32 = check_float32(op, cases)
    return reports + ([f32] if f32 is not None else [])


# --- the symbolic rules: second derivatives and JVPs ---------------------------------------------

#: The kinds of the symbolic checks' reports, one per rule: ``vjp_graph`` (a gradient graph,
#: differentiated again) and ``jvp_graph`` (forward mode).
SYMBOLIC_KINDS = ("second order", "jvp")

#: What :func:`derivatives_text` says of an operator without symbolic rules.
FIRST_ORDER_ONLY = "first order only"

#: How many of the operator's sample (or made-up) cases the symbolic checks try, per rule.
SYMBOLIC_CASES = 3

#: Tolerances of the symbolic checks (float64): ``|got - expected| <= atol * scale + rtol * |expected|``,
#: ``scale`` the largest ``|expected|`` of the input (at least 1): finite differences of gradients
#: cancel digits in proportion to the gradients' size.
SYMBOLIC_RTOL = 1e-4
SYMBOLIC_ATOL = 1e-6


def symbolic_rules(op: OpDef) -> tuple[str, ...]:
    """The symbolic rules ``op`` has, of ``("vjp_graph", "jvp_graph")``."""
    return tuple(rule for rule in ("vjp_graph", "jvp_graph") if getattr(op, rule, None) is not None)


def derivatives_text(op: OpDef) -> str:
    """What the checker compares of ``op``'s derivatives besides its vjp: ``second order, jvp`` (or one
    of them), or ``first order only`` for an operator without symbolic rules (not a failure: it works
    to first order; Derive, grad and jvp nodes through it are MISSING_RULE)."""
    kinds = [kind for kind, rule in zip(SYMBOLIC_KINDS, ("vjp_graph", "jvp_graph")) if getattr(op, rule, None) is not None]
    return ", ".join(kinds) or FIRST_ORDER_ONLY


_BUILTINS: list[Any] = []
_BUILTINS_LOCK = threading.Lock()


def symbolic_registry(op: OpDef, registry: Any = None) -> Any:
    """A Registry in which ``op``'s derived graphs compile: the built-in operators (the derivatives'
    helpers among them), then ``registry``'s operators, then ``op`` itself (each replacing a name
    before it). Pass the registry the operator was loaded with when its rules use its plugin's
    other operators."""
    if registry is not None and registry.find(op.name) is op and _has_builtins(registry):
        return registry
    combined = with_builtins(registry)
    combined.add(op, replace=True)
    return combined


def with_builtins(registry: Any = None) -> Any:
    """A new Registry: the built-in operators, then ``registry``'s (replacing a built-in of the same name)."""
    from chainrule.core import Registry

    combined = Registry(_builtin_ops())
    for other in registry or ():
        combined.add(other, replace=True)
    return combined


#: Loads the built-in operators: set by chainrule.plugins.manager when it is imported (this module
#: cannot import the manager, which imports it for the check at load).
builtin_loader: Callable[[], Iterable[OpDef]] | None = None


def _builtin_ops() -> list[OpDef]:
    """The built-in operators, loaded once per process."""
    with _BUILTINS_LOCK:
        if not _BUILTINS:
            if builtin_loader is None:  # (chainrule.plugins imports the manager, which sets it)
                raise RuntimeError("chainrule.plugins.manager is not imported: import chainrule.plugins")
            _BUILTINS.extend(builtin_loader())
    return _BUILTINS


def _has_builtins(registry: Any) -> bool:
    return all(registry.find(name) is not None for name in ("add", "mul", "sum", "sum_to", "zeros_like"))


def check_symbolic(op: OpDef, cases: Sequence[Case] | None = None, registry: Any = None, *, seed: int = 0,
                   **tolerances: Any) -> list[GradCheckReport]:
    """The symbolic rules' checks on the first :data:`SYMBOLIC_CASES` sample (or made-up) cases of
    ``cases`` (default: :func:`check_cases`): :func:`check_second_order` when ``op`` has a vjp_graph,
    then :func:`check_jvp` when it has a jvp_graph. No report for an operator without them or exempt
    from the check, nor for a case without a float input and a float output (nothing to compare).
    ``registry``: see :func:`symbolic_registry`."""
    if gradient_exemption(op) is not None or not symbolic_rules(op):
        return []
    if cases is None:
        cases = check_cases(op, np.random.default_rng(seed))
    base = [case for case in cases if case.kind in ("sample", "default")][:SYMBOLIC_CASES]
    registry = symbolic_registry(op, registry)
    reports: list[GradCheckReport] = []
    for kind, check in (("vjp_graph", check_second_order), ("jvp_graph", check_jvp)):
        if getattr(op, kind) is None:
            continue
        for case in base:
            report = check(op, case, registry, seed=seed, **tolerances)
            if report.problem or any(c.checked for c in report.inputs):
                reports.append(report)
    return reports


def check_second_order(op: OpDef, case: Case, registry: Any = None, *, seed: int = 0, eps: float = 1e-6,
                       rtol: float = SYMBOLIC_RTOL, atol: float = SYMBOLIC_ATOL) -> GradCheckReport:
    """Check ``op.vjp_graph`` on one case (in float64), with the scalar ``L = sum(w * y * y)`` of the
    operator's output ``y`` (``w`` random; summed over its float outputs), which is not linear in ``y``:

    1. the gradient graph (:func:`~chainrule.core.symbolic.derive_reverse`) must give the gradient the
       engine's numpy vjp gives;
    2. that graph, derived again, gives the Hessian-vector product ``H v`` (``v`` random), which must
       match central finite differences of the numpy gradients along ``v``:
       ``(grad L(x + eps v) - grad L(x - eps v)) / 2 eps``.

    One :class:`InputCheck` per input (int and bool inputs unchecked). A derivation that fails (a rule
    that raises, an operator without the rule a second derivative needs: MISSING_RULE) is the report's
    ``problem``.
    """
    from chainrule.core import compile_graph, derive_reverse

    registry = symbolic_registry(op, registry)
    xs, attrs, report = _symbolic_start(op, case, "second order")
    floats = [i for i, x in enumerate(xs) if x.dtype.kind == "f"]
    stage = "forward"
    try:
        with np.errstate(all="ignore"):
            outs, float_outs, report = _float_outputs(op, xs, attrs, report)
            if not floats or not float_outs:
                return report
            rng = np.random.default_rng(seed)
            weights = {f"w{j}": rng.standard_normal(outs[j].shape) for j in float_outs}
            vs = {f"v{i}": rng.standard_normal(xs[i].shape) for i in floats}
            graph = _objective_graph(op, xs, case.attrs, outs, float_outs)
            feeds = {**{f"x{i}": x for i, x in enumerate(xs)}, **weights}
            wrt = [f"x{i}" for i in floats]
            stage = "the engine's gradient (the numpy vjp)"
            plan = compile_graph(graph, registry)
            expected = _engine_gradients(plan, feeds, wrt)
            stage = "deriving the gradient graph (vjp_graph)"
            derived, names = derive_reverse(graph, registry, output="L", wrt=wrt)
            grads = [names.gradients[w] for w in wrt]
            stage = "running the gradient graph"
            got = _run_derived(derived, registry, feeds, grads)
            checks = {i: _compare(i, xs[i], g, e, rtol, atol, "vjp_graph's gradient", "the vjp")
                      for i, g, e in zip(floats, got, expected)}
            if all(c.passed for c in checks.values()):
                stage = "deriving the gradient graph again (the second derivative)"
                dotted = _dot_graph(derived, grads, [(f"v{i}", xs[i].shape) for i in floats])
                second, names2 = derive_reverse(dotted, registry, output="S", wrt=wrt)
                stage = "running the second-derivative graph"
                hv = _run_derived(second, registry, {**feeds, **vs}, [names2.gradients[w] for w in wrt])
                stage = "the engine's gradient (the numpy vjp)"
                plus = _engine_gradients(plan, {**feeds, **{f"x{i}": xs[i] + eps * vs[f"v{i}"] for i in floats}}, wrt)
                minus = _engine_gradients(plan, {**feeds, **{f"x{i}": xs[i] - eps * vs[f"v{i}"] for i in floats}}, wrt)
                checks = {i: _compare(i, xs[i], h, (p - m) / (2 * eps), rtol, atol, "H v through vjp_graph",
                                      "finite differences of the vjp")
                          for i, h, p, m in zip(floats, hv, plus, minus)}
    except Exception as exc:  # noqa: BLE001 - a plugin's rule may raise anything; the report names it
        return _replace(report, problem=f"{stage}: {_error_text(exc)}")
    inputs = tuple(checks.get(i) or _unchecked(i, x) for i, x in enumerate(xs))
    return _replace(report, inputs=inputs)


def _float_outputs(op: OpDef, xs: list[np.ndarray], attrs: dict[str, Any],
                   report: GradCheckReport) -> tuple[list[Any], list[int], GradCheckReport]:
    """Forward once (on copies of ``xs``): the outputs, the positions of the float ones, and the
    report with the output's shape."""
    outs, _ = _forward(op, [x.copy() for x in xs], attrs)
    return outs, [j for j, out in enumerate(outs) if out.dtype.kind == "f"], _replace(
        report, output_shape=outs[0].shape)


def check_jvp(op: OpDef, case: Case, registry: Any = None, *, seed: int = 0, eps: float = 1e-6,
              rtol: float = SYMBOLIC_RTOL, atol: float = SYMBOLIC_ATOL) -> GradCheckReport:
    """Check ``op.jvp_graph`` on one case (in float64): the forward-mode graph
    (:func:`~chainrule.core.symbolic.derive_forward`) of each float output, with random tangents for
    every float input, must give central finite differences of the forward rule along the tangents,
    ``(forward(x + eps t) - forward(x - eps t)) / 2 eps``, element by element. One :class:`InputCheck`
    per float output (label ``output``); ``case_inputs`` holds the inputs."""
    from chainrule.core import derive_forward

    registry = symbolic_registry(op, registry)
    xs, attrs, report = _symbolic_start(op, case, "jvp")
    report = _replace(report, inputs=(), case_inputs=tuple((x.dtype.name, tuple(x.shape)) for x in xs))
    floats = [i for i, x in enumerate(xs) if x.dtype.kind == "f"]
    stage = "forward"
    checks: list[InputCheck] = []
    try:
        with np.errstate(all="ignore"):
            outs, float_outs, report = _float_outputs(op, xs, attrs, report)
            if not floats or not float_outs:
                return report
            rng = np.random.default_rng(seed)
            ts = {i: rng.standard_normal(xs[i].shape) for i in floats}
            plus, _ = _forward(op, [x + eps * ts[i] if i in ts else x.copy() for i, x in enumerate(xs)], attrs)
            minus, _ = _forward(op, [x - eps * ts[i] if i in ts else x.copy() for i, x in enumerate(xs)], attrs)
            graph = _op_graph(op, xs, case.attrs, len(outs))
            feeds = {f"x{i}": x for i, x in enumerate(xs)}
            several = len(outs) > 1
            for j in float_outs:
                stage = "deriving the forward-mode graph (jvp_graph)"
                derived, names = derive_forward(graph, registry, output=graph.outputs[j], wrt=[f"x{i}" for i in floats])
                stage = "running the forward-mode graph"
                tangents = {names.tangents[f"x{i}"]: ts[i] for i in floats}
                (got,) = _run_derived(derived, registry, {**feeds, **tangents}, [names.tangent_output])
                numeric = (np.asarray(plus[j], np.float64) - np.asarray(minus[j], np.float64)) / (2 * eps)
                label = f"output {j}" if several else "output"
                check = _compare(j, outs[j], got, numeric, rtol, atol, "jvp_graph", "finite differences of forward")
                checks.append(replace(check, label=label))
    except Exception as exc:  # noqa: BLE001 - a plugin's rule may raise anything; the report names it
        return _replace(report, inputs=tuple(checks), problem=f"{stage}: {_error_text(exc)}")
    return _replace(report, inputs=tuple(checks))


def _symbolic_start(op: OpDef, case: Case, kind: str) -> tuple[list[np.ndarray], dict[str, Any], GradCheckReport]:
    """The case's inputs in float64 (float32 promoted; finite differences need the precision), its
    checked attributes, and an empty report of ``kind``."""
    attrs = check_attrs(op, case.attrs)
    xs = [np.asarray(x) for x in case.inputs]
    xs = [x.astype(np.float64) if x.dtype.kind == "f" else x.copy() for x in xs]
    report = GradCheckReport(op.name, tuple(_unchecked(i, x) for i, x in enumerate(xs)), attrs, (), kind=kind)
    return xs, attrs, report


def _op_graph(op: OpDef, xs: Sequence[np.ndarray], attrs: Mapping[str, Any], count: int) -> Any:
    """x0, x1... -> y = op(x...): one value ``y``, or ``y.0``, ``y.1``... for an operator with several."""
    from chainrule.core import GraphIR, InputDecl, Node

    decls = tuple(InputDecl(f"x{i}", x.dtype.name, tuple(x.shape)) for i, x in enumerate(xs))
    outputs = tuple(f"y.{j}" for j in range(count)) if op.several else ()
    node = Node("y", op.name, tuple(d.name for d in decls), dict(attrs), outputs)
    return GraphIR(decls, (node,), outputs or ("y",))


def _objective_graph(op: OpDef, xs: Sequence[np.ndarray], attrs: Mapping[str, Any], outs: Sequence[np.ndarray],
                     float_outs: Sequence[int]) -> Any:
    """The op's graph, then L = sum over its float outputs y_j of sum(w_j * y_j * y_j) (inputs w_j)."""
    from chainrule.core import GraphIR, InputDecl, Node

    graph = _op_graph(op, xs, attrs, len(outs))
    inputs = list(graph.inputs)
    nodes = list(graph.nodes)
    terms = []
    for j in float_outs:
        y, s = graph.outputs[j], "L" if len(float_outs) == 1 else f"s{j}"
        inputs.append(InputDecl(f"w{j}", "float64", tuple(outs[j].shape)))
        nodes += [Node(f"yy{j}", "mul", (y, y)), Node(f"wyy{j}", "mul", (f"w{j}", f"yy{j}")), Node(s, "sum", (f"wyy{j}",))]
        terms.append(s)
    return GraphIR(tuple(inputs), tuple(nodes) + _sum_nodes(terms, "L"), ("L",))


def _dot_graph(derived: Any, grads: Sequence[str], vectors: Sequence[tuple[str, tuple[int, ...]]]) -> Any:
    """The gradient graph, then S = sum_i sum(grad_i * v_i) (inputs v_i): its gradient is H v."""
    from chainrule.core import GraphIR, InputDecl, Node

    inputs = list(derived.inputs) + [InputDecl(name, "float64", shape) for name, shape in vectors]
    nodes = list(derived.nodes)
    terms = []
    for k, (g, (v, _)) in enumerate(zip(grads, vectors)):
        s = "S" if len(grads) == 1 else f"check.s{k}"
        nodes += [Node(f"check.gv{k}", "mul", (g, v)), Node(s, "sum", (f"check.gv{k}",))]
        terms.append(s)
    return GraphIR(tuple(inputs), tuple(nodes) + _sum_nodes(terms, "S"), ("S",), dict(derived.metadata))


def _sum_nodes(terms: Sequence[str], name: str) -> tuple[Any, ...]:
    """Nodes adding ``terms`` up into a value named ``name`` (none for one term, named so already)."""
    from chainrule.core import Node

    nodes, total = [], terms[0]
    for k, term in enumerate(terms[1:]):
        nodes.append(Node(name if k == len(terms) - 2 else f"{name}.{k}", "add", (total, term)))
        total = nodes[-1].name
    return tuple(nodes)


def _engine_gradients(plan: Any, feeds: Mapping[str, np.ndarray], wrt: Sequence[str]) -> list[np.ndarray]:
    """The engine's gradients (numpy vjps) of the plan's output with respect to ``wrt``."""
    from chainrule.core import evaluate

    ev = evaluate(plan, feeds, wrt=wrt)
    return [np.asarray(ev.grad(w), dtype=np.float64) for w in wrt]


def _run_derived(graph: Any, registry: Any, feeds: Mapping[str, np.ndarray], names: Sequence[str]) -> list[np.ndarray]:
    """The values ``names`` of a derived graph (forward only)."""
    from chainrule.core import compile_graph, evaluate

    ev = evaluate(compile_graph(graph, registry), feeds, output=names[0], gradients=False)
    return [np.asarray(ev.value(name), dtype=np.float64) for name in names]


def _compare(index: int, x: np.ndarray, got: np.ndarray, expected: np.ndarray, rtol: float, atol: float,
             analytic_name: str, numeric_name: str) -> InputCheck:
    """One array against another (of ``x``'s shape), with the symbolic checks' scaled tolerance."""
    head = dict(index=index, shape=tuple(x.shape), dtype=x.dtype.name, checked=True, analytic_name=analytic_name,
                numeric_name=numeric_name)
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    if got.shape != expected.shape:
        return InputCheck(**head, passed=False, problem=f"{analytic_name} has shape {list(got.shape)}, "
                                                       f"expected {list(expected.shape)}")
    if got.size == 0:
        return InputCheck(**head, passed=True)
    finite = expected[np.isfinite(expected)]
    scale = max(1.0, float(np.max(np.abs(finite))) if finite.size else 1.0)
    return _judged(head, got, expected, atol * scale, rtol)


def _error_text(exc: BaseException) -> str:
    from chainrule.core import ChainruleError

    text = exc.message if isinstance(exc, ChainruleError) else str(exc)
    return f"{type(exc).__name__}: {text}"


def _verb(name: str) -> str:
    """``give`` after a plural (``finite differences``), else ``gives``."""
    return "give" if name.startswith("finite differences") else "gives"


def vjp_contract_problem(op: OpDef) -> tuple[str, str] | None:
    """The first check, run as a plugin loads: ``(problem, fix)``, or None when nothing is wrong.

    Checks the names and values of ``Sample.vary``, then calls forward and vjp once on the
    first case of :func:`sample_inputs` (seed 0): is the vjp's result a tuple (or list) with one
    gradient per input, each None or numeric array-like? A rule that raises here is left to the
    gradient checker, which reports it with the case; an operator whose inputs cannot be made up
    (a required attribute and no ``sample``) is not called.
    """
    for name, values in declared_variations(op).items():
        if name not in op.attrs:
            known = ", ".join(op.attrs) or "none"
            return (f"operator '{op.name}': vary= names '{name}', which is not one of its attributes ({known})",
                    "name a declared attribute in vary=, or declare the attribute")
        schema = op.attrs[name]
        for value in values:
            try:
                coerce_attr(schema.kind, value, allow_nonfinite=schema.allow_nonfinite)
            except (TypeError, ValueError) as exc:
                return (f"operator '{op.name}': vary= gives attribute '{name}' ({schema.kind}) the value "
                        f"{value!r}: {exc}", f"give vary['{name}'] values of kind {schema.kind}")
    if getattr(op.vjp, "vjp_contract_kept", False):  # e.g. from_jax: the bridge builds the tuple itself
        return None
    where = "the sample inputs" if sample_rule(op) is not None else "made-up inputs"
    try:
        inputs, attrs = sample_inputs(op, np.random.default_rng(0))[0]
        attrs = check_attrs(op, attrs)
        with np.errstate(all="ignore"):
            outs, saved = _forward(op, inputs, attrs)
            gs = [np.ones_like(out) if out.dtype.kind == "f" else None for out in outs]
            grads = _vjp(op, gs, outs, inputs, attrs, saved, needs_all=True)
    except FormError as exc:
        return (f"operator '{op.name}': {exc} on {where}",
                "return (result, saved) from forward when residuals=True, and a tuple of n_outputs values "
                "when there are several")
    except Exception:
        return None
    fix = "return a tuple with one gradient (or None) per input: return (g * ...,)"
    if isinstance(grads, np.ndarray) or not isinstance(grads, (tuple, list)):
        return (f"operator '{op.name}': vjp returned a bare {type(grads).__name__} on {where}, "
                f"not a tuple with one gradient per input", fix)
    if len(grads) != len(inputs):
        return f"operator '{op.name}': vjp returned {len(grads)} gradients for {len(inputs)} inputs on {where}", fix
    for i, grad in enumerate(grads):
        if grad is None:
            continue
        try:
            kind = np.asarray(grad).dtype.kind
        except Exception:  # noqa: BLE001 - anything numpy cannot read is the wrong type
            kind = "O"
        if kind not in "fiu":
            return (f"operator '{op.name}': vjp returned a {type(grad).__name__} as the gradient of input {i} on "
                    f"{where}, not an array of numbers or None",
                    "return an ndarray (or None for an input without a gradient) for each input")
    return None


def gradient_exemption(op: OpDef) -> str | None:
    """Why ``op``'s vjp is deliberately not the derivative of its forward rule (None: it is)."""
    return None if op.gradcheck else f"{op.name} declares gradcheck=False: its vjp is not meant to be the derivative"


def attrs_text(attrs: Mapping[str, Any]) -> str:
    """``beta=1.5, axis=(0,)``: attribute values, floats to 6 significant digits, tensors by shape."""
    return ", ".join(f"{k}={value_text(v)}" for k, v in attrs.items())


def value_text(value: Any, digits: int = 6) -> str:
    """One attribute value, short: floats to ``digits`` significant digits, tensors as ``tensor float64[2, 3]``."""
    if isinstance(value, np.ndarray):
        return f"tensor {value.dtype.name}{list(value.shape)}"
    if isinstance(value, float):
        return repr(float(f"{value:.{digits}g}"))
    if isinstance(value, tuple) and any(isinstance(v, float) for v in value):
        return "(" + ", ".join(value_text(v, digits) for v in value) + ("," if len(value) == 1 else "") + ")"
    return repr(value)


# --- internals -------------------------------------------------------------------------------

class FormError(TypeError):
    """A rule's result does not have the form the operator declares (residuals, several outputs)."""


def _n_outputs(op: OpDef, attrs: Mapping[str, Any]) -> int:
    outputs_for = getattr(op, "outputs_for", None)
    return 1 if outputs_for is None else int(outputs_for(attrs))


def _forward(op: OpDef, inputs: Sequence[np.ndarray], attrs: Mapping[str, Any]) -> tuple[list[np.ndarray], Any]:
    """The forward rule called as the engine calls it: ``(outputs, saved)``, one array per output
    and the residuals (None for an operator without them). TypeError when the result's form is
    not the one the operator declares."""
    result = op.forward(*inputs, **attrs)
    saved = None
    if getattr(op, "residuals", False):
        if not isinstance(result, tuple) or len(result) != 2:
            raise FormError(f"forward returned {type(result).__name__}, expected (result, saved) "
                            f"(the operator declares residuals)")
        result, saved = result
    count = _n_outputs(op, attrs)
    if count == 1:
        return [np.asarray(result)], saved
    if not isinstance(result, (tuple, list)) or len(result) != count:
        raise FormError(f"forward returned {type(result).__name__}, expected a tuple of {count} values "
                        f"(the operator declares {count} outputs)")
    return [np.asarray(r) for r in result], saved


def _vjp(op: OpDef, gs: Sequence[Any], outs: Sequence[np.ndarray], inputs: Sequence[np.ndarray],
         attrs: Mapping[str, Any], saved: Any = None, *, needs_all: bool = False) -> Any:
    """The vjp rule's result, called as the engine calls it: a selective vjp is asked for the float
    inputs' gradients (every input's with ``needs_all``), one with residuals gets ``saved=``, and
    one with several outputs gets the tuples of cotangents (None where there is none) and outputs."""
    keywords = dict(attrs)
    if getattr(op, "selective_vjp", False):
        keywords["needs"] = tuple(needs_all or np.asarray(x).dtype.kind == "f" for x in inputs)
    if getattr(op, "residuals", False):
        keywords["saved"] = saved
    if len(outs) == 1:
        return op.vjp(gs[0], outs[0], *inputs, **keywords)
    return op.vjp(tuple(gs), tuple(outs), *inputs, **keywords)


def _with_case(report: GradCheckReport, case: Case) -> GradCheckReport:
    return _replace(report, attrs=dict(report.attrs), kind=case.kind, varied=case.varied)


def _replace(report: GradCheckReport, **changes: Any) -> GradCheckReport:
    return replace(report, **changes)


def _refusal(op: OpDef, case: Case) -> str:
    """'' when the operator takes ``case`` (attributes, infer, forward); else why not, for a skipped case."""
    try:
        attrs = check_attrs(op, case.attrs)
    except Exception as exc:  # noqa: BLE001 - any refusal of a value the checker chose is a skip
        return f"the schema refuses {case.varied}={value_text(case.attrs[case.varied])}: {exc}"
    stage = "infer"
    try:
        with np.errstate(all="ignore"):
            if op.infer is not None:
                op.infer(*[TensorSpec.of(np.asarray(x)) for x in case.inputs], **attrs)
            stage = "forward"
            _forward(op, [np.array(x, copy=True) for x in case.inputs], attrs)
    except Exception as exc:  # noqa: BLE001
        return f"{stage} refuses {case.varied}={value_text(case.attrs[case.varied])}: {type(exc).__name__}: {exc}"
    return ""


def _distinct(values: Iterable[Any]) -> list[Any]:
    found: list[Any] = []
    for v in values:
        if not any(_same(v, f) for f in found):
            found.append(v)
    return found


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape and bool(np.all(a == b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if type(a) is bool or type(b) is bool:
        return type(a) is type(b) and a == b
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001
        return False

def _unchecked(i: int, x: np.ndarray) -> InputCheck:
    return InputCheck(i, x.shape, x.dtype.name, checked=False, passed=True)


def _written(rule: str, before: list[np.ndarray], after: list[np.ndarray], names: Sequence[str] | None = None) -> str:
    """'' unless ``rule`` wrote into an argument (the engine shares those arrays between rules)."""
    names = list(names) if names is not None else [f"input {i}" for i in range(len(after))]
    for name, old, new in zip(names, before, after):
        if not np.array_equal(old, new, equal_nan=True):
            return f"{rule} wrote into its argument {name}; rules must not modify their arguments"
    return ""


def _infer_problem(op: OpDef, inputs: list[np.ndarray], attrs: dict[str, Any]) -> str:
    """'' when infer promises exactly what forward returns (in the inputs' own dtypes)."""
    if op.infer is None:
        return ""
    specs = _promised(op, inputs, attrs)
    outs, _ = _forward(op, inputs, attrs)
    for j, (promised, out) in enumerate(zip(specs, outs)):
        if promised != TensorSpec.of(out):
            which = f" for output {j}" if len(outs) > 1 else ""
            return f"infer promised {promised}{which} but forward returned {TensorSpec.of(out)}"
    if len(specs) != len(outs):
        return f"infer promised {len(specs)} values but forward returned {len(outs)}"
    return ""


def _promised(op: OpDef, inputs: Sequence[np.ndarray], attrs: Mapping[str, Any]) -> list[TensorSpec]:
    """What infer promises, one TensorSpec per output."""
    result = op.infer(*[TensorSpec.of(np.asarray(x)) for x in inputs], **attrs)  # type: ignore[misc]
    specs = [result] if _n_outputs(op, attrs) == 1 else list(result)
    return [TensorSpec(tuple(spec[0]), np.dtype(spec[1])) for spec in specs]


def _objective(op: OpDef, args: list[np.ndarray], attrs: dict[str, Any], vs: Sequence[np.ndarray | None]) -> float:
    """sum(forward(args) * v) over the float outputs: the outputs projected on the cotangents."""
    outs, _ = _forward(op, args, attrs)
    return float(sum(np.sum(np.asarray(out, dtype=np.float64) * v) for out, v in zip(outs, vs) if v is not None))


def _numeric_gradient(op: OpDef, xs: list[np.ndarray], attrs: dict[str, Any], i: int,
                      vs: Sequence[np.ndarray | None], eps: float) -> np.ndarray:
    work = np.array(xs[i], dtype=np.float64, copy=True)
    flat = work.reshape(-1)  # a view: work is a fresh contiguous array
    args = list(xs)
    args[i] = work
    grad = np.empty(work.size)
    for k in range(work.size):
        centre = flat[k]
        flat[k] = up = centre + eps
        f_up = _objective(op, args, attrs, vs)
        flat[k] = down = centre - eps
        f_down = _objective(op, args, attrs, vs)
        flat[k] = centre
        grad[k] = (f_up - f_down) / (up - down)
    return grad.reshape(work.shape)


def _check_input(op: OpDef, xs: list[np.ndarray], attrs: dict[str, Any], i: int, grad: Any,
                 vs: Sequence[np.ndarray | None], eps: float, rtol: float, atol: float) -> InputCheck:
    x = xs[i]
    head = dict(index=i, shape=x.shape, dtype=x.dtype.name, checked=True)
    if grad is None:
        analytic = np.zeros(x.shape)           # "no gradient" must then be the truth
    else:
        try:
            analytic = unbroadcast(np.asarray(grad, dtype=np.float64), x.shape)
        except (TypeError, ValueError) as exc:
            return InputCheck(**head, passed=False, problem=f"vjp gave a bad gradient: {exc}")
    numeric = _numeric_gradient(op, xs, attrs, i, vs, eps)
    if x.size == 0:
        return InputCheck(**head, passed=True)
    return _judged(head, analytic, numeric, atol, rtol)


def _judged(head: dict[str, Any], analytic: np.ndarray, numeric: np.ndarray, atol: float, rtol: float) -> InputCheck:
    """An InputCheck of ``analytic`` against ``numeric`` (same shape, not empty): each element must be
    within ``atol + rtol * |numeric|``; the worst position (relative to that) is reported."""
    shape = numeric.shape
    err = np.abs(analytic - numeric)
    allowed = atol + rtol * np.abs(numeric)
    with np.errstate(all="ignore"):
        badness = np.where(err == 0, 0.0, err / allowed)
        rel = np.where(err == 0, 0.0, err / np.maximum(np.abs(analytic), np.abs(numeric)))
    badness = np.where(np.isnan(badness), np.inf, badness)
    worst = np.unravel_index(int(np.argmax(badness)), shape)
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
