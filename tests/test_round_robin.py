"""Several machines, simulated: three servers on distinct loopback ports behind one Client.

gRPC's round_robin policy spreads the calls over all three (ServerInfo says
which answered: each server has its own worker index); one server is drained
mid-run and every call still succeeds (gRPC retries UNAVAILABLE for the
idempotent methods, and stops picking the server that went away).
"""
from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from chainrule.client import Client, GraphBuilder
from chainrule.client.channel import target_for
from chainrule.server import ServerConfig
from chainrule.server.grpc_server import build_service, connection_age_options, create_server


@pytest.fixture()
def servers():
    config = ServerConfig(log_level="WARNING")
    service = build_service(config)  # one plugin load; each server is still its own gRPC server and port
    started = []
    for index in range(3):
        running, port = create_server("127.0.0.1:0", config, service=service, worker=index)
        running.start()
        started.append((running, f"127.0.0.1:{port}"))
    yield started
    for running, _ in started:
        running.stop(None).wait()


def test_calls_spread_over_all_servers_and_survive_one_stopping(servers):
    addresses = [address for _, address in servers]
    g = GraphBuilder()
    x, y = g.input("x"), g.input("y")
    f = (x * y + x).named("f")
    answered: Counter[int] = Counter()
    failures: list[BaseException] = []
    calls = [0]
    stop = threading.Event()

    with Client(addresses, timeout=10) as client:
        assert client.address == "ipv4:" + ",".join(addresses)
        spread = Counter(client.server_info().worker for _ in range(30))
        assert set(spread) == {0, 1, 2}, spread

        def caller() -> None:
            while not stop.is_set():
                try:
                    result = client.evaluate(f, x=2.0, y=3.0)
                    assert result.value == 8.0 and result.grad[x] == 4.0
                    answered[client.server_info().worker] += 1
                    calls[0] += 1
                except BaseException as exc:  # noqa: BLE001 - every failure is reported below
                    failures.append(exc)

        threads = [threading.Thread(target=caller) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        before = calls[0]
        servers[1][0].drain(grace=2.0).wait()  # server 1 goes away mid-run
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join()
        after = Counter(client.server_info().worker for _ in range(30))

    assert not failures, failures[:3]
    assert before > 0 and calls[0] > before  # calls went on after the stop
    assert all(answered[w] > 0 for w in (0, 1, 2))
    assert set(after) == {0, 2}  # the other two share the calls from then on


def test_a_registered_graph_evaluates_on_replicas_that_never_saw_it():
    """Each replica has its own cache: an id registered through one is unknown to the other, and
    the client's retry must reach the replica that answered NOT_FOUND, not register elsewhere."""
    config = ServerConfig(log_level="WARNING")
    started = []
    for index in range(2):
        running, port = create_server("127.0.0.1:0", config, service=build_service(config), worker=index)
        running.start()
        started.append((running, f"127.0.0.1:{port}"))
    try:
        g = GraphBuilder()
        x, y = g.input("x"), g.input("y")
        f = (x * y + x).named("f")
        with Client([address for _, address in started], timeout=10) as client:
            client.register(f)
            results = [client.evaluate(f, x=2.0, y=float(k)) for k in range(20)]
        assert [r.value for r in results] == [2.0 * k + 2.0 for k in range(20)]
    finally:
        for running, _ in started:
            running.stop(None).wait()


def test_a_list_of_host_names_asks_for_a_dns_target():
    assert target_for(["10.0.0.1:50051", "10.0.0.2:50051"]) == "ipv4:10.0.0.1:50051,10.0.0.2:50051"
    assert target_for(["[::1]:1", "[::1]:2"]) == "ipv6:[::1]:1,[::1]:2"
    assert target_for("dns:///chainrule.default.svc.cluster.local:50051").startswith("dns:///")
    with pytest.raises(ValueError, match="dns:///"):
        target_for(["replica-a:50051", "replica-b:50051"])


def test_connections_are_recycled_at_max_age_without_failed_calls():
    config = ServerConfig(max_connection_age_seconds=0.2, grace_seconds=5, log_level="WARNING")
    assert dict(connection_age_options(config)) == {"grpc.max_connection_age_ms": 200,
                                                    "grpc.max_connection_age_grace_ms": 5000}
    running, port = create_server("127.0.0.1:0", config)
    running.start()
    try:
        g = GraphBuilder()
        f = g.input("x") * 2.0
        with Client(f"127.0.0.1:{port}", timeout=10) as client:
            ends = time.monotonic() + 1.0  # five connection lifetimes
            calls = 0
            while time.monotonic() < ends:
                assert client.evaluate(f, x=1.5).value == 3.0
                calls += 1
        assert calls > 10
    finally:
        running.stop(None).wait()
