"""Build a chainrule gRPC server: the servicer, health, reflection, interceptors, credentials, a port.

``create_server`` returns a :class:`ChainruleServer` that is built but not yet
started, and the port it bound (port 0 picks a free one), as gRPC's own
examples do: tests start it on a loopback port, ``chainrule serve`` starts it
and drains it on a signal.

Unless told otherwise (``shared_memory=False``, or a ``shared_memory_dir`` of
its own), a server makes a private shared-memory directory for clients on its
host (:class:`PrivateDirectory`) and removes it when it stops.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import threading
import time
import weakref
from concurrent import futures
from dataclasses import replace
from typing import Any, Iterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from chainrule.plugins.manager import Loaded, load_plugins
from chainrule.v1 import chainrule_pb2 as pb

from . import auth, reflection, tls
from .config import ServerConfig, plugin_filters
from .metrics import Exporter, Metrics
from .ports import check_port_free
from .service import ChainruleService
from .servicer import SERVICE_NAME, Servicer, add_servicer

log = logging.getLogger("chainrule.server")


#: Where a private shared-memory directory is made: RAM-backed /dev/shm when this user may write
#: there, else the system's temp dir (tempfile.gettempdir(): TMPDIR, /tmp...).
SHARED_MEMORY_BASE = "/dev/shm"
#: Private directories are named this, then random characters (tempfile.mkdtemp).
PRIVATE_PREFIX = "chainrule-shm-"
#: A private directory left by a server killed outright is removed by the next server that starts
#: once nothing in it has changed for this long (and no live process holds its lock).
ABANDONED_SECONDS = 60.0


class SharedMemoryDirError(OSError):
    """No private shared-memory directory could be made (the message names the ways out)."""


class PrivateDirectory:
    """A fresh shared-memory directory of this server's own: randomly named, mode 0700, owned by
    this user (tempfile.mkdtemp), in ``base``: by default /dev/shm when it is writable, else the
    temp dir.

    :meth:`close` removes it with every file in it, in the process that made it only (forked
    workers share their parent's and leave it alone); so does the interpreter's exit, should
    nobody close it. A server killed outright (SIGKILL) cannot: its directory stays locked
    (flock) only while a process of it lives, and the next server to start here removes it.
    """

    def __init__(self, base: str | None = None) -> None:
        if base is None:
            base = SHARED_MEMORY_BASE if os.access(SHARED_MEMORY_BASE, os.W_OK | os.X_OK) else tempfile.gettempdir()
        _remove_abandoned(base)
        try:
            self.path = tempfile.mkdtemp(prefix=PRIVATE_PREFIX, dir=base)
        except OSError as exc:
            raise SharedMemoryDirError(
                f"cannot make a shared-memory directory in {base}: {exc.strerror}; name one with "
                "--shared-memory-dir (CHAINRULE_SHARED_MEMORY_DIR), or serve without shared memory "
                "(--no-shared-memory)") from None
        # Held (shared) while this process or a forked worker lives; see _remove_abandoned.
        lock = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        fcntl.flock(lock, fcntl.LOCK_SH)
        self._finalizer = weakref.finalize(self, _remove_directory, self.path, lock, os.getpid())

    def close(self) -> None:
        self._finalizer()


def _remove_directory(path: str, lock: int, creator: int) -> None:
    if os.getpid() == creator:
        shutil.rmtree(path, ignore_errors=True)
    os.close(lock)


def _remove_abandoned(base: str) -> None:
    """Remove the private directories in ``base`` that servers killed outright left behind: this
    user's, unchanged for ABANDONED_SECONDS, and locked by no live process (a lock dies with its
    last holder, whatever its pid namespace)."""
    try:
        names = [name for name in os.listdir(base) if name.startswith(PRIVATE_PREFIX)]
    except OSError:
        return
    for name in names:
        path = os.path.join(base, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:  # not a directory, a symlink, another user's: not ours to judge
            continue
        try:
            info = os.fstat(fd)
            if info.st_uid == os.geteuid() and time.time() - info.st_mtime >= ABANDONED_SECONDS and _unlocked(fd):
                log.info("removing %s, left by a server that is gone", path)
                shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)


def _unlocked(fd: int) -> bool:
    """Whether no process holds ``fd``'s file locked (it then stays locked by us until closed)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def private_directory_for(config: ServerConfig) -> PrivateDirectory | None:
    """A private directory when ``config`` asks for one (shared memory on, no directory named)."""
    return PrivateDirectory() if config.shared_memory and not config.shared_memory_dir else None


