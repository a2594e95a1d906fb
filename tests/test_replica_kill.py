"""Three replicas, one SIGKILLed mid-run: no call is lost, large requests included.

gRPC retries a call the server has not answered yet (no response headers) on
UNAVAILABLE, but only while it still holds the request: gRPC's default retry
buffer (``grpc.per_rpc_retry_buffer_size``, 256 KiB) gave up retrying every
larger request, so a crashed replica lost exactly the calls over 256 KiB. The
Client sizes the buffer for its message limit (client/channel.py), and sends
once more an idempotent call whose replica died while sending the answer
(after its headers, when gRPC no longer retries).
"""
from __future__ import annotations

import signal
import threading
import time
from collections import Counter

import numpy as np
import pytest

from chainrule.client import Client, GraphBuilder, ops
from chainrule.client.channel import retry_buffer_bytes

from serving import ServerProcess

#: The replicas' message limit, and request sizes all over gRPC's default retry buffer, up to near
#: that limit: 320 KiB, 1 MiB and 2.5 MiB of float64s.
MESSAGE_LIMIT = 3 << 20
SIZES = (40_960, 131_072, 327_680)


def heavy(g: GraphBuilder):
    """Tens of milliseconds of work per call on a few hundred thousand elements, so calls are in flight when the kill comes."""
    x = g.input("x", shape=[-1])
    y = x
    for _ in range(4):
        y = ops.tanh(y) * 0.9 + y * 0.1
    return ops.sum(y * x).named("f")


def run_calls(addresses: list[str], kill, options=()) -> tuple[int, list[BaseException], Counter]:
    g = GraphBuilder()
    f = heavy(g)
    failures: list[BaseException] = []
    answered: Counter = Counter()
    stop = threading.Event()
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal(n) for n in SIZES]
    expected = {}
    with Client(addresses, timeout=30, options=list(options)) as client:
        for k, x in enumerate(inputs):
            result = client.evaluate(f, x=x, grads=["x"])
            expected[k] = (float(result.value), np.asarray(result.grad["x"]))

        def caller(seed: int) -> None:
            k = seed
            while not stop.is_set():
                k = (k + 1) % len(inputs)
                try:
                    result = client.evaluate(f, x=inputs[k], grads=["x"])
                    assert float(result.value) == expected[k][0]
                    np.testing.assert_array_equal(np.asarray(result.grad["x"]), expected[k][1])
                    answered[k] += 1
                except BaseException as exc:  # noqa: BLE001 - every failure is reported
                    failures.append(exc)

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.8)
        kill()
        at_kill = sum(answered.values())
        ends = time.monotonic() + 10
        while sum(answered.values()) < at_kill + 12 and time.monotonic() < ends:  # the other two serve on
            time.sleep(0.1)
        stop.set()
        for t in threads:
            t.join()
    return sum(answered.values()), failures, answered


@pytest.fixture()
def replicas():
    servers = [ServerProcess("--log-level", "WARNING", "--max-message-bytes", str(MESSAGE_LIMIT)) for _ in range(3)]
    yield servers
    for server in servers:
        server.stop(signal.SIGKILL)


def test_a_replica_killed_mid_run_loses_no_call_over_256_kib(replicas):
    calls, failures, answered = run_calls([s.address for s in replicas], lambda: replicas[1].send(signal.SIGKILL))
    assert replicas[1].wait() == -signal.SIGKILL
    assert not failures, (len(failures), failures[:3])
    assert calls >= 12 and all(answered[k] > 0 for k in range(len(SIZES))), answered


def test_the_retry_buffer_holds_a_request_of_the_message_limit():
    assert retry_buffer_bytes(256 << 20) > 256 << 20
    assert retry_buffer_bytes((1 << 31) - 1) == (1 << 31) - 1  # a C int

