"""LocalClient: the worked examples of ARCHITECTURE section 7 in-process, and the Result API."""
from __future__ import annotations

import numpy as np
import pytest

from chainrule.client import GraphBuilder, InvalidArgument, NotFound, ops
from chainrule.server import LocalClient
from chainrule.wire.outgoing import Outgoing
from chainrule.v1 import chainrule_pb2 as pb

TOL = 1e-12


@pytest.fixture(scope="module")
def client():
    return LocalClient()


def close(actual, expected) -> bool:
    return np.allclose(np.asarray(actual, dtype=np.float64), expected, rtol=0, atol=TOL)


# --- the circuits, shared with the gRPC tests ---------------------------------------------------

def circuit_pg():
    """Examples 1 and 2: p = x + y, g = p * z (names as in example 1)."""
    g = GraphBuilder()
    x, y, z = g.input("x"), g.input("y"), g.input("z")
    p = (x + y).named("p")
    return (p * z).named("g")


def neuron_scalar():
    """Example 3 with scalars: f = sigmoid(w0*x0 + w1*x1 + w2)."""
    g = GraphBuilder()
    w0, w1, w2, x0, x1 = (g.input(n) for n in ("w0", "w1", "w2", "x0", "x1"))
    dot = (w0 * x0 + w1 * x1 + w2).named("dot")
    return dot.sigmoid(name="f")


def neuron_vector():
    """Example 3 with vectors: f = sigmoid(w @ [x, 1])."""
    g = GraphBuilder()
    w, x = g.input("w", (3,)), g.input("x", (2,))
    dot = (w @ ops.concat([x, np.ones(1)], axis=0)).named("dot")
    return dot.sigmoid(name="f")


def staged():
    """Example 4: f(x, y) = (x + sigmoid(y)) / (sigmoid(x) + (x + y)**2), stage by stage."""
    g = GraphBuilder()
    x, y = g.input("x"), g.input("y")
    sigy = y.sigmoid(name="sigy")
    num = (x + sigy).named("num")
    sigx = x.sigmoid(name="sigx")
    xpy = (x + y).named("xpy")
    xpysqr = (xpy ** 2).named("xpysqr")
    den = (sigx + xpysqr).named("den")
    invden = (1 / den).named("invden")
    return (num * invden).named("f")


def max_gate():
    """Example 5: f = max(x, y)."""
    g = GraphBuilder()
    x, y = g.input("x"), g.input("y")
    return ops.maximum(x, y, name="f")


#: (name, circuit, inputs, seed): every case the gRPC tests compare bit for bit.
EXAMPLES = [
    ("example1", circuit_pg, {"x": 1.0, "y": 3.0, "z": -3.0}, None),
    ("example2", circuit_pg, {"x": -2.0, "y": 5.0, "z": -4.0}, None),
    ("example3_scalar", neuron_scalar, {"w0": 2.0, "w1": -3.0, "w2": -3.0, "x0": -1.0, "x1": -2.0}, None),
    ("example3_vector", neuron_vector, {"w": np.array([2.0, -3.0, -3.0]), "x": np.array([-1.0, -2.0])}, None),
    ("example4", staged, {"x": 3.0, "y": -4.0}, None),
    ("example5", max_gate, {"x": 4.0, "y": 2.0}, 2.0),
]


# --- ARCHITECTURE section 7 -------------------------------------------------------------------------

def test_example1_add_then_multiply(client):
    f = circuit_pg()
    r = client.evaluate(f, x=1, y=3, z=-3, values="all")
    assert r.output == "g"
    assert close(r.value, -12) and close(r.values["p"], 4)
    assert close(r.grad["z"], 4) and close(r.grad["p"], -3)
    assert close(r.grad["x"], -3) and close(r.grad["y"], -3)
    assert close(r.grad["g"], 1)


def test_example2_same_circuit_other_point(client):
    f = circuit_pg()
    r = client.evaluate(f, {"x": -2.0, "y": 5.0, "z": -4.0}, values="all")
    assert close(r.values["p"], 3) and close(r.value, -12)       # q = 3, f = -12
    assert close(r.grad["z"], 3) and close(r.grad["p"], -4)
    assert close(r.grad["x"], -4) and close(r.grad["y"], -4)


