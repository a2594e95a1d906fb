"""Check every operator of a registry against finite differences.

``chainrule check`` prints what :func:`check_registry` finds, and ``chainrule
serve --check-operators`` runs :func:`check_and_refuse` at start-up: an
operator whose vjp disagrees with central finite differences is left out of
the served registry (and the log says why), while the rest keep working.

Each operator is checked on the cases of
:func:`chainrule.plugins.testing.check_cases` (its own ``sample`` rule, or
random inputs of the default shapes, then one case per attribute value the
checker varies) and by :func:`~chainrule.plugins.testing.check_float32`, with a
generator seeded per operator, so ``chainrule check --op NAME`` reproduces the
numbers of a full run. Every case is recorded with its inputs and attributes
(:class:`CaseResult`). An operator whose check cannot even run (its forward rule
raises on the sample inputs, or it has a required attribute and no ``sample``
rule) fails too: a server asked to serve checked operators only cannot vouch for it.

``chainrule serve`` checks the operators of third-party plugins by default (built-ins are
checked by chainrule's own test suite, not at every start) and keeps the verdicts in a small
JSON file, keyed by (distribution, version, operator): :class:`CheckCache`, by default
``$XDG_CACHE_HOME/chainrule/checks.json`` (``~/.cache/chainrule/checks.json``), so that a
restart with the same distributions installed checks nothing again. A corrupt or unwritable
cache file is ignored with a warning.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from contextvars import ContextVar
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from chainrule.core import OpDef, Registry, check_attrs

from .manager import Loaded, chainrule_version, plugin_matches
from .testing import (
    SYMBOLIC_KINDS, Case, GradCheckReport, attrs_text, check_case, check_cases, check_float32, check_symbolic,
    derivatives_text, gradient_exemption, sample_rule, value_text, with_builtins,
)

__all__ = [
    "CaseResult", "CheckCache", "OperatorCheck", "check_and_refuse", "check_op", "check_registry",
    "default_cache_path",
]

log = logging.getLogger("chainrule.plugins")

#: Seed of the random inputs and cotangents (per operator).
SEED = 0

#: The registry check_op's symbolic checks compile against when none is passed (check_and_refuse sets it
#: for the operators it checks: the loaded plugins' and the built-in operators).
_REGISTRY: ContextVar[Registry | None] = ContextVar("chainrule_check_registry", default=None)


@dataclass(frozen=True)
class CaseResult:
    """One case of a check, as shown by ``chainrule check --cases`` and kept in the cache."""

    #: "sample", "default" (made-up inputs), "varied" (an attribute the checker changed), "second order"
    #: (the vjp_graph: a gradient graph and its own gradient), "jvp" (the jvp_graph) or "float32".
    kind: str
    #: The inputs, e.g. ``float64[2, 3], int64[2]``.
    inputs: str
    #: Every attribute, defaults included, as (name, value text) pairs: ``(("stride", "2"), ("padding", "0"))``.
    attrs: tuple[tuple[str, str], ...]
    #: "passed", "FAILED" or "skipped".
    status: str
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    #: The attribute varied (kind "varied"); why the case was skipped or failed.
    varied: str = ""
    note: str = ""

    def attrs_text(self) -> str:
        """``stride=2, padding=0``."""
        return ", ".join(f"{name}={value}" for name, value in self.attrs)

    def describe(self) -> str:
        label = f"varied {self.varied}" if self.kind == "varied" else self.kind
        text = f"{label}: {self.inputs or 'no inputs'}" + (f"; {self.attrs_text()}" if self.attrs else "")
        text += f": {self.status}"
        if self.status == "passed" and self.kind != "float32":
            text += f" (max abs error {self.max_abs_error:.2g}, max rel error {self.max_rel_error:.2g})"
        return text + (f": {self.note}" if self.note else "")


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
    #: Every case tried, with its inputs and attributes, in order: first order, the symbolic rules'
    #: ("second order", "jvp"), then float32.
    cases: tuple[CaseResult, ...] = ()
    #: What was checked besides the vjp (testing.derivatives_text): "second order, jvp", one of them,
    #: or "first order only" (no symbolic rules: not a failure); "" for an exempt operator.
    derivatives: str = ""

    @property
    def status(self) -> str:
        if not self.checked:
            return "exempt"
        return "passed" if self.passed else "FAILED"

    def attrs_text(self) -> str:
        """The values tried per attribute over the cases checked, e.g. ``stride=1,2 padding=0``."""
        seen: dict[str, list[str]] = {}
        for case in self.cases:
            if case.status == "skipped" or not case.attrs:
                continue
            for name, value in case.attrs:
                values = seen.setdefault(name, [])
                short = _short(value)
                if short not in values:
                    values.append(short)
        return " ".join(f"{name}={','.join(values)}" for name, values in seen.items())

    @property
    def skipped(self) -> int:
        """How many varied cases were skipped (values the operator refuses)."""
        return sum(1 for c in self.cases if c.status == "skipped")

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


def check_op(op: OpDef, seed: int = SEED, registry: Registry | None = None) -> OperatorCheck:
    """Compare ``op``'s vjp with finite differences on each of its cases, check its symbolic rules
    (second order, jvp) where it has them, then check float32. ``registry``: the operators its symbolic
    rules may use besides the built-in ones (the registry it was loaded with)."""
    head = dict(op=op.name, plugin=op.plugin, distribution=op.distribution, version=op.version)
    exemption = gradient_exemption(op)
    if exemption is not None:
        return OperatorCheck(**head, shapes=(), max_abs_error=0.0, max_rel_error=0.0, passed=True, checked=False,
                             message=exemption)
    head["derivatives"] = derivatives_text(op)
    registry = registry if registry is not None else _REGISTRY.get()
    reports: list[GradCheckReport] = []
    results: list[CaseResult] = []
    case: Case | None = None
    try:
        cases = check_cases(op, np.random.default_rng(seed))
        for case in cases:
            report = check_case(op, case, seed=seed)
            reports.append(report)
            results.append(_case_result(report, case))
        case = None
        for report in check_symbolic(op, cases, registry, seed=seed):
            reports.append(report)
            results.append(_case_result(report, None))
        f32 = check_float32(op, cases, seed=seed)
        if f32 is not None:
            reports.append(f32)
            results.append(_case_result(f32, None))
    except Exception as exc:  # a plugin's rule may raise anything; the verdict must still name it
        where = "" if case is None else f" ({_case_label(case)}; inputs {_inputs_text(case.inputs)}{_attrs_of(op, case)})"
        fix = ("give the operator a @<operator>.sample rule (sample= of OpDef) whose inputs and attributes "
               "its rules accept" if sample_rule(op) is None else "make the rules accept the sample's inputs and "
               "attributes, or change the sample rule")
        return OperatorCheck(**head, shapes=_shapes(reports), max_abs_error=math.nan, max_rel_error=math.nan,
                             passed=False, checked=True, cases=tuple(results),
                             message=f"{provider(op)}: operator {op.name}: the check could not run{where}: "
                                     f"{type(exc).__name__}: {exc}; fix: {fix}")
    inputs_checked = [c for r in reports if _first_order(r) for c in r.inputs if c.checked]
    failed = next((r for r in reports if not r.passed), None)
    return OperatorCheck(
        **head, shapes=_shapes(reports),
        max_abs_error=_largest(c.max_abs_error for c in inputs_checked),
        max_rel_error=_largest(c.max_rel_error for c in inputs_checked),
        passed=failed is None, checked=True, cases=tuple(results),
        message="" if failed is None else f"{provider(op)}: operator {failed.failure_message()}{_case(failed, op)}",
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
    derived = with_builtins(registry)  # what the derived graphs of the symbolic checks compile against
    return [
        check_op(op, seed, derived)
        for op in registry
        if (only_ops is None or op.name in only_ops) and (plugins is None or plugin_matches(op.plugin, plugins))
    ]


def check_and_refuse(loaded: Loaded, logger: logging.Logger = log, *, builtins: bool = True,
                     cache: "CheckCache | None" = None) -> tuple[Loaded, list[OperatorCheck]]:
    """Check every operator; return ``loaded`` without those that failed, and the verdicts.

    ``builtins=False`` leaves the operators of built-in plugins unchecked (and out of the
    verdicts); ``cache`` supplies and keeps verdicts per (distribution, version, operator), so
    that operators checked before are not checked again. Each refusal is logged as an error
    with its message and kept in the result's ``refused``; ``loaded`` itself is left unchanged.
    """
    skip = set() if builtins else {p.name for p in loaded.plugins if p.builtin}
    checks: list[OperatorCheck] = []
    reused = 0
    token = _REGISTRY.set(None)
    try:
        for op in loaded.registry:
            if op.plugin in skip:
                continue
            verdict = cache.get(op) if cache is not None else None
            if verdict is None:
                if _REGISTRY.get() is None:  # what the derived graphs compile against: built once
                    _REGISTRY.set(with_builtins(loaded.registry))
                verdict = check_op(op)
                if cache is not None:
                    cache.put(verdict)
            else:
                reused += 1
            checks.append(verdict)
    finally:
        _REGISTRY.reset(token)
    if cache is not None:
        cache.save()
    refused = {c.op for c in checks if not c.passed}
    for c in checks:
        if not c.passed:
            logger.error("refusing %s: %s", c.op, c.message)
    exempt = sum(1 for c in checks if not c.checked)
    logger.info("gradient check: %d operators passed, %d refused, %d exempt%s%s",
                len(checks) - len(refused) - exempt, len(refused), exempt,
                f" ({reused} verdicts from {cache.path})" if cache is not None and reused else "",
                "" if builtins else " (built-in operators are not checked at start)")
    kept = Registry(op for op in loaded.registry if op.name not in refused)
    plugins = [replace(p, operators=[n for n in p.operators if n not in refused]) for p in loaded.plugins]
    refusals = {**loaded.refused, **{c.op: c.message for c in checks if not c.passed}}
    return Loaded(kept, plugins, list(loaded.broken), list(loaded.unmatched), refusals), checks


def default_cache_path(env: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CACHE_HOME/chainrule/checks.json``, else ``~/.cache/chainrule/checks.json``."""
    env = os.environ if env is None else env
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "chainrule" / "checks.json"


