"""Attack scenarios against real ``chainrule serve`` processes (issue 14's campaign; not CI).

Each scenario starts its own servers (``python -m chainrule.server.cli serve
--port 0 --max-memory-bytes 1073741824 ...``), attacks them as issue 14 lists
(vjp temporaries, responses built before their size is checked, the plan
cache, work outliving its deadline, idle and header-only streams, per-item
stream errors, Optimize stopped early, replica and worker kills, a busy port,
int64 overflow) and more (hostile EvaluateStream, Optimize and Evaluate
content, shared memory, TLS and tokens, legal-but-large shapes, slow readers),
then stops them, even when the scenario fails.

Per scenario it reports one row: requests sent, status codes seen, wrong
answers (every OK answer's output value, values and gradients compared with
``chainrule.server.LocalClient`` on the same graph and inputs, once the
scenario's servers are stopped), peak resident memory (VmRSS summed over a
server and its workers, sampled every 10 ms in a separate thread, or a
process's VmHWM when larger; the largest over the scenario's servers) against
the promise ``peak <= --max-memory-bytes + 256 MiB``, server CPU seconds
spent after a client's deadline passed (utime + stime from /proc, read when
the deadline passes and again once the server is idle; promise: <= 0.2 s),
calls lost, and a verdict naming every promise the scenario saw broken; the
evidence (codes, messages, numbers) is printed above the markdown table that
comes last. A server past 8 GiB is killed, to spare the machine.

    python benchmarks/scenarios.py                 # every scenario, 5-6 minutes on 2 cores (bound: 10)
    python benchmarks/scenarios.py --quick         # smaller sizes, about 2 minutes
    python benchmarks/scenarios.py --only replica-kill --json rows.json
    make scenarios

Needs Linux (/proc) and, for the TLS scenario, the openssl command.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chainrule.client import TLS, ChainruleRpcError, Client, GraphBuilder, Result, Var, ops
from chainrule.client.request import evaluate_request
from chainrule.server import LocalClient, ServerConfig
from chainrule.v1 import chainrule_pb2 as pb
from chainrule.v1.chainrule_pb2_grpc import ChainruleStub
from chainrule.wire.convert import array_to_tensor
from chainrule.wire.outgoing import Outgoing

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # hostile.py: the fuzz campaign's request strategies

MiB = 1 << 20
#: The memory budget every server gets (--max-memory-bytes), and what the promise allows above it.
BUDGET = 1 << 30
SLACK = 256 * MiB
#: A server past this resident size is killed, to keep the machine (and its other users) alive.
CEILING = 8 << 30
#: CPU seconds a server may spend after a call's deadline passed.
CPU_AFTER_LIMIT = 0.2
SAMPLE_SECONDS = 0.01
START_SECONDS = 60.0
EVALUATE = "/chainrule.v1.Chainrule/Evaluate"
I64 = np.iinfo(np.int64)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# --- /proc --------------------------------------------------------------------------------------

def _stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name: [state, ppid, pgrp, session, ..., utime (11), stime (12)]."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text.rsplit(")", 1)[1].split()


def session_pids(session: int) -> list[int]:
    """Every live process of a session: a server started with its own session, and its workers."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = _stat_fields(int(entry))
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            found.append(int(entry))
    return found


def rss_bytes(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError):
        return 0


def hwm_bytes(pid: int) -> int:
    """A process's peak resident size (VmHWM), kept by the kernel."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_seconds(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


def children_of(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        return _stat_fields(pid)[0] != "Z"
    except OSError:
        return False


# --- servers ------------------------------------------------------------------------------------

def _first_line(stream: Any, seconds: float) -> str:
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        if not selector.select(seconds):
            return ""
    return stream.readline()


class Server:
    """``chainrule serve`` in its own session (so it and its workers can be killed together)."""

    def __init__(self, flags: Sequence[str], *, port: int = 0, budget: int = BUDGET) -> None:
        self.log_file = tempfile.TemporaryFile(mode="w+")
        self.command = [sys.executable, "-m", "chainrule.server.cli", "serve", "--port", str(port),
                        "--log-level", "WARNING", "--max-memory-bytes", str(budget), *flags]
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=self.log_file, text=True,
                                        start_new_session=True)
        line = _first_line(self.process.stdout, START_SECONDS)
        if "listening on" not in line:
            self.kill()
            raise RuntimeError(f"the server did not start: {line!r} {self.log()[-2000:]}")
        self.address = line.split("listening on ", 1)[1].split()[0]
        self.port = int(self.address.rsplit(":", 1)[1])
        self.hwm = 0  # the largest VmHWM of its processes, read before it stops
        self.ceiling_hit = False  # killed by the RssSampler past CEILING

    @property
    def pid(self) -> int:
        return self.process.pid

    def pids(self) -> list[int]:
        return session_pids(self.pid)

    def cpu(self) -> float:
        return cpu_seconds(self.pids())

    def read_hwm(self) -> int:
        self.hwm = max([self.hwm, *(hwm_bytes(p) for p in self.pids())])
        return self.hwm

    def signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)

    def kill(self) -> None:
        self.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)

    def stop(self, seconds: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL for whatever of its session is left; the exit code (None: killed)."""
        if self.process.poll() is None:
            self.read_hwm()
            self.signal_group(signal.SIGTERM)
            try:
                self.process.wait(seconds)
            except subprocess.TimeoutExpired:
                pass
        code = self.process.poll()
        self.kill()  # workers or stragglers of the session
        if self.process.stdout:
            self.process.stdout.close()
        return code

    def log(self) -> str:
        self.log_file.seek(0)
        return self.log_file.read()


class RssSampler(threading.Thread):
    """Samples the resident size of each watched server's session every 10 ms; keeps the peaks."""

    def __init__(self) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self._lock = threading.Lock()
        self._servers: dict[Server, list[int]] = {}
        self.peaks: dict[Server, int] = {}
        self.window: dict[Server, int] = {}
        self.samples = 0
        self.max_gap = 0.0
        self._stop_event = threading.Event()

    def watch(self, server: Server) -> None:
        with self._lock:
            self._servers[server] = server.pids()
            self.peaks.setdefault(server, 0)

    def forget(self, server: Server) -> None:
        with self._lock:
            self._servers.pop(server, None)

    def open_window(self, server: Server) -> None:
        """Start a fresh peak for ``server`` (read with ``window_peak``)."""
        with self._lock:
            self.window[server] = 0

    def window_peak(self, server: Server) -> int:
        with self._lock:
            return self.window.get(server, 0)

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        last = refreshed = time.monotonic()
        while not self._stop_event.is_set():
            now = time.monotonic()
            with self._lock:
                servers = list(self._servers.items())
            if servers:  # a gap matters only while a server is watched
                self.max_gap = max(self.max_gap, now - last)
            last = now
            if now - refreshed > 0.25:  # workers come and go
                refreshed = now
                servers = [(s, s.pids()) for s, _ in servers]
                with self._lock:
                    for server, pids in servers:
                        if server in self._servers:
                            self._servers[server] = pids
            for server, pids in servers:
                total = sum(rss_bytes(p) for p in pids)
                if total > CEILING and not server.ceiling_hit:
                    server.ceiling_hit = True
                    server.kill()
                with self._lock:
                    self.peaks[server] = max(self.peaks.get(server, 0), total)
                    if server in self.window:
                        self.window[server] = max(self.window[server], total)
            self.samples += 1
            time.sleep(max(0.0, SAMPLE_SECONDS - (time.monotonic() - now)))


# --- answers ------------------------------------------------------------------------------------

@dataclass
class Probe:
    """What was evaluated: a Var with feeds and options (LocalClient.evaluate), or a whole request
    message (the LocalClient's transport, as a server would get it)."""

    key: str
    target: Var | None = None
    feeds: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    request: pb.EvaluateRequest | None = None

    def reference(self, local: LocalClient) -> Result:
        if self.request is not None:
            return Result(local.transport.send_evaluate(Outgoing(self.request), None))
        return local.evaluate(self.target, self.feeds, **self.options)


Fingerprint = dict[str, tuple[str, tuple[int, ...], str, Any]]


def fingerprint(result: Result) -> Fingerprint:
    """Every array of an answer (output value, values, gradients) by dtype, shape and digest;
    small ones also kept whole, to tell a rounding difference from a wrong answer."""
    arrays = {"value": result.value}
    arrays.update({f"values[{k}]": result.values[k] for k in result.values})
    arrays.update({f"grad[{k}]": result.grad[k] for k in result.grad})
    prints = {}
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        digest = hashlib.sha1(array.tobytes()).hexdigest()
        prints[name] = (array.dtype.str, array.shape, digest, array.copy() if array.size <= 100_000 else None)
    return prints


def differences(got: Fingerprint, expected: Fingerprint) -> list[str]:
    """What differs between an answer and the reference (empty: the same answer)."""
    if set(got) != set(expected):
        return [f"names differ: {sorted(set(got) ^ set(expected))[:6]}"]
    found = []
    for name, (dtype, shape, digest, small) in got.items():
        want = expected[name]
        if (dtype, shape) != want[:2]:
            found.append(f"{name}: {dtype}{list(shape)} instead of {want[0]}{list(want[1])}")
        elif digest != want[2]:
            close = small is not None and want[3] is not None and np.allclose(
                small.astype(np.float64), want[3].astype(np.float64), rtol=1e-9, atol=1e-12, equal_nan=True)
            if not close:
                found.append(f"{name}: values differ")
    return found


