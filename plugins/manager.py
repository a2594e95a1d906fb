"""Load operator plugins with pluggy and fill a Registry.

Built-in families are plugins too, loaded by the same path as third-party ones:
first the default modules below, then every entry point in the ``chainrule``
group (in name order), then ``extra``. ``CHAINRULE_PLUGINS`` (a comma list)
restricts which plugins load and ``CHAINRULE_DISABLE_PLUGINS`` removes some,
``CHAINRULE_PREFER`` names the plugins that win a name conflict; a name matches
a plugin's full name or its first dotted part, so ``builtin`` means every
built-in family. A name in these settings that matches no plugin is reported
in :attr:`Loaded.unmatched`.

One broken plugin breaks nothing else: a plugin that fails to import, has no
``register_operators`` hook, whose hook raises, that registers an invalid
operator, an operator name without its prefix, or a name another plugin
already registered, is left out whole (none of its operators is registered)
and recorded in :attr:`Loaded.broken` with the reason and the fix; every other
plugin loads. The commands decide what a broken plugin means for them
(``serve`` refuses to start, ``ops`` warns).

Operator names of a plugin that is not built in start with its prefix: the
first dotted part of the plugin's (entry point's) name followed by a dot, so
plugin ``acme`` (or ``acme.vision``) registers ``acme.swish``. Plugin names
whose first part is ``builtin`` are reserved for the built-in families.
"""
from __future__ import annotations

import difflib
import functools

import importlib
import importlib.metadata as metadata
import os
import types
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, Sequence

import pluggy

from chainrule.core import OpDef, Registry
from chainrule.core.errors import DuplicateOperatorError, PluginError
from chainrule.core.operator import rule_signature_problem, validate_opdef

from . import hookspecs
from . import testing
from .testing import vjp_contract_problem

ENTRY_POINT_GROUP = "chainrule"
BUILTIN_DISTRIBUTION = "chainrule"
BUILTIN_PREFIX = "builtin"
BUILTIN_FAMILIES = ("arith", "elementwise", "linalg", "reduce", "shape", "nn", "select", "compare", "index", "conv",
                    "control", "derivative")
ENV_ONLY = "CHAINRULE_PLUGINS"
ENV_DISABLE = "CHAINRULE_DISABLE_PLUGINS"
ENV_PREFER = "CHAINRULE_PREFER"


@dataclass
class PluginInfo:
    """One loaded plugin: its name, where it comes from, and what it provides."""

    name: str
    distribution: str
    version: str
    builtin: bool
    operators: list[str] = field(default_factory=list)


@dataclass
class BrokenPlugin:
    """A plugin that was left out: what failed (``problem``) and what to do about it (``fix``)."""

    name: str
    distribution: str
    version: str
    builtin: bool
    problem: str
    fix: str

    @property
    def origin(self) -> str:
        if self.distribution:
            return f"distribution {self.distribution} {self.version}".rstrip()
        return "no distribution"

    @property
    def message(self) -> str:
        """One line: the plugin, its distribution and version, what failed, the fix, how to leave it out."""
        fix = f"fix: {self.fix}, or" if self.fix else "until it is fixed,"
        return (f"plugin '{self.name}' ({self.origin}) was not loaded: {self.problem}; {fix} "
                f"leave the plugin out with {ENV_DISABLE}={self.name}")


class BrokenPluginsError(PluginError):
    """Raised by :meth:`Loaded.raise_for_problems`: ``lines`` has one message per problem."""

    reason = "PLUGIN_ERROR"

    def __init__(self, lines: Sequence[str]) -> None:
        super().__init__("; ".join(lines))
        self.lines = list(lines)


@dataclass
class Loaded:
    """The result of loading plugins: the registry, who provided what, and what was left out."""

    registry: Registry
    plugins: list[PluginInfo]
    #: Plugins left out, each with the reason and the fix.
    broken: list[BrokenPlugin] = field(default_factory=list)
    #: One message per name in CHAINRULE_PLUGINS, CHAINRULE_DISABLE_PLUGINS or CHAINRULE_PREFER
    #: (or their flags) that matches no installed plugin.
    unmatched: list[str] = field(default_factory=list)
    #: Operators the gradient check refused (chainrule.plugins.checking.check_and_refuse): name ->
    #: the verdict's message. They are not in the registry.
    refused: dict[str, str] = field(default_factory=dict)

    @property
    def problems(self) -> list[str]:
        """Every broken plugin's message, then every unmatched name's."""
        return [b.message for b in self.broken] + list(self.unmatched)

    def raise_for_problems(self) -> "Loaded":
        """Raise BrokenPluginsError when a plugin is broken or a setting names no plugin; else return self."""
        if self.problems:
            raise BrokenPluginsError(self.problems)
        return self


