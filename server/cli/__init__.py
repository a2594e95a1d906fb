"""The ``chainrule`` command: serve, ops, plugins, check, eval, render, train.

One module per family of subcommands; each adds its parsers and sets ``run``.
The subcommands that talk to a server share their connection flags
(connect.py); every failure becomes one line and an exit code in one place
(errors.py: 0 done, 1 failed, 2 usage, 130 interrupted, 141 stdout closed).
"""
from __future__ import annotations

import argparse
import difflib
import sys
from importlib import metadata
from typing import Sequence

from .connect import check_connection_arguments
from .errors import report
from .eval import add_eval_parser
from .plugins import add_plugin_parsers
from .render import add_render_parser
from .serve import add_serve_parser
from .train import add_train_parser


def installed_version() -> str:
    try:
        return metadata.version("chainrule")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = argparse.ArgumentParser(prog="chainrule", description="Reverse-mode automatic differentiation as a service.")
    parser.add_argument("--version", action="version", version=f"chainrule {installed_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(commands)
    add_plugin_parsers(commands)
    add_eval_parser(commands)
    add_train_parser(commands)
    add_render_parser(commands)
    return parser, commands


def unrecognized(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """argparse's message for arguments no parser took, with the closest flag when one is near."""
    text = f"unrecognized arguments: {' '.join(extras)}"
    flags = [flag for action in parser._actions for flag in action.option_strings]
    for extra in extras:
        if extra.startswith("--"):
            close = difflib.get_close_matches(extra.split("=", 1)[0], flags, n=1)
            if close:
                return f"{text} (did you mean {close[0]}?)"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser, commands = build_parser()
    # parse_known_args, then the subcommand's own error: a typo'd flag shows `chainrule eval`'s usage,
    # not the top-level one (argparse reports leftovers from the parser it started with).
    args, extras = parser.parse_known_args(argv)
    subparser = commands.choices[args.command]
    if extras:
        subparser.error(unrecognized(subparser, extras))
    check_connection_arguments(args, subparser)
    try:
        code = args.run(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not in Python's flush at exit
        return code
    except (Exception, KeyboardInterrupt) as exc:
        return report(exc)