class Checker:
    """Collects OK answers during a scenario; compares them with LocalClient once its servers are stopped."""

    def __init__(self) -> None:
        self._answers: list[tuple[Probe, Fingerprint]] = []
        self._lock = threading.Lock()

    def add(self, probe: Probe, result: Result) -> None:
        prints = fingerprint(result)
        with self._lock:
            self._answers.append((probe, prints))

    def __len__(self) -> int:
        return len(self._answers)

    def verify(self, budget: int) -> tuple[int, list[str]]:
        """Wrong answers, and what was wrong with the first few."""
        local = LocalClient(limits=ServerConfig(max_memory_bytes=budget).limits())
        references: dict[str, Fingerprint | str | None] = {}
        wrong, unchecked, notes = 0, 0, []
        for probe, prints in self._answers:
            if probe.key not in references:
                references[probe.key] = self._reference(local, probe, notes)
            expected = references[probe.key]
            if expected is None:
                unchecked += 1
                continue
            problems = [expected] if isinstance(expected, str) else differences(prints, expected)
            if problems:
                wrong += 1
                if len(notes) < 5:
                    notes.append(f"wrong answer to {probe.key}: {'; '.join(problems)[:300]}")
        local.close()
        if unchecked:
            notes.append(f"{unchecked} OK answers left unchecked: LocalClient itself failed")
        return wrong, notes

    @staticmethod
    def _reference(local: LocalClient, probe: Probe, notes: list[str]) -> Fingerprint | str | None:
        """LocalClient's answer; a string when it refuses the call; None when it fails (not the server's fault)."""
        try:
            return fingerprint(probe.reference(local))
        except ChainruleRpcError as exc:
            return f"LocalClient refused it: {exc.code.name} {exc.message[:200]}"
        except Exception as exc:  # noqa: BLE001 - a broken LocalClient is reported, not counted as wrong
            if len(notes) < 5:
                notes.append(f"LocalClient failed on {probe.key}: {type(exc).__name__}: {str(exc)[:160]}")
            return None


# --- one scenario's run -------------------------------------------------------------------------

@dataclass
class Row:
    scenario: str
    requests: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    wrong: int | None = None
    peak_rss_mib: float | None = None
    over_budget_mib: float | None = None
    cpu_after_deadline_s: float | None = None
    lost: int | None = None
    verdict: str = ""
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def outcome(call: Callable[[], Any]) -> tuple[str, str, Any]:
    """(code name, details, value) of a call through either client."""
    try:
        return "OK", "", call()
    except ChainruleRpcError as exc:
        return exc.code.name, exc.message, None
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or "", None


class Run:
    """The servers, tallies and findings of one scenario; ``close`` stops every server it started."""

    def __init__(self, name: str, quick: bool, sampler: RssSampler, seconds: float) -> None:
        self.name = name
        self.quick = quick
        self.sampler = sampler
        self.started = time.monotonic()
        self.ends = self.started + seconds
        self.servers: list[Server] = []
        self.checker = Checker()
        self.codes: Counter[str] = Counter()
        self.examples: dict[str, str] = {}
        self.requests = 0
        self.lost: int | None = None
        self.cpu_after: float | None = None
        self.failures: list[str] = []
        self.notes: list[str] = []
        self.releases: list[threading.Event] = []  # set on close: unblocks request iterators
        self.compared_count = 0
        self.wrong_here = 0
        self._lock = threading.Lock()
        self._watchdog = threading.Timer(seconds + 60, self._overrun)
        self._watchdog.daemon = True
        self._watchdog.start()

    # servers
    def server(self, *flags: str, port: int = 0) -> Server:
        server = Server(flags, port=port)
        self.servers.append(server)
        self.sampler.watch(server)
        return server

    def _overrun(self) -> None:
        self.failures.append("scenario overran its time bound: its servers were killed")
        for server in self.servers:
            server.kill()

    def left(self) -> float:
        return self.ends - time.monotonic()

    def release_event(self) -> threading.Event:
        event = threading.Event()
        self.releases.append(event)
        return event

    # tallies
    def record(self, code: str, detail: str = "") -> None:
        with self._lock:
            self.requests += 1
            self.codes[code] += 1
            if code != "OK" and code not in self.examples:
                self.examples[code] = detail[:240]

    def check(self, probe: Probe, result: Result) -> None:
        self.checker.add(probe, result)

    def compared(self, same: bool, what: str) -> None:
        """An answer compared here rather than by the Checker (trained parameters)."""
        self.compared_count += 1
        if not same:
            self.wrong_here += 1
            self.notes.append(f"wrong answer: {what}")

    def fail(self, text: str) -> None:
        self.failures.append(text)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def add_lost(self, count: int) -> None:
        """Calls (or stream items, or training runs) that ended without their answer; 0 says they were counted."""
        self.lost = (self.lost or 0) + count

    def cpu_after_deadline(self, seconds: float) -> None:
        self.cpu_after = max(self.cpu_after or 0.0, seconds)

    # the end
    def close(self) -> Row:
        for event in self.releases:
            event.set()
        peaks = []
        for server in self.servers:
            server.stop()
            self.sampler.forget(server)
            peaks.append(max(self.sampler.peaks.get(server, 0), server.hwm))
            if server.ceiling_hit:
                self.failures.append(f"memory: a server passed {CEILING >> 30} GiB and was killed to protect the "
                                     "machine")
        self._watchdog.cancel()
        row = Row(self.name, self.requests, dict(sorted(self.codes.items())), lost=self.lost,
                  cpu_after_deadline_s=None if self.cpu_after is None else round(self.cpu_after, 2))
        if len(self.checker):
            row.wrong, notes = self.checker.verify(BUDGET)
            self.notes.extend(notes)
        if self.compared_count:
            row.wrong = (row.wrong or 0) + self.wrong_here
        if peaks:
            row.peak_rss_mib = round(max(peaks) / MiB, 1)
            row.over_budget_mib = round((max(peaks) - BUDGET) / MiB, 1)
        row.failures = self.failures + self._broken(row)
        row.notes = self.notes + [f"{code}: {text}" for code, text in sorted(self.examples.items())]
        broken = dict.fromkeys(failure.split(":")[0] for failure in row.failures)  # in order, once each
        row.verdict = "meets" if not broken else "FAILS: " + "; ".join(broken)
        row.seconds = round(time.monotonic() - self.started, 1)
        return row

    def _broken(self, row: Row) -> list[str]:
        broken = []
        if row.peak_rss_mib is not None and row.peak_rss_mib * MiB > BUDGET + SLACK:
            broken.append(f"memory: peak RSS {row.peak_rss_mib:.0f} MiB > budget + 256 MiB "
                          f"({(BUDGET + SLACK) / MiB:.0f} MiB)")
        if row.cpu_after_deadline_s is not None and row.cpu_after_deadline_s > CPU_AFTER_LIMIT:
            broken.append(f"time: {row.cpu_after_deadline_s:.2f} s of server CPU after the deadline (> 0.2 s)")
        if row.lost:
            broken.append(f"lost calls: {row.lost}")
        if row.wrong:
            broken.append(f"wrong answers: {row.wrong}")
        return broken


# --- helpers shared by scenarios ----------------------------------------------------------------

def request_of(target: Var, feeds: dict[str, Any], *, values: Any = "none", grads: Any = "all") -> pb.EvaluateRequest:
    """The EvaluateRequest the client would send for ``target`` (its ancestors only)."""
    graph = target.builder.graph_for(target)
    return evaluate_request(graph, target.name, feeds, values=values, grads=grads).message


def raw_unary(channel: grpc.Channel, method: str = EVALUATE) -> grpc.UnaryUnaryMultiCallable:
    return channel.unary_unary(method, request_serializer=None, response_deserializer=None)


def health_stub(channel: grpc.Channel) -> Callable[[float], Any]:
    stub = health_pb2_grpc.HealthStub(channel)
    return lambda timeout: stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)


def percentile(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] if ordered else float("nan")


def latencies(run: Run, call: Callable[[], Any], count: int, label: str,
              check: Callable[[Any], None] | None = None) -> tuple[float, float, Counter[str]]:
    """p50 and p99 (ms) of ``count`` sequential calls after 10 to warm up, and their codes (every call
    recorded)."""
    seconds, codes = [], Counter()
    for _ in range(10):
        run.record(*outcome(call)[:2])
    for _ in range(count):
        began = time.perf_counter()
        code, detail, value = outcome(call)
        seconds.append(time.perf_counter() - began)
        codes[code] += 1
        run.record(code, f"{label}: {detail}")
        if code == "OK" and check is not None:
            check(value)
    return percentile(seconds, 0.5) * 1000, percentile(seconds, 0.99) * 1000, codes


def judge_latency(run: Run, label: str, before: tuple[float, float, Counter[str]],
                  during: tuple[float, float, Counter[str]], attack: str, allowed_ms: float | None = None) -> None:
    """'Unaffected': no failed call, and p99 within twice the baseline plus 50 ms (or ``allowed_ms``)."""
    run.note(f"{label} p50/p99 {before[0]:.1f}/{before[1]:.1f} ms alone, {during[0]:.1f}/{during[1]:.1f} ms "
             f"with {attack}; codes {dict(during[2])}")
    failed = sum(n for code, n in during[2].items() if code != "OK")
    if failed or during[1] > (2 * before[1] + 50 if allowed_ms is None else allowed_ms):
        run.fail(f"slots: {label} affected by {attack}: p99 {during[1]:.0f} ms (alone {before[1]:.0f} ms), "
                 f"{failed} of {sum(during[2].values())} failed {dict(during[2])}")


def wait_idle(server: Server, quiet: float = 0.5, limit: float = 30.0) -> float:
    """The server's CPU seconds once it used less than 20 ms of CPU in ``quiet`` seconds."""
    last = server.cpu()
    ends = time.monotonic() + limit
    while time.monotonic() < ends:
        time.sleep(quiet)
        now = server.cpu()
        if now - last < 0.02:
            return now
        last = now
    return last


def timed_call(run: Run, server: Server, deadline: float, call: Callable[[], Any]) -> tuple[str, str, Any, float]:
    """A call with a client deadline: code, details, value, and the server CPU spent after the deadline."""
    at_deadline: list[float] = []
    began = time.monotonic()
    timer = threading.Timer(deadline, lambda: at_deadline.append(server.cpu()))
    timer.start()
    code, detail, value = outcome(call)
    took = time.monotonic() - began
    timer.cancel()
    timer.join()
    # answered before its deadline: the server's work ended with its answer, none came after the deadline
    after = wait_idle(server) - at_deadline[0] if at_deadline else 0.0
    run.cpu_after_deadline(after)
    run.record(code, detail)
    return code, detail, value, took


def small_graph() -> tuple[Var, dict[str, Any]]:
    """p = x + y, g = p * z at x=1, y=3, z=-3."""
    g = GraphBuilder()
    x, y, z = g.input("x"), g.input("y"), g.input("z")
    return ((x + y) * z).named("g"), {"x": 1.0, "y": 3.0, "z": -3.0}


