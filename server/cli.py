"""The ``chainrule`` command: serve, ops, eval (and more as issues add them)."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from typing import Sequence

from . import config as config_module


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chainrule", description="Reverse-mode automatic differentiation as a service.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gRPC server")
    config_module.add_arguments(serve)
    serve.set_defaults(run=cmd_serve)

    ops = commands.add_parser("ops", help="list the operators the installed plugins provide")
    ops.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ops.set_defaults(run=cmd_ops)

    from .cli_eval import add_eval_parser

    add_eval_parser(commands)
    from .cli_train import add_train_parser

    add_train_parser(commands)
    from .cli_render import add_render_parser
    add_render_parser(commands)

    from .cli_plugins import add_plugin_parsers

    add_plugin_parsers(commands)

    args = parser.parse_args(argv)
    from chainrule.core.errors import PluginError

    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except PluginError as exc:  # a plugin that cannot load, or a name conflict: say which, no traceback
        print(f"chainrule: error: {exc.message}", file=sys.stderr)
        return 1
    except config_module.ConfigError as exc:  # a bad CHAINRULE_* variable: like argparse's usage errors
        print(f"chainrule: error: {exc}", file=sys.stderr)
        return 2


def cmd_serve(args: argparse.Namespace) -> int:
    from .app import create_running_server

    config = config_module.from_sources(args)
    if config.tune_malloc:
        from .memory import tune_allocator

        tune_allocator()
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("chainrule.server")
    if config.workers > 1:
        from .workers import serve_workers

        return serve_workers(config)
    try:
        running, port = create_running_server(config=config)
    except (OSError, ValueError) as exc:  # a port in use, an unreadable certificate or token file
        print(f"chainrule: error: {exc}", file=sys.stderr)
        return 2
    running.server.start()
    log.info("serving %d operators on %s:%d", len(running.service.registry), config.host, port)
    if running.metrics is not None:
        log.info("metrics on http://%s:%d/metrics", config.host, running.metrics.port)
    print(f"chainrule listening on {config.host}:{port}", flush=True)

    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s: draining for up to %.0fs", signal.Signals(signum).name, config.grace_seconds)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stopping.wait(0.5):
        pass
    running.drain(config.grace_seconds).wait()
    log.info("stopped")
    return 0


def cmd_ops(args: argparse.Namespace) -> int:
    from chainrule.plugins.manager import load_plugins

    registry = load_plugins().registry
    rows = [
        {
            "name": op.name,
            "arity": "variadic" if op.variadic else op.arity,
            "attrs": {name: {"type": a.kind, "required": a.required,
                             **({} if a.required or a.default is None or a.kind == "tensor" else {"default": a.default})}
                      for name, a in op.attrs.items()},
            "plugin": op.plugin, "distribution": op.distribution, "version": op.version, "doc": op.doc,
        }
        for op in registry
    ]
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
        return 0
    width = max((len(r["name"]) for r in rows), default=4)
    pwidth = max((len(r["plugin"]) for r in rows), default=6)
    for r in rows:
        attrs = ", ".join(f"{k}:{v['type']}" for k, v in r["attrs"].items())
        print(f"{r['name']:<{width}}  {r['plugin']:<{pwidth}}  {attrs:<28}  {r['doc']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
