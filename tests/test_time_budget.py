"""Time is a promise (issue 14): a call whose least possible work cannot fit its deadline is refused
before it starts, naming the estimate and the time left; one that fits runs as before.

The estimate (core/cost.py) is a lower bound: each operator's declared arithmetic (OpDef.cost;
matmul, einsum, conv and scan declare theirs) at this machine's peak rate, doubled.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from chainrule.client import DeadlineExceeded, GraphBuilder, ops
from chainrule.core import GraphIR, StopToken, compile_graph, evaluate
from chainrule.core.cost import minimum_seconds, peak_rates
from chainrule.core.errors import DeadlineError
from chainrule.plugins.manager import load_registry

REGISTRY = load_registry(entry_points=False)


def _matmul(n: int) -> GraphIR:
    return GraphIR.build([("a", "float64", (n, n)), ("b", "float64", (n, n))],
                         [("m", "matmul", ("a", "b")), ("s", "sum", ("m",))], "s")


def test_a_huge_product_with_a_short_deadline_is_refused_before_it_starts():
    n = 6400  # 2 n^3 = 524 GFLOP forward; the attack ran 5 s past a 1 s deadline
    plan = compile_graph(_matmul(n), REGISTRY)
    a = np.broadcast_to(np.float64(1.0), (n, n))  # no memory: the refusal comes before anything is read
    started = time.monotonic()
    with pytest.raises(DeadlineError) as caught:
        evaluate(plan, {"a": a, "b": a}, token=StopToken.after(1.0))
    assert time.monotonic() - started < 0.5
    message = str(caught.value)
    assert "refused before starting" in message and "floating-point operations" in message
    assert "the deadline leaves" in message


def test_the_estimate_counts_declared_arithmetic_and_stays_below_the_real_time():
    plan = compile_graph(_matmul(300), REGISTRY)
    rng = np.random.default_rng(0)
    feed = {"a": rng.standard_normal((300, 300)), "b": rng.standard_normal((300, 300))}
    shapes = plan.specialize([(300, 300), (300, 300)])
    seconds, operations, nbytes = minimum_seconds(plan, shapes, gradients=True)
    assert operations >= 3 * 2 * 300 ** 3  # forward product, and twice that backward
    started = time.perf_counter()
    evaluate(plan, feed)
    assert seconds < time.perf_counter() - started  # a lower bound
    flops, bandwidth = peak_rates()
    assert flops > 1e8 and bandwidth > 1e8


def test_a_call_that_fits_its_deadline_runs():
    plan = compile_graph(_matmul(50), REGISTRY)
    result = evaluate(plan, {"a": np.eye(50), "b": np.eye(50)}, token=StopToken.after(5.0))
    assert float(result.output_value) == 50.0


def test_over_grpc_the_refusal_is_deadline_exceeded_and_the_server_goes_on(client):
    g = GraphBuilder()
    x = g.input("x", (1,))
    big = ops.broadcast_to(x, (4000, 4000))  # a 4000^2 product from one number: 128 GFLOP forward
    loss = (big @ big).sum()
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="refused before starting"):
        client.evaluate(loss, x=np.ones(1), timeout=0.5)
    assert time.monotonic() - started < 0.5
    assert client.evaluate(g.input("y") * 2.0, y=4.0).value == 8.0


def test_compiling_a_huge_graph_stops_with_its_deadline():
    """Issue 14: a million-node graph compiled for 21 s past a 1 s deadline. Decoding, compiling and
    shape inference now check the call's token every 4,096 nodes."""
    from chainrule.server import ServerConfig
    from chainrule.server.grpc_server import build_service
    from chainrule.v1 import chainrule_pb2 as pb

    service = build_service(ServerConfig(log_level="WARNING"))
    graph = pb.Graph(outputs=["n199999"])
    graph.inputs.add(name="x", dtype=pb.FLOAT64)
    previous = "x"
    for i in range(200_000):
        previous = graph.nodes.add(name=f"n{i}", op="neg", inputs=[previous]).name
    started = time.monotonic()
    with pytest.raises(DeadlineError, match="the deadline passed"):
        service.compile(graph, StopToken.after(0.2))
    assert time.monotonic() - started < 1.5  # (uninterrupted, this compile takes about 4 s)
    assert not service._plans  # nothing half-compiled was cached


def test_building_a_huge_response_stops_with_its_deadline():
    """The values and gradients of every node of a 200,000-node chain take seconds to encode; the
    response is built under the call's token too."""
    from chainrule.server import ServerConfig
    from chainrule.server.grpc_server import build_service
    from chainrule.v1 import chainrule_pb2 as pb
    from chainrule.wire.convert import array_to_tensor
    from chainrule.wire.outgoing import Outgoing

    service = build_service(ServerConfig(log_level="WARNING"))
    request = pb.EvaluateRequest(output="n199999")
    request.graph.outputs.append("n199999")
    request.graph.inputs.add(name="x", dtype=pb.FLOAT64)
    previous = "x"
    for i in range(200_000):
        previous = request.graph.nodes.add(name=f"n{i}", op="neg", inputs=[previous]).name
    request.inputs["x"].CopyFrom(array_to_tensor(np.float64(1.5)))
    gid, plan = service.compile(request.graph)
    evaluation = service.run(plan, request, None)
    token = StopToken.after(0.05)
    started = time.monotonic()
    with pytest.raises(DeadlineError):
        service.respond(gid, evaluation, request, Outgoing(pb.EvaluateResponse()), token)
    assert time.monotonic() - started < 0.5
