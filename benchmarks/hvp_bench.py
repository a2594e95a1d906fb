"""Second order and forward mode on the large 4-layer network: HVP over a gradient, JVP over a forward pass.

    python benchmarks/hvp_bench.py            # every row (a minute or two)
    python benchmarks/hvp_bench.py --quick    # fewer repeats
    python benchmarks/hvp_bench.py --tune-allocator   # glibc tuned as `chainrule serve` tunes it

The network of core_bench.py and user_bench.py (batch 4096, 512 features, two
sigmoid layers of 512, a sigmoid output, mean squared error), float64, with
respect to all six parameters (W1, b1, W2, b2, W3, b3):

* HVP: H·v for a random v of every parameter's shape, against one gradient
  evaluation of the same path (theory: a small constant, about 2-5x);
* JVP: the loss's directional derivative along random tangents of every
  parameter, against one forward pass of the same path (theory: about 2-3x).

Paths, each measured in the same run:
  core engine   compile_graph + evaluate; the gradient by the numpy rules
                (``wrt=`` the parameters), the HVP a graph from derive_reverse
                of sum(grad·v) (a ``grad`` node), the JVP one from derive_forward;
  LocalClient   the user's call: ``evaluate(f, inputs, grads=params)``, and
                ``ops.hvp`` / ``ops.jvp`` graphs built with the builder,
                registered once (``LocalClient.register``);
  PyTorch       double backward: ``torch.autograd.grad(create_graph=True)``,
                then the gradient of sum(grad·v); the JVP by ``torch.func.jvp``
                (when torch is installed);
  JAX-jit       ``jit(jvp(grad(f)))`` and ``jit(jvp(f))``, float64 (when jax is installed).

Every path's HVP is checked against central differences of the hand-written
gradient (core_bench.network_numpy), and its JVP against sum(grad·t), before
it is timed. Every cell of every path is timed in turn (a, b, c, a, b, c...)
after two warm-ups, so that the machine's drifts hit all alike; the table gives
the best time of each cell (the least disturbed call: on a shared machine an
HVP's time varies two- to three-fold with other tenants' load) and, below it,
the medians. Everything runs in this process with the C library's default
allocator, as a LocalClient user's program does: the HVP's ~50 temporaries of
16 MiB come as fresh mmap'd pages, whose faults (kernel time) make a call
sometimes twice as slow. ``--tune-allocator`` applies the server's tuning
(server/memory.py, for every path of the run): freed blocks stay in the heap.
Not a test: run on demand, never in CI.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from chainrule.client import ops
from chainrule.core import compile_graph, evaluate
from chainrule.core.symbolic import derive_forward, derive_reverse, hvp_graph
from chainrule.plugins.manager import load_plugins
from chainrule.server import LocalClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from core_bench import network_graph, network_inputs, network_numpy  # noqa: E402
from user_bench import OthersMeter, checked, first_line, network_target, timed_in_turn  # noqa: E402

try:
    import torch
except ImportError:  # the PyTorch row is skipped
    torch = None
try:
    import jax
except ImportError:  # the JAX row is skipped
    jax = None

BATCH, FEATURES, HIDDEN = 4096, 512, 512
PARAMS = ["W1", "b1", "W2", "b2", "W3", "b3"]
SIZE = f"{BATCH}x{FEATURES}-{HIDDEN}-{HIDDEN}-1"


# --- expected values ---------------------------------------------------------------------------------

def directions(inputs: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """A random direction of every parameter's shape, scaled like the parameter."""
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(inputs[name].shape) / math.sqrt(max(1, inputs[name].shape[0]))
            for name in PARAMS}


