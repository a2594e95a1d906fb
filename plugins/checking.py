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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from chainrule.core import OpDef, Registry

from .manager import Loaded, chainrule_version, plugin_matches
from .testing import GradCheckReport, check_vjp, gradient_exemption, sample_inputs

__all__ = ["CheckCache", "OperatorCheck", "check_and_refuse", "check_op", "check_registry", "default_cache_path"]

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


def check_and_refuse(loaded: Loaded, logger: logging.Logger = log, *, builtins: bool = True,
                     cache: "CheckCache | None" = None) -> tuple[Loaded, list[OperatorCheck]]:
    """Check every operator; return ``loaded`` without those that failed, and the verdicts.

    ``builtins=False`` leaves the operators of built-in plugins unchecked (and out of the
    verdicts); ``cache`` supplies and keeps verdicts per (distribution, version, operator), so
    that operators checked before are not checked again. Each refusal is logged as an error
    with its message; ``loaded`` itself is left unchanged.
    """
    skip = set() if builtins else {p.name for p in loaded.plugins if p.builtin}
    checks: list[OperatorCheck] = []
    reused = 0
    for op in loaded.registry:
        if op.plugin in skip:
            continue
        verdict = cache.get(op) if cache is not None else None
        if verdict is None:
            verdict = check_op(op)
            if cache is not None:
                cache.put(verdict)
        else:
            reused += 1
        checks.append(verdict)
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
    return Loaded(kept, plugins), checks


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

    FORMAT = 1

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
