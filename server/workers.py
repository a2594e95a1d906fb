"""``chainrule serve --workers N``: N processes serving one port, one per core.

Python runs one evaluation per core at a time (the GIL), so past one core the
server runs as several processes. The parent reserves the port, forks the
workers before any gRPC object exists (gRPC does not survive a fork), and each
worker binds the same port with SO_REUSEPORT: the kernel spreads incoming
connections over them. The parent itself serves nothing: it forwards SIGTERM
and SIGINT to the workers (each drains gracefully), serves the metrics of all
workers when asked, and exits 0 once every worker has exited 0. A worker that
dies unexpectedly (killed, crashed: a nonzero exit code) is restarted after a
backoff while the others keep serving; one that crashes MAX_RESTARTS times
within RESTART_WINDOW_SECONDS is a crash loop, so the parent stops the others
and exits 1 for the supervisor (Kubernetes, systemd) to restart the whole unit.
A worker that exits 0 was told to stop (someone signalled it): the others are
stopped too. Shared memory (on by default) goes through one directory the parent
makes before forking (unless ``--shared-memory-dir`` names one) and removes when
it exits; every worker advertises it, and none removes it.
"""
from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import replace
from multiprocessing.synchronize import Semaphore

from chainrule.core import parallel

from .auth import read_tokens
from .config import ServerConfig
from .grpc_server import SharedMemoryDirError, create_server, shared_memory_for
from .ports import check_port_free
from .tls import read_pems

log = logging.getLogger("chainrule.server")

