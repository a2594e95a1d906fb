"""Start-up gradient checks of third-party operators by default, their cache, and attribute values
(non-finite floats, out-of-range ints, None and empty values).

The throwaway plugins are given to ``load_plugins(extra=[...])`` with a distribution and a
version (so their verdicts may be cached); the servers are real, on loopback.
"""
from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest

from chainrule.client import Client, GraphBuilder, InvalidArgument
from chainrule.core import Attr, OpDef, check_attrs
from chainrule.core.errors import BadAttributeError
from chainrule.plugins import checking, hookimpl, same_as_input
from chainrule.plugins.manager import load_plugins
from chainrule.server import ServerConfig, create_server
from chainrule.server.config import add_arguments, from_sources
from chainrule.server.grpc_server import build_service
from chainrule.v1 import chainrule_pb2 as pb


class Wrong:
    """``wrong.cube`` (x^3 whose vjp forgets the 3) and ``wrong.neg`` (right)."""

    @hookimpl
    def register_operators(self, register):
        register(OpDef("wrong.cube", 1, lambda x: x ** 3, lambda g, out, x: (g * x ** 2,), same_as_input))
        register(OpDef("wrong.neg", 1, lambda x: -x, lambda g, out, x: (-g,), same_as_input))


class Fill:
    """``fill.shift``: x + value, a float attribute that may be infinite."""

    @hookimpl
    def register_operators(self, register):
        register(OpDef("fill.shift", 1, lambda x, *, value: x + value, lambda g, out, x, *, value: (g,),
                       same_as_input, attrs={"value": Attr("float", 0.0, allow_nonfinite=True)}))


def loaded_with(*extra, version: str = "1.0.0"):
    return load_plugins(entry_points=False, only=["builtin.elementwise", "builtin.reduce", *(e.__name__.lower() for e in extra)],
                        extra=[(e.__name__.lower(), e(), f"chainrule-{e.__name__.lower()}", version) for e in extra])


def serve(config: ServerConfig, loaded):
    service = build_service(config, loaded)
    server, port = create_server("127.0.0.1:0", config, service=service)
    server.start()
    return server, f"127.0.0.1:{port}"


def graph(op: str, **attrs):
    g = GraphBuilder()
    x = g.input("x", (3,))
    return g.op(op, x, name="h", **attrs).sum(name="f")


