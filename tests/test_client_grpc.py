"""The real Client against a real server on a loopback port.

Same graphs as test_client_local: the answers must be bit-identical to
LocalClient's. Errors arrive as typed exceptions with their reason and node,
and the server keeps answering after each.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from chainrule.client import (

    Client, DeadlineExceeded, Graph, GraphBuilder, Internal, InvalidArgument, NotFound, ResourceExhausted, Unavailable, ops,

)

from chainrule.server import LocalClient, ServerConfig, create_server
from chainrule.client.request import evaluate_request
from chainrule.wire.outgoing import HandEncoded, Outgoing
from chainrule.v1 import chainrule_pb2 as pb

from helpers import start_server as start
from test_client_local import EXAMPLES, circuit_pg, close, staged


@pytest.fixture(scope="module")
def local():
    return LocalClient()


def assert_serves(client: Client) -> None:
    """The server still answers a good request correctly."""
    r = client.evaluate(circuit_pg(), x=1.0, y=3.0, z=-3.0)
    assert close(r.value, -12) and close(r.grad["x"], -3)


# --- the worked examples, identical to LocalClient ----------------------------------------------------

@pytest.mark.parametrize("name, circuit, inputs, seed", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_worked_examples_bit_identical_to_local(client, local, name, circuit, inputs, seed):
    f = circuit()
    remote, here = client.evaluate(f, inputs, seed=seed), local.evaluate(f, inputs, seed=seed)
    assert remote.response.SerializeToString(deterministic=True) == here.response.SerializeToString(deterministic=True)
    assert remote.value.tobytes() == here.value.tobytes()
    assert set(remote.grad) == set(here.grad) and len(remote.grad) > 0
    for key in remote.grad:
        assert remote.grad[key].tobytes() == here.grad[key].tobytes(), key


def test_worked_example4_values_through_the_server(client):
    r = client.evaluate(staged(), x=3.0, y=-4.0, values="all")
    assert close(r.value, 1.5456448841066441)
    assert close(r.grad["x"], 2.0595697955721652) and close(r.grad["y"], 1.5922327514838093)
    assert close(r.grad["den"], -0.7915934472725935) and close(r.values["invden"], 0.5121444488396316)


def test_max_gate_with_upstream_seed(client):
    g = GraphBuilder()
    x, y = g.input("x"), g.input("y")
    r = client.evaluate(ops.maximum(x, y), x=4.0, y=2.0, seed=2.0)
    assert close(r.grad[x], 2) and close(r.grad[y], 0)


# --- errors, from the client side ------------------------------------------------------------------------

def test_unknown_operator(client):
    g = GraphBuilder()
    x = g.input("x")
    h = g.op("acme.nonexistent", x, name="h")
    with pytest.raises(InvalidArgument) as info:
        client.evaluate(h, x=1.0)
    e = info.value
    assert e.reason == "UNKNOWN_OPERATOR" and e.node == "h" and e.op == "acme.nonexistent"
    assert "'h'" in e.message and "acme.nonexistent" in e.message
    assert e.violations and e.field == "graph.nodes[0].op"
    assert_serves(client)


def test_cycle(client):
    graph = Graph.from_json("""{
        "inputs": [{"name": "x"}],
        "nodes": [{"name": "a", "op": "add", "inputs": ["x", "b"]},
                  {"name": "b", "op": "mul", "inputs": ["a", "x"]}],
        "outputs": ["b"]}""")
    with pytest.raises(InvalidArgument) as info:
        client.evaluate(graph, x=1.0)
    assert info.value.reason == "CYCLE" and info.value.node in ("a", "b")
    assert "a -> b" in info.value.message or "b -> a" in info.value.message
    assert_serves(client)


def test_shape_mismatch_in_matmul_names_the_node(client):
    g = GraphBuilder()
    x, w = g.input("x", (2, 3)), g.input("W", (4, 5))
    h = (x @ w).named("h1")
    with pytest.raises(InvalidArgument) as info:
        client.evaluate(h.sum(), x=np.zeros((2, 3)), W=np.zeros((4, 5)))
    e = info.value
    assert e.reason == "SHAPE_MISMATCH" and e.node == "h1" and e.op == "matmul" and "'h1'" in e.message
    assert_serves(client)


def test_missing_input(client):
    f = circuit_pg()
    with pytest.raises(InvalidArgument) as info:
        client.evaluate(f, x=1.0, y=3.0)
    e = info.value
    assert e.reason == "MISSING_INPUT" and e.node == "z" and e.field == "inputs.z"
    assert_serves(client)


def test_non_scalar_output_needs_a_seed(client):
    g = GraphBuilder()
    x = g.input("x", (3,))
    y = (x * 2).named("y")
    with pytest.raises(InvalidArgument) as info:
        client.evaluate(y, x=np.ones(3))
    assert info.value.reason == "SEED_REQUIRED" and info.value.node == "y"
    r = client.evaluate(y, x=np.ones(3), seed=np.array([1.0, 0.0, -1.0]))
    np.testing.assert_array_equal(r.grad[x], [2.0, 0.0, -2.0])
    assert_serves(client)


def test_errors_match_local_client(client, local):
    g = GraphBuilder()
    x = g.input("x")
    bad = g.op("nope", x, name="bad")
    errors = []
    for c in (client, local):
        with pytest.raises(InvalidArgument) as info:
            c.evaluate(bad, x=1.0)
        errors.append(info.value)
    remote, here = errors
    assert (remote.code, remote.message, remote.reason, remote.violations) == \
        (here.code, here.message, here.reason, here.violations)
    assert {k: v for k, v in remote.metadata.items() if k != "request_id"} == here.metadata


def test_deadline_exceeded_is_typed_and_the_server_recovers(client):
    g = GraphBuilder()
    h = g.input("x", (200, 200))
    w = g.input("W", (200, 200))
    for _ in range(300):
        h = (h @ w).tanh()
    with pytest.raises(DeadlineExceeded):
        client.evaluate(h.sum(), x=np.ones((200, 200)), W=np.full((200, 200), 0.01), timeout=0.05, grads="none")
    assert_serves(client)


def slow_graph():
    g = GraphBuilder()
    h = g.input("x", (200, 200))
    w = g.input("W", (200, 200))
    for _ in range(1000):
        h = (h @ w).tanh()
    return h.sum(), {"x": np.ones((200, 200)), "W": np.full((200, 200), 0.01)}


def assert_idle_soon(c: Client) -> None:
    """With one slot, a probe succeeds only once the server has stopped the earlier work."""
    give_up = time.monotonic() + 2
    while True:
        try:
            assert_serves(c)
            return
        except ResourceExhausted:
            assert time.monotonic() < give_up, "the server kept computing after the call ended"
            time.sleep(0.01)


@pytest.mark.parametrize("how", ["deadline", "cancel"])
def test_a_call_that_ends_early_stops_the_work_on_the_server(how):
    server, addr = start(ServerConfig(max_concurrent=1))
    try:
        with Client(addr, timeout=30) as c:
            f, inputs = slow_graph()  # about a second of work, far more than the call lives
            if how == "deadline":
                with pytest.raises(DeadlineExceeded):
                    c.evaluate(f, inputs, timeout=0.05, grads="none")
            else:
                call = c.transport.evaluate_call.future(
                    evaluate_request(f.graph, f.name, inputs, grads="none", carrier=HandEncoded()), timeout=30)
                time.sleep(0.1)
                call.cancel()
                assert call.cancelled()
            started = time.monotonic()
            assert_idle_soon(c)
            assert time.monotonic() - started < 1.0
    finally:
        server.stop(grace=None).wait()


def test_unreachable_server_is_unavailable():
    server, addr = start()
    server.stop(grace=None).wait()
    with Client(addr, timeout=2) as c, pytest.raises(Unavailable):
        c.evaluate(circuit_pg(), x=1.0, y=3.0, z=-3.0)


# --- registered graphs ---------------------------------------------------------------------------------------

def spy(monkeypatch, client: Client, method: str) -> list:
    """Record the requests a client's transport method sends."""
    calls: list = []
    original = getattr(client.transport, method)

    def record(request, timeout):
        calls.append(request)
        return original(request, timeout)

    monkeypatch.setattr(client.transport, method, record)
    return calls


