"""Small helpers shared by the tests."""
from __future__ import annotations

from chainrule.core import Graph, InputDecl, Node


def scalar_graph(inputs, nodes, output, dtype="float64"):
    """A graph of scalar inputs: ``scalar_graph(["x", "y"], [("p", "add", ("x", "y"))], "p")``."""
    return Graph(
        tuple(InputDecl(name, dtype, ()) for name in inputs),
        tuple(Node(n[0], n[1], tuple(n[2]), dict(n[3]) if len(n) > 3 else {}) for n in nodes),
        (output,),
    )