@contextlib.contextmanager
def shared_memory_for(config: ServerConfig) -> Iterator[ServerConfig]:
    """``config`` with the directory it serves shared memory from: a private one made for the
    block when it asks for one, removed with its files when the block ends (also by an exception
    or a signal that ends it); otherwise ``config`` as it is."""
    private = private_directory_for(config)
    if private is None:
        yield config
        return
    try:
        log.info("shared memory for clients on this host, running as this user: %s", private.path)
        yield replace(config, shared_memory_dir=private.path)
    finally:
        private.close()


class ChainruleServer:
    """A built gRPC server with its health service: start it, stop it, or drain it gracefully."""

    def __init__(self, server: grpc.Server, health_servicer: health.HealthServicer, service: ChainruleService,
                 metrics: Exporter | None = None, servicer: Servicer | None = None,
                 private_directory: PrivateDirectory | None = None) -> None:
        #: The underlying ``grpc.Server``.
        self.grpc_server = server
        self.health = health_servicer
        self.service = service
        self.servicer = servicer
        #: The Prometheus endpoint (``metrics.port``), when metrics are on and exported by this process.
        self.metrics = metrics
        #: The shared-memory directory this server made for itself, removed once it has stopped.
        self.private_directory = private_directory

    def start(self) -> None:
        self.grpc_server.start()

    def stop(self, grace: float | None) -> threading.Event:
        """Stop at once (``grace`` None) or after ``grace`` seconds; the event is set once stopped,
        and a private shared-memory directory is removed then."""
        if self.metrics is not None:
            self.metrics.close()
        stopped = self.grpc_server.stop(grace)
        if self.private_directory is not None:
            _close_when(stopped, self.private_directory)
        return stopped

    def drain(self, grace: float, reason: str = "the server's shutdown") -> threading.Event:
        """Report NOT_SERVING, refuse new calls (UNAVAILABLE), let in-flight ones finish within
        ``grace``; training runs end at their next step with what they trained, stopped early for
        ``reason``."""
        self.health.enter_graceful_shutdown()
        stopped = self.stop(grace)
        if self.servicer is not None:
            runs = self.servicer.wind_down(reason)
            if runs:
                log.info("%d training run%s told to stop early (%s)", runs, "s" * (runs != 1), reason)
        return stopped

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self.grpc_server.wait_for_termination(timeout)


def _close_when(stopped: threading.Event, directory: PrivateDirectory) -> None:
    """Remove ``directory`` once ``stopped`` is set: now if it is, else from a thread (calls in
    their grace period still read and write its files)."""
    if stopped.is_set():
        directory.close()
        return
    threading.Thread(target=lambda: (stopped.wait(), directory.close()), name="chainrule-shm-cleanup",
                     daemon=True).start()


def connection_age_options(config: ServerConfig) -> list[tuple[str, int]]:
    """Close connections after ``max_connection_age_seconds`` (GOAWAY; calls in flight get the grace period)."""
    if config.max_connection_age_seconds <= 0:
        return []
    return [("grpc.max_connection_age_ms", int(config.max_connection_age_seconds * 1000)),
            ("grpc.max_connection_age_grace_ms", int(config.grace_seconds * 1000))]


def build_service(config: ServerConfig, loaded: Loaded | None = None) -> ChainruleService:
    """The service ``config`` describes: its plugins (checked when it asks), limits and caches.

    Raises BrokenPluginsError (one line per problem) when a plugin is broken or a plugin setting
    names no installed plugin: a server does not start without the operators it was asked for;
    leave a broken plugin out by name (CHAINRULE_DISABLE_PLUGINS) to serve the others.
    """
    loaded = (loaded or load_plugins(**plugin_filters(config))).raise_for_problems()
    checks, refused = None, []
    if config.check_operators:  # refuse third-party operators whose vjp disagrees with finite differences
        everything = loaded.registry
        loaded, verdicts = check_operators(loaded, config)
        checks = {c.op: pb.CHECK_PASSED if c.passed else pb.CHECK_FAILED for c in verdicts if c.checked}
        refused = [everything[c.op] for c in verdicts if not c.passed]
    shared_memory_dir = config.shared_memory_dir if config.shared_memory else ""
    return ChainruleService(loaded, config.limits(), graph_cache_size=config.graph_cache_size, checks=checks,
                            refused=refused, shared_memory_dir=shared_memory_dir)


