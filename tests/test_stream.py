"""EvaluateStream through a real server: the same answers as Evaluate, per-set errors, order, batching.

The Python client is used where it can be; the raw stub where a test needs
requests the client never sends (no graph at all, a graph id, a bad graph
followed by a good one).
"""
from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager

import grpc
import numpy as np
import pytest

from chainrule.client import Client, GraphBuilder, InvalidArgument, ResourceExhausted
from chainrule.server import LocalClient, ServerConfig, create_server
from chainrule.client.errors import from_status
from chainrule.wire.convert import array_to_tensor, tensor_to_array
from chainrule.v1 import chainrule_pb2 as pb
from chainrule.v1.chainrule_pb2_grpc import ChainruleStub


def neuron():
    """f = sigmoid(w·x + b), the lecture's neuron with a vector input."""
    g = GraphBuilder()
    w, x, b = g.input("w", (3,)), g.input("x", (3,)), g.input("b")
    return ((w * x).sum(name="dot") + b).sigmoid(name="f")


@pytest.fixture(scope="module")
def stub(client):
    return ChainruleStub(client.channel)


def input_sets(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"w": rng.normal(size=3), "x": rng.normal(size=3), "b": rng.normal()} for _ in range(n)]


def wire(result) -> bytes:
    return result.response.SerializeToString(deterministic=True)


# --- same answers as Evaluate -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def thousand(client):
    """A thousand input sets and their answers from a thousand Evaluate calls."""
    f, sets = neuron(), input_sets(1000)
    return f, sets, [client.evaluate(f, s) for s in sets]


@pytest.mark.parametrize("batch", [1, 7])
def test_a_thousand_sets_equal_a_thousand_evaluate_calls(client, thousand, batch):
    f, sets, single = thousand
    streamed = client.evaluate_many(f, sets, batch=batch)
    assert len(streamed) == 1000
    assert [wire(r) for r in streamed] == [wire(r) for r in single]
    assert streamed[999].grad["w"].tobytes() == single[999].grad["w"].tobytes()


def test_local_client_streams_the_same_answers(client):
    f, sets = neuron(), input_sets(50, seed=1)
    remote = client.evaluate_many(f, sets, batch=4, grads=["w", "dot"], values="none")
    local = LocalClient().evaluate_many(f, sets, batch=4, grads=["w", "dot"], values="none")
    assert [wire(r) for r in remote] == [wire(r) for r in local]
    assert set(remote[0].grad) == {"w", "dot"} and len(remote[0].values) == 0


def test_common_inputs_feed_every_set_and_a_set_overrides_them(client):
    f = neuron()
    common = {"w": np.array([1.0, 2.0, 3.0]), "b": 0.0}
    sets = [{"x": np.array([1.0, 0.0, 0.0])}, {"x": np.zeros(3), "b": 2.0}]
    for batch in (1, 2):
        results = client.evaluate_many(f, sets, common, batch=batch, values="all")
        assert results[0].values["dot"] == 1.0 and results[0].values["b"] == 0.0
        assert results[1].values["dot"] == 0.0 and results[1].values["b"] == 2.0


def test_no_input_sets_means_no_results(client):
    assert client.evaluate_many(neuron(), [], batch=3) == []


# --- errors: per set, and the stream goes on ----------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 4])
def test_a_bad_shape_gets_its_own_error_and_the_others_succeed(client, batch):
    f, sets = neuron(), input_sets(10, seed=2)
    sets[3] = {**sets[3], "x": np.zeros(4)}
    results = client.evaluate_many(f, sets, batch=batch, errors="return")
    bad = results[3]
    assert isinstance(bad, InvalidArgument) and bad.index == 3
    assert bad.field == "inputs.x" and "shape" in bad.message and bad.reason == "SHAPE_MISMATCH"
    for k, result in enumerate(results):
        if k != 3:
            expected = client.evaluate(f, sets[k])
            assert wire(result) == wire(expected)


def test_errors_raise_by_default_naming_the_set(client):
    sets = input_sets(5)
    sets[2] = {**sets[2], "w": np.zeros((2, 2))}
    with pytest.raises(InvalidArgument) as info:
        client.evaluate_many(neuron(), sets)
    assert info.value.index == 2 and info.value.node == "w"
    assert client.evaluate(neuron(), sets[0]).value > 0  # the server still serves


def test_a_failed_set_is_answered_in_its_place(client):
    sets = input_sets(6)
    sets[0] = {"w": np.zeros(3), "x": np.zeros(3)}  # b missing
    sets[5] = {**sets[5], "nope": 1.0}
    results = client.evaluate_many(neuron(), sets, batch=4, errors="return")
    assert [type(r).__name__ for r in results] == ["InvalidArgument", "Result", "Result", "Result", "Result",
                                                   "InvalidArgument"]
    assert results[0].reason == "MISSING_INPUT" and results[5].reason == "UNEXPECTED_INPUT"