#: Seconds a worker gets to load plugins and bind its port.
STARTUP_SECONDS = 60.0
#: Seconds beyond the grace period before a worker that ignores SIGTERM is killed.
KILL_AFTER_SECONDS = 5.0
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
#: A worker that died is restarted after this many seconds, doubled for each of its recent
#: crashes (0.5, 1, 2, 4, 8...), at most MAX_RESTART_BACKOFF_SECONDS.
RESTART_BACKOFF_SECONDS = 0.5
MAX_RESTART_BACKOFF_SECONDS = 30.0
#: Restarts of one worker allowed within RESTART_WINDOW_SECONDS; its next crash in the window
#: is a crash loop: the parent stops the others and exits 1.
MAX_RESTARTS = 5
RESTART_WINDOW_SECONDS = 60.0


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) ``host:port`` with SO_REUSEPORT, so the port (0: a free one) stays ours."""
    family, _, _, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    return sock


def _worker(config: ServerConfig, index: int, ready: Semaphore) -> None:
    """Body of one worker process: serve until SIGTERM/SIGINT, then drain."""
    stopping = threading.Event()
    received: list[str] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signal.Signals(signum).name)
        stopping.set()

    for signum in STOP_SIGNALS:
        signal.signal(signum, on_signal)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by the parent around the fork
    # the cores are shared out between the workers: each runs a large elementwise node on its share
    parallel.set_threads(max(1, parallel.threads() // config.workers))
    server, _ = create_server(config=config, worker=index, options=[("grpc.so_reuseport", 1)],
                              export_metrics=False)
    server.start()
    log.info("worker %d (pid %d) serving on %s", index, os.getpid(), config.address)
    ready.release()
    while not stopping.wait(0.5):
        pass
    server.drain(config.grace_seconds, reason=f"the server's shutdown ({received[0]})").wait()
    log.info("worker %d (pid %d) stopped", index, os.getpid())


def serve_workers(config: ServerConfig) -> int:
    """Run ``config.workers`` worker processes on one port until SIGTERM/SIGINT; 0 when all stopped cleanly."""
    try:  # settings every worker would trip over: say so once, before forking
        read_pems(config.tls_cert, config.tls_key, config.tls_client_ca)
        if config.token_file:
            read_tokens(config.token_file)
        check_port_free(config.host, config.port)  # SO_REUSEPORT would let us join another server's port
        reserved = reserve_port(config.host, config.port)
    except (OSError, ValueError) as exc:
        print(f"chainrule: error: {exc}", file=sys.stderr)
        return 2
    metrics_dir = None
    if config.metrics_port:
        # Set before prometheus_client is first imported (in the workers, and here for the exporter).
        metrics_dir = tempfile.mkdtemp(prefix="chainrule-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        # The workers get the directory by name, as if given --shared-memory-dir: none removes it.
        with shared_memory_for(config) as serving:
            return _supervise(serving, reserved.getsockname()[1], metrics_dir is not None)
    except SharedMemoryDirError as exc:
        print(f"chainrule: error: {exc}", file=sys.stderr)
        return 2
    finally:
        reserved.close()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _supervise(config: ServerConfig, port: int, with_metrics: bool) -> int:
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s: draining %d workers for up to %.0fs", signal.Signals(signum).name,
                 config.workers, config.grace_seconds)
        stopping.set()

    for signum in STOP_SIGNALS:
        signal.signal(signum, on_signal)
    pool = _Pool(replace(config, port=port, workers=1), config.workers, with_metrics)
    pool.start(range(config.workers))
    exporter = None
    try:
        if not _await_ready(pool.processes, pool.ready, stopping):
            log.error("a worker failed to start; stopping the others")
            _stop(pool.processes, config.grace_seconds)
            return 1
        if with_metrics:
            from .metrics import multiprocess_exporter

            exporter = multiprocess_exporter(config.host, config.metrics_port)
        print(f"chainrule listening on {config.host}:{port} ({config.workers} workers)", flush=True)
        ended = pool.watch(stopping)
        codes = _stop([p for p in pool.processes if p is not None], config.grace_seconds)
        log.info("stopped (worker exit codes %s)", codes)
        if ended is not None and ended.exitcode != 0:  # a crash loop: the unit is restarted from outside
            return 1
        return 0 if all(code == 0 for code in codes) else 1
    finally:
        if exporter is not None:
            exporter.close()
        if with_metrics:
            from .metrics import forget_process

            for pid in pool.pids:
                forget_process(pid)


class _Pool:
    """The worker processes, by index; a dead one is replaced by a new process of the same index."""

    def __init__(self, config: ServerConfig, size: int, with_metrics: bool) -> None:
        self.config = config
        self.with_metrics = with_metrics
        self.context = multiprocessing.get_context("fork")
        self.ready = self.context.Semaphore(0)
        self.processes: list = [None] * size
        self.pids: list[int] = []  # every worker ever started (their metrics files)
        self.crashes: list[deque[float]] = [deque() for _ in range(size)]

    def start(self, indices) -> None:
        # Signals wait until every new worker has its own handlers: none is lost in between.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            for index in indices:
                process = self.context.Process(target=_worker, args=(self.config, index, self.ready),
                                               name=f"chainrule-worker-{index}")
                process.start()
                self.processes[index] = process
                self.pids.append(process.pid)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def watch(self, stopping: threading.Event):
        """Restart workers that die until a stop is asked for (None), a worker exits 0 (that worker:
        it was told to stop), or one crashes in a loop (that worker)."""
        due: dict[int, float] = {}  # index -> when to restart it
        while not stopping.is_set():
            live = {p.sentinel: i for i, p in enumerate(self.processes) if p is not None}
            wait = 0.5 if not due else max(0.0, min(0.5, min(due.values()) - time.monotonic()))
            for sentinel in multiprocessing.connection.wait(list(live), timeout=wait):
                index = live[sentinel]
                process = self.processes[index]
                process.join()
                if process.exitcode == 0:  # signalled itself (Ctrl-C reaches the whole process group)
                    log.info("worker %d (pid %d) exited; stopping the others", index, process.pid)
                    return process
                delay = self._crashed(index, process)
                if delay is None:
                    return process
                due[index] = time.monotonic() + delay
                self.processes[index] = None  # a stop before its restart does not count it
            now = time.monotonic()
            restart = [i for i, when in due.items() if when <= now]
            if restart and not stopping.is_set():
                self.start(restart)
                for index in restart:
                    del due[index]
                    log.warning("worker %d restarted as pid %d", index, self.processes[index].pid)
        return None

    def _crashed(self, index: int, process) -> float | None:
        """Log a worker's unexpected end; the seconds before its restart, or None for a crash loop."""
        if self.with_metrics:  # its in-flight gauges end with it; its counters still count
            from .metrics import forget_process

            forget_process(process.pid)
        now = time.monotonic()
        crashes = self.crashes[index]
        while crashes and crashes[0] < now - RESTART_WINDOW_SECONDS:
            crashes.popleft()
        how = f"exited with code {process.exitcode}"
        if process.exitcode < 0:
            try:
                how = f"was killed by {signal.Signals(-process.exitcode).name}"
            except ValueError:
                how = f"was killed by signal {-process.exitcode}"
        if len(crashes) >= MAX_RESTARTS:
            log.error("worker %d (pid %d) %s: %d crashes within %.0f s, a crash loop; stopping the others",
                      index, process.pid, how, len(crashes) + 1, RESTART_WINDOW_SECONDS)
            return None
        crashes.append(now)
        delay = min(MAX_RESTART_BACKOFF_SECONDS, RESTART_BACKOFF_SECONDS * 2 ** (len(crashes) - 1))
        log.error("worker %d (pid %d) %s; restarting it in %.1f s (restart %d of %d allowed within %.0f s); "
                  "the other workers keep serving", index, process.pid, how, delay, len(crashes), MAX_RESTARTS,
                  RESTART_WINDOW_SECONDS)
        return delay


def _await_ready(workers: list, ready: Semaphore, stopping: threading.Event) -> bool:
    """Wait until every worker reports it is serving (False if one died first or time ran out)."""
    deadline = time.monotonic() + STARTUP_SECONDS
    started = 0
    while started < len(workers) and not stopping.is_set():
        if ready.acquire(timeout=0.2):
            started += 1
        elif time.monotonic() > deadline or any(p.exitcode is not None for p in workers):
            return False
    return True


def _stop(workers: list, grace: float) -> list[int | None]:
    """SIGTERM every live worker, wait for its drain, kill what is left; the exit codes."""
    for process in workers:
        if process.exitcode is None:
            os.kill(process.pid, signal.SIGTERM)
    for process in workers:
        process.join(grace + KILL_AFTER_SECONDS)
        if process.exitcode is None:
            log.error("worker pid %d ignored SIGTERM; killing it", process.pid)
            process.kill()
            process.join()
    return [process.exitcode for process in workers]
