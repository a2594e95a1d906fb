"""Load operator plugins with pluggy and fill a Registry.

Built-in families are plugins too, loaded by the same path as third-party ones:
first the default modules below, then every entry point in the ``chainrule``
group. ``CHAINRULE_PLUGINS`` (a comma list) restricts which plugins load and
``CHAINRULE_DISABLE_PLUGINS`` removes some, ``CHAINRULE_PREFER`` names the
plugins that win a name conflict; a name matches a plugin's full name or its
first dotted part, so ``builtin`` means every built-in family.
"""
from __future__ import annotations

import functools

import importlib
import importlib.metadata as metadata
import os
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping, Sequence

import pluggy

from chainrule.core import OpDef, Registry
from chainrule.core.errors import DuplicateOperatorError, PluginError
from chainrule.core.operator import validate_opdef

from . import hookspecs

ENTRY_POINT_GROUP = "chainrule"
BUILTIN_DISTRIBUTION = "chainrule"
BUILTIN_FAMILIES = ("arith", "elementwise", "linalg", "reduce", "shape", "nn", "select", "compare", "index", "conv")
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
class Loaded:
    """The result of loading plugins: the registry and who provided what."""

    registry: Registry
    plugins: list[PluginInfo]


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
    names plugins that win a name conflict; without it a conflict raises
    DuplicateOperatorError naming both plugins and distributions. ``extra`` adds
    ``(name, plugin object)`` pairs, or ``(name, plugin, distribution, version)``
    (used by tests and embedding programs).
    """
    env = os.environ if env is None else env
    only = list(only) if only is not None else parse_names(env.get(ENV_ONLY))
    disable = list(disable) if disable is not None else (parse_names(env.get(ENV_DISABLE)) or [])
    prefer = list(prefer) if prefer is not None else (parse_names(env.get(ENV_PREFER)) or [])

    def wanted(name: str) -> bool:
        return (only is None or plugin_matches(name, only)) and not plugin_matches(name, disable)

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    origin: dict[str, tuple[str, str, bool]] = {}  # plugin name -> (distribution, version, builtin)
    version = chainrule_version()

    for family in BUILTIN_FAMILIES:
        name = f"builtin.{family}"
        if wanted(name):
            module = importlib.import_module(f"chainrule.plugins.builtin.{family}")
            _register(pm, module, name)
            origin[name] = (BUILTIN_DISTRIBUTION, version, True)

    if entry_points:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if not wanted(ep.name):
                continue
            dist = ep.dist.name if ep.dist else ""
            dist_version = ep.dist.version if ep.dist else ""
            if pm.has_plugin(ep.name):
                if origin[ep.name][0] == dist:  # one distribution seen twice on sys.path
                    continue
                other = origin[ep.name][0] or "the built-in operators"
                raise PluginError(
                    f"plugin name '{ep.name}' is used by distribution {dist} {dist_version} and by {other}; "
                    f"uninstall one of them", plugin=ep.name,
                )
            try:
                plugin = ep.load()
            except Exception as exc:
                raise PluginError(
                    f"plugin '{ep.name}' (distribution {dist} {dist_version}) failed to import: "
                    f"{type(exc).__name__}: {exc}", plugin=ep.name,
                ) from exc
            _register(pm, plugin, ep.name)
            origin[ep.name] = (dist, dist_version, False)

    for name, plugin, *provenance in extra:
        if wanted(name):
            _register(pm, plugin, name)
            dist, dist_version = provenance if provenance else ("", "")
            origin[name] = (dist, dist_version, False)

    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin '{exc.plugin}': {exc}", plugin=str(exc.plugin)) from None

    registry = Registry()
    infos: list[PluginInfo] = []
    # get_hookimpls() lists implementations in registration order: built-ins first.
    for impl in pm.hook.register_operators.get_hookimpls():
        name = impl.plugin_name
        dist, dist_version, builtin = origin.get(name, ("", "", False))
        info = PluginInfo(name, dist, dist_version, builtin)
        provided: list[OpDef] = []

        def register(op: OpDef, _provided: list[OpDef] = provided, _name: str = name) -> None:
            validate_opdef(op, plugin=_name)
            _provided.append(op)

        try:
            impl.function(register=register)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(
                f"plugin '{name}' raised while registering operators: {type(exc).__name__}: {exc}", plugin=name,
            ) from exc
        for op in provided:
            op = replace(op, plugin=name, distribution=dist, version=dist_version)
            _add(registry, op, prefer)
            info.operators.append(op.name)
        infos.append(info)
    for info in infos:
        info.operators = [n for n in info.operators if (op := registry.find(n)) is not None and op.plugin == info.name]
    return Loaded(registry, infos)


def _register(pm: pluggy.PluginManager, plugin: Any, name: str) -> None:
    try:
        pm.register(plugin, name=name)
    except (pluggy.PluginValidationError, ValueError) as exc:
        raise PluginError(f"plugin '{name}' is invalid: {exc}", plugin=name) from None


def _add(registry: Registry, op: OpDef, prefer: Sequence[str]) -> None:
    previous = registry.find(op.name)
    if previous is None:
        registry.add(op)
        return
    if plugin_matches(op.plugin, prefer) and not plugin_matches(previous.plugin, prefer):
        registry.add(op, replace=True)
    elif plugin_matches(previous.plugin, prefer) and not plugin_matches(op.plugin, prefer):
        return
    else:
        try:
            registry.add(op)  # raises DuplicateOperatorError naming both
        except DuplicateOperatorError as exc:
            raise DuplicateOperatorError(
                f"{exc.message}; pick one with --prefer {previous.plugin} or --prefer {op.plugin} "
                f"(env {ENV_PREFER}), or leave one out with {ENV_DISABLE}", op=op.name, plugin=op.plugin,
            ) from None


def load_registry(**options: Any) -> Registry:
    """Shortcut: :func:`load_plugins` and return only the registry."""
    return load_plugins(**options).registry


__all__ = [
    "DuplicateOperatorError", "Loaded", "PluginInfo", "load_plugins", "load_registry", "parse_names", "plugin_matches",
]
