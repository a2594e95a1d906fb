"""scan: one body graph, many steps (issue 15).

Gradients must equal those of the same loop unrolled into a flat graph (to
1e-12), through LocalClient and a real gRPC server; a scan inside a scan works;
errors name the body's node (and, at run time, the step); the memory budget
counts what the backward pass keeps per step; the stop token is honoured
between steps.
"""
from __future__ import annotations

import numpy as np
import pytest

from chainrule.client import GraphBuilder, ops
from chainrule.core import GraphIR, InputDecl, Limits, Node, StopToken, compile_graph, evaluate
from chainrule.core.errors import BadAttributeError, LimitExceeded, OutputError, UnknownNodeError
from chainrule.plugins.manager import load_registry
from chainrule.server import LocalClient
from chainrule.wire.convert import graph_from_proto

B, H, D, T = 3, 4, 2, 7
REGISTRY = load_registry(entry_points=False)


def _feed(seed: int = 0, steps: int = T) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"h0": rng.standard_normal((B, H)), "c0": rng.standard_normal((B, H)),
            "xs": rng.standard_normal((steps, B, D)), "Wx": rng.standard_normal((D, H)),
            "Wh": rng.standard_normal((H, H)) * 0.5}


def _inputs(g: GraphBuilder, steps: int = T):
    return (g.input("h0", (B, H)), g.input("c0", (B, H)), g.input("xs", (steps, B, D)),
            g.input("Wx", (D, H)), g.input("Wh", (H, H)))


def _cell(h, c, x, wx, wh):
    """A tanh RNN step with two carries: h, and c, a running sum of the h's."""
    h2 = ops.tanh(x @ wx + h @ wh)
    return h2, c + h2 * 0.5


def scan_rnn(steps: int = T):
    g = GraphBuilder()
    h0, c0, xs, wx, wh = _inputs(g, steps)

    def step(carry, x, wx, wh):
        h, c = _cell(carry[0], carry[1], x, wx, wh)
        return [h, c], ops.sum(h * h)

    (h_t, c_t), ys = ops.scan(step, [h0, c0], xs, [wx, wh], name="rnn")
    return (ops.sum(h_t) + ops.mean(c_t) + ops.sum(ys)).named("loss")


def unrolled_rnn(steps: int = T):
    g = GraphBuilder()
    h, c, xs, wx, wh = _inputs(g, steps)
    per_step = []
    for t in range(steps):
        h, c = _cell(h, c, xs[t], wx, wh)
        per_step.append(ops.sum(h * h))
    return (ops.sum(h) + ops.mean(c) + ops.sum(ops.stack(per_step))).named("loss")


@pytest.fixture(scope="module")
def local():
    return LocalClient()


def test_scan_gradients_equal_the_unrolled_graphs(local):
    feed = _feed()
    scanned, unrolled = local.evaluate(scan_rnn(), feed), local.evaluate(unrolled_rnn(), feed)
    assert float(scanned.value) == pytest.approx(float(unrolled.value), rel=1e-14)
    for name in feed:  # initial carries, the sequence and the shared weights (summed over steps)
        np.testing.assert_allclose(scanned.grad[name], unrolled.grad[name], rtol=1e-12, atol=1e-12)


def test_scan_gradients_match_finite_differences(local):
    feed = _feed(1, steps=3)
    loss = scan_rnn(3)
    grads = local.evaluate(loss, feed)
    eps = 1e-6
    for name in ("h0", "xs", "Wh"):
        numeric = np.zeros_like(feed[name])
        for index in np.ndindex(feed[name].shape):
            up, down = dict(feed), dict(feed)
            up[name] = feed[name].copy()
            up[name][index] += eps
            down[name] = feed[name].copy()
            down[name][index] -= eps
            numeric[index] = (float(local.evaluate(loss, up, grads="none").value)
                              - float(local.evaluate(loss, down, grads="none").value)) / (2 * eps)
        np.testing.assert_allclose(grads.grad[name], numeric, rtol=1e-6, atol=1e-7)


