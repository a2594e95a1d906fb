"""Core engine speed, as ratios against references measured in the same run.

    python benchmarks/core_bench.py            # all cases
    python benchmarks/core_bench.py --quick    # fewer repeats

(a) scalar chain of 10,000 ops (x + a, x * b, tanh, repeated): microseconds per
    op for forward + backward, against a hand-written pure-Python tape and, when
    installed, PyTorch with 0-d tensors;
(b) the 4-layer sigmoid network with squared error, small and large, against a
    hand-written numpy forward + backward of the same network: once with the
    gradient of every node (which includes dL/dX, a product the hand-written
    version skips) and once with ``wrt=`` the parameters, which is the same work;
(c) sum(sigmoid(a * b + c)) on 10^7-element vectors against hand-written numpy.
Not a test: run on demand, never in CI.
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np

from chainrule.core import GraphIR, InputDecl, Node, compile_graph, evaluate
from chainrule.plugins.manager import load_plugins


def best_of(fn, repeats: int) -> float:
    """Best wall time of ``repeats`` calls (the least disturbed run)."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


# --- (a) scalar chain ---------------------------------------------------------------------

CHAIN_OPS = ("add", "mul", "tanh")


def chain_graph(n: int) -> GraphIR:
    nodes, previous = [], "x"
    for i in range(n):
        op = CHAIN_OPS[i % 3]
        inputs = (previous,) if op == "tanh" else (previous, "a" if op == "add" else "b")
        nodes.append(Node(f"n{i}", op, inputs))
        previous = f"n{i}"
    return GraphIR((InputDecl("x"), InputDecl("a"), InputDecl("b")), tuple(nodes), (previous,))


def chain_pure_python(n: int, x: float, a: float, b: float) -> tuple[float, float, float, float]:
    """Forward keeping every value, then backward with local derivatives, in plain floats."""
    values = [x]
    for i in range(n):
        v = values[-1]
        values.append(v + a if i % 3 == 0 else v * b if i % 3 == 1 else math.tanh(v))
    g, ga, gb = 1.0, 0.0, 0.0
    for i in range(n - 1, -1, -1):
        kind, v_in, out = i % 3, values[i], values[i + 1]
        if kind == 0:
            ga += g
        elif kind == 1:
            gb += g * v_in
            g = g * b
        else:
            g = g * (1.0 - out * out)
    return values[-1], g, ga, gb


def chain_torch(n: int, x: float, a: float, b: float):
    import torch

    tx = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    ta = torch.tensor(a, dtype=torch.float64, requires_grad=True)
    tb = torch.tensor(b, dtype=torch.float64, requires_grad=True)
    v = tx
    for i in range(n):
        v = v + ta if i % 3 == 0 else v * tb if i % 3 == 1 else torch.tanh(v)
    v.backward()
    return v.item(), tx.grad.item(), ta.grad.item(), tb.grad.item()


# --- (b) 4-layer network ------------------------------------------------------------------

def network_graph(batch: int, features: int, hidden: int) -> GraphIR:
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


def network_numpy(X, T, W1, b1, W2, b2, W3, b3):
    """The same network, forward and backward, written by hand."""
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
    h1 = sig(X @ W1 + b1)
    h2 = sig(h1 @ W2 + b2)
    y = sig(h2 @ W3 + b3)
    loss = np.mean((y - T) ** 2)
    dy = 2.0 * (y - T) / y.size
    da3 = dy * y * (1 - y)
    dW3, db3 = h2.T @ da3, da3.sum(0)
    dh2 = da3 @ W3.T
    da2 = dh2 * h2 * (1 - h2)
    dW2, db2 = h1.T @ da2, da2.sum(0)
    dh1 = da2 @ W2.T
    da1 = dh1 * h1 * (1 - h1)
    dW1, db1 = X.T @ da1, da1.sum(0)
    return loss, dW1, db1, dW2, db2, dW3, db3


def network_torch(inputs: dict[str, np.ndarray], params: list[str]):
    """The same step in PyTorch (float64, autograd): a peer's figure, when torch is installed."""
    import torch

    t = {k: torch.tensor(v, requires_grad=k in params) for k, v in inputs.items()}

    def step():
        for k in params:
            t[k].grad = None
        h1 = torch.sigmoid(t["X"] @ t["W1"] + t["b1"])
        h2 = torch.sigmoid(h1 @ t["W2"] + t["b2"])
        y = torch.sigmoid(h2 @ t["W3"] + t["b3"])
        loss = torch.mean((y - t["T"]) ** 2)
        loss.backward()
        return loss

    return step


def network_inputs(batch: int, features: int, hidden: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "X": rng.normal(size=(batch, features)), "T": rng.uniform(size=(batch, 1)),
        "W1": rng.normal(size=(features, hidden)) / np.sqrt(features), "b1": np.zeros(hidden),
        "W2": rng.normal(size=(hidden, hidden)) / np.sqrt(hidden), "b2": np.zeros(hidden),
        "W3": rng.normal(size=(hidden, 1)) / np.sqrt(hidden), "b3": np.zeros(1),
    }


