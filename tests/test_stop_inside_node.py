"""Time is a promise inside one node (issue 14): a cancel or a deadline stops a large operator mid-way.

The engine checks the call's stop token between nodes; one node can hold seconds of work (a 3000 x
3000 product is one BLAS call of about a second). matmul (forward, its vjp, the vjp of an input that
was broadcast), conv, the pools and the slowest elementwise rules work in blocks of about 40 ms when
their work is large and check the token between them (plugins/builtin/common.py). These tests stop
a run while one such node computes and time the stop against the node's own unstopped duration,
measured first on this machine (the margins are wide: a 2-core machine shared with other work); they
check that the blocks give numpy's answers, that small calls make no checks, and that through a
real server a client's deadline stops the server's CPU.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from chainrule.client import Client, DeadlineExceeded, GraphBuilder, ops
from chainrule.core import GraphIR, StopToken, compile_graph, cost, evaluate
from chainrule.core.errors import CancelledError, DeadlineError
from chainrule.plugins.builtin import common, conv, linalg
from chainrule.plugins.manager import load_registry

from serving import ServerProcess

REGISTRY = load_registry(entry_points=False)
RNG = np.random.default_rng(14)


def _plan(inputs: list[tuple], nodes: list[tuple], output: str):
    return compile_graph(GraphIR.build(inputs, nodes, output), REGISTRY)


def _seconds(run: Callable[[], Any]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def _cancel_latency(delay: float, run: Callable[[StopToken], Any]) -> float:
    """Seconds from a cancel ``delay`` s into ``run(token)`` to the CancelledError that ends it. A run that
    finishes before its cancel (this machine is shared, and its speed varies) is run again, cancelled
    twice as early."""
    for _ in range(4):
        event = threading.Event()
        timer = threading.Timer(delay, event.set)
        started = time.perf_counter()
        timer.start()
        try:
            run(StopToken(None, event))
        except CancelledError:
            return time.perf_counter() - started - delay
        finally:
            timer.cancel()
        delay /= 2
    pytest.fail("the run finished before every cancel")


def _stopped_soon(latency: float, remaining: float) -> None:
    """Cancelled with ``remaining`` seconds of the node's work left (three quarters of it), the run ended
    within a third of that, plus 0.2 s (unstopped, it would have run all of it)."""
    assert latency < remaining / 3 + 0.2, f"stopped {latency:.2f} s after the cancel, with {remaining:.2f} s left"


# --- a cancel stops one large node ------------------------------------------------------------------

def test_a_cancel_stops_a_large_matmul_in_its_forward_pass():
    n = 3000  # 54 GFLOP: one BLAS call of 0.5-2 s here, unstoppable before
    plan = _plan([("a", "float64", (n, n)), ("b", "float64", (n, n))], [("m", "matmul", ("a", "b"))], "m")
    feed = {"a": RNG.standard_normal((n, n)), "b": RNG.standard_normal((n, n))}
    whole = _seconds(lambda: evaluate(plan, feed, gradients=False))
    latency = _cancel_latency(whole / 4, lambda token: evaluate(plan, feed, gradients=False, token=token))
    _stopped_soon(latency, whole * 3 / 4)


GRADIENT_GRAPHS = {
    # two plain matrices: g @ bᵀ and aᵀ @ g
    "matrices": ([("a", "float64", (2500, 2500)), ("b", "float64", (2500, 2500))],
                 [("m", "matmul", ("a", "b")), ("s", "sum", ("m",))],
                 lambda: {"a": RNG.standard_normal((2500, 2500)), "b": RNG.standard_normal((2500, 2500))}),
    # a batch times one matrix (a dense layer): b's gradient is one product with a long inner axis
    "dense layer": ([("a", "float64", (40, 250, 1000)), ("b", "float64", (1000, 1500))],
                    [("m", "matmul", ("a", "b")), ("s", "sum", ("m",))],
                    lambda: {"a": RNG.standard_normal((40, 250, 1000)), "b": RNG.standard_normal((1000, 1500))}),
    # issue 14's 167-byte graph: b's gradient sums over the axis it was broadcast along
    "broadcast": ([("x", "float64", (1,))],
                  [("a", "broadcast_to", ("x",), {"shape": [1500, 1, 1500]}),
                   ("b", "broadcast_to", ("x",), {"shape": [1, 1500, 1500]}),
                   ("m", "matmul", ("a", "b")), ("s", "sum", ("m",))],
                  lambda: {"x": np.ones(1)}),
}


@pytest.mark.parametrize("kind", list(GRADIENT_GRAPHS))
def test_a_cancel_stops_a_large_matmul_in_its_backward_pass(kind):
    inputs, nodes, feed_of = GRADIENT_GRAPHS[kind]
    plan, feed = _plan(inputs, nodes, "s"), feed_of()
    forward = _seconds(lambda: evaluate(plan, feed, gradients=False))
    backward = max(_seconds(lambda: evaluate(plan, feed)) - forward, 0.0)
    latency = _cancel_latency(forward + backward / 4, lambda token: evaluate(plan, feed, token=token))
    _stopped_soon(latency, backward * 3 / 4)


def test_a_cancel_stops_a_large_conv_forward_and_backward():
    x, w = (8, 64, 128, 128), (128, 64, 3, 3)  # about 20 GFLOP forward, twice that backward
    plan = _plan([("x", "float64", x), ("w", "float64", w)],
                 [("y", "conv", ("x", "w"), {"pads": [1, 1, 1, 1]}), ("s", "sum", ("y",))], "s")
    feed = {"x": RNG.standard_normal(x), "w": RNG.standard_normal(w)}
    forward = _seconds(lambda: evaluate(plan, feed, gradients=False))
    latency = _cancel_latency(forward / 4, lambda token: evaluate(plan, feed, gradients=False, token=token))
    _stopped_soon(latency, forward * 3 / 4)
    backward = max(_seconds(lambda: evaluate(plan, feed)) - forward, 0.0)
    latency = _cancel_latency(forward + backward / 4, lambda token: evaluate(plan, feed, token=token))
    _stopped_soon(latency, backward * 3 / 4)


def test_a_cancel_stops_a_max_pool_with_a_large_kernel():
    """Pooling's work is the output times the kernel, far beyond what the shapes say: 576 passes here."""
    plan = _plan([("x", "float64", (1, 1, 1000, 1000))],
                 [("y", "max_pool", ("x",), {"kernel_shape": [24, 24]}), ("s", "sum", ("y",))], "s")
    feed = {"x": RNG.standard_normal((1, 1, 1000, 1000))}
    whole = _seconds(lambda: evaluate(plan, feed))
    latency = _cancel_latency(whole / 4, lambda token: evaluate(plan, feed, token=token))
    _stopped_soon(latency, whole * 3 / 4)