def evaluate_checked(run: Run, client: Client, key: str, target: Var, feeds: dict[str, Any],
                     timeout: float, **options: Any) -> tuple[str, str]:
    """One Client.evaluate, recorded, its OK answer queued for comparison with LocalClient."""
    code, detail, result = outcome(lambda: client.evaluate(target, feeds, timeout=timeout, **options))
    run.record(code, f"{key}: {detail}")
    if code == "OK":
        run.check(Probe(key, target, feeds, options), result)
    return code, detail


def send_stream(run: Run, stub: ChainruleStub, items: list[tuple[str, pb.EvaluateRequest]],
                timeout: float) -> tuple[int, str, str]:
    """One EvaluateStream call of ``items``: each answer recorded and OK ones queued for comparison.
    Returns (items answered, the call's final code, its details)."""
    call = stub.EvaluateStream(iter([request for _, request in items]), timeout=timeout)
    answered = 0
    try:
        for answer in call:
            for one in (answer.results if len(answer.results) else [answer]):
                key, request = items[min(one.index, len(items) - 1)]
                if one.WhichOneof("result") == "response":
                    run.record("OK")
                    run.check(Probe(key, request=request), Result(one.response))
                else:
                    run.record(status_name(one.error.code), f"{key}: {one.error.message}")
                answered += 1
        return answered, "OK", ""
    except grpc.RpcError as exc:
        return answered, exc.code().name, exc.details() or ""


def status_name(number: int) -> str:
    """The name of a google.rpc.Status code number (as grpc.StatusCode spells it)."""
    return next((code.name for code in grpc.StatusCode if code.value[0] == number), f"CODE {number}")


