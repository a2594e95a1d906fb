"""Graph: a ``chainrule.v1.Graph`` message plus what a client needs to know about it.

The proto JSON mapping is the graph file format, so ``to_json``/``from_json``
are thin wrappers around ``google.protobuf.json_format``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from chainrule.wire.convert import DTYPE_NAMES
from chainrule.v1 import chainrule_pb2 as pb


class InputSpec(NamedTuple):
    """A declared graph input: dtype name and shape (-1 = any size)."""

    dtype: str
    shape: tuple[int, ...]


class Graph:
    """A computation ready to send: the message, its inputs and its outputs.

    Treat the message as frozen once the graph was registered with a client:
    clients remember the id per Graph object.
    """

    def __init__(self, message: pb.Graph, builder: Any = None) -> None:
        self.message = message
        #: The GraphBuilder this graph came from (None for a loaded or hand-made one): results of
        #: it refuse Vars of other builders, whose names could match other nodes here.
        self.builder = builder
        self._inputs: dict[str, InputSpec] | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Pickled and deep-copied without its builder (which holds a lock): the copy is a plain graph."""
        return {**self.__dict__, "builder": None}

    @property
    def outputs(self) -> list[str]:
        """The names of the graph's outputs, in order."""
        return list(self.message.outputs)

    @property
    def inputs(self) -> dict[str, InputSpec]:
        """Declared inputs by name, in declaration order."""
        if self._inputs is None:
            self._inputs = {
                d.name: InputSpec(DTYPE_NAMES.get(d.dtype, "float64"), tuple(d.shape)) for d in self.message.inputs
            }
        return self._inputs

    @property
    def node_names(self) -> list[str]:
        return [n.name for n in self.message.nodes]

    def __len__(self) -> int:
        """The number of operator nodes (declared inputs not counted)."""
        return len(self.message.nodes)

    def __repr__(self) -> str:
        return f"<Graph: {len(self.message.inputs)} inputs, {len(self)} nodes, outputs {self.outputs}>"

    # --- the graph file format ---------------------------------------------------

    def to_json(self, *, indent: int | None = 2) -> str:
        """The graph in the proto JSON mapping (the ``graph.json`` file format)."""
        from google.protobuf import json_format  # here, not at the top: 2 ms of `import chainrule.client`

        return json_format.MessageToJson(self.message, indent=indent)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Graph":
        """Parse a graph file; unknown fields are an error (no silent typos)."""
        from google.protobuf import json_format  # here, not at the top: 2 ms of `import chainrule.client`

        return cls(json_format.Parse(text, pb.Graph()))

    def save(self, path: str | Path) -> None:
        """Write the graph file (UTF-8 proto JSON) that ``chainrule eval``, ``render`` and ``train`` take."""
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "Graph":
        """Read a graph file (``save``'s, or any proto JSON of chainrule.v1.Graph). The message equals
        the saved graph's, so the server gives it the same graph_id."""
        return cls.from_json(Path(path).read_text(encoding="utf-8"))


class DerivedGraph(Graph):
    """A derivative as a graph, from ``client.derive``: a Graph like any other (evaluate, register,
    render, derive it again) that also says which of its names are what.

    Reverse mode: ``gradients`` maps each wrt name to the output holding its gradient, and
    ``seed_input`` names the seed input ("" when the seed is 1). Forward mode: ``tangents`` maps each
    wrt name to the input taking its tangent, and ``tangent_output`` names the output's tangent.
    ``output`` is the differentiated value, ``graph_id`` the id the server registered it under.
    """

    def __init__(self, message: pb.Graph, *, output: str = "", graph_id: str = "", gradients: dict | None = None,
                 seed_input: str = "", tangents: dict | None = None, tangent_output: str = "") -> None:
        super().__init__(message)
        self.output = output
        self.graph_id = graph_id
        self.gradients: dict[str, str] = dict(gradients or {})
        self.seed_input = seed_input
        self.tangents: dict[str, str] = dict(tangents or {})
        self.tangent_output = tangent_output

    @classmethod
    def from_proto(cls, response: pb.DeriveResponse) -> "DerivedGraph":
        return cls(response.graph, output=response.output, graph_id=response.graph_id,
                   gradients=dict(response.gradients), seed_input=response.seed_input,
                   tangents=dict(response.tangents), tangent_output=response.tangent_output)

    def __repr__(self) -> str:
        what = (f"gradients {self.gradients}" if self.gradients else f"tangent {self.tangent_output!r} of "
                f"{self.output!r} along {self.tangents}")
        return f"<DerivedGraph of {self.output!r}: {len(self.message.inputs)} inputs, {len(self)} nodes, {what}>"
