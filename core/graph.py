"""The graph IR the core works on: declared inputs, nodes and outputs.

Plain frozen dataclasses, built by the server from protobuf or by Python
callers directly. Attribute values are Python values (float, int, bool, str,
lists), numpy arrays (``tensor`` attributes, e.g. ``const``'s value) or
GraphIRs (``graph`` attributes, e.g. ``scan``'s body).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence


@dataclass(frozen=True)
class InputDecl:
    """A graph input: its name, dtype name and shape (-1 for any size on that axis)."""

    name: str
    dtype: str = "float64"
    shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class Node:
    """One operator application: ``name = op(*inputs, **attrs)``.

    ``outputs`` names the values of an operator with several results
    (``scan``'s final carries and stacked outputs), in the operator's order; the
    node's own name then names no value. Left empty, the node's one value is
    called by the node's name.
    """

    name: str
    op: str
    inputs: tuple[str, ...] = ()
    attrs: Mapping[str, Any] = field(default_factory=dict)
    outputs: tuple[str, ...] = ()

    @property
    def value_names(self) -> tuple[str, ...]:
        """The names of the values this node produces."""
        return self.outputs or (self.name,)


@dataclass(frozen=True)
class GraphIR:
    """A computation: inputs, nodes (in any order) and named outputs.

    The core's own form of a graph; the client's ``Graph`` wraps the protobuf message.
    """

    inputs: tuple[InputDecl, ...]
    nodes: tuple[Node, ...]
    outputs: tuple[str, ...]
    metadata: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        inputs: Sequence[InputDecl | tuple],
        nodes: Sequence[Node | tuple],
        outputs: Sequence[str] | str,
        metadata: Mapping[str, str] | None = None,
    ) -> "GraphIR":
        """Convenience constructor accepting tuples: ``("x", "float64", ())`` and
        ``("p", "add", ("x", "y"), {attrs})``."""
        decls = tuple(d if isinstance(d, InputDecl) else InputDecl(d[0], *d[1:]) for d in inputs)
        built = tuple(
            n if isinstance(n, Node) else Node(n[0], n[1], tuple(n[2]) if len(n) > 2 else (), dict(n[3]) if len(n) > 3 else {})
            for n in nodes
        )
        outs = (outputs,) if isinstance(outputs, str) else tuple(outputs)
        return cls(decls, built, outs, dict(metadata or {}))


class CompiledGraph:
    """Base of a graph already compiled against a registry (``chainrule.core.compile.Plan``):
    what a ``graph`` attribute holds once its node is compiled, and may be given as directly
    (a gradient checker's sample), since a GraphIR needs a registry to become one."""

    __slots__ = ()