def hostile_requests(count: int, seed: int, max_nodes: int) -> list[pb.EvaluateRequest]:
    """``count`` hostile EvaluateRequests from the fuzz campaign's families (tests/hostile.py)."""
    from hypothesis import HealthCheck, Phase, given, settings, strategies as st
    from hypothesis import seed as with_seed

    import hostile

    families = st.one_of(hostile.random_requests(), hostile.plausible_requests(), hostile.plausible_requests(),
                         hostile.cycles(), hostile.deep_chains(max_nodes), hostile.terabytes())
    found: list[pb.EvaluateRequest] = []

    @settings(max_examples=count, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(request=families)
    def collect(request: pb.EvaluateRequest) -> None:
        found.append(request)

    with_seed(seed)(collect)()
    return found[:count]


def broadcast_graph(shape: Sequence[int]) -> tuple[Var, Var]:
    """x[1] broadcast to ``shape`` (the node named "b"), and its sum."""
    g = GraphBuilder()
    b = ops.broadcast_to(g.input("x", (1,)), list(shape)).named("b")
    return b, ops.sum(b).named("s")


ONE = np.array([1.0])


# --- scenarios ----------------------------------------------------------------------------------

def vjp_temporaries(run: Run) -> None:
    """Issue 14.1: a 167-byte graph whose matmul vjp once built an (N, N, N) temporary."""
    server = run.server()
    sizes = (700,) if run.quick else (500, 700, 800, 1000)
    with Client(server.address) as client:
        for n in sizes:
            g = GraphBuilder()
            x = g.input("x", (1,))
            a = ops.broadcast_to(x, [n, 1, n])
            b = ops.broadcast_to(x, [1, n, n])
            s = ops.sum(ops.matmul(a, b)).named("s")
            before = server.cpu()
            code, detail = evaluate_checked(run, client, f"matmul-broadcast N={n}", s, {"x": np.array([0.5])}, 120)
            run.note(f"N={n}: {code} ({request_of(s, {'x': np.array([0.5])}).ByteSize()} B request, "
                     f"{server.cpu() - before:.1f} s server CPU)")


def response_size(run: Run) -> None:
    """Issue 14.2: responses of gigabytes asked for by requests of kilobytes, and a 30 MB attribute."""
    server = run.server()
    _, listed = broadcast_graph([131_072])  # b: 1 MiB
    repeated = request_of(listed, {"x": ONE}, values=["b"], grads="none")
    repeated.return_values.names[:] = ["b"] * 2500
    side = 6000 if run.quick else 8000
    _, whole = broadcast_graph([side, side])
    everything = request_of(whole, {"x": ONE})
    everything.ClearField("return_values")  # unset: the server's default, every value
    everything.ClearField("return_grads")
    ints = 10_000_000 if run.quick else 30_000_000
    attribute = _ints_attribute_request(ints)
    cases = [("2,500 names of one 1 MiB node", repeated, 2.0),
             (f"broadcast_to {side}x{side}, every value", everything, 2.0),
             (f"broadcast_to {side}x{side}, every value, 30 s deadline", everything, 30.0),
             (f"{ints // 1_000_000} MB ints attribute", attribute, 2.0)]
    with grpc.insecure_channel(server.address, options=[("grpc.max_receive_message_length", -1),
                                                        ("grpc.max_send_message_length", -1)]) as channel:
        call = raw_unary(channel)
        for label, request, deadline in cases:
            data = request.SerializeToString()
            for _ in range(1 if run.quick else 2):
                before = server.cpu()
                run.sampler.open_window(server)
                code, detail, answer, took = timed_call(
                    run, server, deadline, lambda: call(data, timeout=deadline))
                if code == "OK":
                    run.check(Probe(label, request=request), Result(pb.EvaluateResponse.FromString(answer)))
                run.note(f"{label} ({len(data):,} B): {code} in {took:.1f} s, {server.cpu() - before:.1f} s CPU, "
                         f"peak {run.sampler.window_peak(server) / MiB:.0f} MiB")


def _ints_attribute_request(count: int) -> pb.EvaluateRequest:
    """A reshape whose shape attribute holds ``count`` ones (one byte each on the wire)."""
    request = pb.EvaluateRequest(output="y", inputs={"x": array_to_tensor(ONE)})
    request.graph.inputs.add(name="x", dtype=pb.FLOAT64, shape=[1])
    node = request.graph.nodes.add(name="y", op="reshape", inputs=["x"])
    node.attrs["shape"].ints.values.extend(np.ones(count, dtype=np.int64).tolist())
    request.graph.outputs.append("y")
    return request


def plan_cache(run: Run) -> None:
    """Issue 14.3: distinct 250,000-node graphs registered one after another."""
    server = run.server()
    count, nodes = (4, 100_000) if run.quick else (8, 250_000)
    last = None
    with grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", -1)]) as channel:
        stub = ChainruleStub(channel)
        for k in range(count):
            if run.left() < (10 if run.quick else 30):
                run.note(f"stopped after {k} graphs (time bound)")
                break
            graph = _chain(nodes, prefix=f"g{k}_")
            code, detail, response = outcome(lambda: stub.RegisterGraph(pb.RegisterGraphRequest(graph=graph),
                                                                        timeout=120))
            run.record(code, detail)
            run.note(f"graph {k}: {code}, server RSS {sum(rss_bytes(p) for p in server.pids()) / MiB:.0f} MiB")
            if code == "OK":
                last = (graph, response.graph_id)
        if last is not None:
            graph, graph_id = last
            request = pb.EvaluateRequest(graph_id=graph_id, inputs={"x": array_to_tensor(np.float64(0.5))},
                                         return_values=pb.Selection(mode=pb.Selection.NONE),
                                         return_grads=pb.Selection(mode=pb.Selection.LISTED, names=["x"]))
            code, detail, response = outcome(lambda: stub.Evaluate(request, timeout=120))
            run.record(code, detail)
            if code == "OK":
                whole = pb.EvaluateRequest()
                whole.CopyFrom(request)
                whole.graph.CopyFrom(graph)
                run.check(Probe("the last chain, by id", request=whole), Result(response))


def _chain(nodes: int, prefix: str = "n", op: str = "neg") -> pb.Graph:
    """x -> op -> op -> ... (``nodes`` nodes), as a message (fast for hundreds of thousands)."""
    graph = pb.Graph()
    graph.inputs.add(name="x", dtype=pb.FLOAT64)
    names = [f"{prefix}{i}" for i in range(nodes)]
    for i, name in enumerate(names):
        graph.nodes.add(name=name, op=op, inputs=[names[i - 1] if i else "x"])
    graph.outputs.append(names[-1])
    return graph


def _product(n: int) -> Var:
    """sum(B @ B) for B, x broadcast to n x n: 2 n^3 operations from one number."""
    g = GraphBuilder()
    big = ops.broadcast_to(g.input("x", (1,)), [n, n])
    return ops.sum(big @ big).named("s")


@dataclass
class Attack:
    """A call that may overrun its deadline: its graph, feeds and deadline."""

    label: str
    target: Var
    feeds: dict[str, Any]
    deadline: float


def _power(side: int) -> Var:
    """sum(B ** 3.3), B x broadcast to side x side: one elementwise node of seconds of work."""
    g = GraphBuilder()
    return ops.sum(ops.pow(ops.broadcast_to(g.input("x", (1,)), [side, side]), 3.3)).named("s")


def deadline_cpu(run: Run) -> None:
    """Issue 14.4: server CPU after the deadline, the up-front estimate against the real time, and
    slots kept by abandoned calls."""
    server = run.server()
    attacks = [Attack(f"matmul {n}x{n}", _product(n), {"x": ONE}, deadline)
               for n, deadline in ((6400, 1.0), (4000, 1.0), (3000, 1.0), (2500, 0.5), (2000, 0.3), (1500, 0.2),
                                   (1000, 0.05))]
    attacks.append(Attack("pow of 6000x6000", _power(6000), {"x": np.array([1.5])}, 0.3))
    admitted, estimates = [], {}
    with Client(server.address) as client:
        for attack in attacks:
            if run.left() < 40:
                break
            estimate = _deadline_call(run, server, client, attack)
            if estimate is None:
                admitted.append(attack)
            else:
                estimates[attack.label] = (attack, estimate)
        _estimate_is_a_lower_bound(run, client, estimates)
        _chain_with_deadline(run, server, client)
    if admitted:  # a smaller power: the pile-up it makes stays under CEILING
        pow_admitted = admitted[-1].label.startswith("pow")
        _abandoned_slots(run, server, Attack("pow of 5000x5000", _power(5000), {"x": np.array([1.5])}, 0.3)
                         if pow_admitted else admitted[-1])
    else:
        run.note("every attack was refused up front: the abandoned-slot attack was not run")


def _deadline_call(run: Run, server: Server, client: Client, attack: Attack) -> float | None:
    """One attack under its deadline; the up-front estimate when it was refused before starting."""
    run.sampler.open_window(server)
    code, detail, result, took = timed_call(
        run, server, attack.deadline,
        lambda: client.evaluate(attack.target, attack.feeds, grads="none", timeout=attack.deadline))
    if code == "OK":
        run.check(Probe(attack.label, attack.target, attack.feeds, {"grads": "none"}), result)
    estimate = _estimate(detail)
    run.note(f"{attack.label}, {attack.deadline} s deadline: {code}"
             f"{f' up front (estimate {estimate:.2f} s)' if estimate is not None else ''}, answered in "
             f"{took:.2f} s, CPU after deadline so far {run.cpu_after:.2f} s, "
             f"peak {run.sampler.window_peak(server) / MiB:.0f} MiB")
    return estimate


def _estimate(detail: str) -> float | None:
    """The seconds a refusal up front says the call needs at least (None: not refused up front)."""
    if "refused before starting" not in detail or "needs at least " not in detail:
        return None
    return float(detail.split("needs at least ", 1)[1].split(" s", 1)[0])


def _estimate_is_a_lower_bound(run: Run, client: Client, estimates: dict[str, tuple[Attack, float]]) -> None:
    """Run the refused attacks of up to 3000^3 with time to spare: the estimate promised a lower bound."""
    for label, (attack, estimate) in estimates.items():
        if label.startswith("matmul") and int(label.split()[1].split("x")[0]) > (1500 if run.quick else 3000):
            continue
        began = time.monotonic()
        code, detail, result = outcome(lambda: client.evaluate(attack.target, attack.feeds, grads="none",
                                                               timeout=120))
        took = time.monotonic() - began
        run.record(code, f"{label} with time to spare: {detail}")
        if code == "OK":
            run.check(Probe(label, attack.target, attack.feeds, {"grads": "none"}), result)
        run.note(f"{label} with a 120 s deadline: {code} in {took:.2f} s; refused up front as needing at least "
                 f"{estimate:.2f} s")
        if code == "OK" and took < estimate:
            run.fail(f"time: the up-front estimate is no lower bound: {label} was refused as needing at least "
                     f"{estimate:.2f} s, and took {took:.2f} s")


def _chain_with_deadline(run: Run, server: Server, client: Client) -> None:
    nodes = 300_000 if run.quick else 1_000_000
    graph = _chain(nodes, op="tanh")
    request = pb.EvaluateRequest(graph=graph, inputs={"x": array_to_tensor(np.float64(0.5))},
                                 return_values=pb.Selection(mode=pb.Selection.NONE))
    data = request.SerializeToString()
    call = raw_unary(client.channel)
    run.sampler.open_window(server)
    code, detail, _, took = timed_call(run, server, 1.0, lambda: call(data, timeout=1.0))
    run.note(f"{nodes:,}-node chain ({len(data) / MiB:.0f} MiB), 1 s deadline: {code} in {took:.2f} s, "
             f"CPU after deadline so far {run.cpu_after:.2f} s, peak {run.sampler.window_peak(server) / MiB:.0f} MiB")


def _abandoned_slots(run: Run, server: Server, attack: Attack) -> None:
    """Two attackers send ``attack`` again and again; how often is a good caller refused, and how
    much does the server compute once the attackers' calls have all ended?"""
    seconds = 4.0 if run.quick else 8.0
    stop = threading.Event()
    good_codes: Counter[str] = Counter()
    target, feeds = small_graph()

    def attacker() -> None:
        with Client(server.address) as client:
            while not stop.is_set():
                code, detail, _ = outcome(lambda: client.evaluate(attack.target, attack.feeds, grads="none",
                                                                  timeout=attack.deadline))
                run.record(code, f"attacker: {detail}")

    def good() -> None:
        with Client(server.address) as client:
            while not stop.is_set():
                code, _ = evaluate_checked(run, client, "small graph", target, feeds, 5.0)
                good_codes[code] += 1
                time.sleep(0.02)

    threads = [threading.Thread(target=attacker, daemon=True) for _ in range(2)]
    threads.append(threading.Thread(target=good, daemon=True))
    run.sampler.open_window(server)
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join(30)
    last_deadline = server.cpu()  # every attacker call has ended: its deadline passed, or it was answered
    after = wait_idle(server) - last_deadline
    run.cpu_after_deadline(after)
    refused = sum(v for k, v in good_codes.items() if k != "OK")
    run.note(f"abandoned slots ({attack.label}, {attack.deadline} s deadlines, 2 attackers, {seconds:.0f} s): "
             f"good caller got {dict(good_codes)}; peak {run.sampler.window_peak(server) / MiB:.0f} MiB; "
             f"{after:.2f} s of CPU after the last attacker call ended")
    if refused > 0.01 * max(1, sum(good_codes.values())):
        run.fail(f"slots: {refused} of {sum(good_codes.values())} good calls failed while abandoned calls ran "
                 f"{dict(good_codes)}")


def _never(release: threading.Event) -> Iterator[Any]:
    """A request iterator that sends nothing: the call's headers go out, and no message."""
    release.wait()
    return
    yield


def _finish(call: Any, codes: list[tuple[str, str]]) -> None:
    """Wait for a streaming call's end; its code and details go to ``codes``."""
    try:
        for _ in call:
            pass
        codes.append(("OK", ""))
    except grpc.RpcError as exc:
        codes.append((exc.code().name, exc.details() or ""))


def _hang(open_call: Callable[[], Any], count: int) -> tuple[list[tuple[str, str]], list[threading.Thread]]:
    """``count`` calls that send nothing, each followed by a thread until it ends; their ends go to the list."""
    ended: list[tuple[str, str]] = []
    waiters = [threading.Thread(target=_finish, args=(open_call(), ended), daemon=True) for _ in range(count)]
    for waiter in waiters:
        waiter.start()
    return ended, waiters


def _health_and_evaluate(run: Run, health: Callable[[float], Any], client: Client) -> tuple[Any, Any]:
    """Latency of 100 health checks and of 100 small Evaluate calls (answers checked)."""
    target, feeds = small_graph()
    check = lambda result: run.check(Probe("small graph", target, feeds), result)  # noqa: E731
    return (latencies(run, lambda: health(5), 100, "health"),
            latencies(run, lambda: client.evaluate(target, feeds), 100, "evaluate", check))


def idle_streams(run: Run) -> None:
    """Issue 14.5: 100 idle EvaluateStream calls on --max-concurrent 8, then 100 header-only Evaluate
    calls: health and Evaluate latency; a busy stream cut by --max-stream-seconds."""
    idle, longest = ("5", "8") if run.quick else ("10", "14")
    server = run.server("--max-concurrent", "8", "--stream-idle-seconds", idle, "--max-stream-seconds", longest)
    count = 40 if run.quick else 100
    with Client(server.address, timeout=5) as client, grpc.insecure_channel(server.address) as channel:
        health = health_stub(channel)
        stub = ChainruleStub(channel)
        base = _health_and_evaluate(run, health, client)
        busy_codes: list[tuple[str, str]] = []
        busy = threading.Thread(target=_busy_stream, args=(run, stub, busy_codes), daemon=True)
        busy.start()
        release = run.release_event()
        ended, waiters = _hang(lambda: stub.EvaluateStream(_never(release), timeout=60), count)
        time.sleep(1.0)
        for label, before, now in zip(("health", "Evaluate"), base, _health_and_evaluate(run, health, client)):
            judge_latency(run, label, before, now, f"{count} idle streams")
        for waiter in waiters:
            waiter.join(max(1.0, min(25.0, run.left())))
        busy.join(max(1.0, min(20.0, run.left())))
        _judge_stream_ends(run, ended, count, "stream_idle_seconds", "idle streams")
        _judge_stream_ends(run, busy_codes, 1, "max_stream_seconds", "the busy stream")
        _header_only_unary(run, channel, base, lambda: _health_and_evaluate(run, health, client), count, "")


def _header_only_unary(run: Run, channel: grpc.Channel, base: tuple[Any, Any], measure: Callable[[], Any],
                       count: int, who: str) -> None:
    """``count`` Evaluate calls that send headers and no message, while health and Evaluate are measured."""
    release = run.release_event()
    header_only = channel.stream_stream(EVALUATE, request_serializer=None, response_deserializer=None)
    ended, waiters = _hang(lambda: header_only(_never(release), timeout=30), count)
    time.sleep(1.0)
    attack = f"{count} header-only{who} Evaluate calls"
    for label, before, now in zip(("health", "Evaluate"), base, measure()):
        judge_latency(run, label, before, now, attack)
    release.set()
    for waiter in waiters:
        waiter.join(10)
    for code, detail in ended:
        run.record(code, f"header-only{who}: {detail}")
    run.note(f"{attack} ended with {dict(Counter(code for code, _ in ended))}")


def _busy_stream(run: Run, stub: ChainruleStub, codes: list[tuple[str, str]]) -> None:
    """One good item a second until --max-stream-seconds ends the call."""
    target, _ = small_graph()

    def items() -> Iterator[pb.EvaluateRequest]:
        for k in range(30):
            yield request_of(target, {"x": float(k), "y": 3.0, "z": -3.0})
            time.sleep(1.0)

    requests = {k: request_of(target, {"x": float(k), "y": 3.0, "z": -3.0}) for k in range(30)}
    call = stub.EvaluateStream(items(), timeout=40)
    try:
        for answer in call:
            if answer.WhichOneof("result") == "response":
                run.record("OK")
                run.check(Probe(f"busy stream item {answer.index}", request=requests[answer.index]),
                          Result(answer.response))
            else:
                run.record(status_name(answer.error.code), answer.error.message)
        codes.append(("OK", ""))
    except grpc.RpcError as exc:
        codes.append((exc.code().name, exc.details() or ""))


def _judge_stream_ends(run: Run, ended: list[tuple[str, str]], count: int, limit: str, label: str) -> None:
    seen = Counter(code for code, _ in ended)
    for code, detail in ended:
        run.record(code, f"{label}: {detail}")
    run.note(f"{label} ended with {dict(seen)}")
    named = sum(1 for code, detail in ended if code == "DEADLINE_EXCEEDED" and limit in detail)
    if named < count:
        example = next((f"{c}: {d[:120]}" for c, d in ended if not (c == "DEADLINE_EXCEEDED" and limit in d)),
                       "no end seen")
        run.fail(f"streams: {count - named} of {count} {label} did not end with DEADLINE_EXCEEDED naming "
                 f"{limit} ({example})")


def _make_pki(directory: Path) -> None:
    """A CA, and a server certificate for 127.0.0.1 it signed (openssl)."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *curve, "-days", "2", "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=ca",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
    openssl("req", *curve, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=server")
    (directory / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-set_serial", "1",
            "-days", "2", "-out", "server.pem", "-extfile", "server.ext")


def auth_header_only(run: Run) -> None:
    """Issue 14.5: TLS and tokens; 100 header-only unauthenticated calls; an unauthenticated 60 MiB message."""
    if shutil.which("openssl") is None:
        run.note("skipped: needs the openssl command")
        return
    with tempfile.TemporaryDirectory(prefix="chainrule-pki-") as folder:
        pki = Path(folder)
        _make_pki(pki)
        token = "scenario-token-" + os.urandom(8).hex()
        (pki / "tokens.txt").write_text(token + "\n")
        server = run.server("--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
                            "--token-file", str(pki / "tokens.txt"))
        credentials = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes())
        with Client(server.address, timeout=5, tls=TLS(ca=str(pki / "ca.pem")), token=token) as client, \
                grpc.secure_channel(server.address, credentials) as anonymous:
            _header_only_calls(run, server, client, anonymous)
            _unauthenticated_large(run, server, anonymous)
            _wrong_credentials(run, server, pki, token)


def _header_only_calls(run: Run, server: Server, client: Client, anonymous: grpc.Channel) -> None:
    """Header-only calls without a token; health (open, no token) and authenticated Evaluate measured."""
    count = 40 if run.quick else 100
    health = health_stub(anonymous)
    measure = lambda: _health_and_evaluate(run, health, client)  # noqa: E731
    _header_only_unary(run, anonymous, measure(), measure, count, " unauthenticated")


def _unauthenticated_large(run: Run, server: Server, anonymous: grpc.Channel) -> None:
    """A 60 MiB Evaluate without a token: answered at once, nothing received (server RSS growth)?"""
    request = pb.EvaluateRequest(inputs={"x": array_to_tensor(np.zeros(60 * MiB // 8))})
    data = request.SerializeToString()
    call = raw_unary(anonymous)
    baseline = sum(rss_bytes(p) for p in server.pids())
    run.sampler.open_window(server)
    for _ in range(3):
        began = time.monotonic()
        code, detail, _ = outcome(lambda: call(data, timeout=10))
        run.record(code, f"unauthenticated 60 MiB: {detail}")
        run.note(f"unauthenticated 60 MiB message: {code} in {time.monotonic() - began:.2f} s")
    time.sleep(0.1)
    grown = (run.sampler.window_peak(server) - baseline) / MiB
    run.note(f"server RSS grew by {grown:.0f} MiB during the unauthenticated 60 MiB calls")
    if grown > 40:
        run.fail(f"auth: the server received unauthenticated 60 MiB messages (RSS +{grown:.0f} MiB)")


def _wrong_credentials(run: Run, server: Server, pki: Path, token: str) -> None:
    target, feeds = small_graph()
    attempts = {"wrong token": dict(tls=TLS(ca=str(pki / "ca.pem")), token="not-" + token),
                "no token": dict(tls=TLS(ca=str(pki / "ca.pem"))),
                "plaintext": dict(token=token)}
    for label, settings in attempts.items():
        with Client(server.address, timeout=3, **settings) as client:
            code, detail, _ = outcome(lambda: client.evaluate(target, feeds))
        run.record(code, f"{label}: {detail}")
        expected = "UNAVAILABLE" if label == "plaintext" else "UNAUTHENTICATED"
        if code != expected:
            run.fail(f"auth: {label} got {code}, not {expected}: {detail[:120]}")


def stream_items(run: Run) -> None:
    """Issue 14.6: per-item errors (too large included) keep a stream going; hostile stream content."""
    server = run.server()
    run.add_lost(0)
    good, feeds = small_graph()

    def good_item(k: int) -> tuple[str, pb.EvaluateRequest]:
        item_feeds = {**feeds, "x": float(k)}
        return f"good item x={k}", request_of(good, item_feeds)

    def everything(shape: Sequence[int], label: str) -> tuple[str, pb.EvaluateRequest]:
        _, total = broadcast_graph(shape)
        request = request_of(total, {"x": ONE})
        request.ClearField("return_values")  # every value and gradient
        return label, request

    side = 3000 if run.quick else 5000
    large = [good_item(0), everything([side, side], f"broadcast_to {side}x{side}, all"), good_item(1), good_item(2),
             everything([8000, 8000], "broadcast_to 8000x8000, all"), good_item(3)]
    with grpc.insecure_channel(server.address, options=[("grpc.max_receive_message_length", -1)]) as channel:
        stub = ChainruleStub(channel)
        _one_stream(run, stub, large, "too-large items")
        hostile = hostile_requests(100 if run.quick else 300, 14, 2000)
        chunk = 50
        for start in range(0, len(hostile), chunk):
            if run.left() < (8 if run.quick else 20):
                run.note("stopped early (time bound)")
                break
            items = []
            for k, request in enumerate(hostile[start:start + chunk]):
                if not request.HasField("graph") and not request.graph_id:
                    request.graph.SetInParent()  # no graph: not "the previous item's graph"
                items.append((f"hostile item {start + k}", request))
                if k % 5 == 4:
                    items.append(good_item(start + k))
            _one_stream(run, stub, items, f"hostile items {start}-{start + chunk - 1}")
    with Client(server.address, timeout=30) as client:
        _evaluate_many_with_bad_sets(run, client)


def _one_stream(run: Run, stub: ChainruleStub, items: list[tuple[str, pb.EvaluateRequest]], label: str) -> None:
    answered, code, detail = send_stream(run, stub, items, timeout=60)
    run.record(code, f"{label} (the stream): {detail}")
    if answered < len(items):
        run.add_lost(len(items) - answered)
        run.fail(f"streams: {label}: the stream ended with {code} after {answered} of {len(items)} items "
                 f"(item {answered}: {items[min(answered, len(items) - 1)][0]}): {detail[:160]}")


def _evaluate_many_with_bad_sets(run: Run, client: Client) -> None:
    g = GraphBuilder()
    x = g.input("x", (3,))
    f = ops.sum(ops.tanh(x) * x).named("f")
    sets = [{"x": np.arange(3.0) + k} for k in range(20)]
    sets[5] = {"x": np.arange(4.0)}  # wrong shape
    sets[11] = {"x": np.array([np.nan, 1.0, 2.0])}
    sets[17] = {"y": np.arange(3.0)}  # unknown input
    code, detail, results = outcome(lambda: client.evaluate_many(f, sets, errors="return", batch=4))
    run.record(code, f"evaluate_many: {detail}")
    for k, result in enumerate(results or []):
        if isinstance(result, ChainruleRpcError):
            run.record(result.code.name, f"evaluate_many set {k}: {result.message}")
        else:
            run.record("OK")
            run.check(Probe(f"evaluate_many set {k}", f, sets[k]), result)


def optimize_runs(run: Run) -> None:
    """Issue 14.7: Optimize with hostile content; stopped by a deadline, the time cap, a cancel, SIGTERM."""
    cap = 2.0 if run.quick else 3.0  # the server's time cap; the client's deadline comes a second before it
    server = run.server("--max-training-seconds", str(cap))
    run.add_lost(0)
    loss, params, data = _regression()
    with grpc.insecure_channel(server.address) as channel:
        stub = ChainruleStub(channel)
        for label, request in _hostile_optimize(loss, params, data):
            code, detail = _drain_optimize(stub, request, timeout=10)
            run.record(code, f"{label}: {detail}")
            if code in ("INTERNAL", "UNKNOWN", "DEADLINE_EXCEEDED"):
                run.fail(f"optimize: {label} got {code}: {detail[:160]}")
    with Client(server.address) as client:
        _stopped_run(run, server, client, loss, params, data, "the client's deadline", timeout=cap - 1.0)
        _stopped_run(run, server, client, loss, params, data, "max_training_seconds", timeout=None)
        _cancelled_run(run, server, client, loss, params, data)
    _sigterm_run(run, loss, params, data)


def _regression() -> tuple[Var, dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    g = GraphBuilder()
    w, features, target = g.input("w", (16,)), g.input("X", (256, 16)), g.input("y", (256,))
    loss = ops.mse(features @ w, target).named("loss")
    X = rng.standard_normal((256, 16))
    return loss, {"w": np.zeros(16)}, {"X": X, "y": X @ rng.standard_normal(16)}


def _hostile_optimize(loss: Var, params: dict, data: dict) -> list[tuple[str, pb.OptimizeRequest]]:
    from chainrule.client.training import optimize_request

    def base(**changes: Any) -> pb.OptimizeRequest:
        settings = dict(data=data, batches=(), optimizer="sgd", lr=0.01, momentum=0.0, beta1=None, beta2=None,
                        eps=None, steps=50, target_loss=None, report_every=10)
        settings.update(changes)
        return optimize_request(loss.builder.graph_for(loss), "loss", params, **settings)

    cases = [("lr NaN", base(lr=float("nan"))), ("lr -1", base(lr=-1.0)), ("lr inf", base(lr=float("inf"))),
             ("steps 0", base(steps=0)), ("steps -5", base(steps=-5)), ("momentum 5", base(momentum=5.0)),
             ("beta1 2", base(optimizer="adam", beta1=2.0)), ("optimizer evil", base(optimizer="evil")),
             ("target_loss NaN", base(target_loss=float("nan"))), ("report_every -1", base(report_every=-1))]
    extra = base()
    extra.parameters.append("nope")
    cases.append(("parameter not an input", extra))
    twice = base()
    twice.parameters.append("w")
    cases.append(("parameter named twice", twice))
    data_param = base()
    data_param.parameters.append("X")
    data_param.initial["X"].CopyFrom(array_to_tensor(np.zeros((3, 3))))
    cases.append(("parameter of the wrong shape", data_param))
    no_initial = base()
    del no_initial.initial["w"]
    cases.append(("no initial value", no_initial))
    non_scalar = base()
    non_scalar.loss = non_scalar.graph.nodes[0].name
    cases.append(("loss not scalar", non_scalar))
    batches = base()
    for k in range(3):
        batches.batches.add().inputs["X"].CopyFrom(array_to_tensor(np.zeros((k + 1, 16))))
    cases.append(("batches of mismatched shapes", batches))
    interval = base()
    interval.report_interval_seconds = float("nan")
    cases.append(("report interval NaN", interval))
    unknown = base()
    unknown.graph_id = "0" * 64
    cases.append(("unknown graph id", unknown))
    huge, _ = broadcast_graph([10**6, 10**6])
    terabyte = optimize_request(huge.builder.graph_for(ops.sum(huge)), "", {"x": ONE}, data=None, batches=(),
                                optimizer="sgd", lr=0.1, momentum=0.0, beta1=None, beta2=None, eps=None, steps=5,
                                target_loss=None, report_every=1)
    cases.append(("terabyte loss", terabyte))
    return cases


def _drain_optimize(stub: ChainruleStub, request: pb.OptimizeRequest, timeout: float) -> tuple[str, str]:
    try:
        for _ in stub.Optimize(request, timeout=timeout):
            pass
        return "OK", ""
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or ""


def _stopped_run(run: Run, server: Server, client: Client, loss: Var, params: dict, data: dict, reason: str,
                 timeout: float | None) -> None:
    """A run of a billion steps cut by a time limit must return its parameters, marked stopped early."""
    call = lambda: client.optimize(loss, params, data, steps=10**9, lr=0.01, timeout=timeout)  # noqa: E731
    if timeout is None:
        code, detail, result = outcome(call)
        run.record(code, f"stopped by {reason}: {detail}")
    else:
        code, detail, result, _ = timed_call(run, server, timeout, call)
    if code != "OK" or not result.stopped_early or reason not in result.stop_reason:
        run.add_lost(1)
        early = None if result is None else (result.stopped_early, result.stop_reason)
        run.fail(f"optimize: a run stopped by {reason} returned {code} {detail[:120]} (stopped early: {early})")
        return
    run.note(f"stopped by {reason}: {result.steps} steps, reason {result.stop_reason!r}")
    _check_training(run, loss, params, data, result, f"run stopped by {reason}")


def _check_training(run: Run, loss: Var, params: dict, data: dict, result: Any, label: str) -> None:
    """The parameters after ``result.steps`` steps must be LocalClient's after as many."""
    with LocalClient() as local:
        expected = local.optimize(loss, params, data, steps=result.steps, lr=0.01, progress=False)
    same = all(np.array_equal(expected.params[k], result.params[k]) for k in expected.params)
    run.compared(same, f"{label}: parameters differ from LocalClient's after {result.steps} steps")


def _cancelled_run(run: Run, server: Server, client: Client, loss: Var, params: dict, data: dict) -> None:
    """Cancel a run from a callback after 1 s: the server's CPU after the cancel."""
    began = time.monotonic()
    cancelled_at: list[float] = []

    def callback(_: Any) -> None:
        if time.monotonic() - began > 1.0:
            cancelled_at.append(server.cpu())
            raise KeyboardInterrupt("cancel")  # any exception closes the stream, cancelling the call

    try:
        client.optimize(loss, params, data, steps=10**9, lr=0.01, callback=callback, progress=False, timeout=30)
        run.record("OK")
    except KeyboardInterrupt:
        run.record("CANCELLED", "cancelled by the client")
    except ChainruleRpcError as exc:
        run.record(exc.code.name, exc.message)
    if cancelled_at:
        after = wait_idle(server) - cancelled_at[0]
        run.cpu_after_deadline(after)
        run.note(f"cancelled run: {after:.2f} s of server CPU after the cancel")


def _sigterm_run(run: Run, loss: Var, params: dict, data: dict) -> None:
    """SIGTERM to the server during a run: the run must end with its parameters."""
    server = run.server()
    outcomes: list[tuple[str, str, Any]] = []

    def train() -> None:
        with Client(server.address) as client:
            outcomes.append(outcome(lambda: client.optimize(loss, params, data, steps=10**9, lr=0.01, timeout=60,
                                                            progress=False)))

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    time.sleep(1.5)
    server.process.send_signal(signal.SIGTERM)
    thread.join(30)
    try:
        exit_code: int | str = server.process.wait(20)
    except subprocess.TimeoutExpired:
        exit_code = "still running 20 s after SIGTERM"
    code, detail, result = outcomes[0] if outcomes else ("NO ANSWER", "", None)
    run.record(code, f"SIGTERM: {detail}")
    run.note(f"SIGTERM mid-run: {code}, server exit code {exit_code}"
             + (f", {result.steps} steps, reason {result.stop_reason!r}" if result is not None else ""))
    if result is None or not result.stopped_early:
        run.add_lost(1)
        run.fail(f"optimize: SIGTERM mid-run lost the run: {code} {detail[:120]}")
    else:
        _check_training(run, loss, params, data, result, "run stopped by SIGTERM")


def replica_kill(run: Run) -> None:
    """Issue 14.7: three replicas behind round_robin, one SIGKILLed mid-run: calls lost?"""
    servers = [run.server() for _ in range(3)]
    heavy, light = _replica_graphs()
    rng = np.random.default_rng(0)
    # (graph, input): 320 KiB and 2.5 MiB requests through the heavy graph, 8 and 32 MiB through the light one
    work = [(heavy, rng.standard_normal(n)) for n in (40_960, 327_680)]
    work += [(light, rng.standard_normal(n)) for n in (1_048_576, 4_194_304)]
    stop = threading.Event()
    lost: list[str] = []

    def caller(first: int) -> None:
        with Client([s.address for s in servers], timeout=30) as client:
            k = first
            while not stop.is_set():
                k = (k + 1) % len(work)
                target, x = work[k]
                code, detail = evaluate_checked(run, client, f"replicas {target.name} x[{x.size}]", target,
                                                {"x": x}, 30, grads=["x"])
                if code != "OK":
                    lost.append(f"{code} ({x.nbytes >> 10} KiB request): {detail[:120]}")

    threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(6)]
    for thread in threads:
        thread.start()
    time.sleep(2.0 if run.quick else 5.0)
    at_kill = run.requests
    servers[1].kill()
    time.sleep(3.0 if run.quick else 8.0)
    stop.set()
    for thread in threads:
        thread.join(60)
    run.note(f"{at_kill} calls before the SIGKILL, {run.requests - at_kill} after")
    run.add_lost(len(lost))
    if lost:
        run.note(f"lost: {lost[:3]}")