def test_scan_values_are_named_and_stacked(local):
    loss = scan_rnn()
    result = local.evaluate(loss, _feed(), values="all")
    assert result.values["rnn.2"].shape == (T,)  # per-step outputs stacked on axis 0
    assert result.values["rnn.0"].shape == (B, H)  # the final carry
    assert np.asarray(result.grad["rnn.2"]).shape == (T,)


def test_scan_over_grpc_matches_local(local, client):
    feed = _feed(2)
    over_grpc, here = client.evaluate(scan_rnn(), feed), local.evaluate(scan_rnn(), feed)
    for name in feed:
        np.testing.assert_array_equal(over_grpc.grad[name], here.grad[name])


def test_graph_json_round_trip_keeps_the_body(local):
    from chainrule.client import Graph

    graph = scan_rnn().graph
    again = Graph.from_json(graph.to_json())
    assert again.message == graph.message
    assert '"graph"' in graph.to_json() and '"outputs"' in graph.to_json()


def test_scan_inside_scan(local):
    """The outer scan's body runs an inner scan over a constant sequence; both sum their steps."""
    g = GraphBuilder()
    a0 = g.input("a0", (2,))
    outer_xs = g.input("outer", (3, 2))
    inner_xs = g.input("inner", (4, 2))

    def inner_step(a, x, w):
        return ops.tanh(a * x + w), None

    def outer_step(a, x, inner):
        a_new, _ = ops.scan(inner_step, a, inner, [x])
        return a_new, ops.sum(a_new)

    _, ys = ops.scan(outer_step, a0, outer_xs, [inner_xs])
    loss = ops.sum(ys).named("loss")

    g2 = GraphBuilder()
    a, ox, ix = g2.input("a0", (2,)), g2.input("outer", (3, 2)), g2.input("inner", (4, 2))
    total = None
    for i in range(3):
        for j in range(4):
            a = ops.tanh(a * ix[j] + ox[i])
        total = ops.sum(a) if total is None else total + ops.sum(a)
    rng = np.random.default_rng(3)
    feed = {"a0": rng.standard_normal(2), "outer": rng.standard_normal((3, 2)), "inner": rng.standard_normal((4, 2))}
    nested, flat = local.evaluate(loss, feed), local.evaluate(total, feed)
    assert float(nested.value) == pytest.approx(float(flat.value), rel=1e-13)
    for name in feed:
        np.testing.assert_allclose(nested.grad[name], flat.grad[name], rtol=1e-12, atol=1e-13)


def test_length_without_sequences(local):
    g = GraphBuilder()
    x = g.input("x", (2,))
    final, ys = ops.scan(lambda c, _: (c * 0.5 + 1.0, c), x, length=5)
    result = local.evaluate(ops.sum(final).named("f"), {"x": np.array([1.0, 2.0])})
    np.testing.assert_allclose(result.grad["x"], [0.5 ** 5] * 2)


# --- core-level graphs: errors and budgets ------------------------------------------------------

def _body(op: str = "tanh") -> GraphIR:
    return GraphIR.build([("h", "float64", (2,)), ("x", "float64", (2,))],
                         [("s", "add", ("h", "x")), ("h2", op, ("s",))], ["h2", "h2"])


def _outer(body: GraphIR, steps: int = 4, **attrs) -> GraphIR:
    return GraphIR((InputDecl("h0", "float64", (2,)), InputDecl("xs", "float64", (steps, 2))),
                   (Node("loop", "scan", ("h0", "xs"), {"body": body, "num_carries": 1, "num_sequences": 1, **attrs},
                         ("hT", "ys")), Node("f", "sum", ("ys",))), ("f",))


def test_an_unknown_operator_in_the_body_names_the_body_node():
    with pytest.raises(Exception) as caught:
        compile_graph(_outer(_body("tanhh")), REGISTRY)
    error = caught.value
    assert error.reason == "UNKNOWN_OPERATOR"
    assert "node 'loop' (scan): attribute 'body': node 'h2': unknown operator 'tanhh'" in str(error)
    assert error.field == "graph.nodes[0].attrs.body.nodes[1].op"


