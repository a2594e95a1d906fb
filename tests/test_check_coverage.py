"""The gradient checker covers the attribute schema and the dtypes (issue 17, item 4).

Every case of a check is recorded with its attributes; attributes the sample rule leaves at
one value are varied by the checker (or over the values the author declares with ``vary=``);
float32 inputs must give float32 outputs and gradients. The plugins are installed as
distributions with entry points (test_check.Site), as pip would leave them.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from chainrule.core import Attr, OpDef
from chainrule.core.errors import InvalidOperatorError
from chainrule.plugins import OperatorSet, Sample, hookimpl
from chainrule.plugins.checking import CheckCache, check_registry
from chainrule.plugins.manager import load_plugins
from chainrule.plugins.testing import check_operator
from chainrule.server import ServerConfig
from chainrule.server.grpc_server import build_service
from chainrule.v1 import chainrule_pb2 as pb

from test_check import run_cli, site  # noqa: F401 (site: a fixture, throwaway installed distributions)

CONV = '''
import numpy as np
from chainrule.core import OpError, TensorSpec
from chainrule.plugins import OperatorSet

ops = OperatorSet()


def _windows(n, k, stride):
    return np.arange((n - k) // stride + 1)[:, None] * stride + np.arange(k)


def _infer(x, w, *, stride):
    if stride < 1:
        raise OpError(f"stride must be >= 1, got {stride}", reason="BAD_ATTRIBUTE", field="attrs.stride")
    if len(x.shape) != 1 or len(w.shape) != 1 or w.shape[0] > x.shape[0]:
        raise OpError(f"expected x [n] and w [k] with k <= n, got {x} and {w}", reason="SHAPE_MISMATCH")
    return TensorSpec(((x.shape[0] - w.shape[0]) // stride + 1,), np.result_type(x.dtype, w.dtype))


def _sample(rng):
    """Signals of 7 to 10 samples, kernels of 2 or 3; the stride is left at its default."""
    n, k = int(rng.integers(7, 11)), int(rng.integers(2, 4))
    return [rng.standard_normal(n), rng.standard_normal(k)], {}


@ops.operator("cov.conv1d", infer=_infer, stride=1)
def conv1d(x, w, *, stride):
    """Valid 1-d cross-correlation of x [n] with w [k], with a stride."""
    return x[_windows(x.shape[0], w.shape[0], stride)] @ w


@conv1d.vjp
def _(g, out, x, w, *, stride):
    idx = _windows(x.shape[0], w.shape[0], 1)[: out.shape[0]]  # the bug: windows one apart whatever the stride
    dx = np.zeros_like(x)
    np.add.at(dx, idx, g[:, None] * w)
    return dx, g @ x[idx]


conv1d.sample(_sample)


@ops.operator("cov.conv1d_ok", infer=_infer, stride=1, vary={"stride": (0, 2, 3)})
def conv1d_ok(x, w, *, stride):
    """The same, with a right vjp; the checker is told to try strides 0 (refused), 2 and 3."""
    return x[_windows(x.shape[0], w.shape[0], stride)] @ w


@conv1d_ok.vjp
def _(g, out, x, w, *, stride):
    idx = _windows(x.shape[0], w.shape[0], stride)
    dx = np.zeros_like(x)
    np.add.at(dx, idx, g[:, None] * w)
    return dx, g @ x[idx]


conv1d_ok.sample(_sample)

register_operators = ops.hookimpl()
'''

LEAK = '''
import numpy as np
from chainrule.core import TensorSpec
from chainrule.plugins import OperatorSet, float_like_input

ops = OperatorSet()


@ops.operator("leak.scale", infer=float_like_input, k=2.0)
def scale(x, *, k):
    """k x, through a float64 scalar: float32 x gives float64 (the leak)."""
    return x * np.float64(k)


@scale.vjp
def _(g, out, x, *, k):
    return (g * k,)


@ops.operator("leak.scale_grad", infer=float_like_input, k=2.0)
def scale_grad(x, *, k):
    """k x, right in forward; its vjp builds a float64 array."""
    return x * k


@scale_grad.vjp
def _(g, out, x, *, k):
    return (g * np.full(x.shape, k),)


@ops.operator("leak.widen", infer=lambda x: TensorSpec(x.shape, np.dtype(np.float64)))
def widen(x):
    """float64 on purpose: its infer rule says so."""
    return x.astype(np.float64)


@widen.vjp
def _(g, out, x):
    return (g.astype(x.dtype),)


register_operators = ops.hookimpl()
'''

MODE = '''
import numpy as np
from chainrule.plugins import OperatorSet, scalar_of_input

ops = OperatorSet()


def _reduce(x, *, mode):
    return x.sum() if mode == "sum" else x.mean()


def _vjp(g, out, x, *, mode):
    return (np.full(x.shape, g),)  # right for "sum" only


checked = ops.operator("mode.reduce", infer=scalar_of_input, mode="sum", vary={"mode": ("sum", "mean")})(_reduce)
checked.vjp(_vjp)
unchecked = ops.operator("mode.reduce_unvaried", infer=scalar_of_input, mode="sum")(_reduce)
unchecked.vjp(_vjp)
quiet = ops.operator("mode.shift", n=1, vary={"n": ()})(lambda x, *, n: x + n)
quiet.vjp(lambda g, out, x, *, n: (g,))

register_operators = ops.hookimpl()
'''


@pytest.fixture
def installed(site):
    site.install("chainrule-cov", "1.0.0", "cov", CONV)
    site.install("chainrule-leak", "1.0.0", "leak", LEAK)
    site.install("chainrule-mode", "1.0.0", "mode", MODE)
    return site


def checks_of(plugin: str) -> dict:
    return {c.op: c for c in check_registry(load_plugins(only=[plugin]).registry)}


# --- attributes the sample leaves at default -----------------------------------------------------

def test_a_vjp_wrong_only_for_a_stride_the_sample_never_draws_is_caught_naming_the_value(installed):
    checks = checks_of("cov")
    bad = checks["cov.conv1d"]
    assert not bad.passed and bad.distribution == "chainrule-cov"
    assert "plugin 'cov' (distribution chainrule-cov 1.0.0): operator cov.conv1d: input 0 at" in bad.message
    assert ", attrs stride=2 (stride=2 is a value the checker tried: the sample rule never draws it; add it to the " \
        "sample rule or to vary= to keep it checked)" in bad.message
    assert [(c.kind, dict(c.attrs)["stride"], c.status) for c in bad.cases] == [
        ("sample", "1", "passed"), ("sample", "1", "passed"), ("sample", "1", "passed"),
        ("varied", "2", "FAILED"), ("float32", "1", "passed")]
    assert bad.cases[3].varied == "stride" and bad.cases[3].inputs.startswith("float64[")


def test_declared_values_replace_the_automatic_ones_and_a_refused_value_is_skipped(installed):
    ok = checks_of("cov")["cov.conv1d_ok"]
    assert ok.passed and ok.skipped == 1
    assert [(dict(c.attrs)["stride"], c.status) for c in ok.cases if c.kind == "varied"] == [
        ("0", "skipped"), ("2", "passed"), ("3", "passed")]
    skipped = next(c for c in ok.cases if c.status == "skipped")
    assert skipped.note == ("infer refuses stride=0: OpError: stride must be >= 1, got 0")
    assert ok.attrs_text() == "stride=1,2,3"


def test_chainrule_check_shows_the_attributes_of_every_case(installed, capsys):
    code, out, _ = run_cli(capsys, "check", "--plugin", "cov", "--cases")
    assert code == 1
    header, *rows = out.split("\n\n")[0].splitlines()
    assert header.split()[:7] == ["OPERATOR", "PLUGIN", "SHAPES", "TRIED", "ATTRIBUTES", "TRIED", "MAX"]
    table = {line.split()[0]: line.split() for line in rows}
    assert "stride=1,2" in table["cov.conv1d"] and table["cov.conv1d"][-1] == "FAILED"
    assert "stride=1,2,3" in table["cov.conv1d_ok"] and table["cov.conv1d_ok"][-1] == "passed"
    lines = out.splitlines()
    assert "  varied stride: float64[10], float64[3]; stride=2: FAILED: input 0 at (3,): vjp gives -1.45576, " \
        "finite differences give 0.307148 (abs error 1.76)" in lines
    assert "  varied stride: float64[10], float64[3]; stride=0: skipped: infer refuses stride=0: OpError: stride " \
        "must be >= 1, got 0" in lines
    assert "  float32: float32[10], float32[3]; stride=1: passed" in lines
    assert "2 operators: 1 passed, 1 failed, 0 exempt (gradcheck=False); 1 varied case skipped" in out

    code, out, _ = run_cli(capsys, "check", "--plugin", "cov", "--json")
    rows = {row["op"]: row for row in json.loads(out)}
    assert code == 1 and rows["cov.conv1d"]["result"] == "FAILED" and rows["cov.conv1d"]["distribution"] == "chainrule-cov"
    varied = [c for c in rows["cov.conv1d"]["cases"] if c["kind"] == "varied"]
    assert varied == [dict(varied[0], attrs={"stride": "2"}, varied="stride", result="FAILED")]


def test_serve_refuses_the_operator_wrong_for_a_stride_its_sample_never_draws(installed, tmp_path):
    service = build_service(ServerConfig(plugins=["cov"], check_cache_file=str(tmp_path / "checks.json")))
    assert service.checks == {"cov.conv1d": pb.CHECK_FAILED, "cov.conv1d_ok": pb.CHECK_PASSED}
    assert "cov.conv1d" not in service.registry and "cov.conv1d_ok" in service.registry
    # the verdict and its cases come back from the cache unchanged
    cache = CheckCache(tmp_path / "checks.json")
    cached = cache.get(load_plugins(only=["cov"]).registry["cov.conv1d"])
    assert cached is not None and cached == checks_of("cov")["cov.conv1d"]


def test_strings_are_varied_over_declared_values_only_and_vary_empty_turns_variation_off(installed):
    checks = checks_of("mode")
    bad = checks["mode.reduce"]
    assert not bad.passed and bad.message.endswith(
        "attrs mode='mean' (mode='mean' is a value the checker tried: the sample rule never draws it; add it to the "
        "sample rule or to vary= to keep it checked)")
    # no schema lists a string's choices: without vary= the same bug goes unseen (the guide says so)
    assert checks["mode.reduce_unvaried"].passed
    assert [c.kind for c in checks["mode.reduce_unvaried"].cases] == ["default"] * 3 + ["float32"]
    assert [c.kind for c in checks["mode.shift"].cases] == ["default"] * 3 + ["float32"]


def test_bools_both_ways_axes_over_the_input_and_floats_off_their_default():
    seen = {}

    def forward(x, *, flip, axis, beta):
        seen.setdefault("calls", []).append((flip, axis, beta))
        return np.cumsum(x[::-1] if flip else x, axis=axis) * beta

    def vjp(g, out, x, *, flip, axis, beta):
        dx = np.flip(np.cumsum(np.flip(g, axis), axis), axis) * beta
        return (dx[::-1] if flip else dx,)

    op = OpDef("t.cumsum", 1, forward, vjp, attrs={"flip": Attr("bool", False), "axis": Attr("int", 0),
                                                   "beta": Attr("float", 1.0)})
    reports = check_operator(op)
    varied = [(r.varied, r.attrs[r.varied]) for r in reports if r.kind == "varied"]
    assert varied == [("flip", True), ("axis", 1), ("axis", -1), ("beta", 1.5)]
    assert all(r.passed for r in reports), "\n".join(map(str, reports))
    assert all(r.attrs.keys() == {"flip", "axis", "beta"} for r in reports)  # every case shows every attribute


# --- float32 stays float32 -----------------------------------------------------------------------

def test_a_float64_leak_in_forward_or_vjp_is_caught_and_a_declared_float64_is_not(installed):
    checks = checks_of("leak")
    assert checks["leak.scale"].message == (
        "plugin 'leak' (distribution chainrule-leak 1.0.0): operator leak.scale: float32 inputs gave a float64 output "
        "(infer promised float32): a float64 constant or dtype in forward promotes the result; keep to the inputs' "
        "dtype (x.dtype, NumPy scalars of it, or Python floats); inputs float32[], attrs k=2.0")
    assert "operator leak.scale_grad: vjp gave float32 input 0 a float64 gradient" in checks["leak.scale_grad"].message
    # both pass finite differences: only the float32 case fails
    assert [c.status for c in checks["leak.scale"].cases] == ["passed"] * 4 + ["FAILED"]
    assert checks["leak.widen"].passed and checks["leak.widen"].cases[-1].kind == "float32"


# --- declaring variations: mistakes are named ----------------------------------------------------

def test_vary_naming_no_attribute_or_a_value_of_the_wrong_kind_is_refused_at_declaration():
    ops = OperatorSet()
    with pytest.raises(InvalidOperatorError, match=r"operator 'v.op': vary= names 'strid', which is not one of its "
                                                   r"attributes \(stride\); name a declared attribute"):
        ops.operator("v.op", stride=1, vary={"strid": (2,)})
    with pytest.raises(InvalidOperatorError, match=r"vary\['stride'\] \(int\): expected an int, got str"):
        ops.operator("v.op", stride=1, vary={"stride": ("2",)})


def test_a_sample_varying_an_unknown_attribute_refuses_the_plugin_naming_it():
    class Odd:
        @hookimpl
        def register_operators(self, register):
            register(OpDef("odd.neg", 1, lambda x, *, k: -x, lambda g, out, x, *, k: (-g,),
                           attrs={"k": Attr("int", 1)}, sample=Sample(None, vary={"kk": (2,)})))

    loaded = load_plugins(entry_points=False, only=["odd"], extra=[("odd", Odd(), "chainrule-odd", "2.0")])
    (broken,) = loaded.broken
    assert broken.message == (
        "plugin 'odd' (distribution chainrule-odd 2.0) was not loaded: operator 'odd.neg': vary= names 'kk', which is "
        "not one of its attributes (k); fix: name a declared attribute in vary=, or declare the attribute, or leave "
        "the plugin out with CHAINRULE_DISABLE_PLUGINS=odd")
