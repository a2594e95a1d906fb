"""The 4-layer network of the lecture notes, trained through a chainrule server.

4 inputs, two hidden layers with sigmoid, 1 output, squared-error loss,
fitted by gradient descent (W ← W − ε·∂C/∂W, or Adam) to a noisy non-linear
function of the 4 inputs that this script generates. The server does the
forward pass, the backward pass and the updates (the Optimize RPC); this
script only builds the graph, sends the data once and prints the loss falling.

    python examples/train_four_layer.py                      # starts a server in-process
    python examples/train_four_layer.py --server 127.0.0.1:50051 --optimizer sgd --lr 0.5
"""
from __future__ import annotations

import argparse

import numpy as np

from chainrule.client import Client, GraphBuilder, Progress, TrainResult, Var, ops

INPUTS, HIDDEN, OUTPUTS = 4, (16, 16), 1


def four_layer_network(samples: int = -1, hidden: tuple[int, int] = HIDDEN) -> Var:
    """The loss node: mse(sigmoid(sigmoid(X W1 + b1) W2 + b2) W3 + b3, T), batch size ``samples`` (-1: any)."""
    g = GraphBuilder()
    x = g.input("X", (samples, INPUTS))
    t = g.input("T", (samples, OUTPUTS))
    sizes = (INPUTS, *hidden, OUTPUTS)
    layer = x
    for i in range(3):
        w = g.input(f"W{i + 1}", (sizes[i], sizes[i + 1]))
        b = g.input(f"b{i + 1}", (sizes[i + 1],))
        layer = (layer @ w + b).named(f"z{i + 1}")
        if i < 2:
            layer = layer.sigmoid(name=f"h{i + 1}")
    return ops.mse(layer, t, name="C")


def make_data(samples: int = 256, seed: int = 0, noise: float = 0.02) -> dict[str, np.ndarray]:
    """X uniform in [-1, 1]^4; T = sin(πx1)·x2 + x3² − 0.5·x4 + noise."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, size=(samples, INPUTS))
    t = np.sin(np.pi * x[:, 0]) * x[:, 1] + x[:, 2] ** 2 - 0.5 * x[:, 3]
    t = t + noise * rng.standard_normal(samples)
    return {"X": x, "T": t[:, None]}


def init_params(seed: int = 1, hidden: tuple[int, int] = HIDDEN) -> dict[str, np.ndarray]:
    """Xavier-style random weights, zero biases."""
    rng = np.random.default_rng(seed)
    sizes = (INPUTS, *hidden, OUTPUTS)
    params = {}
    for i in range(3):
        params[f"W{i + 1}"] = rng.normal(0.0, np.sqrt(2.0 / (sizes[i] + sizes[i + 1])), (sizes[i], sizes[i + 1]))
        params[f"b{i + 1}"] = np.zeros(sizes[i + 1])
    return params


def train(client, *, steps: int = 400, optimizer: str = "adam", lr: float = 0.02, seed: int = 0,
          report_every: int = 50, progress: bool | None = False, callback=None) -> TrainResult:
    """Train the network on the generated data through ``client`` (a Client or LocalClient)."""
    return client.optimize(
        four_layer_network(), init_params(seed + 1), make_data(seed=seed), optimizer=optimizer, lr=lr,
        steps=steps, report_every=report_every, progress=progress, callback=callback,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", help="address of a running server (default: start one in-process)")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="adam")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args(argv)

    server = None
    address = args.server
    if address is None:
        from chainrule.server import create_server

        server, port = create_server("127.0.0.1:0")
        server.start()
        address = f"127.0.0.1:{port}"
    try:
        with Client(address, timeout=300) as client:
            def show(report: Progress) -> None:
                print(f"step {report.step:>5}   loss {report.loss:.6f}   |dC/dW1| {report.grad_norms['W1']:.3g}")

            result = train(client, steps=args.steps, optimizer=args.optimizer, lr=args.lr,
                           report_every=max(1, args.steps // 20), callback=show)
    finally:
        if server is not None:
            server.stop(grace=None)
    print(f"loss {result.losses[0]:.6f} -> {result.loss:.6f} "
          f"({result.losses[0] / result.loss:.0f}x lower) in {result.steps} steps, {result.elapsed:.2f}s on the server")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
