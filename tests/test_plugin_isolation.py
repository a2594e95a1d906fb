"""One broken plugin breaks nothing else; names that match nothing are errors; load-time rule checks.

In-process behaviours use throwaway plugins given to load_plugins(extra=...); the commands use
throwaway distributions on sys.path (tests/test_check.py's Site).
"""
from __future__ import annotations

import json
import types

import pytest

from chainrule.core import Attr, OpDef
from chainrule.core.errors import PluginError
from chainrule.plugins import OperatorSet, float_like_input, hookimpl, same_as_input
from chainrule.plugins.manager import load_plugins
from chainrule.server.cli import main
from test_check import RAISES, one_operator, site  # noqa: F401  (site is a fixture)


def good(prefix: str = "good") -> types.SimpleNamespace:
    ops = OperatorSet()

    @ops.operator(f"{prefix}.double", infer=same_as_input)
    def double(x):
        return 2 * x

    @double.vjp
    def _(g, out, x):
        return (2 * g,)

    return types.SimpleNamespace(register_operators=ops.hookimpl())


def raising() -> types.SimpleNamespace:
    @hookimpl
    def register_operators(register):
        raise RuntimeError("no licence")

    return types.SimpleNamespace(register_operators=register_operators)


def load(*extra, **options):
    return load_plugins(entry_points=False, extra=list(extra), **options)


def test_a_raising_hook_leaves_out_that_plugin_alone():
    loaded = load(("bad", raising(), "chainrule-bad", "1.0"), ("good", good()))
    assert "good.double" in loaded.registry and "add" in loaded.registry
    (broken,) = loaded.broken
    assert (broken.name, broken.distribution, broken.version) == ("bad", "chainrule-bad", "1.0")
    assert broken.message.startswith("plugin 'bad' (distribution chainrule-bad 1.0) was not loaded: raised while "
                                     "registering operators: RuntimeError: no licence")
    assert broken.message.endswith("leave the plugin out with CHAINRULE_DISABLE_PLUGINS=bad")
    assert [p.name for p in loaded.plugins][-1] == "good"
    with pytest.raises(PluginError, match="plugin 'bad'"):
        loaded.raise_for_problems()
    assert not load(("bad", raising()), ("good", good()), disable=["bad"]).problems


def test_a_bare_or_foreign_operator_name_is_refused_with_the_prefix_to_use():
    ops = OperatorSet()

    @ops.operator("tanh", infer=float_like_input)
    def tanh(x):
        return x

    @tanh.vjp
    def _(g, out, x):
        return (g,)

    loaded = load(("acme", types.SimpleNamespace(register_operators=ops.hookimpl())), ("other", good("acme")))
    assert loaded.registry["tanh"].plugin == "builtin.elementwise" and "acme.double" not in loaded.registry
    messages = {b.name: b.message for b in loaded.broken}
    assert "operator 'tanh' does not start with the plugin's prefix 'acme.'; fix: prefix your operator names " \
        "with 'acme.' ('acme.tanh')" in messages["acme"]
    assert "prefix your operator names with 'other.' ('other.double')" in messages["other"]
    # a dotted plugin name shares its first part's prefix
    assert "acme.double" in load(("acme.vision", good("acme"))).registry


def test_builtin_plugin_names_are_reserved():
    loaded = load(("builtin.mine", good("builtin")))
    assert "reserved" in loaded.broken[0].message


def test_an_entry_without_register_operators_is_an_error():
    def register_operators(register):  # not marked @hookimpl
        pass

    loaded = load(("nohook", types.SimpleNamespace()), ("unmarked", types.SimpleNamespace(register_operators=register_operators)))
    messages = {b.name: b.message for b in loaded.broken}
    assert "has no register_operators hook" in messages["nohook"]
    assert "not marked as a hook implementation" in messages["unmarked"]


@pytest.mark.parametrize("option, setting", [("only", "CHAINRULE_PLUGINS"), ("disable", "CHAINRULE_DISABLE_PLUGINS"),
                                             ("prefer", "CHAINRULE_PREFER")])
def test_a_name_that_matches_no_plugin_is_reported(option, setting):
    loaded = load(("good", good()), **{option: ["goood"]})
    (message,) = loaded.unmatched
    assert message.startswith(f"{setting} (") and "names 'goood', which matches no installed plugin; " \
        "did you mean 'good'?" in message
    assert not load(("good", good()), **{option: ["builtin"]}).unmatched


