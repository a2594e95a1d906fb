"""Server overhead, as ratios against a bare grpcio echo server in the same run.

    python benchmarks/server_bench.py [--quick]

(a) a 16 MiB float64 input through Evaluate, returning its value and its
    gradient, over a bare echo moving the same bytes each way (and, for
    information, the same call with the tensors in shared memory);
(b) the 4-layer network at batch 4096 (512 features, 512 hidden) through the
    server, returning the parameter gradients, over the same step in-process
    on the bare engine (evaluate(plan)). The call sends its tensors and carries the
    diagnostics every response does by default, which the bare engine does not run;
    so also, for the same work on both sides, the call with diagnostics=False over
    the bare engine and the default call over the same call through LocalClient;
    and the default call with its tensors in shared memory (same host);
(c) p50 latency of a 3-node scalar graph through the server, sent whole and
    by registered id, over the bare echo of a small message.
The server (`chainrule serve`) and the echo run as processes of their own.
Not a test: run on demand, never in CI.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np

from chainrule.client import Client, GraphBuilder
from chainrule.client.graph import Graph
from chainrule.core import compile_graph, evaluate
from chainrule.plugins.manager import load_plugins
from chainrule.server import LocalClient
from chainrule.server.memory import tune_allocator
from chainrule.v1 import chainrule_pb2 as pb

sys.path.insert(0, str(Path(__file__).resolve().parent))
from core_bench import network_graph, network_inputs  # noqa: E402

MiB = 1 << 20
OPTIONS = [("grpc.max_receive_message_length", 256 * MiB), ("grpc.max_send_message_length", 256 * MiB)]


def serve_echo(reply_sizes: dict[int, int]) -> None:
    """A bare gRPC server (run as its own process): bytes in, a reply of the mapped size out.

    Its allocator is tuned as `chainrule serve` tunes its own, so that the two
    servers differ only in what they do with the bytes.
    """
    tune_allocator()
    replies = {size: b"\0" * out for size, out in reply_sizes.items()}

    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        return replies.get(len(request), request)

    handler = grpc.method_handlers_generic_handler("bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


def start_process(args: list[str]) -> tuple[subprocess.Popen, str]:
    """Start a server process and read the address it prints."""
    process = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, text=True)
    for line in process.stdout:  # type: ignore[union-attr]
        if "listening on" in line:
            return process, line.split("listening on")[1].strip()
    raise RuntimeError(f"{args} did not start")


def interleaved_medians(repeats: int, *fns, settle: float = 0.0) -> list[float]:
    """Median seconds per call of each function, timed in turn (a, b, a, b...) so that the
    machine's drifts (other tenants, CPU frequency) hit every case alike.

    ``settle`` seconds pass before each call: BLAS threads keep spinning for a while after
    a matrix product, and would otherwise slow whichever process computes next.
    """
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            time.sleep(settle)
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server:
        return serve_echo({16 * MiB: 32 * MiB})
    tune_allocator()  # for the in-process reference of (b), as `chainrule serve` does for the server
    repeats = 5 if args.quick else 15
    latency_calls = 300 if args.quick else 2000

    # Client and servers in separate processes, as in production (and no GIL shared between them).
    shared_dir = tempfile.mkdtemp(prefix="chainrule-bench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    server, address = start_process(["-m", "chainrule.server.cli", "serve", "--port", "0",
                                     "--max-message-bytes", str(256 * MiB), "--max-memory-bytes", str(8 << 30),
                                     "--log-level", "WARNING", "--shared-memory-dir", shared_dir])
    rows = []

    # (a) 16 MiB in, its value and gradient (2 x 16 MiB) out.
    n = 2 * MiB  # float64 elements: 16 MiB
    g = GraphBuilder()
    x = g.input("x", shape=(n,))
    f = (x * 2.0).sum().named("f")
    data = np.random.default_rng(0).normal(size=n)
    small = b"\1" * 64
    echo, echo_address = start_process([__file__, "--echo-server"])
    echo_channel = grpc.insecure_channel(echo_address, options=OPTIONS)
    echo_call = echo_channel.unary_unary("/bench.Echo/Echo")
    payload = data.tobytes()
    with Client(address, shared_memory=False) as client, Client(address, shared_memory=True) as same_host:
        for c in (client, same_host):
            result = c.evaluate(f, x=data, values=["x"], grads=["x"])
            assert np.array_equal(result.values["x"], data) and np.all(result.grad["x"] == 2.0)
        bare, ours, shared = interleaved_medians(
            repeats, lambda: echo_call(payload), lambda: client.evaluate(f, x=data, values=["x"], grads=["x"]),
            lambda: same_host.evaluate(f, x=data, values=["x"], grads=["x"]))
        rows.append(("(a) 16 MiB in, value+grad out, ms", "bare echo 16+32 MiB", bare, ours, "target <= 1.5x"))
        rows.append(("(a) same, in shared memory", "bare echo 16+32 MiB", bare, shared, "(same host only)"))

        # (b) 4-layer network, batch 4096.
        inputs = network_inputs(4096, 512, 512)
        params = [name for name in inputs if name not in ("X", "T")]
        registry = load_plugins(entry_points=False, only=["builtin"]).registry
        plan = compile_graph(network_graph(4096, 512, 512), registry)
        message = pb.Graph()
        for decl in plan.names[: plan.n_inputs]:
            k = plan.index[decl]
            message.inputs.add(name=decl, dtype=pb.FLOAT64, shape=plan.input_shapes[k])
        for k in range(plan.n_inputs, len(plan.names)):
            message.nodes.add(name=plan.names[k], op=plan.ops[k].name, inputs=[plan.names[j] for j in plan.in_slots[k]])
        message.outputs.append("C")
        graph = Graph(message)
        local = LocalClient()
        for c in (client, same_host, local):
            c.evaluate(graph, inputs, values="none", grads=params)
        in_process, in_process_call, remote, undiagnosed, shared = interleaved_medians(
            repeats, lambda: evaluate(plan, inputs, wrt=params),
            lambda: local.evaluate(graph, inputs, values="none", grads=params),
            lambda: client.evaluate(graph, inputs, values="none", grads=params),
            lambda: client.evaluate(graph, inputs, values="none", grads=params, diagnostics=False),
            lambda: same_host.evaluate(graph, inputs, values="none", grads=params), settle=0.3)
        rows.append(("(b) 4-layer batch 4096, ms/step", "bare engine step", in_process, remote, "target <= 1.2x"))
        rows.append(("(b) same, diagnostics off", "bare engine step", in_process, undiagnosed, "(the same work)"))
        rows.append(("(b) same, sent", "LocalClient call", in_process_call, remote, "(the same work)"))
        rows.append(("(b) same, in shared memory", "bare engine step", in_process, shared, "target <= 1.2x"))

        # (c) small-graph latency.
        g = GraphBuilder()
        a, b, c = g.input("a"), g.input("b"), g.input("c")
        out = ((a + b) * c).named("out")
        by_id_graph = Graph(out.graph.message)  # the same graph as another object, which the client registers
        client.register(by_id_graph)
        for _ in range(100):  # warm both paths
            client.evaluate(by_id_graph, dict(a=1.0, b=2.0, c=3.0))
            client.evaluate(out, a=1.0, b=2.0, c=3.0)
        bare_small, whole, by_id = interleaved_medians(
            latency_calls, lambda: echo_call(small), lambda: client.evaluate(out, a=1.0, b=2.0, c=3.0),
            lambda: client.evaluate(by_id_graph, dict(a=1.0, b=2.0, c=3.0)))
        rows.append(("(c) 3-node graph p50, ms, sent whole", "bare echo 64 B", bare_small, whole, "target <= 2x"))
        rows.append(("(c) 3-node graph p50, ms, by id", "bare echo 64 B", bare_small, by_id, "target <= 2x"))

    for process in (server, echo):
        process.terminate()
        process.wait(30)
    shutil.rmtree(shared_dir, ignore_errors=True)
    print(f"{'case':<42} {'reference':<22} {'ref ms':>9} {'ours ms':>9} {'ratio':>6}  target")
    for case, ref_name, ref, ours, target in rows:
        print(f"{case:<42} {ref_name:<22} {ref * 1e3:>9.3f} {ours * 1e3:>9.3f} {ours / ref:>6.2f}  {target}")


if __name__ == "__main__":
    main()