# --- a deadline stops one large node ----------------------------------------------------------------

def _integer_product(n: int):
    """An n x n int64 product from one number: numpy's own loop (no BLAS), about 2 GOP/s, far slower than
    the float rate core/cost.py bounds time with, so a short deadline is not refused up front."""
    return _plan([("x", "int64", (1,))],
                 [("a", "broadcast_to", ("x",), {"shape": [n, n]}), ("m", "matmul", ("a", "a")),
                  ("s", "sum", ("m",))], "s")


def test_a_deadline_passing_during_a_large_matmul_stops_it(monkeypatch):
    # core/cost.py refuses up front a call whose least time (at the peak rates it measures once per
    # process, which a busy machine can make low) exceeds its deadline; here the estimate is let pass
    monkeypatch.setattr(cost, "peak_rates", lambda: (1e15, 1e15))
    plan, feed = _integer_product(1200), {"x": np.ones(1, np.int64)}
    whole = _seconds(lambda: evaluate(plan, feed, gradients=False))
    assert whole > 0.8  # (else this machine needs a larger product for the test to mean anything)
    deadline = whole / 4
    started = time.perf_counter()
    with pytest.raises(DeadlineError, match="passed; work stopped"):  # stopped mid-way, not refused up front
        evaluate(plan, feed, gradients=False, token=StopToken.after(deadline))
    stopped = time.perf_counter() - started
    assert stopped < deadline + 0.25, f"stopped {stopped - deadline:.2f} s after its deadline (run: {whole:.2f} s)"


