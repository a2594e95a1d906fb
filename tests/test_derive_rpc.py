"""Derivatives as graphs over the wire (rpc Derive) and in the builder (grad, jvp, hvp, hessian), with a
real server on a loopback port: derive, evaluate the result, derive again, render; the errors for an
operator without symbolic rules (MISSING_RULE) and for bad requests."""
from __future__ import annotations

import math
import types

import grpc
import numpy as np
import pytest

from chainrule.client import Client, Graph, GraphBuilder, ops
from chainrule.client.errors import ChainruleRpcError
from chainrule.client.graph import DerivedGraph
from chainrule.client.render import to_dot
from chainrule.plugins import OperatorSet
from chainrule.plugins.manager import load_plugins
from chainrule.server import LocalClient, ServerConfig, create_server
from chainrule.server.service import ChainruleService
from chainrule.v1 import chainrule_pb2 as pb


def _neuron():
    """The seeds' sigmoid neuron: f = sigmoid(w0 x0 + w1 x1 + w2)."""
    g = GraphBuilder()
    w, x = g.input("w", (3,)), g.input("x", (2,))
    f = ops.sigmoid(ops.sum(w[:2] * x) + w[2]).named("f")
    return g, w, x, f


W, X = np.array([2.0, -3.0, -3.0]), np.array([-1.0, -2.0])


def test_derive_evaluate_derive_again_and_render(client):
    g, w, x, f = _neuron()
    first = client.derive(f, [w, x])
    assert isinstance(first, DerivedGraph) and isinstance(first, Graph)
    assert set(first.gradients) == {"w", "x"} and first.output == "f" and first.seed_input == ""
    assert client.registered_id(first) == first.graph_id  # registered by Derive: evaluations send the id
    result = client.evaluate(first, {"w": W, "x": X}, output=first.gradients["w"], grads="none", values="all")
    np.testing.assert_allclose(result.values[first.gradients["w"]],
                               [-0.19661193324148185, -0.3932238664829637, 0.19661193324148185], rtol=1e-12)
    np.testing.assert_allclose(result.values[first.gradients["x"]], [0.3932238664829637, -0.5898357997244456],
                               rtol=1e-12)

    # derive again (sent by id): the Hessian block d2f/dw dw with a seed, row by row
    second = client.derive(first, ["w"], output=first.gradients["w"], seed=True)
    assert second.seed_input and second.gradients["w"] != first.gradients["w"]
    fv = 0.7310585786300049
    d2 = fv * (1 - fv) * (1 - 2 * fv)
    dz = np.array([X[0], X[1], 1.0])
    for k in range(3):
        seed = np.eye(3)[k]
        row = client.evaluate(second, {"w": W, "x": X, second.seed_input: seed}, output=second.gradients["w"],
                              grads="none").value
        np.testing.assert_allclose(row, d2 * dz[k] * dz, rtol=1e-10, atol=1e-15)

    # the backward pass drawn as a circuit: every gradient node of the derived graph is in the picture
    result = client.evaluate(first, {"w": W, "x": X}, output=first.gradients["x"], seed=np.ones(2), values="all")
    dot = to_dot(result)
    assert dot.startswith("digraph") and all(f'"{node.name}"' in dot for node in first.message.nodes)


def test_forward_mode_over_the_wire_is_the_gradient_along_the_tangents(client):
    g, w, x, f = _neuron()
    forward = client.derive(f, [w, x], mode="forward")
    assert set(forward.tangents) == {"w", "x"} and forward.tangent_output
    tw, tx = np.array([0.5, -1.0, 2.0]), np.array([1.5, 0.25])
    jvp = client.evaluate(forward, {"w": W, "x": X, forward.tangents["w"]: tw, forward.tangents["x"]: tx},
                          grads="none").value
    grads = client.evaluate(f, w=W, x=X).grad
    assert float(jvp) == pytest.approx(float(grads[w] @ tw + grads[x] @ tx), rel=1e-12)


def test_a_derived_graph_is_plain_proto_that_travels_as_json(client, tmp_path):
    g, w, x, f = _neuron()
    first = client.derive(f.graph, ["w"], output="f")
    path = tmp_path / "grad.json"
    first.save(path)
    loaded = Graph.load(path)
    assert loaded.message == first.message
    value = client.evaluate(loaded, {"w": W, "x": X}, output=first.gradients["w"], grads="none").value
    np.testing.assert_allclose(value, [-0.19661193324148185, -0.3932238664829637, 0.19661193324148185], rtol=1e-12)


