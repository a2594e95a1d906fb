"""chainrule-acme's own tests: values, gradients (with chainrule's checker) and a graph run.

Run with ``pytest`` from this folder once chainrule and this package are
installed (``pip install -e .``), or with ``PYTHONPATH=.`` beside an installed chainrule.
"""
from __future__ import annotations

import numpy as np
import pytest

import chainrule_acme
from chainrule.client import GraphBuilder, InvalidArgument
from chainrule.server import LocalClient
from chainrule.plugins.manager import load_plugins
from chainrule.plugins.jax_bridge import jax_available
from chainrule.plugins.testing import assert_vjp, check_operator

RNG = np.random.default_rng(7)


@pytest.fixture(scope="module")
def loaded():
    """The built-in operators plus this plugin, registered the way the entry point would."""
    return load_plugins(entry_points=False, only=["builtin", "acme"], extra=[("acme", chainrule_acme)])


@pytest.fixture(scope="module")
def acme(loaded):
    return {name: loaded.registry[name] for name in ("acme.swish", "acme.gelu", "acme.huber")}


def test_the_plugin_registers_three_operators_and_logcosh_with_jax(loaded):
    (info,) = [p for p in loaded.plugins if p.name == "acme"]
    with_jax = ["acme.logcosh"] if jax_available() else []
    assert info.operators == ["acme.swish", "acme.gelu", "acme.huber", *with_jax]
    assert loaded.registry["acme.swish"].attrs["beta"].default == 1.0
    assert loaded.registry["acme.huber"].arity == 2


@pytest.mark.parametrize("name", ["acme.swish", "acme.gelu", "acme.huber"])
def test_every_operator_passes_the_gradient_check(acme, name):
    reports = check_operator(acme[name])
    assert reports and all(r.passed for r in reports), "\n".join(map(str, reports))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 2.5])
def test_swish_gradient_for_several_betas(acme, beta):
    assert_vjp(acme["acme.swish"], [RNG.standard_normal((3, 4))], {"beta": beta})


def test_huber_gradient_with_broadcast_target_and_both_regimes(acme):
    pred = np.array([[-3.0, -0.2, 0.1, 2.5], [0.4, -1.7, 4.0, 0.0]])
    report = assert_vjp(acme["acme.huber"], [pred, np.array([0.1, 0.2, -0.3, 0.5])], {"delta": 1.0})
    assert [c.shape for c in report.inputs] == [(2, 4), (4,)]


def test_values(acme):
    swish, gelu, huber = acme["acme.swish"], acme["acme.gelu"], acme["acme.huber"]
    x = np.array([-2.0, 0.0, 1.0])
    np.testing.assert_allclose(swish.forward(x, beta=1.0), x / (1 + np.exp(-x)))
    np.testing.assert_allclose(gelu.apply(np.array([0.0, 1.0]))[0], [0.0, 0.8411919906082768])
    # residuals 0.5 (quadratic: 0.125) and 3 (linear: 1 * (3 - 0.5) = 2.5), averaged
    assert huber.forward(np.array([0.5, 3.0]), np.zeros(2), delta=1.0) == pytest.approx((0.125 + 2.5) / 2)


def test_float32_stays_float32(acme):
    x = RNG.standard_normal(5).astype(np.float32)
    assert acme["acme.swish"].forward(x, beta=1.0).dtype == np.float32
    assert acme["acme.gelu"].apply(x)[0].dtype == np.float32


def test_a_graph_through_the_service(loaded):
    g = GraphBuilder()
    x, y = g.input("x", (4,)), g.input("y", (4,))
    loss = g.op("acme.huber", g.op("acme.swish", x, beta=2.0, name="h"), y, delta=0.5, name="loss")
    xs, ys = RNG.standard_normal(4), RNG.standard_normal(4)
    with LocalClient(loaded) as client:
        result = client.evaluate(loss, x=xs, y=ys)
    h = xs / (1 + np.exp(-2.0 * xs))
    r = h - ys
    assert result.value == pytest.approx(np.mean(np.where(np.abs(r) <= 0.5, 0.5 * r * r, 0.5 * (np.abs(r) - 0.25))))
    np.testing.assert_allclose(result.grad[y], -np.clip(r, -0.5, 0.5) / 4)


def test_a_non_positive_delta_is_refused_naming_the_node(loaded):
    g = GraphBuilder()
    x = g.input("x", (3,))
    loss = g.op("acme.huber", x, g.const(np.zeros(3)), delta=0.0, name="loss")
    with LocalClient(loaded) as client, pytest.raises(InvalidArgument, match="loss.*delta must be > 0") as info:
        client.evaluate(loss, x=np.ones(3))
    assert info.value.reason == "BAD_ATTRIBUTE" and info.value.node == "loss"


@pytest.mark.skipif(not jax_available(), reason="acme.logcosh needs JAX (pip install 'chainrule-acme[jax]')")
def test_logcosh_from_jax_values_gradient_and_float32(loaded):
    op = loaded.registry["acme.logcosh"]
    x = np.array([-30.0, -1.0, 0.0, 0.5, 30.0])
    np.testing.assert_allclose(op.forward(x), np.log(np.cosh(x)), rtol=1e-12)
    (dx,) = op.vjp(np.ones(5), None, x)
    np.testing.assert_allclose(dx, np.tanh(x), rtol=1e-12)
    assert op.forward(x.astype(np.float32)).dtype == np.float32
    reports = check_operator(op)
    assert reports and all(r.passed for r in reports), "\n".join(map(str, reports))