# --- blocks give numpy's answers ----------------------------------------------------------------------

def _tiny_blocks(monkeypatch) -> list[int]:
    """From here on, blocks of a few thousand operations, so that small products are cut into many, as
    in a run that can be stopped; returns the list the stop checks append to."""
    checks: list[int] = []
    monkeypatch.setattr(common, "BLOCK_SECONDS", 2e-8)        # 2,000 float operations, 30 integer ones
    monkeypatch.setattr(common, "SMALL_TEMPORARY", 0)         # summed products too
    for family in (common, conv):
        monkeypatch.setattr(family, "stop_check", lambda: lambda: checks.append(1))
    return checks


PRODUCTS = [
    ((60, 40), (40, 50)),
    ((3, 30, 20), (20, 25)),          # a batch times one matrix
    ((30, 20), (4, 20, 25)),          # one matrix times a batch
    ((2, 1, 12, 20), (3, 20, 9)),     # batch axes broadcast against each other
    ((5, 1, 3, 20), (1, 4, 20, 7)),
    ((40,), (40, 30)),                # a row vector
    ((30, 40), (40,)),                # a column vector
    ((2, 3, 40), (40,)),
    ((40,), (3, 40, 6)),
]


@pytest.mark.parametrize("dtype", ["float64", "float32", "int64"])
@pytest.mark.parametrize("shapes", PRODUCTS, ids=str)
def test_matmul_in_blocks_equals_numpy(monkeypatch, shapes, dtype):
    a = (RNG.standard_normal(shapes[0]) * 4).astype(dtype)
    b = (RNG.standard_normal(shapes[1]) * 4).astype(dtype)
    expected = np.matmul(a, b)
    checks = _tiny_blocks(monkeypatch)
    got = linalg.matmul(a, b)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert len(checks) > 1  # worked in blocks, checked between them
    if dtype == "int64":
        np.testing.assert_array_equal(got, expected)
    else:
        tolerance = 1e-12 if dtype == "float64" else 1e-5  # (sums taken in another order)
        np.testing.assert_allclose(got, expected, rtol=tolerance, atol=tolerance * np.abs(expected).max())


def test_matmul_in_blocks_reads_broadcast_and_transposed_operands(monkeypatch):
    _tiny_blocks(monkeypatch)
    a = np.broadcast_to(RNG.standard_normal((1, 1, 30)), (4, 20, 30))   # strides of 0: BLAS cannot read it
    b = RNG.standard_normal((25, 30)).T                                   # a transposed view
    np.testing.assert_allclose(linalg.matmul(a, b), np.matmul(a, b), rtol=1e-12)
    c = RNG.standard_normal((30, 50))[:, ::2]                             # a step
    np.testing.assert_allclose(linalg.matmul(a, c), np.matmul(a, c), rtol=1e-12)


@pytest.mark.parametrize("shapes", PRODUCTS + [((1, 12, 30), (6, 30, 8)), ((6, 12, 30), (1, 30, 8)),
                                               ((7, 1, 10, 1), (1, 5, 1, 9)), ((2, 3, 10, 20), (3, 20, 4))],
                         ids=str)
def test_matmul_gradients_in_blocks_equal_the_unblocked_ones(monkeypatch, shapes):
    a, b = RNG.standard_normal(shapes[0]), RNG.standard_normal(shapes[1])
    out = np.matmul(a, b)
    g = RNG.standard_normal(out.shape)
    expected = linalg._matmul_vjp(g, out, a, b)
    checks = _tiny_blocks(monkeypatch)
    got = linalg._matmul_vjp(g, out, a, b)
    assert checks
    for blocked, whole in zip(got, expected):
        assert blocked.shape == whole.shape
        np.testing.assert_allclose(blocked, whole, rtol=1e-12, atol=1e-12 * np.abs(whole).max())