def test_register_then_evaluate_by_id(address, monkeypatch):
    with Client(address) as c:
        f = circuit_pg()
        gid = c.register(f)
        assert len(gid) == 64
        sent = spy(monkeypatch, c, "send_evaluate")
        r = c.evaluate(f, x=1.0, y=3.0, z=-3.0)
        assert close(r.value, -12) and close(r.grad["x"], -3) and r.graph_id == gid
        assert sent[0].message.WhichOneof("source") == "graph_id" and sent[0].message.graph_id == gid
        assert c.register(f) == gid                       # content hash: same graph, same id


def test_unknown_id_is_not_found(client):
    with pytest.raises(NotFound) as info:
        client.transport.send_evaluate(Outgoing(pb.EvaluateRequest(graph_id="f" * 64)), None)
    assert info.value.reason == "UNKNOWN_GRAPH" and info.value.field == "graph_id"
    assert_serves(client)


def test_client_re_registers_when_the_server_forgot_the_id(monkeypatch):
    """A server keeping one graph: registering a second evicts the first, as a restart or another replica would."""
    server, addr = start(ServerConfig(graph_cache_size=1))
    try:
        with Client(addr) as c:
            first, second = circuit_pg(), staged()
            gid = c.register(first)
            c.register(second)
            registered = spy(monkeypatch, c, "register")
            sent = spy(monkeypatch, c, "send_evaluate")
            r = c.evaluate(first, x=1.0, y=3.0, z=-3.0)
            assert close(r.value, -12) and close(r.grad["z"], 4) and r.graph_id == gid
            assert not registered and len(sent) == 2             # NOT_FOUND, then the graph itself
            assert sent[1].message.WhichOneof("source") == "graph"
            assert c.registered_id(first.graph) == gid
            c.evaluate(first, x=1.0, y=3.0, z=-3.0)             # the server kept it: by id again, at once
            assert len(sent) == 3 and sent[2].message.graph_id == gid
    finally:
        server.stop(grace=None).wait()


