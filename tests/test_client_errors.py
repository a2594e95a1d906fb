"""Errors a user can act on: the failures gRPC reports itself, worded by the client.

Nothing listening, a name that does not resolve, something else at the
address, a message over a size limit: each is a typed exception whose message
names the address, the cause and the next step, under a stable ``reason``
(UNREACHABLE, UNRESOLVABLE, METHOD_NOT_FOUND, MESSAGE_TOO_LARGE) and with the
code and details of before. Real servers and real sockets on loopback; the
text of gRPC's own statuses is also read directly (``explain``), for the cases
a real server no longer lets through.
"""
from __future__ import annotations

import socket
from concurrent import futures

import grpc
import numpy as np
import pytest

from chainrule.client import (
    ChainruleRpcError, Client, DeadlineExceeded, GraphBuilder, InvalidArgument, ResourceExhausted, Unavailable, ops,
)
from chainrule.client.errors import CLIENT_REASONS, explain
from chainrule.server import ServerConfig

from helpers import start_server
from serving import free_port

KiB = 1 << 10
START_A_SERVER = "start `chainrule serve` (or use chainrule.server.LocalClient in-process)"


def doubled():
    g = GraphBuilder()
    return (g.input("x") * 2.0).named("f")


def vector_sum():
    g = GraphBuilder()
    x = g.input("x", shape=(-1,))
    return x, ops.sum(x * 2.0).named("f")


@pytest.fixture(scope="module")
def small_server():
    """A real server whose messages may take at most 64 KiB either way."""
    server, address = start_server(ServerConfig(max_message_bytes=64 * KiB, log_level="WARNING"))
    yield address
    server.stop(None).wait()


# --- nothing there ----------------------------------------------------------------------------------

def test_nothing_listening_names_the_address_and_how_to_start_a_server():
    address = f"127.0.0.1:{free_port()}"  # free: nothing listens there
    with Client(address, timeout=10) as client:
        for call in (lambda: client.evaluate(doubled(), x=1.0), client.server_info,
                     lambda: client.evaluate_many(doubled(), [{"x": 1.0}])):
            with pytest.raises(Unavailable) as info:
                call()
            e = info.value
            assert e.code == grpc.StatusCode.UNAVAILABLE and e.reason == "UNREACHABLE"
            assert e.metadata["cause"] == "CONNECTION_REFUSED" and e.metadata["address"] == address
            assert "Connection refused" in e.metadata["grpc_message"]  # gRPC's own words are kept
            assert e.message == (f"cannot reach a chainrule server at {address}: connection refused, nothing is "
                                 f"listening there. Check the address and port, or {START_A_SERVER}")
            assert str(e).startswith("UNAVAILABLE: cannot reach") and str(e).endswith("[UNREACHABLE]")


def test_several_addresses_none_listening_are_all_named():
    addresses = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    with Client(addresses, timeout=10) as client, pytest.raises(Unavailable) as info:
        client.server_info()
    assert info.value.reason == "UNREACHABLE"
    assert f"at any of {addresses[0]}, {addresses[1]}:" in info.value.message


def test_an_address_without_a_port_says_so():
    with Client("127.0.0.1", timeout=10) as client, pytest.raises(Unavailable) as info:
        client.server_info()  # gRPC tries port 443, where nothing listens on a test machine
    assert info.value.reason == "UNREACHABLE" and "the address has no port, so gRPC tried 443" in info.value.message


def test_an_unresolvable_name_is_named_with_the_cause():
    with Client("nosuchhost.invalid:1", timeout=5) as client:
        with pytest.raises(Unavailable) as info:
            client.evaluate(doubled(), x=1.0)
    e = info.value
    assert e.code == grpc.StatusCode.UNAVAILABLE and e.reason == "UNRESOLVABLE"
    assert e.message.startswith("cannot resolve the server address nosuchhost.invalid:1: ")
    assert "Check the host name and port" in e.message and e.metadata["address"] == "nosuchhost.invalid:1"


# --- something else at the address ------------------------------------------------------------------

def test_the_metrics_port_instead_of_the_grpc_port():
    metrics_port = free_port()
    server, _ = start_server(ServerConfig(metrics_port=metrics_port, log_level="WARNING"))
    try:
        with Client(f"127.0.0.1:{metrics_port}", timeout=10) as client, pytest.raises(Unavailable) as info:
            client.server_info()
    finally:
        server.stop(None).wait()
    e = info.value
    assert e.reason == "UNREACHABLE" and e.metadata["cause"] == "NOT_GRPC"
    assert "does not speak gRPC" in e.message and "--metrics-port" in e.message


