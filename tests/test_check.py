"""Checks on load: ``chainrule check``, ``chainrule plugins``, ``serve --check-operators``,
the plugin filters, and the messages of plugins that fail to load.

The throwaway plugins here are found through real entry points: each is a
module plus a ``.dist-info`` folder with ``entry_points.txt`` on ``sys.path``,
which is what pip leaves behind, so ``importlib.metadata`` reports them as
installed distributions (with a name and a version) without pip's time. The
install itself is tested in test_plugin_package.py.
"""
from __future__ import annotations

import json
import re
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from chainrule.client import Client, GraphBuilder, InvalidArgument
from chainrule.server import LocalClient, ServerConfig, create_server
from chainrule.core.errors import PluginError
from chainrule.plugins.checking import check_registry
from chainrule.plugins.manager import load_plugins
from chainrule.server.cli import main
from chainrule.server.config import from_sources

# --- throwaway plugins ------------------------------------------------------------------------------

FLIPPED = '''
import numpy as np
from chainrule.plugins import OperatorSet, float_like_input

ops = OperatorSet()


@ops.operator("flip.swish", infer=float_like_input, beta=1.0)
def swish(x, *, beta):
    """Swish, whose gradient has its sign flip (a deliberate bug)."""
    return x / (1 + np.exp(-beta * x))


@swish.vjp
def _(g, out, x, *, beta):
    s = 1 / (1 + np.exp(-beta * x))
    return (-g * (s + beta * out * (1 - s)),)


@ops.operator("flip.double", infer=float_like_input)
def double(x):
    """2 x, with a right gradient."""
    return 2 * x


@double.vjp
def _(g, out, x):
    return (2 * g,)


register_operators = ops.hookimpl()
'''


def one_operator(name: str, attrs: str = "") -> str:
    """Source of a plugin module registering one right operator ``name`` (negation)."""
    return f'''
from chainrule.core import Attr, OpDef
from chainrule.plugins import hookimpl, same_as_input


@hookimpl
def register_operators(register):
    register(OpDef("{name}", 1, lambda x, **a: -x, lambda g, out, x, **a: (-g,), same_as_input{attrs}))
'''


RAISES = '''
from chainrule.plugins import hookimpl


@hookimpl
def register_operators(register):
    raise RuntimeError("license server unreachable")
'''


class Site:
    """A folder on sys.path into which throwaway distributions are 'installed'."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.modules: list[str] = []
        monkeypatch.syspath_prepend(str(root))

    def install(self, distribution: str, version: str, plugin: str, source: str) -> None:
        """Write the plugin's module and the metadata pip would: a distribution with one entry point."""
        module = f"{plugin}_plugin_{self.root.name}".replace("-", "_").replace(".", "_")
        (self.root / f"{module}.py").write_text(textwrap.dedent(source))
        info = self.root / f"{distribution.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[chainrule]\n{plugin} = {module}\n")
        self.modules.append(module)


@pytest.fixture
def site(tmp_path, monkeypatch):
    for name in ("CHAINRULE_PLUGINS", "CHAINRULE_DISABLE_PLUGINS", "CHAINRULE_PREFER"):
        monkeypatch.delenv(name, raising=False)
    s = Site(tmp_path, monkeypatch)
    yield s
    for module in s.modules:
        sys.modules.pop(module, None)


@pytest.fixture
def flipped(site):
    site.install("chainrule-flipped", "0.1.0", "flip", FLIPPED)
    return site


def start(config: ServerConfig):
    server, port = create_server("127.0.0.1:0", config)
    server.start()
    return server, f"127.0.0.1:{port}"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def swish_graph(op: str = "flip.swish"):
    g = GraphBuilder()
    x = g.input("x", (3,))
    return g.op(op, x, name="h").sum(name="f")


# --- the check ----------------------------------------------------------------------------------------

def test_every_builtin_operator_passes_chainrule_check(capsys, site, monkeypatch):
    monkeypatch.setenv("CHAINRULE_PLUGINS", "builtin")
    code, out, _ = run_cli(capsys, "check")
    assert code == 0, out
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line and not line[0].isdigit()}
    builtins = load_plugins(entry_points=False, only=["builtin"]).registry
    assert set(rows) == {op.name for op in builtins}
    assert rows["stop_gradient"].endswith("exempt") and rows["matmul"].endswith("passed")
    assert "OPERATOR" in out.splitlines()[0] and "SHAPES TRIED" in out and "ATTRIBUTES TRIED" in out
    assert "MAX REL ERR" in out
    n, exempt = len(builtins), sum(1 for op in builtins if not op.gradcheck)
    assert f"{n} operators: {n - exempt} passed, 0 failed, {exempt} exempt" in out


