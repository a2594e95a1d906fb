"""Version pins a graph may carry in its metadata.

``metadata["requires"]`` lists what the graph needs, comma-separated. Each item is

* ``NAME`` or ``NAME>=VERSION`` (also ``<=``, ``==``, ``!=``, ``>``, ``<``): a plugin
  distribution (``chainrule-acme>=0.2``, ``chainrule``) or a plugin name (``acme>=0.2``);
* ``op:NAME`` or ``op:NAME>=VERSION``: an operator, optionally with the version of the
  distribution that provides it (``op:acme.swish>=0.2``).

Names compare as pip compares them (case and ``-``/``_``/``.`` do not matter);
versions by their numeric parts (``0.2`` == ``0.2.0``). A server without a
match answers FAILED_PRECONDITION naming what is missing and what is installed;
an item it cannot read is INVALID_ARGUMENT.
"""
from __future__ import annotations

import re
from typing import Mapping

from chainrule.core.errors import GraphError, VersionMismatchError
from chainrule.plugins.manager import Loaded

FIELD = "graph.metadata.requires"

_PIN = re.compile(
    r"^\s*(?P<op>op:)?(?P<name>[A-Za-z0-9_.\-]+)\s*"
    r"(?:(?P<cmp>>=|<=|==|!=|>|<)\s*(?P<version>[0-9][0-9A-Za-z.+\-]*))?\s*$"
)


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _version_key(version: str) -> tuple:
    parts = [(0, int(piece), "") if piece.isdigit() else (1, 0, piece) for piece in re.split(r"[.+\-]", version)]
    while len(parts) > 1 and parts[-1] == (0, 0, ""):
        parts.pop()  # 0.2.0 == 0.2
    return tuple(parts)


def _satisfies(installed: str, cmp: str, wanted: str) -> bool:
    a, b = _version_key(installed), _version_key(wanted)
    return {">=": a >= b, "<=": a <= b, "==": a == b, "!=": a != b, ">": a > b, "<": a < b}[cmp]


def installed_listing(loaded: Loaded) -> str:
    """``chainrule 0.1.0, chainrule-acme 0.2.0``: every distribution (or plugin without one) loaded."""
    names = {f"{p.distribution} {p.version}".strip() if p.distribution else f"plugin {p.name}" for p in loaded.plugins}
    return ", ".join(sorted(names)) or "nothing"


def check_requirements(metadata: Mapping[str, str], loaded: Loaded) -> None:
    """Raise VersionMismatchError for the first item of ``metadata["requires"]`` this server cannot satisfy."""
    text = metadata.get("requires", "")
    # plugin name, its first dotted part, distribution -> (distribution or plugin, version)
    installed: dict[str, tuple[str, str]] = {}
    for info in loaded.plugins:
        for key in (info.name, info.name.split(".", 1)[0], info.distribution):
            if key:
                installed.setdefault(_normal(key), (info.distribution or f"plugin {info.name}", info.version))
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        match = _PIN.match(item)
        if match is None:
            raise GraphError(f"{FIELD}: cannot read {item!r} (expected e.g. 'acme>=0.2' or 'op:acme.swish')",
                             field=FIELD)
        if match["op"]:
            op = loaded.registry.find(match["name"])
            if op is None and match["name"] in loaded.refused:
                raise VersionMismatchError(
                    f"graph requires operator '{match['name']}', which is installed but not served: the start-up "
                    f"gradient check refused it ({loaded.refused[match['name']]})", field=FIELD, op=match["name"],
                )
            if op is None:
                raise VersionMismatchError(
                    f"graph requires operator '{match['name']}' but no installed plugin provides it "
                    f"(installed: {installed_listing(loaded)})", field=FIELD, op=match["name"],
                )
            have = (op.distribution or f"plugin {op.plugin}", op.version)
        else:
            have = installed.get(_normal(match["name"]))
            if have is None:
                raise VersionMismatchError(
                    f"graph requires '{item}' but no plugin or distribution '{match['name']}' is installed "
                    f"(installed: {installed_listing(loaded)})", field=FIELD,
                )
        if match["cmp"] and not _satisfies(have[1] or "0", match["cmp"], match["version"]):
            raise VersionMismatchError(
                f"graph requires '{item}' but {have[0]} {have[1] or '(no version)'} is installed",
                field=FIELD, op=match["name"] if match["op"] else None,
            )
