"""Derivatives as graphs (docs/derivatives.md): the symbolic rules of the shape, index, select, compare, nn,
conv and control families (and their derivative helpers: reshape_like, unslice, untile, concat_part,
scatter_add, one_hot_like, conv_grad_x, conv_grad_w, max_pool_grad, max_pool_pick, avg_pool_grad).

For every operator of those families with a float input and a float output, on its gradient-check samples
(several shapes and attributes; max_pool's samples hold no ties) in float64, with the objective
``L = sum(w * y * y)`` (not linear in y, so that the second derivative runs the rules' own rules again):

* the symbolic gradient (derive_reverse) equals the engine's numpy gradient;
* the Hessian-vector product (a graph with a ``grad`` node, derived again) equals central finite
  differences of the numpy gradients along the vector;
* the JVP of ``y`` (derive_forward) equals the reverse-mode Jacobian (one numpy backward pass per output
  element) times the tangents.

Then: graphs with free (-1) sizes, derived once and run at several sizes; float32; comparisons and the
other operators without a derivative; scan (an RNN of two carries, free sizes, an int carry, a scan in a
scan, the checker's samples), whose derivatives are scans: the same three checks on whole graphs.
"""
from __future__ import annotations

import numpy as np
import pytest

from chainrule.core import GraphIR, InputDecl, Node, compile_graph, evaluate
from chainrule.core.symbolic import derive_forward, derive_reverse, hvp_graph
from chainrule.plugins.testing import sample_inputs

from symbolic_checks import EPS, R, check_hvp, close as _close, numpy_grads as _numpy_grads, run as _run
FAMILIES = ("builtin.shape", "builtin.index", "builtin.select", "builtin.compare", "builtin.nn", "builtin.conv",
            "builtin.control")
OPS = sorted(op.name for op in R if op.plugin in FAMILIES)
HELPERS = ("reshape_like", "unslice", "untile", "concat_part", "scatter_add", "one_hot_like", "conv_grad_x",
           "conv_grad_w", "max_pool_grad", "max_pool_pick", "avg_pool_grad")
#: Operators no case of which has both a float input and a float output: checked below on their own.
NOTHING_TO_DIFFERENTIATE = {"const", "one_hot", "less", "less_equal", "greater", "greater_equal", "equal",
                            "not_equal", "logical_and", "logical_or", "logical_not"}
#: Operators with several values, tested below on graphs of their own.
OWN_TESTS = {"scan"}


# --- the harness -------------------------------------------------------------------------------------

def _decls(inputs: list[np.ndarray], free: dict[int, tuple[int, ...]] | None = None) -> tuple[InputDecl, ...]:
    """x0, x1...; ``free`` maps an input to the axes declared with size -1."""
    free = free or {}
    return tuple(InputDecl(f"x{i}", x.dtype.name, tuple(-1 if a in free.get(i, ()) else n
                                                          for a, n in enumerate(x.shape)))
                 for i, x in enumerate(inputs))


def _op_graph(name: str, decls: tuple[InputDecl, ...], attrs: dict, weights: np.ndarray | None) -> GraphIR:
    """x0, x1... -> y = op(x...) -> L = sum(w * y * y) (w a constant of y's shape; without weights, for
    free sizes, w = y), or y alone (weights False)."""
    nodes = [Node("y", name, tuple(d.name for d in decls), dict(attrs))]
    if weights is False:
        return GraphIR(decls, tuple(nodes), ("y",))
    if weights is not None:
        nodes.append(Node("w", "const", (), {"value": weights}))
    nodes += [Node("yw", "mul", ("y", "y" if weights is None else "w")), Node("yyw", "mul", ("yw", "y")),
              Node("L", "sum", ("yyw",))]
    return GraphIR(decls, tuple(nodes), ("L",))


def _floats(inputs: list[np.ndarray]) -> list[str]:
    return [f"x{i}" for i, x in enumerate(inputs) if x.dtype.kind == "f"]


