"""evaluate_many(..., parallel=N): N EvaluateStream calls share the input sets.

Two real servers on loopback behind one Client address list (round_robin, as
in test_round_robin.py), each with its own Prometheus endpoint, which says how
many calls and evaluations each served. Results come back in input-set order;
errors are those of one stream (the failed set with the lowest index is
raised, with its index); raising ends every call.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from chainrule.client import Client, GraphBuilder, InvalidArgument, ops
from chainrule.server import LocalClient, ServerConfig, create_server

from serving import free_port, scrape, slow_graph

STREAM = 'method="chainrule.v1.Chainrule/EvaluateStream"'


class Replica:
    def __init__(self, worker: int) -> None:
        self.metrics_port = free_port()
        config = ServerConfig(log_level="WARNING", metrics_port=self.metrics_port)
        self.server, port = create_server("127.0.0.1:0", config, worker=worker)
        self.server.start()
        self.address = f"127.0.0.1:{port}"

    def metric(self, name: str) -> float:
        return sum(value for key, value in scrape(self.metrics_port).items()
                   if key.startswith(name) and (STREAM in key or "{" not in key))

    def streams(self) -> float:
        """EvaluateStream calls answered, whatever their status."""
        return self.metric("chainrule_requests_total")

    def evaluated_nodes(self) -> float:
        return self.metric("chainrule_nodes_evaluated_total")

    def in_flight(self) -> float:
        return self.metric("chainrule_requests_in_flight")


@pytest.fixture()
def replicas():
    started = [Replica(0), Replica(1)]
    yield started
    for replica in started:
        replica.server.stop(None).wait()


@pytest.fixture()
def client(replicas):
    with Client([r.address for r in replicas], timeout=60) as c:
        seen = set()
        for _ in range(50):  # until round_robin has a connection to both
            seen.add(c.server_info().worker)
            if seen == {0, 1}:
                break
        assert seen == {0, 1}
        yield c


def product(work: int = 0):
    """x * y + sin(x), and ``work`` elements of computing that add nothing (to make a set take a while)."""
    g = GraphBuilder()
    x, y = g.input("x"), g.input("y")
    f = x * y + ops.sin(x)
    if work:
        f = f + 0.0 * ops.logsumexp(ops.broadcast_to(x, [work]))
    return x, f.named("f")


def expected(k: int) -> float:
    return float(k) * 2.0 + np.sin(float(k))


def test_the_input_sets_are_spread_over_both_replicas_in_order(replicas, client):
    x, f = product(work=20_000)  # about 1 ms a set: the second call starts long before the first is done
    sets = [{"x": float(k), "y": 2.0} for k in range(200)]
    results = client.evaluate_many(f, sets, parallel=2, batch=2)
    assert [r.value for r in results] == [expected(k) for k in range(200)]
    assert [r.grad[x] for r in results] == [2.0 + np.cos(float(k)) for k in range(200)]
    assert [r.streams() for r in replicas] == [1, 1]  # one call each
    served = [r.evaluated_nodes() for r in replicas]
    assert all(n > 0 for n in served), served  # both computed some of the sets


def test_parallel_1_is_one_stream_and_n_is_n(replicas, client):
    _, f = product()
    sets = [{"x": float(k), "y": 2.0} for k in range(50)]
    assert [r.value for r in client.evaluate_many(f, iter(sets))] == [expected(k) for k in range(50)]
    assert sum(r.streams() for r in replicas) == 1
    results = client.evaluate_many(f, iter(sets), parallel=5, batch=1)  # a generator: read once, in order
    assert [r.value for r in results] == [expected(k) for k in range(50)]
    assert sum(r.streams() for r in replicas) == 1 + 5
    assert client.evaluate_many(f, [], parallel=3) == []
    assert [r.value for r in client.evaluate_many(f, sets[:2], parallel=4)] == [expected(0), expected(1)]


def test_errors_are_those_of_one_stream(client):
    x, f = product()
    sets = [{"x": float(k), "y": 2.0} for k in range(300)]
    for k in (37, 150, 299):
        sets[k] = {"x": 1.0}  # y missing: this set fails on the server
    for parallel in (1, 2, 3):
        with pytest.raises(InvalidArgument) as info:
            client.evaluate_many(f, sets, parallel=parallel, batch=4)
        assert info.value.index == 37 and info.value.reason == "MISSING_INPUT", parallel
        returned = client.evaluate_many(f, sets, parallel=parallel, batch=4, errors="return")
        failed = {k: e for k, e in enumerate(returned) if isinstance(e, InvalidArgument)}
        assert sorted(failed) == [37, 150, 299] and all(e.index == k for k, e in failed.items())
        assert all(returned[k].value == expected(k) for k in range(300) if k not in failed)


def test_a_set_that_cannot_be_sent_is_raised_as_with_one_stream(client):
    _, f = product()
    sets = [{"x": float(k), "y": 2.0} for k in range(100)]
    sets[60] = {"x": "sixty", "y": 2.0}
    for parallel in (1, 3):
        with pytest.raises(TypeError, match="input 'x'"):
            client.evaluate_many(f, sets, parallel=parallel)

    def failing():
        yield from sets[:20]
        raise LookupError("the data ran out")

    with pytest.raises(LookupError, match="the data ran out"):
        client.evaluate_many(f, failing(), parallel=3, batch=4)
    with pytest.raises(ValueError, match="parallel: expected an integer >= 1, got 0"):
        client.evaluate_many(f, sets, parallel=0)


def test_raising_ends_every_stream(replicas, client):
    graph = slow_graph(steps=10)  # about 10 ms per set
    before = [r.evaluated_nodes() for r in replicas]
    client.evaluate_many(graph, [{"x": 0.5}], values="none", grads="none")
    per_set = sum(r.evaluated_nodes() for r in replicas) - sum(before)
    sets = [{"x": 0.5} for _ in range(1000)]  # about 10 s of work in all
    sets[3] = {}  # fails at once
    started = time.monotonic()
    with pytest.raises(InvalidArgument) as info:
        client.evaluate_many(graph, sets, parallel=4, batch=1, values="none", grads="none")
    assert info.value.index == 3
    assert time.monotonic() - started < 5
    deadline = time.monotonic() + 10
    while any(r.in_flight() for r in replicas) and time.monotonic() < deadline:
        time.sleep(0.05)  # the servers see the cancellations
    assert not any(r.in_flight() for r in replicas)
    computed = (sum(r.evaluated_nodes() for r in replicas) - sum(before) - per_set) / per_set
    assert computed < 200, computed  # the other streams stopped: a few windows, not the 1000 sets
    assert sum(r.streams() for r in replicas) == 1 + 4


def test_in_process_too():
    _, f = product()
    sets = [{"x": float(k), "y": 2.0} for k in range(120)]
    sets[70] = {"x": 1.0}
    with LocalClient() as local:
        with pytest.raises(InvalidArgument) as info:
            local.evaluate_many(f, sets, parallel=3, batch=4)
        assert info.value.index == 70
        returned = local.evaluate_many(f, sets, parallel=3, batch=4, errors="return")
    assert isinstance(returned[70], InvalidArgument)
    assert [returned[k].value for k in range(120) if k != 70] == [expected(k) for k in range(120) if k != 70]


def _interrupted(replicas, after: int, sets: int, how: str):
    """Input sets 0..sets-1; once ``after`` of them are taken, the replica serving an open
    EvaluateStream (both, with parallel=2: the first) shuts down gracefully, as on SIGTERM
    (``how="drain"``), or stops at once, its connections dropped (``how="stop"``)."""
    for k in range(sets):
        if k == after:
            serving = [r for r in replicas if r.in_flight() > 0] or replicas
            if how == "drain":
                serving[0].server.drain(grace=10, reason="a SIGTERM in the test")
            else:
                serving[0].server.stop(None)
        yield {"x": float(k), "y": 2.0}


@pytest.mark.parametrize("how", ["drain", "stop"])
@pytest.mark.parametrize("parallel", [1, 2])
def test_a_replica_going_away_mid_stream_loses_no_input_set(replicas, client, parallel, how):
    """Its streams end (SHUTTING_DOWN after the answers they sent, or with the connection); the
    client sends the unanswered sets again on a new call, which the channel takes to the other
    replica."""
    _, f = product(work=20_000)
    results = client.evaluate_many(f, _interrupted(replicas, after=12, sets=40, how=how), batch=2, parallel=parallel)
    assert [r.value for r in results] == pytest.approx([expected(k) for k in range(40)], rel=1e-12)
