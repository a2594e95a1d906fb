"""The user's path, side by side: LocalClient and Client against hand-written code and peers, in one run.

    python benchmarks/user_bench.py            # every case (a few minutes)
    python benchmarks/user_bench.py --quick    # fewer repeats
    python benchmarks/user_bench.py --profile  # also cProfile of LocalClient.evaluate (scalar chain, small MLP)
    python benchmarks/user_bench.py --only small-network   # one section (chain, small-network,
                                                           # large-network, elementwise-1e6, elementwise-1e7)

Three workloads, each through ``LocalClient().evaluate`` (in this process) and
``Client(address).evaluate`` (to ``chainrule serve --host 127.0.0.1 --port 0``,
default settings, a process of its own), next to a hand-written forward +
backward (core_bench.py's) and, when installed, PyTorch and micrograd:

(a) scalar chain of N ops (x + a, x * b, tanh, repeated), N = 1,000 and 10,000:
    microseconds per op, against core_bench's pure-Python tape;
(b) the 4-layer sigmoid network with squared error (core_bench's), small
    (batch 32, 4-4-4-1) and large (batch 4096, 512 features and hidden), against
    core_bench's hand-written numpy; the small call over gRPC also against a bare
    grpcio echo server (its own process) moving the call's own request and
    response byte sizes (the request by graph id, as every call after the first);
(c) sum(sigmoid(a * b + c)) at 10^6 and 10^7 elements, against core_bench's
    hand-written numpy (and, for reference, an in-place numpy variant).

Calls are written as a user writes them: timed calls are
``client.evaluate(f, inputs, grads=[...], diagnostics=False)`` with every other
argument left at its default (so ``values="none"``: the output's value and
the gradients named); the "works" rows are
``client.evaluate(f, inputs)`` with every default. A call that fails shows as
"fails: <first line of the error>" in its row. Times are medians of calls timed
in turn (a, b, a, b...) after two warm-up calls (the first call of a graph
compiles it). The "others" column gives the CPUs that other processes of the
machine kept busy meanwhile: on a shared two-core machine, read a row measured
beside a running test suite with care. LocalClient and the hand-written
references run in this process with the C library's default allocator, the
server with the one `chainrule serve` tunes (server/memory.py): at 10^7
elements, fresh pages for each temporary weigh on both sides of the ratio.
micrograd (PyPI) has no tanh: the chain adds one in micrograd's own style.
Not a test: run on demand, never in CI.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import math
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import grpc
import numpy as np

from chainrule.client import Client, GraphBuilder, ops
from chainrule.server import LocalClient
from chainrule.v1 import chainrule_pb2 as pb

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_bench import serve_echo  # noqa: E402
from core_bench import (  # noqa: E402
    chain_pure_python, chain_torch, elementwise_numpy, network_inputs, network_numpy, network_torch,
)

try:
    import torch
except ImportError:  # the PyTorch columns are skipped
    torch = None
try:
    from micrograd.engine import Value as MicrogradValue
except ImportError:  # the micrograd column is skipped
    MicrogradValue = None

PARAMS = ["W1", "b1", "W2", "b2", "W3", "b3"]


# --- timing -------------------------------------------------------------------------------------

def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


def timed_in_turn(repeats: int, cases: dict[Any, Callable[[], Any]], *, warmup: int = 2,
                  settle: float = 0.0) -> tuple[dict[Any, list[float]], dict[Any, str]]:
    """Seconds of each call of each case, the cases timed in turn so that the machine's drifts hit every
    case alike; and the cases whose call raised, with "fails: <first line>" (not timed on).

    ``settle`` seconds pass before each call: BLAS threads keep spinning for a while after a
    matrix product, and would otherwise slow whichever process computes next.
    """
    failed: dict[Any, str] = {}
    alive: dict[Any, Callable[[], Any]] = {}
    for name, fn in cases.items():
        try:
            for _ in range(warmup):
                fn()
            alive[name] = fn
        except Exception as exc:  # noqa: BLE001 (reported in the table)
            failed[name] = "fails: " + first_line(exc)
    times: dict[Any, list[float]] = {name: [] for name in alive}
    for _ in range(repeats):
        for name, fn in list(alive.items()):
            time.sleep(settle)
            start = time.perf_counter()
            try:
                fn()
            except Exception as exc:  # noqa: BLE001
                failed[name] = "fails: " + first_line(exc)
                del alive[name]
                del times[name]
                continue
            times[name].append(time.perf_counter() - start)
    return times, failed


def medians(repeats: int, cases: dict[str, Callable[[], Any]], *, warmup: int = 2,
            settle: float = 0.0) -> dict[str, float | str]:
    """Median seconds per call of each case (timed_in_turn); "fails: <first line>" for a case that raised."""
    times, failed = timed_in_turn(repeats, cases, warmup=warmup, settle=settle)
    return {name: failed[name] if name in failed else statistics.median(times[name]) for name in cases}


def once(fn: Callable[[], Any]) -> float | str:
    """Seconds of one call, or "fails: ..."."""
    try:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001
        return "fails: " + first_line(exc)


# --- the table ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    text: str
    met: Callable[[float, float], bool] | None  # (reference, ours) in the row's unit -> met
    absolute: bool = False  # met without a reference

    @staticmethod
    def at_most(limit: float, unit: str) -> "Target":
        return Target(f"<= {limit:g} {unit}", lambda ref, ours: ours <= limit, absolute=True)

    @staticmethod
    def ratio(limit: float, of: str = "") -> "Target":
        return Target(f"<= {limit:g}x{' ' + of if of else ''}", lambda ref, ours: ours <= limit * ref)

    @staticmethod
    def plus(ms: float, of: str) -> "Target":
        return Target(f"<= {of} + {ms:g} ms", lambda ref, ours: ours <= ref + ms)

    @staticmethod
    def works() -> "Target":
        return Target("works", lambda ref, ours: True, absolute=True)


NO_TARGET = Target("-", None)


@dataclass
class Row:
    workload: str
    size: str
    unit: str
    ref_name: str
    ref: float | str
    name: str
    ours: float | str
    target: Target = NO_TARGET
    others: float | None = None  # CPUs other processes kept busy meanwhile (see OthersMeter)


def scaled(value: float | str, factor: float) -> float | str:
    return value * factor if isinstance(value, float) else value


def print_table(rows: list[Row]) -> None:
    """One line per row; a failed measurement shows "fails" in its value and the error at the end of its line."""
    header = (f"{'workload':<13} {'size':<18} {'unit':<5} {'reference':<25} {'ref':>9}  {'measured':<28} "
              f"{'value':>9} {'ratio':>6}  {'target':<20} {'met':<4} others")
    print(header)
    print("-" * len(header))
    for row in rows:
        ref = f"{row.ref:>9.3f}" if isinstance(row.ref, float) else "fails".rjust(9)
        failed = isinstance(row.ours, str)
        value = "fails".rjust(9) if failed else f"{row.ours:>9.3f}"
        ratio = f"{row.ours / row.ref:>6.2f}" if isinstance(row.ref, float) and not failed else "-".rjust(6)
        if row.target.met is None:
            met = "-"
        elif failed:
            met = "NO"
        elif isinstance(row.ref, float):
            met = "yes" if row.target.met(row.ref, row.ours) else "NO"
        else:
            met = ("yes" if row.target.met(math.nan, row.ours) else "NO") if row.target.absolute else "?"
        others = "-" if row.others is None else f"{row.others:.2f}"
        print(f"{row.workload:<13} {row.size:<18} {row.unit:<5} {row.ref_name:<25} {ref}  {row.name:<28} "
              f"{value} {ratio}  {row.target.text:<20} {met:<4} {others:>6}"
              + (f"  {row.ours}" if failed else "") + (f"  (reference {row.ref})" if isinstance(row.ref, str) else ""))


# --- processes: the chainrule server and a bare echo ----------------------------------------------

class Process:
    """A server process started with ``args``; its address is read from the line it prints."""

    started: list["Process"] = []  # every one, for the CPU time of this run (see OthersMeter)

    def __init__(self, args: list[str]) -> None:
        self.log = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.log, text=True)
        Process.started.append(self)
        self.address = ""
        for line in self.process.stdout:  # type: ignore[union-attr]
            if "listening on" in line:
                self.address = line.split("listening on")[1].split()[0]
                break
        if not self.address:
            raise RuntimeError(f"{' '.join(args)} did not start:\n{self.tail()}")
        # Keep reading what it prints, so that a full pipe never blocks it.
        threading.Thread(target=self.process.stdout.read, daemon=True).start()  # type: ignore[union-attr]

    def tail(self, lines: int = 5) -> str:
        self.log.seek(0)
        return "".join(self.log.readlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_chainrule() -> Process:
    """``chainrule serve --host 127.0.0.1 --port 0``, every other setting at its default."""
    script = Path(sys.executable).with_name("chainrule")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "chainrule.server.cli"]
    return Process([*command, "serve", "--host", "127.0.0.1", "--port", "0"])


ECHO_OPTIONS = [("grpc.max_receive_message_length", (1 << 31) - 1), ("grpc.max_send_message_length", (1 << 31) - 1)]


def raw_evaluate_request(f: Any, inputs: dict[str, Any], grads: list[str], graph_id: str) -> bytes:
    """The protobuf EvaluateRequest that ``client.evaluate(f, inputs, grads=grads, diagnostics=False)``
    sends once the client knows the graph's id (every call after the first), encoded by protobuf (the
    client's own encoding may add a few alignment bytes); the server's answer to it is the response
    that call receives."""
    from chainrule.wire.convert import array_to_tensor

    request = pb.EvaluateRequest(graph_id=graph_id, output=f.name, diagnostics=pb.DIAGNOSTICS_OFF,
                                 return_values=pb.Selection(mode=pb.Selection.NONE),
                                 return_grads=pb.Selection(mode=pb.Selection.LISTED, names=grads))
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(array_to_tensor(np.asarray(value, dtype=np.float64)))
    return request.SerializeToString()


# --- the workloads as a user writes them --------------------------------------------------------

def chain_target(n: int) -> tuple[Any, list[Any]]:
    g = GraphBuilder()
    x, a, b = g.input("x"), g.input("a"), g.input("b")
    v = x
    for i in range(n):
        v = v + a if i % 3 == 0 else v * b if i % 3 == 1 else v.tanh()
    return v.named("f"), [x, a, b]


def micrograd_tanh(v: Any) -> Any:
    """tanh for micrograd, whose PyPI engine has + * ** and relu only: written in its own style
    (a Value with a ``_backward`` closure, as its author's lecture adds it)."""
    out = MicrogradValue(math.tanh(v.data), (v,), "tanh")

    def _backward() -> None:
        v.grad += (1.0 - out.data * out.data) * out.grad

    out._backward = _backward
    return out


def chain_micrograd(n: int, x: float, a: float, b: float) -> tuple[float, float, float, float]:
    vx, va, vb = MicrogradValue(x), MicrogradValue(a), MicrogradValue(b)
    v = vx
    for i in range(n):
        v = v + va if i % 3 == 0 else v * vb if i % 3 == 1 else micrograd_tanh(v)
    v.backward()  # a recursive topological sort: needs a recursion limit above the chain's depth
    return v.data, vx.grad, va.grad, vb.grad


def network_target(batch: int, features: int, hidden: int) -> Any:
    g = GraphBuilder()
    X, T = g.input("X", shape=(batch, features)), g.input("T", shape=(batch, 1))
    W1, b1 = g.input("W1", shape=(features, hidden)), g.input("b1", shape=(hidden,))
    W2, b2 = g.input("W2", shape=(hidden, hidden)), g.input("b2", shape=(hidden,))
    W3, b3 = g.input("W3", shape=(hidden, 1)), g.input("b3", shape=(1,))
    h1 = (X @ W1 + b1).sigmoid()
    h2 = (h1 @ W2 + b2).sigmoid()
    y = (h2 @ W3 + b3).sigmoid()
    return ops.mse(y, T).named("C")


def elementwise_target(n: int) -> Any:
    g = GraphBuilder()
    a, b, c = (g.input(name, shape=(n,)) for name in "abc")
    return (a * b + c).sigmoid().sum().named("f")


def elementwise_numpy_inplace(a: np.ndarray, b: np.ndarray, c: np.ndarray):
    """core_bench's elementwise_numpy with the temporaries reused: two arrays besides the gradients."""
    s = np.multiply(a, b)
    s += c
    np.negative(s, out=s)
    np.exp(s, out=s)
    s += 1.0
    np.reciprocal(s, out=s)
    f = s.sum()
    du = np.subtract(1.0, s)
    du *= s
    return f, np.multiply(du, b), np.multiply(du, a), du


def elementwise_torch(vectors: dict[str, np.ndarray]) -> Callable[[], Any]:
    t = {k: torch.tensor(v, requires_grad=True) for k, v in vectors.items()}

    def step():
        for v in t.values():
            v.grad = None
        f = torch.sigmoid(t["a"] * t["b"] + t["c"]).sum()
        f.backward()
        return f

    return step


def checked(call: Callable[[], Any], check: Callable[[Any], None]) -> Callable[[], Any]:
    """``call``, whose first result is checked against the hand-written one (a wrong answer fails the row)."""
    state = {"checked": False}

    def run() -> Any:
        result = call()
        if not state["checked"]:
            check(result)
            state["checked"] = True
        return result

    return run


def close(actual: Any, expected: Any, what: str, rtol: float = 1e-9, atol: float = 1e-12) -> None:
    if not np.allclose(np.asarray(actual), np.asarray(expected), rtol=rtol, atol=atol):
        raise AssertionError(f"{what} differs from the hand-written result")


# --- (a) scalar chain ---------------------------------------------------------------------------

def bench_chain(rows: list[Row], local: LocalClient, remote: Client, repeats: int) -> None:
    x, a, b = 0.3, 0.1, 0.9
    for n in (1_000, 10_000):
        size = f"N={n:,}"
        f, leaves = chain_target(n)
        inputs = {"x": x, "a": a, "b": b}
        reference = chain_pure_python(n, x, a, b)

        def check(result: Any) -> None:
            close(result.value, reference[0], "value")
            for name, expected in zip("xab", reference[1:]):
                close(result.grad[name], expected, f"grad {name}")

        cases: dict[str, Callable[[], Any]] = {
            "hand": lambda: chain_pure_python(n, x, a, b),
            "local": checked(lambda: local.evaluate(f, inputs, grads=leaves, diagnostics=False), check),
            "remote": checked(lambda: remote.evaluate(f, inputs, grads=leaves, diagnostics=False), check),
        }
        def check_peer(result: tuple[float, ...]) -> None:
            close(result, reference, "value and gradients")

        if torch is not None:
            cases["torch"] = checked(lambda: chain_torch(n, x, a, b), check_peer)
        if MicrogradValue is not None:
            sys.setrecursionlimit(max(sys.getrecursionlimit(), 2 * n + 1000))
            cases["micrograd"] = checked(lambda: chain_micrograd(n, x, a, b), check_peer)
        t = {k: scaled(v, 1e6 / n) for k, v in medians(repeats, cases).items()}
        hand = "pure-Python tape"
        rows.append(Row("scalar chain", size, "us/op", hand, t["hand"], "LocalClient", t["local"],
                        Target.at_most(1.0, "us/op")))
        rows.append(Row("scalar chain", size, "us/op", hand, t["hand"], "Client (gRPC)", t["remote"],
                        Target.at_most(1.5, "us/op") if n == 10_000 else NO_TARGET))
        if "torch" in t:
            rows.append(Row("scalar chain", size, "us/op", hand, t["hand"], "PyTorch 0-d tensors (peer)", t["torch"]))
        if "micrograd" in t:
            rows.append(Row("scalar chain", size, "us/op", hand, t["hand"], "micrograd (peer)", t["micrograd"]))


# --- (b) 4-layer network --------------------------------------------------------------------------

def bench_small_network(rows: list[Row], local: LocalClient, remote: Client, repeats: int, latency_calls: int) -> None:
    size = "32x4-4-4-1"
    f = network_target(32, 4, 4)
    inputs = network_inputs(32, 4, 4)
    expected = network_numpy(**inputs)

    def check(result: Any) -> None:
        close(result.value, expected[0], "loss")
        for name, grad in zip(PARAMS, expected[1:]):
            close(result.grad[name], grad, f"grad {name}")

    cases: dict[str, Callable[[], Any]] = {
        "hand": lambda: network_numpy(**inputs),
        "local": checked(lambda: local.evaluate(f, inputs, grads=PARAMS, diagnostics=False), check),
    }
    if torch is not None:
        cases["torch"] = network_torch(inputs, PARAMS)
    t = {k: scaled(v, 1e3) for k, v in medians(repeats, cases).items()}
    rows.append(Row("4-layer MLP", size, "ms", "hand-written numpy", t["hand"], "LocalClient", t["local"],
                    Target.ratio(2.0)))
    if "torch" in t:
        rows.append(Row("4-layer MLP", size, "ms", "hand-written numpy", t["hand"], "PyTorch (peer)", t["torch"]))

    # Over gRPC: p50 against a bare echo of the call's own request and response sizes.
    remote_call = checked(lambda: remote.evaluate(f, inputs, grads=PARAMS, diagnostics=False), check)
    try:
        graph_id = remote_call().graph_id  # the client learns the graph's id: from now on, its calls send it
        request = raw_evaluate_request(f, inputs, PARAMS, graph_id)
        raw_call = grpc.insecure_channel(remote.address).unary_unary("/chainrule.v1.Chainrule/Evaluate")
        response = raw_call(request)
        pb.EvaluateResponse.FromString(response)  # a real answer, not an error page
    except Exception as exc:  # noqa: BLE001
        rows.append(Row("4-layer MLP", size, "ms", "bare echo", "sizes unknown", "Client (gRPC) p50",
                        "fails: " + first_line(exc), Target.plus(0.25, "echo")))
        return
    echo = Process([sys.executable, __file__, "--echo-server", str(len(request)), str(len(response))])
    try:
        echo_call = grpc.insecure_channel(echo.address, options=ECHO_OPTIONS).unary_unary("/bench.Echo/Echo")
        assert len(echo_call(request)) == len(response)
        t = {k: scaled(v, 1e3) for k, v in medians(latency_calls, {
            "echo": lambda: echo_call(request), "raw": lambda: raw_call(request), "remote": remote_call,
        }, warmup=50).items()}
    finally:
        echo.stop()
    echo_name = f"bare echo {len(request):,}+{len(response):,} B"
    rows.append(Row("4-layer MLP", size, "ms", echo_name, t["echo"], "Client (gRPC) p50", t["remote"],
                    Target.plus(0.25, "echo")))
    rows.append(Row("4-layer MLP", size, "ms", echo_name, t["echo"], "same request as bytes, p50", t["raw"]))


def bench_large_network(rows: list[Row], local: LocalClient, remote: Client, repeats: int) -> None:
    size = "4096x512-512-512-1"
    f = network_target(4096, 512, 512)
    inputs = network_inputs(4096, 512, 512)
    expected = network_numpy(**inputs)

    def check(result: Any) -> None:
        close(result.value, expected[0], "loss")
        close(result.grad["W1"], expected[1], "grad W1")

    cases: dict[str, Callable[[], Any]] = {
        "hand": lambda: network_numpy(**inputs),
        "local": checked(lambda: local.evaluate(f, inputs, grads=PARAMS, diagnostics=False), check),
        "remote": checked(lambda: remote.evaluate(f, inputs, grads=PARAMS, diagnostics=False), check),
    }
    if torch is not None:
        cases["torch"] = network_torch(inputs, PARAMS)
    t = {k: scaled(v, 1e3) for k, v in medians(repeats, cases, settle=0.3).items()}
    rows.append(Row("4-layer MLP", size, "ms", "hand-written numpy", t["hand"], "LocalClient", t["local"]))
    rows.append(Row("4-layer MLP", size, "ms", "LocalClient", t["local"], "Client (gRPC)", t["remote"],
                    Target.ratio(1.2, "LocalClient")))
    if "torch" in t:
        rows.append(Row("4-layer MLP", size, "ms", "hand-written numpy", t["hand"], "PyTorch (peer)", t["torch"]))
    # Every default: every value and every gradient, with diagnostics; one call each after a warm-up.
    default_local = once(lambda: local.evaluate(f, inputs))
    default_local = once(lambda: local.evaluate(f, inputs)) if isinstance(default_local, float) else default_local
    default_remote = once(lambda: remote.evaluate(f, inputs))
    default_remote = once(lambda: remote.evaluate(f, inputs)) if isinstance(default_remote, float) else default_remote
    rows.append(Row("4-layer MLP", size, "ms", "LocalClient, all defaults", scaled(default_local, 1e3),
                    "Client, all defaults", scaled(default_remote, 1e3), Target.works()))


# --- (c) elementwise --------------------------------------------------------------------------------

def bench_elementwise(rows: list[Row], local: LocalClient, remote: Client, repeats: int, n: int, target: float) -> None:
    size = f"1e{round(math.log10(n))} elements"
    f = elementwise_target(n)
    rng = np.random.default_rng(1)
    vectors = {name: rng.normal(size=n) for name in "abc"}
    expected = elementwise_numpy(**vectors)

    def check(result: Any) -> None:
        close(result.value, expected[0], "value", rtol=1e-12)
        for name, grad in zip("abc", expected[1:]):
            close(result.grad[name], grad, f"grad {name}", rtol=1e-12, atol=1e-15)

    cases: dict[str, Callable[[], Any]] = {
        "hand": lambda: elementwise_numpy(**vectors),
        "inplace": lambda: elementwise_numpy_inplace(**vectors),
        "local": checked(lambda: local.evaluate(f, vectors, grads=list("abc"), diagnostics=False), check),
        "remote": checked(lambda: remote.evaluate(f, vectors, grads=list("abc"), diagnostics=False), check),
    }
    if torch is not None:
        cases["torch"] = elementwise_torch(vectors)
    t = {k: scaled(v, 1e3) for k, v in medians(repeats, cases).items()}
    hand = "hand-written numpy"
    rows.append(Row("sigmoid sum", size, "ms", hand, t["hand"], "LocalClient", t["local"], Target.ratio(target)))
    rows.append(Row("sigmoid sum", size, "ms", hand, t["hand"], "in-place numpy (reference)", t["inplace"]))
    rows.append(Row("sigmoid sum", size, "ms", hand, t["hand"], "Client (gRPC)", t["remote"]))
    if "torch" in t:
        rows.append(Row("sigmoid sum", size, "ms", hand, t["hand"], "PyTorch (peer)", t["torch"]))
    default_local = once(lambda: local.evaluate(f, vectors))
    default_remote = once(lambda: remote.evaluate(f, vectors))
    default_remote = once(lambda: remote.evaluate(f, vectors)) if isinstance(default_remote, float) else default_remote
    rows.append(Row("sigmoid sum", size, "ms", "LocalClient, all defaults", scaled(default_local, 1e3),
                    "Client, all defaults", scaled(default_remote, 1e3), Target.works()))


# --- profiles -----------------------------------------------------------------------------------------

def profile(local: LocalClient, top: int) -> None:
    """cProfile of LocalClient.evaluate for the scalar chain (N=10,000) and the small network."""
    f, leaves = chain_target(10_000)
    chain_inputs = {"x": 0.3, "a": 0.1, "b": 0.9}
    small = network_target(32, 4, 4)
    small_inputs = network_inputs(32, 4, 4)
    for title, call, calls in (
        ("scalar chain N=10,000", lambda: local.evaluate(f, chain_inputs, grads=leaves, diagnostics=False), 10),
        ("4-layer MLP 32x4-4-4-1", lambda: local.evaluate(small, small_inputs, grads=PARAMS, diagnostics=False), 2000),
    ):
        try:
            call()
            call()
        except Exception as exc:  # noqa: BLE001
            print(f"\nprofile of LocalClient.evaluate, {title}: fails: {first_line(exc)}")
            continue
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(calls):
            call()
        profiler.disable()
        for order in ("tottime", "cumulative"):
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).strip_dirs().sort_stats(order).print_stats(top)
            text = out.getvalue()
            body = text[text.find("   ncalls"):] if "   ncalls" in text else text
            print(f"\nprofile of LocalClient.evaluate, {title}, {calls} calls, top {top} by {order}:")
            print(body.rstrip())