def test_example3_sigmoid_neuron_scalars(client):
    f = neuron_scalar()
    r = client.evaluate(f, w0=2.0, w1=-3.0, w2=-3.0, x0=-1.0, x1=-2.0)
    assert close(r.value, 0.7310585786300049)
    assert close(r.grad["dot"], 0.19661193324148185)              # the local gradient (1 - f) f
    assert close([r.grad["x0"], r.grad["x1"]], [0.3932238664829637, -0.5898357997244456])
    assert close([r.grad["w0"], r.grad["w1"], r.grad["w2"]],
                 [-0.19661193324148185, -0.3932238664829637, 0.19661193324148185])


def test_example3_sigmoid_neuron_vectors(client):
    f = neuron_vector()
    w = f.builder["w"]
    r = client.evaluate(f, {w: [2.0, -3.0, -3.0]}, x=np.array([-1.0, -2.0]))
    assert close(r.value, 0.7310585786300049)
    assert close(r.grad["dot"], 0.19661193324148185)
    assert close(r.grad["x"], [0.3932238664829637, -0.5898357997244456])
    assert close(r.grad[w], [-0.19661193324148185, -0.3932238664829637, 0.19661193324148185])
    assert r.grad[w].shape == (3,) and r.grad[w].dtype == np.float64


def test_example4_staged_circuit(client):
    f = staged()
    r = client.evaluate(f, x=3.0, y=-4.0, values="all")
    assert close(r.value, 1.5456448841066441)
    assert close(r.grad["x"], 2.0595697955721652)
    assert close(r.grad["y"], 1.5922327514838093)
    expected_values = {
        "sigy": 0.01798620996209156, "num": 3.0179862099620918, "sigx": 0.9525741268224334,
        "xpy": -1.0, "xpysqr": 1.0, "den": 1.9525741268224333, "invden": 0.5121444488396316,
        "f": 1.5456448841066441,
    }
    for name, value in expected_values.items():
        assert close(r.values[name], value), name
    expected_grads = {
        "num": 0.5121444488396316, "invden": 3.0179862099620918, "den": -0.7915934472725935,
        "xpysqr": -0.7915934472725935, "sigx": -0.7915934472725935, "xpy": 1.583186894545187,
    }
    for name, grad in expected_grads.items():
        assert close(r.grad[name], grad), name


def test_example4_fan_out_contributions_sum_to_the_gradient(client):
    f = staged()
    r = client.evaluate(f, x=3.0, y=-4.0, contributions=True)
    shares = [c for c in r.contributions if c.node == "x"]
    assert sorted(c.consumer for c in shares) == ["num", "sigx", "xpy"]   # x fans out three ways: +=
    assert close(sum(c.gradient for c in shares), r.grad["x"])
    assert close(sum(c.gradient for c in shares), 2.0595697955721652)


def test_example5_max_gate_routes_the_upstream_gradient(client):
    f = max_gate()
    r = client.evaluate(f, x=4.0, y=2.0, seed=2.0)
    assert close(r.value, 4)
    assert close(r.grad["x"], 2) and close(r.grad["y"], 0)


def test_reused_value_accumulates(client):
    g = GraphBuilder()
    x = g.input("x")
    f = x * x + x
    r = client.evaluate(f, x=3)
    assert close(r.value, 12)
    assert close(r.grad[x], 7)


