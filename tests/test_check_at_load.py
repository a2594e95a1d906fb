"""What is checked as a plugin loads (issue 17, item 3), and the messages item 6 asked to fix.

At load: each rule's signature against the attribute schema, and the first check, one forward
and one vjp call on the first case (the sample's, or made-up inputs), judging the vjp result's
type and count and the forward result's form (residuals, several outputs). Every refusal names
the plugin, its distribution, the operator and the fix. The plugins are installed distributions
with entry points (test_check.Site).
"""
from __future__ import annotations

import numpy as np
import pytest

from chainrule.client import Client, FailedPrecondition, GraphBuilder
from chainrule.core import Attr, OpDef
from chainrule.plugins import hookimpl
from chainrule.plugins.checking import check_op
from chainrule.plugins.manager import load_plugins
from chainrule.server import ServerConfig

from test_check import site  # noqa: F401 (a fixture: throwaway installed distributions)
from test_checks_by_default import Wrong, loaded_with, serve


def refusal(site, source: str, plugin: str = "bad") -> str:
    site.install(f"chainrule-{plugin}", "1.0.0", plugin, source)
    loaded = load_plugins(only=[plugin])
    assert plugin not in [p.name for p in loaded.plugins]
    (broken,) = loaded.broken
    return broken.message


def one(op: str) -> str:
    """A plugin module registering one OpDef, given as Python source."""
    return f'''
import numpy as np
from chainrule.core import Attr, OpDef
from chainrule.plugins import hookimpl


@hookimpl
def register_operators(register):
    register({op})
'''


HEAD = "plugin 'bad' (distribution chainrule-bad 1.0.0) was not loaded: operator 'bad.op': "
TAIL = ", or leave the plugin out with CHAINRULE_DISABLE_PLUGINS=bad"


def test_a_forward_that_does_not_take_a_declared_attribute_is_refused_naming_the_fix(site):
    message = refusal(site, one('OpDef("bad.op", 1, lambda x: -x, lambda g, out, x, *, k: (-g,), '
                                'attrs={"k": Attr("float", 1.0)})'))
    assert message == (HEAD + "the forward rule does not accept the declared attribute 'k' (the engine passes every "
                       "attribute as a keyword); add k to its parameters (def forward(..., *, k)) or end them with "
                       "**attrs; until it is fixed, leave the plugin out with CHAINRULE_DISABLE_PLUGINS=bad")


@pytest.mark.parametrize("vjp, problem", [
    ("lambda g, out, x: (-g, -g)", "vjp returned 2 gradients for 1 inputs on made-up inputs"),
    ("lambda g, out, x: -g", "vjp returned a bare float64 on made-up inputs, not a tuple with one gradient per input"),
    ("lambda g, out, x: None", "vjp returned a bare NoneType on made-up inputs, not a tuple with one gradient per input"),
])
def test_a_vjp_result_of_the_wrong_count_or_form_is_refused_at_load_without_a_sample(site, vjp, problem):
    message = refusal(site, one(f'OpDef("bad.op", 1, lambda x: -x, {vjp})'))
    assert message == HEAD + problem + "; fix: return a tuple with one gradient (or None) per input: return (g * ...,)" + TAIL


def test_a_gradient_that_is_not_numbers_is_refused_at_load(site):
    message = refusal(site, one('OpDef("bad.op", 1, lambda x: -x, lambda g, out, x: ("minus g",))'))
    assert message == (HEAD + "vjp returned a str as the gradient of input 0 on made-up inputs, not an array of numbers "
                       "or None; fix: return an ndarray (or None for an input without a gradient) for each input" + TAIL)


def test_a_forward_that_forgets_its_residuals_is_refused_at_load(site):
    message = refusal(site, one('OpDef("bad.op", 1, lambda x: np.tanh(x), '
                                'lambda g, out, x, *, saved: (g * saved,), residuals=True)'))
    assert message == (HEAD + "forward returned float64, expected (result, saved) (the operator declares residuals) "
                       "on made-up inputs; fix: return (result, saved) from forward when residuals=True, and a tuple "
                       "of n_outputs values when there are several" + TAIL)


def test_a_vjp_that_raises_is_left_to_the_check_which_names_the_case(site):
    site.install("chainrule-late", "1.0.0", "late", one(
        'OpDef("late.op", 1, lambda x, *, k: k * x, lambda g, out, x, *, k: (g * k * x[5],), attrs={"k": Attr("float", 2.0)})'))
    loaded = load_plugins(only=["late"])
    assert not loaded.broken
    verdict = check_op(loaded.registry["late.op"])
    assert verdict.message.startswith("plugin 'late' (distribution chainrule-late 1.0.0): operator late.op: the check "
                                      "could not run (default case; inputs float64[], attrs k=2.0): IndexError")
    assert verdict.message.endswith("; fix: give the operator a @<operator>.sample rule (sample= of OpDef) whose inputs "
                                    "and attributes its rules accept")


