"""Operator versions and the pins a graph may carry, through a real server.

The server runs the built-in operators and the example plugin chainrule-acme
(its module loaded from examples/, registered as distribution chainrule-acme
0.2.0). A graph's ``metadata["requires"]`` pins plugins, distributions and
operators; what the server cannot satisfy is FAILED_PRECONDITION naming what is
missing and what is installed, and the server keeps serving.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from chainrule.client import Client, FailedPrecondition, GraphBuilder, InvalidArgument
from chainrule.plugins.manager import chainrule_version, load_plugins
from chainrule.server import ServerConfig, create_server
from chainrule.server.grpc_server import build_service

ACME = Path(__file__).resolve().parents[1] / "examples" / "chainrule-acme" / "chainrule_acme" / "__init__.py"
INSTALLED = f"installed: chainrule {chainrule_version()}, chainrule-acme 0.2.0"


def acme_module():
    """chainrule_acme, imported from its file (sys.path untouched: no entry point leaks into other tests)."""
    spec = importlib.util.spec_from_file_location("chainrule_acme_for_versions", ACME,
                                                  submodule_search_locations=[str(ACME.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # a package: its relative import (.logcosh) finds it here
    try:
        spec.loader.exec_module(module)
    finally:
        for name in [n for n in sys.modules if n == spec.name or n.startswith(spec.name + ".")]:
            del sys.modules[name]
    return module


@pytest.fixture(scope="module")
def client():
    loaded = load_plugins(entry_points=False, only=["builtin", "acme"], disable=[], prefer=[],
                          extra=[("acme", acme_module(), "chainrule-acme", "0.2.0")])
    config = ServerConfig()
    server, port = create_server("127.0.0.1:0", config, service=build_service(config, loaded))
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=30) as c:
            yield c
    finally:
        server.stop(grace=None).wait()


def swish_graph(requires: str, op: str = "acme.swish"):
    g = GraphBuilder(metadata={"requires": requires})
    x = g.input("x", (2,))
    return g.op(op, x, name="h").sum(name="f")


def evaluate(client, requires: str, op: str = "acme.swish"):
    return client.evaluate(swish_graph(requires, op), x=np.array([0.5, -1.0]))


def test_every_operator_reports_its_distribution_and_version(client):
    listed = {op.name: op for op in client.operators()}
    assert {(op.distribution, op.version) for op in listed.values()} == {("chainrule", chainrule_version()),
                                                                       ("chainrule-acme", "0.2.0")}
    assert (listed["acme.gelu"].plugin, listed["acme.gelu"].distribution) == ("acme", "chainrule-acme")
    assert (listed["matmul"].plugin, listed["matmul"].version) == ("builtin.linalg", chainrule_version())


@pytest.mark.parametrize("requires", [
    "acme>=0.2", "chainrule-acme==0.2", "Chainrule_Acme>0.1.9", "acme<1, chainrule>=0.1", "op:acme.swish",
    "op:acme.swish>=0.2.0", "builtin, op:add", "",
])
def test_satisfied_pins_evaluate(client, requires):
    r = evaluate(client, requires)
    assert r.value == pytest.approx(0.5 / (1 + np.exp(-0.5)) - 1 / (1 + np.exp(1.0)))


@pytest.mark.parametrize("requires, message", [
    ("acme>=1.0", "graph requires 'acme>=1.0' but chainrule-acme 0.2.0 is installed"),
    ("chainrule-acme==0.1", "graph requires 'chainrule-acme==0.1' but chainrule-acme 0.2.0 is installed"),
    ("chainrule>=99", f"graph requires 'chainrule>=99' but chainrule {chainrule_version()} is installed"),
    ("op:acme.swish>=0.3", "graph requires 'op:acme.swish>=0.3' but chainrule-acme 0.2.0 is installed"),
    ("acme>=0.2, zeta>=1", f"graph requires 'zeta>=1' but no plugin or distribution 'zeta' is installed ({INSTALLED})"),
    ("op:acme.mish", f"graph requires operator 'acme.mish' but no installed plugin provides it ({INSTALLED})"),
])
def test_unsatisfied_pins_are_failed_precondition_naming_missing_and_installed(client, requires, message):
    with pytest.raises(FailedPrecondition) as info:
        evaluate(client, requires)
    assert info.value.message == message
    assert info.value.reason == "VERSION_MISMATCH" and info.value.field == "graph.metadata.requires"
    assert evaluate(client, "acme>=0.2").value != 0          # and the server keeps serving


def test_pins_are_checked_before_the_operators(client):
    """A graph for a plugin this server lacks says which plugin, rather than 'unknown operator'."""
    with pytest.raises(FailedPrecondition, match="no plugin or distribution 'zeta' is installed"):
        evaluate(client, "zeta>=1", op="zeta.wave")
    with pytest.raises(FailedPrecondition, match="operator 'zeta.wave' but no installed plugin provides it"):
        client.register(swish_graph("op:zeta.wave", op="zeta.wave").graph)


def test_an_unreadable_pin_is_invalid_argument(client):
    with pytest.raises(InvalidArgument, match=r"graph.metadata.requires: cannot read 'acme>>1'") as info:
        evaluate(client, "acme>>1")
    assert info.value.field == "graph.metadata.requires"
