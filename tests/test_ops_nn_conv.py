"""layer_norm (builtin.nn), einsum (builtin.linalg), conv, max_pool and avg_pool (builtin.conv).

Each operator is checked four ways: its vjp against finite differences (the
gradient checker, float64) for every attribute at non-default values; its
forward rule against an independent formulation (explicit Python loops over
tiny shapes for conv and the pools, the textbook formula for layer_norm,
numpy's own ``np.einsum`` string form for einsum), with the ONNX documentation's
worked examples as fixed values; float32 kept float32 and infer agreeing with
forward in every dtype; and every refusal, with its reason and field.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from chainrule.core import OpError, Registry, TensorSpec, check_attrs, unbroadcast
from chainrule.plugins.builtin import conv as conv_family
from chainrule.plugins.builtin import linalg, nn
from chainrule.plugins.testing import assert_vjp, check_operator

OPS = {op.name: op for family in (nn, linalg, conv_family) for op in family.OPERATORS}
MINE = ("layer_norm", "einsum", "conv", "max_pool", "avg_pool")


def run(name, *xs, **attrs):
    op = OPS[name]
    return op.apply(*xs, **check_attrs(op, attrs))[0]


def vjp(name, g, *xs, needs=None, **attrs):
    op = OPS[name]
    attrs = check_attrs(op, attrs)
    out, saved = op.apply(*xs, **attrs)
    return op.apply_vjp(g, out, *xs, saved=saved, needs=needs, **attrs)


def normal(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def distinct(*shape, seed=0):
    """Values at least 0.8 apart: no ties in a max_pool window, so finite differences apply."""
    rng = np.random.default_rng(seed)
    size = math.prod(shape)
    return ((rng.permutation(size) - size // 2) + rng.uniform(-0.1, 0.1, size)).reshape(shape)


# --- independent formulations: explicit loops on tiny shapes --------------------------------------

def _defaults(k, strides, pads, dilations):
    return (tuple(strides or (1,) * k), tuple(pads or (0,) * (2 * k)), tuple(dilations or (1,) * k))


def _out_sizes(sizes, kernel, strides, pads, dilations):
    k = len(sizes)
    return [(sizes[a] + pads[a] + pads[a + k] - dilations[a] * (kernel[a] - 1) - 1) // strides[a] + 1 for a in range(k)]


def _window(o, kernel, strides, pads, dilations):
    """Input positions of the window of output position o, row-major, None where it is padding."""
    k = len(o)
    for kk in itertools.product(*map(range, kernel)):
        yield kk, tuple(o[a] * strides[a] + kk[a] * dilations[a] - pads[a] for a in range(k))


def conv_loops(x, w, strides=None, pads=None, dilations=None, group=1):
    k = x.ndim - 2
    strides, pads, dilations = _defaults(k, strides, pads, dilations)
    n, c = x.shape[:2]
    m = w.shape[0]
    sizes, kernel = x.shape[2:], w.shape[2:]
    outs = _out_sizes(sizes, kernel, strides, pads, dilations)
    y = np.zeros((n, m, *outs))
    per_group_in, per_group_out = c // group, m // group
    for b, f in itertools.product(range(n), range(m)):
        first_channel = (f // per_group_out) * per_group_in
        for o in itertools.product(*map(range, outs)):
            total = 0.0
            for ch in range(per_group_in):
                for kk, pos in _window(o, kernel, strides, pads, dilations):
                    if all(0 <= pos[a] < sizes[a] for a in range(k)):
                        total += x[(b, first_channel + ch, *pos)] * w[(f, ch, *kk)]
            y[(b, f, *o)] = total
    return y


def pool_loops(kind, x, kernel_shape, strides=None, pads=None, count_include_pad=False):
    k = x.ndim - 2
    strides, pads, _ = _defaults(k, strides, pads, None)
    sizes = x.shape[2:]
    outs = _out_sizes(sizes, kernel_shape, strides, pads, (1,) * k)
    y = np.zeros(x.shape[:2] + tuple(outs))
    for b, ch in itertools.product(*map(range, x.shape[:2])):
        for o in itertools.product(*map(range, outs)):
            real = [x[(b, ch, *pos)] for _, pos in _window(o, kernel_shape, strides, pads, (1,) * k)
                    if all(0 <= pos[a] < sizes[a] for a in range(k))]
            if kind == "max":
                y[(b, ch, *o)] = max(real)
            else:
                y[(b, ch, *o)] = sum(real) / (math.prod(kernel_shape) if count_include_pad else len(real))
    return y


def max_pool_grad_loops(g, x, kernel_shape, strides=None, pads=None):
    """The first maximum of each window (row-major) takes the window's gradient; padding never does."""
    k = x.ndim - 2
    strides, pads, _ = _defaults(k, strides, pads, None)
    sizes = x.shape[2:]
    dx = np.zeros_like(x)
    for b, ch in itertools.product(*map(range, x.shape[:2])):
        for o in itertools.product(*map(range, g.shape[2:])):
            best = None
            for _, pos in _window(o, kernel_shape, strides, pads, (1,) * k):
                if all(0 <= pos[a] < sizes[a] for a in range(k)) and (best is None or x[(b, ch, *pos)] > x[(b, ch, *best)]):
                    best = pos
            dx[(b, ch, *best)] += g[(b, ch, *o)]
    return dx


def layer_norm_formula(x, scale, bias, axis=-1, epsilon=1e-5):
    axes = tuple(range(axis % x.ndim, x.ndim))
    return (x - x.mean(axis=axes, keepdims=True)) / np.sqrt(x.var(axis=axes, keepdims=True) + epsilon) * scale + bias


# --- conv ------------------------------------------------------------------------------------------