def test_a_flipped_vjp_is_caught_naming_plugin_operator_input_position_and_both_numbers(flipped):
    checks = {c.op: c for c in check_registry(load_plugins(only=["flip"]).registry)}
    assert checks["flip.double"].passed and checks["flip.double"].max_abs_error < 1e-8
    bad = checks["flip.swish"]
    assert not bad.passed and bad.status == "FAILED" and bad.plugin == "flip"
    assert bad.distribution == "chainrule-flipped" and bad.version == "0.1.0"
    # the three made-up cases, then beta varied on the case of highest rank (the default 1.0 -> 1.5)
    assert bad.shapes == (((),), ((4,),), ((2, 3),), ((2, 3),)) and bad.max_abs_error > 0.1
    assert [(c.kind, c.attrs) for c in bad.cases] == [
        ("default", (("beta", "1.0"),)), ("default", (("beta", "1.0"),)), ("default", (("beta", "1.0"),)),
        ("varied", (("beta", "1.5"),)), ("float32", (("beta", "1.0"),))]
    match = re.search(r"plugin 'flip' \(distribution chainrule-flipped 0\.1\.0\): operator flip\.swish: "
                      r"input 0 at \(\): vjp gives (\S+), finite differences give (\S+) \(abs error", bad.message)
    assert match, bad.message
    vjp, numeric = float(match[1]), float(match[2])
    assert vjp == pytest.approx(-numeric) and abs(vjp) > 1e-3        # the sign flip, both numbers shown
    assert bad.message.endswith("inputs float64[], attrs beta=1.0")


def test_chainrule_check_exits_1_and_prints_the_failure(flipped, capsys):
    code, out, _ = run_cli(capsys, "check", "--plugin", "flip")
    assert code == 1
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("flip.")}
    assert lines["flip.swish"][1] == "flip" and lines["flip.swish"][-1] == "FAILED"
    assert lines["flip.double"][-1] == "passed" and lines["flip.double"][2:5] == ["[]", ";", "[4]"]
    assert "FAILED plugin 'flip' (distribution chainrule-flipped 0.1.0): operator flip.swish: input 0 at ()" in out
    assert "2 operators: 1 passed, 1 failed, 0 exempt" in out
    code, out, _ = run_cli(capsys, "check", "--op", "flip.double", "--op", "add")
    assert code == 0 and "flip.swish" not in out and "2 operators: 2 passed" in out
    code, _, err = run_cli(capsys, "check", "--op", "flip.nothing")
    assert code == 2 and "no operator 'flip.nothing' is installed" in err


def test_an_operator_that_cannot_be_checked_fails_with_the_reason():
    from chainrule.core import Attr, OpDef
    from test_plugins import plugin_with

    needs = OpDef("odd.scaled", 1, lambda x, *, k: k * x, lambda g, out, x, *, k: (k * g,), attrs={"k": Attr("float")})
    crashes = OpDef("odd.crash", 1, lambda x: x[7], lambda g, out, x: (g,))
    loaded = load_plugins(entry_points=False, only=["odd"], extra=[("odd", plugin_with(needs, crashes), "chainrule-odd", "1.0")])
    checks = {c.op: c for c in check_registry(loaded.registry)}
    assert not checks["odd.scaled"].passed and "plugin 'odd' (distribution chainrule-odd 1.0): operator odd.scaled: " \
        "the check could not run: ValueError: odd.scaled: attribute 'k' is required" in checks["odd.scaled"].message
    assert "give the operator a sample= rule" in checks["odd.scaled"].message
    assert "operator odd.crash: the check could not run (default case; inputs float64[]): IndexError" \
        in checks["odd.crash"].message
    assert checks["odd.crash"].message.endswith("fix: give the operator a @<operator>.sample rule (sample= of OpDef) "
                                                "whose inputs and attributes its rules accept")