class OthersMeter:
    """How many CPUs other processes of the machine (test suites, other tenants) kept busy on
    average since the last reading: the CPU time of the whole machine (/proc/stat) less that of
    this run (this process and the servers it started). Linux only; elsewhere None."""

    def __init__(self) -> None:
        self.last = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as stat:
                fields = [int(v) for v in stat.readline().split()[1:]]
            tick = os.sysconf("SC_CLK_TCK")
            machine = (sum(fields[:8]) - fields[3] - fields[4]) / tick  # all but idle and iowait
            t = os.times()  # this process, and the children already ended (and waited for)
            ours = t.user + t.system + t.children_user + t.children_system
            for child in Process.started:
                if child.process.returncode is None:  # still running: its own counters
                    with open(f"/proc/{child.process.pid}/stat") as stat:
                        after_name = stat.read().rsplit(")", 1)[1].split()
                    ours += (int(after_name[11]) + int(after_name[12])) / tick  # utime, stime
            return time.perf_counter(), machine, ours
        except (OSError, ValueError, IndexError, AttributeError):
            return None

    def read(self) -> float | None:
        now = self._sample()
        last, self.last = self.last, now
        if now is None or last is None or now[0] <= last[0]:
            return None
        return max(0.0, (now[1] - last[1]) - (now[2] - last[2])) / (now[0] - last[0])


