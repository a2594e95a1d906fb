"""Plugin loading through pluggy: registration, conflicts, failures, filters."""
from __future__ import annotations

import types

import numpy as np
import pytest

from chainrule.core import Attr, OpDef, compile_graph, evaluate
from chainrule.core.errors import DuplicateOperatorError, InvalidOperatorError, PluginError
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
    loaded = load_plugins(entry_points=False, only=["builtin", "cubes"], extra=[("cubes", types.SimpleNamespace(register_operators=cube_set().hookimpl()))])
    op = loaded.registry["test.cube"]
    assert op.plugin == "cubes" and op.arity == 1 and op.doc == "scale * x^3."
    assert op.attrs["scale"] == Attr("float", 1.0)
    plan = compile_graph(scalar_graph(["x"], [("c", "test.cube", ("x",), {"scale": 2.0})], "c"), loaded.registry)
    ev = evaluate(plan, {"x": np.float64(3.0)})
    assert ev.output_value == 54.0 and ev.grad("x") == 54.0
    assert "cubes" in [p.name for p in loaded.plugins]


def test_two_plugins_registering_one_name_fail_naming_both():
    first = types.SimpleNamespace(register_operators=cube_set().hookimpl())
    second = types.SimpleNamespace(register_operators=cube_set().hookimpl())
    with pytest.raises(DuplicateOperatorError) as info:
        load_plugins(entry_points=False, only=["one", "two"], extra=[("one", first), ("two", second)])
    assert "'test.cube'" in info.value.message and "'one'" in info.value.message and "'two'" in info.value.message
    loaded = load_plugins(entry_points=False, only=["one", "two"], prefer=["two"], extra=[("one", first), ("two", second)])
    assert loaded.registry["test.cube"].plugin == "two"


def test_a_builtin_name_clash_is_reported():
    clash = plugin_with(OpDef("add", 2, np.add, lambda g, out, x, y: (g, g)))
    with pytest.raises(DuplicateOperatorError, match="'add'.*builtin.arith.*'mine'"):
        load_plugins(entry_points=False, extra=[("mine", clash)])


def test_a_plugin_that_raises_while_registering_is_named():
    @hookimpl
    def register_operators(register):
        raise RuntimeError("database unreachable")

    with pytest.raises(PluginError, match="plugin 'broken' raised while registering operators: RuntimeError: database unreachable"):
        load_plugins(entry_points=False, only=["broken"], extra=[("broken", types.SimpleNamespace(register_operators=register_operators))])


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
    with pytest.raises(InvalidOperatorError, match="plugin 'faulty'") as info:
        load_plugins(entry_points=False, only=["faulty"], extra=[("faulty", plugin_with(op))])
    assert message in info.value.message


def test_a_hook_with_a_wrong_signature_is_refused():
    @hookimpl
    def register_operators(register, extra_argument):
        pass

    with pytest.raises(PluginError, match="plugin 'odd'"):
        load_plugins(entry_points=False, only=["odd"], extra=[("odd", types.SimpleNamespace(register_operators=register_operators))])


def test_environment_filters(monkeypatch):
    monkeypatch.setenv("CHAINRULE_PLUGINS", "builtin.arith")
    names = load_plugins(entry_points=False).registry.names()
    assert "add" in names and "exp" not in names
    monkeypatch.setenv("CHAINRULE_PLUGINS", "builtin")
    monkeypatch.setenv("CHAINRULE_DISABLE_PLUGINS", "builtin.nn")
    names = load_plugins(entry_points=False).registry.names()
    assert "exp" in names and "softmax" not in names
