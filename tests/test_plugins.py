"""Plugin loading through pluggy: registration, conflicts, failures, filters."""
from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest

from chainrule.core import Attr, OpDef, compile_graph, evaluate
from chainrule.core.errors import InvalidOperatorError, PluginError
from chainrule.plugins import OperatorSet, hookimpl, same_as_input
from chainrule.plugins.manager import load_plugins

from helpers import scalar_graph


def plugin_with(*ops: OpDef) -> types.SimpleNamespace:
    @hookimpl
    def register_operators(register):
        for op in ops:
            register(op)

    return types.SimpleNamespace(register_operators=register_operators)


def cube_set() -> OperatorSet:
    ops = OperatorSet()

    @ops.operator("test.cube", infer=same_as_input, scale=1.0)
    def cube(x, *, scale):
        """scale * x^3."""
        return scale * x ** 3

    @cube.vjp
    def _(g, out, x, *, scale):
        return (g * 3 * scale * x ** 2,)

    return ops


def test_a_plugin_operator_is_usable_end_to_end():
    loaded = load_plugins(entry_points=False, only=["builtin", "test"], extra=[("test", types.SimpleNamespace(register_operators=cube_set().hookimpl()))])
    op = loaded.registry["test.cube"]
    assert op.plugin == "test" and op.arity == 1 and op.doc == "scale * x^3."
    assert op.attrs["scale"] == Attr("float", 1.0)
    plan = compile_graph(scalar_graph(["x"], [("c", "test.cube", ("x",), {"scale": 2.0})], "c"), loaded.registry)
    ev = evaluate(plan, {"x": np.float64(3.0)})
    assert ev.output_value == 54.0 and ev.grad("x") == 54.0
    assert "test" in [p.name for p in loaded.plugins]


def test_two_plugins_registering_one_name_fail_naming_both():
    first = types.SimpleNamespace(register_operators=cube_set().hookimpl())
    second = types.SimpleNamespace(register_operators=cube_set().hookimpl())
    loaded = load_plugins(entry_points=False, only=["test"], extra=[("test.one", first), ("test.two", second)])
    (broken,) = loaded.broken  # the second is left out, the first keeps its operators
    assert broken.name == "test.two" and "'test.cube'" in broken.message and "'test.one'" in broken.message
    assert "--prefer test.one or --prefer test.two" in broken.message
    assert loaded.registry["test.cube"].plugin == "test.one"
    with pytest.raises(PluginError, match="'test.cube'"):
        loaded.raise_for_problems()
    loaded = load_plugins(entry_points=False, only=["test"], prefer=["test.two"], extra=[("test.one", first), ("test.two", second)])
    assert loaded.registry["test.cube"].plugin == "test.two" and not loaded.broken


def test_a_builtin_name_clash_is_reported():
    clash = plugin_with(OpDef("add", 2, np.add, lambda g, out, x, y: (g, g)))
    loaded = load_plugins(entry_points=False, extra=[("mine", clash)])
    assert loaded.registry["add"].plugin == "builtin.arith"   # a bare name is refused: it needs the prefix
    assert "prefix your operator names with 'mine.' ('mine.add')" in loaded.broken[0].message


def test_a_plugin_that_raises_while_registering_is_named():
    @hookimpl
    def register_operators(register):
        raise RuntimeError("database unreachable")

    with pytest.raises(PluginError, match=r"plugin 'broken' \(no distribution\) was not loaded: raised while registering operators: RuntimeError: database unreachable"):
        load_plugins(entry_points=False, only=["broken"], extra=[("broken", types.SimpleNamespace(register_operators=register_operators))]).raise_for_problems()


