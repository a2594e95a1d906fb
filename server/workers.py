"""``chainrule serve --workers N``: N processes serving one port, one per core.

Python runs one evaluation per core at a time (the GIL), so past one core the
server runs as several processes. The parent reserves the port, forks the
workers before any gRPC object exists (gRPC does not survive a fork), and each
worker binds the same port with SO_REUSEPORT: the kernel spreads incoming
connections over them. The parent itself serves nothing: it forwards SIGTERM
and SIGINT to the workers (each drains gracefully), serves the metrics of all
workers when asked, and exits 0 once every worker has exited 0. When one
worker exits, the others are stopped too; if it crashed (a nonzero exit code)
the parent exits 1, so the supervisor (Kubernetes, systemd) restarts the whole
unit: no home-made process management beyond that.
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
from dataclasses import replace
from multiprocessing.synchronize import Semaphore

from .auth import read_tokens
from .config import ServerConfig
from .grpc_server import create_server
from .tls import read_pems

log = logging.getLogger("chainrule.server")

#: Seconds a worker gets to load plugins and bind its port.
STARTUP_SECONDS = 60.0
#: Seconds beyond the grace period before a worker that ignores SIGTERM is killed.
KILL_AFTER_SECONDS = 5.0
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


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
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda *_: stopping.set())
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by the parent around the fork
    server, _ = create_server(config=config, worker=index, options=[("grpc.so_reuseport", 1)],
                              export_metrics=False)
    server.start()
    log.info("worker %d (pid %d) serving on %s", index, os.getpid(), config.address)
    ready.release()
    while not stopping.wait(0.5):
        pass
    server.drain(config.grace_seconds).wait()
    log.info("worker %d (pid %d) stopped", index, os.getpid())


def serve_workers(config: ServerConfig) -> int:
    """Run ``config.workers`` worker processes on one port until SIGTERM/SIGINT; 0 when all stopped cleanly."""
    try:  # settings every worker would trip over: say so once, before forking
        read_pems(config.tls_cert, config.tls_key, config.tls_client_ca)
        if config.token_file:
            read_tokens(config.token_file)
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
        return _supervise(config, reserved.getsockname()[1], metrics_dir is not None)
    finally:
        reserved.close()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _supervise(config: ServerConfig, port: int, with_metrics: bool) -> int:
    context = multiprocessing.get_context("fork")
    worker_config = replace(config, port=port, workers=1)
    ready = context.Semaphore(0)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s: draining %d workers for up to %.0fs", signal.Signals(signum).name,
                 config.workers, config.grace_seconds)
        stopping.set()

    for signum in STOP_SIGNALS:
        signal.signal(signum, on_signal)
    workers = [context.Process(target=_worker, args=(worker_config, i, ready), name=f"chainrule-worker-{i}")
               for i in range(config.workers)]
    # Signals wait until every worker has its own handlers: none is lost in between.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        for process in workers:
            process.start()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    exporter = None
    try:
        if not _await_ready(workers, ready, stopping):
            log.error("a worker failed to start; stopping the others")
            _stop(workers, config.grace_seconds)
            return 1
        if with_metrics:
            from .metrics import multiprocess_exporter

            exporter = multiprocess_exporter(config.host, config.metrics_port)
        print(f"chainrule listening on {config.host}:{port} ({config.workers} workers)", flush=True)
        ended = _watch(workers, stopping)
        if ended is not None:  # exit code 0: it was signalled itself (Ctrl-C reaches the whole process group)
            (log.info if ended.exitcode == 0 else log.error)(
                "worker pid %d exited with code %s; stopping the others", ended.pid, ended.exitcode)
        codes = _stop(workers, config.grace_seconds)
        log.info("stopped (worker exit codes %s)", codes)
        return 0 if all(code == 0 for code in codes) else 1
    finally:
        if exporter is not None:
            exporter.close()
        if with_metrics:
            from .metrics import forget_process

            for process in workers:
                if process.pid is not None:
                    forget_process(process.pid)


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


def _watch(workers: list, stopping: threading.Event):
    """Block until a stop is asked for (None) or a worker exits (that worker)."""
    sentinels = {p.sentinel: p for p in workers}
    while not stopping.is_set():
        done = multiprocessing.connection.wait(list(sentinels), timeout=0.5)
        if done:
            return sentinels[done[0]]
    return None


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