def numpy_gradient(inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    return list(network_numpy(**inputs)[1:])


def finite_difference_hvp(inputs: dict[str, np.ndarray], v: dict[str, np.ndarray],
                          eps: float = 1e-5) -> list[np.ndarray]:
    """(∇C(θ + εv) − ∇C(θ − εv)) / 2ε with the hand-written gradient."""
    plus = numpy_gradient({**inputs, **{k: inputs[k] + eps * v[k] for k in PARAMS}})
    minus = numpy_gradient({**inputs, **{k: inputs[k] - eps * v[k] for k in PARAMS}})
    return [(p - m) / (2 * eps) for p, m in zip(plus, minus)]


def check_hvp(got: list[Any], expected: list[np.ndarray], what: str) -> None:
    scale = max(float(np.max(np.abs(e))) for e in expected)
    for name, g, e in zip(PARAMS, got, expected):
        error = float(np.max(np.abs(np.asarray(g, dtype=np.float64) - e)))
        if not error <= 1e-5 * scale:
            raise AssertionError(f"{what}: H·v for {name} differs from finite differences by {error:.2e} "
                                 f"(scale {scale:.2e})")


def check_jvp(got: Any, expected: float, what: str) -> None:
    if not math.isclose(float(got), expected, rel_tol=1e-9, abs_tol=1e-15):
        raise AssertionError(f"{what}: JVP {float(got)!r} differs from sum(grad·t) = {expected!r}")


# --- the four paths: each gives {gradient, hvp, forward, jvp} callables --------------------------------

def core_cases(inputs, v, t, notes: list[str]) -> dict[str, Callable[[], Any]]:
    registry = load_plugins(entry_points=False, only=["builtin"]).registry
    graph = network_graph(BATCH, FEATURES, HIDDEN)
    plan = compile_graph(graph, registry)

    start = time.perf_counter()
    second, names = derive_reverse(hvp_graph(graph, "C", PARAMS), registry, wrt=PARAMS)
    hvp_plan = compile_graph(second, registry)
    derived_hvp = time.perf_counter() - start
    start = time.perf_counter()
    forward, fnames = derive_forward(graph, registry, output="C", wrt=PARAMS)
    jvp_plan = compile_graph(forward, registry)
    derived_jvp = time.perf_counter() - start
    notes.append(f"core engine: HVP graph {len(second.nodes)} nodes (the network: {len(graph.nodes)}), derived and "
                 f"compiled in {derived_hvp * 1e3:.0f} ms; JVP graph {len(forward.nodes)} nodes, "
                 f"{derived_jvp * 1e3:.0f} ms")

    hvp_feeds = {**inputs, **{f"v.{k}": v[k] for k in PARAMS}}
    jvp_feeds = {**inputs, **{fnames.tangents[k]: t[k] for k in PARAMS}}

    def hvp():
        ev = evaluate(hvp_plan, hvp_feeds, output=names.gradients[PARAMS[0]], gradients=False)
        return [ev.value(names.gradients[k]) for k in PARAMS]

    return {
        "gradient": lambda: evaluate(plan, inputs, wrt=PARAMS),
        "hvp": hvp,
        "forward": lambda: evaluate(plan, inputs, gradients=False).value("C"),
        "jvp": lambda: evaluate(jvp_plan, jvp_feeds, gradients=False).value(fnames.tangent_output),
    }


def local_cases(local: LocalClient, inputs, v, t, notes: list[str]) -> dict[str, Callable[[], Any]]:
    f = network_target(BATCH, FEATURES, HIDDEN)
    g = f.builder
    params = [g[name] for name in PARAMS]
    vectors = [g.input(f"v.{name}", inputs[name].shape) for name in PARAMS]
    tangents = [g.input(f"t.{name}", inputs[name].shape) for name in PARAMS]
    products = ops.hvp(f, params, vectors)
    tangent = ops.jvp(f, params, tangents, name="dC")
    hvp_graph_ = g.graph_for(*products)
    jvp_graph_ = g.graph_for(tangent)
    start = time.perf_counter()
    local.register(hvp_graph_)
    local.register(jvp_graph_)
    notes.append(f"LocalClient: ops.hvp and ops.jvp graphs ({len(hvp_graph_)} and {len(jvp_graph_)} nodes before "
                 f"expansion) registered in {(time.perf_counter() - start) * 1e3:.0f} ms")
    hvp_feeds = {**inputs, **{f"v.{k}": v[k] for k in PARAMS}}
    jvp_feeds = {**inputs, **{f"t.{k}": t[k] for k in PARAMS}}
    rest = [p.name for p in products[1:]]

    def hvp():
        r = local.evaluate(hvp_graph_, hvp_feeds, output=products[0].name, values=rest, grads="none",
                           diagnostics=False)
        return [r.value, *(r.values[name] for name in rest)]

    return {
        "gradient": lambda: local.evaluate(f, inputs, grads=PARAMS, diagnostics=False),
        "hvp": hvp,
        "forward": lambda: local.evaluate(f, inputs, grads="none", diagnostics=False).value,
        "jvp": lambda: local.evaluate(jvp_graph_, jvp_feeds, grads="none", diagnostics=False).value,
    }


def torch_cases(inputs, v, t, notes: list[str]) -> dict[str, Callable[[], Any]]:
    data = {k: torch.tensor(inputs[k]) for k in ("X", "T")}
    params = [torch.tensor(inputs[k], requires_grad=True) for k in PARAMS]
    vs = [torch.tensor(v[k]) for k in PARAMS]
    ts = [torch.tensor(t[k]) for k in PARAMS]

    def loss(W1, b1, W2, b2, W3, b3):
        h1 = torch.sigmoid(data["X"] @ W1 + b1)
        h2 = torch.sigmoid(h1 @ W2 + b2)
        y = torch.sigmoid(h2 @ W3 + b3)
        return torch.mean((y - data["T"]) ** 2)

    def gradient():
        return torch.autograd.grad(loss(*params), params)

    def hvp():  # double backward
        grads = torch.autograd.grad(loss(*params), params, create_graph=True)
        dot = sum((g * u).sum() for g, u in zip(grads, vs))
        return [h.numpy() for h in torch.autograd.grad(dot, params)]

    def forward():
        with torch.no_grad():
            return loss(*params).item()

    def jvp():
        detached = tuple(p.detach() for p in params)
        return torch.func.jvp(loss, detached, tuple(ts))[1].item()

    notes.append(f"PyTorch {torch.__version__}, {torch.get_num_threads()} threads; JVP by torch.func.jvp (forward AD)")
    return {"gradient": gradient, "hvp": hvp, "forward": forward, "jvp": jvp}


def jax_cases(inputs, v, t, notes: list[str]) -> dict[str, Callable[[], Any]]:
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    X, T = jnp.asarray(inputs["X"]), jnp.asarray(inputs["T"])
    params = tuple(jnp.asarray(inputs[k]) for k in PARAMS)
    vs = tuple(jnp.asarray(v[k]) for k in PARAMS)
    ts = tuple(jnp.asarray(t[k]) for k in PARAMS)
    assert params[0].dtype == jnp.float64

    def loss(p, X, T):
        W1, b1, W2, b2, W3, b3 = p
        h1 = jax.nn.sigmoid(X @ W1 + b1)
        h2 = jax.nn.sigmoid(h1 @ W2 + b2)
        y = jax.nn.sigmoid(h2 @ W3 + b3)
        return jnp.mean((y - T) ** 2)

    grad = jax.jit(jax.grad(loss))
    hvp = jax.jit(lambda p, u, X, T: jax.jvp(lambda q: jax.grad(loss)(q, X, T), (p,), (u,))[1])
    forward = jax.jit(loss)
    jvp = jax.jit(lambda p, u, X, T: jax.jvp(lambda q: loss(q, X, T), (p,), (u,))[1])
    notes.append(f"JAX {jax.__version__} ({jax.default_backend()}), float64, jit; HVP jit(jvp(grad(f)))")
    return {
        "gradient": lambda: jax.block_until_ready(grad(params, X, T)),
        "hvp": lambda: [np.asarray(h) for h in jax.block_until_ready(hvp(params, vs, X, T))],
        "forward": lambda: float(forward(params, X, T)),
        "jvp": lambda: float(jvp(params, ts, X, T)),
    }


# --- the run ---------------------------------------------------------------------------------------

KINDS = ("gradient", "hvp", "forward", "jvp")


def timings(repeats: int, cases: dict[Any, Callable[[], Any]], *, warmup: int = 2,
            settle: float = 0.3) -> tuple[dict[Any, float | str], dict[Any, float | str]]:
    """(best, median) milliseconds per call of each case, the cases timed in turn (user_bench's
    timed_in_turn); "fails: <first line>" for a case whose call raised."""
    times, failed = timed_in_turn(repeats, cases, warmup=warmup, settle=settle)
    best = {key: failed[key] if key in failed else min(times[key]) * 1e3 for key in cases}
    median = {key: failed[key] if key in failed else statistics.median(times[key]) * 1e3 for key in cases}
    return best, median


def prepare(path: str, make: Callable[[], dict[str, Callable[[], Any]]], expected_hvp, expected_jvp,
            cases: dict[tuple[str, str], Callable[[], Any]], failed: dict[str, str]) -> None:
    """Add ``path``'s four calls to ``cases`` (the HVP and JVP checked on their first call), or its
    failure to ``failed``."""
    try:
        made = make()
    except Exception as exc:  # noqa: BLE001 (reported in the table)
        failed[path] = "fails: " + first_line(exc)
        return
    made["hvp"] = checked(made["hvp"], lambda got: check_hvp(got, expected_hvp, path))
    made["jvp"] = checked(made["jvp"], lambda got: check_jvp(got, expected_jvp, path))
    cases.update(((path, kind), made[kind]) for kind in KINDS)


def print_table(title: str, paths: list[str], times: dict[tuple[str, str], float | str],
                failed: dict[str, str]) -> None:
    header = (f"{'path':<13} {'gradient ms':>11} {'HVP ms':>9} {'HVP/grad':>9}   "
              f"{'forward ms':>10} {'JVP ms':>9} {'JVP/fwd':>8}")
    print(title)
    print(header)
    print("-" * len(header))
    problems = []

    def cell(value: float | str, width: int) -> str:
        return f"{value:>{width}.1f}" if isinstance(value, float) else "fails".rjust(width)

    def ratio(a: float | str, b: float | str) -> str:
        return f"{a / b:>7.2f}x" if isinstance(a, float) and isinstance(b, float) else "-".rjust(8)

    for path in paths:
        t = {kind: failed.get(path) or times[path, kind] for kind in KINDS}
        print(f"{path:<13} {cell(t['gradient'], 11)} {cell(t['hvp'], 9)} {ratio(t['hvp'], t['gradient']):>9}   "
              f"{cell(t['forward'], 10)} {cell(t['jvp'], 9)} {ratio(t['jvp'], t['forward'])}")
        if path in failed:
            problems.append(f"{path}: {failed[path]}")
        else:
            problems += [f"{path} {kind}: {value}" for kind, value in t.items() if isinstance(value, str)]
    for problem in problems:
        print("  " + problem)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--tune-allocator", action="store_true",
                        help="raise glibc's mmap and trim thresholds as `chainrule serve` does (server/memory.py)")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    tuned = False
    if args.tune_allocator:
        from chainrule.server.memory import tune_allocator

        tuned = tune_allocator()

    inputs = network_inputs(BATCH, FEATURES, HIDDEN)
    v, t = directions(inputs, 1), directions(inputs, 2)
    expected_hvp = finite_difference_hvp(inputs, v)
    expected_jvp = float(sum(np.sum(g * t[k]) for g, k in zip(numpy_gradient(inputs), PARAMS)))

    notes: list[str] = []
    cases: dict[tuple[str, str], Callable[[], Any]] = {}
    failed: dict[str, str] = {}
    paths = ["core engine", "LocalClient"]
    with LocalClient() as local:
        prepare("core engine", lambda: core_cases(inputs, v, t, notes), expected_hvp, expected_jvp, cases, failed)
        prepare("LocalClient", lambda: local_cases(local, inputs, v, t, notes), expected_hvp, expected_jvp,
                cases, failed)
        if torch is not None:
            paths.append("PyTorch")
            prepare("PyTorch", lambda: torch_cases(inputs, v, t, notes), expected_hvp, expected_jvp, cases, failed)
        else:
            notes.append("PyTorch: not installed (row skipped)")
        if jax is not None:
            paths.append("JAX-jit")
            prepare("JAX-jit", lambda: jax_cases(inputs, v, t, notes), expected_hvp, expected_jvp, cases, failed)
        else:
            notes.append("JAX: not installed (row skipped)")
        # Every cell of every path timed in turn, so that the machine's drifts (other processes) hit all alike.
        meter = OthersMeter()
        best, median = timings(repeats, cases)
        others = meter.read()

    print_table(f"4-layer MLP {SIZE}, float64, HVP and JVP with respect to all parameters ({', '.join(PARAMS)}); "
                f"best of {repeats}", paths, best, failed)
    print()
    print_table(f"medians of the same {repeats} calls", paths, median, failed)
    print()
    for note in notes:
        print(note)
    allocator = "tuned as the server tunes it" if tuned else "the C library's default (--tune-allocator: the server's)"
    print(f"times: {repeats} calls per cell, every cell of every row timed in turn, after two warm-ups; "
          f"numpy {np.__version__}, {os.cpu_count()} CPUs; allocator {allocator}.")
    print("checks: each path's HVP against central differences of the hand-written gradient, its JVP against "
          "sum(grad·t), on its first call.")
    print(f"others: {'-' if others is None else f'{others:.2f}'} CPUs kept busy on average by other processes of the "
          "machine during the run (user_bench's OthersMeter); well above 0, the times are less reliable.")

if __name__ == "__main__":
    main()
