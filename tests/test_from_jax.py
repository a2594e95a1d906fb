"""chainrule.plugins.from_jax: operators from JAX functions (issue 17, item 8).

Needs the jax extra (``pip install -e '.[test,jax]'``, which ``make test`` installs). Without
JAX the tests are skipped, except in CI (``CI`` set), where a missing JAX is a failure.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest

from chainrule.client import Client, GraphBuilder, InvalidArgument
from chainrule.core import OpError, TensorSpec
from chainrule.plugins import OperatorSet, from_jax
from chainrule.plugins.checking import check_op
from chainrule.plugins.jax_bridge import JAX_MISSING, jax_available
from chainrule.plugins.manager import load_plugins
from chainrule.plugins.testing import check_operator
from chainrule.server import ServerConfig, create_server
from chainrule.server.grpc_server import build_service

if os.environ.get("CI"):
    import jax  # noqa: F401  (CI installs the jax extra: its absence is a failure, not a skip)
jax = pytest.importorskip("jax")
jnp = jax.numpy

ROOT = Path(__file__).resolve().parents[1]


def logcosh(x):
    """log(cosh(x)), without overflow."""
    return jnp.logaddexp(x, -x) - jnp.log(2.0)


def strided_sum(x, w, *, stride, scale):
    """scale * sum of x[::stride] * w (w as long as the strided x): a static int and a traced float."""
    return scale * jnp.sum(x[::stride] * w)


def pick(x, idx):
    """x[idx] * 2: an int input, which has no gradient."""
    return 2.0 * x[idx]


@pytest.fixture(scope="module")
def ops():
    return {
        "logcosh": from_jax("jx.logcosh", logcosh),
        "strided": from_jax("jx.strided", strided_sum, stride=1, scale=1.0,
                            sample=lambda rng: ([rng.standard_normal(6), rng.standard_normal(3)], {"stride": 2})),
        "pick": from_jax("jx.pick", pick, sample=lambda rng: ([rng.standard_normal(5), np.array([0, 3, 3])], {})),
    }


def test_importing_chainrule_plugins_does_not_import_jax():
    code = "import sys, chainrule.plugins, chainrule.plugins.jax_bridge; print('jax' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


def test_the_rules_forward_vjp_and_infer(ops):
    op = ops["logcosh"]
    assert (op.arity, op.doc, op.attrs) == (1, "log(cosh(x)), without overflow.", {})
    x = np.array([-40.0, -1.0, 0.0, 0.5, 40.0])
    out = op.forward(x)
    assert type(out) is np.ndarray and out.dtype == np.float64
    np.testing.assert_allclose(out, np.log(np.cosh(x)), rtol=1e-13)
    (dx,) = op.vjp(np.ones(5), out, x)
    np.testing.assert_allclose(dx, np.tanh(x), rtol=1e-13)
    assert op.forward(x.astype(np.float32)).dtype == np.float32          # float32 stays float32
    assert op.vjp(np.ones(5, np.float32), None, x.astype(np.float32))[0].dtype == np.float32
    assert op.infer(TensorSpec((2, 3), np.dtype(np.float32))) == TensorSpec((2, 3), np.dtype(np.float32))


def test_int_inputs_get_no_gradient_and_static_attributes_change_shapes(ops):
    x = np.arange(5.0)
    assert ops["pick"].vjp(np.ones(3), None, x, np.array([0, 3, 3]))[1] is None
    np.testing.assert_array_equal(ops["pick"].vjp(np.ones(3), None, x, np.array([0, 3, 3]))[0], [2, 0, 0, 4, 0])
    strided = ops["strided"]
    assert strided.attrs["stride"].kind == "int" and strided.attrs["scale"].kind == "float"
    assert strided.infer(TensorSpec((6,), np.dtype("float64")), TensorSpec((3,), np.dtype("float64")),
                         stride=2, scale=1.0) == TensorSpec((), np.dtype("float64"))
    with pytest.raises(OpError, match=r"jx.strided: the JAX function cannot take inputs float64\[6\], float64\[3\]"):
        strided.infer(TensorSpec((6,), np.dtype("float64")), TensorSpec((3,), np.dtype("float64")), stride=1, scale=1.0)


def test_a_new_float_attribute_does_not_recompile(ops):
    strided = ops["strided"]
    x, w = np.arange(6.0), np.ones(3)
    values = [strided.forward(x, w, stride=2, scale=s) for s in (1.0, 2.5, -3.0)]
    assert [float(v) for v in values] == [6.0, 15.0, -18.0]
    jitted, _ = strided.forward.__self__._compiled()
    assert jitted._cache_size() == 1                     # scale is traced; stride is static (one compilation)
    strided.forward(np.arange(9.0), w, stride=3, scale=1.0)
    assert jitted._cache_size() == 2


def test_the_operators_pass_the_gradient_checker_float32_included(ops):
    for op in ops.values():
        verdict = check_op(op)
        assert verdict.passed, verdict.message
        assert verdict.cases[-1].kind == "float32" and verdict.cases[-1].status == "passed"
    kinds = [(r.kind, r.varied) for r in check_operator(ops["strided"])]
    assert ("varied", "stride") in kinds and ("varied", "scale") in kinds   # the sample leaves scale at 1.0


def test_a_wrong_jax_function_is_still_checked_for_float32():
    leaky = from_jax("jx.leaky", lambda x: x * jnp.asarray(2.0, dtype=jnp.float64))
    verdict = check_op(leaky)
    # infer comes from jax.eval_shape, so it says float64 too: that is no declaration
    assert not verdict.passed and "operator jx.leaky: float32 inputs gave a float64 output: a float64 constant" \
        in verdict.message
    declared = from_jax("jx.widen", lambda x: x * jnp.asarray(2.0, dtype=jnp.float64),
                        infer=lambda x: TensorSpec(x.shape, np.dtype(np.float64)))
    assert check_op(declared).passed


def test_served_over_grpc_checked_at_start(tmp_path):
    ops = OperatorSet()
    ops.add(from_jax("jx.logcosh", logcosh))
    ops.add(from_jax("jx.strided", strided_sum, stride=1, scale=1.0,
                     sample=lambda rng: ([rng.standard_normal(6), rng.standard_normal(3)], {"stride": 2})))
    plugin = types.SimpleNamespace(register_operators=ops.hookimpl())
    loaded = load_plugins(entry_points=False, only=["builtin.reduce", "jx"],
                          extra=[("jx", plugin, "chainrule-jx", "0.1.0")])
    config = ServerConfig(check_cache_file=str(tmp_path / "checks.json"))
    server, port = create_server("127.0.0.1:0", config, service=build_service(config, loaded))
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=60) as client:
            listed = {op.name: op for op in client.operators()}
            g = GraphBuilder()
            x = g.input("x", (4,))
            f = g.op("jx.logcosh", x, name="h").sum(name="f")
            xs = np.array([-2.0, -0.1, 0.3, 5.0])
            result = client.evaluate(f, x=xs)
            g32 = GraphBuilder()
            x32 = g32.input("x", (4,), dtype="float32")
            r32 = client.evaluate(g32.op("jx.logcosh", x32).sum(), x=xs.astype(np.float32))
            bad = GraphBuilder()
            a, b = bad.input("a", (6,)), bad.input("b", (3,))
            with pytest.raises(InvalidArgument) as info:   # stride 1: 6 elements against 3
                client.evaluate(bad.op("jx.strided", a, b, stride=1, name="s"), a=np.ones(6), b=np.ones(3))
            strided = client.evaluate(bad.op("jx.strided", a, b, stride=2, scale=0.5), a=np.arange(6.0), b=np.ones(3))
    finally:
        server.stop(grace=None).wait()
    assert listed["jx.logcosh"].check == "passed" and listed["jx.logcosh"].distribution == "chainrule-jx"
    assert result.value == pytest.approx(np.sum(np.log(np.cosh(xs))), rel=1e-13)
    np.testing.assert_allclose(result.grad[x], np.tanh(xs), rtol=1e-13)
    assert r32.grad[x32].dtype == np.float32
    assert info.value.node == "s" and "jx.strided: the JAX function cannot take inputs float64[6], float64[3]" \
        in str(info.value)
    assert strided.value == 3.0 and list(strided.grad["a"]) == [0.5, 0, 0.5, 0, 0.5, 0]


def test_acme_registers_logcosh_from_jax_only_when_jax_is_installed():
    acme = ROOT / "examples" / "chainrule-acme"
    script = textwrap.dedent("""
        import sys
        if sys.argv[1] == "without":
            sys.modules["jax"] = None          # as if JAX were not installed
        import chainrule_acme
        from chainrule.plugins.manager import load_plugins
        loaded = load_plugins(entry_points=False, only=["acme"], extra=[("acme", chainrule_acme)])
        print(",".join(loaded.plugins[0].operators), "jax" in sys.modules and sys.modules["jax"] is not None)
    """)
    env = {**os.environ, "PYTHONPATH": str(acme)}
    for mode, expected in (("with", "acme.swish,acme.gelu,acme.huber,acme.logcosh False"),
                           ("without", "acme.swish,acme.gelu,acme.huber False")):
        done = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=60, env=env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == expected          # and loading the plugin did not import JAX


def test_without_jax_from_jax_says_how_to_install_it():
    code = "import sys; sys.modules['jax'] = None\nfrom chainrule.plugins import from_jax\nfrom_jax('x.f', abs)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and f"ImportError: {JAX_MISSING}" in done.stderr
    assert jax_available()