#: The sections of the table, in order; ``--only NAME`` runs some of them.
SECTIONS = ("chain", "small-network", "large-network", "elementwise-1e6", "elementwise-1e7")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--profile", action="store_true", help="also profile LocalClient.evaluate")
    parser.add_argument("--only", action="append", choices=SECTIONS, metavar="SECTION",
                        help=f"run only this section (again for several): {', '.join(SECTIONS)}")
    parser.add_argument("--echo-server", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server:
        request_bytes, response_bytes = args.echo_server
        return serve_echo({request_bytes: response_bytes})  # server_bench's bare echo, allocator tuned alike
    quick = args.quick
    rows: list[Row] = []
    server = start_chainrule()
    alive = False
    try:
        with LocalClient() as local, Client(server.address) as remote:
            meter, whole = OthersMeter(), OthersMeter()
            sections = {
                "chain": lambda: bench_chain(rows, local, remote, 3 if quick else 9),
                "small-network": lambda: bench_small_network(rows, local, remote, 100 if quick else 1000,
                                                             300 if quick else 2000),
                "large-network": lambda: bench_large_network(rows, local, remote, 3 if quick else 9),
                "elementwise-1e6": lambda: bench_elementwise(rows, local, remote, 3 if quick else 21, 1_000_000, 1.0),
                "elementwise-1e7": lambda: bench_elementwise(rows, local, remote, 2 if quick else 5, 10_000_000, 0.8),
            }
            for name, section in sections.items():
                if args.only and name not in args.only:
                    continue
                first = len(rows)
                meter.read()
                section()
                others = meter.read()
                for row in rows[first:]:
                    row.others = others
            others_overall = whole.read()
            alive = server.process.poll() is None
            print_table(rows)
            if args.profile:
                profile(local, 15)
    finally:
        server.stop()
    print(f"\nserver: chainrule serve --host 127.0.0.1 --port 0 (default settings), pid {server.process.pid}, "
          f"{'up to the end' if alive else 'DIED during the run; its last log lines:'}")
    if not alive:
        print(server.tail())
    print("calls: timed rows evaluate(f, inputs, grads=[x, a, b] | the 6 parameters | [a, b, c], diagnostics=False),\n"
          "       other arguments default (values='none'); 'all defaults' rows evaluate(f, inputs), one call after a\n"
          "       warm-up. Times: medians of interleaved calls after two warm-up calls; p50 rows: "
          f"{300 if quick else 2000} calls each.\n"
          f"peers: PyTorch {torch.__version__ if torch else 'not installed'}, "
          f"micrograd {'installed' if MicrogradValue else 'not installed'}; numpy {np.__version__}; "
          f"{os.cpu_count()} CPUs. 'others': CPUs that other processes of the machine kept busy on average while the\n"
          f"       row's workload ran ({'-' if others_overall is None else f'{others_overall:.2f}'} over the whole run); "
          "well above 0, they shared the CPUs and the times are less reliable.")


if __name__ == "__main__":
    main()
