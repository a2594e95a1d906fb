"""Derivatives as graphs (chainrule.core.symbolic, docs/derivatives.md): the symbolic rules of the arith,
elementwise, reduce, linalg and derivative families against the numpy rules and finite differences.

For every operator of those families, on its gradient-check samples (kinks avoided) in float64:

* the symbolic gradient (derive_reverse) equals the engine's numpy gradient;
* the Hessian-vector product (a graph with a ``grad`` node, derived again) equals central finite
  differences of the numpy gradients along the vector;
* the JVP (derive_forward) equals the reverse-mode Jacobian (one numpy backward pass per output element)
  times the tangents.

Then the seeds' worked examples: full Hessians of the staged circuit and the sigmoid neuron, HVPs of the
4-layer network, a third derivative of sin(exp(x)) against its closed form.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from chainrule.core import GraphIR, InputDecl, Node, compile_graph, evaluate
from chainrule.core.errors import MissingRuleError, SeedError
from chainrule.core.symbolic import derive_forward, derive_reverse
from chainrule.plugins.testing import sample_inputs

from symbolic_checks import EPS, R, check_hvp, close as _close, numpy_grads as _numpy_grads, run as _run
FAMILIES = ("builtin.arith", "builtin.elementwise", "builtin.reduce", "builtin.linalg", "builtin.derivative")
OPS = sorted(op.name for op in R if op.plugin in FAMILIES)


def _op_graph(name: str, inputs: list[np.ndarray], attrs: dict, weights: np.ndarray | None):
    """x0, x1... -> y = op(x...) -> L = sum(y * w) (w a constant of y's shape)."""
    decls = [InputDecl(f"x{i}", x.dtype.name, x.shape) for i, x in enumerate(inputs)]
    nodes = [Node("y", name, tuple(d.name for d in decls), dict(attrs))]
    if weights is not None:
        nodes += [Node("w", "const", (), {"value": weights}), Node("yw", "mul", ("y", "w")), Node("L", "sum", ("yw",))]
    return GraphIR(tuple(decls), tuple(nodes), ("L",) if weights is not None else ("y",))


def _cases(name: str):
    op = R[name]
    cases = sample_inputs(op, np.random.default_rng(sum(map(ord, name))))
    if name in ("prod_except",):  # its symbolic gradient divides by x: exact only off zeros (docs)
        cases = [(xs, a) for xs, a in cases if all(np.all(x != 0) for x in xs)]
    return [([np.asarray(x) for x in xs], attrs) for xs, attrs in cases]


@pytest.mark.parametrize("name", OPS)
def test_every_operator_of_these_families_has_both_symbolic_rules(name):
    op = R[name]
    assert callable(op.vjp_graph) and callable(op.jvp_graph), name


@pytest.mark.parametrize("name", OPS)
def test_gradient_hvp_and_jvp_match_numpy_rules_and_finite_differences(name):
    rng = np.random.default_rng(7)
    checked = 0
    for inputs, attrs in _cases(name):
        y_graph = _op_graph(name, inputs, attrs, None)
        feeds = {f"x{i}": x for i, x in enumerate(inputs)}
        y = _run(y_graph, feeds)["y"]
        if y.dtype.kind != "f":
            continue
        floats = [f"x{i}" for i, x in enumerate(inputs) if x.dtype.kind == "f"]
        shapes = [inputs[int(w[1:])].shape for w in floats]
        weights = rng.standard_normal(y.shape)
        graph = _op_graph(name, inputs, attrs, weights)

        # first order: the symbolic gradient is the numpy rule's
        derived, names = derive_reverse(graph, R, output="L", wrt=floats)
        values = _run(derived, feeds)
        for w, expected in zip(floats, _numpy_grads(graph, feeds, "L", floats)):
            _close(values[names.gradients[w]], expected, f"{name} gradient of {w}")

        # second order: H v through a grad node, against finite differences of the numpy gradients
        vs = {f"v.{w}": rng.standard_normal(s) for w, s in zip(floats, shapes)}
        check_hvp(graph, "L", floats, feeds, vs, f"{name} ")

        # forward mode: the JVP is the reverse-mode Jacobian times the tangents
        ts = {w: rng.standard_normal(s) for w, s in zip(floats, shapes)}
        forward, fnames = derive_forward(y_graph, R, output="y", wrt=floats)
        jvp = _run(forward, {**feeds, **{fnames.tangents[w]: ts[w] for w in floats}})[fnames.tangent_output]
        expected = np.zeros(y.size)
        for k in range(y.size):
            seed = np.zeros(y.size)
            seed[k] = 1.0
            rows = _numpy_grads(y_graph, feeds, "y", floats, seed=seed.reshape(y.shape))
            expected[k] = sum(float(np.sum(r * ts[w])) for r, w in zip(rows, floats))
        _close(jvp, expected.reshape(y.shape), f"{name} JVP")
        checked += 1
    assert checked or name in ("argmax", "argmin"), f"{name}: no case with a float output"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gradients_keep_the_inputs_dtype_and_shape_under_broadcasting(dtype):
    x = InputDecl("x", dtype, (3,))
    y = InputDecl("y", "float64", (2, 3))
    graph = GraphIR((x, y), (Node("p", "mul", ("x", "y")), Node("f", "sum", ("p",))), ("f",))
    derived, names = derive_reverse(graph, R, wrt=["x", "y"])
    out = _run(derived, {"x": np.arange(3, dtype=dtype), "y": np.ones((2, 3))})
    assert out[names.gradients["x"]].dtype == np.dtype(dtype) and out[names.gradients["x"]].shape == (3,)
    np.testing.assert_allclose(out[names.gradients["x"]], [2, 2, 2])
    np.testing.assert_allclose(out[names.gradients["y"]], np.tile(np.arange(3.0), (2, 1)))


def test_free_sizes_are_kept_and_unbroadcasting_is_read_at_run_time():
    graph = GraphIR((InputDecl("x", "float64", (-1, 3)), InputDecl("b", "float64", (3,))),
                    (Node("p", "add", ("x", "b")), Node("t", "tanh", ("p",)), Node("f", "sum", ("t",))), ("f",))
    derived, names = derive_reverse(graph, R, wrt=["b"], seed=True)
    assert names.seed == "seed" and [d.shape for d in derived.inputs] == [(-1, 3), (3,), ()]
    for n in (1, 4):
        x, b = np.random.default_rng(n).standard_normal((n, 3)), np.arange(3.0)
        out = _run(derived, {"x": x, "b": b, "seed": np.float64(2.0)})
        np.testing.assert_allclose(out[names.gradients["b"]], 2 * (1 - np.tanh(x + b) ** 2).sum(axis=0))


def test_a_value_the_output_does_not_depend_on_gets_zeros_and_names_do_not_collide():
    graph = GraphIR((InputDecl("x"), InputDecl("z"), InputDecl("d.x"), InputDecl("seed")),
                    (Node("f", "mul", ("x", "d.x")),), ("f",))
    derived, names = derive_reverse(graph, R, wrt=["x", "z"], seed=True)
    assert names.gradients["x"] not in ("d.x",) and names.seed != "seed"
    assert len({d.name for d in derived.inputs} | {n.name for n in derived.nodes}) == \
        len(derived.inputs) + len(derived.nodes)
    out = _run(derived, {"x": np.float64(2.0), "z": np.float64(1.0), "d.x": np.float64(5.0),
                         "seed": np.float64(0.0), names.seed: np.float64(3.0)})
    assert out[names.gradients["x"]] == 15.0 and out[names.gradients["z"]] == 0.0


def test_a_non_scalar_output_needs_a_seed():
    graph = GraphIR((InputDecl("x", "float64", (2,)),), (Node("f", "exp", ("x",)),), ("f",))
    with pytest.raises(SeedError):
        derive_reverse(graph, R, wrt=["x"])


def test_a_long_chain_derives_without_recursion():
    n = 3000
    nodes = [Node("h0", "sin", ("x",))] + [Node(f"h{k}", "sin", (f"h{k - 1}",)) for k in range(1, n)]
    graph = GraphIR((InputDecl("x"),), tuple(nodes), (f"h{n - 1}",))
    derived, names = derive_reverse(graph, R, wrt=["x"])
    second, names2 = derive_reverse(derived, R, output=names.gradients["x"], wrt=["x"])
    x = 0.7
    values = [x]
    for _ in range(n):
        values.append(math.sin(values[-1]))
    expected = math.prod(math.cos(v) for v in values[:-1])
    assert _run(derived, {"x": np.float64(x)})[names.gradients["x"]] == pytest.approx(expected)
    assert np.isfinite(_run(second, {"x": np.float64(x)})[names2.gradients["x"]])


# --- the seeds' worked examples --------------------------------------------------------------------------

def _hessian(graph: GraphIR, output: str, wrt: list[str], feeds: dict) -> np.ndarray:
    """The full Hessian of a scalar output of scalar inputs, by deriving the gradient graph again."""
    first, names = derive_reverse(graph, R, output=output, wrt=wrt)
    rows = []
    for w in wrt:
        second, names2 = derive_reverse(first, R, output=names.gradients[w], wrt=wrt)
        out = _run(second, feeds)
        rows.append([float(out[names2.gradients[v]]) for v in wrt])
    return np.array(rows)


def _fd_hessian(graph: GraphIR, output: str, wrt: list[str], feeds: dict) -> np.ndarray:
    rows = []
    for w in wrt:
        plus, minus = dict(feeds), dict(feeds)
        plus[w] = feeds[w] + EPS
        minus[w] = feeds[w] - EPS
        gp, gm = _numpy_grads(graph, plus, output, wrt), _numpy_grads(graph, minus, output, wrt)
        rows.append([(a - b) / (2 * EPS) for a, b in zip(gp, gm)])
    return np.array(rows, dtype=np.float64).reshape(len(wrt), len(wrt))


def test_staged_circuit_hessian():
    """f(x, y) = (x + sigmoid(y)) / (sigmoid(x) + (x + y)**2) at x = 3, y = -4 (seed example 4)."""
    graph = GraphIR.build([("x", "float64", ()), ("y", "float64", ())], [
        ("sigy", "sigmoid", ("y",)), ("num", "add", ("x", "sigy")), ("sigx", "sigmoid", ("x",)),
        ("xpy", "add", ("x", "y")), ("xpysqr", "mul", ("xpy", "xpy")), ("den", "add", ("sigx", "xpysqr")),
        ("invden", "div", ("one", "den")), ("one", "const", (), {"value": np.asarray(1.0)}),
        ("f", "mul", ("num", "invden")),
    ], "f")
    feeds = {"x": np.float64(3.0), "y": np.float64(-4.0)}
    first, names = derive_reverse(graph, R, wrt=["x", "y"])
    out = _run(first, feeds)
    assert float(out[names.gradients["x"]]) == pytest.approx(2.0595697955721652, rel=1e-12)
    assert float(out[names.gradients["y"]]) == pytest.approx(1.5922327514838093, rel=1e-12)
    hessian = _hessian(graph, "f", ["x", "y"], feeds)
    np.testing.assert_allclose(hessian, hessian.T, rtol=1e-12)
    np.testing.assert_allclose(hessian, _fd_hessian(graph, "f", ["x", "y"], feeds), rtol=1e-5)

    # and by hand: f = n / d with n = x + s(y), d = s(x) + (x + y)^2
    x, y = 3.0, -4.0
    s = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    ds, dds = (lambda v: s(v) * (1 - s(v))), (lambda v: s(v) * (1 - s(v)) * (1 - 2 * s(v)))
    n, d = x + s(y), s(x) + (x + y) ** 2
    nx, ny, nyy = 1.0, ds(y), dds(y)
    dx, dy = ds(x) + 2 * (x + y), 2 * (x + y)
    dxx, dxy, dyy = dds(x) + 2, 2.0, 2.0
    fxx = (0 * d - n * dxx) / d ** 2 - 2 * (nx * d - n * dx) * dx / d ** 3
    fxy = (-nx * dy - n * dxy) / d ** 2 + (ny * dx) * -1 / d ** 2 + 2 * n * dx * dy / d ** 3
    fxy = (-(nx * dy) - ny * dx - n * dxy) / d ** 2 + 2 * n * dx * dy / d ** 3
    fyy = (nyy * d - n * dyy) / d ** 2 - 2 * (ny * d - n * dy) * dy / d ** 3
    np.testing.assert_allclose(hessian, [[fxx, fxy], [fxy, fyy]], rtol=1e-10)


def test_sigmoid_neuron_hessian_by_hand():
    """f = sigmoid(w0 x0 + w1 x1 + w2) at w = [2, -3, -3], x = [-1, -2] (seed example 3)."""
    graph = GraphIR.build([(n, "float64", ()) for n in ("w0", "w1", "w2", "x0", "x1")], [
        ("a", "mul", ("w0", "x0")), ("b", "mul", ("w1", "x1")), ("ab", "add", ("a", "b")), ("z", "add", ("ab", "w2")),
        ("f", "sigmoid", ("z",)),
    ], "f")
    values = {"w0": 2.0, "w1": -3.0, "w2": -3.0, "x0": -1.0, "x1": -2.0}
    feeds = {k: np.float64(v) for k, v in values.items()}
    wrt = ["w0", "w1", "w2", "x0", "x1"]
    first, names = derive_reverse(graph, R, wrt=wrt)
    out = _run(first, feeds)
    np.testing.assert_allclose([float(out[names.gradients[w]]) for w in wrt],
                               [-0.19661193324148185, -0.3932238664829637, 0.19661193324148185,
                                0.3932238664829637, -0.5898357997244456], rtol=1e-12)
    f = 0.7310585786300049
    d1, d2 = f * (1 - f), f * (1 - f) * (1 - 2 * f)
    dz = np.array([values["x0"], values["x1"], 1.0, values["w0"], values["w1"]])
    expected = d2 * np.outer(dz, dz)
    expected[0, 3] += d1
    expected[3, 0] += d1
    expected[1, 4] += d1
    expected[4, 1] += d1
    np.testing.assert_allclose(_hessian(graph, "f", wrt, feeds), expected, rtol=1e-10, atol=1e-15)


def _network() -> tuple[GraphIR, list[str], dict]:
    """The 4-layer network of the seeds: 4 inputs, two hidden layers of 5 (sigmoid), 1 output, squared error."""
    rng = np.random.default_rng(4)
    shapes = {"W1": (4, 5), "b1": (5,), "W2": (5, 5), "b2": (5,), "W3": (5, 1), "b3": (1,)}
    graph = GraphIR.build(
        [("X", "float64", (8, 4)), ("Y", "float64", (8, 1))] + [(n, "float64", s) for n, s in shapes.items()], [
            ("m1", "matmul", ("X", "W1")), ("a1", "add", ("m1", "b1")), ("h1", "sigmoid", ("a1",)),
            ("m2", "matmul", ("h1", "W2")), ("a2", "add", ("m2", "b2")), ("h2", "sigmoid", ("a2",)),
            ("m3", "matmul", ("h2", "W3")), ("a3", "add", ("m3", "b3")), ("out", "sigmoid", ("a3",)),
            ("err", "sub", ("out", "Y")), ("sq", "mul", ("err", "err")), ("C", "mean", ("sq",)),
        ], "C")
    feeds = {"X": rng.standard_normal((8, 4)), "Y": rng.uniform(0, 1, (8, 1))}
    feeds.update({n: rng.standard_normal(s) for n, s in shapes.items()})
    return graph, list(shapes), feeds


def test_four_layer_network_hvp_matches_finite_differences_of_gradients():
    graph, params, feeds = _network()
    rng = np.random.default_rng(5)
    vs = {f"v.{p}": rng.standard_normal(feeds[p].shape) for p in params}
    check_hvp(graph, "C", params, feeds, vs, "", rtol=1e-5, atol=1e-8)
    # and the JVP (forward mode, one pass) is the gradient's dot product with the tangents
    forward, fnames = derive_forward(graph, R, wrt=params)
    jvp = _run(forward, {**feeds, **{fnames.tangents[p]: vs[f"v.{p}"] for p in params}})[fnames.tangent_output]
    grads = _numpy_grads(graph, feeds, "C", params)
    assert float(jvp) == pytest.approx(sum(float(np.sum(g * vs[f"v.{p}"])) for g, p in zip(grads, params)), rel=1e-10)


def test_third_derivative_of_a_scalar_chain_matches_its_closed_form():
    graph = GraphIR.build([("x", "float64", ())], [("u", "exp", ("x",)), ("f", "sin", ("u",))], "f")
    derived, name = graph, "f"
    for _ in range(3):
        derived, names = derive_reverse(derived, R, output=name, wrt=["x"])
        name = names.gradients["x"]
    for x in (-0.5, 0.3, 1.1):
        u = math.exp(x)
        closed = -math.cos(u) * u ** 3 - 3 * math.sin(u) * u ** 2 + math.cos(u) * u
        assert float(_run(derived, {"x": np.float64(x)})[name]) == pytest.approx(closed, rel=1e-12)
    # the same through grad nodes: a grad of a grad of a grad
    nodes = list(graph.nodes) + [Node("g1", "grad", ("f", "x"), {}, ("d1",)), Node("g2", "grad", ("d1", "x"), {}, ("d2",)),
                                 Node("g3", "grad", ("d2", "x"), {}, ("d3",))]
    nested = GraphIR(graph.inputs, tuple(nodes), ("d3", "d2"))
    u = math.exp(0.3)
    out = _run(nested, {"x": np.float64(0.3)})
    assert float(out["d3"]) == pytest.approx(-math.cos(u) * u ** 3 - 3 * math.sin(u) * u ** 2 + math.cos(u) * u,
                                             rel=1e-12)
    assert float(out["d2"]) == pytest.approx(-math.sin(u) * u ** 2 + math.cos(u) * u, rel=1e-12)


def test_jvp_node_and_forward_mode_agree_with_reverse_mode():
    graph, params, feeds = _network()
    rng = np.random.default_rng(9)
    tangents = {p: rng.standard_normal(feeds[p].shape) for p in params}
    decls = tuple(InputDecl(f"t_{p}", "float64", feeds[p].shape) for p in params)
    nodes = graph.nodes + (Node("J", "jvp", ("C", *params, *(f"t_{p}" for p in params))),)
    out = _run(GraphIR(graph.inputs + decls, nodes, ("J",)), {**feeds, **{f"t_{p}": tangents[p] for p in params}})
    grads = _numpy_grads(graph, feeds, "C", params)
    assert float(out["J"]) == pytest.approx(sum(float(np.sum(g * tangents[p])) for g, p in zip(grads, params)),
                                            rel=1e-10)


def test_an_operator_without_rules_is_missing_rule():
    from dataclasses import replace

    from chainrule.core import Registry

    registry = Registry([replace(op, vjp_graph=None, jvp_graph=None) if op.name == "tanh" else op for op in R])
    graph = GraphIR.build([("x", "float64", ())], [("h", "tanh", ("x",)), ("f", "exp", ("h",))], "f")
    with pytest.raises(MissingRuleError) as caught:
        derive_reverse(graph, registry, wrt=["x"])
    assert caught.value.reason == "MISSING_RULE" and caught.value.node == "h" and caught.value.op == "tanh"
    assert "vjp_graph" in caught.value.message
    with pytest.raises(MissingRuleError, match="jvp_graph"):
        derive_forward(graph, registry, wrt=["x"])
    # first order still works, and a graph that does not pass through it derives
    plan = compile_graph(graph, registry)
    assert evaluate(plan, {"x": np.float64(0.5)}).grad("x") == pytest.approx(math.exp(math.tanh(0.5)) / math.cosh(0.5) ** 2)
    derive_reverse(graph, registry, output="f", wrt=["h"])


EINSUMS = [
    ("ij,jk->ik", [(2, 3), (3, 4)]), ("ij,jk", [(2, 3), (3, 2)]), ("bij,bjk->bik", [(2, 2, 3), (2, 3, 2)]),
    ("...ij,...jk->...ik", [(2, 1, 2, 3), (3, 3, 2)]), ("ii->", [(3, 3)]), ("ii->i", [(3, 3)]), ("i,j->ij", [(3,), (4,)]),
    ("ij,ij->i", [(1, 3), (2, 3)]), ("ijk->kj", [(2, 3, 4)]), ("ij,jk,kl->il", [(2, 3), (3, 2), (2, 2)]),
    ("iij,j->i", [(2, 2, 3), (3,)]), ("ij->", [(2, 3)]), ("ijk,k->i", [(2, 3, 4), (4,)]),
]


@pytest.mark.parametrize("equation, shapes", EINSUMS, ids=[e for e, _ in EINSUMS])
def test_einsum_second_derivatives_and_jvps_for_every_form(equation, shapes, monkeypatch):
    rng = np.random.default_rng(len(equation))
    inputs = [rng.standard_normal(s) for s in shapes]
    monkeypatch.setattr(sys.modules[__name__], "_cases", lambda name: [(inputs, {"equation": equation})])
    test_gradient_hvp_and_jvp_match_numpy_rules_and_finite_differences("einsum")


def test_prod_except_numpy_gradient_is_exact_at_zeros():
    """prod_except's numpy vjp computes rows holding zeros exactly (its symbolic rules divide by x and
    hold away from zeros only, so its gradient-check sample draws none): finite differences agree."""
    from chainrule.plugins.builtin.derivative import OPERATORS as DERIVATIVE_OPS

    op = next(o for o in DERIVATIVE_OPS if o.name == "prod_except")
    rng = np.random.default_rng(2)
    for row in ([1.5, 0.0, -0.7, 2.0], [0.0, 0.0, 1.3, -0.4], [0.8, -1.1, 0.0, 0.0]):
        x = np.array([row, [0.9, 1.2, -0.5, 0.3]])
        g = rng.standard_normal(x.shape)
        (analytic,) = op.vjp(g, op.forward(x, axis=(1,)), x, axis=(1,))
        numeric = np.zeros_like(x)
        for index in np.ndindex(x.shape):
            up, down = x.copy(), x.copy()
            up[index] += 1e-6
            down[index] -= 1e-6
            numeric[index] = np.sum(g * (op.forward(up, axis=(1,)) - op.forward(down, axis=(1,)))) / 2e-6
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)
