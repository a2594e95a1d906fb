"""Prometheus metrics on --metrics-port, scraped after a few calls.

Requests are counted by method and code, timed in a histogram, their
serialized bytes counted both ways, the operator nodes of every evaluated
graph added up (streamed evaluations too), and the in-flight gauge is back at
zero once the calls are answered.
"""
from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chainrule.server import ServerConfig, create_server
from chainrule.v1 import chainrule_pb2 as pb

from serving import free_port, scrape

EVALUATE = "chainrule.v1.Chainrule/Evaluate"


def circuit(x: float) -> pb.EvaluateRequest:
    """p = x + y, g = p * z: two operator nodes."""
    graph = pb.Graph(outputs=["g"])
    for name in "xyz":
        graph.inputs.add(name=name)
    graph.nodes.add(name="p", op="add", inputs=["x", "y"])
    graph.nodes.add(name="g", op="mul", inputs=["p", "z"])
    inputs = {k: pb.Tensor(values=pb.DoubleList(values=[v])) for k, v in (("x", x), ("y", 3.0), ("z", -3.0))}
    return pb.EvaluateRequest(graph=graph, inputs=inputs)


@pytest.fixture()
def server():
    running, port = create_server("127.0.0.1:0", ServerConfig(metrics_port=free_port(), log_level="WARNING"))
    running.start()
    yield running, f"127.0.0.1:{port}"
    running.drain(0).wait()


def test_calls_are_counted_timed_and_measured(server):
    running, address = server
    sent = [circuit(float(i)).SerializeToString() for i in range(3)]
    bad = pb.EvaluateRequest(graph=pb.Graph(outputs=["nowhere"])).SerializeToString()
    with grpc.insecure_channel(address) as channel:
        evaluate = channel.unary_unary("/" + EVALUATE)  # bytes in, bytes out: the sizes are known exactly
        answers = [evaluate(data, timeout=10) for data in sent]
        with pytest.raises(grpc.RpcError):
            evaluate(bad, timeout=10)
        stream = channel.stream_stream("/chainrule.v1.Chainrule/EvaluateStream")
        assert len(list(stream(iter(sent[:2]), timeout=10))) == 2
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)

    samples = scrape(running.metrics.port)
    assert samples[f'chainrule_requests_total{{code="OK",method="{EVALUATE}"}}'] == 3
    assert samples[f'chainrule_requests_total{{code="INVALID_ARGUMENT",method="{EVALUATE}"}}'] == 1
    assert samples['chainrule_requests_total{code="OK",method="chainrule.v1.Chainrule/EvaluateStream"}'] == 1
    assert samples['chainrule_requests_total{code="OK",method="grpc.health.v1.Health/Check"}'] == 1
    assert samples[f'chainrule_request_duration_seconds_count{{method="{EVALUATE}"}}'] == 4
    assert samples[f'chainrule_request_duration_seconds_bucket{{le="+Inf",method="{EVALUATE}"}}'] == 4
    assert samples[f'chainrule_request_duration_seconds_sum{{method="{EVALUATE}"}}'] > 0
    assert samples[f'chainrule_received_bytes_total{{method="{EVALUATE}"}}'] == sum(map(len, sent)) + len(bad)
    assert samples[f'chainrule_sent_bytes_total{{method="{EVALUATE}"}}'] == sum(map(len, answers))
    assert samples["chainrule_nodes_evaluated_total"] == 2 * (3 + 2)  # three calls and two streamed items
    assert samples[f'chainrule_requests_in_flight{{method="{EVALUATE}"}}'] == 0


def test_metrics_are_off_without_a_port():
    running, _ = create_server("127.0.0.1:0", ServerConfig(log_level="WARNING"))
    try:
        assert running.metrics is None
    finally:
        running.stop(None).wait()