def test_a_rule_that_does_not_take_a_declared_attribute_is_refused():
    forward = OpDef("sig.f", 1, lambda x: x, lambda g, out, x, **attrs: (g,), attrs={"k": Attr("float", 1.0)})
    vjp = OpDef("sig.v", 1, lambda x, *, k: x, lambda g, out, x: (g,), attrs=forward.attrs)
    kwargs = OpDef("sig.ok", 1, lambda x, **a: x, lambda g, out, x, k: (g,), attrs=forward.attrs)
    from test_plugins import plugin_with

    assert "the forward rule does not accept the declared attribute 'k'" in load(("sig", plugin_with(forward))).broken[0].message
    assert "the vjp rule does not accept the declared attribute 'k'" in load(("sig", plugin_with(vjp))).broken[0].message
    assert not load(("sig", plugin_with(kwargs))).broken


def bare_array_set(with_sample: bool) -> OperatorSet:
    ops = OperatorSet()

    @ops.operator("bare.neg", infer=same_as_input)
    def neg(x):
        return -x

    @neg.vjp
    def _(g, out, x):
        return -g   # a bare array: the engine wants (-g,)

    if with_sample:
        @neg.sample
        def _(rng):
            return [rng.standard_normal(3)], {}

    return ops


def test_a_vjp_returning_a_bare_array_is_refused_at_load_with_or_without_a_sample():
    loaded = load(("bare", types.SimpleNamespace(register_operators=bare_array_set(True).hookimpl())))
    assert "operator 'bare.neg': vjp returned a bare ndarray on the sample inputs" in loaded.broken[0].message
    loaded = load(("bare", types.SimpleNamespace(register_operators=bare_array_set(False).hookimpl())))
    # without a sample rule, the first check runs on made-up inputs (float64[], as the gradient checker's)
    assert "operator 'bare.neg': vjp returned a bare float64 on made-up inputs" in loaded.broken[0].message
    assert "bare.neg" not in loaded.registry


# --- the commands ---------------------------------------------------------------------------------------

def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def broken_site(site):  # noqa: F811
    site.install("chainrule-bad", "0.1.0", "bad", RAISES)
    site.install("chainrule-good", "1.0.0", "good", one_operator("good.neg"))
    return site


def test_plugins_lists_the_broken_plugin_and_exits_1(broken_site, capsys):
    code, out, err = run(capsys, "plugins", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 1 and rows["bad"]["broken"] and "license server unreachable" in rows["bad"]["problem"]
    assert rows["good"]["operators"] == ["good.neg"] and not rows["good"]["broken"]
    assert err.startswith("chainrule: error: plugin 'bad' (distribution chainrule-bad 0.1.0) was not loaded")


def test_check_of_another_plugin_passes_and_warns(broken_site, capsys):
    code, out, err = run(capsys, "check", "--plugin", "good")
    assert code == 0 and "1 operator: 1 passed" in out and err.startswith("chainrule: warning: plugin 'bad'")
    code, out, err = run(capsys, "check", "--plugin", "bad")
    assert code == 1 and "chainrule: error: plugin 'bad'" in err
    code, out, err = run(capsys, "check", "--plugin", "good", "--prefer", "godo")
    assert code == 2 and "CHAINRULE_PREFER (--prefer) names 'godo'" in err


def test_ops_warns_and_lists_the_rest(broken_site, capsys):
    code, out, err = run(capsys, "ops", "--json", "--prefer", "good")
    assert code == 0 and "good.neg" in {r["name"] for r in json.loads(out)}
    assert err.startswith("chainrule: warning: plugin 'bad'")


def test_serve_refuses_to_start_unless_the_broken_plugin_is_disabled(broken_site, capsys, monkeypatch):
    code, out, err = run(capsys, "serve", "--port", "0")
    assert code == 2 and "listening" not in out
    lines = err.strip().splitlines()
    assert lines[0].startswith("chainrule: error: plugin 'bad' (distribution chainrule-bad 0.1.0) was not loaded")
    assert "CHAINRULE_DISABLE_PLUGINS=bad" in lines[0] and "not serving with 1 plugin problem" in lines[-1]
    monkeypatch.setenv("CHAINRULE_PLUGINS", "nosuch")
    code, out, err = run(capsys, "serve", "--port", "0")
    assert code == 2 and "CHAINRULE_PLUGINS (--plugins) names 'nosuch', which matches no installed plugin" in err
    monkeypatch.delenv("CHAINRULE_PLUGINS")

    from chainrule.server.config import ServerConfig
    from chainrule.server.grpc_server import build_service

    service = build_service(ServerConfig(disable_plugins=["bad"]))
    assert "good.neg" in service.registry


def test_local_client_warns_about_a_plugin_it_left_out(monkeypatch):
    from chainrule.server import LocalClient

    monkeypatch.setenv("CHAINRULE_PLUGINS", "builtin,nosuch")
    with pytest.warns(RuntimeWarning, match="nosuch"):
        client = LocalClient()
    assert any(op.name == "add" for op in client.operators())  # the rest loaded
