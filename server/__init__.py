"""chainrule.server: the gRPC service, its configuration and the command line.

The names below load on first use, so the client (which shares the wire
codecs in ``convert`` and ``wire``) does not import the gRPC servicer.
"""
from __future__ import annotations

from typing import Any

__all__ = ["ChainruleService", "ServerConfig", "Servicer", "create_running_server", "create_server"]


def __getattr__(name: str) -> Any:
    if name in ("Servicer", "create_running_server", "create_server"):
        from . import app

        return getattr(app, name)
    if name == "ServerConfig":
        from .config import ServerConfig

        return ServerConfig
    if name == "ChainruleService":
        from .service import ChainruleService

        return ChainruleService
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