def check_operators(loaded: Loaded, config: ServerConfig) -> tuple[Loaded, list[Any]]:
    """Gradient-check the operators of third-party plugins (through the cache the config names);
    return ``loaded`` without those that failed, and the verdicts."""
    from chainrule.plugins.checking import CheckCache, check_and_refuse

    cache = None if config.check_cache_file.strip().lower() == "off" else CheckCache(config.check_cache_file or None, log)
    return check_and_refuse(loaded, log, builtins=False, cache=cache)


def create_server(
    address: str | None = None,
    config: ServerConfig | None = None,
    *,
    service: ChainruleService | None = None,
    worker: int = 0,
    options: list[tuple[str, Any]] | None = None,
    export_metrics: bool = True,
) -> tuple[ChainruleServer, int]:
    """Build (not start) a server on ``address`` (default: the config's; port 0 picks a free
    port); returns it and its port. ``service`` defaults to one built from ``config``, then
    with a private shared-memory directory when the config asks for one (the default), which
    the server removes when it stops; a given ``service`` keeps the directory it has.
    ``export_metrics=False`` records metrics without serving them (a worker process whose
    parent serves the metrics of all workers)."""
    config = (config or ServerConfig()).validate()
    private = None if service is not None else private_directory_for(config)
    if private is not None:
        config = replace(config, shared_memory_dir=private.path)
    try:
        server, port = _build_server(address or config.address, config, service or build_service(config),
                                     worker, list(options or []), export_metrics)
    except BaseException:
        if private is not None:
            private.close()
        raise
    server.private_directory = private
    return server, port


def _build_server(bind: str, config: ServerConfig, service: ChainruleService, worker: int,
                  options: list[tuple[str, Any]], export_metrics: bool) -> tuple[ChainruleServer, int]:
    """create_server's work once its config and service are settled."""
    metrics = Metrics() if config.metrics_port else None
    # Outermost first: metrics count every call, refused ones too; auth refuses before parsing.
    # (Malformed requests are refused by the servicer's own handlers: see add_servicer. With
    # neither metrics nor tokens, no interceptor runs: gRPC then spends nothing on them per call.)
    interceptors = [i for i in (metrics and metrics.interceptor(service),
                                auth.interceptor_for(config.token_file, config.open_health_and_reflection)) if i]
    # Threads: one per admitted call, one per open EvaluateStream (which waits for its client's
    # messages in it, without an admission slot), and spare ones so that refusals and health
    # checks are answered at once whatever the others do. gRPC's own limit is only a backstop
    # (it counts calls until their clean-up ends).
    spare = max(4, config.max_concurrent // 2)
    threads = config.max_concurrent + config.max_streams + spare
    # No SO_REUSEPORT unless asked (--workers shares its own port): a busy port is refused, not shared.
    shared_port = dict(options).get("grpc.so_reuseport", 0)
    if not shared_port:
        host, _, port_text = bind.rpartition(":")
        if port_text.isdigit():
            check_port_free(host, int(port_text))  # one line, before gRPC's bind (which logs several)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="chainrule"),
        maximum_concurrent_rpcs=threads + config.max_concurrent,
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", config.message_limit),
            ("grpc.max_send_message_length", config.message_limit),
            *connection_age_options(config),
            ("grpc.so_reuseport", shared_port),
            *(o for o in options if o[0] != "grpc.so_reuseport"),
        ],
    )
    servicer = Servicer(service, config, worker)
    add_servicer(server, servicer)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if config.reflection:
        # v1 and v1alpha (grpcio-reflection has only v1alpha), with the contract's comments
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), server,
        )
    credentials = tls.server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
    try:
        port = server.add_secure_port(bind, credentials) if credentials else server.add_insecure_port(bind)
    except RuntimeError as exc:  # grpc raises RuntimeError when the address is taken or invalid
        raise OSError(f"could not bind {bind}: {exc}") from None
    exporter = Exporter(metrics.registry, config.host, config.metrics_port) if metrics and export_metrics else None
    return ChainruleServer(server, health_servicer, service, exporter, servicer), port