@pytest.mark.parametrize("name, circuit, inputs, seed", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_examples_have_clean_diagnostics_where_expected(client, name, circuit, inputs, seed):
    r = client.evaluate(circuit(), inputs, seed=seed)
    assert np.all(np.isfinite(r.value))
    assert r.diagnostics.finite, str(r.diagnostics)  # example 4 too: literals (pow's exponent) take no gradient


def test_diagnostics_name_the_first_non_finite_node(client):
    g = GraphBuilder()
    x = g.input("x")
    f = (x.log(name="l") * 2).named("f")
    r = client.evaluate(f, x=-1.0)
    d = r.diagnostics
    assert not d.finite
    assert (d.first_nonfinite_value.node, d.first_nonfinite_value.op) == ("l", "log")
    assert "first non-finite value: 'l' (log)" in str(d)


# --- the Result API -------------------------------------------------------------------------------------

def test_grad_accepts_vars_and_names_and_explains_missing_keys(client):
    g = GraphBuilder()
    x = g.input("x", (3,))
    labels = g.input("labels", (3,), dtype="int64")
    f = (x * labels).sum(name="f")
    r = client.evaluate(f, x=[1.0, 2.0, 3.0], labels=np.array([1, 0, 2]), values="all")
    np.testing.assert_array_equal(r.grad[x], [1.0, 0.0, 2.0])
    np.testing.assert_array_equal(r.grad["x"], r.grad[x])
    assert r.no_gradient == ("labels",)
    assert "labels" not in r.grad and x in r.grad
    with pytest.raises(KeyError, match="'labels' has no gradient: it is a constant, or integer"):
        r.grad[labels]
    other = GraphBuilder()
    stranger = other.input("x", (3,))  # same name, another graph: never silently this graph's x
    with pytest.raises(KeyError, match="belongs to another GraphBuilder"):
        r.grad[stranger]
    with pytest.raises(KeyError, match="belongs to another GraphBuilder"):
        client.evaluate(f, {stranger: [1.0, 2.0, 3.0]}, labels=np.array([1, 0, 2]))
    with pytest.raises(KeyError, match="belongs to another GraphBuilder"):
        client.evaluate(f, x=[1.0, 2.0, 3.0], labels=np.array([1, 0, 2]), grads=[stranger])
    with pytest.raises(KeyError, match="no gradient for 'nope'"):
        r.grad["nope"]
    assert r.values["labels"].dtype == np.int64
    assert set(r.values) == {"x", "labels", f.inputs[0].name, "f"}


def test_selection_of_values_and_gradients(client):
    f = circuit_pg()
    p = f.builder["p"]
    r = client.evaluate(f, x=1.0, y=3.0, z=-3.0, values=[p], grads=["x", "z"])
    assert set(r.values) == {"p"} and set(r.grads) == {"x", "z"}
    assert close(r.value, -12)
    forward_only = client.evaluate(f, x=1.0, y=3.0, z=-3.0, values="none", grads="none")
    assert len(forward_only.values) == 0 and len(forward_only.grad) == 0 and close(forward_only.value, -12)
    with pytest.raises(ValueError, match="expected 'all', 'none'"):
        client.evaluate(f, x=1.0, y=3.0, z=-3.0, grads="some")


def test_unreached_nodes_zeros_or_omitted(client):
    g = GraphBuilder()
    x, y = g.input("x"), g.input("y")
    side = y.exp(name="side")
    f = (x * 2).named("f")
    g.output(f, side)
    whole = g.graph  # a Var would send only what it needs: f and x
    zeros = client.evaluate(whole, x=1.0, y=1.0, output=f)
    assert zeros.grad["side"] == 0 and zeros.grad["y"] == 0
    omitted = client.evaluate(whole, x=1.0, y=1.0, output=f, unreached="omit")
    assert "side" not in omitted.grad and "y" not in omitted.grad and close(omitted.grad["x"], 2)


def test_indexing_matches_numpy_and_scatters_gradients(client):
    g = GraphBuilder()
    x = g.input("x", (4, 5))
    data = np.arange(20.0).reshape(4, 5)
    for index in [(1,), (-1,), (slice(1, None), slice(None, None, -2)), (slice(None), -1), (2, slice(1, 3))]:
        picked = x[index if len(index) > 1 else index[0]]
        r = client.evaluate(picked.sum(), x=data, values=[picked])
        np.testing.assert_array_equal(r.values[picked], data[index])
        expected = np.zeros_like(data)
        expected[index] = 1.0
        np.testing.assert_array_equal(r.grad[x], expected)


def test_graph_with_two_outputs_needs_output_named(client):
    g = GraphBuilder()
    x = g.input("x")
    a, b = (x * 2).named("a"), (x * 3).named("b")
    g.output(a, b)
    graph = g.build()
    assert close(client.evaluate(graph, x=1.0, output="b").grad["x"], 3)
    assert close(client.evaluate(graph, x=1.0, output=a).grad["x"], 2)
    with pytest.raises(InvalidArgument) as info:
        client.evaluate(graph, x=1.0)
    assert info.value.reason == "BAD_OUTPUT"


def test_inputs_are_converted_to_the_declared_dtype(client):
    g = GraphBuilder()
    w = g.input("w", (2,), dtype="float32")
    f = (w * w).sum(name="f")
    r = client.evaluate(f, w=[1, 2])                   # Python ints -> float32
    assert r.value.dtype == np.float32 and r.grad[w].dtype == np.float32
    np.testing.assert_array_equal(r.grad[w], np.array([2, 4], np.float32))
    with pytest.raises(InvalidArgument) as info:       # floats are not silently truncated to ints
        g2 = GraphBuilder()
        k = g2.input("k", dtype="int64")
        client.evaluate((k + 1).named("f"), k=1.5)
    assert info.value.reason == "DTYPE_MISMATCH" and info.value.node == "k"
    with pytest.raises(TypeError, match="given twice"):
        client.evaluate(f, {"w": [1, 2]}, w=[1, 2])


def test_register_then_evaluate_by_id(client):
    f = circuit_pg()
    graph = f.graph
    gid = client.register(f)
    assert len(gid) == 64 and client.registered_id(graph) == gid
    assert close(client.evaluate(f, x=1.0, y=3.0, z=-3.0).value, -12)
    client.service._plans.clear()          # the server forgot it: the client re-registers by itself
    r = client.evaluate(f, x=1.0, y=3.0, z=-3.0)
    assert close(r.grad["x"], -3) and r.graph_id == gid


def test_errors_are_typed_like_the_servers(client):
    g = GraphBuilder()
    x = g.input("x")
    bad = g.op("no.such_op", x, name="h")
    with pytest.raises(InvalidArgument) as info:
        client.evaluate(bad, x=1.0)
    e = info.value
    assert (e.reason, e.node, e.op) == ("UNKNOWN_OPERATOR", "h", "no.such_op")
    assert "h" in e.message and e.code.name == "INVALID_ARGUMENT"
    with pytest.raises(NotFound) as info:   # the transport's answer to an unknown id (evaluate() recovers from it)
        client.transport.send_evaluate(Outgoing(pb.EvaluateRequest(graph_id="0" * 64)), None)
    assert info.value.reason == "UNKNOWN_GRAPH" and info.value.field == "graph_id"


def test_operators_and_server_info(client):
    infos = {op.name: op for op in client.operators()}
    assert {"add", "mul", "sigmoid", "sum", "matmul", "concat", "const"} <= set(infos)
    assert infos["sum"].attrs["keepdims"].default is False and infos["add"].arity == 2
    assert infos["add"].plugin.startswith("builtin")
    assert client.server_info().pid > 0


# --- large tensors are handed over, not copied --------------------------------------------------------

def test_large_tensors_are_handed_over_and_results_never_alias_the_callers_arrays(client):
    """LocalClient passes large arrays to the service without protobuf copies, and a result stays
    what the call returned, as over gRPC: values that share memory with an input (the input's own,
    a reshape of it, here the output itself) come back as copies, read-only like received ones."""
    n = 50_000  # 400 KB: above the 64 KiB hand-over threshold
    g = GraphBuilder()
    x = g.input("x", (n,))
    z = x.reshape((n // 10, 10)).named("z")  # a view of x inside the engine
    data = np.linspace(-1.0, 1.0, n)
    kept = data.copy()
    result = client.evaluate(z, x=data, seed=np.ones((n // 10, 10)), values="all")
    squares = client.evaluate((x * x).named("y").sum(name="f"), x=data, values="all")
    data[:] = -7.0  # the caller reuses its buffer
    np.testing.assert_array_equal(result.values["x"], kept)
    np.testing.assert_array_equal(result.value, kept.reshape(n // 10, 10))
    np.testing.assert_array_equal(result.response.values["z"].data, kept.tobytes())
    np.testing.assert_array_equal(squares.grad["x"], 2 * kept)
    np.testing.assert_array_equal(squares.values["y"], kept * kept)
    assert not any(np.shares_memory(a, data) for a in (result.values["x"], result.value, squares.values["x"]))
    assert not result.values["x"].flags.writeable and not squares.grad["y"].flags.writeable
    whole = squares.response  # the complete message, as gRPC would have delivered it
    assert len(whole.values["x"].data) == 8 * n and whole.values["x"].shape == [n]


def scribbling_client() -> LocalClient:
    """A LocalClient with test.scribble, an operator whose forward adds one to its input in place (a bug)."""
    from chainrule.plugins import OperatorSet
    from chainrule.plugins.manager import load_plugins

    ops_set = OperatorSet()

    @ops_set.operator("test.scribble")
    def scribble(x):
        "Adds one to its input in place (a bug)."
        x += 1.0
        return x

    @scribble.vjp
    def _(g, out, x):
        return (g,)

    class Plugin:
        register_operators = staticmethod(ops_set.hookimpl())

    return LocalClient(load_plugins(entry_points=False, extra=[("test", Plugin())]))


def test_a_rule_writing_into_its_input_cannot_touch_the_callers_array():
    """A plugin's forward rule that writes into its input fails (INTERNAL, the node named) and
    leaves the caller's array as it was: the hand-over is read-only."""
    from chainrule.client import Internal

    local = scribbling_client()
    g = GraphBuilder()
    x = g.input("x", (20_000,))
    y = g.op("test.scribble", x, name="s")
    data = np.zeros(20_000)
    with pytest.raises(Internal) as info:
        local.evaluate(y.sum(name="f"), x=data)
    assert info.value.node == "s" and "read-only" in info.value.message
    assert not data.any()


@pytest.mark.parametrize("declared, value", [("int32", np.int64(2**40)), ("int64", np.uint64(2**63 + 5)),
                                             ("float32", 1e300), ("int32", [1, 2**31])])
def test_an_input_that_does_not_fit_its_declared_dtype_is_refused_not_wrapped(client, declared, value):
    g = GraphBuilder()
    x = g.input("x", dtype=declared) if np.ndim(value) == 0 else g.input("x", (2,), dtype=declared)
    f = (x * 1).named("f")
    with pytest.raises(TypeError, match=f"input 'x': its .* values do not fit the declared {declared}"):
        client.evaluate(f, x=value)
    fits = np.ones(np.shape(value), np.int64) if declared != "float32" else 2.5
    assert client.evaluate(f, x=fits, grads="none").value.dtype == declared  # values that fit are cast


@pytest.mark.parametrize("value", [1700000001, np.int64(16777217), 2.5, np.float64(1e-50), [1, 2]])
def test_values_a_float_input_can_hold_are_rounded_as_floats_are(client, value):
    g = GraphBuilder()
    x = g.input("x", dtype="float32") if np.ndim(value) == 0 else g.input("x", (2,), dtype="float32")
    r = client.evaluate((x * 1.0).named("f"), x=value, grads="none")
    assert np.array_equal(r.value, np.asarray(value, dtype=np.float32))


def test_a_var_of_another_graph_is_simply_not_in_a_result(client):
    g = GraphBuilder()
    x = g.input("x")
    r = client.evaluate((x * 2.0).named("f"), x=1.0, values="all")
    stranger = GraphBuilder().input("x")
    assert x in r.values and stranger not in r.values and stranger not in r.grad


def test_evaluate_many_raises_an_unencodable_sets_own_error(client, address):
    g = GraphBuilder()
    a = g.input("a")
    f = (a * 2.0).named("f")
    from chainrule.client import Client
    with Client(address) as remote:
        for c in (client, remote):  # the same TypeError through both, not gRPC's "Exception iterating requests"
            with pytest.raises(TypeError, match="input 'a'"):
                c.evaluate_many(f, [{"a": 1.0}, {"a": "x"}], errors="return")
            assert [r.value for r in c.evaluate_many(f, [{"a": 1.0}, {"a": 2.0}])] == [2.0, 4.0]
