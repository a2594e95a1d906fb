"""Residuals (OpDef.residuals): a forward rule hands values to its vjp (issue 17).

The engine passes ``saved`` to the vjp, keeps it only while a backward pass
will follow, counts it in the memory budget, and drops it once the vjp ran;
a rule that breaks the form is named. The built-ins that use them (layer_norm,
log_softmax) give the recomputing rules' answers.
"""
from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

from chainrule.core import GraphIR, Limits, OpDef, Registry, TensorSpec, compile_graph, evaluate
from chainrule.core.errors import InvalidOperatorError, LimitExceeded, OperatorFailure
from chainrule.core.operator import rule_signature_problem
from chainrule.plugins.manager import load_registry

BUILTIN = load_registry(entry_points=False)


class Box(np.ndarray):
    """An ndarray that can be weakly referenced, to see when the engine lets go of it."""


def _square_with_residual(seen: dict) -> OpDef:
    def forward(x):
        twice = (2 * np.asarray(x)).view(Box)  # what the vjp needs: 2x
        seen["saved"] = weakref.ref(twice)
        return x * x, twice

    def vjp(g, out, x, *, saved):
        seen["vjp saw"] = saved is seen["saved"]()
        return (g * saved,)

    return OpDef("t.square", 1, forward, vjp, lambda x: TensorSpec(x.shape, x.dtype), residuals=True)


def _graph(n: int = 4) -> GraphIR:
    return GraphIR.build([("x", "float64", (n,))], [("s", "t.square", ("x",)), ("f", "sum", ("s",))], "f")


def _registry(*ops: OpDef) -> Registry:
    return Registry([*BUILTIN, *ops])


def test_the_vjp_gets_what_forward_saved_and_the_gradient_is_right():
    seen: dict = {}
    plan = compile_graph(_graph(), _registry(_square_with_residual(seen)))
    x = np.array([1.0, -2.0, 3.0, 0.5])
    result = evaluate(plan, {"x": x})
    assert seen["vjp saw"] is True
    np.testing.assert_array_equal(result.grad("x"), 2 * x)


def test_residuals_are_dropped_once_the_vjp_ran():
    seen: dict = {}
    plan = compile_graph(_graph(), _registry(_square_with_residual(seen)))
    result = evaluate(plan, {"x": np.ones(4)})
    gc.collect()
    assert seen["saved"]() is None  # nothing keeps it: not the evaluation, not the plan
    assert result.grad("x") is not None


def test_without_a_backward_pass_residuals_are_not_kept_or_charged():
    seen: dict = {}
    op = _square_with_residual(seen)
    # values take 64 + 64 + 8 bytes and the workspace 2 x 64 (264 in all); the residual would take 64 more
    limits = Limits(max_memory_bytes=300)
    plan = compile_graph(_graph(8), _registry(op), limits)
    result = evaluate(plan, {"x": np.ones(8)}, gradients=False)  # fits: nothing kept
    assert result.grads is None
    gc.collect()
    assert seen["saved"]() is None


def test_residuals_count_in_the_memory_budget_before_any_work():
    seen: dict = {}
    op = _square_with_residual(seen)
    # values 8000 + 8000 + 8, gradients as much and the workspace (2 x 8000) fit in 48,100 bytes; the
    # residual's 8,000 more (estimated as large as the node's value) do not: refused before the forward pass
    limits = Limits(max_memory_bytes=48_100)
    plan = compile_graph(_graph(1000), _registry(op), limits)
    with pytest.raises(LimitExceeded, match="values, gradients and residuals") as caught:
        evaluate(plan, {"x": np.ones(1000)})
    assert caught.value.requested == 48_016 + 8_000
    assert "saved" not in seen  # the forward rule never ran


def test_residuals_larger_than_their_estimate_are_charged_as_they_appear():
    seen: dict = {}

    def forward(x):
        kept = np.concatenate([x, x, x])  # three times the node's value
        seen["ran"] = True
        return x * x, kept

    op = OpDef("t.hoard", 1, forward, lambda g, out, x, *, saved: (g * 2 * saved[:x.size],),
               lambda x: TensorSpec(x.shape, x.dtype), residuals=True)
    graph = GraphIR.build([("x", "float64", (1000,))], [("s", "t.hoard", ("x",)), ("f", "sum", ("s",))], "f")
    # values, gradients and workspace 48,016 bytes, the estimate 8,000 more: fits in 57,000; the other 16,000 do not
    plan = compile_graph(graph, _registry(op), Limits(max_memory_bytes=57_000))
    with pytest.raises(LimitExceeded, match="values, gradients and residuals") as caught:
        evaluate(plan, {"x": np.ones(1000)})
    assert seen["ran"] and caught.value.node == "s" and caught.value.requested == 48_016 + 24_000


def test_a_forward_rule_that_forgets_its_residuals_is_named():
    op = OpDef("t.bad", 1, lambda x: x * x, lambda g, out, x, *, saved: (g,),
               lambda x: TensorSpec(x.shape, x.dtype), residuals=True)
    graph = GraphIR.build([("x", "float64", (3,))], [("b", "t.bad", ("x",)), ("f", "sum", ("b",))], "f")
    with pytest.raises(OperatorFailure, match=r"node 'b' \(t.bad\): forward returned ndarray, expected \(result, saved\)"):
        evaluate(compile_graph(graph, _registry(op)), {"x": np.ones(3)})


def test_a_vjp_without_saved_is_refused_at_load():
    op = OpDef("t.nosaved", 1, lambda x: (x, None), lambda g, out, x: (g,), residuals=True)
    assert "does not accept the declared keyword 'saved'" in rule_signature_problem(op)


def test_residuals_and_float_rules_do_not_mix():
    op = OpDef("t.mixed", 1, lambda x: (x, None), lambda g, out, x, *, saved: (g,), residuals=True,
               scalar=(float, lambda g, out, x: (g,)))
    with pytest.raises(InvalidOperatorError, match="scalar rules are for one output without residuals"):
        Registry([op])


@pytest.mark.parametrize("name, attrs", [("layer_norm", {"axis": 1}), ("log_softmax", {"axis": 0})])
def test_builtins_with_residuals_match_finite_differences_through_the_engine(name, attrs):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 4))
    if name == "layer_norm":
        inputs = [("x", (3, 4)), ("s", (4,)), ("b", (4,))]
        feed = {"x": x, "s": rng.standard_normal(4), "b": rng.standard_normal(4)}
    else:
        inputs = [("x", (3, 4))]
        feed = {"x": x}
    feed["w"] = rng.standard_normal((3, 4))
    graph = GraphIR.build([(n, "float64", s) for n, s in inputs] + [("w", "float64", (3, 4))],
                          [("y", name, tuple(n for n, _ in inputs), attrs), ("m", "mul", ("y", "w")),
                           ("f", "sum", ("m",))], "f")
    plan = compile_graph(graph, BUILTIN)
    result = evaluate(plan, feed)
    eps = 1e-6
    for key in (n for n, _ in inputs):
        numeric = np.zeros_like(feed[key])
        for index in np.ndindex(feed[key].shape):
            up, down = dict(feed), dict(feed)
            up[key], down[key] = feed[key].copy(), feed[key].copy()
            up[key][index] += eps
            down[key][index] -= eps
            numeric[index] = (float(evaluate(plan, up, gradients=False).output_value)
                              - float(evaluate(plan, down, gradients=False).output_value)) / (2 * eps)
        np.testing.assert_allclose(result.grad(key), numeric, rtol=1e-6, atol=1e-8)
