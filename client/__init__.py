"""chainrule.client: build graphs in Python and evaluate them on a chainrule server.

    from chainrule.client import Client, GraphBuilder, ops

    g = GraphBuilder()
    x, y, z = g.input("x"), g.input("y"), g.input("z")
    f = ((x + y) * z).named("f")
    with Client("127.0.0.1:50051") as client:
        r = client.evaluate(f, x=1.0, y=3.0, z=-3.0)
    r.value, r.grad[x], r.grad["f"]

This package carries no server: it imports neither the server nor the
plugins. The same API in-process, without a server, is
``chainrule.server.LocalClient`` (it carries the service and its plugins).
"""
from typing import Any

from . import ops
from .builder import GraphBuilder, Var
from .channel import TLS
from .client import Client
from .errors import (
    Cancelled, ChainruleRpcError, DeadlineExceeded, FailedPrecondition, Internal, InvalidArgument, NotFound,
    ResourceExhausted, Unauthenticated, Unavailable,
)
from .graph import Graph, InputSpec
from .info import AttrInfo, OperatorInfo, ServerInfo
from .result import Diagnostics, Result
from .training import Progress, TrainResult

__all__ = [
    "AttrInfo", "Cancelled", "ChainruleRpcError", "Client", "DeadlineExceeded", "Diagnostics", "FailedPrecondition",
    "Graph", "GraphBuilder", "InputSpec", "Internal", "InvalidArgument", "NotFound", "OperatorInfo",
    "Progress", "ResourceExhausted", "Result", "ServerInfo", "TLS", "TrainResult", "Unauthenticated", "Unavailable",
    "Var", "ops",
]


def __getattr__(name: str) -> Any:
    if name == "LocalClient":  # moved: say where, without importing the server from here
        raise ImportError("LocalClient carries the server and its plugins, so it lives in chainrule.server: "
                          "use `from chainrule.server import LocalClient`")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
