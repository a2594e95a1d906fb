"""The memory budget holds for all evaluations at once, not for each alone (issue 14).

Evaluations compiled with one Limits share its ledger: each takes what it will allocate
(values, gradients, workspace) before it starts and gives it back when it ends, so a
second call that would take the process past ``max_memory_bytes`` is refused, naming the
limit and saying to retry, while the first runs; and runs once the first has ended.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

from chainrule.core import GraphIR, Limits, OpDef, Registry, TensorSpec, compile_graph, evaluate
from chainrule.core.errors import LimitExceeded
from chainrule.core.limits import MemoryLedger
from chainrule.plugins.manager import load_registry

BUILTIN = load_registry(entry_points=False)


def _waiting_registry(started: threading.Event, release: threading.Event) -> Registry:
    def forward(x):
        started.set()
        release.wait(20)
        return x * 1.0

    waiting = OpDef("t.wait", 1, forward, lambda g, out, x: (g,), lambda x: TensorSpec(x.shape, x.dtype))
    return Registry([*BUILTIN, waiting])


def _graph(op: str, n: int) -> GraphIR:
    return GraphIR.build([("x", "float64", (n,))], [("w", op, ("x",)), ("f", "sum", ("w",))], "f")


def test_a_second_call_is_refused_while_the_first_holds_the_budget_and_runs_after():
    started, release = threading.Event(), threading.Event()
    limits = Limits(max_memory_bytes=80_000)  # one call (48,016 bytes with gradients and workspace) fits, not two
    registry = _waiting_registry(started, release)
    slow = compile_graph(_graph("t.wait", 1000), registry, limits)
    quick = compile_graph(_graph("exp", 1000), registry, limits)
    first = threading.Thread(target=evaluate, args=(slow, {"x": np.ones(1000)}))
    first.start()
    try:
        assert started.wait(10)
        assert limits.ledger.held > 0
        with pytest.raises(LimitExceeded, match="retry later") as caught:
            evaluate(quick, {"x": np.ones(1000)})
        assert caught.value.limit == "max_memory_bytes"
        assert caught.value.allowed < caught.value.requested  # what was free, against what it needed
    finally:
        release.set()
        first.join(10)
    assert limits.ledger.held == 0  # given back when the first ended
    assert float(evaluate(quick, {"x": np.zeros(1000)}).output_value) == 1000.0


def test_a_failing_call_gives_its_memory_back():
    limits = Limits(max_memory_bytes=1 << 20)
    plan = compile_graph(_graph("log", 100), BUILTIN, limits)
    with pytest.raises(Exception):
        evaluate(plan, {"x": np.ones(100)}, seed=np.ones(3))  # a bad seed, found after the memory is taken
    assert limits.ledger.held == 0


def test_a_ledger_refuses_past_its_capacity_and_takes_back_all_of_a_hold():
    ledger = MemoryLedger(100)
    first = ledger.hold(60)
    with pytest.raises(LimitExceeded):
        ledger.hold(50)
    first.add(30)
    assert ledger.held == 90
    first.release()
    first.release()  # once only
    assert ledger.held == 0
    ledger.hold(100).release()


def test_each_limits_object_has_a_ledger_of_its_own_budget():
    from dataclasses import replace

    small = Limits(max_memory_bytes=10)
    larger = replace(small, max_memory_bytes=1000)
    assert small.ledger is not larger.ledger and larger.ledger.capacity == 1000
    assert small == Limits(max_memory_bytes=10)  # the ledger is not part of what limits are


def test_the_response_counts_in_the_budget_before_the_forward_pass():
    """A response that fits the message limit but not the memory left beside the values it is
    built from is refused before any work; asking for less makes the same graph fit."""
    from chainrule.client import Client, GraphBuilder, ResourceExhausted, ops
    from chainrule.server import ServerConfig, create_server

    n = 100_000  # values 2 x 8n, gradients as much, workspace 2 x 8n: 48n; the default response 16n, twice
    g = GraphBuilder()
    x = g.input("x", (1,))
    f = ops.sum(ops.exp(ops.broadcast_to(x, [n]))).named("f")
    server, port = create_server("127.0.0.1:0", ServerConfig(max_memory_bytes=64 * n, log_level="ERROR"))
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=30) as client:
            with pytest.raises(ResourceExhausted) as caught:
                client.evaluate(f, x=np.ones(1))  # every gradient: b's and e's, 800 KB each
            assert caught.value.metadata["limit"] == "max_memory_bytes"
            assert "response" in caught.value.message
            assert server.service.limits.ledger.held == 0
            result = client.evaluate(f, x=np.ones(1), grads=["x"])  # a response of a few bytes fits
            assert float(result.grad["x"][0]) == pytest.approx(n * np.e)
    finally:
        server.stop(grace=None).wait()


def test_a_declared_workspace_counts_before_any_work():
    """conv declares its im2col columns (OpDef.workspace): a budget that holds the values and
    gradients but not the columns refuses the call before it starts."""
    graph = GraphIR.build([("x", "float64", (1, 4, 64, 64)), ("w", "float64", (8, 4, 3, 3))],
                          [("y", "conv", ("x", "w"), {"pads": [1, 1, 1, 1]}), ("f", "sum", ("y",))], "f")
    inputs = {"x": np.ones((1, 4, 64, 64)), "w": np.ones((8, 4, 3, 3))}
    tight = compile_graph(graph, BUILTIN, Limits(max_memory_bytes=3 << 20))
    with pytest.raises(LimitExceeded, match="workspace") as caught:
        evaluate(tight, inputs)
    assert caught.value.requested > 4 << 20  # two 2 MiB column chunks at least
    roomy = compile_graph(graph, BUILTIN, Limits(max_memory_bytes=8 << 20))
    assert float(evaluate(roomy, inputs).output_value) > 0


def test_a_servers_calls_give_all_their_memory_back_however_they_end():
    """The server holds a call's memory until both its work and gRPC's sending of the response are
    done: after calls that succeed, fail, are refused or pass their deadline mid-run, nothing is
    left held (a leak would shrink the budget for good)."""
    import time

    from chainrule.client import Client, DeadlineExceeded, GraphBuilder, InvalidArgument, ResourceExhausted, ops
    from chainrule.server import ServerConfig, create_server

    from serving import slow_graph

    server, port = create_server("127.0.0.1:0", ServerConfig(max_memory_bytes=64 << 20, log_level="ERROR"))
    server.start()
    ledger = server.service.limits.ledger
    try:
        with Client(f"127.0.0.1:{port}", timeout=30, busy_retries=0) as client:
            g = GraphBuilder()
            x = g.input("x", (1000,))
            assert float(client.evaluate(ops.sum(ops.exp(x)), x=np.zeros(1000)).value) == 1000.0
            with pytest.raises(InvalidArgument):
                client.evaluate(ops.exp(x), x=np.zeros(1000), seed=np.ones(3))
            with pytest.raises(ResourceExhausted):
                client.evaluate(ops.sum(ops.broadcast_to(g.input("y", (1,)), [1 << 24])), y=np.ones(1))
            with pytest.raises(DeadlineExceeded):
                client.evaluate(slow_graph(3000), x=0.5, timeout=0.3)
            for _ in range(200):  # the abandoned run stops at its next check, then gives its memory back
                if ledger.held == 0:
                    break
                time.sleep(0.01)
            assert ledger.held == 0
    finally:
        server.stop(grace=None).wait()


def test_a_hold_shared_by_two_parties_is_given_back_by_the_last():
    ledger = MemoryLedger(100)
    from chainrule.core.limits import Hold

    hold = Hold(ledger, parties=2)
    hold.add(70)
    hold.release()
    assert ledger.held == 70  # the other party (the response still being sent) holds it
    hold.release()
    assert ledger.held == 0