def _replica_graphs() -> tuple[Var, Var]:
    """Tens of milliseconds of work per call (so calls are in flight when the kill comes), and x.x."""
    g = GraphBuilder()
    x = g.input("x", (-1,))
    y = x
    for _ in range(4):
        y = ops.tanh(y) * 0.9 + y * 0.1
    heavy = ops.sum(y * x).named("heavy")
    g = GraphBuilder()
    x = g.input("x", (-1,))
    return heavy, ops.sum(x * x).named("light")


def worker_kill(run: Run) -> None:
    """Issue 14.7: --workers 2, one worker SIGKILLed: restarted while the other keeps serving?"""
    server = run.server("--workers", "2")
    before = _worker_pids(server, 2, 20)
    if len(before) < 2:
        run.fail(f"workers: found {len(before)} serving workers, not 2")
        return
    victim, survivor = sorted(before)
    target, feeds = small_graph()
    stop = threading.Event()
    lost: list[str] = []

    def caller(fresh: bool) -> None:
        steady = None if fresh else Client(server.address, timeout=10)
        while not stop.is_set():
            client = Client(server.address, timeout=10, options=[("grpc.use_local_subchannel_pool", 1)]) \
                if fresh else steady
            code, detail = evaluate_checked(run, client, "small graph", target, feeds, 10)
            if code != "OK":
                lost.append(f"{code}: {detail[:120]}")
            if fresh:
                client.close()
        if steady is not None:
            steady.close()

    threads = [threading.Thread(target=caller, args=(fresh,), daemon=True) for fresh in (False, False, True, True)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    os.kill(victim, signal.SIGKILL)
    killed_at, killed_time = run.requests, time.monotonic()
    replacement = None
    while replacement is None and time.monotonic() - killed_time < 20:
        time.sleep(0.2)
        replacement = next((p for p in _worker_pids(server, 2, 2) if p not in before), None)
    restarted_in = time.monotonic() - killed_time
    time.sleep(1.0)
    stop.set()
    for thread in threads:
        thread.join(30)
    run.add_lost(len(lost))
    run.note(f"worker pid {victim} killed; {run.requests - killed_at} calls answered after; replacement "
             f"{replacement} after {restarted_in:.1f} s; parent alive {alive(server.pid)}, other worker alive "
             f"{alive(survivor)}")
    if lost:
        run.note(f"lost: {lost[:3]}")
    if replacement is None or not alive(server.pid) or not alive(survivor):
        run.fail(f"workers: killed worker not restarted (replacement {replacement}, parent alive "
                 f"{alive(server.pid)}, survivor alive {alive(survivor)}); log: {server.log()[-300:]!r}")


def _worker_pids(server: Server, count: int, seconds: float) -> list[int]:
    """Pids that answer ServerInfo over fresh connections (the kernel picks a worker)."""
    found: set[int] = set()
    ends = time.monotonic() + seconds
    while len(found) < count and time.monotonic() < ends:
        with Client(server.address, timeout=5, options=[("grpc.use_local_subchannel_pool", 1)]) as client:
            code, _, info = outcome(client.server_info)
        if code == "OK":
            found.add(info.pid)
    return sorted(found)


def busy_port(run: Run) -> None:
    """Issue 14.8: a second serve on a port already in use must refuse with one line."""
    for first_flags in ((), ("--workers", "2")):
        first = run.server(*first_flags)
        for second_flags in ((), ("--workers", "2")):
            _second_serve(run, first, first_flags, second_flags)
        owners = set()
        for _ in range(10):  # fresh connections: the kernel would hand some to a second server sharing the port
            with Client(first.address, timeout=5, options=[("grpc.use_local_subchannel_pool", 1)]) as fresh:
                code, detail, info = outcome(fresh.server_info)
            run.record(code, detail)
            if code == "OK":
                owners.add(info.pid)
        strangers = [p for p in owners if p != first.pid and p not in children_of(first.pid)]
        if strangers:
            run.fail(f"busy port: calls to the first server were answered by other processes {strangers}")


def _second_serve(run: Run, first: Server, first_flags: tuple, second_flags: tuple) -> None:
    command = [sys.executable, "-m", "chainrule.server.cli", "serve", "--port", str(first.port),
               "--log-level", "WARNING", *second_flags]
    label = f"second serve{' --workers 2' if second_flags else ''} on the port of serve" \
            f"{' --workers 2' if first_flags else ''}"
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        run.record("STARTED", label)
        run.fail(f"busy port: {label} started and kept running: {out.strip()[:120]!r}")
        return
    lines = err.strip().splitlines()
    run.record(f"exit {process.returncode}", f"{label}: {err.strip()[:200]}")
    run.note(f"{label}: exit {process.returncode}, stderr {lines!r:.200}")
    if process.returncode == 0 or "listening" in out or len(lines) != 1:
        run.fail(f"busy port: {label}: exit {process.returncode}, {len(lines)} stderr lines, stdout {out[:80]!r}")


def int_overflow(run: Run) -> None:
    """Issue 14.9: integer overflow must be refused or flagged in diagnostics."""
    server = run.server()
    i32 = np.iinfo(np.int32)
    cases: list[tuple[str, Callable[[GraphBuilder], Var], dict[str, Any], bool]] = [
        ("sum [max, max]", lambda g: ops.sum(g.input("a", (2,), "int64")), {"a": np.array([I64.max, I64.max])}, True),
        ("3 ** 63", lambda g: ops.pow(g.input("a", (), "int64"), g.input("b", (), "int64")),
         {"a": np.int64(3), "b": np.int64(63)}, True),
        ("max + 1", lambda g: g.input("a", (1,), "int64") + g.input("b", (1,), "int64"),
         {"a": np.array([I64.max]), "b": np.array([1])}, True),
        ("2**62 * 4", lambda g: g.input("a", (1,), "int64") * g.input("b", (1,), "int64"),
         {"a": np.array([2**62]), "b": np.array([4])}, True),
        ("-min", lambda g: ops.neg(g.input("a", (1,), "int64")), {"a": np.array([I64.min])}, True),
        ("cumsum [max, 1]", lambda g: ops.cumsum(g.input("a", (2,), "int64"), 0), {"a": np.array([I64.max, 1])}, True),
        ("prod 3 x 40", lambda g: ops.prod(g.input("a", (40,), "int64")), {"a": np.full(40, 3)}, True),
        ("int32 max + 1", lambda g: g.input("a", (1,), "int32") + g.input("b", (1,), "int32"),
         {"a": np.array([i32.max], np.int32), "b": np.array([1], np.int32)}, True),
        ("sum [max, -1] (fits)", lambda g: ops.sum(g.input("a", (2,), "int64")), {"a": np.array([I64.max, -1])},
         False),
    ]
    with Client(server.address, timeout=10) as client:
        for label, build, feeds, overflows in cases:
            target = build(GraphBuilder())
            code, detail, result = outcome(lambda: client.evaluate(target, feeds, grads="none"))
            run.record(code, f"{label}: {detail}")
            if code == "OK":
                run.check(Probe(label, target, feeds, {"grads": "none"}), result)
                flagged = bool(result.diagnostics and result.diagnostics.flags)
                run.note(f"{label}: OK, value {result.value.tolist()}, flags {flagged}")
                if overflows and not flagged:
                    run.fail(f"overflow: {label} answered {result.value.tolist()} with no diagnostic")
            elif not overflows or code not in ("INVALID_ARGUMENT", "OUT_OF_RANGE"):
                run.fail(f"overflow: {label} got {code}: {detail[:120]}")


def shared_memory(run: Run) -> None:
    """Hostile shared-memory references and output files, a file truncated while read, good calls compared."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    directory = tempfile.mkdtemp(prefix="chainrule-scenario-", dir=base)
    try:
        server = run.server("--shared-memory-dir", directory)
        _good_shared_calls(run, server)
        _hostile_references(run, server, directory)
        _truncation_race(run, server, directory)
        if server.process.poll() is not None:
            run.fail(f"shared memory: the server died (exit {server.process.returncode})")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _shm_name(suffix: str) -> str:
    return f"chainrule-{os.urandom(16).hex()}-{suffix}"


def _network() -> tuple[Var, Var, Var]:
    g = GraphBuilder()
    x, w = g.input("x", (-1, 40)), g.input("w", (40, 500))
    return ((x @ w).tanh(name="h") * 0.5).sum(name="f"), x, w


def _good_shared_calls(run: Run, server: Server) -> None:
    f, _, _ = _network()
    rng = np.random.default_rng(3)
    with Client(server.address, shared_memory=True, timeout=30) as client:
        for k, rows in enumerate((300, 2000, 20_000) * (1 if run.quick else 5)):
            feeds = {"x": rng.standard_normal((rows, 40)), "w": rng.standard_normal((40, 500))}
            evaluate_checked(run, client, f"shared memory {rows} rows #{k}", f, feeds, 30)


def _hostile_references(run: Run, server: Server, directory: str) -> None:
    f, _, _ = _network()
    rows = 300
    X = np.random.default_rng(4).standard_normal((rows, 40))
    whole, short, sparse = _shm_name("in"), _shm_name("in"), _shm_name("in")
    Path(directory, whole).write_bytes(X.tobytes())
    Path(directory, short).write_bytes(X.tobytes()[:1000])
    with open(Path(directory, sparse), "wb") as handle:
        handle.truncate(2 << 30)  # sparse: costs nothing until read
    link, fifo = _shm_name("in"), _shm_name("in")
    os.symlink(Path(directory, whole), Path(directory, link))
    os.mkfifo(Path(directory, fifo))
    n = X.nbytes
    references = [("../../etc/passwd", 0, n), ("chainrule-00-in", 0, n), (_shm_name("in"), 0, n), (short, 0, n),
                  (whole, 8, n), (whole, 2**64 - 8, n), (whole, 0, n - 8), (link, 0, n), (fifo, 0, n),
                  (sparse, 0, 2 << 30), (sparse, (2 << 30) - 8, 8)]
    W = np.random.default_rng(5).standard_normal((40, 500))
    with grpc.insecure_channel(server.address) as channel:
        stub = ChainruleStub(channel)
        for name, offset, length in references:
            rows_of = max(1, length // (40 * 8))
            request = request_of(f, {"x": np.zeros((1, 40)), "w": W})
            tensor = pb.Tensor(dtype=pb.FLOAT64, shape=[rows_of, 40],
                               shared_memory=pb.SharedMemoryRef(file=name, offset=offset, byte_length=length))
            request.inputs["x"].CopyFrom(tensor)
            code, detail, answer = outcome(lambda: stub.Evaluate(request, timeout=10))
            run.record(code, f"reference {name[:24]}@{offset}+{length}: {detail}")
            if code in ("INTERNAL", "UNKNOWN", "DEADLINE_EXCEEDED", "UNAVAILABLE"):
                run.fail(f"shared memory: reference {name[:30]}@{offset}+{length} got {code}: {detail[:120]}")
        for name in ("../x", _shm_name("out"), fifo, link, "chainrule-00-out"):
            request = request_of(f, {"x": X, "w": W}, grads="all")
            request.shared_memory_output = name
            code, detail, _ = outcome(lambda: stub.Evaluate(request, timeout=10))
            run.record(code, f"output file {name[:24]}: {detail}")
            if code in ("INTERNAL", "UNKNOWN", "DEADLINE_EXCEEDED", "UNAVAILABLE"):
                run.fail(f"shared memory: output file {name[:30]} got {code}: {detail[:120]}")


def _truncation_race(run: Run, server: Server, directory: str) -> None:
    """A file shrunk and regrown while the server reads it: errors, never a crash or a wrong answer."""
    f, _, _ = _network()
    rows = 20_000
    X = np.random.default_rng(6).standard_normal((rows, 40))
    W = np.random.default_rng(7).standard_normal((40, 500))
    name = _shm_name("in")
    path = Path(directory, name)
    path.write_bytes(X.tobytes())
    stop = threading.Event()

    def vandal() -> None:
        while not stop.is_set():
            with open(path, "r+b") as handle:
                handle.truncate(4096)
                handle.seek(0, 2)
                handle.write(X.tobytes()[4096:])

    thread = threading.Thread(target=vandal, daemon=True)
    thread.start()
    request = request_of(f, {"x": np.zeros((1, 40)), "w": W})
    request.inputs["x"].CopyFrom(pb.Tensor(dtype=pb.FLOAT64, shape=[rows, 40],
                                           shared_memory=pb.SharedMemoryRef(file=name, byte_length=X.nbytes)))
    whole = request_of(f, {"x": X, "w": W})
    with grpc.insecure_channel(server.address) as channel:
        stub = ChainruleStub(channel)
        for _ in range(10 if run.quick else 60):
            code, detail, answer = outcome(lambda: stub.Evaluate(request, timeout=10))
            run.record(code, f"truncated file: {detail}")
            if code == "OK":  # read whole between two truncations, or a torn read: compare
                run.check(Probe("file read while truncated", request=whole), Result(answer))
    stop.set()
    thread.join(5)


#: Rules whose vjp may need temporaries, each applied to b, a [rows, cols] tensor (x broadcast, times scale).
LARGE_RULES: dict[str, Callable[[Var, int], Var]] = {
    "tanh": lambda b, cols: ops.tanh(b),
    "exp": lambda b, cols: ops.exp(b * 0.001),
    "softmax": lambda b, cols: ops.softmax(b, axis=1),
    "log_softmax": lambda b, cols: ops.log_softmax(b, axis=1),
    "logsumexp": lambda b, cols: ops.logsumexp(b, axis=1),
    "pow": lambda b, cols: ops.pow(b, 3.0),
    "div": lambda b, cols: b / (b + 2.0),
    "cumsum": lambda b, cols: ops.cumsum(b, 1),
    "mse": lambda b, cols: ops.mse(b, b * 0.5),
    "var": lambda b, cols: ops.var(b, axis=1),
    "max": lambda b, cols: ops.max(b, 1),
    "concat": lambda b, cols: ops.concat([b, b], axis=0),
    "prod": lambda b, cols: ops.prod(b * 0.0 + 1.0, axis=1),
    # b @ w, w a [cols, 8] broadcast: the gradient of b is a [rows, cols] product
    "matmul": lambda b, cols: ops.matmul(b, ops.broadcast_to(b.builder["x"], [cols, 8])),
}


def _large_graph(rule: str, rows: int, cols: int) -> Var:
    g = GraphBuilder()
    b = ops.broadcast_to(g.input("x", (1,)), [rows, cols]) * g.input("scale")
    return ops.sum(LARGE_RULES[rule](b, cols)).named("loss")


def large_shapes(run: Run) -> None:
    """Legal-but-large shapes: for each rule the largest shape the budget admits (from the top down),
    so its vjp's temporaries and a response of hundreds of MiB are reached; then three such calls at once."""
    server = run.server()
    rows = 4000
    widths = (3000, 2000, 1000) if run.quick else (6000, 5000, 4000, 3000, 2000)
    rules = ("tanh", "softmax", "matmul") if run.quick else tuple(LARGE_RULES)
    feeds = {"x": np.array([0.5]), "scale": 0.25}
    admitted: dict[str, int] = {}
    with Client(server.address, timeout=120) as client:
        for rule in rules:
            if run.left() < 30:
                run.note(f"stopped before {rule} (time bound)")
                break
            for cols in widths:
                loss = _large_graph(rule, rows, cols)
                run.sampler.open_window(server)
                began = time.monotonic()
                code, detail = evaluate_checked(run, client, f"{rule} on [{rows}, {cols}]", loss, feeds, 120)
                if code != "RESOURCE_EXHAUSTED":
                    admitted[rule] = cols
                    peak = run.sampler.window_peak(server)
                    over = " (over budget + 256 MiB)" if peak > BUDGET + SLACK else ""
                    run.note(f"{rule} [{rows}, {cols}]: {code} in {time.monotonic() - began:.1f} s, "
                             f"peak {peak / MiB:.0f} MiB{over}")
                    break
    if "tanh" in admitted:
        _concurrent_large(run, server, rows, admitted["tanh"])


def _concurrent_large(run: Run, server: Server, rows: int, cols: int) -> None:
    """Three calls at once of a size the budget admits for one: is the budget per process, or per call?"""
    loss = _large_graph("tanh", rows, cols)
    feeds = {"x": np.array([0.5]), "scale": 0.25}
    run.sampler.open_window(server)

    def one(k: int) -> None:
        with Client(server.address, timeout=120) as client:
            evaluate_checked(run, client, f"tanh on [{rows}, {cols}]", loss, feeds, 120)

    threads = [threading.Thread(target=one, args=(k,), daemon=True) for k in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(150)
    run.note(f"3 concurrent tanh [{rows}, {cols}]: peak {run.sampler.window_peak(server) / MiB:.0f} MiB")


def slow_readers(run: Run) -> None:
    """Streams whose client never reads its large answers: does the server hold them all?"""
    server = run.server()
    count = 8 if run.quick else 16
    elements = 4 * MiB if run.quick else 8 * MiB  # 32 or 64 MiB answers
    g = GraphBuilder()
    c = (ops.broadcast_to(g.input("x", (1,)), [elements]) * 1.5).named("c")
    total = ops.sum(c).named("s")
    request = request_of(total, {"x": ONE}, grads=["c"])
    release = run.release_event()

    def items() -> Iterator[pb.EvaluateRequest]:
        yield request
        yield request
        release.wait()

    target, feeds = small_graph()
    with grpc.insecure_channel(server.address, options=[("grpc.max_receive_message_length", -1)]) as channel, \
            Client(server.address, timeout=5) as client:
        stub = ChainruleStub(channel)
        health = health_stub(channel)
        evaluate = lambda: client.evaluate(target, feeds)  # noqa: E731
        check = lambda r: run.check(Probe("small graph", target, feeds), r)  # noqa: E731
        base = (latencies(run, lambda: health(5), 100, "health"), latencies(run, evaluate, 100, "evaluate", check))
        run.sampler.open_window(server)
        calls = [stub.EvaluateStream(items(), timeout=60) for _ in range(count)]
        time.sleep(4.0)
        during = (latencies(run, lambda: health(5), 100, "health"), latencies(run, evaluate, 100, "evaluate", check))
        for label, before, now in zip(("health", "Evaluate"), base, during):  # not idle: they asked for work
            judge_latency(run, label, before, now, f"{count} streams not reading {elements * 8 // MiB} MiB answers",
                          allowed_ms=1000)
        time.sleep(2.0)
        peak = run.sampler.window_peak(server)
        for call in calls:
            call.cancel()
            run.record("CANCELLED", "slow reader cancelled by the client")
        run.note(f"{count} slow readers of {elements * 8 // MiB} MiB answers: server peak {peak / MiB:.0f} MiB")


def hostile_evaluate(run: Run) -> None:
    """The fuzz campaign's families against Evaluate at a 1 GiB budget, every OK answer compared."""
    server = run.server()
    requests = hostile_requests(200 if run.quick else 1000, 1414, 5000)
    leaks = ("Traceback", 'File "', "Exception calling application", "Exception deserializing")
    with grpc.insecure_channel(server.address) as channel:
        call = raw_unary(channel)
        for k, request in enumerate(requests):
            if run.left() < 10:
                run.note(f"stopped after {k} requests (time bound)")
                break
            code, detail, answer = outcome(lambda: call(request.SerializeToString(), timeout=10))
            run.record(code, detail)
            if code == "OK" and (request.HasField("graph")):
                run.check(Probe(f"hostile request {k}", request=request),
                          Result(pb.EvaluateResponse.FromString(answer)))
            if code in ("INTERNAL", "UNKNOWN", "DEADLINE_EXCEEDED", "UNAVAILABLE") or any(s in detail for s in leaks):
                run.fail(f"hostile: request {k} got {code}: {detail[:160]}")
        for _ in range(50):
            data = os.urandom(int.from_bytes(os.urandom(1), "big"))
            code, detail, _ = outcome(lambda: call(data, timeout=10))
            run.record(code, detail)
    if server.process.poll() is not None:
        run.fail(f"hostile: the server died (exit {server.process.returncode})")


#: name -> (scenario, time bound in seconds, quick time bound)
SCENARIOS: dict[str, tuple[Callable[[Run], None], float, float]] = {
    "vjp-temporaries": (vjp_temporaries, 60, 30),
    "response-size": (response_size, 60, 30),
    "plan-cache": (plan_cache, 110, 40),
    "deadline-cpu": (deadline_cpu, 150, 60),
    "idle-streams": (idle_streams, 60, 50),
    "auth-header-only": (auth_header_only, 45, 30),
    "stream-items": (stream_items, 60, 30),
    "optimize": (optimize_runs, 60, 45),
    "replica-kill": (replica_kill, 40, 30),
    "worker-kill": (worker_kill, 45, 40),
    "busy-port": (busy_port, 45, 45),
    "int-overflow": (int_overflow, 20, 20),
    "shared-memory": (shared_memory, 40, 25),
    "large-shapes": (large_shapes, 120, 45),
    "slow-readers": (slow_readers, 40, 30),
    "hostile-evaluate": (hostile_evaluate, 60, 25),
}


# --- report -------------------------------------------------------------------------------------

def run_scenario(name: str, quick: bool, sampler: RssSampler) -> Row:
    scenario, seconds, quick_seconds = SCENARIOS[name]
    run = Run(name, quick, sampler, quick_seconds if quick else seconds)
    try:
        scenario(run)
    except Exception as exc:  # noqa: BLE001 - the scenario's own failure is a finding too
        run.fail(f"scenario error: {type(exc).__name__}: {str(exc)[:300]}")
    return run.close()


def _cell(value: Any) -> str:
    return "–" if value is None else str(value)


def table(rows: list[Row]) -> str:
    head = ("| scenario | requests | codes | wrong | peak RSS MiB (over budget) | CPU after deadline s | lost "
            "| verdict |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for row in rows:
        codes = ", ".join(f"{k} {v}" for k, v in row.codes.items())
        rss = "–" if row.peak_rss_mib is None else f"{row.peak_rss_mib:.0f} ({row.over_budget_mib:+.0f})"
        lines.append(f"| {row.scenario} | {row.requests} | {codes} | {_cell(row.wrong)} | {rss} | "
                     f"{_cell(row.cpu_after_deadline_s)} | {_cell(row.lost)} | {row.verdict} |")
    return "\n".join(lines)


def print_details(row: Row) -> None:
    print(f"\n## {row.scenario} ({row.seconds} s): {row.verdict}", flush=True)
    for failure in row.failures:
        print(f"  FAIL  {failure}")
    for note in row.notes:
        print(f"  note  {note}")


def tree_state() -> str:
    """The commit the servers ran, and whether the working tree differed from it."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = [line for line in git("status", "--porcelain", "--untracked-files=no").splitlines() if line]
    return f"commit {commit}" + (f" with {len(changed)} files changed" if changed else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (about 2 minutes)")
    parser.add_argument("--only", action="append", choices=sorted(SCENARIOS), metavar="NAME",
                        help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}")
    parser.add_argument("--json", nargs="?", const="-", metavar="PATH",
                        help="write the rows as JSON to PATH (default: stdout)")
    args = parser.parse_args(argv)
    print(f"chainrule scenarios on {tree_state()}, {os.cpu_count()} cores{', quick' if args.quick else ''}",
          flush=True)
    sampler = RssSampler()
    sampler.start()
    rows = []
    began = time.monotonic()
    for name in args.only or list(SCENARIOS):
        row = run_scenario(name, args.quick, sampler)
        rows.append(row)
        print_details(row)
    sampler.stop()
    print(f"\nRSS sampled {sampler.samples} times, longest gap between samples {sampler.max_gap * 1000:.0f} ms; "
          f"{time.monotonic() - began:.0f} s in all; budget {BUDGET >> 20} MiB (+256 MiB allowed)\n")
    print(table(rows))
    if args.json:
        text = json.dumps([asdict(row) for row in rows], indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0 if all(not row.failures for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