@functools.cache
def chainrule_version() -> str:
    """The installed chainrule's version (read once: the metadata lookup costs about a millisecond)."""
    try:
        return metadata.version(BUILTIN_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "0+unknown"


def parse_names(text: str | None) -> list[str] | None:
    """``"acme, builtin"`` -> ``["acme", "builtin"]``; empty or None -> None (no filter)."""
    if not text:
        return None
    names = [part.strip() for part in text.split(",") if part.strip()]
    return names or None


def plugin_matches(plugin: str, names: Iterable[str]) -> bool:
    """True when one of ``names`` is ``plugin`` or its first dotted part (``builtin`` matches ``builtin.nn``)."""
    head = plugin.split(".", 1)[0]
    return any(name in (plugin, head) for name in names)


def operator_prefix(plugin: str) -> str:
    """The prefix a third-party plugin's operator names start with: ``acme.`` for ``acme`` and ``acme.vision``."""
    return plugin.split(".", 1)[0] + "."


class _Refused(Exception):
    """A plugin is left out: ``problem`` and ``fix`` (internal)."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix


_FIX_CODE = ""  # the problem ends in its fix


def load_plugins(
    *,
    only: Sequence[str] | None = None,
    disable: Sequence[str] | None = None,
    prefer: Sequence[str] | None = None,
    extra: Sequence[tuple[str, Any] | tuple[str, Any, str, str]] = (),
    entry_points: bool = True,
    env: Mapping[str, str] | None = None,
) -> Loaded:
    """Load built-in and installed plugins into a new Registry.

    ``only``/``disable``/``prefer`` default to the environment variables. ``prefer``
    names plugins that win a name conflict; without it the plugin loaded second
    is left out, named in :attr:`Loaded.broken` with both plugins and
    distributions. ``extra`` adds ``(name, plugin object)`` pairs, or
    ``(name, plugin, distribution, version)`` (used by tests and embedding
    programs); they follow the rules of third-party plugins. Never raises for a
    broken plugin: call :meth:`Loaded.raise_for_problems` to make any an error.
    """
    env = os.environ if env is None else env
    only = list(only) if only is not None else parse_names(env.get(ENV_ONLY))
    disable = list(disable) if disable is not None else (parse_names(env.get(ENV_DISABLE)) or [])
    prefer = list(prefer) if prefer is not None else (parse_names(env.get(ENV_PREFER)) or [])

    def wanted(name: str) -> bool:
        return (only is None or plugin_matches(name, only)) and not plugin_matches(name, disable)

    # Every plugin that could load: (name, load() -> object, distribution, version, builtin, where)
    version = chainrule_version()
    candidates: list[tuple[str, Callable[[], Any], str, str, bool, str]] = []
    for family in BUILTIN_FAMILIES:
        module = f"chainrule.plugins.builtin.{family}"
        candidates.append((f"{BUILTIN_PREFIX}.{family}", functools.partial(importlib.import_module, module),
                           BUILTIN_DISTRIBUTION, version, True, module))
    if entry_points:
        seen: set[tuple[str, str]] = set()
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist else ""
            if (ep.name, dist) in seen:  # one distribution seen twice on sys.path
                continue
            seen.add((ep.name, dist))
            candidates.append((ep.name, ep.load, dist, ep.dist.version if ep.dist else "", False, ep.value))
    for name, plugin, *provenance in extra:
        dist, dist_version = provenance if provenance else ("", "")
        candidates.append((name, functools.partial(lambda p: p, plugin), dist, dist_version, False, _where(plugin)))

    known = [c[0] for c in candidates]
    unmatched = [
        _unmatched(setting, name, known)
        for setting, names in (((f"{ENV_ONLY} (--plugins)"), only or []),
                               ((f"{ENV_DISABLE} (--disable-plugins)"), disable),
                               ((f"{ENV_PREFER} (--prefer)"), prefer))
        for name in names if not any(plugin_matches(k, [name]) for k in known)
    ]

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    origin: dict[str, tuple[str, str, bool]] = {}  # plugin name -> (distribution, version, builtin)
    broken: list[BrokenPlugin] = []

    def refuse(name: str, dist: str, dist_version: str, builtin: bool, problem: str, fix: str) -> None:
        broken.append(BrokenPlugin(name, dist, dist_version, builtin, problem, fix))

    for name, load, dist, dist_version, builtin, where in candidates:
        if not wanted(name):
            continue
        try:
            if not builtin and name.split(".", 1)[0] == BUILTIN_PREFIX:
                raise _Refused(f"plugin names starting with '{BUILTIN_PREFIX}' are reserved for chainrule's own "
                               f"operators", "rename the entry point in the distribution's [project.entry-points.chainrule]")
            if name in origin:
                other = origin[name][0] or "another plugin"
                raise _Refused(f"plugin name '{name}' is also used by {other}",
                               f"uninstall one of the two distributions (pip uninstall {dist or other})")
            try:
                plugin = load()
            except PluginError as exc:  # an OperatorSet declaration refused as the module runs: says its fix
                raise _Refused(f"failed to import: {type(exc).__name__}: {exc.message}", _FIX_CODE) from None
            except Exception as exc:
                raise _Refused(f"failed to import: {type(exc).__name__}: {exc}",
                               f"make '{where}' importable (try python -c 'import {where.split(':')[0]}'; "
                               f"a missing dependency belongs in the distribution's dependencies)") from None
            try:
                pm.register(plugin, name=name)
            except (pluggy.PluginValidationError, ValueError) as exc:
                raise _Refused(f"is invalid: {exc}", "give register_operators the signature (register)") from None
            if not any(impl.plugin_name == name for impl in pm.hook.register_operators.get_hookimpls()):
                pm.unregister(name=name)
                if callable(getattr(plugin, "register_operators", None)):
                    raise _Refused(f"'{where}' has a register_operators that is not marked as a hook implementation",
                                   "decorate it with @chainrule.plugins.hookimpl, or write "
                                   "register_operators = ops.hookimpl() for an OperatorSet ops")
                misspelt = _unknown_hooks(plugin)
                if misspelt:
                    raise _Refused(f"'{where}' has no register_operators hook: it marks {_listing(misspelt)} as a hook "
                                   f"implementation, and chainrule has no hook of that name",
                                   f"rename {misspelt[0]} to register_operators, the only hook chainrule calls")
                raise _Refused(f"'{where}' has no register_operators hook, so the plugin provides no operators",
                               "define register_operators = ops.hookimpl() in it (ops an OperatorSet), or point the "
                               "entry point at the module that does")
        except _Refused as exc:
            refuse(name, dist, dist_version, builtin, exc.problem, exc.fix)
            continue
        origin[name] = (dist, dist_version, builtin)

    while True:  # hook implementations of hooks chainrule does not have (a misspelt name)
        try:
            pm.check_pending()
            break
        except pluggy.PluginValidationError as exc:
            name = pm.get_name(exc.plugin) or str(exc.plugin)
            misspelt = _unknown_hooks(exc.plugin) or ["a hook"]
            pm.unregister(exc.plugin)
            dist, dist_version, builtin = origin.pop(name, ("", "", False))
            refuse(name, dist, dist_version, builtin,
                   f"it marks {_listing(misspelt)} as a hook implementation, and chainrule has no hook of that name",
                   f"the only hook chainrule calls is register_operators(register): rename or remove {misspelt[0]}")

    registry = Registry()
    infos: list[PluginInfo] = []
    # get_hookimpls() lists implementations in registration order: built-ins first.
    for impl in pm.hook.register_operators.get_hookimpls():
        name = impl.plugin_name
        dist, dist_version, builtin = origin.get(name, ("", "", False))
        try:
            ops = _collect(impl, name, builtin)
            winners = _resolve(registry, ops, name, prefer)
        except _Refused as exc:
            refuse(name, dist, dist_version, builtin, exc.problem, exc.fix)
            continue
        info = PluginInfo(name, dist, dist_version, builtin)
        for op in ops:
            if op.name in winners:
                registry.add(replace(op, plugin=name, distribution=dist, version=dist_version),
                             replace=registry.find(op.name) is not None)
            info.operators.append(op.name)
        infos.append(info)
    for info in infos:
        info.operators = [n for n in info.operators if (op := registry.find(n)) is not None and op.plugin == info.name]
    return Loaded(registry, infos, broken, unmatched)


def _unknown_hooks(plugin: Any) -> list[str]:
    """Names in ``plugin`` marked with @hookimpl that are not chainrule hooks (a misspelt register_operators)."""
    marker = f"{hookspecs.PROJECT}_impl"
    names = []
    for attr in dir(plugin):
        if attr == "register_operators":
            continue
        try:
            value = getattr(plugin, attr)
        except Exception:  # noqa: BLE001 - a property may raise; it is no hook then
            continue
        if hasattr(value, marker):
            names.append(attr)
    return names


def _listing(names: Sequence[str]) -> str:
    return ", ".join(f"'{n}'" for n in names)


def _where(plugin: Any) -> str:
    """How a plugin given in code is named in messages: its module's name, or its class's."""
    name = getattr(plugin, "__name__", None) if isinstance(plugin, types.ModuleType) else None
    return name or f"{type(plugin).__name__} object"


def _unmatched(setting: str, name: str, known: Sequence[str]) -> str:
    heads = sorted({k.split(".", 1)[0] for k in known} | set(known))
    close = difflib.get_close_matches(name, heads, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return (f"{setting} names '{name}', which matches no installed plugin; {hint}"
            f"installed: {', '.join(sorted({k.split('.', 1)[0] for k in known}))} (see chainrule plugins)")


def _collect(impl: Any, name: str, builtin: bool) -> list[OpDef]:
    """Run one plugin's hook and check every operator it registers; _Refused on the first problem."""
    provided: list[OpDef] = []

    def register(op: OpDef) -> None:
        validate_opdef(op)
        provided.append(op)

    try:
        impl.function(register=register)
    except PluginError as exc:
        raise _Refused(exc.message, _FIX_CODE) from None
    except Exception as exc:
        raise _Refused(f"raised while registering operators: {type(exc).__name__}: {exc}",
                       "make register_operators run without raising (run it in your tests with load_plugins(extra=...))") from None
    prefix = operator_prefix(name)
    for op in provided:
        try:
            validate_opdef(op)  # again: a hook may catch register's error and carry on
        except PluginError as exc:
            raise _Refused(exc.message, _FIX_CODE) from None
        if not builtin and not op.name.startswith(prefix):
            bare = op.name.split(".")[-1]
            raise _Refused(f"operator '{op.name}' does not start with the plugin's prefix '{prefix}'",
                           f"prefix your operator names with '{prefix}' ('{prefix}{bare}')")
        problem = rule_signature_problem(op)
        if problem:
            raise _Refused(problem, _FIX_CODE)
        if not builtin:  # the first check: one forward and one vjp call, judging the vjp's result
            contract = vjp_contract_problem(op)
            if contract:
                raise _Refused(*contract)
    names = [op.name for op in provided]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise _Refused(f"registers operator '{twice[0]}' twice", "register each operator once")
    return provided


def _rank(plugin: str, prefer: Sequence[str]) -> int:
    """2 when ``prefer`` names the plugin in full, 1 when only its first dotted part, else 0."""
    if plugin in prefer:
        return 2
    return 1 if plugin_matches(plugin, prefer) else 0


def _resolve(registry: Registry, ops: Sequence[OpDef], name: str, prefer: Sequence[str]) -> set[str]:
    """The names of ``ops`` that go into the registry (the others lose to a preferred plugin);
    _Refused when one conflicts with an operator already registered and neither plugin is preferred."""
    winners: set[str] = set()
    for op in ops:
        previous = registry.find(op.name)
        if previous is None:
            winners.add(op.name)
            continue
        mine, theirs = _rank(name, prefer), _rank(previous.plugin, prefer)
        if mine > theirs:
            winners.add(op.name)
        elif mine == theirs:
            other = f"plugin '{previous.plugin}' ({_origin(previous)})"
            raise _Refused(
                f"operator '{op.name}' is already registered by {other}",
                f"pick one with --prefer {previous.plugin} or --prefer {name} (env {ENV_PREFER})",
            )
    return winners


def _origin(op: OpDef) -> str:
    return f"distribution {op.distribution} {op.version}".rstrip() if op.distribution else "no distribution"


def load_registry(**options: Any) -> Registry:
    """Shortcut: :func:`load_plugins` and return only the registry."""
    return load_plugins(**options).registry


__all__ = [
    "BrokenPlugin", "BrokenPluginsError", "DuplicateOperatorError", "Loaded", "PluginInfo", "load_plugins",
    "load_registry", "operator_prefix", "parse_names", "plugin_matches",
]


# The gradient checker's second-order checks run derivative graphs made of built-in operators; it
# cannot import this module (which imports it), so it gets the loader from here.
testing.builtin_loader = lambda: load_plugins(env={}, entry_points=False, only=["builtin"]).registry
