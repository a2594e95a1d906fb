"""The user's call: lean defaults, graph ids learned from the first call, no 64 MiB wall, a response
too large refused before any work, and the in-process path without messages."""
from __future__ import annotations

import types

import numpy as np
import pytest

from chainrule.client import Client, GraphBuilder, InvalidArgument, ResourceExhausted, ops
from chainrule.plugins import OperatorSet, same_as_input
from chainrule.plugins.manager import load_plugins
from chainrule.server import LocalClient, ServerConfig, build_service, create_server
from chainrule.v1 import chainrule_pb2 as pb

MiB = 1 << 20


def neuron():
    g = GraphBuilder()
    w, x = g.input("w", (3,)), g.input("x", (3,))
    return ops.sum(w * x, name="dot").sigmoid(name="f")


@pytest.mark.parametrize("kind", ["local", "grpc"])
def test_a_default_response_holds_the_output_and_every_gradient_and_no_other_value(kind, address):
    f = neuron()
    with (LocalClient() if kind == "local" else Client(address)) as client:
        r = client.evaluate(f, w=[1.0, -2.0, 0.5], x=[0.5, 0.25, 2.0])
        assert len(r.values) == 0                                   # values only when asked
        assert set(r.grad) == {"w", "x", "dot", "f"} | {n for n in r.grad if n.startswith("mul")}
        assert len(r.grad) == len(f.graph.node_names) + 2          # every node the output depends on
        both = client.evaluate(f, w=[1.0, -2.0, 0.5], x=[0.5, 0.25, 2.0], values=["dot", "dot", f],
                               grads=["w", "w"])
        assert sorted(both.values) == ["dot", "f"] and list(both.grad) == ["w"]  # named twice, returned once
        assert float(both.values["dot"]) == 1.0 * 0.5 - 2.0 * 0.25 + 0.5 * 2.0


def test_the_client_sends_the_graph_once_then_its_id(address, monkeypatch):
    f = neuron()
    with Client(address) as client:
        sent = []
        original = client.transport.send_evaluate
        monkeypatch.setattr(client.transport, "send_evaluate",
                            lambda request, timeout: sent.append(request.message.WhichOneof("source"))
                            or original(request, timeout))
        first = client.evaluate(f, w=[1.0, 2.0, 3.0], x=[1.0, 1.0, 1.0])
        second = client.evaluate(f, w=[1.0, 2.0, 3.0], x=[2.0, 2.0, 2.0])
        assert sent == ["graph", "graph_id"] and client.registered_id(f.graph) == first.graph_id == second.graph_id


def test_a_call_larger_than_the_old_64_mib_wall_works_with_default_settings(client):
    g = GraphBuilder()
    x = g.input("x", (9_000_000,))  # 72 MB in, 72 MB of gradient out
    data = np.linspace(-1.0, 1.0, 9_000_000)
    r = client.evaluate((x * x).sum(name="f"), x=data, diagnostics=False)
    np.testing.assert_allclose(r.grad[x], 2 * data)


def counting_plugin(calls: list):
    """An operator that counts its forward passes: what a refusal before work must never run."""
    ops_ = OperatorSet()

    @ops_.operator("counted.twice", infer=same_as_input, doc="2x, counting forward passes")
    def twice(x):
        calls.append(1)
        return 2 * x

    @twice.vjp
    def twice_vjp(g, out, x):
        return (2 * g,)

    return types.SimpleNamespace(register_operators=ops_.hookimpl())


def test_a_response_too_large_is_refused_before_the_forward_pass_naming_limit_and_ways_out():
    calls: list = []
    config = ServerConfig(max_message_bytes=1 * MiB, log_level="WARNING", check_operators=False)  # counts forward calls
    loaded = load_plugins(entry_points=False, only=["builtin", "counted"],
                          extra=[("counted", counting_plugin(calls))])
    calls.clear()  # loading ran the operator once (the load-time check of a plugin's rules)
    server, port = create_server("127.0.0.1:0", config, service=build_service(config, loaded))
    server.start()
    try:
        g = GraphBuilder()
        x = g.input("x", (100_000,))  # 800 KB in: fits; its value and gradient back would not
        y = g.op("counted.twice", x, name="y")
        f = y.sum(name="f")
        with Client(f"127.0.0.1:{port}") as client:
            with pytest.raises(ResourceExhausted) as info:
                client.evaluate(f, x=np.ones(100_000), values="all")
            assert calls == []  # nothing was computed and thrown away
            error = info.value
            assert error.reason == "LIMIT_EXCEEDED" and error.metadata["limit"] == "max_message_bytes"
            assert int(error.metadata["requested"]) > MiB and int(error.metadata["allowed"]) == MiB
            assert "Nothing was computed" in error.message and "values=" in error.message
            assert "shared_memory=True" in error.message
            r = client.evaluate(f, x=np.ones(100_000), grads=["f"])  # asking for less fits
            assert float(r.value) == 200_000.0 and calls == [1]
    finally:
        server.stop(None)


