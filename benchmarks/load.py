"""Load and overload: N concurrent clients for T seconds against a chainrule server.

    python benchmarks/load.py --clients 8 --seconds 10                      # starts a server
    python benchmarks/load.py --clients 8 --graph heavy --workers 2         # same, 2 worker processes
    python benchmarks/load.py --clients 8 --max-concurrent 2 --graph heavy  # overload: 4x the admitted calls
    python benchmarks/load.py --server 127.0.0.1:50051 --clients 8          # an already running server

Each client is a thread in a closed loop (call, wait for the answer, call
again) over its own connection; ``--processes`` spreads the clients over that
many processes so the load generator is not held back by one interpreter.
Reports throughput (answered OK per second), p50/p99 latency of the OK calls,
the count and p99 latency of every code (RESOURCE_EXHAUSTED when admission
control refuses), and the median latency one caller sees alone before the
load and right after it (is it back to normal after an overload?). Graphs:
``small`` is the 3-node circuit p = x + y, g = p * z (the service's own
overhead); ``chain`` is 300 scalar nodes (100 x tanh, const, add), where the work is the
engine's Python, one node after another under the GIL; ``heavy`` is 50
log-sum-exps of a 200,000-element vector (about 20 ms per call), where the work
is numpy's, which releases the GIL, so one process already uses several cores.

Not a test: run on demand. On a machine where the clients and the server
share the cores, the figures are for comparing settings, not absolutes.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict

GRAPHS = ("small", "chain", "heavy")


def build_graph(kind: str):
    """The graph to evaluate and its inputs."""
    from chainrule.client import GraphBuilder, ops

    g = GraphBuilder()
    if kind == "small":
        x, y, z = g.input("x"), g.input("y"), g.input("z")
        return ((x + y) * z).named("g"), {"x": 1.0, "y": 3.0, "z": -3.0}
    if kind == "chain":
        value = g.input("x")
        for _ in range(100):
            value = ops.tanh(value) + 0.5
        return value, {"x": 0.1}
    big = ops.broadcast_to(g.input("x"), [200_000])
    total = ops.logsumexp(big)
    for _ in range(49):
        total = total + ops.logsumexp(big)
    return total, {"x": 1.0}


def client_loop(address: str, kind: str, seconds: float, register: bool, out: list[tuple[float, float, str]]) -> None:
    """One closed-loop client: (start time, latency, code) per call until ``seconds`` pass."""
    from chainrule.client import ChainruleRpcError, Client

    graph, inputs = build_graph(kind)
    # A connection of its own (no subchannel shared with the other clients), as separate services would have.
    with Client(address, timeout=30, options=[("grpc.use_local_subchannel_pool", 1)]) as client:
        if register:
            try:
                client.register(graph)
            except ChainruleRpcError:  # refused (overload): this client sends the whole graph instead
                pass
        ends = time.monotonic() + seconds
        while time.monotonic() < ends:
            started = time.perf_counter()
            try:
                client.evaluate(graph, inputs, values="none", grads="none")
                code = "OK"
            except ChainruleRpcError as exc:
                code = exc.code.name
            out.append((started, time.perf_counter() - started, code))


def run_process(address: str, kind: str, clients: int, seconds: float, register: bool) -> list[tuple[float, float, str]]:
    """``clients`` threads in this process; all their samples."""
    results: list[list] = [[] for _ in range(clients)]
    threads = [threading.Thread(target=client_loop, args=(address, kind, seconds, register, results[i]))
               for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [sample for samples in results for sample in samples]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def probe(address: str, kind: str, calls: int = 20) -> float:
    """Median latency (s) of ``calls`` sequential calls: what one caller sees right now."""
    from chainrule.client import Client

    graph, inputs = build_graph(kind)
    latencies = []
    with Client(address, timeout=30) as client:
        for _ in range(calls):
            started = time.perf_counter()
            client.evaluate(graph, inputs, values="none", grads="none")
            latencies.append(time.perf_counter() - started)
    return statistics.median(latencies)


def start_server(max_concurrent: int | None, workers: int) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "chainrule.server.cli", "serve", "--port", "0", "--log-level", "WARNING",
               "--workers", str(workers)]
    if max_concurrent:
        command += ["--max-concurrent", str(max_concurrent)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    if "listening on" not in line:
        process.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return process, line.split("listening on ", 1)[1].split()[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="N concurrent clients for T seconds against a chainrule server.")
    parser.add_argument("--server", help="address of a running server (default: start one)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--processes", type=int, default=1, help="client processes the clients are spread over")
    parser.add_argument("--graph", choices=GRAPHS, default="small")
    parser.add_argument("--no-register", action="store_true", help="send the whole graph with every call")
    parser.add_argument("--max-concurrent", type=int, help="admission limit of the started server")
    parser.add_argument("--workers", type=int, default=1, help="worker processes of the started server")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    process = None
    address = args.server
    if address is None:
        process, address = start_server(args.max_concurrent, args.workers)
    try:
        probe(address, args.graph, 5)  # warm up: plugins, caches, connections
        idle = probe(address, args.graph)
        per_process = [args.clients // args.processes + (i < args.clients % args.processes)
                       for i in range(args.processes)]
        started = time.perf_counter()
        if args.processes == 1:
            samples = run_process(address, args.graph, args.clients, args.seconds, not args.no_register)
        else:
            with multiprocessing.get_context("fork").Pool(args.processes) as pool:
                parts = pool.starmap(run_process, [(address, args.graph, n, args.seconds, not args.no_register)
                                                   for n in per_process])
            samples = [s for part in parts for s in part]
        elapsed = time.perf_counter() - started
        after = probe(address, args.graph)
    finally:
        if process is not None:
            process.terminate()
            process.wait(30)

    by_code: dict[str, list[float]] = defaultdict(list)
    for _, latency, code in samples:
        by_code[code].append(latency)
    ok = by_code.get("OK", [])
    report = {
        "graph": args.graph, "clients": args.clients, "processes": args.processes, "seconds": round(elapsed, 2),
        "server": args.server or f"started: workers={args.workers} max_concurrent={args.max_concurrent or 'default'}",
        "calls": len(samples), "ok_per_second": round(len(ok) / elapsed, 1),
        "p50_ms": round(percentile(ok, 50) * 1000, 2), "p99_ms": round(percentile(ok, 99) * 1000, 2),
        "codes": {code: {"count": len(lat), "p99_ms": round(percentile(lat, 99) * 1000, 2)}
                  for code, lat in sorted(by_code.items())},
        "idle_latency_ms_before": round(idle * 1000, 2), "idle_latency_ms_after": round(after * 1000, 2),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['graph']} graph, {args.clients} clients in {args.processes} process(es), "
              f"{report['seconds']} s against {report['server']}")
        print(f"  throughput  {report['ok_per_second']} OK calls/s ({report['calls']} calls)")
        print(f"  latency     p50 {report['p50_ms']} ms, p99 {report['p99_ms']} ms (OK calls)")
        for code, figures in report["codes"].items():
            print(f"  {code:<20} {figures['count']:>7} calls, p99 {figures['p99_ms']} ms")
        print(f"  one caller alone: {report['idle_latency_ms_before']} ms before the load, "
              f"{report['idle_latency_ms_after']} ms right after it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
