"""Result: an evaluation's output value, gradients and values as numpy arrays.

From a response message, tensors are decoded lazily, on first access, and
without a copy: the arrays are read-only views of the response's bytes
(``np.array(a)`` for a writable copy). From an in-process evaluation
(``Result.of_arrays``), they are the engine's own arrays, wrapped read-only
on first access too.
Mappings accept a builder Var or a name as key.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping

import numpy as np

from chainrule.wire.convert import DTYPE_NAMES, array_to_tensor, plain_array, tensor_to_array
from chainrule.wire.incoming import Incoming
from chainrule.v1 import chainrule_pb2 as pb

if TYPE_CHECKING:
    from .graph import Graph


def name_of(key: Any, owner: Any = None) -> str:
    """The name of a node given by name or as a builder Var. With ``owner`` (the GraphBuilder of
    the graph concerned), a Var of another builder is refused: automatic names such as ``mul_2``
    repeat from builder to builder, so its name would silently pick another node."""
    if isinstance(key, str):
        return key
    name = getattr(key, "name", None)
    if isinstance(name, str):
        builder = getattr(key, "builder", None)
        if owner is not None and builder is not None and builder is not owner:
            raise KeyError(f"the Var '{name}' belongs to another GraphBuilder than this graph's; "
                           "use a Var of this graph, or a name")
        return name
    raise TypeError(f"expected a node name or a Var, got {type(key).__name__}")


class Arrays(Mapping[str, np.ndarray]):
    """Tensors by node name, decoded on first access. Keys: names or Vars."""

    def __init__(self, tensors: Mapping[str, Any], what: str, no_gradient: frozenset[str] = frozenset(),
                 owner: Any = None) -> None:
        self._tensors = tensors
        self._what = what
        self._no_gradient = no_gradient
        self._owner = owner  # the GraphBuilder of the evaluated graph, when it came from one
        self._decoded: dict[str, np.ndarray] = {}

    def __getitem__(self, key: Any) -> np.ndarray:
        name = key if type(key) is str else name_of(key, self._owner)
        array = self._decoded.get(name)
        if array is None:
            tensor = self._tensors.get(name)
            if tensor is None:
                raise KeyError(self._missing(name))
            array = self._decoded[name] = _as_array(tensor, self._what, name)
        return array

    def _missing(self, name: str) -> str:
        if name in self._no_gradient:
            return (f"node '{name}' has no gradient: it is a constant, or integer- or bool-typed "
                    "(literals, labels, indices and masks are not differentiable)")
        return (f"no {self._what[:-1]} for '{name}' in this result: no such node or input, "
                f"or it was not selected (or omitted as unreached)")

    def __contains__(self, key: object) -> bool:
        try:
            return name_of(key, self._owner) in self._tensors
        except (TypeError, KeyError):  # not a name, or a Var of another graph: not in this result
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        specs = ", ".join(f"{n}: {_dtype_name(t)}{list(np.shape(t))}" for n, t in self._tensors.items())
        return f"<{self._what} {{{specs}}}>"


def _as_array(tensor: Any, field: str, key: str = "") -> np.ndarray:
    """A tensor of a response (Tensor message or RawTensor) or of an in-process evaluation (an
    array or numpy scalar the caller may not change: read-only). ``field`` (with ``key``, a map's)
    names it in an error."""
    array = plain_array(tensor)  # the common small Tensor message, the short way
    if array is not None:
        return array
    if key:
        field = f"{field}.{key}"
    if isinstance(tensor, (np.generic, float)):
        array = np.asarray(tensor)  # a new 0-d array, ours alone: frozen as it is
        array.setflags(write=False)
        return array
    if isinstance(tensor, np.ndarray):
        array = np.asarray(tensor)
        if array.flags.writeable:
            array = array.view()  # a view of our own to freeze; the engine's array stays as it was
            array.setflags(write=False)
        return array
    return tensor_to_array(tensor, field=field)


def _dtype_name(tensor: Any) -> str:
    if isinstance(tensor, float):
        return "float64"
    if isinstance(tensor, (np.ndarray, np.generic)):
        return tensor.dtype.name
    return DTYPE_NAMES.get(tensor.dtype, "?")


@dataclass(frozen=True)
class NonFinite:
    """A node whose value or gradient holds NaNs or infinities."""

    node: str
    op: str
    count: int
    inputs_summary: str = ""  # what the operator was given
    consumers_summary: str = ""  # for a gradient: the consumers that sent it back

    def __str__(self) -> str:
        where = f"'{self.node}' ({self.op})" if self.op else f"input '{self.node}'"
        text = f"{where}: {self.count} non-finite element(s)"
        if self.inputs_summary:
            text += f"\n    its inputs: {self.inputs_summary}"
        if self.consumers_summary:
            text += f"\n    sent back by: {self.consumers_summary}"
        return text


@dataclass(frozen=True)
class GradNorm:
    node: str
    grad_norm: float
    value_norm: float


@dataclass(frozen=True)
class Flag:
    kind: str  # VANISHING, EXPLODING, SATURATED; new kinds may appear
    node: str
    message: str


@dataclass(frozen=True)
class Diagnostics:
    """Numerical health of an evaluation; ``str()`` gives a readable report."""

    first_nonfinite_value: NonFinite | None
    first_nonfinite_gradient: NonFinite | None
    grad_norms: dict[str, GradNorm]
    flags: list[Flag]

    @classmethod
    def from_proto(cls, message: pb.Diagnostics) -> "Diagnostics":
        def nonfinite(field: str) -> NonFinite | None:
            if not message.HasField(field):
                return None
            d = getattr(message, field)
            return NonFinite(d.node, d.op, d.count, d.inputs_summary, d.consumers_summary)

        return cls(
            nonfinite("first_nonfinite_value"), nonfinite("first_nonfinite_gradient"),
            {n.node: GradNorm(n.node, n.grad_norm, n.value_norm) for n in message.grad_norms},
            [Flag(f.kind, f.node, f.message) for f in message.flags],
        )

    @property
    def finite(self) -> bool:
        """True when every value and gradient was finite."""
        return self.first_nonfinite_value is None and self.first_nonfinite_gradient is None

    def __str__(self) -> str:
        lines = []
        if self.finite:
            lines.append("all values and gradients are finite")
        if self.first_nonfinite_value is not None:
            lines.append(f"first non-finite value: {self.first_nonfinite_value}")
        if self.first_nonfinite_gradient is not None:
            lines.append(f"first non-finite gradient: {self.first_nonfinite_gradient}")
        lines.extend(f"{f.kind} at '{f.node}': {f.message}" for f in self.flags)
        if self.grad_norms:
            width = max(len(n) for n in self.grad_norms)
            lines.append("gradient norms:")
            lines.extend(f"  {n.node:<{width}}  |grad| {n.grad_norm:.6g}  |value| {n.value_norm:.6g}"
                         for n in self.grad_norms.values())
        return "\n".join(lines)


@dataclass(frozen=True)
class Contribution:
    """One consumer's share of a fanned-out value's gradient; shares sum to the gradient."""

    node: str
    consumer: str
    input_index: int
    gradient: np.ndarray


class Result:
    """The outcome of one evaluation.

    ``value`` is the differentiated output's value; ``grad[x]`` the gradient
    of that output with respect to ``x`` (a Var or a name); ``values`` every
    selected value; ``diagnostics`` the numerical health report (None when the
    call turned it off: ``diagnosed=False``).
    """

    def __init__(self, response: pb.EvaluateResponse | Incoming, graph: Graph | None = None, *,
                 diagnosed: bool = True) -> None:
        self._incoming: Incoming | None = response if isinstance(response, Incoming) else Incoming(response)
        message = self._incoming.message  # without the large tensors read straight from the received bytes
        self._message: pb.EvaluateResponse | None = message
        self.graph = graph  # the evaluated graph, which to_dot() and render() draw
        self.output: str = message.output
        self.graph_id: str = message.graph_id
        self.no_gradient: tuple[str, ...] = tuple(message.no_gradient[:])  # (a slice is made in C)
        #: The selected values and gradients, wrapped on first access (from the response's maps).
        self._values: Arrays | None = None
        self._grad: Arrays | None = None
        #: An in-process evaluation's arrays (output value, values, gradients), read on first access.
        self._engines: tuple[Any, Mapping[str, Any], Mapping[str, Any]] | None = None
        self._value: np.ndarray | None = None
        self._diagnosed = diagnosed
        self._diagnostics: Diagnostics | None = None
        self._contributions: list[Contribution] | None = None

    @classmethod
    def of_arrays(cls, graph: Graph | None, *, output: str, graph_id: str, value: Any,
                  values: Mapping[str, Any], grads: Mapping[str, Any], no_gradient: Iterable[str] = (),
                  diagnostics: pb.Diagnostics | None = None,
                  contributions: list[Contribution] | None = None) -> "Result":
        """A result of an evaluation in this process: the engine's arrays, no response message.
        ``diagnostics`` None: not diagnosed. They are wrapped (read-only) on first access, as a
        response's tensors are decoded: a call whose result is read in part pays for that part."""
        result = cls.__new__(cls)
        result._incoming = None
        result._message = pb.EvaluateResponse(diagnostics=diagnostics) if diagnostics is not None else None
        result.graph = graph
        result.output = output
        result.graph_id = graph_id
        result.no_gradient = tuple(no_gradient)
        result._engines = (value, values, grads)
        result._values = result._grad = result._value = None
        result._diagnosed = diagnostics is not None
        result._diagnostics = None
        result._contributions = contributions if contributions is not None else []
        return result

    @property
    def response(self) -> pb.EvaluateResponse:
        """The whole EvaluateResponse message (its large tensors copied into it on first access)."""
        if self._incoming is None:  # evaluated in this process: spelt out on request
            self._incoming = Incoming(self._as_message())
        return self._incoming.complete()

    def _as_message(self) -> pb.EvaluateResponse:
        message = pb.EvaluateResponse(output=self.output, graph_id=self.graph_id, no_gradient=self.no_gradient,
                                      output_value=array_to_tensor(self.value))
        for field, arrays in (("values", self.values), ("gradients", self.grad)):
            for name in arrays:
                getattr(message, field)[name].CopyFrom(array_to_tensor(arrays[name]))
        for c in self.contributions:
            message.contributions.add(node=c.node, consumer=c.consumer, input_index=c.input_index,
                                      gradient=array_to_tensor(c.gradient))
        if self._diagnosed:
            message.diagnostics.CopyFrom(self._message.diagnostics)
        return message

    @property
    def values(self) -> Arrays:
        """The selected values by name (a Var or a name as key)."""
        arrays = self._values
        if arrays is None:  # (two threads may both make one: alike, one is kept)
            tensors = self._engines[1] if self._engines is not None else self._incoming.tensor_map("values")
            arrays = self._values = Arrays(tensors, "values", owner=getattr(self.graph, "builder", None))
        return arrays

    @property
    def grad(self) -> Arrays:
        """The gradients of the output by name (a Var or a name as key)."""
        arrays = self._grad
        if arrays is None:
            tensors = self._engines[2] if self._engines is not None else self._incoming.tensor_map("gradients")
            arrays = self._grad = Arrays(tensors, "gradients", frozenset(self.no_gradient),
                                         getattr(self.graph, "builder", None))
        return arrays

    @property
    def grads(self) -> Arrays:
        """Same mapping as :attr:`grad`."""
        return self.grad

    @property
    def value(self) -> np.ndarray:
        value = self._value
        if value is None:
            value = self._value = self._output_value()
        return value

    def _output_value(self) -> np.ndarray:
        if self._engines is not None:
            return _as_array(self._engines[0], "output_value")
        tensor = self._incoming.tensor("output_value")
        return _as_array(self._message.output_value if tensor is None else tensor, "output_value")

    @property
    def diagnostics(self) -> Diagnostics | None:
        if self._diagnostics is None and self._diagnosed:
            self._diagnostics = Diagnostics.from_proto(self._message.diagnostics)
        return self._diagnostics

    @property
    def contributions(self) -> list[Contribution]:
        """Per-edge gradient shares (empty unless the call asked for ``contributions=True``)."""
        if self._contributions is None:
            self._contributions = [
                Contribution(c.node, c.consumer, c.input_index,
                             tensor_to_array(c.gradient, field=f"contributions[{i}].gradient"))
                for i, c in enumerate(self._message.contributions)
            ]
        return self._contributions

    def to_dot(self, *, parameters: Iterable[Any] | None = None) -> str:
        """The circuit diagram as Graphviz DOT text: each node with its value and gradient.

        ``parameters`` (names or Vars) are drawn as parameters and the other graph
        inputs as data; by default every input that got a gradient is a parameter.
        """
        # Imported here, not at the top: render (with chainrule.core.diagnostics, shutil and
        # subprocess) is 5 ms that `import chainrule.client` does not pay. render.py imports this
        # module only under TYPE_CHECKING, so there is no cycle (see [tool.importlinter]).
        from .render import to_dot

        return to_dot(self, parameters=parameters)

    def render(self, path: str | Path, *, parameters: Iterable[Any] | None = None) -> Path:
        """Draw the circuit diagram to ``path`` (.svg, .png, .pdf through Graphviz's ``dot``; .dot as text)."""
        from .render import render  # lazily: see to_dot

        return render(self, path, parameters=parameters)

    def __repr__(self) -> str:
        return (f"<Result output '{self.output}' = {np.array2string(self.value, threshold=6)}; "
                f"{len(self.values)} values, {len(self.grad)} gradients>")