# --- size and concurrency ---------------------------------------------------------------------------------------

def test_16_mib_input_and_gradient_round_trip_exactly(client):
    n = 2 * 1024 * 1024                                       # 2 Mi float64 = 16 MiB
    data = np.random.default_rng(7).standard_normal(n)
    g = GraphBuilder()
    x = g.input("x", (n,))
    f = (x * x).sum(name="f")
    r = client.evaluate(f, x=data, values=[x], grads=[x])
    assert r.values[x].nbytes == 16 * 1024 * 1024
    assert r.values[x].tobytes() == data.tobytes()
    assert r.grad[x].tobytes() == (2 * data).tobytes()       # d(sum x²)/dx = 2x, exact in binary
    assert close(r.value, np.sum(data * data)) or np.isclose(r.value, np.sum(data * data), rtol=1e-12)


def test_16_threads_times_50_calls(client):
    """16 client threads never exceed the default 16 concurrent calls, so none may be refused.

    (gRPC's maximum_concurrent_rpcs counts a call until its clean-up ends, after
    the client already has its answer; a limit of exactly max_concurrent then
    refuses a few calls now and then: this test catches that.)
    """
    f = circuit_pg()
    staged_f = staged()

    def work(thread: int) -> int:
        ok = 0
        for i in range(50):
            x, y, z = float(thread), float(i), float(i - thread)
            r = client.evaluate(f, x=x, y=y, z=z)
            ok += bool(r.value == (x + y) * z and r.grad["x"] == z and r.grad["z"] == x + y)
            if i % 10 == 0:
                s = client.evaluate(staged_f, x=3.0, y=-4.0)
                ok += bool(close(s.grad["x"], 2.0595697955721652)) - 1
        return ok

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(work, range(16))) == [50] * 16


# --- discovery --------------------------------------------------------------------------------------------------

def test_operators_and_server_info(client, local):
    remote = client.operators()
    assert [op.name for op in remote] == [op.name for op in local.operators()]
    by_name = {op.name: op for op in remote}
    assert by_name["leaky_relu"].attrs["alpha"].type == "float" and by_name["concat"].arity == -1
    info = client.server_info()
    assert info.pid > 0 and info.version


# --- a plugin that fails ---------------------------------------------------------------------------------------

def failing_plugin():
    """A throwaway plugin whose forward rule raises."""
    from chainrule.plugins import OperatorSet

    ops_set = OperatorSet()

    @ops_set.operator("test.boom")
    def boom(x):
        "Always raises."
        raise RuntimeError("kaboom")

    @boom.vjp
    def _(g, out, x):
        return (g,)

    class Plugin:
        register_operators = staticmethod(ops_set.hookimpl())

    return Plugin()


def test_plugin_failure_is_internal_with_operator_and_request_id(caplog):
    from chainrule.plugins.manager import load_plugins
    from chainrule.server.service import ChainruleService

    loaded = load_plugins(entry_points=False, extra=[("test", failing_plugin())])
    server, port = create_server("127.0.0.1:0", service=ChainruleService(loaded))
    server.start()
    try:
        g = GraphBuilder()
        x = g.input("x")
        y = g.op("test.boom", x, name="b")
        with Client(f"127.0.0.1:{port}") as c:
            with pytest.raises(Internal) as info:
                c.evaluate(y, x=1.0)
            e = info.value
            assert e.op == "test.boom" and e.node == "b" and e.metadata.get("plugin") == "test"
            assert e.request_id and e.request_id in e.message and "kaboom" in e.message
            assert "Traceback" not in e.message
            logged = [r for r in caplog.records if r.name == "chainrule.server" and r.levelname == "ERROR"]
            assert len(logged) == 1 and e.request_id in logged[0].getMessage() and logged[0].exc_info  # full trace, server side
            assert close(c.evaluate(circuit_pg(), x=1.0, y=3.0, z=-3.0).value, -12)
        with pytest.raises(Internal) as local_info:
            LocalClient(loaded).evaluate(y, x=1.0)
        assert local_info.value.op == "test.boom" and local_info.value.request_id is None
    finally:
        server.stop(grace=None).wait()