def raw(graph: pb.Graph | None = None, graph_id: str = "", **inputs: float) -> pb.EvaluateRequest:
    request = pb.EvaluateRequest(output="f")
    if graph is not None:
        request.graph.CopyFrom(graph)
    if graph_id:
        request.graph_id = graph_id
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(array_to_tensor(np.asarray(value, dtype=np.float64)))
    return request


def scalar_graph() -> pb.Graph:
    g = GraphBuilder()
    x = g.input("x")
    return (x * x).named("f").graph.message


def test_later_requests_reuse_the_first_graph(stub):
    answers = list(stub.EvaluateStream(iter([raw(scalar_graph(), x=2.0), raw(x=3.0), raw(x=-1.0)]), timeout=30))
    assert [a.index for a in answers] == [0, 1, 2]
    assert [float(tensor_to_array(a.response.output_value, field="f")) for a in answers] == [4.0, 9.0, 1.0]


def test_a_graph_id_works_and_a_stream_without_any_graph_errs_per_request(client, stub):
    gid = client.register(scalar_graph())
    answers = list(stub.EvaluateStream(iter([raw(x=1.0), raw(graph_id=gid, x=5.0), raw(x=6.0)]), timeout=30))
    first = from_status(answers[0].error)
    assert isinstance(first, InvalidArgument) and first.field == "graph"
    assert [a.WhichOneof("result") for a in answers] == ["error", "response", "response"]
    assert answers[2].response.gradients["x"] == array_to_tensor(np.array(12.0))


def test_a_bad_graph_fails_its_requests_until_a_good_one_comes(stub):
    bad = scalar_graph()
    bad.nodes[0].op = "no_such_op"
    requests = [raw(bad, x=1.0), raw(x=2.0), raw(scalar_graph(), x=3.0)]
    answers = list(stub.EvaluateStream(iter(requests), timeout=30))
    errors = [from_status(a.error) for a in answers[:2]]
    assert all(e.reason == "UNKNOWN_OPERATOR" and "no_such_op" in e.message for e in errors)
    assert answers[2].response.output_value == array_to_tensor(np.array(9.0))


def test_a_request_with_input_sets_is_answered_by_one_message_with_a_result_per_set(stub):
    request = raw(scalar_graph())
    for value in (1.0, 2.0, 3.0):
        request.input_sets.add().inputs["x"].CopyFrom(array_to_tensor(np.array(value)))
    follow = raw(x=4.0)
    answers = list(stub.EvaluateStream(iter([request, follow]), timeout=30))
    assert len(answers) == 2 and answers[0].WhichOneof("result") is None
    assert [r.index for r in answers[0].results] == [0, 1, 2] and answers[1].index == 3
    expected = [array_to_tensor(np.array(v)) for v in (1.0, 4.0, 9.0)]
    assert [r.response.output_value for r in answers[0].results] == expected


def test_an_output_file_is_refused_per_request_and_the_stream_goes_on(stub):
    """Answers travel in the stream's messages; a request naming a shared-memory output file
    is told so instead of having the file silently ignored."""
    refused = raw(scalar_graph(), x=2.0)
    refused.shared_memory_output = "chainrule-out"
    refused_sets = raw(x=0.0)
    refused_sets.shared_memory_output = "chainrule-out"
    refused_sets.input_sets.add().inputs["x"].CopyFrom(array_to_tensor(np.array(1.0)))
    answers = list(stub.EvaluateStream(iter([refused, refused_sets, raw(x=3.0)]), timeout=30))
    errors = [from_status(answers[0].error), from_status(answers[1].results[0].error)]
    assert all(isinstance(e, InvalidArgument) and e.field == "shared_memory_output" for e in errors)
    assert "only Evaluate" in errors[0].message
    assert answers[2].response.output_value == array_to_tensor(np.array(9.0))  # the first graph still holds


@contextmanager
def client_of(**settings):
    """A Client of a server of its own, started with ``settings``."""
    server, port = create_server("127.0.0.1:0", ServerConfig(**settings))
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=30) as c:
            yield c
    finally:
        server.stop(None)


def test_answers_too_many_for_one_reply_come_in_several():
    """A message's sets are answered in one reply until it holds half the message limit, then in
    the next: no reply passes the limit, and none piles up in the server's memory."""
    with client_of(max_message_bytes=64 * 1024) as c:
        g = GraphBuilder()
        x = g.input("x")
        f = (x * x).named("f")
        sets = [{"x": float(v)} for v in range(2000)]  # about 200 bytes of answer each: 400 KB in all
        request = raw(f.graph.message)
        for s in sets:
            request.input_sets.add().inputs["x"].CopyFrom(array_to_tensor(np.array(s["x"])))
        replies = list(ChainruleStub(c.channel).EvaluateStream(iter([request]), timeout=30))
        assert len(replies) > 4 and all(r.ByteSize() < 64 * 1024 for r in replies)
        assert [r.index for r in replies] == [r.results[0].index for r in replies]
        assert [item.index for r in replies for item in r.results] == list(range(2000))
        results = c.evaluate_many(f, sets, batch=2000)  # the client reads them as one answer
        assert [float(r.value) for r in results] == [float(v) ** 2 for v in range(2000)]


