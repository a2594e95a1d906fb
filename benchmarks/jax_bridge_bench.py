"""What an operator from JAX costs per call against the same function as a numpy rule.

The function is log(cosh(x)) (acme.logcosh), with vjp g * tanh(x):

* ``numpy``: an OpDef with hand-written numpy forward and vjp rules;
* ``jax``: ``chainrule.plugins.from_jax`` of the JAX function: ``jax.jit`` forward, and the vjp
  from ``jax.vjp`` jit-compiled with the forward it needs, each call inside JAX's x64 context.

For float64 inputs of several sizes it times one forward call, one vjp call (the rules as
the engine calls them), and a whole ``LocalClient.evaluate`` of ``sum(logcosh(x))`` with its
gradient (the service path: compile cache, engine, sum and its vjp). Timings are the median
of ``--repeat`` rounds of ``--number`` calls, the contenders' rounds interleaved; the first
call of each JAX rule (its compilation) is reported apart.

``--sync-dispatch`` sets ``jax_cpu_enable_async_dispatch`` to False before JAX's first
computation: JAX then runs small CPU computations inline instead of on a worker thread, which
the engine's calls (each waits for its result at once) pay for in thread hand-offs. It is a
process-wide JAX flag, so chainrule leaves it to the plugin author or the program.

Not a test: run it by hand::

    python benchmarks/jax_bridge_bench.py [--repeat 15] [--number 50] [--sync-dispatch]
"""
from __future__ import annotations

import argparse
import statistics
import time
import timeit
import types

import numpy as np

from chainrule.client import GraphBuilder
from chainrule.core import OpDef
from chainrule.plugins import OperatorSet, float_like_input, from_jax
from chainrule.plugins.manager import load_plugins
from chainrule.server import LocalClient

LOG2 = float(np.log(2.0))


def logcosh_jax(x):
    import jax.numpy as jnp

    return jnp.logaddexp(x, -x) - jnp.log(2.0)


def numpy_op() -> OpDef:
    return OpDef("bench.logcosh", 1, lambda x: np.logaddexp(x, -x) - LOG2, lambda g, out, x: (g * np.tanh(x),),
                 float_like_input)


def client_for(op: OpDef) -> LocalClient:
    ops = OperatorSet()
    ops.add(op)
    plugin = types.SimpleNamespace(register_operators=ops.hookimpl())
    return LocalClient(load_plugins(entry_points=False, only=["builtin.reduce", "bench"], extra=[("bench", plugin)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--number", type=int, default=50)
    parser.add_argument("--sizes", default="1,100,10000,1000000")
    parser.add_argument("--sync-dispatch", action="store_true",
                        help="jax_cpu_enable_async_dispatch=False (before JAX's first computation)")
    args = parser.parse_args()
    if args.sync_dispatch:
        import jax

        jax.config.update("jax_cpu_enable_async_dispatch", False)

    contenders = {"numpy": numpy_op(), "jax": from_jax("bench.logcosh", logcosh_jax)}
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(4)
    for name, op in contenders.items():
        start = time.perf_counter()
        op.forward(x0)
        first_forward = time.perf_counter() - start
        start = time.perf_counter()
        op.vjp(np.ones(4), None, x0)
        first_vjp = time.perf_counter() - start
        if name == "jax":
            print(f"jax first calls (import, trace, compile): forward {first_forward * 1e3:.0f} ms, "
                  f"vjp {first_vjp * 1e3:.0f} ms")

    clients = {name: client_for(op) for name, op in contenders.items()}
    print(f"{'size':>9}  {'what':<9}  {'numpy us':>10}  {'jax us':>10}  {'jax - numpy us':>14}  {'jax / numpy':>11}")
    for size in (int(s) for s in args.sizes.split(",")):
        x = rng.standard_normal(size)
        g = np.ones(size)
        number = max(1, args.number // max(1, size // 10000))
        builder = GraphBuilder()
        xv = builder.input("x", (size,))
        f = builder.op("bench.logcosh", xv).sum()
        cases = {
            "forward": {n: (lambda op=op: op.forward(x)) for n, op in contenders.items()},
            "vjp": {n: (lambda op=op: op.vjp(g, None, x)) for n, op in contenders.items()},
            "evaluate": {n: (lambda c=c: c.evaluate(f, x=x)) for n, c in clients.items()},
        }
        for what, fns in cases.items():
            rounds: dict[str, list[float]] = {n: [] for n in fns}
            for fn in fns.values():
                fn()  # warm (compilation, graph cache)
            for _ in range(args.repeat):
                for n, fn in fns.items():
                    rounds[n].append(timeit.timeit(fn, number=number) / number)
            a, b = statistics.median(rounds["numpy"]) * 1e6, statistics.median(rounds["jax"]) * 1e6
            print(f"{size:>9}  {what:<9}  {a:>10.1f}  {b:>10.1f}  {b - a:>14.1f}  {b / a:>11.2f}")
    for client in clients.values():
        client.close()


if __name__ == "__main__":
    main()
