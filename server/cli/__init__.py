"""The ``chainrule`` command: serve, ops, plugins, check, eval, render, train.

One module per family of subcommands; each adds its parsers and sets ``run``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from chainrule.core.errors import PluginError

from .. import config as config_module
from .eval import add_eval_parser
from .plugins import add_plugin_parsers
from .render import add_render_parser
from .serve import add_serve_parser
from .train import add_train_parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chainrule", description="Reverse-mode automatic differentiation as a service.")
    commands = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(commands)
    add_plugin_parsers(commands)
    add_eval_parser(commands)
    add_train_parser(commands)
    add_render_parser(commands)
    args = parser.parse_args(argv)
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