CONV_CASES = [
    pytest.param((2, 3, 5, 5), (4, 3, 3, 3), {}, id="defaults"),
    pytest.param((1, 2, 5, 6), (3, 2, 2, 2), {"strides": (2, 3)}, id="strides"),
    pytest.param((1, 2, 4, 5), (3, 2, 3, 2), {"pads": (1, 0, 2, 1)}, id="asymmetric-pads"),
    pytest.param((1, 2, 7, 6), (2, 2, 3, 2), {"dilations": (2, 3)}, id="dilations"),
    pytest.param((2, 4, 4, 4), (6, 2, 3, 3), {"group": 2, "pads": (1, 1, 1, 1)}, id="groups"),
    pytest.param((1, 3, 5, 4), (3, 1, 2, 3), {"group": 3}, id="depthwise"),
    pytest.param((1, 2, 7, 7), (2, 2, 3, 3), {"strides": (2, 2), "pads": (2, 1, 0, 3), "dilations": (1, 2)},
                 id="all-2d"),
    pytest.param((2, 2, 6, 5), (2, 1, 3, 3), {"pads": (1, 2, 1, 0), "dilations": (1, 1), "group": 2},
                 id="same-flat-asymmetric"),
    pytest.param((1, 2, 6, 6), (2, 2, 3, 3), {"pads": (2, 2, 2, 2), "dilations": (2, 2)}, id="same-flat-dilated"),
    pytest.param((1, 1, 3, 3), (2, 1, 2, 2), {"pads": (3, 3, 3, 3)}, id="pads-wider-than-kernel"),
    pytest.param((1, 2, 6, 6), (2, 2, 2, 2), {"strides": (3, 3)}, id="stride-skips-input"),
    pytest.param((2, 3, 4, 4), (5, 3, 1, 1), {}, id="1x1"),
    pytest.param((2, 3, 7), (4, 3, 3), {}, id="1d-defaults"),
    pytest.param((2, 2, 9), (4, 1, 3), {"strides": (2,), "pads": (2, 1), "dilations": (2,), "group": 2}, id="1d-all"),
    pytest.param((1, 2, 6), (3, 2, 3), {"pads": (1, 1)}, id="1d-same-flat"),
]


@pytest.mark.parametrize("x_shape, w_shape, attrs", CONV_CASES)
def test_conv_vjp_matches_finite_differences(x_shape, w_shape, attrs):
    assert_vjp(OPS["conv"], [normal(*x_shape, seed=1), normal(*w_shape, seed=2)], attrs)


@pytest.mark.parametrize("x_shape, w_shape, attrs", CONV_CASES)
def test_conv_forward_matches_explicit_loops(x_shape, w_shape, attrs):
    x, w = normal(*x_shape, seed=3), normal(*w_shape, seed=4)
    np.testing.assert_allclose(run("conv", x, w, **attrs), conv_loops(x, w, **attrs), rtol=1e-12, atol=1e-12)


def test_conv_onnx_documentation_examples():
    x = np.arange(25.0).reshape(1, 1, 5, 5)
    w = np.ones((1, 1, 3, 3))
    np.testing.assert_array_equal(run("conv", x, w, pads=(1, 1, 1, 1))[0, 0], [
        [12, 21, 27, 33, 24], [33, 54, 63, 72, 51], [63, 99, 108, 117, 81],
        [93, 144, 153, 162, 111], [72, 111, 117, 123, 84]])
    np.testing.assert_array_equal(run("conv", x, w)[0, 0], [[54, 63, 72], [99, 108, 117], [144, 153, 162]])
    np.testing.assert_array_equal(run("conv", x, w, strides=(2, 2), pads=(1, 1, 1, 1))[0, 0],
                                  [[12, 27, 24], [63, 108, 81], [72, 117, 84]])


def test_conv_gradients_match_loop_based_transposed_convolution():
    """dx by scattering g through each window and dw by gathering: explicit loops, for every case shape."""
    for param in CONV_CASES:
        x_shape, w_shape, attrs = param.values
        x, w = normal(*x_shape, seed=5), normal(*w_shape, seed=6)
        out = run("conv", x, w, **attrs)
        g = normal(*out.shape, seed=7)
        dx, dw = vjp("conv", g, x, w, **attrs)
        # the loop formulation: conv is linear in each input, so its vjp is the loop conv's adjoint
        ex = np.zeros_like(x)
        for idx in np.ndindex(*x.shape):
            e = np.zeros_like(x)
            e[idx] = 1.0
            ex[idx] = np.sum(conv_loops(e, w, **attrs) * g)
        ew = np.zeros_like(w)
        for idx in np.ndindex(*w.shape):
            e = np.zeros_like(w)
            e[idx] = 1.0
            ew[idx] = np.sum(conv_loops(x, e, **attrs) * g)
        np.testing.assert_allclose(dx, ex, rtol=1e-11, atol=1e-12, err_msg=param.id)
        np.testing.assert_allclose(dw, ew, rtol=1e-11, atol=1e-12, err_msg=param.id)