@pytest.mark.parametrize(
    "op, message",
    [
        (OpDef("test.novjp", 1, np.negative, None), "operator 'test.novjp': has no vjp"),  # type: ignore[arg-type]
        (OpDef("test.badattr", 1, np.negative, lambda g, o, x: (-g,), attrs={"k": Attr("complex", 1)}), "attribute 'k' has kind 'complex'"),
        (OpDef("test.baddefault", 1, np.negative, lambda g, o, x: (-g,), attrs={"k": Attr("int", "seven")}), "default of attribute 'k'"),
        (OpDef("9bad name", 1, np.negative, lambda g, o, x: (-g,)), "invalid operator name"),
        (OpDef("test.arity", -5, np.negative, lambda g, o, x: (-g,)), "arity must be"),
    ],
)
def test_invalid_operators_are_refused_naming_plugin_and_reason(op, message):
    with pytest.raises(PluginError, match="plugin 'test'") as info:
        load_plugins(entry_points=False, only=["test"], extra=[("test", plugin_with(op))]).raise_for_problems()
    assert message in info.value.message


def test_a_hook_with_a_wrong_signature_is_refused():
    @hookimpl
    def register_operators(register, extra_argument):
        pass

    with pytest.raises(PluginError, match="plugin 'odd'"):
        load_plugins(entry_points=False, only=["odd"], extra=[("odd", types.SimpleNamespace(register_operators=register_operators))]).raise_for_problems()


def test_environment_filters(monkeypatch):
    monkeypatch.setenv("CHAINRULE_PLUGINS", "builtin.arith")
    names = load_plugins(entry_points=False).registry.names()
    assert "add" in names and "exp" not in names
    monkeypatch.setenv("CHAINRULE_PLUGINS", "builtin")
    monkeypatch.setenv("CHAINRULE_DISABLE_PLUGINS", "builtin.nn")
    names = load_plugins(entry_points=False).registry.names()
    assert "exp" in names and "softmax" not in names


# --- OperatorSet keywords: OpDef fields are fields, never attributes ------------------------------

def test_operator_set_gradcheck_and_selective_vjp_set_the_opdef_fields():
    """``gradcheck=False`` once declared a bool attribute named gradcheck and left the check on."""
    from chainrule.plugins.checking import check_op

    ops = OperatorSet()

    @ops.operator("test.straight_through", infer=same_as_input, gradcheck=False)
    def straight_through(x):
        """round(x), with the identity as its gradient."""
        return np.round(x)

    @straight_through.vjp
    def _(g, out, x):
        return (g,)

    seen = []

    @ops.operator("test.scaled", infer=same_as_input, selective_vjp=True, scale=2.0)
    def scaled(x, *, scale):
        """scale * x."""
        return scale * x

    @scaled.vjp
    def _(g, out, x, *, scale, needs):
        seen.append(needs)
        return (g * scale if needs[0] else None,)

    loaded = load_plugins(entry_points=False, only=["builtin", "test"],
                          extra=[("test", types.SimpleNamespace(register_operators=ops.hookimpl()))])
    st, sc = loaded.registry["test.straight_through"], loaded.registry["test.scaled"]
    assert st.attrs == {} and st.gradcheck is False and st.selective_vjp is False
    assert not check_op(st).checked
    assert sc.attrs == {"scale": Attr("float", 2.0)} and sc.selective_vjp is True and sc.gradcheck is True
    plan = compile_graph(scalar_graph(["x"], [("s", "test.scaled", ("x",), {"scale": 3.0})], "s"), loaded.registry)
    seen.clear()  # loading called the vjp once (the first check, see plugins/testing.py vjp_contract_problem)
    assert evaluate(plan, {"x": np.float64(2.0)}).grad("x") == 3.0 and seen == [(True,)]


@pytest.mark.parametrize("keyword", ["forward", "vjp", "sample", "attrs", "variadic", "plugin", "distribution", "version"])
def test_operator_set_refuses_an_attribute_named_like_an_opdef_field(keyword):
    ops = OperatorSet()
    with pytest.raises(InvalidOperatorError) as info:
        ops.operator("test.f", infer=same_as_input, **{keyword: 1.0})
    message = info.value.message
    assert message.startswith(f"operator 'test.f': '{keyword}' is an OpDef field, not an attribute name (")
    assert message.endswith("give the attribute another name") and info.value.op == "test.f"
    assert ops.drafts == []


