"""``chainrule ops [--json] [--server ADDR]``, ``chainrule plugins [--json]`` and ``chainrule check [--plugin NAME] [--op NAME]``.

All three load plugins like ``serve`` does, so CHAINRULE_PLUGINS,
CHAINRULE_DISABLE_PLUGINS and CHAINRULE_PREFER apply; ``ops --server`` lists
a running server's operators instead (ListOperators), in the same format.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from chainrule.plugins.checking import check_registry
from chainrule.plugins.manager import load_plugins, parse_names

from .connect import add_connection_arguments, remote_client


def add_plugin_parsers(commands: argparse._SubParsersAction) -> None:
    ops = commands.add_parser("ops", help="list the operators the installed plugins (or a server, --server) provide")
    ops.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_connection_arguments(ops, local=None, default_server=None)
    ops.set_defaults(run=cmd_ops)

    plugins = commands.add_parser("plugins", help="list the installed plugins: distribution, version, operators")
    plugins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    plugins.add_argument("--prefer", default=None, metavar="NAMES", help="plugins that win a name conflict (env CHAINRULE_PREFER)")
    plugins.set_defaults(run=cmd_plugins)

    check = commands.add_parser("check", help="compare every operator's vjp with finite differences; exit 1 on a failure")
    check.add_argument("--plugin", action="append", default=None, metavar="NAME",
                       help="only this plugin's operators (a name or its first dotted part: builtin); repeatable")
    check.add_argument("--op", action="append", default=None, metavar="NAME", help="only this operator; repeatable")
    check.add_argument("--prefer", default=None, metavar="NAMES", help="plugins that win a name conflict (env CHAINRULE_PREFER)")
    check.set_defaults(run=cmd_check)


def _load(args: argparse.Namespace):
    return load_plugins(prefer=parse_names(args.prefer))


def cmd_plugins(args: argparse.Namespace) -> int:
    loaded = _load(args)
    rows = [{"name": p.name, "distribution": p.distribution, "version": p.version, "builtin": p.builtin,
             "operators": list(p.operators)} for p in loaded.plugins]
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
        return 0
    table = [("PLUGIN", "DISTRIBUTION", "VERSION", "OPERATORS")]
    table += [(r["name"], r["distribution"] or "-", r["version"] or "-", ", ".join(r["operators"]) or "(none)")
              for r in rows]
    _print_table(table)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    loaded = _load(args)
    try:
        checks = check_registry(loaded.registry, args.op, plugins=args.plugin)
    except LookupError as exc:
        print(f"chainrule: error: {exc.args[0]}", file=sys.stderr)
        return 2
    if not checks:
        names = ", ".join(p.name for p in loaded.plugins) or "none"
        print(f"chainrule: error: no installed operator matches --plugin {' '.join(args.plugin or [])} "
              f"(plugins: {names})", file=sys.stderr)
        return 2
    table = [("OPERATOR", "PLUGIN", "SHAPES TRIED", "MAX ABS ERR", "MAX REL ERR", "RESULT")]
    table += [(c.op, c.plugin, c.shapes_text() or "-", _number(c.max_abs_error, c.checked),
               _number(c.max_rel_error, c.checked), c.status) for c in checks]
    _print_table(table)
    failed = [c for c in checks if not c.passed]
    for c in failed:
        print(f"\nFAILED {c.message}")
    exempt = sum(1 for c in checks if not c.checked)
    print(f"\n{len(checks)} operator{'s' * (len(checks) != 1)}: {len(checks) - len(failed) - exempt} passed, {len(failed)} failed, "
          f"{exempt} exempt (gradcheck=False)")
    return 1 if failed else 0


def _number(value: float, checked: bool) -> str:
    return f"{value:.2g}" if checked else "-"


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join([cell.ljust(w) for cell, w in zip(row, widths)] + [row[-1]]).rstrip())


def cmd_ops(args: argparse.Namespace) -> int:
    rows = remote_operators(args) if args.server else local_operators()
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


def _attr(kind: str, required: bool, default: object) -> dict:
    shown = not (required or default is None or kind == "tensor")
    return {"type": kind, "required": required, **({"default": default} if shown else {})}


def local_operators() -> list[dict]:
    """The installed plugins' operators, one JSON-ready row each."""
    return [
        {
            "name": op.name,
            "arity": "variadic" if op.variadic else op.arity,
            "attrs": {name: _attr(a.kind, a.required, a.default) for name, a in op.attrs.items()},
            "plugin": op.plugin, "distribution": op.distribution, "version": op.version, "doc": op.doc,
        }
        for op in load_plugins().registry
    ]


def remote_operators(args: argparse.Namespace) -> list[dict]:
    """A server's operators (ListOperators), in local_operators' rows (an empty provenance field as null)."""
    with remote_client(args) as client:
        operators = client.operators()
    return [
        {
            "name": op.name,
            "arity": "variadic" if op.arity < 0 else op.arity,
            "attrs": {name: _attr(a.type, a.required, a.default) for name, a in op.attrs.items()},
            "plugin": op.plugin, "distribution": op.distribution or None, "version": op.version or None,
            "doc": op.doc,
        }
        for op in operators
    ]