def test_residuals_and_several_outputs_are_checked_as_the_engine_calls_them():
    def tanh_forward(x):
        t = np.tanh(x)
        return t, 1 - t * t                      # the derivative, kept for the vjp

    def split_forward(x):
        return np.sin(x), np.cos(x)

    def split_vjp(gs, outs, x, *, wrong=False):
        gs_, gc = gs
        d = np.zeros_like(x)
        if gs_ is not None:
            d = d + gs_ * outs[1]
        if gc is not None:
            d = d + (1 if wrong else -1) * gc * outs[0]
        return (d,)

    ops = [
        OpDef("r.tanh", 1, tanh_forward, lambda g, out, x, *, saved: (g * saved,), residuals=True),
        OpDef("r.split", 1, split_forward, split_vjp, n_outputs=2),
        OpDef("r.split_wrong", 1, split_forward, lambda gs, outs, x: split_vjp(gs, outs, x, wrong=True), n_outputs=2),
    ]
    verdicts = {op.name: check_op(op) for op in ops}
    assert verdicts["r.tanh"].passed and verdicts["r.split"].passed, verdicts
    assert [c.kind for c in verdicts["r.tanh"].cases] == ["default"] * 3 + ["float32"]
    assert not verdicts["r.split_wrong"].passed and "operator r.split_wrong: input 0 at" in verdicts["r.split_wrong"].message


# --- issue 17, item 6: messages that said the wrong thing --------------------------------------------

MISSPELT = '''
from chainrule.plugins import hookimpl


@hookimpl
def register_operator(register):
    pass
'''

EXTRA_HOOK = '''
from chainrule.core import OpDef
from chainrule.plugins import hookimpl


@hookimpl
def register_operators(register):
    register(OpDef("typo.neg", 1, lambda x: -x, lambda g, out, x: (-g,)))


@hookimpl
def register_operatorz(register):
    pass
'''


def test_a_misspelt_hook_is_named_with_the_plugin_and_the_module(site):
    message = refusal(site, MISSPELT, "typo")
    module = site.modules[-1]
    assert message == (f"plugin 'typo' (distribution chainrule-typo 1.0.0) was not loaded: '{module}' has no "
                       f"register_operators hook: it marks 'register_operator' as a hook implementation, and chainrule "
                       f"has no hook of that name; fix: rename register_operator to register_operators, the only hook "
                       f"chainrule calls, or leave the plugin out with CHAINRULE_DISABLE_PLUGINS=typo")


def test_a_second_hook_with_a_misspelt_name_is_named_not_the_module_object(site):
    message = refusal(site, EXTRA_HOOK, "typo")
    assert message == ("plugin 'typo' (distribution chainrule-typo 1.0.0) was not loaded: it marks 'register_operatorz' "
                       "as a hook implementation, and chainrule has no hook of that name; fix: the only hook chainrule "
                       "calls is register_operators(register): rename or remove register_operatorz, or leave the plugin "
                       "out with CHAINRULE_DISABLE_PLUGINS=typo")
    assert "<module" not in message


def test_a_plugin_given_in_code_is_named_by_its_class_not_its_repr():
    class NoHook:
        @hookimpl
        def register_operatorz(self, register):
            pass

    (broken,) = load_plugins(entry_points=False, only=["nohook"], extra=[("nohook", NoHook())]).broken
    assert "'NoHook object' has no register_operators hook: it marks 'register_operatorz'" in broken.message
    assert " at 0x" not in broken.message


def test_a_pin_on_an_operator_the_check_refused_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    server, address = serve(ServerConfig(check_cache_file="off"), loaded_with(Wrong))
    try:
        with Client(address, timeout=30) as client:
            g = GraphBuilder(metadata={"requires": "op:wrong.cube"})
            x = g.input("x", (3,))
            with pytest.raises(FailedPrecondition) as info:
                client.evaluate(g.op("wrong.neg", x).sum(), x=np.ones(3))
    finally:
        server.stop(grace=None).wait()
    text = str(info.value)
    assert "graph requires operator 'wrong.cube', which is installed but not served: the start-up gradient check " \
           "refused it (plugin 'wrong' (distribution chainrule-wrong 1.0.0): operator wrong.cube: input 0 at" in text
    assert "no installed plugin provides it" not in text