def test_operator_set_says_where_a_misplaced_rule_goes():
    with pytest.raises(InvalidOperatorError, match=r"@<operator>\.sample decorator"):
        OperatorSet().operator("test.f", sample=lambda rng: ([], {}))


def test_needs_is_refused_as_an_attribute_of_a_selective_operator_only():
    with pytest.raises(InvalidOperatorError, match="operator 'test.f': attribute 'needs' clashes with the needs= keyword"):
        OperatorSet().operator("test.f", selective_vjp=True, needs=1.0)
    ops = OperatorSet()
    draft = ops.operator("test.f", needs=1.0)(lambda x, *, needs: x)
    assert draft.attrs == {"needs": Attr("float", 1.0)}


def _negate(**attrs) -> OpDef:
    return OpDef("test.neg", 1, np.negative, lambda g, o, x, **_: (-g,), attrs=attrs)


@pytest.mark.parametrize("name", sorted({f.name for f in dataclasses.fields(OpDef)} | {"variadic"}))
def test_registration_refuses_an_attribute_named_like_an_opdef_field(name):
    with pytest.raises(PluginError) as info:
        load_plugins(entry_points=False, only=["test"], extra=[("test", plugin_with(_negate(**{name: Attr("bool", False)})))]).raise_for_problems()
    message = info.value.message
    assert message.startswith(f"plugin 'test' (no distribution) was not loaded: operator 'test.neg': attribute '{name}' has the name of an OpDef ")
    assert "give the attribute another name" in message


def test_registration_refuses_needs_on_a_selective_operator():
    op = dataclasses.replace(_negate(needs=Attr("bool", False)), selective_vjp=True)
    with pytest.raises(PluginError, match="attribute 'needs' clashes with the needs= keyword"):
        load_plugins(entry_points=False, only=["test"], extra=[("test", plugin_with(op))]).raise_for_problems()
    load_plugins(entry_points=False, only=["test"], extra=[("test", plugin_with(_negate(needs=Attr("bool", False))))])


# --- OpError without a reason: the operator refused the node --------------------------------------

def test_an_operator_refusal_without_a_reason_is_operator_refused_and_invalid_argument():
    from chainrule.core.errors import GraphError, OpError
    from chainrule.wire.status import code_for
    from google.rpc import code_pb2

    ops = OperatorSet()

    @ops.operator("test.positive_only", infer=same_as_input)
    def positive_only(x):
        """x, for positive x only."""
        if np.any(x <= 0):
            raise OpError("every element must be positive")
        return x

    @positive_only.vjp
    def _(g, out, x):
        return (g,)

    loaded = load_plugins(entry_points=False, only=["builtin", "test"],
                          extra=[("test", types.SimpleNamespace(register_operators=ops.hookimpl()))])
    plan = compile_graph(scalar_graph(["x"], [("p", "test.positive_only", ("x",))], "p"), loaded.registry)
    with pytest.raises(GraphError) as info:
        evaluate(plan, {"x": np.float64(-1.0)})
    error = info.value
    assert error.reason == "OPERATOR_REFUSED" and error.node == "p" and error.op == "test.positive_only"
    assert error.message == "node 'p' (test.positive_only): every element must be positive"
    assert code_for(error) == code_pb2.INVALID_ARGUMENT


def test_broadcast_inputs_reports_a_shape_mismatch():
    from chainrule.core import TensorSpec
    from chainrule.core.errors import OpError
    from chainrule.plugins import broadcast_inputs

    with pytest.raises(OpError, match=r"cannot be broadcast together") as info:
        broadcast_inputs(TensorSpec((2, 3), np.dtype("float64")), TensorSpec((4,), np.dtype("float64")))
    assert info.value.reason == "SHAPE_MISMATCH"