CONVS = [
    ((2, 3, 9, 8), (4, 3, 3, 3), {"pads": (1, 1, 1, 1)}),
    ((3, 4, 7, 9), (6, 2, 2, 3), {"group": 2, "strides": (2, 1), "dilations": (1, 2)}),
    ((2, 2, 11), (3, 2, 3), {"pads": (1, 2), "strides": (2,)}),
]


@pytest.mark.parametrize("case", CONVS, ids=str)
def test_conv_in_blocks_equals_the_unblocked_conv(monkeypatch, case):
    xs, ws, attrs = case
    x, w = RNG.standard_normal(xs), RNG.standard_normal(ws)
    y = conv._conv(x, w, **attrs)
    g = RNG.standard_normal(y.shape)
    expected = conv._conv_vjp(g, y, x, w, **attrs)
    checks = _tiny_blocks(monkeypatch)
    np.testing.assert_allclose(conv._conv(x, w, **attrs), y, rtol=1e-12, atol=1e-12)
    assert checks  # the forward worked in blocks
    for blocked, whole in zip(conv._conv_vjp(g, y, x, w, **attrs), expected):
        np.testing.assert_allclose(blocked, whole, rtol=1e-12, atol=1e-12)


def test_small_products_make_no_blocks_and_no_checks(monkeypatch):
    def refuse():
        raise AssertionError("a small product checked for a stop")
    for family in (common, conv):
        monkeypatch.setattr(family, "stop_check", lambda: refuse)
    a, b = RNG.standard_normal((64, 300)), RNG.standard_normal((300, 200))
    np.testing.assert_array_equal(linalg.matmul(a, b), np.matmul(a, b))
    out = np.matmul(a, b)
    linalg._matmul_vjp(np.ones_like(out), out, a, b)
    conv._conv_vjp(np.ones((2, 4, 5, 5)), None, RNG.standard_normal((2, 3, 5, 5)), RNG.standard_normal((4, 3, 1, 1)))


# --- through a real server: the client's deadline stops the server's CPU --------------------------------