@pytest.fixture
def cache_file(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # never the real user's cache
    return tmp_path / "checks.json"


# --- checks by default -----------------------------------------------------------------------------

def test_the_check_is_on_by_default_and_a_flag_or_the_environment_turns_it_off():
    assert ServerConfig().check_operators is True
    import argparse
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert from_sources(parser.parse_args(["--no-check-operators"]), env={}).check_operators is False
    assert from_sources(None, env={"CHAINRULE_CHECK_OPERATORS": "0"}).check_operators is False
    assert from_sources(None, env={"CHAINRULE_CHECK_CACHE_FILE": "/x/c.json"}).check_cache_file == "/x/c.json"


def test_serve_refuses_a_third_party_operator_with_a_wrong_vjp_and_lists_it_as_failed(cache_file, caplog):
    caplog.set_level(logging.INFO, logger="chainrule.server")
    server, address = serve(ServerConfig(check_cache_file=str(cache_file)), loaded_with(Wrong))
    try:
        with Client(address, timeout=30) as client:
            listed = {op.name: op.check for op in client.operators()}
            assert listed["wrong.cube"] == "failed" and listed["wrong.neg"] == "passed"
            assert listed["exp"] == "not run" and listed["sum"] == "not run"  # built-ins are not checked at start
            with pytest.raises(InvalidArgument) as info:
                client.evaluate(graph("wrong.cube"), x=np.ones(3))
            assert info.value.reason == "UNKNOWN_OPERATOR"
            assert client.evaluate(graph("wrong.neg"), x=np.ones(3)).value == -3.0
    finally:
        server.stop(grace=None).wait()
    refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refusing")]
    assert len(refusals) == 1 and refusals[0].startswith(
        "refusing wrong.cube: plugin 'wrong' (distribution chainrule-wrong 1.0.0): operator wrong.cube")


def test_no_check_operators_serves_everything_unchecked(cache_file):
    server, address = serve(ServerConfig(check_operators=False, check_cache_file=str(cache_file)), loaded_with(Wrong))
    try:
        with Client(address, timeout=30) as client:
            listed = {op.name: op.check for op in client.operators() if op.plugin == "wrong"}
    finally:
        server.stop(grace=None).wait()
    assert listed == {"wrong.cube": "not run", "wrong.neg": "not run"}
    assert not cache_file.exists()


# --- the cache --------------------------------------------------------------------------------------

def _counting(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = checking.check_op

    def counted(op, seed=checking.SEED):
        calls.append(op.name)
        return real(op, seed)

    monkeypatch.setattr(checking, "check_op", counted)
    return calls


def test_a_restart_reads_the_verdicts_from_the_cache_and_a_new_version_is_checked_again(cache_file, monkeypatch):
    calls = _counting(monkeypatch)
    config = ServerConfig(check_cache_file=str(cache_file))
    first = build_service(config, loaded_with(Wrong))
    assert sorted(calls) == ["wrong.cube", "wrong.neg"]
    data = json.loads(cache_file.read_text())
    assert set(data["checks"]) == {"chainrule-wrong 1.0.0 wrong.cube", "chainrule-wrong 1.0.0 wrong.neg"}
    assert data["checks"]["chainrule-wrong 1.0.0 wrong.cube"]["passed"] is False

    calls.clear()
    again = build_service(config, loaded_with(Wrong))
    assert calls == []  # nothing checked again
    assert again.checks == first.checks == {"wrong.cube": pb.CHECK_FAILED, "wrong.neg": pb.CHECK_PASSED}
    assert "wrong.cube" not in again.registry and "wrong.neg" in again.registry

    build_service(config, loaded_with(Wrong, version="1.0.1"))
    assert sorted(calls) == ["wrong.cube", "wrong.neg"]


def test_the_default_cache_is_under_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    build_service(ServerConfig(), loaded_with(Wrong))
    assert checking.default_cache_path() == tmp_path / "chainrule" / "checks.json"
    assert "chainrule-wrong 1.0.0 wrong.neg" in json.loads((tmp_path / "chainrule" / "checks.json").read_text())["checks"]
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert str(checking.default_cache_path()).endswith("/.cache/chainrule/checks.json")


def test_cache_off_keeps_no_file(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    service = build_service(ServerConfig(check_cache_file="off"), loaded_with(Wrong))
    assert "wrong.cube" not in service.registry and not (tmp_path / "chainrule").exists()


def test_operators_without_a_distribution_are_checked_but_never_cached(cache_file, monkeypatch):
    calls = _counting(monkeypatch)
    loaded = load_plugins(entry_points=False, only=["builtin.reduce", "wrong"], extra=[("wrong", Wrong())])
    build_service(ServerConfig(check_cache_file=str(cache_file)), loaded)
    assert sorted(calls) == ["wrong.cube", "wrong.neg"]
    assert not cache_file.exists() or json.loads(cache_file.read_text())["checks"] == {}


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"checks": 3}', "\udcff"])
def test_a_corrupt_cache_is_ignored_with_a_warning_and_rewritten(cache_file, caplog, content):
    cache_file.write_text(content, errors="surrogateescape")
    service = build_service(ServerConfig(check_cache_file=str(cache_file)), loaded_with(Wrong))
    assert "wrong.cube" not in service.registry and "wrong.neg" in service.registry
    assert any(r.levelno == logging.WARNING and str(cache_file) in r.getMessage() for r in caplog.records)
    assert "chainrule-wrong 1.0.0 wrong.neg" in json.loads(cache_file.read_text())["checks"]


def test_a_cache_entry_of_the_wrong_shape_is_checked_again(cache_file, monkeypatch):
    build_service(ServerConfig(check_cache_file=str(cache_file)), loaded_with(Wrong))
    data = json.loads(cache_file.read_text())
    data["checks"]["chainrule-wrong 1.0.0 wrong.cube"] = {"passed": "maybe"}
    cache_file.write_text(json.dumps(data))
    calls = _counting(monkeypatch)
    service = build_service(ServerConfig(check_cache_file=str(cache_file)), loaded_with(Wrong))
    assert calls == ["wrong.cube"] and service.checks["wrong.cube"] == pb.CHECK_FAILED


def test_an_unwritable_cache_is_a_warning_not_fatal(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path = blocker / "checks.json"  # its folder is a file: neither readable nor writable
    service = build_service(ServerConfig(check_cache_file=str(path)), loaded_with(Wrong))
    assert "wrong.cube" not in service.registry and "wrong.neg" in service.registry
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("cannot be written" in w and str(path) in w for w in warnings)


# --- attribute values -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def address():
    loaded = load_plugins(entry_points=False, only=["builtin.elementwise", "builtin.reduce", "builtin.shape",
                                                   "builtin.linalg", "fill"],
                          extra=[("fill", Fill(), "chainrule-fill", "1.0.0")])
    server, address = serve(ServerConfig(check_cache_file="off"), loaded)
    yield address
    server.stop(grace=None).wait()


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_float_attribute_is_bad_attribute_naming_it(address, value):
    with Client(address, timeout=30) as client:
        for op, attrs in (("leaky_relu", {"alpha": value}), ("clip", {"min": value}), ("clip", {"max": value})):
            with pytest.raises(InvalidArgument) as info:
                client.evaluate(graph(op, **attrs), x=np.ones(3))
            name = next(iter(attrs))
            assert info.value.code.name == "INVALID_ARGUMENT" and info.value.reason == "BAD_ATTRIBUTE"
            # a path in the request (issue 16): the node's position in graph.nodes, then the attribute
            assert info.value.field == f"graph.nodes[0].attrs.{name}" and info.value.metadata["node"] == "h"
            assert f"'{name}'" in str(info.value) and "finite" in str(info.value)


def test_an_attribute_that_allows_non_finite_values_takes_them(address):
    with Client(address, timeout=30) as client:
        assert client.evaluate(graph("fill.shift", value=-math.inf), x=np.ones(3)).value == -math.inf
        assert client.evaluate(graph("fill.shift", value=2.0), x=np.ones(3)).value == 9.0


def test_an_attribute_value_with_nothing_set_is_refused(address):
    with Client(address, timeout=30) as client:
        with pytest.raises(InvalidArgument) as info:
            client.evaluate(graph("leaky_relu", alpha=pb.AttrValue()), x=np.ones(3))
    assert info.value.reason == "BAD_ATTRIBUTE" and "alpha" in str(info.value) and "no value set" in str(info.value)


def test_none_in_the_builder_leaves_the_attribute_out_so_the_default_applies(address):
    with Client(address, timeout=30) as client:
        r = client.evaluate(graph("leaky_relu", alpha=None), x=np.array([-1.0, 1.0, 2.0]))
    assert r.value == pytest.approx(3.0 - 0.01)


@pytest.mark.parametrize("attrs", [{"axis": 1 << 63}, {"axis": -(1 << 63) - 1}, {"axis": [0, 1 << 64]},
                                   {"axis": np.uint64(1 << 63)}])
def test_an_integer_beyond_int64_is_a_value_error_in_the_client_naming_the_attribute(attrs):
    g = GraphBuilder()
    x = g.input("x", (3,))
    with pytest.raises(ValueError, match=r"sum: attribute 'axis': .* out of range.*int64"):
        g.op("sum", x, **attrs)


def test_none_or_an_odd_item_in_a_list_attribute_is_a_type_error_in_the_client():
    g = GraphBuilder()
    x = g.input("x", (3,))
    with pytest.raises(TypeError, match="transpose: attribute 'axes'"):
        g.op("transpose", x, axes=[0, None])
    with pytest.raises(TypeError, match="clip: attribute 'min'"):
        g.op("clip", x, min=object())


def test_the_server_schema_refuses_ints_beyond_int64_and_non_finite_floats_naming_the_attribute():
    op = OpDef("t.op", 1, lambda x, **a: x, lambda g, out, x, **a: (g,),
               attrs={"n": Attr("int", 0), "ns": Attr("ints", None), "f": Attr("floats", None),
                      "g": Attr("floats", None, allow_nonfinite=True)})
    for given, name in (({"n": 1 << 63}, "n"), ({"ns": [1, -(1 << 63) - 1]}, "ns"), ({"f": [1.0, math.nan]}, "f"),
                        ({"n": True}, "n")):
        with pytest.raises(BadAttributeError) as info:
            check_attrs(op, given)
        assert info.value.field == f"attrs.{name}" and f"attribute '{name}'" in str(info.value)
    assert check_attrs(op, {"n": (1 << 63) - 1, "g": [math.inf]})["g"] == (math.inf,)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_layer_norm_epsilon_not_finite_is_refused_by_the_schema(value):
    op = load_plugins(entry_points=False, only=["builtin.nn"]).registry["layer_norm"]
    with pytest.raises(BadAttributeError) as info:
        check_attrs(op, {"epsilon": value})
    assert info.value.field == "attrs.epsilon" and info.value.reason == "BAD_ATTRIBUTE"


def test_a_plugin_whose_default_is_not_finite_without_allowing_it_is_broken():
    class Bad:
        @hookimpl
        def register_operators(self, register):
            register(OpDef("bad.op", 1, lambda x, *, v: x, lambda g, out, x, *, v: (g,), same_as_input,
                           attrs={"v": Attr("float", math.inf)}))

    loaded = load_plugins(entry_points=False, only=["bad"], extra=[("bad", Bad())])
    assert loaded.broken and "default of attribute 'v'" in loaded.broken[0].message
