"""What the Client's retry buffer costs: client memory per in-flight call, gRPC's default vs the message limit.

    python benchmarks/retry_buffer_bench.py                  # 8 calls of 16 MiB in flight
    python benchmarks/retry_buffer_bench.py --calls 4 --mib 64

gRPC keeps a retryable call's request until the server starts answering, up to
``grpc.per_rpc_retry_buffer_size`` (256 KiB by default; the Client sets it to
its message limit, see client/channel.py). This starts a server, then, in a
fresh process per run (glibc's mmap threshold pinned, so freed blocks leave
the resident set), sends ``--calls`` concurrent Evaluate calls of ``--mib`` MiB
each to a graph that computes for about two seconds, and reads the client's
resident memory one second in, when every request has been sent and none is
answered, against the same process just before. Each setting runs three times.

Not a test: run on demand.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r'''
import json, sys, threading, time
import numpy as np
from chainrule.client import Client, GraphBuilder, ops

address, buffer_bytes, calls, size, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

g = GraphBuilder()
s = ops.sum(g.input("x", shape=[-1]))
big = ops.broadcast_to(s, [100_000])
total = ops.logsumexp(big)
for _ in range(steps):  # seconds of work in little memory, whatever the input's size
    total = total + ops.logsumexp(big)
f = total.named("f")
xs = [np.full(size // 8, 1e-3) for _ in range(calls)]
with Client(address, timeout=300, options=[("grpc.per_rpc_retry_buffer_size", buffer_bytes)]) as client:
    client.evaluate(f, x=xs[0], grads="none")  # connect, compile, one call of this size
    base, during = rss(), []
    threads = [threading.Thread(target=client.evaluate, args=(f,), kwargs=dict(x=x, grads="none")) for x in xs]
    started = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(1.0)
    during.append(rss())
    for t in threads:
        t.join()
print(json.dumps({"base": base, "during": during[0], "seconds": time.perf_counter() - started}))
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=8)
    parser.add_argument("--mib", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1500, help="log-sum-exps per call (about 1.3 ms each)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from serving import ServerProcess

    size = args.mib << 20
    settings = (("gRPC default (256 KiB)", 256 << 10), ("message limit (2 GiB)", (1 << 31) - 1))
    with ServerProcess("--log-level", "WARNING", "--max-concurrent", str(max(16, 2 * args.calls))) as server:
        for label, buffer_bytes in settings * 3:
            out = subprocess.run(
                [sys.executable, "-c", CHILD, server.address, str(buffer_bytes), str(args.calls), str(size),
                 str(args.steps)],
                capture_output=True, text=True, check=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
            r = json.loads(out.stdout.strip().splitlines()[-1])
            held = r["during"] - r["base"]
            print(f"{label:24s} {args.calls} calls of {args.mib} MiB in flight: +{held / 2**20:7.1f} MiB "
                  f"({held / args.calls / size:.2f} x the request per call), {r['seconds']:.2f} s", flush=True)


if __name__ == "__main__":
    main()
