"""Helpers for tests that run ``chainrule serve`` as a real subprocess.

A subprocess server is needed where the test looks at the process itself:
its resident memory, its exit code after SIGTERM, its worker processes.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from chainrule.client import GraphBuilder, Var, ops

#: Seconds a server subprocess gets to start and to stop.
START_SECONDS = 60
STOP_SECONDS = 30


def rss_kib(pid: int) -> int:
    """Resident memory of a process, in KiB (from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def scrape(port: int) -> dict[str, float]:
    """The samples of a Prometheus endpoint on loopback: ``'name{labels}' -> value``."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def free_port() -> int:
    """A loopback port free right now (for servers that cannot be given port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``chainrule serve --port 0 <args>`` in a subprocess; a context manager that stops it.

    ``address`` is known once the server prints that it listens. Its log goes
    to a temporary file (``log()``), so a full pipe can never block it.
    """

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self._log = tempfile.TemporaryFile(mode="w+")
        command = [sys.executable, "-m", "chainrule.server.cli", "serve", "--port", "0", *args]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                        env={**os.environ, **(env or {})})
        line = self._first_line()
        if "listening on" not in line:
            self.stop(signal.SIGKILL)
            raise RuntimeError(f"the server did not start: {line!r}\n{self.log()}")
        self.address = line.split("listening on ", 1)[1].split()[0]

    def _first_line(self) -> str:
        import selectors

        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            if not selector.select(START_SECONDS):
                return ""
        return self.process.stdout.readline()

    @property
    def pid(self) -> int:
        return self.process.pid

    def send(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = STOP_SECONDS) -> int:
        return self.process.wait(timeout)

    def stop(self, signum: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()
        return self.process.returncode

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._log.close()


def slow_graph(steps: int, size: int = 200_000) -> Var:
    """A graph that computes for a while in small memory: ``steps`` log-sum-exps of one
    broadcast vector, added up (about 1 ms per step at the default size)."""
    g = GraphBuilder()
    big = ops.broadcast_to(g.input("x"), [size])
    total = ops.logsumexp(big)
    for _ in range(steps - 1):
        total = total + ops.logsumexp(big)
    return total
