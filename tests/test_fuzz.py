"""Hostile input against a real server: every answer is the client's fault or a limit, never the server's.

Hypothesis builds malformed and adversarial requests (see hostile.py) and
sends them as raw bytes to Evaluate and RegisterGraph. Each must be answered
within its deadline with OK, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, NOT_FOUND
or FAILED_PRECONDITION (never UNKNOWN or INTERNAL), with no traceback text,
and a valid request must succeed right after. Runs derandomized, so ``make
test`` is repeatable; ``make fuzz`` runs the longer random campaign.
"""
from __future__ import annotations

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from chainrule.client.errors import from_rpc_error
from chainrule.server import ServerConfig
from chainrule.server.grpc_server import create_server
from chainrule.server.servicer import SERVICE_NAME
from chainrule.v1 import chainrule_pb2 as pb

from hostile import EVALUATE, REGISTER, Tally, check_valid_answer, hostile_messages, raw_call, send, valid_request

MAX_NODES = 2000
#: Tight limits, so that valid-looking requests stay cheap and big ones meet the limits.
CONFIG = ServerConfig(max_nodes=MAX_NODES, max_tensor_elements=1 << 20, max_memory_bytes=64 << 20,
                      max_compute_seconds=10, log_level="WARNING")
TIMEOUT = 10.0

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])


@pytest.fixture(scope="module")
def channel():
    running, port = create_server("127.0.0.1:0", CONFIG)
    running.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch
    running.stop(None).wait()


def test_hostile_requests_get_client_error_codes_and_the_server_keeps_serving(channel):
    evaluate, register = raw_call(channel, EVALUATE), raw_call(channel, REGISTER)
    good = valid_request().SerializeToString()
    tally = Tally()

    @FUZZ
    @given(data=hostile_messages(MAX_NODES))
    def one(data: bytes) -> None:
        for call in (evaluate, register):  # an EvaluateRequest's graph is field 1 of a RegisterGraphRequest too
            code, problem = send(call, data, TIMEOUT)
            tally.record(code, problem)
            assert problem is None, problem
        check_valid_answer(pb.EvaluateResponse.FromString(evaluate(good, timeout=TIMEOUT)))

    one()
    assert tally.sent >= 400 and not tally.failures
    # The families reach every kind of answer, not just the first check.
    assert {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "NOT_FOUND"} <= set(tally.codes), tally.codes


@pytest.mark.parametrize("method", ["Evaluate", "RegisterGraph", "ListOperators", "ServerInfo"])
def test_bytes_that_are_no_message_are_invalid_argument(channel, method):
    for data in (b"\xff\xff\xff", b"\x0a\x05\xff\xfe\x00", b"\x12" + b"\x80" * 12):
        with pytest.raises(grpc.RpcError) as info:
            raw_call(channel, f"/{SERVICE_NAME}/{method}")(data, timeout=TIMEOUT)
        error = from_rpc_error(info.value)
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
        assert error.reason == "MALFORMED_REQUEST" and method in error.message


def test_bytes_that_are_no_message_in_a_request_stream_are_invalid_argument(channel):
    stream = channel.stream_stream(f"/{SERVICE_NAME}/EvaluateStream", request_serializer=None,
                                   response_deserializer=None)
    with pytest.raises(grpc.RpcError) as info:
        list(stream(iter([b"\xff\xff\xff"]), timeout=TIMEOUT))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_nan_and_inf_inputs_are_answered_with_diagnostics_naming_the_input(channel):
    graph = pb.Graph(outputs=["s"])
    graph.inputs.add(name="x", shape=[3])
    graph.nodes.add(name="t", op="tanh", inputs=["x"])
    graph.nodes.add(name="s", op="sum", inputs=["t"])
    x = pb.Tensor(shape=[3], values=pb.DoubleList(values=[np.nan, np.inf, 1.0]))
    request = pb.EvaluateRequest(graph=graph, inputs={"x": x})
    response = pb.EvaluateResponse.FromString(raw_call(channel)(request.SerializeToString(), timeout=TIMEOUT))
    assert response.diagnostics.first_nonfinite_value.node == "x"
    assert np.isnan(np.frombuffer(response.output_value.data, "<f8")[0])


def test_a_deep_chain_at_the_node_limit_is_evaluated(channel):
    graph = pb.Graph(outputs=[f"n{MAX_NODES - 1}"])
    graph.inputs.add(name="x")
    for i in range(MAX_NODES):
        graph.nodes.add(name=f"n{i}", op="neg", inputs=["x" if i == 0 else f"n{i - 1}"])
    request = pb.EvaluateRequest(graph=graph, inputs={"x": pb.Tensor(values=pb.DoubleList(values=[2.0]))})
    response = pb.EvaluateResponse.FromString(raw_call(channel)(request.SerializeToString(), timeout=TIMEOUT))
    assert np.frombuffer(response.gradients["x"].data, "<f8").tolist() == [1.0]  # an even number of negations
