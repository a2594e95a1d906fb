"""``make fuzz``: a longer, bounded hostile-input campaign against a server subprocess.

Starts ``chainrule serve`` on a free loopback port with tight limits, then
sends the families of hostile.py (random seeds, batch after batch) to Evaluate
and RegisterGraph until ``--seconds`` pass or ``--max-requests`` are sent,
checking a valid request after each. Reports requests sent, codes seen,
crashes (a forbidden code or a dead server: must be 0), hangs (no answer
within the deadline: must be 0) and the server's memory growth (resident set
size from /proc). Exits 1 when anything was wrong.

    python tests/fuzz_campaign.py --seconds 120 [--json]
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import grpc
from hypothesis import HealthCheck, Phase, given, seed, settings

sys.path.insert(0, str(Path(__file__).parent))

from hostile import (  # noqa: E402
    EVALUATE, REGISTER, Tally, check_valid_answer, hostile_messages, raw_call, send, valid_request,
)

from chainrule.v1 import chainrule_pb2 as pb  # noqa: E402

MAX_NODES = 2000
#: Tight limits keep each request cheap. --no-tune-malloc: freed memory goes back to the system,
#: so the resident size shows what the server holds, not what the allocator keeps for reuse.
SERVER_FLAGS = ["--max-nodes", str(MAX_NODES), "--max-tensor-elements", str(1 << 20),
                "--max-memory-bytes", str(64 << 20), "--max-compute-seconds", "10", "--log-level", "ERROR",
                "--no-tune-malloc"]


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """Resident memory of a process in KiB (VmHWM: its peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


def start_server(extra: list[str]) -> tuple[subprocess.Popen, str]:
    """``chainrule serve`` on a free port; returns the process and its address once it listens."""
    command = [sys.executable, "-m", "chainrule.server.cli", "serve", "--port", "0", *SERVER_FLAGS, *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()  # "chainrule listening on 127.0.0.1:PORT"
    if "listening on" not in line:
        process.kill()
        raise RuntimeError(f"the server did not start: {line!r}")
    return process, line.rsplit(" ", 1)[-1].strip()


def campaign(address: str, process: subprocess.Popen, seconds: float, max_requests: int, batch: int) -> dict:
    tally = Tally()
    hangs = 0
    with grpc.insecure_channel(address) as channel:
        evaluate, register = raw_call(channel, EVALUATE), raw_call(channel, REGISTER)
        good = valid_request().SerializeToString()
        for _ in range(50):  # warm up (plugins, caches, thread pool) before the memory baseline
            evaluate(good, timeout=10)
        baseline = rss_kib(process.pid)
        ends = time.monotonic() + seconds

        @settings(max_examples=batch, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(data=hostile_messages(MAX_NODES))
        def one(data: bytes) -> None:
            nonlocal hangs
            if time.monotonic() > ends or tally.sent >= max_requests:
                return
            for call in (evaluate, register):
                code, problem = send(call, data, 10.0)
                tally.record(code, problem)
                hangs += code == grpc.StatusCode.DEADLINE_EXCEEDED
            try:
                check_valid_answer(pb.EvaluateResponse.FromString(evaluate(good, timeout=10)))
            except (grpc.RpcError, AssertionError) as exc:
                tally.failures.append(f"the valid request failed after {data[:80]!r}: {exc}")

        batches = 0
        trace = []  # (seconds, RSS KiB) after each batch: growth that levels off is caches, not a leak
        begun = time.monotonic()
        while time.monotonic() < ends and tally.sent < max_requests and process.poll() is None:
            seed(random.getrandbits(64))(one)()
            batches += 1
            if process.poll() is None:
                trace.append((round(time.monotonic() - begun), rss_kib(process.pid)))
    alive = process.poll() is None
    return {
        "requests_sent": tally.sent,
        "batches": batches,
        "codes": dict(sorted(tally.codes.items())),
        "crashes": len(tally.failures) - hangs + (0 if alive else 1),
        "hangs": hangs,
        "server_alive": alive,
        "rss_start_kib": baseline,
        "rss_end_kib": rss_kib(process.pid) if alive else None,
        "rss_peak_kib": rss_kib(process.pid, "VmHWM") if alive else None,
        "rss_trace_kib": [trace[i] for i in sorted({0, len(trace) // 4, len(trace) // 2, 3 * len(trace) // 4,
                                                    len(trace) - 1}) if trace],
        "failures": tally.failures[:20],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="how long to fuzz (default 120)")
    parser.add_argument("--max-requests", type=int, default=1_000_000, help="stop after this many requests")
    parser.add_argument("--batch", type=int, default=200, help="examples per hypothesis run (each with a new seed)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)

    process, address = start_server([])
    started = time.monotonic()
    try:
        report = campaign(address, process, args.seconds, args.max_requests, args.batch)
    finally:
        process.terminate()
        process.wait(30)
    report["seconds"] = round(time.monotonic() - started, 1)
    report["requests_per_second"] = round(report["requests_sent"] / max(report["seconds"], 1e-9), 1)
    if report["rss_end_kib"] is not None:
        report["rss_growth_kib"] = report["rss_end_kib"] - report["rss_start_kib"]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"requests sent  {report['requests_sent']} in {report['seconds']} s "
              f"({report['requests_per_second']}/s, {report['batches']} batches)")
        print("codes seen     " + ", ".join(f"{k} {v}" for k, v in report["codes"].items()))
        print(f"crashes        {report['crashes']}")
        print(f"hangs          {report['hangs']}")
        if report["server_alive"]:
            print(f"server RSS     {report['rss_start_kib'] / 1024:.1f} MiB -> {report['rss_end_kib'] / 1024:.1f} MiB "
                  f"(growth {report['rss_growth_kib'] / 1024:+.1f} MiB, peak {report['rss_peak_kib'] / 1024:.1f} MiB)")
            print("  over time    " + ", ".join(f"{t} s: {kib / 1024:.1f} MiB" for t, kib in report["rss_trace_kib"]))
        else:
            print("server         DIED")
        for failure in report["failures"]:
            print("  " + failure)
    return 0 if report["crashes"] == 0 and report["hangs"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