def test_a_shape_error_at_run_time_names_the_step_and_the_body_node():
    body = GraphIR.build([("h", "float64", (2,)), ("x", "float64", (-1,))],
                         [("s", "add", ("h", "x"))], ["s", "s"])
    graph = GraphIR((InputDecl("h0", "float64", (2,)), InputDecl("xs", "float64", (4, -1))), _outer(body).nodes, ("f",))
    plan = compile_graph(graph, REGISTRY)
    with pytest.raises(Exception) as caught:  # xs of shape (4, 3): h (2,) + x (3,) fails in the body
        evaluate(plan, {"h0": np.zeros(2), "xs": np.zeros((4, 3))})
    assert caught.value.reason == "SHAPE_MISMATCH"
    assert "node 'loop' (scan)" in str(caught.value) and "node 's' (add)" in str(caught.value)


def test_a_failure_in_one_step_names_that_step():
    body = GraphIR.build([("h", "float64", (2,)), ("x", "int64", (2,))],
                         [("g", "gather", ("h", "x")), ("h2", "add", ("g", "h"))], ["h2", "h2"])
    outer = GraphIR((InputDecl("h0", "float64", (2,)), InputDecl("xs", "int64", (4, 2))),
                    (Node("loop", "scan", ("h0", "xs"), {"body": body, "num_carries": 1, "num_sequences": 1},
                          ("hT", "ys")), Node("f", "sum", ("ys",))), ("f",))
    plan = compile_graph(outer, REGISTRY)
    xs = np.zeros((4, 2), np.int64)
    xs[2] = [0, 9]  # out of range at step 2 only
    with pytest.raises(Exception) as caught:
        evaluate(plan, {"h0": np.ones(2), "xs": xs})
    assert caught.value.reason == "OUT_OF_RANGE"
    assert "node 'loop' (scan): step 2: node 'g' (gather)" in str(caught.value)


def test_reading_the_scan_node_itself_is_refused_naming_its_values():
    graph = GraphIR((InputDecl("h0", "float64", (2,)), InputDecl("xs", "float64", (4, 2))),
                    (*_outer(_body()).nodes[:1], Node("f", "sum", ("loop",))), ("f",))
    with pytest.raises(UnknownNodeError, match=r"'loop' is a node with several values \(hT, ys\)"):
        compile_graph(graph, REGISTRY)


def test_a_scan_node_must_name_each_value():
    graph = GraphIR((InputDecl("h0", "float64", (2,)), InputDecl("xs", "float64", (4, 2))),
                    (Node("loop", "scan", ("h0", "xs"), {"body": _body(), "num_carries": 1, "num_sequences": 1}),),
                    ("loop",))
    with pytest.raises(OutputError, match="produces 2 values; Node.outputs must name each"):
        compile_graph(graph, REGISTRY)


def test_a_carry_that_changes_shape_is_refused_before_running():
    body = GraphIR.build([("h", "float64", (2,)), ("x", "float64", (2,))],
                         [("s", "sum", ("h",))], ["s", "x"])
    with pytest.raises(Exception, match=r"new carry 0\) is float64\[\], but the carry is float64\[2\]"):
        compile_graph(_outer(body), REGISTRY)


def test_graphs_nest_at_most_eight_deep():
    body = _body()
    for _ in range(9):
        body = _outer(body).__class__(
            (InputDecl("h0", "float64", (2,)), InputDecl("xs", "float64", (4, 2))),
            (Node("loop", "scan", ("h0", "xs"), {"body": body, "num_carries": 1, "num_sequences": 1}, ("hT", "ys")),),
            ("hT", "ys"))
    with pytest.raises(BadAttributeError, match="nest more than 8 deep"):
        compile_graph(_outer(body), REGISTRY)


def test_the_memory_budget_counts_every_steps_values_before_the_first_step():
    # The outer values, gradients and workspace (2 x 16,000) take 96,080 bytes and fit; 1000 steps x 4 body
    # values x 16 bytes more do not.
    limits = Limits(max_memory_bytes=120_000)
    plan = compile_graph(_outer(_body(), steps=1000), REGISTRY, limits)
    with pytest.raises(LimitExceeded, match="scan's per-step values") as caught:
        evaluate(plan, {"h0": np.zeros(2), "xs": np.zeros((1000, 2))})
    assert caught.value.requested >= 96_080 + 64_000
    small = compile_graph(_outer(_body(), steps=10), REGISTRY, limits)
    evaluate(small, {"h0": np.zeros(2), "xs": np.zeros((10, 2))})  # fits


