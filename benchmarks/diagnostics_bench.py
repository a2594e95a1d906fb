"""Cost of the always-on diagnostics, against the evaluation they diagnose.

    python benchmarks/diagnostics_bench.py

(a) the 10,000-node scalar chain of core_bench (x + a, x * b, tanh, repeated);
(b) sigmoid(a * b + c) and tanh of it, summed, on 10^7-element vectors.
For each: the best time of the forward + backward run, of diagnose() on its
result, and the ratio. Not a test: run on demand, never in CI.
"""
from __future__ import annotations

import numpy as np

from chainrule.core import GraphIR, InputDecl, Limits, Node, compile_graph, evaluate
from chainrule.core.diagnostics import diagnose
from chainrule.plugins.manager import load_plugins

from core_bench import best_of, chain_graph


def big_graph(n: int) -> GraphIR:
    vector = ("float64", (n,))
    return GraphIR(
        tuple(InputDecl(name, *vector) for name in "abc"),
        (Node("m", "mul", ("a", "b")), Node("z", "add", ("m", "c")), Node("s", "sigmoid", ("z",)),
         Node("t", "tanh", ("z",)), Node("u", "add", ("s", "t")), Node("f", "sum", ("u",))),
        ("f",),
    )


def measure(label: str, graph: GraphIR, inputs: dict[str, np.ndarray], repeats: int) -> None:
    registry = load_plugins(entry_points=False, only=["builtin"]).registry
    plan = compile_graph(graph, registry, Limits(max_tensor_elements=10**8, max_memory_bytes=10**10))
    evaluation = evaluate(plan, inputs)
    run = best_of(lambda: evaluate(plan, inputs), repeats)
    diag = best_of(lambda: diagnose(evaluation), repeats)
    print(f"{label}: run {run * 1e3:.1f} ms, diagnose {diag * 1e3:.2f} ms ({diag / run:.0%} of the run); "
          f"{len(diagnose(evaluation).flags)} flag(s)")


def main() -> None:
    measure("(a) scalar chain, 10,000 nodes", chain_graph(10_000),
            {"x": np.array(0.5), "a": np.array(0.1), "b": np.array(0.9)}, repeats=20)
    rng = np.random.default_rng(0)
    n = 10**7
    measure("(b) 10^7-element vectors", big_graph(n), {k: rng.standard_normal(n) for k in "abc"}, repeats=5)


if __name__ == "__main__":
    main()
