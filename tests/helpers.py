"""Small helpers shared by the tests."""
from __future__ import annotations

from chainrule.core import GraphIR, InputDecl, Node
from chainrule.server import ServerConfig, create_server


def scalar_graph(inputs, nodes, output, dtype="float64"):
    """A graph of scalar inputs: ``scalar_graph(["x", "y"], [("p", "add", ("x", "y"))], "p")``."""
    return GraphIR(
        tuple(InputDecl(name, dtype, ()) for name in inputs),
        tuple(Node(n[0], n[1], tuple(n[2]), dict(n[3]) if len(n) > 3 else {}) for n in nodes),
        (output,),
    )


def start_server(config: ServerConfig | None = None):
    """A started real server on a free loopback port, and its address; stop it with ``server.stop(None)``."""
    server, port = create_server("127.0.0.1:0", config)
    server.start()
    return server, f"127.0.0.1:{port}"
