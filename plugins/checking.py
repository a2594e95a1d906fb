"""Check every operator of a registry against finite differences.

``chainrule check`` prints what :func:`check_registry` finds, and ``chainrule
serve --check-operators`` runs :func:`check_and_refuse` at start-up: an
operator whose vjp disagrees with central finite differences is left out of
the served registry (and the log says why), while the rest keep working.

Each operator is checked on the cases of
:func:`chainrule.plugins.testing.sample_inputs` (its own ``sample`` rule, or
random inputs of the default shapes), with a generator seeded per operator, so
``chainrule check --op NAME`` reproduces the numbers of a full run. An
operator whose check cannot even run (its forward rule raises on the sample
inputs, or it has a required attribute and no ``sample`` rule) fails too: a
server asked to serve checked operators only cannot vouch for it.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import numpy as np

from chainrule.core import OpDef, Registry

from .manager import Loaded, plugin_matches
from .testing import GradCheckReport, check_vjp, gradient_exemption, sample_inputs

__all__ = ["OperatorCheck", "check_and_refuse", "check_op", "check_registry"]

log = logging.getLogger("chainrule.plugins")

#: Seed of the random inputs and cotangents (per operator).
SEED = 0


@dataclass(frozen=True)
class OperatorCheck:
    """The verdict on one operator over every case tried."""

    op: str
    plugin: str
    distribution: str
    version: str
    #: The input shapes of each case tried, e.g. ``(((3, 4), (4,)),)`` for one binary case.
    shapes: tuple[tuple[tuple[int, ...], ...], ...]
    #: The largest errors over every case and input (nan when a gradient was not finite).
    max_abs_error: float
    max_rel_error: float
    passed: bool
    #: False when finite differences were not compared (an operator with ``gradcheck=False``).
    checked: bool
    #: On failure, one sentence naming the plugin, the operator, the input, the position and both
    #: numbers; for an exempt operator, why it is exempt; otherwise "".
    message: str = ""

    @property
    def status(self) -> str:
        if not self.checked:
            return "exempt"
        return "passed" if self.passed else "FAILED"

    def shapes_text(self) -> str:
        """The distinct cases, e.g. ``[] ; [4] ; [2,3]`` or ``[3,4],[4]``."""
        cases: list[str] = []
        for case in self.shapes:
            text = ",".join("[" + ",".join(map(str, shape)) + "]" for shape in case) or "-"
            if text not in cases:
                cases.append(text)
        return " ; ".join(cases)


def provider(op: OpDef) -> str:
    """``plugin 'acme' (distribution chainrule-acme 0.2.0)``: who to blame for ``op``."""
    who = f"plugin '{op.plugin}'" if op.plugin else "an unnamed plugin"
    if op.distribution:
        who += f" (distribution {' '.join(filter(None, (op.distribution, op.version)))})"
    return who


def check_op(op: OpDef, seed: int = SEED) -> OperatorCheck:
    """Compare ``op``'s vjp with finite differences on each of its sample cases."""
    head = dict(op=op.name, plugin=op.plugin, distribution=op.distribution, version=op.version)
    exemption = gradient_exemption(op)
    if exemption is not None:
        return OperatorCheck(**head, shapes=(), max_abs_error=0.0, max_rel_error=0.0, passed=True, checked=False,
                             message=exemption)
    reports: list[GradCheckReport] = []
    shapes: list[tuple[tuple[int, ...], ...]] = []
    try:
        for inputs, attrs in sample_inputs(op, np.random.default_rng(seed)):
            shapes.append(tuple(np.shape(x) for x in inputs))
            reports.append(check_vjp(op, inputs, attrs, seed=seed))
    except Exception as exc:  # a plugin's rule may raise anything; the verdict must still name it
        return OperatorCheck(**head, shapes=tuple(shapes), max_abs_error=math.nan, max_rel_error=math.nan,
                             passed=False, checked=True,
                             message=f"{provider(op)}: operator {op.name}: the check could not run: "
                                     f"{type(exc).__name__}: {exc}")
    inputs_checked = [c for r in reports for c in r.inputs if c.checked]
    failed = next((r for r in reports if not r.passed), None)
    return OperatorCheck(
        **head, shapes=tuple(shapes),
        max_abs_error=_largest(c.max_abs_error for c in inputs_checked),
        max_rel_error=_largest(c.max_rel_error for c in inputs_checked),
        passed=failed is None, checked=True,
        message="" if failed is None else f"{provider(op)}: operator {failed.failure_message()}{_case(failed)}",
    )


def check_registry(registry: Registry, only_ops: Sequence[str] | None = None, *,
                   plugins: Sequence[str] | None = None, seed: int = SEED) -> list[OperatorCheck]:
    """:func:`check_op` on every operator of ``registry`` (sorted by name).

    ``only_ops`` restricts the check to those operator names (a name not in the
    registry raises LookupError); ``plugins`` to the operators of those plugins
    (a name matches a plugin or its first dotted part: ``builtin``).
    """
    missing = [name for name in only_ops or () if name not in registry]
    if missing:
        raise LookupError(f"no operator '{missing[0]}' is installed")
    return [
        check_op(op, seed)
        for op in registry
        if (only_ops is None or op.name in only_ops) and (plugins is None or plugin_matches(op.plugin, plugins))
    ]


def check_and_refuse(loaded: Loaded, logger: logging.Logger = log) -> tuple[Loaded, list[OperatorCheck]]:
    """Check every operator; return ``loaded`` without those that failed, and the verdicts.

    Each refusal is logged as an error with its message; ``loaded`` itself is
    left unchanged.
    """
    checks = check_registry(loaded.registry)
    refused = {c.op for c in checks if not c.passed}
    for c in checks:
        if not c.passed:
            logger.error("refusing %s: %s", c.op, c.message)
    exempt = sum(1 for c in checks if not c.checked)
    logger.info("gradient check: %d operators passed, %d refused, %d exempt",
                len(checks) - len(refused) - exempt, len(refused), exempt)
    kept = Registry(op for op in loaded.registry if op.name not in refused)
    plugins = [replace(p, operators=[n for n in p.operators if n not in refused]) for p in loaded.plugins]
    return Loaded(kept, plugins), checks


def _case(report: GradCheckReport) -> str:
    """``; inputs float64[2, 3], attrs beta=1.5``: enough to reproduce a failure."""
    inputs = ", ".join(f"{c.dtype}{list(c.shape)}" for c in report.inputs)
    short = {k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in report.attrs.items()}  # 6 digits
    attrs = ", ".join(f"{k}={v!r}" for k, v in short.items())
    return f"; inputs {inputs}" + (f", attrs {attrs}" if attrs else "")


def _largest(values: Iterable[float]) -> float:
    values = list(values)
    if any(math.isnan(v) for v in values):
        return math.nan
    return max(values, default=0.0)