def test_the_stop_token_is_checked_at_every_step():
    plan = compile_graph(_outer(_body(), steps=50), REGISTRY)
    calls = []

    class CountingEvent:
        def is_set(self):
            calls.append(1)
            return len(calls) > 3

    token = StopToken(event=CountingEvent())  # type: ignore[arg-type]
    with pytest.raises(Exception) as caught:
        evaluate(plan, {"h0": np.zeros(2), "xs": np.zeros((50, 2))}, token=token)
    assert caught.value.reason == "CANCELLED"
    assert len(calls) <= 5  # stopped within a step of being told, not after 50


def test_the_bodys_values_and_gradients_per_step_when_asked():
    """rnn/h: the body's h at every step, stacked; its gradient at every step equals the unrolled
    graph's gradient of that step's h."""
    feed = _feed(5)
    plan = compile_graph(graph_from_proto(scan_rnn().graph.message), REGISTRY)
    body = plan.attrs[plan.index["rnn.0"]]["body"]
    tanh = next(body.names[k] for k in range(len(body)) if body.ops[k] is not None and body.ops[k].name == "tanh")
    asked = f"rnn/{tanh}"
    scanned = evaluate(plan, feed, inner=[asked])
    unrolled = LocalClient().evaluate(unrolled_rnn(), feed, values="all")
    tanhs = sorted((name for name in unrolled.values if name.startswith("tanh")), key=lambda n: int(n.rsplit("_", 1)[1]))
    assert scanned.inner_values[asked].shape == (T, B, H) and len(tanhs) == T
    for t, name in enumerate(tanhs):
        np.testing.assert_allclose(scanned.inner_values[asked][t], unrolled.values[name], rtol=1e-14)
        np.testing.assert_allclose(scanned.inner_grads[asked][t], unrolled.grad[name], rtol=1e-12, atol=1e-13)


def test_an_unknown_body_value_is_refused_naming_it():
    plan = compile_graph(_outer(_body()), REGISTRY)
    with pytest.raises(OutputError, match="'loop/nope': node 'loop''s graph has no node or input named 'nope'"):
        evaluate(plan, {"h0": np.zeros(2), "xs": np.zeros((4, 2))}, inner=["loop/nope"])
    result = evaluate(plan, {"h0": np.zeros(2), "xs": np.ones((4, 2))}, inner=["loop/s"], wrt=["h0"])
    assert result.inner_values["loop/s"].shape == (4, 2) and result.inner_grads["loop/s"].shape == (4, 2)


@pytest.mark.parametrize("where", ["local", "grpc"])
def test_a_client_asks_for_the_body_values_by_node_slash_name(local, client, where):
    caller = local if where == "local" else client
    g = GraphBuilder()
    h0, xs = g.input("h0", (2,)), g.input("xs", (4, 2))
    final, _ = ops.scan(lambda h, x: ((h + x).tanh(name="h"), None), h0, xs, name="rnn")
    loss = ops.sum(final).named("f")
    feed = {"h0": np.array([0.1, -0.2]), "xs": np.arange(8.0).reshape(4, 2) / 10}
    result = caller.evaluate(loss, feed, values=["rnn/h"], grads=["rnn/h", "h0"])
    h = feed["h0"]
    for t in range(4):
        h = np.tanh(h + feed["xs"][t])
        np.testing.assert_allclose(result.values["rnn/h"][t], h, rtol=1e-15)
    assert result.grad["rnn/h"].shape == (4, 2)
    np.testing.assert_allclose(result.grad["rnn/h"][-1], [1.0, 1.0])  # d sum(h_T) / d h_T
    with pytest.raises(Exception, match="graph has no node or input named 'nope'"):
        caller.evaluate(loss, feed, values=["rnn/nope"])