def test_both_clients_derive_the_same_graph(client):
    g, w, x, f = _neuron()
    with LocalClient() as local:
        a, b = client.derive(f, [w]), local.derive(f, [w])
    assert a.message == b.message and a.graph_id == b.graph_id and a.gradients == b.gradients


def test_derive_by_graph_id_of_a_registered_graph(client):
    g, w, x, f = _neuron()
    graph = f.graph
    client.register(graph)
    derived = client.derive(graph, ["w", "x"])
    value = client.evaluate(derived, {"w": W, "x": X}, output=derived.gradients["x"], grads="none").value
    np.testing.assert_allclose(value, [0.3932238664829637, -0.5898357997244456], rtol=1e-12)


def test_grad_nodes_in_the_builder_hvp_hessian_and_jvp(client):
    g = GraphBuilder()
    x = g.input("x", (3,))
    v = g.input("v", (3,))
    f = ops.sum(ops.exp(x) * ops.sin(x)) + ops.sum(x) ** 2
    (gx,) = g.grad(f, [x])
    (hv,) = ops.hvp(f, [x], [v])
    inner = g.grad(ops.sum(g.grad(f, [x])[0] * v), [x])[0]  # the spelling of the same HVP
    hessian = ops.hessian(f, x)
    jvp = ops.jvp(f, [x], [v])
    xv, vv = np.array([0.3, -0.5, 1.2]), np.array([1.0, -2.0, 0.5])
    expected_h = np.diag(2 * np.exp(xv) * np.cos(xv)) + 2.0
    expected_g = np.exp(xv) * (np.sin(xv) + np.cos(xv)) + 2 * xv.sum()
    out = client.evaluate(gx, x=xv, grads="none").value
    np.testing.assert_allclose(out, expected_g, rtol=1e-12)
    for var in (hv, inner):
        np.testing.assert_allclose(client.evaluate(var, x=xv, v=vv, grads="none").value, expected_h @ vv, rtol=1e-12)
    np.testing.assert_allclose(client.evaluate(hessian, x=xv, grads="none").value, expected_h, rtol=1e-12)
    assert float(client.evaluate(jvp, x=xv, v=vv, grads="none").value) == pytest.approx(expected_g @ vv, rel=1e-12)
    # the gradient Vars are values like any other: differentiated by the ordinary backward pass too
    r = client.evaluate(ops.sum(gx * v), x=xv, v=vv)
    np.testing.assert_allclose(r.grad[x], expected_h @ vv, rtol=1e-12)


def test_a_seeded_grad_node_and_a_hessian_refused_over_its_limit():
    g = GraphBuilder()
    x = g.input("x", (2, 2))
    y = ops.tanh(x)
    (gx,) = g.grad(y, [x], seed=np.array([[1.0, 2.0], [3.0, 4.0]]))
    with LocalClient() as local:
        value = local.evaluate(gx, x=np.zeros((2, 2)), grads="none").value
    np.testing.assert_allclose(value, [[1.0, 2.0], [3.0, 4.0]])
    big = g.input("big", (17, 16))
    with pytest.raises(ValueError, match="272 elements"):
        ops.hessian(ops.sum(big), big)


def test_third_derivative_through_the_builder():
    g = GraphBuilder()
    x = g.input("x")
    f = ops.sin(ops.exp(x))
    d1 = g.grad(f, [x])[0]
    d3 = g.grad(g.grad(d1, [x])[0], [x])[0]
    u = math.exp(0.4)
    with LocalClient() as local:
        value = float(local.evaluate(d3, x=0.4, grads="none").value)
    assert value == pytest.approx(-math.cos(u) * u ** 3 - 3 * math.sin(u) * u ** 2 + math.cos(u) * u, rel=1e-12)


# --- errors ------------------------------------------------------------------------------------------------

def _cube_plugin():
    """A plugin operator with numpy rules only: first order works, symbolic derivatives do not."""
    ops_ = OperatorSet()

    @ops_.operator("t.cube")
    def cube(x):
        """x ** 3."""
        return x ** 3

    @cube.vjp
    def _(g, out, x):
        return (3 * g * x * x,)

    return types.SimpleNamespace(register_operators=ops_.hookimpl())