def test_a_listener_that_closes_the_connection():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.1)
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        with Client(address, timeout=10) as client, futures.ThreadPoolExecutor(1) as pool:
            failure = pool.submit(client.server_info)
            while not failure.done():  # accept and close every connection gRPC makes
                try:
                    listener.accept()[0].close()
                except TimeoutError:
                    pass
            with pytest.raises(Unavailable) as info:
                failure.result()
    e = info.value
    assert e.reason == "UNREACHABLE" and e.metadata["cause"] == "CONNECTION_CLOSED"
    assert "may require TLS (Client(..., tls=...))" in e.message and address in e.message


def test_a_listener_that_never_answers_fails_at_the_deadline_as_unreachable():
    with socket.socket() as listener:  # the kernel accepts connections; nothing ever speaks
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        with Client(address, timeout=0.5) as client, pytest.raises(DeadlineExceeded) as info:
            client.server_info()
    e = info.value
    assert e.code == grpc.StatusCode.DEADLINE_EXCEEDED and e.reason == "UNREACHABLE"
    assert e.metadata["cause"] == "NO_ANSWER"
    assert e.message.startswith(f"no connection to a chainrule server at {address} before the call's deadline")


def test_a_grpc_server_that_is_not_chainrule():
    other = grpc.server(futures.ThreadPoolExecutor(2))
    port = other.add_insecure_port("127.0.0.1:0")
    other.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=10) as client:
            with pytest.raises(ChainruleRpcError) as info:
                client.evaluate(doubled(), x=1.0)
            with pytest.raises(ChainruleRpcError) as streamed:
                client.evaluate_many(doubled(), [{"x": 1.0}])
    finally:
        other.stop(None)
    assert info.value.code == grpc.StatusCode.UNIMPLEMENTED and info.value.reason == "METHOD_NOT_FOUND"
    assert "does not know chainrule.v1.Chainrule/Evaluate: it is not a chainrule server" in info.value.message
    assert "chainrule.v1.Chainrule/EvaluateStream" in streamed.value.message


# --- messages over a size limit ---------------------------------------------------------------------

def assert_too_large(e: ChainruleRpcError, side: str, message: str) -> None:
    assert isinstance(e, ResourceExhausted) and e.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert e.reason == "MESSAGE_TOO_LARGE"
    m = e.metadata
    assert m["limit"] == "max_message_bytes" and m["side"] == side and m["message"] == message
    assert int(m["requested"]) > int(m["allowed"]) == 64 * KiB
    assert e.message.startswith(f"the {message} is {m['requested']} bytes, more than ")
    assert f"({m['allowed']} bytes, " in e.message
    assert "shared memory (Client(..., shared_memory=True))" in e.message


def test_a_request_over_the_servers_limit(small_server):
    x, f = vector_sum()  # 160 kB of inputs
    with Client(small_server, timeout=10) as client:
        with pytest.raises(ResourceExhausted) as info:
            client.evaluate(f, x=np.ones(20_000))
        with pytest.raises(ResourceExhausted) as streamed:
            client.evaluate_many(f, [{"x": np.ones(20_000)}])
        assert client.evaluate(f, x=np.ones(10)).value == 20.0  # it serves on
    for e in (info.value, streamed.value):
        assert_too_large(e, "server", "request")
        assert f"more than the server at {small_server} accepts (65536 bytes, its message limit)" in e.message
        assert "chainrule serve --max-message-bytes, or --max-memory-bytes" in e.message
        assert "smaller or fewer inputs" in e.message
    assert "batch=" in streamed.value.message  # a stream can send fewer sets per message


def test_a_response_over_the_servers_limit_is_refused_before_any_work(small_server):
    # Contributions (the gradient along each edge out of x) would make the response ~144 kB from a
    # 16 kB request; the server counts them with the rest before the forward pass and says so.
    g = GraphBuilder()
    x = g.input("x", shape=(2000,))
    total = x * 1.0
    for k in range(2, 9):
        total = total + x * float(k)
    f = ops.sum(total).named("f")
    with Client(small_server, timeout=10) as client, pytest.raises(ResourceExhausted) as info:
        client.evaluate(f, x=np.ones(2000), grads=[x], contributions=True)
    e = info.value
    assert e.reason == "LIMIT_EXCEEDED" and e.metadata["limit"] == "max_message_bytes"
    assert int(e.metadata["requested"]) > 64 * KiB and int(e.metadata["allowed"]) == 64 * KiB
    assert "contributions" in e.message and "Nothing was computed" in e.message
    assert "shared_memory=True" in e.message and "--max-message-bytes" in e.message


