"""--max-stream-seconds through a real server: an idle stream ends with DEADLINE_EXCEEDED naming the
limit (google.rpc details, reason DEADLINE_EXCEEDED), not a bare CANCELLED, and frees its slot."""
from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from chainrule.client import Client, GraphBuilder
from chainrule.client.errors import DeadlineExceeded, from_rpc_error
from chainrule.server import ServerConfig, create_server
from chainrule.server.servicer import client_requests
from chainrule.core import StopToken
from chainrule.core.errors import CancelledError, DeadlineError
from chainrule.v1 import chainrule_pb2 as pb
from chainrule.v1.chainrule_pb2_grpc import ChainruleStub
from chainrule.wire.convert import array_to_tensor

LIMIT = "the server's time limit of 0.5 s per stream (max_stream_seconds)"


def request(x: float, graph: bool = True) -> pb.EvaluateRequest:
    r = pb.EvaluateRequest(output="f")
    if graph:
        g = GraphBuilder()
        v = g.input("x")
        r.graph.CopyFrom((v * v).named("f").graph.message)
    r.inputs["x"].CopyFrom(array_to_tensor(np.asarray(x, dtype=np.float64)))
    return r


@pytest.fixture()
def server():
    srv, port = create_server("127.0.0.1:0", ServerConfig(max_concurrent=1, max_stream_seconds=0.5))
    srv.start()
    try:
        yield port
    finally:
        srv.stop(grace=None).wait()


@pytest.mark.parametrize("answered_first", [True, False])
def test_an_idle_stream_gets_deadline_exceeded_naming_the_limit_and_frees_its_slot(server, answered_first):
    with Client(f"127.0.0.1:{server}", timeout=30) as c:
        release = threading.Event()

        def requests():
            if answered_first:
                yield request(2.0)
            release.wait(20)  # a client that goes quiet

        call = ChainruleStub(c.channel).EvaluateStream(requests(), timeout=30)
        started = time.monotonic()
        try:
            if answered_first:
                assert next(call).response.values  # answered before the client went quiet
            with pytest.raises(grpc.RpcError) as info:
                next(call)
        finally:
            release.set()
        waited = time.monotonic() - started
        assert 0.4 <= waited < 5, waited
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert LIMIT in info.value.details()
        error = from_rpc_error(info.value)
        assert isinstance(error, DeadlineExceeded)
        assert LIMIT in error.message
        assert error.reason == "DEADLINE_EXCEEDED"
        assert error.metadata.get("request_id")
        # the slot is free at once: max_concurrent=1, and this Evaluate is not refused
        g = GraphBuilder()
        x = g.input("x")
        assert c.evaluate((x * 3.0).named("f"), {"x": 2.0}).value == 6.0


def test_a_busy_stream_within_the_limit_is_unaffected(server):
    with Client(f"127.0.0.1:{server}", timeout=30) as c:
        answers = list(ChainruleStub(c.channel).EvaluateStream(
            iter([request(1.0), request(2.0, graph=False), request(3.0, graph=False)]), timeout=30))
        assert [a.index for a in answers] == [0, 1, 2]
        assert all(a.WhichOneof("result") == "response" for a in answers)


def test_client_requests_waits_only_until_the_token_deadline():
    gate = threading.Event()

    def slow():
        yield 1
        gate.wait(10)
        yield 2

    token = StopToken.after(0.2, None, "the server's time limit of 0.2 s per stream (max_stream_seconds)")
    it = client_requests(slow(), token)
    assert next(it) == 1
    started = time.monotonic()
    with pytest.raises(DeadlineError, match="max_stream_seconds"):
        next(it)
    assert time.monotonic() - started < 2
    gate.set()


def test_client_requests_passes_everything_through_in_order_and_reports_a_gone_client():
    token = StopToken.after(10, None, "x")
    assert list(client_requests(iter(range(5)), token)) == [0, 1, 2, 3, 4]

    class Gone(grpc.RpcError):
        pass

    def gone():
        yield 1
        raise Gone()

    it = client_requests(gone(), token)
    assert next(it) == 1
    with pytest.raises(CancelledError):
        next(it)


def test_client_requests_reads_no_message_before_it_is_asked_for():
    read = []

    def counted():
        for i in range(5):
            read.append(i)
            yield i

    it = client_requests(counted(), StopToken.after(10, None, "x"))
    assert next(it) == 0
    time.sleep(0.05)
    assert read == [0]  # no read-ahead: the client's flow control still applies
    it.close()


@pytest.mark.parametrize("answered_first", [True, False])
def test_a_stream_that_sends_nothing_is_ended_after_stream_idle_seconds_and_gives_its_slot_back(answered_first):
    """Issue 14: idle streams kept slots for all of max_stream_seconds (600 s by default). A stream that
    sends no message (its first one included: headers only) for stream_idle_seconds is ended, naming
    that limit, while max_stream_seconds is far away."""
    srv, port = create_server("127.0.0.1:0", ServerConfig(max_concurrent=1, max_stream_seconds=60,
                                                          stream_idle_seconds=0.5, log_level="WARNING"))
    srv.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=30) as c:
            release = threading.Event()

            def requests():
                if answered_first:
                    yield request(2.0)
                release.wait(20)

            call = ChainruleStub(c.channel).EvaluateStream(requests(), timeout=30)
            started = time.monotonic()
            try:
                if answered_first:
                    assert next(call).response.values
                with pytest.raises(grpc.RpcError) as info:
                    next(call)
            finally:
                release.set()
            assert 0.4 <= time.monotonic() - started < 5
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "sent no message for 0.5 s (the server's stream_idle_seconds)" in info.value.details()
            g = GraphBuilder()
            assert c.evaluate((g.input("x") * 3.0).named("f"), {"x": 2.0}).value == 6.0  # the slot is free
            # a stream that keeps sending is not idle, however long it lasts in all
            def steady():
                for k in range(4):
                    time.sleep(0.3)
                    yield request(float(k), graph=(k == 0))
            answers = list(ChainruleStub(c.channel).EvaluateStream(steady(), timeout=30))
            assert [a.index for a in answers] == [0, 1, 2, 3]
    finally:
        srv.stop(grace=None).wait()
