"""What `import chainrule.client` costs beyond what any gRPC client of ours must load.

    python benchmarks/import_bench.py [--repeats 15]

The baseline imports numpy, grpc and the generated stubs (chainrule_pb2 and
chainrule_pb2_grpc): a client cannot do without them. Each measurement is a
fresh interpreter (``sys.executable -c``) timing the import statement itself
with perf_counter, so interpreter start-up is left out and nothing is cached
in sys.modules; the two imports alternate, and the best of N runs of each is
kept. Bytecode is cached as in a normal install (numpy and grpc come with
theirs): the interpreters write and read .pyc files under a temporary
``-X pycache_prefix`` even where PYTHONDONTWRITEBYTECODE is set, and a first
run of each import fills it. Target: chainrule.client within 20 ms of the baseline. To see where the
time goes: ``python -X importtime -c 'import chainrule.client'``.
Not a test: run on demand, never in CI.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

BASELINE = "import numpy, grpc, chainrule.v1.chainrule_pb2, chainrule.v1.chainrule_pb2_grpc"
CLIENT = "import chainrule.client"
TARGET_MS = 20.0


def import_time(statement: str, pycache: str) -> float:
    """Seconds the import statement takes in a fresh interpreter."""
    code = ("import time\n"
            "t = time.perf_counter()\n"
            f"{statement}\n"
            "print(time.perf_counter() - t)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    out = subprocess.run([sys.executable, "-X", f"pycache_prefix={pycache}", "-c", code],
                         check=True, capture_output=True, text=True, env=env).stdout
    return float(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="fresh interpreters per import (best of N)")
    args = parser.parse_args()

    baseline, client = [], []
    with tempfile.TemporaryDirectory(prefix="import_bench_pycache_") as pycache:
        for statement in (BASELINE, CLIENT):  # write the .pyc files, warm the file system cache
            import_time(statement, pycache)
        for _ in range(args.repeats):
            baseline.append(import_time(BASELINE, pycache))
            client.append(import_time(CLIENT, pycache))
    base_ms, client_ms = min(baseline) * 1e3, min(client) * 1e3
    diff = client_ms - base_ms
    print(f"baseline  {BASELINE}: {base_ms:.1f} ms (best of {args.repeats})")
    print(f"client    {CLIENT}: {client_ms:.1f} ms (best of {args.repeats})")
    print(f"difference: {diff:+.1f} ms (target: within {TARGET_MS:.0f} ms) "
          f"{'OK' if diff <= TARGET_MS else 'OVER'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
