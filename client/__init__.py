"""chainrule.client: build graphs in Python, evaluate them on a server or in-process.

    from chainrule.client import Client, GraphBuilder, LocalClient, ops

    g = GraphBuilder()
    x, y, z = g.input("x"), g.input("y"), g.input("z")
    f = ((x + y) * z).named("f")
    with Client("127.0.0.1:50051") as client:       # or LocalClient()
        r = client.evaluate(f, x=1.0, y=3.0, z=-3.0)
    r.value, r.grad[x], r.grad["f"]
"""
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
from .local import LocalClient
from .result import Diagnostics, Result
from .training import Progress, TrainResult

__all__ = [
    "AttrInfo", "Cancelled", "ChainruleRpcError", "Client", "DeadlineExceeded", "Diagnostics", "FailedPrecondition",
    "Graph", "GraphBuilder", "InputSpec", "Internal", "InvalidArgument", "LocalClient", "NotFound", "OperatorInfo",
    "Progress", "ResourceExhausted", "Result", "ServerInfo", "TLS", "TrainResult", "Unauthenticated", "Unavailable",
    "Var", "ops",
]
