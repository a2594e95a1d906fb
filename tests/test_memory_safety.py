"""Limits hold before allocation, and compute time is capped on the server's side.

The server runs as a subprocess with its default limits, so its resident
memory can be read from /proc: requests of a few hundred bytes that would
need terabytes are refused with RESOURCE_EXHAUSTED within a one-second
deadline, and the process does not grow. A slow graph sent without any client
deadline still stops at the server's ``--max-compute-seconds``.
"""
from __future__ import annotations

import grpc
import pytest

from chainrule.client import Client, DeadlineExceeded, GraphBuilder, ResourceExhausted, ops
from chainrule.v1 import chainrule_pb2 as pb

from serving import ServerProcess, rss_kib, slow_graph

TB = 10**12


def terabyte_requests() -> dict[str, pb.EvaluateRequest]:
    """Small requests whose values would take terabytes."""
    def request(graph: pb.Graph) -> pb.EvaluateRequest:
        return pb.EvaluateRequest(graph=graph, inputs={"x": pb.Tensor(shape=[1], values=pb.DoubleList(values=[1.0]))})

    def graph(*nodes: tuple[str, str, list[str], dict[str, pb.AttrValue]]) -> pb.Graph:
        g = pb.Graph(outputs=[nodes[-1][0]])
        g.inputs.add(name="x", shape=[1])
        for name, op, inputs, attrs in nodes:
            node = g.nodes.add(name=name, op=op, inputs=inputs)
            for key, value in attrs.items():
                node.attrs[key].CopyFrom(value)
        return g

    def shape(*dims: int) -> dict[str, pb.AttrValue]:
        return {"shape": pb.AttrValue(ints=pb.Ints(values=dims))}

    million = 10**6
    return {
        "broadcast": request(graph(("y", "broadcast_to", ["x"], shape(million, million)))),
        "outer product": request(graph(("c", "broadcast_to", ["x"], shape(million, 1)),
                                       ("r", "broadcast_to", ["x"], shape(1, million)),
                                       ("y", "mul", ["c", "r"], {}))),
        "literal": request(graph(("y", "const", [], {"value": pb.AttrValue(tensor=pb.Tensor(shape=[million, million]))}))),
        # 100 values of 800 MB each: every one under the per-tensor limit, together past the memory budget
        "many medium": request(graph(*[(f"b{i}", "broadcast_to", ["x"], shape(10**4, 10**4)) for i in range(99)],
                                     ("y", "broadcast_to", ["x"], shape(10**4, 10**4)))),
    }


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--log-level", "WARNING") as process:
        yield process


@pytest.mark.parametrize("kind", list(terabyte_requests()))
def test_a_small_request_asking_for_terabytes_is_refused_before_allocation(server, kind):
    request = terabyte_requests()[kind]
    if kind != "many medium":
        assert request.ByteSize() < 1024
    with grpc.insecure_channel(server.address) as channel:
        evaluate = channel.unary_unary("/chainrule.v1.Chainrule/Evaluate",
                                       request_serializer=pb.EvaluateRequest.SerializeToString,
                                       response_deserializer=pb.EvaluateResponse.FromString)
        evaluate(_valid(), timeout=10)  # warm up: caches and threads exist before the baseline
        before = rss_kib(server.pid)
        for _ in range(20):
            with pytest.raises(grpc.RpcError) as info:
                evaluate(request, timeout=1.0)  # answered well under a second, or DEADLINE_EXCEEDED fails the test
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
        grown = rss_kib(server.pid) - before
    assert grown < 4 * 1024, f"server grew by {grown} KiB"
    expected = "memory budget per request" if kind == "many medium" else "limit per tensor"
    assert expected in info.value.details()


def _valid() -> pb.EvaluateRequest:
    graph = pb.Graph(outputs=["y"])
    graph.inputs.add(name="x", shape=[1])
    graph.nodes.add(name="y", op="sum", inputs=["x"])
    return pb.EvaluateRequest(graph=graph, inputs={"x": pb.Tensor(shape=[1], values=pb.DoubleList(values=[1.0]))})


def test_the_refusal_names_the_limit_and_the_node(server):
    g = GraphBuilder()
    y = ops.broadcast_to(g.input("x"), [10**6, 10**6]).named("huge")
    with Client(server.address) as client:
        with pytest.raises(ResourceExhausted) as info:
            client.evaluate(ops.sum(y), x=1.0, timeout=1.0)
    assert info.value.node == "huge" and info.value.metadata["limit"] == "max_tensor_elements"
    assert int(info.value.metadata["requested"]) == TB


def test_compute_time_is_capped_without_a_client_deadline():
    graph = slow_graph(steps=5000, size=10**6)  # about 15 s of work uncapped
    with ServerProcess("--max-compute-seconds", "0.3", "--log-level", "WARNING") as server:
        with Client(server.address) as client:  # no timeout: only the server's cap can stop this call
            with pytest.raises(DeadlineExceeded) as info:
                client.evaluate(graph, x=1.0, values="none", grads="none")
            assert info.value.reason == "DEADLINE_EXCEEDED"  # the server's answer, with details: not the client's deadline
            assert client.evaluate(ops.sum(GraphBuilder().input("x")), x=2.0).value == 2.0  # and it serves on


def test_matmuls_gradient_of_a_broadcast_input_needs_no_broadcast_sized_temporary():
    """Issue 14's 167-byte graph: matmul of two broadcast views. The vjp of the input that was broadcast
    sums over the broadcast axes inside the product (einsum through BLAS), so the (N, N, N) temporary
    it once built never exists: at N = 200 that was 64 MB; traced numpy allocations now stay small."""
    import tracemalloc

    import numpy as np

    from chainrule.core import GraphIR, compile_graph, evaluate
    from chainrule.plugins.manager import load_registry

    n = 200
    graph = GraphIR.build(
        [("x", "float64", (1,))],
        [("a", "broadcast_to", ("x",), {"shape": [n, 1, n]}), ("b", "broadcast_to", ("x",), {"shape": [1, n, n]}),
         ("m", "matmul", ("a", "b")), ("s", "sum", ("m",))], "s")
    plan = compile_graph(graph, load_registry(entry_points=False))
    tracemalloc.start()
    try:
        result = evaluate(plan, {"x": np.array([0.5])})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert float(result.grad("x")[0]) == 2 * 0.5 * n ** 3  # d/dx sum(x x) over n^3 terms
    assert peak < 8 * n ** 3 / 8, f"peak {peak} bytes: a broadcast-sized temporary came back"