@pytest.fixture(scope="module")
def plugin_client():
    loaded = load_plugins(entry_points=False, only=["builtin", "t"], extra=[("t", _cube_plugin())])
    assert "t.cube" in loaded.registry
    server, port = create_server("127.0.0.1:0", service=ChainruleService(loaded))
    server.start()
    with Client(f"127.0.0.1:{port}", timeout=60) as c:
        yield c
    server.stop(grace=None).wait()


def test_an_operator_without_symbolic_rules_is_missing_rule(plugin_client):
    g = GraphBuilder()
    x = g.input("x")
    h = g.op("t.cube", x).named("h")
    f = ops.sin(h).named("f")
    assert plugin_client.evaluate(f, x=0.5).grad[x] == pytest.approx(math.cos(0.125) * 0.75)  # first order works
    for mode, rule in (("reverse", "vjp_graph"), ("forward", "jvp_graph")):
        with pytest.raises(ChainruleRpcError) as caught:
            plugin_client.derive(f, [x], mode=mode)
        error = caught.value
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.reason == "MISSING_RULE"
        assert error.metadata["node"] == "h" and error.metadata["op"] == "t.cube"
        assert rule in str(error) and "t.cube" in str(error)
    # a grad node through it fails the same way when the graph is compiled
    (gx,) = g.grad(f, [x])
    with pytest.raises(ChainruleRpcError) as caught:
        plugin_client.evaluate(gx, x=0.5, grads="none")
    assert caught.value.reason == "MISSING_RULE" and caught.value.metadata["op"] == "t.cube"
    # a derivative that does not pass through it is fine
    derived = plugin_client.derive(f, [h])
    assert float(plugin_client.evaluate(derived, x=0.5, output=derived.gradients["h"], grads="none").value) == \
        pytest.approx(math.cos(0.125))


@pytest.mark.parametrize("request_fields, reason", [
    ({"wrt": ["nope"]}, "BAD_OUTPUT"),
    ({"wrt": ["labels"]}, "DTYPE_MISMATCH"),
    ({"wrt": []}, "BAD_OPTION"),
    ({"wrt": ["x"], "output": "missing"}, "BAD_OUTPUT"),
    ({"wrt": ["x"], "seed": True, "mode": pb.DERIVATIVE_MODE_FORWARD}, "BAD_OPTION"),
    ({"wrt": ["x"], "output": "v"}, "SEED_REQUIRED"),
])
def test_bad_derive_requests_are_invalid_argument(address, request_fields, reason):
    g = GraphBuilder()
    x = g.input("x", (2,))
    labels = g.input("labels", (2,), "int64")
    v = (ops.exp(x) * 2.0).named("v")
    f = (ops.sum(v) + ops.sum(labels)).named("f")
    request = pb.DeriveRequest(graph=g.graph_for(f, v).message, output=request_fields.pop("output", "f"),
                               **request_fields)
    from chainrule.v1 import chainrule_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.ChainruleStub(channel).Derive(request, timeout=30)
    from chainrule.client.errors import from_rpc_error

    error = from_rpc_error(caught.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.reason == reason, str(error)


def test_an_unknown_graph_id_is_not_found(address):
    from chainrule.v1 import chainrule_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.ChainruleStub(channel).Derive(pb.DeriveRequest(graph_id="0" * 64, wrt=["x"]), timeout=30)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_derived_graph_too_large_to_send_is_refused_naming_the_limit():
    """The response's size is checked before the derived graph is compiled, registered or sent."""
    g = GraphBuilder()
    x = g.input("x", (4,))
    h = x
    for _ in range(400):  # a chain whose derivative has a few thousand nodes
        h = ops.tanh(h) * 1.5
    f = ops.sum(h).named("f")
    server, port = create_server("127.0.0.1:0", ServerConfig(max_message_bytes=64 * 1024, log_level="ERROR"))
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=30) as client:
            with pytest.raises(ChainruleRpcError) as info:
                client.derive(f, [x])
            assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert info.value.metadata["limit"] == "max_message_bytes"
            assert int(info.value.metadata["requested"]) > 64 * 1024
            assert "wrt" in info.value.message
            assert len(server.service._plans) == 1  # the graph itself, not its derivative
    finally:
        server.stop(grace=None).wait()