def test_a_deadline_ends_a_message_of_many_sets_and_frees_the_slot():
    with client_of(max_concurrent=1) as c:
        request = raw(scalar_graph())
        for _ in range(50_000):  # seconds of work for the server, a few MB on the wire
            request.input_sets.add().inputs["x"].CopyFrom(array_to_tensor(np.array(1.0)))
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            list(ChainruleStub(c.channel).EvaluateStream(iter([request]), timeout=0.5))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(0.3)  # the server notices at its next set
        assert c.evaluate(neuron(), input_sets(1)[0]).value > 0  # the only slot is free again
        assert time.monotonic() - started < 5


# --- admission control: a stream holds one slot for its whole length -----------------------------------

def quiet_stream(stub: ChainruleStub, release: threading.Event):
    """An EvaluateStream whose client sends one request, reads its answer, then goes quiet until
    ``release`` (or 20 s)."""

    def requests():
        yield raw(scalar_graph(), x=1.0)
        release.wait(20)

    call = stub.EvaluateStream(requests(), timeout=30)
    assert next(call).index == 0
    return call


def test_an_open_stream_takes_a_slot_only_while_it_computes():
    """An open stream waiting for its client's next message leaves the admission slot to others."""
    with client_of(max_concurrent=1) as c:
        stub = ChainruleStub(c.channel)
        answered, between = threading.Event(), []

        def requests():
            yield raw(scalar_graph(), x=1.0)
            answered.wait(10)  # the stream is open on the server, waiting: another call runs
            between.append(c.evaluate(neuron(), input_sets(1)[0]).value)
            yield raw(x=2.0)

        answers = []
        for answer in stub.EvaluateStream(requests(), timeout=30):
            answers.append(answer)
            answered.set()
        assert len(between) == 1 and between[0] > 0
        assert [a.WhichOneof("result") for a in answers] == ["response", "response"]


def test_streams_beyond_max_streams_are_refused_at_once_naming_the_limit():
    with client_of(max_streams=1) as c:
        stub, release = ChainruleStub(c.channel), threading.Event()
        first = quiet_stream(stub, release)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.EvaluateStream(iter([raw(scalar_graph(), x=1.0)]), timeout=30))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_streams" in info.value.details()
        assert c.evaluate(neuron(), input_sets(1)[0]).value > 0  # unary calls are not streams
        release.set()
        first.cancel()


def test_cancelling_a_stream_frees_its_slot_without_an_internal_error(caplog):
    server, port = create_server("127.0.0.1:0", ServerConfig(max_concurrent=1))
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=30) as c:
            more = threading.Event()

            def requests():
                yield raw(scalar_graph(), x=1.0)
                more.wait(10)  # the client holds the stream open, then cancels it

            call = ChainruleStub(c.channel).EvaluateStream(requests(), timeout=30)
            assert next(call).index == 0
            call.cancel()
            more.set()
            give_up = time.monotonic() + 10
            while True:
                try:
                    assert c.evaluate(neuron(), input_sets(1)[0]).value > 0
                    break
                except ResourceExhausted:
                    assert time.monotonic() < give_up, "the cancelled stream kept its slot"
                    time.sleep(0.01)
    finally:
        server.stop(grace=None).wait()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_an_idle_stream_is_ended_after_max_stream_seconds_and_frees_its_place():
    with client_of(max_streams=1, max_stream_seconds=0.5) as c:
        stub, release = ChainruleStub(c.channel), threading.Event()
        call = quiet_stream(stub, release)  # a client that opens a stream and goes quiet
        started = time.monotonic()
        while True:  # the stream's place is taken until the server ends the idle stream
            try:
                answers = list(stub.EvaluateStream(iter([raw(scalar_graph(), x=3.0)]), timeout=30))
                assert answers[0].WhichOneof("result") == "response"
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                assert time.monotonic() - started < 5, "the idle stream kept its place"
                time.sleep(0.02)
        assert time.monotonic() - started >= 0.3
        with pytest.raises(grpc.RpcError) as info:
            next(call)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # see tests/test_stream_limits.py
        release.set()


def test_the_compute_cap_applies_to_each_input_set_and_the_stream_goes_on():
    g = GraphBuilder()
    h = g.input("x", (200, 200))
    for _ in range(300):
        h = (h @ h).tanh()
    slow = h.sum().named("f").graph.message
    server, port = create_server("127.0.0.1:0", ServerConfig(max_compute_seconds=0.1))
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=30) as c:
            stub = ChainruleStub(c.channel)
            heavy = pb.EvaluateRequest(graph=slow, output="f")
            heavy.inputs["x"].CopyFrom(array_to_tensor(np.eye(200) * 0.5))
            answers = list(stub.EvaluateStream(iter([heavy, raw(scalar_graph(), x=3.0)]), timeout=30))
            assert answers[0].WhichOneof("result") == "error"
            assert answers[0].error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
            assert "max_compute_seconds" in answers[0].error.message
            assert answers[1].WhichOneof("result") == "response"  # the next set is answered normally
    finally:
        server.stop(grace=None).wait()
