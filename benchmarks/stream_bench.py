"""Streaming and training through the service, as ratios against references measured in the same run.

    python benchmarks/stream_bench.py            # server in a child process (the realistic set-up)
    python benchmarks/stream_bench.py --quick    # fewer sets and steps
    python benchmarks/stream_bench.py --in-process

(a) EvaluateStream: input sets per second for a small graph (a sigmoid neuron
    with a 3-vector input, every value and gradient returned), one Evaluate
    call per set against one stream carrying 1, 8, 32 and 128 sets per message.
(b) Optimize: seconds per training step through the server against the same
    step in-process (plan.run for the loss and the parameters' gradients,
    then the optimizer update, in a plain Python loop), for the 4-layer
    network on 256 samples and for a 3-element quadratic (the fixed cost).
Not a test: run on demand, never in CI.
"""
from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from chainrule.client import Client, GraphBuilder
from chainrule.server import LocalClient
from chainrule.core import compile_graph, evaluate
from chainrule.core.optim import make_optimizer
from chainrule.plugins.manager import load_plugins
from chainrule.wire.convert import graph_from_proto

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from train_four_layer import four_layer_network, init_params, make_data  # noqa: E402


def best_of(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def start_server(in_process: bool):
    """A server on a free loopback port: (address, stop)."""
    if in_process:
        from chainrule.server import create_server

        server, port = create_server("127.0.0.1:0")
        server.start()
        return f"127.0.0.1:{port}", lambda: server.stop(grace=None).wait()
    child = subprocess.Popen([sys.executable, "-m", "chainrule.server.cli", "serve", "--port", "0",
                              "--log-level", "WARNING"], stdout=subprocess.PIPE, text=True)
    line = child.stdout.readline()  # "chainrule listening on 127.0.0.1:PORT"
    if "listening on" not in line:
        child.kill()
        raise SystemExit(f"the server did not start: {line!r}")

    def stop() -> None:
        child.terminate()
        child.wait(30)

    return line.split()[-1], stop


# --- (a) EvaluateStream ----------------------------------------------------------------------------

def neuron():
    g = GraphBuilder()
    w, x, b = g.input("w", (3,)), g.input("x", (3,)), g.input("b")
    return ((w * x).sum(name="dot") + b).sigmoid(name="f")


def bench_stream(client: Client, sets: int, repeats: int) -> None:
    f = neuron()
    rng = np.random.default_rng(0)
    inputs = [{"w": rng.normal(size=3), "x": rng.normal(size=3), "b": rng.normal()} for _ in range(sets)]
    client.evaluate(f, inputs[0])  # warm: compiled and cached on the server
    unary = best_of(lambda: [client.evaluate(f, s) for s in inputs], repeats)
    print(f"(a) EvaluateStream, {sets} input sets of a {len(f.graph)}-node graph, all values and gradients returned")
    print(f"    {'one Evaluate call per set':<42}{sets / unary:7.0f} sets/s  1.00x")
    for batch in (1, 8, 32, 128):
        t = best_of(lambda: client.evaluate_many(f, inputs, batch=batch), repeats)
        label = "one set per message" if batch == 1 else f"{batch} sets per message"
        print(f"    {'EvaluateStream, ' + label:<42}{sets / t:7.0f} sets/s  {unary / t:4.2f}x")


# --- (b) Optimize ------------------------------------------------------------------------------------

def quadratic():
    g = GraphBuilder()
    w, c = g.input("w", (3,)), g.input("c", (3,))
    d = w - c
    return (d * d).sum(name="L")


def in_process_loop(loss, params, data, steps: int):
    """The same training in a plain loop over the compiled plan: the reference."""
    plan = compile_graph(graph_from_proto(loss.graph.message), load_plugins().registry)
    names = list(params)

    def run() -> None:
        optimizer = make_optimizer("adam", lr=0.01)
        values = dict(params)
        for _ in range(steps):
            evaluation = evaluate(plan, {**data, **values}, output=loss.name, wrt=names)
            values = optimizer.step(values, {n: evaluation.grad(n) for n in names})

    return run


def bench_optimize(client: Client, steps: int, repeats: int) -> None:
    print(f"(b) Optimize, adam, {steps} steps, default reporting (at most 10 reports a second); time per step")
    cases = [
        ("4-layer network, 256 samples", four_layer_network(), init_params(1), make_data(256)),
        ("quadratic, 3 elements", quadratic(), {"w": np.zeros(3)}, {"c": np.array([1.0, -2.0, 3.0])}),
    ]
    local = LocalClient()
    for label, loss, params, data in cases:
        runs = {
            "reference": in_process_loop(loss, params, data, steps),
            "local": lambda: local.optimize(loss, params, data, optimizer="adam", lr=0.01, steps=steps, progress=False),
            "rpc": lambda: client.optimize(loss, params, data, optimizer="adam", lr=0.01, steps=steps, progress=False),
        }
        best = {name: math.inf for name in runs}
        for _ in range(repeats):  # interleaved, so that a busy moment of the machine hits all three alike
            for name, run in runs.items():
                best[name] = min(best[name], best_of(run, 1) / steps)
        reference, here, remote = best["reference"], best["local"], best["rpc"]
        print(f"    {label}: in-process loop {reference * 1e6:7.1f} us | LocalClient.optimize "
              f"{here * 1e6:7.1f} us ({here / reference:4.2f}x) | Optimize RPC {remote * 1e6:7.1f} us "
              f"({remote / reference:4.2f}x)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sets, steps and repeats")
    parser.add_argument("--in-process", action="store_true", help="run the server in this process")
    args = parser.parse_args()
    address, stop = start_server(args.in_process)
    try:
        with Client(address, timeout=600) as client:
            bench_stream(client, 500 if args.quick else 2000, 2 if args.quick else 3)
            bench_optimize(client, 300 if args.quick else 2000, 3 if args.quick else 7)
    finally:
        stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