class CheckCache:
    """Verdicts of earlier checks, in a JSON file, keyed by (distribution, version, operator).

    Operators without a distribution (plugins given in code) are never cached: nothing says
    when their code changes. The whole file is dropped when chainrule's version (the checker)
    changes. Reading or writing the file never raises: a corrupt or unwritable file is logged
    as a warning and the cache then works in memory only.
    """

    FORMAT = 3  # 2: every verdict keeps its cases (CaseResult); 3: and the symbolic rules' ("derivatives")

    def __init__(self, path: str | os.PathLike[str] | None = None, logger: logging.Logger = log) -> None:
        self.path = Path(path) if path else default_cache_path()
        self.log = logger
        self.entries: dict[str, dict[str, Any]] = {}
        self.changed = False
        self._load()

    @staticmethod
    def key(distribution: str, version: str, op: str) -> str:
        return f"{distribution} {version} {op}"

    def _load(self) -> None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        except (OSError, UnicodeDecodeError) as exc:
            self.log.warning("gradient-check cache %s cannot be read (%s); checking without it", self.path, exc)
            return
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or not isinstance(data.get("checks"), dict):
                raise ValueError("not a chainrule check cache")
        except ValueError as exc:
            self.log.warning("gradient-check cache %s is corrupt (%s); ignoring it (it will be rewritten)",
                             self.path, exc)
            self.changed = True
            return
        if data.get("format") != self.FORMAT or data.get("chainrule") != chainrule_version():
            self.changed = True  # another checker: every verdict is checked again
            return
        self.entries = {k: v for k, v in data["checks"].items() if isinstance(v, dict)}

    def get(self, op: OpDef) -> OperatorCheck | None:
        """The cached verdict on ``op``, or None (never checked, no distribution, or unreadable)."""
        if not op.distribution or not op.version:
            return None
        entry = self.entries.get(self.key(op.distribution, op.version, op.name))
        if entry is None:
            return None
        try:
            return OperatorCheck(
                op=op.name, plugin=op.plugin, distribution=op.distribution, version=op.version,
                shapes=tuple(tuple(tuple(int(n) for n in shape) for shape in case) for case in entry["shapes"]),
                max_abs_error=float(entry["max_abs_error"]), max_rel_error=float(entry["max_rel_error"]),
                passed=bool(entry["passed"]), checked=bool(entry["checked"]), message=str(entry["message"]),
                cases=tuple(CaseResult(**{**case, "attrs": tuple((str(k), str(v)) for k, v in case["attrs"])})
                            for case in entry["cases"]),
                derivatives=str(entry["derivatives"]),
            )
        except (KeyError, TypeError, ValueError):
            return None

    def put(self, check: OperatorCheck) -> None:
        if not check.distribution or not check.version:
            return
        entry = asdict(check)
        for name in ("op", "plugin", "distribution", "version"):
            del entry[name]
        # json writes nan as NaN, which json reads back
        self.entries[self.key(check.distribution, check.version, check.op)] = entry
        self.changed = True

    def save(self) -> None:
        """Write the file (atomically) if anything changed; a failure is a warning."""
        if not self.changed:
            return
        data = {"format": self.FORMAT, "chainrule": chainrule_version(), "checks": self.entries}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".checks-", suffix=".json", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(data, f, indent=1, sort_keys=True)
                os.replace(tmp, self.path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as exc:
            self.log.warning("gradient-check cache %s cannot be written (%s); the next start checks again",
                             self.path, exc)
            return
        self.changed = False


def _case(report: GradCheckReport, op: OpDef) -> str:
    """``; inputs float64[2, 3], attrs beta=1.5``: enough to reproduce a failure; for a case the
    checker made by varying an attribute, which one and what the sample rule left it at."""
    text = f"; inputs {report.inputs_text()}" + (f", attrs {attrs_text(report.attrs)}" if report.attrs else "")
    if report.kind == "varied":
        value = value_text(report.attrs[report.varied])
        text += (f" ({report.varied}={value} is a value the checker tried: the sample rule never draws it; "
                 f"add it to the sample rule or to vary= to keep it checked)")
    return text


def _case_result(report: GradCheckReport, case: Case | None) -> CaseResult:
    checked = [c for c in report.inputs if c.checked]
    status = "skipped" if report.skipped else ("passed" if report.passed else "FAILED")
    note = report.skipped or ("" if report.passed else report.failure_message().split(": ", 1)[-1])
    if report.kind in SYMBOLIC_KINDS:  # the kind heads the line already
        note = note.removeprefix(f"{report.kind}: ")
    return CaseResult(
        kind=report.kind,
        inputs=report.inputs_text() if report.inputs or report.case_inputs or case is None
        else _inputs_text(case.inputs),
        attrs=tuple((name, value_text(value)) for name, value in report.attrs.items()), status=status,
        max_abs_error=_largest(c.max_abs_error for c in checked), max_rel_error=_largest(c.max_rel_error for c in checked),
        varied=report.varied, note=note,
    )


def _attrs_of(op: OpDef, case: Case) -> str:
    """``, attrs k=2.0``: the case's attributes with their defaults filled in ("" for none)."""
    try:
        attrs = check_attrs(op, case.attrs)
    except Exception:  # noqa: BLE001 - a schema refusal: show what was given
        attrs = dict(case.attrs)
    return f", attrs {attrs_text(attrs)}" if attrs else ""


def _case_label(case: Case) -> str:
    return f"case varying {case.varied}" if case.kind == "varied" else f"{case.kind} case"


def _inputs_text(inputs: Sequence[Any]) -> str:
    return ", ".join(f"{np.asarray(x).dtype.name}{list(np.shape(x))}" for x in inputs)


def _shapes(reports: Sequence[GradCheckReport]) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """The input shapes of each case whose vjp was checked by finite differences."""
    return tuple(tuple(c.shape for c in r.inputs) for r in reports if _first_order(r) and not r.skipped)


def _first_order(report: GradCheckReport) -> bool:
    """Whether ``report`` compares the vjp with finite differences (not float32, not a symbolic rule)."""
    return report.kind != "float32" and report.kind not in SYMBOLIC_KINDS


def _short(value: str) -> str:
    """A value of attrs_text for the table: floats to 3 significant digits, no spaces."""
    try:
        number = float(value)
    except ValueError:
        return value.removeprefix("tensor ").replace(" ", "")
    return f"{number:.3g}" if "." in value or "e" in value else value


def _largest(values: Iterable[float]) -> float:
    values = list(values)
    if any(math.isnan(v) for v in values):
        return math.nan
    return max(values, default=0.0)
