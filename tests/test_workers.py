"""``chainrule serve --workers 2``: two processes share one port, and SIGTERM stops them all cleanly.

Calls over fresh connections are answered by more than one worker pid (the
ServerInfo RPC reports the answering process), every answering process is a
child of the served command, the parent serves the metrics of all workers
added up, and SIGTERM to the parent drains the workers and exits 0. A worker
killed mid-run is restarted (a new pid, the same index) while the other keeps
serving, and no call fails meanwhile; restarts back off and a crash loop is
given up.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from chainrule.client import Client, GraphBuilder

from serving import ServerProcess, free_port, scrape

CALLS = 24


def parent_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise RuntimeError(pid)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_workers_share_the_port_and_stop_together_on_sigterm():
    metrics_port = free_port()
    with ServerProcess("--workers", "2", "--metrics-port", str(metrics_port), "--log-level", "WARNING") as server:
        answered: dict[int, int] = {}
        g = GraphBuilder()
        f = g.input("x") * 3.0
        for _ in range(CALLS):
            # A fresh connection each time (no subchannel shared between channels): the kernel picks the worker.
            with Client(server.address, timeout=10, options=[("grpc.use_local_subchannel_pool", 1)]) as client:
                info = client.server_info()
                assert client.evaluate(f, x=2.0).value == 6.0
            answered[info.pid] = info.worker
        assert len(answered) == 2, answered
        assert sorted(answered.values()) == [0, 1]
        assert all(parent_of(pid) == server.pid for pid in answered)

        samples = scrape(metrics_port)  # the parent adds up what every worker counted
        assert samples['chainrule_requests_total{code="OK",method="chainrule.v1.Chainrule/ServerInfo"}'] == CALLS
        assert samples['chainrule_requests_total{code="OK",method="chainrule.v1.Chainrule/Evaluate"}'] == CALLS

        server.send(signal.SIGTERM)
        assert server.wait() == 0, server.log()
        assert not any(alive(pid) for pid in answered)
        assert "ERROR" not in server.log()


def worker_pids(server: ServerProcess, count: int = 2, seconds: float = 20.0) -> dict[int, int]:
    """The serving workers' pids and indexes, found over fresh connections (the kernel picks)."""
    found: dict[int, int] = {}
    ends = time.monotonic() + seconds
    while len(found) < count and time.monotonic() < ends:
        with Client(server.address, timeout=10, options=[("grpc.use_local_subchannel_pool", 1)]) as client:
            info = client.server_info()
        found[info.pid] = info.worker
    return found


def test_a_killed_worker_is_restarted_while_the_others_keep_serving():
    with ServerProcess("--workers", "2", "--log-level", "WARNING") as server:
        before = worker_pids(server)
        assert len(before) == 2, before
        victim, survivor = sorted(before)
        g = GraphBuilder()
        f = g.input("x") * 3.0
        failures: list[BaseException] = []
        calls = [0]
        stop = threading.Event()

        def caller(fresh: bool) -> None:
            client = None if fresh else Client(server.address, timeout=10)
            while not stop.is_set():
                try:
                    if fresh:  # a new connection each call: the kernel picks a live worker
                        with Client(server.address, timeout=10,
                                    options=[("grpc.use_local_subchannel_pool", 1)]) as once:
                            assert once.evaluate(f, x=2.0).value == 6.0
                    else:  # one long-lived connection, perhaps to the victim: retried elsewhere
                        assert client.evaluate(f, x=2.0).value == 6.0
                    calls[0] += 1
                except BaseException as exc:  # noqa: BLE001 - every failure is reported below
                    failures.append(exc)
            if client is not None:
                client.close()

        threads = [threading.Thread(target=caller, args=(fresh,)) for fresh in (False, False, True, True)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        os.kill(victim, signal.SIGKILL)
        killed_at = calls[0]
        replacement = None
        ends = time.monotonic() + 20
        while replacement is None and time.monotonic() < ends:
            time.sleep(0.2)
            now = worker_pids(server, count=2, seconds=2)
            replacement = next((pid for pid, index in now.items() if pid not in before), None)
        stop.set()
        for t in threads:
            t.join()

        assert not failures, failures[:3]
        assert calls[0] > killed_at  # the survivor answered meanwhile
        assert replacement is not None, server.log()
        assert parent_of(replacement) == server.pid and alive(survivor) and not alive(victim)
        assert now[replacement] == before[victim]  # the new process serves as the dead one's index
        assert f"worker {before[victim]} (pid {victim}) was killed by SIGKILL; restarting it" in server.log()
        server.send(signal.SIGTERM)
        assert server.wait() == 0, server.log()


def test_restarts_back_off_and_a_crash_loop_is_given_up(caplog):
    """Restarts wait 0.5, 1, 2, 4, 8 s; the next crash within the window is a crash loop (None:
    the parent stops the others and exits 1); crashes older than the window are forgotten."""
    from types import SimpleNamespace

    from chainrule.server import workers
    from chainrule.server.config import ServerConfig

    pool = workers._Pool(ServerConfig(), 2, with_metrics=False)
    dead = SimpleNamespace(pid=123, exitcode=-signal.SIGKILL)
    delays = [pool._crashed(0, dead) for _ in range(workers.MAX_RESTARTS + 1)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, None]
    assert pool._crashed(1, SimpleNamespace(pid=124, exitcode=3)) == 0.5  # each worker counts its own
    assert "worker 1 (pid 124) exited with code 3; restarting it in 0.5 s" in caplog.text
    assert "a crash loop" in caplog.text
    pool.crashes[0] = type(pool.crashes[0])([time.monotonic() - workers.RESTART_WINDOW_SECONDS - 1] * 5)
    assert pool._crashed(0, dead) == 0.5  # long-ago crashes no longer count


def test_ctrl_c_to_the_whole_process_group_is_a_clean_stop():
    with ServerProcess("--workers", "2", "--log-level", "WARNING") as server:
        with Client(server.address, timeout=10) as client:
            client.server_info()
        children = [int(p) for p in Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()]
        for pid in [server.pid, *children]:  # what a terminal does on Ctrl-C
            os.kill(pid, signal.SIGINT)
        assert server.wait() == 0, server.log()