def _cpu_seconds(pid: int) -> float:
    """User and system CPU of a process so far (from /proc: clock ticks of 10 ms)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100


def test_a_client_deadline_stops_the_servers_cpu_during_a_large_matmul():
    g = GraphBuilder()
    x = g.input("x", (1,), "int64")
    a = ops.broadcast_to(x, (2000, 2000))  # a 2000^2 int64 product: 8 s or more of numpy's integer loop
    total = (a @ a).sum()
    # The server measures its peak rates once, at the first call with a deadline, to refuse up front what
    # cannot fit (core/cost.py); on a busy machine BLAS's two threads can make that measurement ten or
    # twenty times low, and this call would be refused before it starts. One BLAS thread (the integer
    # product uses none) and no operator checks running beside the first call keep it true.
    with ServerProcess("--log-level", "WARNING", "--no-check-operators", env={"OPENBLAS_NUM_THREADS": "1"}) as server, \
            Client(server.address, timeout=60) as client:
        assert client.evaluate(g.input("y") * 2.0, y=4.0).value == 8.0  # warm: plugins loaded, connected
        with pytest.raises(DeadlineExceeded) as caught:
            client.evaluate(total, x=np.ones(1, np.int64), grads="none", timeout=1.5)
        assert "refused before starting" not in str(caught.value)  # it ran, and was stopped mid-way
        at_deadline = _cpu_seconds(server.pid)
        time.sleep(1.5)  # unstopped, the product would keep a core busy all this time
        after = _cpu_seconds(server.pid) - at_deadline
        assert after < 0.5, f"the server spent {after:.2f} s of CPU after the deadline"
        assert client.evaluate(g.input("y") * 2.0, y=5.0).value == 10.0  # and it serves on


# --- elementwise rules of many nanoseconds per element ------------------------------------------------

def test_a_cancel_stops_a_large_erf():
    """erf costs about 34 ns per float64 element: 1.3e8 elements (the default limit) took 4 s in one piece.
    It declares forward_into, so the engine runs a large node in blocks with stop checks between."""
    plan = _plan([("x", "float64", (1 << 24,))], [("y", "erf", ("x",)), ("s", "sum", ("y",))], "s")
    feed = {"x": RNG.standard_normal(1 << 24) * 2}
    whole = _seconds(lambda: evaluate(plan, feed, gradients=False))
    latency = _cancel_latency(whole / 4, lambda token: evaluate(plan, feed, gradients=False, token=token))
    _stopped_soon(latency, whole * 3 / 4)


@pytest.mark.parametrize("name", ["sin", "cos", "softplus", "erf", "gelu"])
@pytest.mark.parametrize("dtype", ["float64", "float32", "int64"])
def test_slow_elementwise_rules_write_into_a_buffer_with_the_same_bits(name, dtype):
    """Their forward_into (which lets the engine run them in blocks) gives forward's bits, into a fresh
    buffer or over the input itself."""
    op = REGISTRY[name]
    x = (RNG.standard_normal((37, 50)) * 4).astype(dtype)
    expected = op.forward(x)
    out = np.empty(expected.shape, expected.dtype)
    assert op.forward_into(out, x) is out
    np.testing.assert_array_equal(out, expected)
    if x.dtype == expected.dtype:
        same = x.copy()
        np.testing.assert_array_equal(op.forward_into(same, same), expected)


# --- einsum -------------------------------------------------------------------------------------------

EINSUMS = [
    ("ij,jk->ik", [(40, 30), (30, 20)]),
    ("bij,bjk->bik", [(6, 10, 8), (6, 8, 7)]),
    ("ij,ij->i", [(50, 30), (50, 30)]),
    ("i,j->ij", [(40,), (30,)]),
    ("ii->i", [(20, 20)]),            # a diagonal: its label cannot be cut, one piece
    ("ij->", [(30, 40)]),             # a full contraction: no output label to cut along, one piece
]
WHOLE = {"ii->i", "ij->"}


@pytest.mark.parametrize("equation,shapes", EINSUMS, ids=[e for e, _ in EINSUMS])
def test_einsum_and_its_gradients_in_blocks_equal_the_unblocked_ones(monkeypatch, equation, shapes):
    rng = np.random.default_rng(9)
    xs = [rng.normal(size=s) for s in shapes]
    names = [f"x{i}" for i in range(len(xs))]
    plan = _plan([(n, "float64", s) for n, s in zip(names, shapes)],
                 [("e", "einsum", tuple(names), {"equation": equation}), ("f", "sum", ("e",))], "f")
    inputs = dict(zip(names, xs))
    whole = evaluate(plan, inputs)
    checks: list[int] = []
    monkeypatch.setattr(linalg, "block_operations", lambda blas: 200.0)
    monkeypatch.setattr(linalg, "stop_check", lambda: lambda: checks.append(1))
    blocked = evaluate(plan, inputs)
    np.testing.assert_allclose(blocked.value("e"), whole.value("e"), rtol=1e-12, atol=1e-12)
    for name in names:
        np.testing.assert_allclose(blocked.grad(name), whole.grad(name), rtol=1e-12, atol=1e-12)
    if equation not in WHOLE:
        assert len(checks) > 2  # cut into blocks, each after a check


def test_a_cancel_stops_a_large_einsum():
    n = 2000
    plan = _plan([("a", "float64", (n, n)), ("b", "float64", (n, n))],
                 [("e", "einsum", ("a", "b"), {"equation": "ij,jk->ik"}), ("f", "sum", ("e",))], "f")
    inputs = {"a": np.ones((n, n)), "b": np.ones((n, n))}
    alone = _seconds(lambda: evaluate(plan, inputs, gradients=False))
    latency = _cancel_latency(alone / 4, lambda token: evaluate(plan, inputs, gradients=False, token=token))
    _stopped_soon(latency, alone * 3 / 4)
