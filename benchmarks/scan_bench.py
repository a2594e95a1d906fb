"""scan against the unrolled graph (issue 15): a tanh RNN, hidden 32, batch 16.

    h_t = tanh(x_t Wx + h_{t-1} Wh + b),  loss = sum(h_T) + sum_t mean(h_t)

For T in (10, 100, 1000) it reports, for the scan graph and the unrolled one:
the request's graph bytes, the compile time (wire graph to plan), and the time
of one forward+backward through ``LocalClient.evaluate`` (the user's call; the
plan cached, as on every call after the first), per step. PyTorch's autograd on
the same loop runs in the same process when installed.

    python benchmarks/scan_bench.py [--repeats 7]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from chainrule.client import GraphBuilder, ops
from chainrule.plugins.manager import load_registry
from chainrule.server import LocalClient
from chainrule.core import compile_graph
from chainrule.wire.convert import graph_from_proto

BATCH, HIDDEN, FEATURES = 16, 32, 8


def _inputs(g: GraphBuilder, steps: int):
    return (g.input("h0", (BATCH, HIDDEN)), g.input("xs", (steps, BATCH, FEATURES)),
            g.input("Wx", (FEATURES, HIDDEN)), g.input("Wh", (HIDDEN, HIDDEN)), g.input("b", (HIDDEN,)))


def scan_graph(steps: int):
    g = GraphBuilder()
    h0, xs, wx, wh, b = _inputs(g, steps)

    def step(h, x, wx, wh, b):
        h2 = ops.tanh(x @ wx + h @ wh + b)
        return h2, ops.mean(h2)

    h_t, ys = ops.scan(step, h0, xs, [wx, wh, b])
    return (ops.sum(h_t) + ops.sum(ys)).named("loss")


def unrolled_graph(steps: int):
    g = GraphBuilder()
    h, xs, wx, wh, b = _inputs(g, steps)
    means = []
    for t in range(steps):
        h = ops.tanh(xs[t] @ wx + h @ wh + b)
        means.append(ops.mean(h))
    return (ops.sum(h) + ops.sum(ops.stack(means))).named("loss")


def feed(steps: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"h0": rng.standard_normal((BATCH, HIDDEN)) * 0.1, "xs": rng.standard_normal((steps, BATCH, FEATURES)),
            "Wx": rng.standard_normal((FEATURES, HIDDEN)) * 0.3, "Wh": rng.standard_normal((HIDDEN, HIDDEN)) * 0.15,
            "b": np.zeros(HIDDEN)}


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def torch_time(steps: int, repeats: int) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(1)
    data = {k: torch.tensor(v, requires_grad=k != "xs") for k, v in feed(steps).items()}

    def run():
        h = data["h0"]
        total = 0
        for t in range(steps):
            h = torch.tanh(data["xs"][t] @ data["Wx"] + h @ data["Wh"] + data["b"])
            total = total + h.mean()
        loss = h.sum() + total
        for v in data.values():
            v.grad = None
        loss.backward()

    run()
    return best(run, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    registry = load_registry(entry_points=False)
    client = LocalClient()
    print(f"tanh RNN, batch {BATCH}, hidden {HIDDEN}, features {FEATURES}; best of {args.repeats}")
    print(f"{'T':>5} {'graph':>9} {'bytes':>9} {'compile ms':>11} {'run ms':>9} {'us/step':>8} {'vs unrolled':>11} "
          f"{'vs torch':>9}")
    for steps in (10, 100, 1000):
        inputs = feed(steps)
        torch_seconds = torch_time(steps, args.repeats)
        rows = {}
        for kind, build in (("unrolled", unrolled_graph), ("scan", scan_graph)):
            loss = build(steps)
            message = loss.graph.message
            compile_seconds = best(lambda: compile_graph(graph_from_proto(message), registry), 3)
            client.evaluate(loss, inputs)  # compiles and caches the plan
            run_seconds = best(lambda: client.evaluate(loss, inputs, diagnostics=False), args.repeats)
            rows[kind] = (message.ByteSize(), compile_seconds, run_seconds)
        for kind, (size, compile_seconds, run_seconds) in rows.items():
            ratio = run_seconds / rows["unrolled"][2]
            versus = f"{run_seconds / torch_seconds:8.2f}x" if torch_seconds else "       -"
            print(f"{steps:>5} {kind:>9} {size:>9} {compile_seconds * 1e3:>11.2f} {run_seconds * 1e3:>9.2f} "
                  f"{run_seconds / steps * 1e6:>8.1f} {ratio:>10.2f}x {versus}")
        if torch_seconds:
            print(f"{steps:>5} {'torch':>9} {'':>9} {'':>11} {torch_seconds * 1e3:>9.2f} "
                  f"{torch_seconds / steps * 1e6:>8.1f}")


if __name__ == "__main__":
    main()