# --- serve --check-operators --------------------------------------------------------------------------

def test_serve_with_check_operators_refuses_the_failing_operator_and_serves_the_rest(flipped, caplog, tmp_path):
    server, address = start(ServerConfig(check_operators=True, plugins=["flip", "builtin.reduce"],
                                         check_cache_file=str(tmp_path / "checks.json")))
    try:
        with Client(address, timeout=30) as client:
            listed = {op.name: op for op in client.operators()}
            assert listed["flip.swish"].check == "failed"  # listed, not served
            # built-ins are not checked at start (the test suite checks them)
            assert listed["flip.double"].check == "passed" and listed["sum"].check == "not run"
            assert listed["flip.double"].distribution == "chainrule-flipped" and listed["flip.double"].version == "0.1.0"
            r = client.evaluate(swish_graph("flip.double"), x=np.array([1.0, 2.0, 3.0]))
            assert r.value == 12.0 and list(r.grad["x"]) == [2.0, 2.0, 2.0]
            with pytest.raises(InvalidArgument) as info:
                client.evaluate(swish_graph(), x=np.zeros(3))
            assert info.value.reason == "UNKNOWN_OPERATOR" and info.value.op == "flip.swish"
    finally:
        server.stop(grace=None).wait()
    refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refusing")]
    assert len(refusals) == 1 and "refusing flip.swish: plugin 'flip' (distribution chainrule-flipped 0.1.0): " \
        "operator flip.swish: input 0 at ()" in refusals[0]


def test_without_check_operators_nothing_is_refused_and_the_check_is_not_run(flipped):
    server, address = start(ServerConfig(plugins=["flip"], check_operators=False))
    try:
        with Client(address, timeout=30) as client:
            listed = {op.name: op.check for op in client.operators()}
    finally:
        server.stop(grace=None).wait()
    assert listed == {"flip.swish": "not run", "flip.double": "not run"}


# --- chainrule plugins, and the filters everywhere ----------------------------------------------------

def test_chainrule_plugins_lists_distribution_version_and_operators(flipped, capsys):
    code, out, _ = run_cli(capsys, "plugins", "--json")
    assert code == 0
    rows = {row["name"]: row for row in json.loads(out)}
    assert rows["flip"] == {"name": "flip", "distribution": "chainrule-flipped", "version": "0.1.0",
                               "builtin": False, "operators": ["flip.swish", "flip.double"], "broken": False,
                               "problem": None}
    assert rows["builtin.linalg"]["distribution"] == "chainrule" and rows["builtin.linalg"]["operators"] == ["matmul", "transpose", "einsum"]
    code, out, _ = run_cli(capsys, "plugins")
    line = next(line for line in out.splitlines() if line.startswith("flip"))
    assert line.split() == ["flip", "chainrule-flipped", "0.1.0", "flip.swish,", "flip.double"]


def _everywhere(capsys) -> dict[str, set[str]]:
    """The operator names ops, plugins, check, LocalClient and a server built from the environment see."""
    seen = {}
    code, out, _ = run_cli(capsys, "ops", "--json")
    seen["ops"] = {row["name"] for row in json.loads(out)}
    code, out, _ = run_cli(capsys, "plugins", "--json")
    seen["plugins"] = {name for row in json.loads(out) for name in row["operators"]}
    code, out, _ = run_cli(capsys, "check")
    seen["check"] = {line.split()[0] for line in out.splitlines()[1:] if line and "operator" not in line and not line.startswith("FAILED")}
    seen["LocalClient"] = {op.name for op in LocalClient().operators()}
    server, address = start(from_sources(None))
    try:
        with Client(address, timeout=30) as client:
            seen["serve"] = {op.name for op in client.operators()}
    finally:
        server.stop(grace=None).wait()
    return seen


def test_the_environment_variables_choose_the_plugins_everywhere(flipped, capsys, monkeypatch):
    monkeypatch.setenv("CHAINRULE_PLUGINS", "flip,builtin.linalg")
    for where, names in _everywhere(capsys).items():
        assert names == {"flip.swish", "flip.double", "matmul", "transpose", "einsum"}, where
    monkeypatch.delenv("CHAINRULE_PLUGINS")
    monkeypatch.setenv("CHAINRULE_DISABLE_PLUGINS", "builtin,flip")
    for where, names in _everywhere(capsys).items():
        assert names == set(), where


