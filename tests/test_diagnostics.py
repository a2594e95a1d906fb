"""Diagnostics in every response, through a real server and the client (and LocalClient where it helps).

Non-finite origins with their operator and inputs, per-parameter gradient
norms, and the VANISHING / EXPLODING / SATURATED flags at the right nodes;
a healthy network raises none.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from chainrule.client import GraphBuilder, ops
from chainrule.server import LocalClient
from chainrule.core import compile_graph, evaluate
from chainrule.core.diagnostics import (
    DEFAULT_THRESHOLDS, SATURATION_SAMPLE, Thresholds, diagnose, summarize,
)
from chainrule.server.cli import main as cli_main


def flagged(result, kind: str) -> set[str]:
    return {f.node for f in result.diagnostics.flags if f.kind == kind}


# --- where values and gradients stop being finite ---------------------------------------------------

def log_of_negative():
    g = GraphBuilder()
    x = g.input("x")
    d = (x - 5).named("d")
    return (d.log(name="l") * 2 + x).named("f")


def test_log_of_x_minus_5_names_the_log_node_as_the_nan_origin(client):
    r = client.evaluate(log_of_negative(), x=1.0)
    d = r.diagnostics
    assert np.isnan(r.value) and not d.finite
    origin = d.first_nonfinite_value
    assert (origin.node, origin.op, origin.count) == ("l", "log", 1)
    assert origin.inputs_summary == "d = -4"
    assert d.first_nonfinite_gradient is None   # d/dx = 2/(x-5) + 1 = 0.5 stays finite
    assert math.isclose(float(r.grad["x"]), 0.5)
    text = str(d)
    assert "first non-finite value: 'l' (log): 1 non-finite element(s)" in text
    assert "its inputs: d = -4" in text


def test_tensor_nan_origin_summarizes_its_inputs(client):
    g = GraphBuilder()
    x = g.input("x", (4,))
    f = (x - 5).named("d").sqrt(name="s").sum(name="f")
    r = client.evaluate(f, x=np.array([9.0, 6.0, 1.0, 2.0]))
    origin = r.diagnostics.first_nonfinite_value
    assert (origin.node, origin.op, origin.count) == ("s", "sqrt", 2)
    assert origin.inputs_summary == "d = float64[4] min -4 max 4 mean -0.5 norm 6.481"


def test_non_finite_gradient_names_the_rule_that_sent_it(client):
    g = GraphBuilder()
    x, w = g.input("x"), g.input("w")
    f = (x.sqrt(name="s") * w).named("f")
    r = client.evaluate(f, x=0.0, w=3.0)
    d = r.diagnostics
    assert d.first_nonfinite_value is None
    origin = d.first_nonfinite_gradient
    assert (origin.node, origin.op, origin.count) == ("x", "input", 1)
    assert origin.consumers_summary == "sqrt 's' (value 0, gradient 3)"
    assert "sent back by: sqrt 's'" in str(d)
    assert flagged(r, "EXPLODING") == {"x"}   # an infinite gradient norm
    assert math.isinf(d.grad_norms["x"].grad_norm)


def test_first_non_finite_value_is_first_in_evaluation_order(client):
    g = GraphBuilder()
    x = g.input("x")
    a = (x - 2).named("a").log(name="la")      # log(-1): NaN, evaluated first
    b = (x - 3).named("b").log(name="lb")      # log(-2): NaN too, later
    r = client.evaluate((a + b).named("f"), x=1.0, values="all")
    assert {n for n in r.values if np.isnan(r.values[n])} == {"la", "lb", "f"}
    assert r.diagnostics.first_nonfinite_value.node == "la"


# --- gradient norms and flags -------------------------------------------------------------------------

def sigmoid_stack(depth: int):
    g = GraphBuilder()
    h = g.input("x")
    for i in range(depth):
        h = (g.input(f"w{i}") * h).named(f"z{i}").sigmoid(name=f"h{i}")
    return h


def stack_by_hand(depth: int, x: float, w: list[float]) -> dict[str, float]:
    """d h_last / d w_i and d/dx for h_i = σ(w_i h_{i-1}), backpropagated by hand."""
    h = [x]
    for i in range(depth):
        h.append(1 / (1 + math.exp(-w[i] * h[-1])))
    grads, upstream = {}, 1.0
    for i in range(depth - 1, -1, -1):
        dz = upstream * h[i + 1] * (1 - h[i + 1])
        grads[f"w{i}"] = dz * h[i]
        upstream = dz * w[i]
    grads["x"] = upstream
    return grads


def test_deep_sigmoid_stack_is_flagged_vanishing_at_the_early_parameters(client):
    depth = 20
    w = [1.0] * depth
    r = client.evaluate(sigmoid_stack(depth), {"x": 1.0, **{f"w{i}": w[i] for i in range(depth)}})
    expected = stack_by_hand(depth, 1.0, w)
    norms = r.diagnostics.grad_norms
    for name, grad in expected.items():
        assert math.isclose(norms[name].grad_norm, abs(grad), rel_tol=1e-9), name
        assert norms[name].value_norm == 1.0
    should = {n for n, grad in expected.items() if abs(grad) < DEFAULT_THRESHOLDS.vanishing}
    assert flagged(r, "VANISHING") == should
    # the early layers, and only they: a prefix of the stack
    assert {"x", "w0", "w5"} <= should and not {"w15", "w19"} & should
    assert should - {"x"} == {f"w{i}" for i in range(len(should) - 1)}
    assert not flagged(r, "EXPLODING") and not flagged(r, "SATURATED")
    flag = next(f for f in r.diagnostics.flags if f.node == "w0")
    assert "below 1e-06" in flag.message
    assert "VANISHING at 'w0'" in str(r.diagnostics)


def test_vanishing_is_relative_to_the_value_norm():
    g = GraphBuilder()
    w, v = g.input("w"), g.input("v")
    local = LocalClient()
    r = local.evaluate(w * 1e-8 + v * 1e-8, w=1000.0, v=0.001)   # both gradients 1e-8, below 1e-6 * max(|.|, 1)
    assert flagged(r, "VANISHING") == {"w", "v"}
    r = local.evaluate(w * 1e-4 + v * 1e-4, w=1000.0, v=0.0)     # same gradients: 1e-4 < 1e-6 * 1000, not < 1e-6 * 1
    assert flagged(r, "VANISHING") == {"w"}
    r = local.evaluate(w * 1e-2 + v * 1e-4, w=1000.0, v=0.0)     # 1e-2 < 1e-6 * 1000 is false
    assert flagged(r, "VANISHING") == set()


def test_exploding_gradient_is_flagged(client):
    g = GraphBuilder()
    w, b = g.input("w"), g.input("b")
    f = ((w * 20).exp(name="e") + b).named("f")
    r = client.evaluate(f, w=1.0, b=0.5)
    assert math.isclose(r.diagnostics.grad_norms["w"].grad_norm, 20 * math.exp(20), rel_tol=1e-12)
    assert flagged(r, "EXPLODING") == {"w"} and not flagged(r, "VANISHING")


def test_saturated_sigmoid_and_tanh_units(client):
    g = GraphBuilder()
    z = g.input("z", (4,))
    s = z.sigmoid(name="s")
    t = z.tanh(name="t")
    m = (z * 0.01).named("small").sigmoid(name="m")
    f = (s.sum() + t.sum() + m.sum()).named("f")
    r = client.evaluate(f, z=np.array([50.0, -60.0, 70.0, 0.1]))   # 3 of 4 elements saturated
    assert flagged(r, "SATURATED") == {"s", "t"}
    message = next(fl.message for fl in r.diagnostics.flags if fl.node == "s")
    assert message.startswith("sigmoid: 75% of its 4 elements")
    r = client.evaluate(f, z=np.array([50.0, 0.2, -0.3, 0.1]))      # 1 of 4: below the 50% default
    assert flagged(r, "SATURATED") == set()


def test_saturation_of_large_tensors_is_estimated_from_a_sample():
    n = 16 * SATURATION_SAMPLE
    g = GraphBuilder()
    z = g.input("z", (n,))
    f = z.sigmoid(name="s").sum(name="f")
    local = LocalClient()
    z_val = np.zeros(n)
    for share, expected in ((0.7, {"s"}), (0.3, set()), (0.55, {"s"}), (0.45, set())):
        z_val[:] = 0.0
        z_val[: int(share * n)] = 40.0  # one saturated block: one run in each 64th of the tensor sees it fairly
        assert flagged(local.evaluate(f, z=z_val), "SATURATED") == expected, share
    # a column layout does not fool the sample: every 4th element saturated (25%), then 3 of 4 (75%)
    z_val = np.zeros((n // 4, 4))
    z_val[:, 0] = 40.0
    g = GraphBuilder()
    z2 = g.input("z", (n // 4, 4))
    f2 = z2.sigmoid(name="s").sum(name="f")
    assert flagged(local.evaluate(f2, z=z_val), "SATURATED") == set()
    z_val[:, 1:] = -40.0
    assert flagged(local.evaluate(f2, z=z_val), "SATURATED") == {"s"}


def test_saturation_up_to_the_sample_size_is_counted_exactly():
    n = SATURATION_SAMPLE
    g = GraphBuilder()
    z = g.input("z", (n,))
    f = z.tanh(name="t").sum(name="f")
    z_val = np.zeros(n)
    z_val[n // 2 - 1:] = 40.0  # one element over half, all at the end
    assert flagged(LocalClient().evaluate(f, z=z_val), "SATURATED") == {"t"}
    z_val[n // 2 - 1] = 0.0  # exactly half: the default threshold is "at least 50%"
    assert flagged(LocalClient().evaluate(f, z=z_val), "SATURATED") == {"t"}
    z_val[n // 2] = 0.0
    assert flagged(LocalClient().evaluate(f, z=z_val), "SATURATED") == set()


def test_norms_beyond_the_range_of_their_squares_are_exact():
    """Squares of 1e160 overflow and of 1e-150 fall into the subnormals; the norms and the flags must not."""
    g = GraphBuilder()
    x, w = g.input("x", (3,)), g.input("w", (3,))
    f = (x * w).sum(name="f")
    r = LocalClient().evaluate(f, x=np.full(3, 1e160), w=np.full(3, 1e-150))
    norms = r.diagnostics.grad_norms
    assert math.isclose(norms["w"].grad_norm, math.sqrt(3) * 1e160, rel_tol=1e-12)  # dF/dw = x
    assert math.isclose(norms["x"].grad_norm, math.sqrt(3) * 1e-150, rel_tol=1e-12)  # dF/dx = w
    assert math.isclose(norms["x"].value_norm, math.sqrt(3) * 1e160, rel_tol=1e-12)
    assert math.isclose(norms["w"].value_norm, math.sqrt(3) * 1e-150, rel_tol=1e-12)
    assert flagged(r, "EXPLODING") == {"w"} and flagged(r, "VANISHING") == {"x"}
    assert r.diagnostics.finite


def test_unreached_input_is_not_flagged_but_a_dead_relu_is(client):
    g = GraphBuilder()
    w = g.input("w")
    g.input("unused")   # declared, fed, but the output does not depend on it
    f = (w * -1.0).relu(name="r")
    r = client.evaluate(g.build([f]), w=2.0, unused=5.0)  # the whole graph: a Var would leave `unused` out
    norms = r.diagnostics.grad_norms
    assert norms["unused"].grad_norm == 0.0 and norms["w"].grad_norm == 0.0
    assert flagged(r, "VANISHING") == {"w"}   # reaches the output, yet gets nothing: a dead unit


def test_healthy_network_raises_no_flag(client):
    rng = np.random.default_rng(0)
    g = GraphBuilder()
    X, Y = g.input("X", (8, 4)), g.input("Y", (8, 1))
    W1, b1 = g.input("W1", (4, 16)), g.input("b1", (16,))
    W2, b2 = g.input("W2", (16, 1)), g.input("b2", (1,))
    hidden = (X @ W1 + b1).tanh(name="hidden")
    pred = (hidden @ W2 + b2).sigmoid(name="pred")
    loss = ops.mean((pred - Y) ** 2, name="loss")
    r = client.evaluate(loss, X=rng.standard_normal((8, 4)), Y=rng.integers(0, 2, (8, 1)).astype(float),
                        W1=rng.standard_normal((4, 16)) * 0.5, b1=np.zeros(16),
                        W2=rng.standard_normal((16, 1)) * 0.25, b2=np.zeros(1), values="all")
    d = r.diagnostics
    assert d.finite and d.flags == []
    assert set(d.grad_norms) == {"X", "Y", "W1", "b1", "W2", "b2"}
    for name, norm in d.grad_norms.items():
        assert math.isclose(norm.grad_norm, float(np.linalg.norm(r.grad[name])), rel_tol=1e-12), name
        assert math.isclose(norm.value_norm, float(np.linalg.norm(r.values[name])), rel_tol=1e-12), name
    assert str(d).startswith("all values and gradients are finite\ngradient norms:")


def test_forward_only_still_reports_values_and_saturation(client):
    g = GraphBuilder()
    x = g.input("x")
    f = (x * 100).named("z").tanh(name="t")
    r = client.evaluate(f, x=1.0, grads="none")
    assert r.diagnostics.grad_norms == {} and flagged(r, "SATURATED") == {"t"}
    assert r.diagnostics.flags[0].message.startswith("tanh: its value 1 sits where the local gradient 1-tanh²")


def test_local_and_remote_diagnostics_are_identical(client):
    f = log_of_negative()
    remote, here = client.evaluate(f, x=1.0), LocalClient().evaluate(f, x=1.0)
    assert remote.response.diagnostics == here.response.diagnostics


@pytest.mark.parametrize("where", ["server", "local"])
def test_diagnostics_can_be_turned_off_per_call(client, where):
    """diagnostics=False: the same values and gradients, no diagnostics in the response (not an
    empty report, which would claim all is finite); a diagnosed healthy call carries an empty one."""
    caller = client if where == "server" else LocalClient()
    f = log_of_negative()
    full, bare = caller.evaluate(f, x=1.0), caller.evaluate(f, x=1.0, diagnostics=False)
    assert full.diagnostics.first_nonfinite_value.node == "l"
    assert bare.diagnostics is None and not bare.response.HasField("diagnostics")
    assert np.isnan(bare.value) and set(bare.grad) == set(full.grad)
    for name in full.grad:
        np.testing.assert_array_equal(bare.grad[name], full.grad[name])
    healthy = caller.evaluate(f, x=7.0)
    assert healthy.response.HasField("diagnostics") and healthy.diagnostics.finite
    assert "first non-finite" not in bare.to_dot()  # diagrams draw without diagnostics
    many = caller.evaluate_many(f, [{"x": 1.0}, {"x": 7.0}], diagnostics=False)
    assert [r.diagnostics for r in many] == [None, None]
    assert not any(r.response.HasField("diagnostics") for r in many)
    assert caller.evaluate_many(f, [{"x": 1.0}])[0].diagnostics.first_nonfinite_value.node == "l"


# --- the core function: thresholds, summaries, overflow ---------------------------------------------

def plan_for(var, registry):
    from chainrule.wire.convert import graph_from_proto

    return compile_graph(graph_from_proto(var.graph.message), registry)


def test_thresholds_are_parameters(registry):
    plan = plan_for(sigmoid_stack(4), registry)
    evaluation = evaluate(plan, {"x": np.array(1.0), **{f"w{i}": np.array(1.0) for i in range(4)}})
    assert not diagnose(evaluation).flags
    strict = diagnose(evaluation, Thresholds(vanishing=0.02))
    assert {f.node for f in strict.flags} == {"x", "w0", "w1"}   # 0.0022, 0.0022, 0.008 < 0.02 < 0.034, 0.15
    loose = diagnose(evaluation, Thresholds(saturated_fraction=0.0, saturated_local_grad=1.0))
    assert {f.node for f in loose.flags if f.kind == "SATURATED"} == {"h0", "h1", "h2", "h3"}


def test_overflowing_sums_of_finite_values_are_not_reported(registry):
    g = GraphBuilder()
    x = g.input("x", (2,))
    f = (x * 1.0).named("y").sum(name="f")
    plan = plan_for(f, registry)
    evaluation = evaluate(plan, {"x": np.array([1.5e308, 1.5e308])})   # sum overflows; every element is finite
    d = diagnose(evaluation)
    assert d.first_nonfinite_value.node == "f"    # only the sum itself is infinite
    assert d.first_nonfinite_gradient is None


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_large_tensors_are_probed_exactly(registry, dtype):
    """Large contiguous tensors are probed by a dot product: a NaN anywhere is found, and
    squares that overflow (1e200² here) are rechecked rather than reported."""
    g = GraphBuilder()
    x = g.input("x", (100, 100), dtype=dtype)
    f = (x * 1.0).named("y").log(name="l").sum(name="f")
    plan = plan_for(f, registry)
    big = np.full((100, 100), 1e200 if dtype == "float64" else 1e30, dtype=dtype)
    healthy = diagnose(evaluate(plan, {"x": big}))   # y's squares overflow; every element is finite
    assert healthy.first_nonfinite_value is None and healthy.first_nonfinite_gradient is None
    poisoned = np.ones((100, 100), dtype=dtype)
    poisoned[63, 17] = -1.0
    origin = diagnose(evaluate(plan, {"x": poisoned})).first_nonfinite_value
    assert (origin.node, origin.count) == ("l", 1)


def test_memory_shared_by_several_slots_is_read_once_and_still_judged(registry):
    """`x + c` hands x the very gradient array it got, and a reshape's value is a view of
    its input: diagnostics read such memory once, and an infinity in it is still found."""
    g = GraphBuilder()
    x = g.input("x", (64, 128))
    c = g.input("c")
    y = (x + c).named("y")
    f = y.reshape((128, 64), name="r").log(name="l").sum(name="f")
    plan = plan_for(f, registry)
    x_val = np.ones((64, 128))
    x_val[5, 7] = 0.0
    evaluation = evaluate(plan, {"x": x_val, "c": np.float64(0.0)})
    assert evaluation.grad("x") is evaluation.grad("y")
    assert np.shares_memory(evaluation.value("r"), evaluation.value("y"))
    d = diagnose(evaluation)
    assert (d.first_nonfinite_value.node, d.first_nonfinite_value.count) == ("l", 1)
    assert (d.first_nonfinite_gradient.node, d.first_nonfinite_gradient.count) == ("r", 1)  # 1/0 from log's rule


def test_summaries():
    assert summarize(np.float64(-4.0)) == "-4"
    assert summarize(np.array([[1.0, np.nan], [3.0, -1.0]])) == (
        "float64[2, 2] min -1 max 3 mean 1 norm 3.317 (1 non-finite)")
    assert summarize(np.array([2], dtype=np.int64)) == "int64[1] 2"


# --- the command line -----------------------------------------------------------------------------

def test_chainrule_eval_prints_the_diagnostics(address, tmp_path, capsys):
    path = tmp_path / "nan.json"
    log_of_negative().graph.save(path)
    assert cli_main(["eval", str(path), "--input", "x=1", "--server", address]) == 0
    out = capsys.readouterr().out
    assert "first non-finite value: 'l' (log): 1 non-finite element(s)" in out
    assert "its inputs: d = -4" in out
    assert "gradient norms:" in out


def test_chainrule_eval_can_skip_the_diagnostics(address, tmp_path, capsys):
    path = tmp_path / "nan.json"
    log_of_negative().graph.save(path)
    assert cli_main(["eval", str(path), "--input", "x=1", "--server", address, "--no-diagnostics"]) == 0
    out = capsys.readouterr().out
    assert "= nan" in out and "non-finite" not in out and "gradient norms" not in out and "None" not in out