def test_a_request_over_the_clients_limit(small_server):
    x, f = vector_sum()
    with Client(small_server, timeout=10, max_message_bytes=64 * KiB) as client:
        with pytest.raises(ResourceExhausted) as info:
            client.evaluate(f, x=np.ones(20_000))
    assert_too_large(info.value, "client", "request")
    assert "more than this client sends (65536 bytes, Client(max_message_bytes=))" in info.value.message
    assert "raise Client(max_message_bytes=...)" in info.value.message


def test_a_response_over_the_clients_limit():
    server, address = start_server(ServerConfig(log_level="WARNING"))  # the server's limit is large
    g = GraphBuilder()
    big = ops.broadcast_to(g.input("s"), [20_000]).named("big")  # 160 kB of value from an 8-byte input
    f = ops.sum(big).named("f")
    try:
        with Client(address, timeout=10, max_message_bytes=64 * KiB) as client:
            with pytest.raises(ResourceExhausted) as info:
                client.evaluate(f, s=1.0, values=[big], grads="none")
            with pytest.raises(ResourceExhausted) as streamed:
                client.evaluate_many(f, [{"s": 1.0}], values=[big], grads="none")
    finally:
        server.stop(None).wait()
    for e in (info.value, streamed.value):
        assert_too_large(e, "client", "response")
        assert "more than this client accepts (65536 bytes, Client(max_message_bytes=))" in e.message
        assert "fewer values or gradients" in e.message


@pytest.mark.parametrize("details, side, message", [
    ("SERVER: Received message larger than max (160105 vs. 65536)", "server", "request"),
    ("SERVER: Sent message larger than max (640384 vs. 65536)", "server", "response"),
    ("CLIENT: Sent message larger than max (160151 vs. 65536)", "client", "request"),
    ("CLIENT: Received message larger than max (640384 vs. 65536)", "client", "response"),
])
def test_grpcs_own_size_texts(details, side, message):
    """Every text gRPC (1.85) gives a message over a limit, on either side, is read."""
    text, reason, figures = explain(grpc.StatusCode.RESOURCE_EXHAUSTED, details, address="127.0.0.1:7")
    assert reason == "MESSAGE_TOO_LARGE" and reason in CLIENT_REASONS
    assert (figures["side"], figures["message"]) == (side, message) and figures["allowed"] == "65536"
    assert text.startswith(f"the {message} is {figures['requested']} bytes, more than ")
    assert ("the server at 127.0.0.1:7" in text) == (side == "server")


def test_statuses_not_from_grpc_itself_are_left_alone():
    assert explain(grpc.StatusCode.UNAVAILABLE, "the server is shutting down", address="a:1") is None
    assert explain(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", address="a:1") is None  # connected
    assert explain(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many calls", address="a:1") is None


# --- the server's own errors ------------------------------------------------------------------------

def test_a_non_scalar_output_without_a_seed_says_pass_seed(small_server):
    g = GraphBuilder()
    x = g.input("x", shape=(3,))
    f = (x * 2.0).named("f")
    expected = ("the output 'f' has shape [3]: pass seed= (the gradient of the output with respect to itself: an "
                "array of shape [3]; all ones differentiate the sum of its elements), or grads=\"none\" to run "
                "forward only")
    with Client(small_server, timeout=10) as client:
        with pytest.raises(InvalidArgument) as info:
            client.evaluate(f, x=np.ones(3))
        (failed,) = client.evaluate_many(f, [{"x": np.ones(3)}], errors="return")
        seeded = client.evaluate(f, x=np.ones(3), seed=np.ones(3))
    assert info.value.reason == "SEED_REQUIRED" and info.value.field == "seed" and info.value.node == "f"
    assert info.value.message == expected
    assert isinstance(failed, InvalidArgument) and failed.message == expected and failed.index == 0
    np.testing.assert_array_equal(seeded.grad[x], [2.0, 2.0, 2.0])
