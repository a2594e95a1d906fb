"""``chainrule serve --workers 2``: two processes share one port, and SIGTERM stops them all cleanly.

Calls over fresh connections are answered by more than one worker pid (the
ServerInfo RPC reports the answering process), every answering process is a
child of the served command, the parent serves the metrics of all workers
added up, and SIGTERM to the parent drains the workers and exits 0.
"""
from __future__ import annotations

import os
import signal
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


def test_a_crashed_worker_stops_the_others_and_the_parent_exits_nonzero():
    with ServerProcess("--workers", "2", "--log-level", "WARNING") as server:
        pids = set()
        for _ in range(CALLS):
            with Client(server.address, timeout=10, options=[("grpc.use_local_subchannel_pool", 1)]) as client:
                pids.add(client.server_info().pid)
        victim = next(iter(pids))
        os.kill(victim, signal.SIGKILL)
        assert server.wait() == 1
        assert not any(alive(pid) for pid in pids)


def test_ctrl_c_to_the_whole_process_group_is_a_clean_stop():
    with ServerProcess("--workers", "2", "--log-level", "WARNING") as server:
        with Client(server.address, timeout=10) as client:
            client.server_info()
        children = [int(p) for p in Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()]
        for pid in [server.pid, *children]:  # what a terminal does on Ctrl-C
            os.kill(pid, signal.SIGINT)
        assert server.wait() == 0, server.log()