def _check_gradient_and_hvp(name, inputs, attrs, decls, rng, what=""):
    """First and second order, reverse mode; False when there is nothing to differentiate."""
    feeds = {f"x{i}": x for i, x in enumerate(inputs)}
    y = _run(_op_graph(name, decls, attrs, False), feeds)["y"]
    floats = _floats(inputs)
    if y.dtype.kind != "f" or not floats:
        return False
    shapes = [feeds[w].shape for w in floats]
    free = any(-1 in d.shape for d in decls)
    graph = _op_graph(name, decls, attrs, None if free else rng.standard_normal(y.shape))

    derived, names = derive_reverse(graph, R, output="L", wrt=floats)
    values = _run(derived, feeds)
    for w, expected in zip(floats, _numpy_grads(graph, feeds, "L", floats)):
        _close(values[names.gradients[w]], expected, f"{name}{what} gradient of {w}")

    vs = {f"v.{w}": rng.standard_normal(s) for w, s in zip(floats, shapes)}
    check_hvp(graph, "L", floats, feeds, vs, f"{name}{what} ")
    return True


def _check_jvp(name, inputs, attrs, decls, rng, what=""):
    feeds = {f"x{i}": x for i, x in enumerate(inputs)}
    y_graph = _op_graph(name, decls, attrs, False)
    y = _run(y_graph, feeds)["y"]
    floats = _floats(inputs)
    ts = {w: rng.standard_normal(feeds[w].shape) for w in floats}
    forward, fnames = derive_forward(y_graph, R, output="y", wrt=floats)
    jvp = _run(forward, {**feeds, **{fnames.tangents[w]: ts[w] for w in floats}})[fnames.tangent_output]
    expected = np.zeros(y.size)
    for k in range(y.size):
        seed = np.zeros(y.size)
        seed[k] = 1.0
        rows = _numpy_grads(y_graph, feeds, "y", floats, seed=seed.reshape(y.shape))
        expected[k] = sum(float(np.sum(r * ts[w])) for r, w in zip(rows, floats))
    _close(jvp, expected.reshape(y.shape), f"{name}{what} JVP")


def _cases(name: str):
    cases = sample_inputs(R[name], np.random.default_rng(sum(map(ord, name))))
    return [([np.asarray(x) for x in xs], attrs) for xs, attrs in cases]


# --- every operator, on its samples ----------------------------------------------------------------------

def test_the_families_and_helpers_are_the_ones_tested_here():
    assert set(HELPERS) <= set(OPS) and NOTHING_TO_DIFFERENTIATE <= set(OPS)


@pytest.mark.parametrize("name", OPS)
def test_every_operator_of_these_families_has_both_symbolic_rules(name):
    op = R[name]
    assert callable(op.vjp_graph) and callable(op.jvp_graph), name


@pytest.mark.parametrize("name", sorted(set(OPS) - NOTHING_TO_DIFFERENTIATE - OWN_TESTS))
def test_gradient_hvp_and_jvp_match_numpy_rules_and_finite_differences(name):
    rng = np.random.default_rng(11)
    checked = 0
    for inputs, attrs in _cases(name):
        decls = _decls(inputs)
        if _check_gradient_and_hvp(name, inputs, attrs, decls, rng):
            _check_jvp(name, inputs, attrs, decls, rng)
            checked += 1
    assert checked, f"{name}: no case with a float input and a float output"


# --- free sizes: one derived graph for every size ------------------------------------------------------

def _normal(rng, *shape):
    return rng.standard_normal(shape)


