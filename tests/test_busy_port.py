"""A second ``chainrule serve`` on a port already in use is refused at start, with one line.

gRPC binds with SO_REUSEPORT by default, so a second server on a busy port used
to start silently and take half the connections. Now a single-process server
binds without it and ``--workers`` checks the port before sharing it among its
own workers: the second server exits 2 with one line naming the port and the
way out, whichever of the two uses ``--workers``, and the first keeps serving.
A port freed by a server that stopped (its connections left in TIME_WAIT) is
free again at once.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from chainrule.client import Client

from serving import ServerProcess


def second_serve(port: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chainrule.server.cli", "serve", "--port", port,
                           "--log-level", "WARNING", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("first", [(), ("--workers", "2")], ids=["single", "workers"])
def test_a_busy_port_is_refused_with_one_line_naming_it(first):
    with ServerProcess("--log-level", "WARNING", *first) as server:
        port = server.address.rsplit(":", 1)[1]
        for second in ((), ("--workers", "2")):
            refused = second_serve(port, *second)
            assert refused.returncode == 2, (second, refused.stderr)
            assert "listening" not in refused.stdout
            lines = refused.stderr.strip().splitlines()
            assert lines == [f"chainrule: error: port {port} on 127.0.0.1 is already in use by another process "
                             f"(another chainrule serve still running?); stop it, or serve on another port with "
                             f"--port (CHAINRULE_PORT)"], refused.stderr
        with Client(server.address, timeout=10) as client:  # the first one still serves, alone
            assert client.server_info().pid in (server.pid, *children(server.pid))


def test_a_port_freed_by_a_stopped_server_is_free_at_once():
    with ServerProcess("--log-level", "WARNING") as first:
        port = first.address.rsplit(":", 1)[1]
        with Client(first.address, timeout=10) as client:  # a connection, left in TIME_WAIT after the stop
            client.server_info()
    with ServerProcess("--log-level", "WARNING", "--port", port) as second:
        assert second.address.endswith(f":{port}")


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as listing:
        return [int(p) for p in listing.read().split()]
