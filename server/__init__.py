"""chainrule.server: the gRPC service, its configuration and the command line.

The names below load on first use, so the client (which shares the wire
codecs in ``convert`` and ``wire``) does not import the server's gRPC
services, health, reflection and plugin machinery.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ChainruleService": "service", "Servicer": "app", "ServerConfig": "config",
    "create_running_server": "app", "create_server": "app",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