def test_conv_chunked_batches_give_the_same_results(monkeypatch):
    """The batch runs in chunks that fit WORKSPACE_BYTES; one sample at a time gives the same numbers."""
    x, w = normal(5, 4, 6, 6, seed=8), normal(6, 2, 3, 3, seed=9)
    for attrs in ({"pads": (1, 1, 1, 1), "group": 2}, {"strides": (2, 1), "pads": (0, 1, 2, 0), "group": 2}):
        out = run("conv", x, w, **attrs)
        g = normal(*out.shape, seed=10)
        dx, dw = vjp("conv", g, x, w, **attrs)
        monkeypatch.setattr(conv_family, "WORKSPACE_BYTES", 1)
        np.testing.assert_allclose(run("conv", x, w, **attrs), out, rtol=1e-13, atol=1e-13)
        dx1, dw1 = vjp("conv", g, x, w, **attrs)
        np.testing.assert_allclose(dx1, dx, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(dw1, dw, rtol=1e-13, atol=1e-13)
        monkeypatch.undo()


def test_conv_skips_the_gradient_nobody_needs(monkeypatch):
    op = OPS["conv"]
    assert op.selective_vjp
    x, w = normal(2, 3, 5, 5), normal(4, 3, 3, 3)
    g = np.ones((2, 4, 3, 3))
    dx, dw = vjp("conv", g, x, w, needs=(False, True))
    assert dx is None and dw.shape == w.shape

    def no_columns(*args, **kwargs):
        raise AssertionError("dx alone needs no im2col columns")

    attrs = check_attrs(op, {})
    out = op.forward(x, w, **attrs)
    monkeypatch.setattr(conv_family._Im2col, "columns", no_columns)
    dx, dw = op.vjp(g, out, x, w, needs=(True, False), **attrs)
    assert dw is None and dx.shape == x.shape
    assert op.vjp(g, out, x, w, needs=(False, False), **attrs) == (None, None)


def test_conv_empty_batch():
    out = run("conv", np.zeros((0, 2, 4, 4)), np.ones((3, 2, 3, 3)), pads=(1, 1, 1, 1))
    assert out.shape == (0, 3, 4, 4)
    dx, dw = vjp("conv", np.zeros(out.shape), np.zeros((0, 2, 4, 4)), np.ones((3, 2, 3, 3)), pads=(1, 1, 1, 1))
    assert dx.shape == (0, 2, 4, 4) and np.array_equal(dw, np.zeros((3, 2, 3, 3)))


# --- max_pool, avg_pool ----------------------------------------------------------------------------

POOL_CASES = [
    pytest.param((2, 2, 5, 5), {"kernel_shape": (2, 2)}, id="defaults"),
    pytest.param((1, 2, 6, 7), {"kernel_shape": (3, 2), "strides": (2, 3)}, id="strides"),
    pytest.param((1, 2, 5, 4), {"kernel_shape": (3, 3), "pads": (1, 2, 2, 0)}, id="asymmetric-pads"),
    pytest.param((1, 2, 6, 6), {"kernel_shape": (3, 3), "strides": (2, 2), "pads": (1, 1, 1, 1)}, id="all-2d"),
    pytest.param((1, 1, 4, 4), {"kernel_shape": (4, 4)}, id="global"),
    pytest.param((2, 2, 7), {"kernel_shape": (3,)}, id="1d-defaults"),
    pytest.param((2, 2, 8), {"kernel_shape": (3,), "strides": (2,), "pads": (2, 1)}, id="1d-all"),
]


@pytest.mark.parametrize("shape, attrs", POOL_CASES)
def test_max_pool_vjp_matches_finite_differences(shape, attrs):
    assert_vjp(OPS["max_pool"], [distinct(*shape, seed=1)], attrs)


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("shape, attrs", POOL_CASES)
def test_avg_pool_vjp_matches_finite_differences(shape, attrs, include):
    assert_vjp(OPS["avg_pool"], [normal(*shape, seed=1)], {**attrs, "count_include_pad": include})


@pytest.mark.parametrize("shape, attrs", POOL_CASES)
def test_pools_match_explicit_loops(shape, attrs):
    x = normal(*shape, seed=2)
    np.testing.assert_allclose(run("max_pool", x, **attrs), pool_loops("max", x, **attrs), rtol=1e-14)
    for include in (False, True):
        np.testing.assert_allclose(run("avg_pool", x, **attrs, count_include_pad=include),
                                   pool_loops("avg", x, **attrs, count_include_pad=include), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("shape, attrs", POOL_CASES)
def test_max_pool_gradient_goes_to_the_first_maximum(shape, attrs):
    """With ties everywhere (integers 0..2), the first maximum of each window in row-major order takes it."""
    x = np.random.default_rng(3).integers(0, 3, shape).astype(np.float64)
    out = run("max_pool", x, **attrs)
    g = normal(*out.shape, seed=4)
    (dx,) = vjp("max_pool", g, x, **attrs)
    np.testing.assert_allclose(dx, max_pool_grad_loops(g, x, **attrs), rtol=1e-14)


def test_max_pool_ties_and_padding():
    x = np.full((1, 1, 2, 3), 5.0)
    (dx,) = vjp("max_pool", np.ones((1, 1, 1, 2)), x, kernel_shape=(2, 2))
    np.testing.assert_array_equal(dx[0, 0], [[1, 1, 0], [0, 0, 0]])      # each window's first 5 gets it
    negative = -np.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    out = run("max_pool", negative, kernel_shape=(2, 2), pads=(1, 1, 1, 1))
    assert out.max() < 0                                                  # the padding (-inf) never wins
    (dx,) = vjp("max_pool", np.ones(out.shape), negative, kernel_shape=(2, 2), pads=(1, 1, 1, 1))
    assert dx.sum() == out.size                                           # every window's gradient lands in x


def test_max_pool_nan_wins_as_in_forward():
    x = np.array([[[1.0, np.nan, 3.0, 0.0]]])
    out = run("max_pool", x, kernel_shape=(2,))
    assert np.isnan(out[0, 0, :2]).all() and out[0, 0, 2] == 3.0
    (dx,) = vjp("max_pool", np.ones(3), x, kernel_shape=(2,))
    np.testing.assert_array_equal(dx[0, 0], [0, 2, 1, 0])


def test_pool_onnx_documentation_examples():
    x = np.arange(1.0, 26.0).reshape(1, 1, 5, 5)
    np.testing.assert_array_equal(run("max_pool", x, kernel_shape=(5, 5), pads=(2, 2, 2, 2))[0, 0], [
        [13, 14, 15, 15, 15], [18, 19, 20, 20, 20], [23, 24, 25, 25, 25], [23, 24, 25, 25, 25], [23, 24, 25, 25, 25]])
    np.testing.assert_array_equal(run("max_pool", x, kernel_shape=(2, 2), strides=(2, 2))[0, 0], [[7, 9], [17, 19]])
    np.testing.assert_allclose(run("avg_pool", x, kernel_shape=(5, 5), pads=(2, 2, 2, 2))[0, 0], [
        [7, 7.5, 8, 8.5, 9], [9.5, 10, 10.5, 11, 11.5], [12, 12.5, 13, 13.5, 14],
        [14.5, 15, 15.5, 16, 16.5], [17, 17.5, 18, 18.5, 19]], rtol=1e-15)
    np.testing.assert_allclose(run("avg_pool", x, kernel_shape=(5, 5), pads=(2, 2, 2, 2), count_include_pad=True)[0, 0], [
        [2.52, 3.6, 4.8, 4.08, 3.24], [4.56, 6.4, 8.4, 7.04, 5.52], [7.2, 10.0, 13.0, 10.8, 8.4],
        [6.96, 9.6, 12.4, 10.24, 7.92], [6.12, 8.4, 10.8, 8.88, 6.84]], rtol=1e-14)


# --- layer_norm ------------------------------------------------------------------------------------

LAYER_NORM_CASES = [
    pytest.param((2, 5), (5,), (5,), {}, id="defaults"),
    pytest.param((2, 3, 4), (3, 4), (3, 4), {"axis": 1}, id="axis-1"),
    pytest.param((2, 3, 4), (4,), (), {"axis": -2}, id="axis--2-broadcast-scale"),
    pytest.param((3, 4), (3, 1), (1,), {"axis": 0}, id="axis-0"),
    pytest.param((2, 6), (6,), (6,), {"epsilon": 0.5}, id="epsilon"),
    pytest.param((4,), (), (4,), {"axis": -1, "epsilon": 1e-3}, id="1d"),
]


@pytest.mark.parametrize("x, scale, bias, attrs", LAYER_NORM_CASES)
def test_layer_norm_vjp_matches_finite_differences(x, scale, bias, attrs):
    assert_vjp(OPS["layer_norm"], [normal(*x, seed=1), normal(*scale, seed=2), normal(*bias, seed=3)], attrs)


@pytest.mark.parametrize("x, scale, bias, attrs", LAYER_NORM_CASES)
def test_layer_norm_matches_the_formula(x, scale, bias, attrs):
    xs = [normal(*x, seed=4) * 3 + 1, normal(*scale, seed=5), normal(*bias, seed=6)]
    np.testing.assert_allclose(run("layer_norm", *xs, **attrs), layer_norm_formula(*xs, **attrs), rtol=1e-12, atol=1e-13)


def test_layer_norm_gradients_in_closed_form():
    """With scale 1 and bias 0 over one row: dx = (g - mean(g) - x̂ mean(g x̂)) / std."""
    x, g = np.array([[1.0, 2.0, 4.0, 7.0]]), np.array([[0.5, -1.0, 2.0, 0.0]])
    std = np.sqrt(x.var() + 1e-5)
    xhat = (x - x.mean()) / std
    dx, dscale, dbias = vjp("layer_norm", g, x, np.ones(4), np.zeros(4))
    np.testing.assert_allclose(dx, (g - g.mean() - xhat * np.mean(g * xhat)) / std, rtol=1e-12)
    np.testing.assert_allclose(unbroadcast(dscale, (4,)), (g * xhat)[0], rtol=1e-12)
    np.testing.assert_allclose(unbroadcast(dbias, (4,)), g[0])


def test_layer_norm_skips_the_gradients_nobody_needs():
    assert OPS["layer_norm"].selective_vjp
    x, scale, bias = normal(2, 3), normal(3), normal(3)
    dx, dscale, dbias = vjp("layer_norm", np.ones((2, 3)), x, scale, bias, needs=(False, True, False))
    assert dx is None and dbias is None and dscale.shape == (2, 3)
    full = vjp("layer_norm", np.ones((2, 3)), x, scale, bias)
    part = vjp("layer_norm", np.ones((2, 3)), x, scale, bias, needs=(True, False, False))
    np.testing.assert_array_equal(part[0], full[0])


# --- einsum ----------------------------------------------------------------------------------------

EINSUM_CASES = [
    ("ij,jk->ik", [(2, 3), (3, 4)]),
    ("ij,jk", [(2, 3), (3, 4)]),                    # implicit: "ik"
    ("ba", [(2, 3)]),                               # implicit: sorted, a transpose
    ("Ba", [(2, 3)]),                               # implicit: upper case sorts first
    ("bij,bjk->bik", [(2, 2, 3), (2, 3, 2)]),
    ("...ij,...jk->...ik", [(2, 1, 2, 3), (3, 3, 2)]),
    ("...i,...i", [(2, 3), (4, 1, 3)]),             # implicit with an ellipsis: "...", broadcast
    ("i...->...", [(3, 2, 2)]),
    ("i->...", [(3,)]),
    ("ii->", [(3, 3)]),                             # trace
    ("ii", [(3, 3)]),                               # implicit trace
    ("ii->i", [(3, 3)]),                            # diagonal
    ("iij,j->i", [(2, 2, 3), (3,)]),
    ("ijji->ij", [(2, 3, 3, 2)]),
    ("iii->i", [(2, 2, 2)]),
    ("i,j->ij", [(3,), (4,)]),                      # outer product
    ("i,i", [(1,), (3,)]),                          # a size-1 axis broadcast against 3
    ("ij,ij->ij", [(1, 3), (2, 3)]),
    ("ij->", [(2, 3)]),
    ("ij->j", [(2, 3)]),                            # i summed over one operand only
    ("ijk->kji", [(2, 3, 4)]),
    ("ij,jk,kl->il", [(2, 3), (3, 2), (2, 4)]),
    ("abc,cd,de->abe", [(2, 3, 4), (4, 2), (2, 3)]),
    (" i j , j k -> i k ", [(2, 3), (3, 2)]),       # whitespace is ignored
    ("->", [()]),
    (",i->i", [(), (3,)]),
    ("ij,jk->ik", [(20, 30), (30, 40)]),            # large enough for numpy's optimized (BLAS) path
]


@pytest.mark.parametrize("equation, shapes", EINSUM_CASES, ids=[c[0] for c in EINSUM_CASES])
def test_einsum_vjp_matches_finite_differences(equation, shapes):
    xs = [normal(*s, seed=i) for i, s in enumerate(shapes)]
    assert_vjp(OPS["einsum"], xs, {"equation": equation})


@pytest.mark.parametrize("equation, shapes", EINSUM_CASES, ids=[c[0] for c in EINSUM_CASES])
def test_einsum_matches_numpy(equation, shapes):
    xs = [normal(*s, seed=i + 10) for i, s in enumerate(shapes)]
    spec = OPS["einsum"].infer(*map(TensorSpec.of, xs), equation=equation)
    expected = np.einsum(equation, *xs)
    got = run("einsum", *xs, equation=equation)
    assert tuple(spec.shape) == np.shape(expected) == np.shape(got)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_einsum_gradients_in_closed_form():
    a, b, g = normal(2, 3), normal(3, 4), normal(2, 4)
    da, db = vjp("einsum", g, a, b, equation="ij,jk->ik")
    np.testing.assert_allclose(da, g @ b.T, rtol=1e-13)
    np.testing.assert_allclose(db, a.T @ g, rtol=1e-13)
    (dm,) = vjp("einsum", np.float64(2.5), normal(3, 3), equation="ii->")   # d trace = identity
    np.testing.assert_array_equal(dm, 2.5 * np.eye(3))
    (dm,) = vjp("einsum", np.array([1.0, 2.0, 3.0]), normal(3, 3), equation="ii->i")
    np.testing.assert_array_equal(dm, np.diag([1.0, 2.0, 3.0]))
    (dx,) = vjp("einsum", np.array([1.0, -1.0, 2.0]), normal(2, 3), equation="ij->j")  # broadcast over i
    np.testing.assert_array_equal(dx, [[1.0, -1.0, 2.0]] * 2)
    dx, dy = vjp("einsum", np.array(1.5), np.array([2.0]), np.array([1.0, 2.0, 3.0]), equation="i,i")
    assert dx.shape == (1,) and dx[0] == pytest.approx(9.0) and np.array_equal(dy, [3.0, 3.0, 3.0])


def test_einsum_skips_the_gradients_nobody_needs():
    assert OPS["einsum"].selective_vjp
    a, b = normal(2, 3), normal(3, 4)
    da, db = vjp("einsum", np.ones((2, 4)), a, b, needs=(False, True), equation="ij,jk->ik")
    assert da is None and db.shape == (3, 4)


def test_einsum_integer_inputs_keep_numpys_dtype():
    a = np.arange(6, dtype=np.int32).reshape(2, 3)
    out = run("einsum", a, a, equation="ij,ij->i")
    assert out.dtype == np.int32 and np.array_equal(out, [5, 50])
    spec = OPS["einsum"].infer(TensorSpec.of(a), TensorSpec((3,), np.dtype("float32")), equation="ij,j->i")
    assert spec.dtype == np.float64                 # int32 with float32 is float64, as numpy


# --- float32 stays float32; infer agrees with forward in every dtype ------------------------------

SAMPLE_CASES = [
    ("conv", [normal(2, 4, 5, 5), normal(6, 2, 3, 3)], {"group": 2, "pads": (1, 0, 1, 2), "strides": (2, 1)}),
    ("conv", [normal(2, 3, 6), normal(4, 3, 3)], {"pads": (1, 1)}),
    ("max_pool", [distinct(2, 2, 5, 5)], {"kernel_shape": (3, 3), "pads": (1, 1, 1, 1), "strides": (2, 2)}),
    ("max_pool", [distinct(2, 2, 6)], {"kernel_shape": (2,)}),
    ("avg_pool", [normal(2, 2, 5, 5)], {"kernel_shape": (3, 2), "pads": (1, 1, 1, 0), "count_include_pad": False}),
    ("avg_pool", [normal(2, 2, 5, 5)], {"kernel_shape": (3, 3), "pads": (1, 1, 1, 1), "count_include_pad": True}),
    ("layer_norm", [normal(2, 3, 4), normal(3, 4), normal(4)], {"axis": 1}),
    ("einsum", [normal(2, 3), normal(3, 4)], {"equation": "ij,jk->ik"}),
    ("einsum", [normal(3, 3)], {"equation": "ii->i"}),
    ("einsum", [normal(2, 3), normal(3), normal(2)], {"equation": "ij,j,i->"}),
]
CASE_IDS = [f"{name}-{i}" for i, (name, _, _) in enumerate(SAMPLE_CASES)]


@pytest.mark.parametrize("name, xs, attrs", SAMPLE_CASES, ids=CASE_IDS)
def test_float32_inputs_give_float32_values_and_gradients(name, xs, attrs):
    op = OPS[name]
    attrs = check_attrs(op, attrs)
    xs32 = [x.astype(np.float32) for x in xs]
    out32, saved32 = op.apply(*xs32, **attrs)
    out64, saved64 = op.apply(*xs, **attrs)
    out32, out64 = np.asarray(out32), np.asarray(out64)
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, out64, rtol=1e-4, atol=1e-4)
    g = normal(*out32.shape, seed=7)
    grads32 = op.apply_vjp(g.astype(np.float32), out32, *xs32, saved=saved32, **attrs)
    grads64 = op.apply_vjp(g, out64, *xs, saved=saved64, **attrs)
    for x, g32, g64 in zip(xs32, grads32, grads64):
        assert np.asarray(g32).dtype == np.float32, name
        np.testing.assert_allclose(unbroadcast(g32, x.shape), unbroadcast(g64, x.shape), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float64", "float32", "int64", "int32", "bool"])
@pytest.mark.parametrize("name, xs, attrs", SAMPLE_CASES, ids=CASE_IDS)
def test_infer_gives_exactly_what_forward_returns(name, xs, attrs, dtype):
    op = OPS[name]
    attrs = check_attrs(op, attrs)
    xs = [(x > 0) if dtype == "bool" else (x * 3).astype(dtype) for x in xs]
    try:
        spec = op.infer(*[TensorSpec.of(x) for x in xs], **attrs)
    except OpError as exc:                           # only einsum refuses, and only all-bool inputs
        assert (name, dtype, exc.reason) == ("einsum", "bool", "DTYPE_MISMATCH"), exc
        return
    out = np.asarray(op.apply(*xs, **attrs)[0])
    assert TensorSpec.of(out) == TensorSpec(tuple(spec.shape), np.dtype(spec.dtype))


@pytest.mark.parametrize("name, xs, attrs", SAMPLE_CASES, ids=CASE_IDS)
def test_rules_do_not_depend_on_memory_layout(name, xs, attrs):
    op = OPS[name]
    attrs = check_attrs(op, attrs)
    out, saved = op.apply(*xs, **attrs)
    out = np.asarray(out)
    g = normal(*out.shape, seed=5)
    expected = op.apply_vjp(g, out, *xs, saved=saved, **attrs)
    strided = [np.repeat(x, 2, axis=-1)[..., ::2] if x.ndim else x for x in xs]
    reversed_ = [x[..., ::-1][..., ::-1] if x.ndim else x for x in xs]
    fortran = [np.asfortranarray(x) if x.ndim else x for x in xs]
    for other in (strided, reversed_, fortran):
        other_out, other_saved = op.apply(*other, **attrs)
        np.testing.assert_allclose(other_out, out, rtol=1e-13, atol=1e-14)
        got = op.apply_vjp(np.asfortranarray(g) if g.ndim else g, out, *other, saved=other_saved, **attrs)
        for a, b in zip(got, expected):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name, xs, attrs", SAMPLE_CASES, ids=CASE_IDS)
def test_rules_do_not_write_into_their_arguments(name, xs, attrs):
    op = OPS[name]
    attrs = check_attrs(op, attrs)
    for x in xs:
        x.flags.writeable = False
    try:
        out, saved = op.apply(*xs, **attrs)
        out = np.asarray(out)
        g = normal(*out.shape, seed=5)
        g.flags.writeable = False
        out.flags.writeable = False
        for array in (saved if isinstance(saved, tuple) else (saved,)):  # residuals are read, not written
            if isinstance(array, np.ndarray):
                array.flags.writeable = False
        op.apply_vjp(g, out, *xs, saved=saved, **attrs)
    finally:
        for x in xs:
            x.flags.writeable = True


# --- the operators' own samples, and the table -----------------------------------------------------

@pytest.mark.parametrize("name", MINE)
def test_operator_samples_pass_the_gradient_check(name):
    for seed in range(4):
        reports = check_operator(OPS[name], np.random.default_rng(seed))
        assert reports
        for report in reports:
            assert report.passed, str(report)


def test_the_operators_follow_the_contract():
    ops = [OPS[name] for name in MINE]
    Registry(ops)                                    # validates each OpDef
    for op in ops:
        assert op.infer is not None and op.sample is not None, op.name
        assert op.doc and "\n" not in op.doc and op.doc.endswith("."), op.name
    assert OPS["einsum"].variadic
    assert [op.name for op in conv_family.OPERATORS] == ["conv", "max_pool", "avg_pool",  # and their derivatives' helpers
                                                          "conv_grad_x", "conv_grad_w", "max_pool_grad", "max_pool_pick",
                                                          "avg_pool_grad"]


# --- refusals ------------------------------------------------------------------------------------

F64 = np.dtype("float64")

REFUSALS = [
    # conv: shapes
    ("conv", [(2, 3, 5), (4, 3, 3, 3)], {}, "must have the rank of x", "SHAPE_MISMATCH", None),
    ("conv", [(2, 3, 5, 5, 5), (4, 3, 3, 3, 3)], {}, r"NCW or NCHW input \(rank 3 or 4\)", "SHAPE_MISMATCH", None),
    ("conv", [(2, 3), (4, 3)], {}, "NCW or NCHW", "SHAPE_MISMATCH", None),
    ("conv", [(2, 4, 5, 5), (4, 3, 3, 3)], {}, "takes 3 channels per group; x .* has 4 channels", "SHAPE_MISMATCH", None),
    ("conv", [(2, 4, 5, 5), (4, 4, 3, 3)], {"group": 2}, "takes 4 channels per group", "SHAPE_MISMATCH", None),
    ("conv", [(2, 3, 2, 2), (4, 3, 3, 3)], {}, r"kernel \(w 3: extent 3\) is larger than the padded input along "
                                               r"spatial axis 0 \(2 \+ pads 0 \+ 0 = 2\)", "SHAPE_MISMATCH", None),
    ("conv", [(2, 3, 5, 5), (4, 3, 3, 3)], {"dilations": (3, 1)}, r"w 3 dilated by 3: extent 7", "SHAPE_MISMATCH", None),
    ("conv", [(2, 3, 4), (4, 3, 3)], {"dilations": (2,), "pads": (0, 0)}, "extent 5", "SHAPE_MISMATCH", None),
    ("conv", [(2, 3, 5, 5), (4, 3, 0, 3)], {}, "kernel of size 0", "SHAPE_MISMATCH", None),
    # conv: attributes
    ("conv", [(2, 3, 5, 5), (4, 3, 3, 3)], {"strides": (1,)}, "strides has 1 entries; the input has 2 spatial axes",
     "BAD_ATTRIBUTE", "attrs.strides"),
    ("conv", [(2, 3, 5), (4, 3, 3)], {"strides": (1, 1)}, "strides has 2 entries; the input has 1 spatial axis",
     "BAD_ATTRIBUTE", "attrs.strides"),
    ("conv", [(2, 3, 5, 5), (4, 3, 3, 3)], {"strides": (0, 1)}, "strides must all be >= 1", "BAD_ATTRIBUTE",
     "attrs.strides"),
    ("conv", [(2, 3, 5, 5), (4, 3, 3, 3)], {"pads": (1, 1)}, r"pads has 2 entries.*needs 4 \(all begins, then all ends\)",
     "BAD_ATTRIBUTE", "attrs.pads"),
    ("conv", [(2, 3, 5, 5), (4, 3, 3, 3)], {"pads": (0, 0, -1, 0)}, "pads must all be >= 0", "BAD_ATTRIBUTE",
     "attrs.pads"),
    ("conv", [(2, 3, 5, 5), (4, 3, 3, 3)], {"dilations": (1, 1, 1)}, "dilations has 3 entries", "BAD_ATTRIBUTE",
     "attrs.dilations"),
    ("conv", [(2, 3, 5, 5), (4, 3, 3, 3)], {"dilations": (1, 0)}, "dilations must all be >= 1", "BAD_ATTRIBUTE",
     "attrs.dilations"),
    ("conv", [(2, 3, 5, 5), (4, 3, 3, 3)], {"group": 0}, "group must be >= 1", "BAD_ATTRIBUTE", "attrs.group"),
    ("conv", [(2, 3, 5, 5), (4, 1, 3, 3)], {"group": 2}, "3 input channels .* not divisible by group 2",
     "BAD_ATTRIBUTE", "attrs.group"),
    ("conv", [(2, 4, 5, 5), (3, 2, 3, 3)], {"group": 2}, "3 output channels .* not divisible by group 2",
     "BAD_ATTRIBUTE", "attrs.group"),
    # pools
    ("max_pool", [(2, 3, 5)], {"kernel_shape": (2, 2)}, "kernel_shape has 2 entries; the input has 1 spatial axis",
     "BAD_ATTRIBUTE", "attrs.kernel_shape"),
    ("max_pool", [(2, 3, 5, 5)], {"kernel_shape": (2, 0)}, "kernel_shape must all be >= 1", "BAD_ATTRIBUTE",
     "attrs.kernel_shape"),
    ("max_pool", [(2, 3, 5, 5)], {"kernel_shape": (2, 2), "strides": (1, 1, 1)}, "strides has 3 entries",
     "BAD_ATTRIBUTE", "attrs.strides"),
    ("avg_pool", [(2, 3, 5, 5)], {"kernel_shape": (2, 2), "pads": (1, 1, 1)}, "pads has 3 entries", "BAD_ATTRIBUTE",
     "attrs.pads"),
    ("max_pool", [(2, 3, 5, 5)], {"kernel_shape": (2, 2), "pads": (0, 2, 0, 0)},
     r"pads \[0, 2, 0, 0\] must be smaller than kernel_shape \[2, 2\]", "BAD_ATTRIBUTE", "attrs.pads"),
    ("avg_pool", [(2, 3, 5, 5)], {"kernel_shape": (2, 2), "pads": (0, 0, 0, 2)}, "must be smaller than kernel_shape",
     "BAD_ATTRIBUTE", "attrs.pads"),
    ("max_pool", [(2, 3, 3, 3)], {"kernel_shape": (4, 2)}, r"kernel \(kernel_shape 4: extent 4\) is larger than the "
                                                          r"padded input along spatial axis 0", "SHAPE_MISMATCH", None),
    ("avg_pool", [(2, 3, 3)], {"kernel_shape": (5,), "pads": (1, 0)}, r"\(3 \+ pads 1 \+ 0 = 4\)", "SHAPE_MISMATCH", None),
    ("avg_pool", [(3, 5)], {"kernel_shape": (2,)}, "avg_pool takes an NCW or NCHW input", "SHAPE_MISMATCH", None),
    ("max_pool", [(1, 1, 2, 3, 5)], {"kernel_shape": (2, 2, 2)}, "max_pool takes an NCW or NCHW input",
     "SHAPE_MISMATCH", None),
    # layer_norm
    ("layer_norm", [(2, 3), (3,), (3,)], {"axis": 2}, "axis 2 is out of range for a tensor of rank 2",
     "BAD_ATTRIBUTE", "attrs.axis"),
    ("layer_norm", [(), (), ()], {}, "axis -1 is out of range for a tensor of rank 0", "BAD_ATTRIBUTE", "attrs.axis"),
    ("layer_norm", [(2, 3), (3,), (3,)], {"epsilon": -1e-5}, "epsilon must be a finite number >= 0", "BAD_ATTRIBUTE",
     "attrs.epsilon"),
    # (a NaN or infinite epsilon is refused by the attribute schema first: test_checks_by_default.py)
    ("layer_norm", [(2, 3), (2,), (3,)], {}, r"scale of shape \[2\] does not broadcast to the normalized shape \[3\]",
     "SHAPE_MISMATCH", None),
    ("layer_norm", [(2, 3), (3,), (2, 3)], {}, r"bias of shape \[2, 3\] does not broadcast", "SHAPE_MISMATCH", None),
    ("layer_norm", [(2, 3, 4), (3, 4), (5,)], {"axis": 1}, r"bias of shape \[5\] .* \[3, 4\]", "SHAPE_MISMATCH", None),
    # einsum: the equation itself
    ("einsum", [(2, 3)], {"equation": "ij->j->i"}, "may only appear together, once, as '->'", "BAD_ATTRIBUTE",
     "attrs.equation"),
    ("einsum", [(2, 3)], {"equation": "ij-"}, "'->'", "BAD_ATTRIBUTE", "attrs.equation"),
    ("einsum", [(2, 3)], {"equation": "i1"}, "operand 0 has '1'; subscripts are the letters", "BAD_ATTRIBUTE",
     "attrs.equation"),
    ("einsum", [(3,)], {"equation": "..i"}, "a '.' that is not part of an ellipsis", "BAD_ATTRIBUTE", "attrs.equation"),
    ("einsum", [(3, 4, 5)], {"equation": "i...j..."}, "more than one ellipsis", "BAD_ATTRIBUTE", "attrs.equation"),
    ("einsum", [(3, 3)], {"equation": "ii->ii"}, "the output repeats subscript 'i'", "BAD_ATTRIBUTE", "attrs.equation"),
    ("einsum", [(2, 3)], {"equation": "ij->k"}, "output subscript 'k' is in no operand", "BAD_ATTRIBUTE",
     "attrs.equation"),
    ("einsum", [(2, 3)], {"equation": "ij,jk->ik"}, "has 2 operands but 1 input is given", "BAD_ATTRIBUTE",
     "attrs.equation"),
    ("einsum", [(2, 3), (3,), (3,)], {"equation": "ij,j"}, "has 2 operands but 3 inputs are given", "BAD_ATTRIBUTE",
     "attrs.equation"),
    # einsum: the equation against the shapes
    ("einsum", [(2, 3, 4)], {"equation": "ij->ij"}, r"operand 0 has 2 subscripts but input 0 has shape \[2, 3, 4\] "
                                                   r"\(use '...'", "SHAPE_MISMATCH", None),
    ("einsum", [(2,)], {"equation": "...ij->...ji"}, "operand 0 has 2 subscripts", "SHAPE_MISMATCH", None),
    ("einsum", [(2, 3)], {"equation": "ii"}, "repeats subscript 'i' on axes of sizes 2 and 3", "SHAPE_MISMATCH", None),
    ("einsum", [(2,), (3,)], {"equation": "i,i"}, "subscript 'i' has sizes 2 and 3", "SHAPE_MISMATCH", None),
    ("einsum", [(2,), (3,)], {"equation": "...,..."}, "the '...' axes have sizes 2 and 3", "SHAPE_MISMATCH", None),
    ("einsum", [(2, 3)], {"equation": "...i->i"}, "have no '...' in the output", "SHAPE_MISMATCH", None),
]


@pytest.mark.parametrize("name, shapes, attrs, message, reason, field", REFUSALS,
                         ids=[f"{r[0]}-{i}" for i, r in enumerate(REFUSALS)])
def test_infer_refuses_with_the_reason_and_the_attribute(name, shapes, attrs, message, reason, field):
    op = OPS[name]
    with pytest.raises(OpError, match=message) as info:
        op.infer(*[TensorSpec(s, F64) for s in shapes], **check_attrs(op, attrs))
    assert info.value.reason == reason
    if field is not None:
        assert info.value.field == field
    with pytest.raises(OpError, match=message):     # forward refuses the same way, for a caller without infer
        op.forward(*[np.zeros(s) for s in shapes], **check_attrs(op, attrs))


def test_einsum_refuses_all_bool_inputs_and_long_equations_stay_short():
    with pytest.raises(OpError, match="all inputs are bool") as info:
        OPS["einsum"].infer(TensorSpec((2,), np.dtype("bool")), equation="i->")
    assert info.value.reason == "DTYPE_MISMATCH"
    with pytest.raises(OpError) as info:
        OPS["einsum"].infer(TensorSpec((2,), F64), equation="i" * 200_000)
    assert len(str(info.value)) < 300 and "200000 characters" in str(info.value)


def test_einsum_refuses_more_labels_than_numpy_has():
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXY"      # 51 letters, 2 more axes under '...'
    with pytest.raises(OpError, match="more than 52 distinct subscripts") as info:
        OPS["einsum"].infer(TensorSpec((1,) * 53, F64), equation=f"...{letters}->...")
    assert info.value.reason == "BAD_ATTRIBUTE"


def test_missing_kernel_shape_is_a_missing_attribute():
    from chainrule.core import BadAttributeError

    for name in ("max_pool", "avg_pool"):
        with pytest.raises(BadAttributeError, match="missing required attribute 'kernel_shape'"):
            check_attrs(OPS[name], {})
    with pytest.raises(BadAttributeError, match="missing required attribute 'equation'"):
        check_attrs(OPS["einsum"], {})


# --- through the client and the engine -----------------------------------------------------------

def test_a_small_cnn_through_the_client():
    """conv -> layer_norm -> max_pool -> avg_pool -> einsum: values and gradients as the rules give them."""
    from chainrule.client import GraphBuilder, ops
    from chainrule.server import LocalClient

    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((2, 3, 6, 6)), "w": rng.standard_normal((4, 3, 3, 3)) * 0.3,
             "scale": rng.standard_normal((6, 6)), "bias": rng.standard_normal((6,)),
             "v": rng.standard_normal((4,))}
    g = GraphBuilder()
    x, w = g.input("x", (2, 3, 6, 6)), g.input("w", (4, 3, 3, 3))
    scale, bias, v = g.input("scale", (6, 6)), g.input("bias", (6,)), g.input("v", (4,))
    h = ops.conv(x, w, pads=[1, 1, 1, 1], name="h")
    n = ops.layer_norm(h, scale, bias, axis=2, name="n")
    p = ops.max_pool(n, [2, 2], strides=[2, 2], name="p")
    a = ops.avg_pool(p, [2, 2], pads=[1, 1, 0, 0], count_include_pad=True, name="a")
    f = ops.einsum("ncij,c->", a, v, name="f")
    assert [var.dtype for var in (h, n, p, a, f)] == ["float64"] * 5
    with LocalClient() as client:
        result = client.evaluate(f, **feeds)

    def forward(values):
        hv = run("conv", values["x"], values["w"], pads=(1, 1, 1, 1))
        nv = run("layer_norm", hv, values["scale"], values["bias"], axis=2)
        pv = run("max_pool", nv, kernel_shape=(2, 2), strides=(2, 2))
        av = run("avg_pool", pv, kernel_shape=(2, 2), pads=(1, 1, 0, 0), count_include_pad=True)
        return run("einsum", av, values["v"], equation="ncij,c->")

    assert float(result.value) == pytest.approx(float(forward(feeds)), rel=1e-12)
    for name in ("w", "scale", "v"):                  # central differences through the whole chain
        numeric = np.zeros_like(feeds[name])
        for idx in np.ndindex(*feeds[name].shape):
            up, down = {**feeds, name: feeds[name].copy()}, {**feeds, name: feeds[name].copy()}
            up[name][idx] += 1e-6
            down[name][idx] -= 1e-6
            numeric[idx] = (forward(up) - forward(down)) / 2e-6
        np.testing.assert_allclose(result.grad[name], numeric, rtol=1e-5, atol=1e-7, err_msg=name)


def test_the_builder_guesses_the_servers_dtypes():
    from chainrule.client import GraphBuilder, ops

    g = GraphBuilder()
    x32, w32 = g.input("x", (1, 2, 4, 4), "float32"), g.input("w", (3, 2, 3, 3), "float32")
    i32 = g.input("i", (1, 2, 4, 4), "int32")
    assert ops.conv(x32, w32).dtype == "float32"
    assert ops.conv(i32, w32).dtype == "float64"
    assert ops.max_pool(x32, [2, 2]).dtype == "float32" and ops.avg_pool(i32, [2, 2]).dtype == "float64"
    assert ops.layer_norm(x32, g.input("s", (4,), "float32"), g.input("b", (4,), "float32")).dtype == "float32"
    assert ops.einsum("nchw->c", i32).dtype == "int32"
    node = ops.conv(x32, w32, strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1], group=1)
    assert node.op == "conv"
