"""Plans of float64 scalars run on Python floats (OpDef.scalar): the same answers as numpy, faster."""
from __future__ import annotations

import math
import types

import numpy as np
import pytest

from chainrule.core import GraphIR, Registry, compile_graph, evaluate
from chainrule.core.errors import OperatorFailure
from chainrule.plugins import OperatorSet, same_as_input
from chainrule.plugins.manager import load_plugins

from reference import evaluate as reference


def counted(calls: dict, scalar_result=float):
    """``test.twice``: 2x, counting which rules ran (numpy's or the float ones)."""
    ops = OperatorSet()

    @ops.operator("test.twice", infer=same_as_input)
    def twice(x):
        calls["array"] = calls.get("array", 0) + 1
        return 2 * x

    @twice.vjp
    def _(g, out, x):
        return (2 * g,)

    def twice_float(x):
        calls["float"] = calls.get("float", 0) + 1
        return scalar_result(2 * x)

    draft_scalar = (twice_float, lambda g, out, x: (2.0 * g,))
    loaded = load_plugins(entry_points=False, only=["builtin", "test"],
                          extra=[("test", types.SimpleNamespace(register_operators=ops.hookimpl()))])
    registry = Registry([op if op.name != "test.twice" else _with_scalar(op, draft_scalar)
                         for op in loaded.registry])
    calls.clear()  # loading ran the operator once (the load-time check of a plugin's rules)
    return registry


def _with_scalar(op, scalar):
    from dataclasses import replace

    return replace(op, scalar=scalar)


def chain(shape=()):
    return GraphIR.build(
        [("x", "float64", shape), ("a", "float64", shape)],
        [("p", "mul", ("x", "a")), ("q", "add", ("p", "x")), ("r", "div", ("q", "a")), ("s", "sub", ("r", "p")),
         ("t", "test.twice", ("s",)), ("u", "maximum", ("t", "x")), ("v", "neg", ("u",))],
        "v",
    )


def test_a_scalar_plan_runs_on_floats_with_numpys_answers_bit_for_bit():
    calls: dict = {}
    registry = counted(calls)
    inputs = {"x": np.float64(1.25), "a": np.float64(-0.375)}
    floats = evaluate(compile_graph(chain(), registry), inputs)
    assert calls == {"float": 1}  # the float rule ran, numpy's did not
    arrays = evaluate(compile_graph(chain((1,)), registry), {k: np.array([v]) for k, v in inputs.items()})
    assert calls == {"float": 1, "array": 1}
    for k, name in enumerate(floats.plan.names):
        assert type(floats.values[k]) is float and type(floats.grads[k]) is float, name  # no boxing per slot
        assert floats.values[k] == arrays.values[k][0], name  # + - * / and max: IEEE, the same bits
        assert floats.grads[k] == arrays.grads[k][0], name
    values, grads = reference(chain(), registry, inputs)
    assert float(floats.output_value) == float(values["v"]) and floats.grad("a") == grads["a"]


def test_where_numpy_gives_inf_the_run_is_redone_with_numpy():
    registry = load_plugins(entry_points=False, only=["builtin"]).registry
    graph = GraphIR.build([("x", "float64", ()), ("y", "float64", ())], [("q", "div", ("x", "y"))], "q")
    ev = evaluate(compile_graph(graph, registry), {"x": np.float64(1.0), "y": np.float64(0.0)})
    assert ev.output_value == math.inf and ev.grad("x") == math.inf and ev.grad("y") == -math.inf


def test_a_float_rule_that_breaks_its_contract_names_the_operator():
    registry = counted({}, scalar_result=lambda v: np.float64(v))  # not a Python float
    with pytest.raises(OperatorFailure, match=r"node 't' \(test.twice\).*scalar forward returned float64"):
        evaluate(compile_graph(chain(), registry), {"x": np.float64(1.0), "a": np.float64(2.0)})


def test_an_operator_without_float_rules_keeps_the_plan_on_numpy():
    calls: dict = {}
    registry = counted(calls)
    registry = Registry([_with_scalar(op, None) if op.name == "test.twice" else op for op in registry])
    evaluate(compile_graph(chain(), registry), {"x": np.float64(1.0), "a": np.float64(2.0)})
    assert calls == {"array": 1}
