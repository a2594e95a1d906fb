"""Hostile requests for fuzzing: hypothesis strategies and the checks every answer must pass.

Shared by tests/test_fuzz.py (a few hundred examples in ``make test``) and
tests/fuzz_campaign.py (``make fuzz``, a longer bounded run). Requests go out
as bytes through a generic unary call with identity serializers, so even
bytes that are not a protobuf message at all can be sent.

Families: random structure (dangling and self references, unknown operators,
wrong attribute types and values, bad dtypes, byte lengths that do not match
shapes, negative and huge dimensions, empty graphs, unknown graph ids);
plausible graphs whose references resolve, so checks further in (attributes,
shape inference, limits, the forward and backward passes) are reached;
cycles; deep chains (some past the node limit); broadcasts to terabytes; and
random bytes as the message.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import grpc
import numpy as np
from hypothesis import strategies as st

from chainrule.v1 import chainrule_pb2 as pb

EVALUATE = "/chainrule.v1.Chainrule/Evaluate"
REGISTER = "/chainrule.v1.Chainrule/RegisterGraph"

#: Codes a hostile request may get: the client's fault, or a limit; never the server's.
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
           grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION}
#: Text that would mean a traceback or an internal detail leaked to the client.
LEAKS = ("Traceback", 'File "', "Exception calling application", "Exception deserializing")

KNOWN_OPS = ["abs", "add", "broadcast_to", "clip", "concat", "const", "cos", "cross_entropy", "div", "exp",
             "expand_dims", "leaky_relu", "log", "log_softmax", "logsumexp", "matmul", "max", "maximum", "mean",
             "minimum", "mse", "mul", "neg", "pow", "relu", "reshape", "sigmoid", "sin", "slice", "softmax",
             "softplus", "sqrt", "squeeze", "stack", "stop_gradient", "sub", "sum", "tanh", "transpose", "where"]
ATTR_NAMES = ["alpha", "axes", "axis", "ends", "keepdims", "max", "min", "shape", "starts", "steps", "value"]
ITEMSIZE = {0: 8, 1: 8, 2: 4, 3: 8, 4: 4, 5: 1}
HUGE = [2**20, 2**31, 2**40, 2**62, 2**63 - 1, -(2**63), -7]

names = st.sampled_from(["x", "y", "a", "b", "c"]) | st.text(max_size=6)
ops = st.sampled_from(KNOWN_OPS) | st.sampled_from(["nope", "acme.swish", "", "ADD", "__import__", "os.system"]) \
    | st.text(max_size=8)
dims = st.integers(0, 3) | st.just(-1) | st.sampled_from(HUGE)
shapes = st.lists(dims, max_size=4) | st.lists(st.just(1), min_size=33, max_size=70)
ints = st.integers(-3, 4) | st.sampled_from(HUGE)
floats = st.floats(allow_nan=True, allow_infinity=True)
#: Known dtype codes and codes outside the enum (17 would be numpy's `object` in other schemes).
dtypes = st.sampled_from([0, 1, 2, 3, 4, 5]) | st.sampled_from([6, 17, 99, -1, 2**31 - 1])


def element_count(shape: list[int]) -> int | None:
    """Elements of a shape, or None when it is negative or too large to fill in a test."""
    if any(n < 0 for n in shape) or len(shape) > 32:
        return None
    count = math.prod(shape)
    return count if count <= 64 else None


@st.composite
def tensors(draw: st.DrawFn, shape: st.SearchStrategy = shapes, dtype: st.SearchStrategy = dtypes,
            fitting: bool = False) -> pb.Tensor:
    """Tensors whose payload matches the shape, or (unless ``fitting``) does not, or is missing."""
    tensor = pb.Tensor(dtype=draw(dtype), shape=draw(shape))
    count = element_count(list(tensor.shape))
    payload = draw(st.sampled_from(["exact", "values"] if fitting else ["exact", "exact", "values", "bytes", "none"]))
    if payload == "exact" and count is not None:
        size = count * ITEMSIZE.get(tensor.dtype, 8)
        tensor.data = draw(st.binary(min_size=size, max_size=size))
    elif payload == "values" or (payload == "exact" and count is None):
        n = count if count is not None and (fitting or draw(st.booleans())) else draw(st.integers(0, 8))
        tensor.values.values.extend(draw(st.lists(floats, min_size=n, max_size=n)))
    elif payload == "bytes":
        tensor.data = draw(st.binary(max_size=40))
    return tensor


attr_values = st.one_of(
    floats.map(lambda v: pb.AttrValue(f=v)),
    ints.map(lambda v: pb.AttrValue(i=v)),
    st.text(max_size=8).map(lambda v: pb.AttrValue(s=v)),
    st.booleans().map(lambda v: pb.AttrValue(b=v)),
    st.lists(floats, max_size=4).map(lambda v: pb.AttrValue(floats=pb.Floats(values=v))),
    st.lists(ints, max_size=5).map(lambda v: pb.AttrValue(ints=pb.Ints(values=v))),
    tensors().map(lambda t: pb.AttrValue(tensor=t)),
    st.just(pb.AttrValue()),  # no value set
)
attrs = st.dictionaries(st.sampled_from(ATTR_NAMES) | st.text(max_size=5), attr_values, max_size=3)


def _node(name: str, op: str, inputs: list[str], attributes: dict[str, pb.AttrValue]) -> pb.Node:
    node = pb.Node(name=name, op=op, inputs=inputs)
    for key, value in attributes.items():
        node.attrs[key].CopyFrom(value)
    return node


@st.composite
def selections(draw: st.DrawFn) -> pb.Selection:
    return pb.Selection(mode=draw(st.sampled_from([0, 1, 2, 7])), names=draw(st.lists(names, max_size=3)))


@st.composite
def random_requests(draw: st.DrawFn) -> pb.EvaluateRequest:
    """Anything goes: names, references, operators, attributes, dtypes and shapes at random."""
    request = pb.EvaluateRequest()
    if draw(st.integers(0, 9)) == 0:
        request.graph_id = draw(st.text(max_size=70))
    else:
        graph = request.graph
        for _ in range(draw(st.integers(0, 3))):
            graph.inputs.add(name=draw(names), dtype=draw(dtypes), shape=draw(shapes))
        for _ in range(draw(st.integers(0, 6))):
            graph.nodes.append(_node(draw(names), draw(ops), draw(st.lists(names, max_size=4)), draw(attrs)))
        graph.outputs.extend(draw(st.lists(names, max_size=2)))
        if draw(st.integers(0, 5)) == 0:
            graph.metadata["requires"] = draw(st.text(max_size=20))
    for name in draw(st.lists(names, max_size=3)):
        request.inputs[name].CopyFrom(draw(tensors()))
    _options(draw, request)
    return request


def _options(draw: st.DrawFn, request: pb.EvaluateRequest) -> None:
    request.output = draw(st.sampled_from(["", "n0", "n1", "x"]) | names)
    if draw(st.integers(0, 4)) == 0:
        request.seed.CopyFrom(draw(tensors()))
    if draw(st.booleans()):
        request.return_values.CopyFrom(draw(selections()))
    if draw(st.booleans()):
        request.return_grads.CopyFrom(draw(selections()))
    request.unreached = draw(st.sampled_from([0, 1, 5]))
    request.contributions = draw(st.booleans())


small_shapes = st.lists(st.integers(1, 3), max_size=3)


def _body(inputs: list[tuple[str, list[int]]], nodes: list[tuple[str, str, list[str]]], outputs: list[str]) -> pb.Graph:
    graph = pb.Graph(outputs=outputs)
    for name, shape in inputs:
        graph.inputs.add(name=name, dtype=pb.FLOAT64, shape=shape)
    for name, op, reads in nodes:
        graph.nodes.add(name=name, op=op, inputs=reads)
    return graph


#: Bodies for graph attributes (scan's): one that works as a one-carry step, and broken ones.
_BODIES = [
    _body([("h", [2]), ("x", [2])], [("s", "add", ["h", "x"]), ("t", "tanh", ["s"])], ["t", "s"]),
    _body([("h", [])], [("t", "tanh", ["h"])], ["t"]),
    _body([("h", [2])], [("t", "nosuchop", ["h"])], ["t"]),
    _body([("h", [2])], [("a", "tanh", ["b"]), ("b", "tanh", ["a"])], ["a"]),
    _body([], [], []),
]
small_ints = st.integers(-3, 3) | st.sampled_from(HUGE)
#: An attribute value of each schema kind (mostly well-typed; hostile in range).
values_of_kind = {
    "float": floats.map(lambda v: pb.AttrValue(f=v)),
    "int": small_ints.map(lambda v: pb.AttrValue(i=v)),
    "bool": st.booleans().map(lambda v: pb.AttrValue(b=v)),
    "string": st.text(max_size=6).map(lambda v: pb.AttrValue(s=v)),
    "ints": st.lists(small_ints, max_size=3).map(lambda v: pb.AttrValue(ints=pb.Ints(values=v))),
    "floats": st.lists(floats, max_size=3).map(lambda v: pb.AttrValue(floats=pb.Floats(values=v))),
    "tensor": tensors(shape=small_shapes, dtype=st.sampled_from([1, 1, 2, 3]), fitting=True).map(
        lambda t: pb.AttrValue(tensor=t)),
    "graph": st.sampled_from(_BODIES).map(lambda g: pb.AttrValue(graph=g)),
}


def _schemas() -> dict[str, tuple[int, bool, dict[str, tuple[str, bool]]]]:
    """Arity, variadic and attribute kinds of every built-in operator, from the plugins themselves."""
    from chainrule.plugins.manager import load_plugins

    return {op.name: (op.arity, op.variadic, {n: (a.kind, a.required) for n, a in op.attrs.items()})
            for op in load_plugins(entry_points=False, only=["builtin"]).registry}


SCHEMAS = _schemas()


@st.composite
def plausible_requests(draw: st.DrawFn) -> pb.EvaluateRequest:
    """Graphs whose references resolve and whose operators get their arity and (mostly) well-typed
    attributes, fed matching small tensors (NaN and inf included): these reach shape inference,
    the limits and the forward and backward passes, where hostile attribute values meet the rules."""
    request = pb.EvaluateRequest()
    graph = request.graph
    known = []
    for name in ("x", "y")[: draw(st.integers(1, 2))]:
        shape = draw(small_shapes)
        dtype = draw(st.sampled_from([1, 1, 1, 1, 2, 3, 5]))
        graph.inputs.add(name=name, dtype=dtype, shape=shape)
        request.inputs[name].CopyFrom(draw(tensors(shape=st.just(shape), dtype=st.just(dtype), fitting=True)))
        known.append(name)
    for i in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(sorted(SCHEMAS)))
        arity, variadic, schema = SCHEMAS[op]
        count = draw(st.integers(1, 3)) if variadic else arity
        node = _node(f"n{i}", op, draw(st.lists(st.sampled_from(known), min_size=count, max_size=count)), {})
        for attr, (kind, required) in schema.items():
            if required or draw(st.booleans()):
                wrong = draw(st.integers(0, 9)) == 0
                node.attrs[attr].CopyFrom(draw(attr_values if wrong else values_of_kind[kind]))
        graph.nodes.append(node)
        known.append(f"n{i}")
    if draw(st.booleans()):  # a scalar output needs no seed
        graph.nodes.append(_node("total", "sum", [known[-1]], {}))
        known.append("total")
    graph.outputs.append(known[-1])
    if draw(st.integers(0, 4)) == 0:
        _options(draw, request)
    return request


@st.composite
def cycles(draw: st.DrawFn) -> pb.EvaluateRequest:
    """A chain whose first node reads a later one (or itself)."""
    n = draw(st.integers(1, 6))
    back = draw(st.integers(0, n - 1))
    graph = pb.Graph(outputs=[f"n{n - 1}"])
    graph.inputs.add(name="x")
    for i in range(n):
        source = f"n{back}" if i == 0 else f"n{i - 1}"
        graph.nodes.append(_node(f"n{i}", draw(st.sampled_from(["add", "mul"])), [source, "x"], {}))
    return pb.EvaluateRequest(graph=graph, inputs={"x": pb.Tensor(values=pb.DoubleList(values=[1.0]))})


@st.composite
def deep_chains(draw: st.DrawFn, max_nodes: int) -> pb.EvaluateRequest:
    """Long chains of unary operators, some past the node limit, some with one broken link."""
    n = draw(st.integers(1, max_nodes + 200))
    graph = pb.Graph(outputs=[f"n{n - 1}"])
    graph.inputs.add(name="x")
    op = draw(st.sampled_from(["neg", "tanh", "sin", "relu"]))
    broken = draw(st.none() | st.integers(0, n - 1))
    for i in range(n):
        source = "x" if i == 0 else f"n{i - 1}"
        graph.nodes.add(name=f"n{i}", op=op, inputs=["missing" if i == broken else source])
    return pb.EvaluateRequest(graph=graph, inputs={"x": pb.Tensor(values=pb.DoubleList(values=[0.5]))})


@st.composite
def terabytes(draw: st.DrawFn) -> pb.EvaluateRequest:
    """A few hundred bytes asking for terabytes: broadcasts, outer products, literals, reshapes."""
    big = draw(st.sampled_from([10**6, 2**20, 10**7]))
    kind = draw(st.sampled_from(["broadcast", "outer", "const", "expand"]))
    graph = pb.Graph(outputs=["y"])
    graph.inputs.add(name="x", shape=[1])
    if kind == "broadcast":
        graph.nodes.append(_node("y", "broadcast_to", ["x"], {"shape": pb.AttrValue(ints=pb.Ints(values=[big, big]))}))
    elif kind == "outer":
        graph.nodes.append(_node("col", "broadcast_to", ["x"], {"shape": pb.AttrValue(ints=pb.Ints(values=[big, 1]))}))
        graph.nodes.append(_node("row", "broadcast_to", ["x"], {"shape": pb.AttrValue(ints=pb.Ints(values=[1, big]))}))
        graph.nodes.append(_node("y", "mul", ["col", "row"], {}))
    elif kind == "const":
        graph.nodes.append(_node("y", "const", [], {"value": pb.AttrValue(tensor=pb.Tensor(shape=[big, big]))}))
    else:
        graph.nodes.append(_node("b", "broadcast_to", ["x"], {"shape": pb.AttrValue(ints=pb.Ints(values=[big]))}))
        graph.nodes.append(_node("e", "expand_dims", ["b"], {"axis": pb.AttrValue(ints=pb.Ints(values=[1]))}))
        graph.nodes.append(_node("y", "matmul", ["e", "e"], {}))  # [big,1] @ [big,1]: a bad shape, or an outer product
    return pb.EvaluateRequest(graph=graph, inputs={"x": pb.Tensor(shape=[1], values=pb.DoubleList(values=[1.0]))})


def hostile_messages(max_nodes: int) -> st.SearchStrategy[bytes]:
    """Every family above, as serialized bytes, plus random bytes."""
    messages = st.one_of(random_requests(), plausible_requests(), plausible_requests(), cycles(),
                         deep_chains(max_nodes), terabytes())
    return messages.map(lambda m: m.SerializeToString()) | st.binary(max_size=300)


def valid_request() -> pb.EvaluateRequest:
    """p = x + y, g = p * z at x=1, y=3, z=-3: g = -12, dg/dx = -3."""
    graph = pb.Graph(outputs=["g"])
    for name in "xyz":
        graph.inputs.add(name=name)
    graph.nodes.add(name="p", op="add", inputs=["x", "y"])
    graph.nodes.add(name="g", op="mul", inputs=["p", "z"])
    inputs = {k: pb.Tensor(values=pb.DoubleList(values=[v])) for k, v in (("x", 1.0), ("y", 3.0), ("z", -3.0))}
    return pb.EvaluateRequest(graph=graph, inputs=inputs)


def check_valid_answer(response: pb.EvaluateResponse) -> None:
    value = np.frombuffer(response.output_value.data, "<f8")
    grad = np.frombuffer(response.gradients["x"].data, "<f8")
    if value.tolist() != [-12.0] or grad.tolist() != [-3.0]:
        raise AssertionError(f"the valid request got a wrong answer: {value}, {grad}")


@dataclass
class Tally:
    """What a run of hostile requests got back."""

    sent: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def record(self, code: grpc.StatusCode, problem: str | None) -> None:
        self.sent += 1
        self.codes[code.name] = self.codes.get(code.name, 0) + 1
        if problem:
            self.failures.append(problem)


def send(call: grpc.UnaryUnaryMultiCallable, data: bytes, timeout: float) -> tuple[grpc.StatusCode, str | None]:
    """Send raw bytes; the code, and what is wrong with the answer (None when acceptable)."""
    try:
        call(data, timeout=timeout)
        return grpc.StatusCode.OK, None
    except grpc.RpcError as error:
        code, details = error.code(), error.details() or ""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return code, f"hang: no answer within {timeout}s to {data[:80]!r}"
    if code not in ALLOWED:
        return code, f"{code.name}: {details[:300]} for {data[:80]!r}"
    if any(leak in details for leak in LEAKS):
        return code, f"leak in {code.name}: {details[:300]}"
    return code, None


def raw_call(channel: grpc.Channel, method: str = EVALUATE) -> grpc.UnaryUnaryMultiCallable:
    """A call that sends and receives bytes as they are (identity serializers)."""
    return channel.unary_unary(method, request_serializer=None, response_deserializer=None)