def _distinct(rng, *shape):
    """Values at least 0.8 apart: no ties in a max_pool window."""
    size = int(np.prod(shape))
    return ((rng.permutation(size) - size // 2) + rng.uniform(-0.1, 0.1, size)).reshape(shape)


#: (operator, inputs for a size n, attrs, the free axes per input)
FREE = [
    ("reshape", lambda rng, n: [_normal(rng, n, 3, 2)], {"shape": (-1, 2)}, {0: (0,)}),
    ("squeeze", lambda rng, n: [_normal(rng, n, 1, 3)], {"axis": (1,)}, {0: (0,)}),
    ("expand_dims", lambda rng, n: [_normal(rng, n, 3)], {"axis": (1, -1)}, {0: (0,)}),
    ("concat", lambda rng, n: [_normal(rng, n, 2), _normal(rng, 3, 2), _normal(rng, n + 1, 2)], {"axis": 0},
     {0: (0,), 2: (0,)}),
    ("stack", lambda rng, n: [_normal(rng, n, 2), _normal(rng, n, 2)], {"axis": -1}, {0: (0,), 1: (0,)}),
    ("slice", lambda rng, n: [_normal(rng, n + 2, 5)], {"starts": (1, -4), "ends": (100, 5), "steps": (2, 2)},
     {0: (0,)}),
    ("pad", lambda rng, n: [_normal(rng, n, 4)], {"pads": (1, -1, 2, 1), "value": 0.5}, {0: (0,)}),
    ("tile", lambda rng, n: [_normal(rng, n, 2)], {"repeats": (2, 3)}, {0: (0,)}),
    ("cumsum", lambda rng, n: [_normal(rng, 2, n)], {"axis": -1, "reverse": True}, {0: (1,)}),
    ("flip", lambda rng, n: [_normal(rng, n, 3)], {"axes": (0,)}, {0: (0,)}),
    ("broadcast_to", lambda rng, n: [_normal(rng, 1, 3)], {"shape": (4, 2, 3)}, {}),
    ("gather", lambda rng, n: [_normal(rng, n, 3), np.array([0, -1, 0, n - 1])], {"axis": 0}, {0: (0,)}),
    ("gather", lambda rng, n: [_normal(rng, 2, 4), rng.integers(-4, 4, (n, 2))], {"axis": 1}, {1: (0,)}),
    ("cross_entropy", lambda rng, n: [_normal(rng, n, 4), rng.integers(0, 4, n)], {}, {0: (0,), 1: (0,)}),
    ("mse", lambda rng, n: [_normal(rng, n, 3), _normal(rng, 3)], {}, {0: (0,)}),
    ("layer_norm", lambda rng, n: [_normal(rng, n, 2, 3), _normal(rng, 3), _normal(rng, 2, 3)], {"axis": 1},
     {0: (0,)}),
    ("softmax", lambda rng, n: [_normal(rng, n, 3)], {"axis": 0}, {0: (0,)}),
    ("conv", lambda rng, n: [_normal(rng, n, 2, 5, n + 3), _normal(rng, 4, 1, 2, 3)],
     {"group": 2, "pads": (1, 0, 0, 1), "strides": (2, 1)}, {0: (0, 3)}),
    ("max_pool", lambda rng, n: [_distinct(rng, n, 2, 5)], {"kernel_shape": (2,), "pads": (1, 0)}, {0: (0,)}),
    ("avg_pool", lambda rng, n: [_normal(rng, 1, 2, n + 2, 4)], {"kernel_shape": (3, 2), "pads": (1, 1, 0, 1)},
     {0: (2,)}),
    ("where", lambda rng, n: [rng.random((n, 3)) < 0.5, _normal(rng, n, 1), _normal(rng, 3)], {},
     {0: (0,), 1: (0,)}),
]


@pytest.mark.parametrize("name, make, attrs, free", FREE, ids=[f"{c[0]}-{i}" for i, c in enumerate(FREE)])
def test_graphs_with_free_sizes_derive_once_for_every_size(name, make, attrs, free):
    rng = np.random.default_rng(3)
    decls = _decls(make(rng, 2), free)
    assert any(-1 in d.shape for d in decls) or not free
    for n in (1, 2, 4):
        inputs = [np.asarray(x) for x in make(rng, n)]
        assert _check_gradient_and_hvp(name, inputs, attrs, decls, rng, f" (n={n})")
        _check_jvp(name, inputs, attrs, decls, rng, f" (n={n})")


# --- float32, operators without a derivative ---------------------------------------------------------

@pytest.mark.parametrize("name, inputs, attrs", [
    ("layer_norm", [(2, 3), (3,), (3,)], {}),
    ("cross_entropy", [(4, 3), "labels"], {}),
    ("mse", [(2, 3), (3,)], {}),
    ("conv", [(1, 2, 4, 4), (3, 2, 2, 2)], {"pads": (1, 1, 0, 0)}),
    ("slice", [(4, 3)], {"starts": (1,), "ends": (3,)}),
    ("gather", [(4, 3), "indices"], {}),
])
def test_float32_gradients_stay_float32(name, inputs, attrs):
    rng = np.random.default_rng(5)
    arrays = [rng.integers(0, 3, 4) if s in ("labels", "indices") else rng.standard_normal(s).astype(np.float32)
              for s in inputs]
    decls = _decls(arrays)
    graph = _op_graph(name, decls, attrs, False)
    y = _run(graph, {f"x{i}": x for i, x in enumerate(arrays)})["y"]
    assert y.dtype == np.float32
    floats = _floats(arrays)
    derived, names = derive_reverse(graph, R, output="y", wrt=floats, seed=True)
    feeds = {f"x{i}": x for i, x in enumerate(arrays)}
    seed = rng.standard_normal(y.shape).astype(np.float32)
    out = _run(derived, {**feeds, names.seed: seed})
    for w, expected in zip(floats, _numpy_grads(graph, feeds, "y", floats, seed=seed)):
        got = out[names.gradients[w]]
        assert got.dtype == np.float32, (name, w, got.dtype)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_comparisons_and_one_hot_have_rules_that_give_none():
    for name in NOTHING_TO_DIFFERENTIATE - {"const"}:
        op = R[name]
        inputs = (object(),) * op.arity
        assert op.vjp_graph(None, None, None, *inputs) == (None,) * op.arity, name
        assert op.jvp_graph(None, (None,) * op.arity, None, *inputs) is None, name


def test_a_mask_from_a_comparison_and_a_stop_gradient_derive_in_both_modes():
    """f = sum(where(x > y, x * x, stop_gradient(y) * x)): the comparison and the stop carry nothing."""
    graph = GraphIR.build([("x", "float64", (2, 3)), ("y", "float64", (3,))], [
        ("m", "greater", ("x", "y")), ("xx", "mul", ("x", "x")), ("s", "stop_gradient", ("y",)),
        ("sx", "mul", ("s", "x")), ("w", "where", ("m", "xx", "sx")), ("f", "sum", ("w",)),
    ], "f")
    rng = np.random.default_rng(2)
    feeds = {"x": rng.standard_normal((2, 3)), "y": rng.standard_normal(3)}
    x, y = feeds["x"], feeds["y"]
    derived, names = derive_reverse(graph, R, wrt=["x", "y"])
    out = _run(derived, feeds)
    np.testing.assert_allclose(out[names.gradients["x"]], np.where(x > y, 2 * x, y + 0 * x))
    np.testing.assert_allclose(out[names.gradients["y"]], np.zeros(3))
    second, names2 = derive_reverse(derived, R, output=names.gradients["x"], wrt=["x"], seed=True)
    v = rng.standard_normal((2, 3))
    np.testing.assert_allclose(_run(second, {**feeds, names2.seed: v})[names2.gradients["x"]], np.where(x > y, 2 * v, 0))
    forward, fnames = derive_forward(graph, R, wrt=["x", "y"])
    tx, ty = rng.standard_normal((2, 3)), rng.standard_normal(3)
    jvp = _run(forward, {**feeds, fnames.tangents["x"]: tx, fnames.tangents["y"]: ty})[fnames.tangent_output]
    assert float(jvp) == pytest.approx(float(np.sum(np.where(x > y, 2 * x, y + 0 * x) * tx)))


def test_a_const_node_derives_as_a_constant():
    graph = GraphIR.build([("x", "float64", (3,))], [
        ("c", "const", (), {"value": np.arange(3.0)}), ("p", "mul", ("x", "c")), ("f", "sum", ("p",)),
    ], "f")
    derived, names = derive_reverse(graph, R, wrt=["x", "c"])
    out = _run(derived, {"x": np.ones(3)})
    np.testing.assert_allclose(out[names.gradients["x"]], np.arange(3.0))
    np.testing.assert_allclose(out[names.gradients["c"]], np.ones(3))


# --- scan: its derivatives are scans (reversed for reverse mode) ----------------------------------------

def _rnn_body(h: int = 3, d: int = 2, free: bool = False) -> GraphIR:
    """Carries h and c (a running sum of half the h's), a sequence x, constants Wx and Wh; per-step output
    sum(h * h)."""
    n = -1 if free else h
    return GraphIR.build(
        [("h", "float64", (n,)), ("c", "float64", (n,)), ("x", "float64", (d,)), ("Wx", "float64", (d, n)),
         ("Wh", "float64", (n, n))],
        [("a", "matmul", ("x", "Wx")), ("b", "matmul", ("h", "Wh")), ("s", "add", ("a", "b")), ("h2", "tanh", ("s",)),
         ("half", "const", (), {"value": np.asarray(0.5)}), ("hc", "mul", ("h2", "half")), ("c2", "add", ("c", "hc")),
         ("hh", "mul", ("h2", "h2")), ("y", "sum", ("hh",))],
        ["h2", "c2", "y"])


def _rnn(steps: int, h: int = 3, d: int = 2, free: bool = False) -> GraphIR:
    """L = sum(hT * hT) + sum(cT) + sum(ys * ys) over a scan of _rnn_body."""
    n, t = (-1, -1) if free else (h, steps)
    return GraphIR(
        (InputDecl("h0", "float64", (n,)), InputDecl("c0", "float64", (n,)), InputDecl("xs", "float64", (t, d)),
         InputDecl("Wx", "float64", (d, n)), InputDecl("Wh", "float64", (n, n))),
        (Node("rnn", "scan", ("h0", "c0", "xs", "Wx", "Wh"),
              {"body": _rnn_body(h, d, free), "num_carries": 2, "num_sequences": 1}, ("hT", "cT", "ys")),
         Node("hh", "mul", ("hT", "hT")), Node("a", "sum", ("hh",)), Node("b", "sum", ("cT",)),
         Node("yy", "mul", ("ys", "ys")), Node("c", "sum", ("yy",)), Node("ab", "add", ("a", "b")),
         Node("L", "add", ("ab", "c"))),
        ("L",))


def _rnn_feeds(rng, steps: int, h: int = 3, d: int = 2) -> dict:
    return {"h0": rng.standard_normal(h), "c0": rng.standard_normal(h), "xs": rng.standard_normal((steps, d)),
            "Wx": rng.standard_normal((d, h)), "Wh": rng.standard_normal((h, h)) * 0.5}


def _check_graph(graph: GraphIR, feeds: dict, wrt: list[str], rng, values: tuple[str, ...] = ()):
    """Gradient, HVP and JVP of graph's output (and JVPs of ``values``) against the numpy rules."""
    output = graph.outputs[0]
    derived, names = derive_reverse(graph, R, wrt=wrt)
    got = _run(derived, feeds)
    for w, expected in zip(wrt, _numpy_grads(graph, feeds, output, wrt)):
        _close(got[names.gradients[w]], expected, f"gradient of {w}")
    vs = {f"v.{w}": rng.standard_normal(feeds[w].shape) for w in wrt}
    hvp, hnames = derive_reverse(hvp_graph(graph, output, wrt), R, wrt=wrt)
    got = _run(hvp, {**feeds, **vs})
    plus = {**feeds, **{w: feeds[w] + EPS * vs[f"v.{w}"] for w in wrt}}
    minus = {**feeds, **{w: feeds[w] - EPS * vs[f"v.{w}"] for w in wrt}}
    for w, gp, gm in zip(wrt, _numpy_grads(graph, plus, output, wrt), _numpy_grads(graph, minus, output, wrt)):
        _close(got[hnames.gradients[w]], (gp - gm) / (2 * EPS), f"Hv for {w}", rtol=1e-4, atol=1e-6)
    ts = {w: rng.standard_normal(feeds[w].shape) for w in wrt}
    for value in (output, *values):
        forward, fnames = derive_forward(graph, R, output=value, wrt=wrt)
        jvp = _run(forward, {**feeds, **{fnames.tangents[w]: ts[w] for w in wrt}})[fnames.tangent_output]
        y = np.asarray(evaluate(compile_graph(graph, R), feeds, output=value, gradients=False).value(value))
        expected = np.zeros(y.size)
        for k in range(y.size):
            seed = np.zeros(y.size)
            seed[k] = 1.0
            rows = _numpy_grads(graph, feeds, value, wrt, seed=seed.reshape(y.shape))
            expected[k] = sum(float(np.sum(r * ts[w])) for r, w in zip(rows, wrt))
        _close(jvp, expected.reshape(y.shape), f"JVP of {value}")


@pytest.mark.parametrize("steps", [1, 4])
def test_scan_second_derivatives_and_jvps(steps):
    rng = np.random.default_rng(steps)
    _check_graph(_rnn(steps), _rnn_feeds(rng, steps), ["h0", "c0", "xs", "Wx", "Wh"], rng, values=("hT", "cT", "ys"))


def test_scan_derivatives_with_free_sizes_run_at_every_size():
    graph = _rnn(0, free=True)
    for steps, h in ((3, 2), (1, 4)):
        rng = np.random.default_rng(steps)
        _check_graph(graph, _rnn_feeds(rng, steps, h), ["h0", "xs", "Wh"], rng)


def test_scan_with_an_int_carry_and_no_sequences():
    """Carries: a float x and an int step counter; per-step outputs x * k (float) and the counter (int)."""
    body = GraphIR.build([("x", "float64", (2,)), ("k", "int64", ()), ("w", "float64", (2,))], [
        ("one", "const", (), {"value": np.asarray(1, np.int64)}), ("k2", "add", ("k", "one")),
        ("s", "sin", ("x",)), ("x2", "mul", ("s", "w")), ("xk", "mul", ("x", "k"))], ["x2", "k2", "xk", "k"])
    graph = GraphIR((InputDecl("x0", "float64", (2,)), InputDecl("k0", "int64", ()), InputDecl("w", "float64", (2,))),
                    (Node("loop", "scan", ("x0", "k0", "w"), {"body": body, "num_carries": 2, "length": 3},
                          ("xT", "kT", "xks", "ks")),
                     Node("q", "mul", ("xks", "xks")), Node("a", "sum", ("q",)), Node("b", "sum", ("xT",)),
                     Node("L", "add", ("a", "b"))), ("L",))
    rng = np.random.default_rng(0)
    feeds = {"x0": rng.standard_normal(2), "k0": np.asarray(2, np.int64), "w": rng.standard_normal(2)}
    _check_graph(graph, feeds, ["x0", "w"], rng, values=("xT", "xks"))


def test_scan_inside_scan_differentiates_twice():
    inner = GraphIR.build([("a", "float64", (2,)), ("x", "float64", (2,)), ("w", "float64", (2,))],
                          [("ax", "mul", ("a", "x")), ("s", "add", ("ax", "w")), ("a2", "tanh", ("s",))], ["a2"])
    outer = GraphIR.build([("a", "float64", (2,)), ("x", "float64", (2,)), ("inner", "float64", (3, 2))], [
        ("loop", "scan", ("a", "inner", "x"), {"body": inner, "num_carries": 1, "num_sequences": 1}),
        ("y", "sum", ("loop.out",))], ["loop.out", "y"])
    outer = GraphIR(outer.inputs, (Node("loop", "scan", ("a", "inner", "x"),
                                        {"body": inner, "num_carries": 1, "num_sequences": 1}, ("loop.out",)),
                                   outer.nodes[1]), outer.outputs)
    graph = GraphIR((InputDecl("a0", "float64", (2,)), InputDecl("xs", "float64", (2, 2)),
                     InputDecl("inner", "float64", (3, 2))),
                    (Node("outer", "scan", ("a0", "xs", "inner"), {"body": outer, "num_carries": 1, "num_sequences": 1},
                          ("aT", "ys")), Node("q", "mul", ("ys", "ys")), Node("L", "sum", ("q",))), ("L",))
    rng = np.random.default_rng(1)
    feeds = {"a0": rng.standard_normal(2), "xs": rng.standard_normal((2, 2)), "inner": rng.standard_normal((3, 2))}
    _check_graph(graph, feeds, ["a0", "xs", "inner"], rng, values=("aT",))


def test_scan_samples_of_the_gradient_checker_derive_too():
    """scan's own samples: a body of wiring only, given compiled (the rules rebuild its graph)."""
    rng = np.random.default_rng(4)
    for inputs, attrs in sample_inputs(R["scan"], np.random.default_rng(0)):
        count = len(attrs["body"].outputs)
        decls = _decls(inputs)
        values = tuple(f"o{i}" for i in range(count))
        nodes = [Node("s", "scan", tuple(d.name for d in decls), attrs, values)]
        total = None
        for v in values:
            nodes += [Node(f"{v}.sq", "mul", (v, v)), Node(f"{v}.sum", "sum", (f"{v}.sq",))]
            if total is not None:
                nodes.append(Node(f"{v}.total", "add", (total, f"{v}.sum")))
            total = nodes[-1].name
        graph = GraphIR(decls, tuple(nodes), (total,))
        _check_graph(graph, {d.name: x for d, x in zip(decls, inputs)}, [d.name for d in decls], rng, values=values)


# --- end to end: the builder's grad nodes, expanded by the server that compiles the graph ---------------

def test_a_small_convnet_and_an_rnn_hvp_through_a_local_client():
    """conv -> max_pool -> layer_norm -> cross_entropy, and a scan RNN: ops.hvp against finite
    differences of the client's own gradients, and ops.jvp against the gradient."""
    from chainrule.client import GraphBuilder, ops
    from chainrule.server import LocalClient

    rng = np.random.default_rng(8)
    g = GraphBuilder()
    x, w = g.input("x", (2, 1, 6, 6)), g.input("w", (3, 1, 3, 3))
    scale, labels = g.input("scale", (3, 2, 2)), g.input("labels", (2,), "int64")
    h = ops.conv(x, w, pads=[1, 1, 1, 1])
    p = ops.max_pool(h, [3, 3], strides=[3, 3])
    z = ops.layer_norm(p, scale, 0.0, axis=1)
    loss = ops.cross_entropy(ops.reshape(z, (2, 12)), labels).named("loss")
    vx, vw = g.input("vx", (2, 1, 6, 6)), g.input("vw", (3, 1, 3, 3))
    hx, hw = ops.hvp(loss, [x, w], [vx, vw])
    tangent = ops.jvp(loss, [x, w], [vx, vw])
    feeds = {"x": rng.standard_normal((2, 1, 6, 6)), "w": rng.standard_normal((3, 1, 3, 3)),
             "scale": rng.uniform(0.5, 1.5, (3, 2, 2)), "labels": np.array([3, 10]),
             "vx": rng.standard_normal((2, 1, 6, 6)), "vw": rng.standard_normal((3, 1, 3, 3))}
    with LocalClient() as client:
        got = client.evaluate(loss, feeds, grads="none", values=[hx, hw, tangent])
        grads = client.evaluate(loss, feeds, grads=[x, w])

        def gradients(shift):
            moved = {**feeds, "x": feeds["x"] + shift * feeds["vx"], "w": feeds["w"] + shift * feeds["vw"]}
            r = client.evaluate(loss, moved, grads=[x, w])
            return np.asarray(r.grad["x"]), np.asarray(r.grad["w"])

        (px, pw), (mx, mw) = gradients(EPS), gradients(-EPS)
    _close(got.values[hx.name], (px - mx) / (2 * EPS), "convnet Hv for x", rtol=1e-4)
    _close(got.values[hw.name], (pw - mw) / (2 * EPS), "convnet Hv for w", rtol=1e-4)
    expected = float(np.sum(grads.grad["x"] * feeds["vx"]) + np.sum(grads.grad["w"] * feeds["vw"]))
    assert float(got.values[tangent.name]) == pytest.approx(expected, rel=1e-9)

    g = GraphBuilder()
    h0, xs, wx, wh = g.input("h0", (3,)), g.input("xs", (5, 2)), g.input("Wx", (2, 3)), g.input("Wh", (3, 3))
    hT, ys = ops.scan(lambda hc, xt, a, b: (ops.tanh(xt @ a + hc @ b), ops.sum(hc * hc)), h0, xs, [wx, wh])
    loss = (ops.sum(hT) + ops.sum(ys)).named("loss")
    v = g.input("v", (3, 3))
    (hv,) = ops.hvp(loss, [wh], [v])
    feeds = {"h0": rng.standard_normal(3), "xs": rng.standard_normal((5, 2)), "Wx": rng.standard_normal((2, 3)),
             "Wh": rng.standard_normal((3, 3)) * 0.5, "v": rng.standard_normal((3, 3))}
    with LocalClient() as client:
        got = client.evaluate(loss, feeds, grads="none", values=[hv])
        plus = client.evaluate(loss, {**feeds, "Wh": feeds["Wh"] + EPS * feeds["v"]}, grads=[wh])
        minus = client.evaluate(loss, {**feeds, "Wh": feeds["Wh"] - EPS * feeds["v"]}, grads=[wh])
    _close(got.values[hv.name], (np.asarray(plus.grad["Wh"]) - np.asarray(minus.grad["Wh"])) / (2 * EPS),
           "rnn Hv for Wh", rtol=1e-4)