# --- plugins that cannot load: each message names who and why ------------------------------------------

def test_two_distributions_registering_one_name_are_named_and_prefer_resolves_it(site, capsys):
    site.install("chainrule-one", "1.2.0", "dup.one", one_operator("dup.neg"))
    site.install("chainrule-two", "0.3.0", "dup.two", one_operator("dup.neg"))
    with pytest.raises(PluginError) as info:
        create_server("127.0.0.1:0", ServerConfig(plugins=["dup"]))
    message = info.value.message    # the second in name order is left out, naming both
    assert "plugin 'dup.two' (distribution chainrule-two 0.3.0) was not loaded: operator 'dup.neg' is already " \
        "registered by plugin 'dup.one' (distribution chainrule-one 1.2.0)" in message
    assert "--prefer dup.one or --prefer dup.two" in message and "CHAINRULE_DISABLE_PLUGINS=dup.two" in message
    code, out, err = run_cli(capsys, "plugins")
    assert code == 1 and err.startswith("chainrule: error: plugin 'dup.two'") and "Traceback" not in err
    assert re.search(r"^dup\.two\s+chainrule-two\s+0\.3\.0\s+BROKEN", out, re.M), out

    server, address = start(ServerConfig(plugins=["dup"], prefer=["dup.two"]))
    try:
        with Client(address, timeout=30) as client:
            (op,) = [op for op in client.operators() if op.name == "dup.neg"]
    finally:
        server.stop(grace=None).wait()
    assert (op.plugin, op.distribution, op.version) == ("dup.two", "chainrule-two", "0.3.0")
    code, out, _ = run_cli(capsys, "check", "--prefer", "dup.two", "--plugin", "dup")
    assert code == 0 and re.search(r"dup\.neg\s+dup\.two\s", out)


def test_a_plugin_whose_registration_raises_stops_the_start_naming_it(site, capsys):
    site.install("chainrule-broken", "0.1.0", "broken", RAISES)
    with pytest.raises(PluginError, match=r"plugin 'broken' \(distribution chainrule-broken 0.1.0\) was not loaded: "
                                          "raised while registering operators: RuntimeError: license server unreachable"):
        create_server("127.0.0.1:0", ServerConfig())
    code, _, err = run_cli(capsys, "check")
    assert code == 1 and "raised while registering operators" in err
    loaded = load_plugins(env={"CHAINRULE_DISABLE_PLUGINS": "broken"})   # leaving it out, the rest loads
    assert "broken" not in [p.name for p in loaded.plugins] and "add" in loaded.registry and not loaded.broken


def test_a_plugin_that_fails_to_import_is_named_with_its_distribution(site, capsys):
    site.install("chainrule-private", "2.0.1", "private", "import acme_private_sdk_that_is_not_installed\n")
    code, _, err = run_cli(capsys, "plugins")
    assert code == 1
    assert ("plugin 'private' (distribution chainrule-private 2.0.1) was not loaded: failed to import: "
            "ModuleNotFoundError: No module named 'acme_private_sdk_that_is_not_installed'") in err


def test_a_plugin_with_a_bad_attribute_schema_is_refused_naming_plugin_operator_and_attribute(site, capsys):
    site.install("chainrule-schema", "0.1.0", "schema", one_operator("schema.neg", ', attrs={"k": Attr("complex", 1)}'))
    code, _, err = run_cli(capsys, "plugins")
    assert code == 1
    assert ("plugin 'schema' (distribution chainrule-schema 0.1.0) was not loaded: operator 'schema.neg': "
            "attribute 'k' has kind 'complex'; expected one of float, int, bool, string, ints, floats, tensor") in err


def test_two_distributions_with_one_plugin_name_are_refused_naming_both(site):
    site.install("chainrule-alpha", "1.0.0", "shared", one_operator("shared.neg"))
    site.install("chainrule-beta", "2.0.0", "shared", one_operator("shared.neg"))
    loaded = load_plugins(only=["shared"])
    (broken,) = loaded.broken
    assert "plugin name 'shared' is also used by chainrule-" in broken.message
    assert {broken.distribution, loaded.plugins[-1].distribution} == {"chainrule-alpha", "chainrule-beta"}