def test_local_results_are_the_engines_arrays_read_only_and_never_the_callers():
    g = GraphBuilder()
    x = g.input("x", (4,))
    g.input("s", (4,))  # declared, not used by y
    y = (x * 1.0).named("y")
    data, seed = np.arange(4.0), np.ones(4)
    r = LocalClient().evaluate(y, x=data, seed=seed, values="all")
    for array in (r.value, r.values["x"], r.grad["y"], r.grad["x"]):
        assert not array.flags.writeable
        assert not np.may_share_memory(array, data) and not np.may_share_memory(array, seed)
    data[:] = -1.0
    seed[:] = 7.0
    np.testing.assert_array_equal(r.values["x"], np.arange(4.0))
    np.testing.assert_array_equal(r.grad["y"], np.ones(4))
    assert "s" not in r.grad  # an input the output does not use is not even sent


def test_local_and_grpc_give_the_same_bytes_on_the_default_path(client):
    f = neuron()
    w, x = np.array([0.3, -1.2, 2.0]), np.array([1.5, 0.5, -0.25])
    here = LocalClient().evaluate(f, w=w, x=x, values="all")
    there = client.evaluate(f, w=w, x=x, values="all")
    assert here.graph_id == there.graph_id and here.value.tobytes() == there.value.tobytes()
    for name in there.grad:
        assert here.grad[name].tobytes() == there.grad[name].tobytes(), name
    for name in there.values:
        assert here.values[name].tobytes() == there.values[name].tobytes(), name
    assert here.diagnostics.grad_norms == there.diagnostics.grad_norms
    assert here.response.gradients == there.response.gradients  # spelt out on request


def test_the_plan_cache_is_bounded_in_bytes_not_only_in_count():
    from chainrule.core import Limits
    from chainrule.server import ChainruleService
    from chainrule.server.service.service import PLAN_BYTES_PER_NODE
    from chainrule.core.errors import UnknownGraphError

    budget = 1000 * PLAN_BYTES_PER_NODE                        # room for one 600-node plan, not two
    service = ChainruleService(load_plugins(entry_points=False, only=["builtin"]), Limits(max_memory_bytes=budget))
    ids = []
    for k in range(3):
        g = GraphBuilder()
        v = g.input("x")
        for _ in range(600):
            v = v.tanh()
        ids.append(service.compile((v * float(k)).named("f").graph.message)[0])
    with pytest.raises(UnknownGraphError):                     # the oldest plan made room
        service.plan_for(pb.EvaluateRequest(graph_id=ids[0]))
    assert service.plan_for(pb.EvaluateRequest(graph_id=ids[2]))[0] == ids[2]


@pytest.mark.parametrize("kind", ["local", "grpc"])
def test_feeds_for_inputs_the_target_does_not_use_are_ignored_in_streams_too(kind, address):
    g = GraphBuilder()
    x, unused = g.input("x"), g.input("unused", (1000,))
    f = (x * x).named("f")
    with (LocalClient() if kind == "local" else Client(address)) as client:
        results = client.evaluate_many(f, [{"x": 1.0}, {"x": 3.0, unused: np.ones(1000)}], {"unused": np.zeros(1000)})
        assert [float(r.value) for r in results] == [1.0, 9.0] and float(results[1].grad[x]) == 6.0
        with pytest.raises(InvalidArgument, match="nosuch"):  # a name the builder never declared is still an error
            client.evaluate_many(f, [{"x": 1.0, "nosuch": 2.0}])
