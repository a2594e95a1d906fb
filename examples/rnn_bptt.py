"""Backpropagation through time: a tanh RNN unrolled over a few steps, one weight shared by all.

    h_t = tanh(W h_{t-1} + U x_t + b),   t = 1..T;    C = ½ (v·h_T − y)²

Unrolled, the recurrent weight W feeds T matmul nodes, so the chain rule adds
T contributions into dC/dW: the ``+=`` of fan-out. ``rnn_scan`` builds the same
network with ``ops.scan`` (one step's body, run T times by the server, as
``jax.lax.scan``): the graph stays a handful of nodes whatever T, and its
gradients equal the unrolled graph's (printed below). This script evaluates the
gradients on a chainrule server, checks every one against central finite
differences (all perturbed inputs sent over one EvaluateStream call), and
shows W's per-step contributions (``contributions=True``) summing to its
gradient, each equal to the gradient of an untied copy W_t.

    python examples/rnn_bptt.py                  # starts a server in-process
    python examples/rnn_bptt.py --local          # no server
    python examples/rnn_bptt.py --server 127.0.0.1:50051
"""
from __future__ import annotations

import argparse

import numpy as np

from chainrule.client import Client, GraphBuilder, Result, Var, ops
from chainrule.server import LocalClient

STEPS, HIDDEN, FEATURES = 4, 3, 2


def rnn(steps: int = STEPS, hidden: int = HIDDEN, features: int = FEATURES, *, shared: bool = True) -> Var:
    """The loss C. ``shared=False`` gives each step its own input W1..WT (fed the same value to compare)."""
    g = GraphBuilder()
    x = g.input("X", (steps, features))
    u, b, v = g.input("U", (hidden, features)), g.input("b", (hidden,)), g.input("v", (hidden,))
    y = g.input("y")
    h = g.input("h0", (hidden,))
    w = g.input("W", (hidden, hidden)) if shared else None
    for t in range(1, steps + 1):
        w_t = w if shared else g.input(f"W{t}", (hidden, hidden))
        recurrent = (w_t @ h).named(f"Wh{t}")
        h = (recurrent + u @ x[t - 1] + b).tanh(name=f"h{t}")
    error = ((v * h).sum(name="out") - y).named("error")
    return (0.5 * error * error).named("C")


def rnn_scan(steps: int = STEPS, hidden: int = HIDDEN, features: int = FEATURES) -> Var:
    """The same loss C with the loop as one ``scan`` node: the body is one step, W a constant of it."""
    g = GraphBuilder()
    x = g.input("X", (steps, features))
    u, b, v = g.input("U", (hidden, features)), g.input("b", (hidden,)), g.input("v", (hidden,))
    y = g.input("y")
    h0, w = g.input("h0", (hidden,)), g.input("W", (hidden, hidden))

    def step(h, x_t, w, u, b):
        return ((w @ h) + u @ x_t + b).tanh(name="h"), None

    h_final, _ = ops.scan(step, h0, x, [w, u, b], name="rnn")
    error = ((v * h_final).sum(name="out") - y).named("error")
    return (0.5 * error * error).named("C")


def example_inputs(seed: int = 0, steps: int = STEPS, hidden: int = HIDDEN,
                   features: int = FEATURES) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "X": rng.normal(size=(steps, features)), "W": rng.normal(scale=0.8, size=(hidden, hidden)),
        "U": rng.normal(size=(hidden, features)), "b": rng.normal(scale=0.1, size=hidden),
        "v": rng.normal(size=hidden), "y": np.array(0.5), "h0": rng.normal(scale=0.5, size=hidden),
    }


def finite_differences(client, loss: Var, inputs: dict[str, np.ndarray], names: list[str],
                       eps: float = 1e-6) -> dict[str, np.ndarray]:
    """Central differences (C(θ+ε) − C(θ−ε)) / 2ε of every element of ``names``, over one stream."""
    sets, where = [], []
    for name in names:
        for index in np.ndindex(inputs[name].shape):
            for sign in (1.0, -1.0):
                moved = inputs[name].copy()
                moved[index] += sign * eps
                sets.append({name: moved})
                where.append((name, index))
    results = client.evaluate_many(loss, sets, inputs, values="none", grads="none", batch=16)
    grads = {name: np.zeros_like(inputs[name]) for name in names}
    for k in range(0, len(sets), 2):
        name, index = where[k]
        grads[name][index] = (float(results[k].value) - float(results[k + 1].value)) / (2 * eps)
    return grads


def untied_gradients(client, inputs: dict[str, np.ndarray], steps: int = STEPS) -> list[np.ndarray]:
    """dC/dW_t of the untied network fed W_t = W at every step: the per-step shares of dC/dW."""
    untied = {k: v for k, v in inputs.items() if k != "W"}
    untied.update({f"W{t}": inputs["W"] for t in range(1, steps + 1)})
    result = client.evaluate(rnn(steps, shared=False), untied)
    return [np.asarray(result.grad[f"W{t}"]) for t in range(1, steps + 1)]


def shares_of_w(result: Result) -> dict[str, np.ndarray]:
    """W's gradient contributions by consumer (Wh1..WhT)."""
    return {c.consumer: c.gradient for c in result.contributions if c.node == "W"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--server", help="address of a running server (default: start one in-process)")
    where.add_argument("--local", action="store_true", help="evaluate in-process, without a server")
    args = parser.parse_args(argv)

    server = None
    if args.local:
        client = LocalClient()
    else:
        address = args.server
        if address is None:
            from chainrule.server import create_server

            server, port = create_server("127.0.0.1:0")
            server.start()
            address = f"127.0.0.1:{port}"
        client = Client(address, timeout=60)
    np.set_printoptions(precision=6, suppress=True)
    try:
        with client:
            loss, inputs = rnn(), example_inputs()
            result = client.evaluate(loss, inputs, contributions=True)
            names = ["W", "U", "b", "v", "h0"]
            numeric = finite_differences(client, loss, inputs, names)
            print(f"C = {float(result.value):.10f}")
            for name in names:
                error = np.max(np.abs(result.grad[name] - numeric[name]))
                print(f"dC/d{name:<2} max |backprop - finite difference| = {error:.2e}")
            shares = shares_of_w(result)
            for t, per_step in enumerate(untied_gradients(client, inputs), start=1):
                share = shares[f"Wh{t}"]
                print(f"step {t}: W's share via Wh{t}, |share| = {np.linalg.norm(share):.6f}, "
                      f"equals dC/dW{t} of the untied network: {np.allclose(share, per_step, rtol=0, atol=1e-12)}")
            total = sum(shares.values())
            print("sum of the shares:\n", total, "\ndC/dW:\n", result.grad["W"])
            looped = client.evaluate(rnn_scan(), inputs)
            worst = max(float(np.max(np.abs(looped.grad[name] - result.grad[name]))) for name in names)
            print(f"scan: {len(rnn_scan().graph)} nodes instead of {len(loss.graph)}; C = {float(looped.value):.10f}, "
                  f"max |scan - unrolled| over the gradients = {worst:.1e}")
    finally:
        if server is not None:
            server.stop(grace=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
