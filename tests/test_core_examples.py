"""The worked examples of the lecture notes (ARCHITECTURE section 7), in-process.

Every value and gradient is compared with the hand-worked numbers to 1e-12.
"""
from __future__ import annotations

import numpy as np
import pytest

from chainrule.core import GraphIR, InputDecl, Node, compile_graph, evaluate

from helpers import scalar_graph

TOL = 1e-12


def run(registry, graph, **inputs):
    plan = compile_graph(graph, registry)
    return evaluate(plan, {k: np.float64(v) if np.ndim(v) == 0 else np.asarray(v, np.float64) for k, v in inputs.items()})


@pytest.mark.parametrize(
    "x, y, z, p, g, dz, dp, dx, dy",
    [
        (1.0, 3.0, -3.0, 4.0, -12.0, 4.0, -3.0, -3.0, -3.0),  # example 1
        (-2.0, 5.0, -4.0, 3.0, -12.0, 3.0, -4.0, -4.0, -4.0),  # example 2
    ],
)
def test_add_then_multiply(registry, x, y, z, p, g, dz, dp, dx, dy):
    graph = scalar_graph(["x", "y", "z"], [("p", "add", ("x", "y")), ("g", "mul", ("p", "z"))], "g")
    ev = run(registry, graph, x=x, y=y, z=z)
    assert ev.value("p") == pytest.approx(p, abs=TOL)
    assert ev.value("g") == pytest.approx(g, abs=TOL)
    for name, expected in {"z": dz, "p": dp, "x": dx, "y": dy, "g": 1.0}.items():
        assert ev.grad(name) == pytest.approx(expected, abs=TOL), name


def test_sigmoid_neuron(registry):
    graph = GraphIR(
        (InputDecl("w", "float64", (3,)), InputDecl("x", "float64", (2,))),
        (
            Node("w01", "slice", ("w",), {"starts": [0], "ends": [2]}),
            Node("w2", "slice", ("w",), {"starts": [2], "ends": [3]}),
            Node("wx", "mul", ("w01", "x")),
            Node("dot", "sum", ("wx",)),
            Node("w2s", "sum", ("w2",)),
            Node("z", "add", ("dot", "w2s")),
            Node("f", "sigmoid", ("z",)),
        ),
        ("f",),
    )
    ev = run(registry, graph, w=[2.0, -3.0, -3.0], x=[-1.0, -2.0])
    f = ev.value("f")
    assert f == pytest.approx(0.7310585786300049, abs=TOL)
    assert ev.grad("z") == pytest.approx(0.19661193324148185, abs=TOL)  # local gradient (1-f)f
    np.testing.assert_allclose(ev.grad("x"), [0.3932238664829637, -0.5898357997244456], rtol=0, atol=TOL)
    np.testing.assert_allclose(ev.grad("w"), [-0.19661193324148185, -0.3932238664829637, 0.19661193324148185], rtol=0, atol=TOL)


def staged_circuit() -> GraphIR:
    """f(x, y) = (x + sigmoid(y)) / (sigmoid(x) + (x + y)^2), staged as in the notes."""
    return GraphIR(
        (InputDecl("x"), InputDecl("y")),
        (
            Node("sigy", "sigmoid", ("y",)),
            Node("num", "add", ("x", "sigy")),
            Node("sigx", "sigmoid", ("x",)),
            Node("xpy", "add", ("x", "y")),
            Node("two", "const", (), {"value": np.array(2.0)}),
            Node("xpysqr", "pow", ("xpy", "two")),
            Node("den", "add", ("sigx", "xpysqr")),
            Node("one", "const", (), {"value": np.array(1.0)}),
            Node("invden", "div", ("one", "den")),
            Node("f", "mul", ("num", "invden")),
        ),
        ("f",),
    )


def test_staged_circuit_with_fan_out(registry):
    ev = run(registry, staged_circuit(), x=3.0, y=-4.0)
    expected_values = {
        "f": 1.5456448841066441, "sigy": 0.01798620996209156, "num": 3.0179862099620918,
        "sigx": 0.9525741268224334, "den": 1.9525741268224333, "invden": 0.5121444488396316,
    }
    for name, value in expected_values.items():
        assert ev.value(name) == pytest.approx(value, abs=TOL), name
    expected_grads = {
        "x": 2.0595697955721652, "y": 1.5922327514838093, "num": 0.5121444488396316,
        "invden": 3.0179862099620918, "den": -0.7915934472725935, "xpy": 1.583186894545187,
    }
    for name, grad in expected_grads.items():
        assert ev.grad(name) == pytest.approx(grad, abs=TOL), name


def test_max_gate_routes_the_gradient(registry):
    graph = scalar_graph(["x", "y"], [("f", "maximum", ("x", "y"))], "f")
    ev = evaluate(compile_graph(graph, registry), {"x": np.float64(4.0), "y": np.float64(2.0)}, seed=np.float64(2.0))
    assert ev.grad("x") == 2.0
    assert ev.grad("y") == 0.0


def test_fan_out_accumulates(registry):
    graph = scalar_graph(["x"], [("xx", "mul", ("x", "x")), ("f", "add", ("xx", "x"))], "f")
    for x in (3.0, -1.5, 0.0):
        ev = run(registry, graph, x=x)
        assert ev.grad("x") == pytest.approx(2 * x + 1, abs=TOL)


def four_layer_network(batch: int, features: int = 4, hidden: int = 4) -> GraphIR:
    """4 inputs, two sigmoid hidden layers, one sigmoid output, squared error."""
    return GraphIR(
        (
            InputDecl("X", "float64", (batch, features)), InputDecl("T", "float64", (batch, 1)),
            InputDecl("W1", "float64", (features, hidden)), InputDecl("b1", "float64", (hidden,)),
            InputDecl("W2", "float64", (hidden, hidden)), InputDecl("b2", "float64", (hidden,)),
            InputDecl("W3", "float64", (hidden, 1)), InputDecl("b3", "float64", (1,)),
        ),
        (
            Node("z1", "matmul", ("X", "W1")), Node("a1", "add", ("z1", "b1")), Node("h1", "sigmoid", ("a1",)),
            Node("z2", "matmul", ("h1", "W2")), Node("a2", "add", ("z2", "b2")), Node("h2", "sigmoid", ("a2",)),
            Node("z3", "matmul", ("h2", "W3")), Node("a3", "add", ("z3", "b3")), Node("y", "sigmoid", ("a3",)),
            Node("C", "mse", ("y", "T")),
        ),
        ("C",),
    )


def test_four_layer_network_learns(registry):
    rng = np.random.default_rng(0)
    X = rng.uniform(-1, 1, (32, 4))
    T = (np.sin(X[:, :1] * 2) * X[:, 1:2] > 0).astype(np.float64)  # a non-linear target
    params = {
        "W1": rng.normal(0, 1, (4, 4)), "b1": np.zeros(4), "W2": rng.normal(0, 1, (4, 4)), "b2": np.zeros(4),
        "W3": rng.normal(0, 1, (4, 1)), "b3": np.zeros(1),
    }
    plan = compile_graph(four_layer_network(32), registry)
    losses = []
    for _ in range(3000):
        ev = evaluate(plan, {"X": X, "T": T, **params})
        losses.append(float(ev.output_value))
        for name in params:
            params[name] = params[name] - 2.0 * ev.grad(name)
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])
