"""Overload: with --max-concurrent M and 4xM calls at once, the excess is refused at once.

The refused calls get RESOURCE_EXHAUSTED naming max_concurrent while the
admitted ones are still computing (none waits in a queue, none hangs), the
admitted ones finish correctly, and right after, the server serves as before.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from chainrule.client import ChainruleRpcError, Client, GraphBuilder, ResourceExhausted
from chainrule.server import ServerConfig, create_server

from serving import slow_graph

M = 2


@pytest.fixture(scope="module")
def address():
    running, port = create_server("127.0.0.1:0", ServerConfig(max_concurrent=M, log_level="WARNING"))
    running.start()
    yield f"127.0.0.1:{port}"
    running.stop(None).wait()


def test_the_excess_of_4m_parallel_calls_is_refused_at_once_and_none_hangs(address):
    graph = slow_graph(steps=1500)  # about 1 s of work per call alone
    go = threading.Barrier(4 * M)

    def call(client: Client) -> tuple[str, float, ChainruleRpcError | None]:
        go.wait()
        try:
            client.evaluate(graph, x=0.0, values="none", grads="none")
            return "OK", time.monotonic(), None
        except ResourceExhausted as exc:
            return "RESOURCE_EXHAUSTED", time.monotonic(), exc

    # busy_retries=0: the refusals themselves are under test (the client would otherwise send them again)
    with Client(address, timeout=60, busy_retries=0) as client, ThreadPoolExecutor(4 * M) as pool:
        client.evaluate(graph, x=0.0, values="none", grads="none")  # compiled and cached: all calls start alike
        outcomes = list(pool.map(call, [client] * (4 * M)))  # a hang would fail with DEADLINE_EXCEEDED
        served = [t for code, t, _ in outcomes if code == "OK"]
        refused = [(t, exc) for code, t, exc in outcomes if code != "OK"]
        assert len(served) == M and len(refused) == 3 * M
        # Refused at once: every refusal arrived while the admitted calls were still computing.
        assert max(t for t, _ in refused) < min(served)
        assert all(exc.metadata["limit"] == "max_concurrent" for _, exc in refused)
        assert all(exc.retry_delay and exc.retry_delay > 0 for _, exc in refused)  # RetryInfo: "not now"

        # Back to normal: the slots are free again, M calls at once all succeed, and a small call answers.
        again = list(pool.map(lambda c: c.evaluate(slow_graph(steps=20), x=0.0).value, [client] * M))
        assert len(again) == M
        g = GraphBuilder()
        assert client.evaluate(g.input("x") * 2.0, x=21.0).value == 42.0


def test_an_abandoned_calls_slot_is_free_when_its_deadline_passes():
    """Work stuck inside one node (here a rule that sleeps 2 s; in life one huge BLAS product) cannot
    stop before it returns; its call's admission slot is given back when the client's deadline
    passes, so other clients are served meanwhile rather than refused."""
    import types

    import numpy as np

    from chainrule.client import DeadlineExceeded
    from chainrule.plugins import OperatorSet, same_as_input
    from chainrule.plugins.manager import load_plugins
    from chainrule.server import build_service

    stuck = OperatorSet()

    @stuck.operator("stuck.sleep", infer=same_as_input, gradcheck=False)
    def sleep(x):
        """x, two seconds later."""
        if np.all(np.asarray(x) == 7.0):  # only the test's calls sleep (not the check at load)
            time.sleep(2.0)
        return x

    @sleep.vjp
    def _(g, out, x):
        return (g,)

    config = ServerConfig(max_concurrent=1, log_level="WARNING", check_operators=False)
    loaded = load_plugins(entry_points=False, only=["builtin", "stuck"],
                          extra=[("stuck", types.SimpleNamespace(register_operators=stuck.hookimpl()))])
    running, port = create_server("127.0.0.1:0", config, service=build_service(config, loaded))
    running.start()
    try:
        g = GraphBuilder()
        slow = g.op("stuck.sleep", g.input("x"), name="slow")
        with Client(f"127.0.0.1:{port}", timeout=30) as client:
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                client.evaluate(slow, x=7.0, grads="none", timeout=0.3)
            time.sleep(0.1)  # the server notices the call's end
            # the only slot is free although the sleeping rule still runs: this call is admitted
            assert client.evaluate(g.input("y") * 2.0, y=21.0).value == 42.0
            assert time.monotonic() - started < 1.5  # (before the stuck rule returned)
    finally:
        running.stop(None).wait()


def test_the_client_sends_a_call_refused_not_now_again_after_the_delay_the_server_names(monkeypatch):
    """A server with one slot, taken by a call of about 0.3 s: a second call is refused before any
    work with RetryInfo, and the client (busy_retries, the default) sends it again until it is
    served; with busy_retries=0 the refusal reaches the caller."""
    from chainrule.client import client as client_module

    waits: list[float] = []  # the delays this thread's client waited before sending a call again
    real_sleep, caller = time.sleep, threading.get_ident()

    def sleep(seconds: float) -> None:
        if threading.get_ident() == caller:
            waits.append(seconds)
        real_sleep(seconds)

    monkeypatch.setattr(client_module.time, "sleep", sleep)
    running, port = create_server("127.0.0.1:0", ServerConfig(max_concurrent=1, log_level="ERROR"))
    running.start()
    try:
        address = f"127.0.0.1:{port}"
        slow = slow_graph(steps=1500)
        g = GraphBuilder()
        quick = g.input("x") * 2.0
        with Client(address, timeout=60) as client, Client(address, timeout=60, busy_retries=0) as impatient:
            client.evaluate(slow, x=0.0, values="none", grads="none")  # compiled: the timed call only computes
            started = threading.Event()

            def hold_the_slot() -> None:
                started.set()
                client.evaluate(slow, x=0.0, values="none", grads="none")

            holder = threading.Thread(target=hold_the_slot)
            holder.start()
            started.wait(5)
            refused = None
            for _ in range(100):  # until the slow call holds the slot
                try:
                    impatient.evaluate(quick, x=1.0)
                    time.sleep(0.005)
                except ResourceExhausted as exc:
                    refused = exc
                    break
            assert refused is not None and refused.retry_delay > 0
            assert not waits
            assert client.evaluate(quick, x=21.0).value == 42.0  # refused at first, then served
            assert waits and waits[0] >= refused.retry_delay  # it was sent again, after the delay named
            holder.join(30)
    finally:
        running.stop(None).wait()
