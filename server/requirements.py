"""Version pins a graph may carry in its metadata.

``metadata["requires"]`` lists what the graph needs, comma-separated:
``"acme>=0.2, chainrule>=0.1"`` pins a plugin distribution (or plugin name),
``"op:acme.swish"`` an operator by name. A server without a match answers
FAILED_PRECONDITION naming what is missing and what is installed.
"""
from __future__ import annotations

import re
from typing import Mapping

from chainrule.core.errors import VersionMismatchError
from chainrule.plugins.manager import Loaded

_PIN = re.compile(r"^\s*(?P<name>[A-Za-z0-9_.\-]+)\s*(?:(?P<cmp>>=|<=|==|!=|>|<)\s*(?P<version>[0-9][0-9A-Za-z.+\-]*))?\s*$")


def _version_key(version: str) -> tuple:
    parts = []
    for piece in re.split(r"[.+\-]", version):
        parts.append((0, int(piece), "") if piece.isdigit() else (1, 0, piece))
    return tuple(parts)


def _satisfies(installed: str, cmp: str, wanted: str) -> bool:
    a, b = _version_key(installed), _version_key(wanted)
    return {">=": a >= b, "<=": a <= b, "==": a == b, "!=": a != b, ">": a > b, "<": a < b}[cmp]


def check_requirements(metadata: Mapping[str, str], loaded: Loaded) -> None:
    text = metadata.get("requires", "")
    if not text.strip():
        return
    installed: dict[str, str] = {}
    for info in loaded.plugins:
        for key in {info.name, info.name.split(".", 1)[0], info.distribution}:
            if key:
                installed[key.lower()] = info.version
    for item in text.split(","):
        if not item.strip():
            continue
        if item.strip().startswith("op:"):
            name = item.strip()[3:]
            if name not in loaded.registry:
                raise VersionMismatchError(
                    f"graph requires operator '{name}', which no installed plugin provides", field="graph.metadata.requires", op=name,
                )
            continue
        match = _PIN.match(item)
        if match is None:
            raise VersionMismatchError(f"graph.metadata.requires: cannot read {item.strip()!r}", field="graph.metadata.requires")
        name = match["name"].lower()
        have = installed.get(name)
        listing = ", ".join(sorted(f"{k} {v}" for k, v in installed.items() if "." not in k)) or "none"
        if have is None:
            raise VersionMismatchError(
                f"graph requires '{item.strip()}' but no plugin '{match['name']}' is installed (installed: {listing})",
                field="graph.metadata.requires",
            )
        if match["cmp"] and not _satisfies(have, match["cmp"], match["version"]):
            raise VersionMismatchError(
                f"graph requires '{item.strip()}' but {match['name']} {have} is installed",
                field="graph.metadata.requires",
            )
