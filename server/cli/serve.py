"""``chainrule serve``: run the gRPC server until SIGTERM or SIGINT, then drain it.

By default the server (with ``--workers``, the parent, for all its workers) makes a private
shared-memory directory before anything else and removes it when it exits (grpc_server.PrivateDirectory).
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from .. import config as config_module
from chainrule.plugins.manager import BrokenPluginsError, load_plugins

from ..grpc_server import SharedMemoryDirError, build_service, check_operators, create_server, shared_memory_for
from ..memory import tune_allocator
from ..workers import serve_workers


def add_serve_parser(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve", help="run the gRPC server",
        description="Serve the installed operators over gRPC until SIGTERM or SIGINT, then drain. Every setting "
                    "is a flag and a CHAINRULE_* environment variable (flags win).",
        epilog="Running it in production (--workers, replicas, TLS and tokens, health probes, limits, metrics, "
               "shared memory): docs/deploy.md.")
    config_module.add_arguments(serve)
    serve.set_defaults(run=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    config = config_module.from_sources(args)
    if config.tune_malloc:
        tune_allocator()
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        with shared_memory_for(config) as serving:  # a private directory, unless told otherwise: removed at exit
            return _serve(serving)
    except SharedMemoryDirError as exc:
        print(f"chainrule: error: {exc}", file=sys.stderr)
        return 2


def _serve(config: config_module.ServerConfig) -> int:
    """Load the plugins, then serve until SIGTERM or SIGINT (in worker processes with --workers)."""
    log = logging.getLogger("chainrule.server")
    try:  # broken plugins, or a plugin setting naming none: one line each, before any port is bound
        if config.workers > 1:  # each worker loads its own; look once here
            loaded = load_plugins(**config_module.plugin_filters(config)).raise_for_problems()
            if config.check_operators:  # check once here: the workers then read the verdicts from the cache
                check_operators(loaded, config)
        else:
            service = build_service(config)
    except BrokenPluginsError as exc:
        for line in exc.lines:
            print(f"chainrule: error: {line}", file=sys.stderr)
        print(f"chainrule: error: not serving with {len(exc.lines)} plugin problem{'s' * (len(exc.lines) != 1)}; "
              f"fix them, or leave broken plugins out by name with CHAINRULE_DISABLE_PLUGINS or --disable-plugins",
              file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:  # e.g. an unusable shared-memory folder
        print(f"chainrule: error: {exc}", file=sys.stderr)
        return 2
    if config.workers > 1:
        return serve_workers(config)
    try:
        server, port = create_server(config=config, service=service)
    except (OSError, ValueError) as exc:  # a port in use, an unreadable certificate or token file
        print(f"chainrule: error: {exc}", file=sys.stderr)
        return 2
    server.start()
    log.info("serving %d operators on %s:%d", len(server.service.registry), config.host, port)
    if server.metrics is not None:
        log.info("metrics on http://%s:%d/metrics", config.host, server.metrics.port)
    print(f"chainrule listening on {config.host}:{port}", flush=True)

    stopping = threading.Event()
    received: list[str] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signal.Signals(signum).name)
        log.info("received %s: draining for up to %.0fs", received[0], config.grace_seconds)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stopping.wait(0.5):
        pass
    server.drain(config.grace_seconds, reason=f"the server's shutdown ({received[0]})").wait()
    log.info("stopped")
    return 0