# --- (c) big elementwise ------------------------------------------------------------------

def elementwise_graph(n: int) -> GraphIR:
    return GraphIR(
        tuple(InputDecl(name, "float64", (n,)) for name in "abc"),
        (Node("ab", "mul", ("a", "b")), Node("u", "add", ("ab", "c")), Node("s", "sigmoid", ("u",)), Node("f", "sum", ("s",))),
        ("f",),
    )


def elementwise_numpy(a, b, c):
    u = a * b + c
    s = 1.0 / (1.0 + np.exp(-u))
    f = s.sum()
    du = s * (1.0 - s)
    return f, du * b, du * a, du


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    registry = load_plugins(entry_points=False, only=["builtin"]).registry
    rows: list[tuple[str, str, float, str, float, str]] = []

    # (a)
    n = 10_000
    plan = compile_graph(chain_graph(n), registry)
    scalars = {"x": np.float64(0.3), "a": np.float64(0.1), "b": np.float64(0.9)}
    ev = evaluate(plan, scalars)
    reference = chain_pure_python(n, 0.3, 0.1, 0.9)
    assert abs(float(ev.grad("a")) - reference[2]) < 1e-9 and abs(float(ev.grad("b")) - reference[3]) < 1e-9
    ours = best_of(lambda: evaluate(plan, scalars), repeats) / n * 1e6
    pure = best_of(lambda: chain_pure_python(n, 0.3, 0.1, 0.9), repeats) / n * 1e6
    rows.append(("(a) scalar chain, us/op", "pure Python tape", pure, "chainrule", ours, "target <= 3 us/op"))
    try:
        import torch  # noqa: F401

        torch_us = best_of(lambda: chain_torch(n, 0.3, 0.1, 0.9), repeats) / n * 1e6
        rows.append(("(a) scalar chain, us/op", "PyTorch 0-d tensors", torch_us, "chainrule", ours, "target ratio <= 0.5"))
    except ImportError:
        rows.append(("(a) scalar chain, us/op", "PyTorch (not installed)", math.nan, "chainrule", ours, ""))

    # (b)
    for label, (batch, features, hidden), target in (
        ("small 32x4x4", (32, 4, 4), "target <= 3x"),
        ("large 4096x512x512", (4096, 512, 512), "target <= 1.05x"),
    ):
        inputs = network_inputs(batch, features, hidden)
        plan = compile_graph(network_graph(batch, features, hidden), registry)
        ev = evaluate(plan, inputs)
        expected = network_numpy(**inputs)
        np.testing.assert_allclose(ev.grad("W1"), expected[1], rtol=1e-9, atol=1e-12)
        reps = repeats * (20 if batch < 100 else 1)
        params = [name for name in inputs if name not in ("X", "T")]
        ref = best_of(lambda: network_numpy(**inputs), reps)
        every = best_of(lambda: evaluate(plan, inputs), reps)
        wrt = best_of(lambda: evaluate(plan, inputs, wrt=params), reps)
        rows.append((f"(b) 4-layer {label}, ms, every grad", "hand-written numpy", ref * 1e3, "chainrule", every * 1e3, ""))
        rows.append((f"(b) 4-layer {label}, ms, wrt=params", "hand-written numpy", ref * 1e3, "chainrule", wrt * 1e3, target))
        try:
            torch_step = network_torch(inputs, params)
            peer = best_of(torch_step, reps)
            rows.append((f"(b) 4-layer {label}, ms, PyTorch", "hand-written numpy", ref * 1e3, "PyTorch", peer * 1e3, "peer"))
        except ImportError:
            pass

    # (c)
    size = 10_000_000
    rng = np.random.default_rng(1)
    vectors = {name: rng.normal(size=size) for name in "abc"}
    plan = compile_graph(elementwise_graph(size), registry)
    ev = evaluate(plan, vectors)
    expected = elementwise_numpy(**vectors)
    np.testing.assert_allclose(ev.grad("a"), expected[1], rtol=1e-12)
    ref = best_of(lambda: elementwise_numpy(**vectors), repeats)
    ours = best_of(lambda: evaluate(plan, vectors), repeats)
    rows.append(("(c) sum(sigmoid(a*b+c)), 1e7, ms", "hand-written numpy", ref * 1e3, "chainrule", ours * 1e3, "target <= 1.0x"))

    print(f"{'case':<44} {'reference':<24} {'ref':>10} {'measured':>10} {'ratio':>7}  target")
    for case, ref_name, ref_value, _, ours_value, target in rows:
        ratio = ours_value / ref_value if ref_value == ref_value else math.nan
        print(f"{case:<44} {ref_name:<24} {ref_value:>10.3f} {ours_value:>10.3f} {ratio:>7.2f}  {target}")


if __name__ == "__main__":
    main()
