"""``chainrule ops [--json] [--server ADDR]``, ``chainrule plugins [--json]`` and
``chainrule check [--plugin NAME] [--op NAME] [--cases] [--json]``.

``check`` compares each operator's vjp with finite differences and, for an operator with symbolic
rules (docs/derivatives.md), its second derivatives (vjp_graph) and JVPs (jvp_graph): ``--cases``
lists those as "second order" and "jvp" lines, and the summary names the operators without them
("first order only", not a failure); ``--json`` gives each verdict's "derivatives".

All three load plugins like ``serve`` does, so CHAINRULE_PLUGINS,
CHAINRULE_DISABLE_PLUGINS and CHAINRULE_PREFER apply; ``ops --server`` lists
a running server's operators instead (ListOperators), in the same format.

A broken plugin (see chainrule.plugins.manager) is left out and reported on
stderr, one line each, and so is a name in those settings that matches no
plugin: ``plugins`` lists them and exits 1; ``check`` exits 1 when a broken
plugin is among those it checks (a warning for the others) and 2 for an
unmatched name; ``ops`` warns and exits 0.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from chainrule.core.dtypes import ALL_DTYPES
from chainrule.core.operator import described_inputs
from chainrule.plugins.checking import check_registry
from chainrule.plugins.manager import Loaded, load_plugins, parse_names, plugin_matches
from chainrule.plugins.testing import FIRST_ORDER_ONLY

from .connect import add_connection_arguments, remote_client


def add_plugin_parsers(commands: argparse._SubParsersAction) -> None:
    ops = commands.add_parser("ops", help="list the operators the installed plugins (or a server, --server) provide")
    ops.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ops.add_argument("--prefer", default=None, metavar="NAMES", help="plugins that win a name conflict (env CHAINRULE_PREFER)")
    add_connection_arguments(ops, local=None, default_server=None)
    ops.set_defaults(run=cmd_ops)

    plugins = commands.add_parser("plugins", help="list the installed plugins: distribution, version, operators")
    plugins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    plugins.add_argument("--prefer", default=None, metavar="NAMES", help="plugins that win a name conflict (env CHAINRULE_PREFER)")
    plugins.set_defaults(run=cmd_plugins)

    check = commands.add_parser("check", help="compare every operator's vjp (and its symbolic rules: second derivatives, "
                                              "JVPs) with finite differences; exit 1 on a failure")
    check.add_argument("--plugin", action="append", default=None, metavar="NAME",
                       help="only this plugin's operators (a name or its first dotted part: builtin); repeatable")
    check.add_argument("--op", action="append", default=None, metavar="NAME", help="only this operator; repeatable")
    check.add_argument("--prefer", default=None, metavar="NAMES", help="plugins that win a name conflict (env CHAINRULE_PREFER)")
    check.add_argument("--cases", action="store_true",
                       help="after the table, every case tried: its kind, inputs, attributes and result")
    check.add_argument("--json", action="store_true", help="print the verdicts and their cases as JSON instead of a table")
    check.set_defaults(run=cmd_check)


def _load(args: argparse.Namespace) -> Loaded:
    return load_plugins(prefer=parse_names(args.prefer))


def _report(lines: Sequence[str], level: str) -> None:
    for line in lines:
        print(f"chainrule: {level}: {line}", file=sys.stderr)


def cmd_plugins(args: argparse.Namespace) -> int:
    loaded = _load(args)
    rows = [{"name": p.name, "distribution": p.distribution, "version": p.version, "builtin": p.builtin,
             "operators": list(p.operators), "broken": False, "problem": None} for p in loaded.plugins]
    rows += [{"name": b.name, "distribution": b.distribution, "version": b.version, "builtin": b.builtin,
              "operators": [], "broken": True, "problem": b.message} for b in loaded.broken]
    code = 1 if loaded.problems else 0
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
        _report(loaded.problems, "error")
        return code
    table = [("PLUGIN", "DISTRIBUTION", "VERSION", "OPERATORS")]
    table += [(r["name"], r["distribution"] or "-", r["version"] or "-",
               "BROKEN (not loaded)" if r["broken"] else ", ".join(r["operators"]) or "(none)") for r in rows]
    _print_table(table)
    sys.stdout.flush()
    _report(loaded.problems, "error")
    return code


def cmd_check(args: argparse.Namespace) -> int:
    loaded = _load(args)
    if loaded.unmatched:
        _report(loaded.problems, "error")
        return 2
    selected = args.plugin
    mine = [b for b in loaded.broken if selected is None or plugin_matches(b.name, selected)]
    _report([b.message for b in loaded.broken if b not in mine], "warning")
    try:
        checks = check_registry(loaded.registry, args.op, plugins=args.plugin)
    except LookupError as exc:
        _report([b.message for b in mine], "error")
        print(f"chainrule: error: {exc.args[0]}", file=sys.stderr)
        return 1 if mine else 2
    if not checks:
        if mine:
            _report([b.message for b in mine], "error")
            return 1
        names = ", ".join(p.name for p in loaded.plugins) or "none"
        print(f"chainrule: error: no installed operator matches --plugin {' '.join(args.plugin or [])} "
              f"(plugins: {names})", file=sys.stderr)
        return 2
    failed = [c for c in checks if not c.passed]
    if getattr(args, "json", False):
        json.dump([_check_row(c) for c in checks], sys.stdout, indent=2)
        print()
        sys.stdout.flush()
        _report([b.message for b in mine], "error")
        return 1 if failed or mine else 0
    table = [("OPERATOR", "PLUGIN", "SHAPES TRIED", "ATTRIBUTES TRIED", "MAX ABS ERR", "MAX REL ERR", "RESULT")]
    table += [(c.op, c.plugin, c.shapes_text() or "-", c.attrs_text() or "-", _number(c.max_abs_error, c.checked),
               _number(c.max_rel_error, c.checked), c.status) for c in checks]
    _print_table(table)
    if getattr(args, "cases", False):
        for c in checks:
            print(f"\n{c.op}" + ("" if c.checked else f": exempt: {c.message}"))
            for case in c.cases:
                print(f"  {case.describe()}")
            if c.derivatives == FIRST_ORDER_ONLY:
                print(f"  {FIRST_ORDER_ONLY}: no vjp_graph or jvp_graph (second derivatives and JVPs through it are "
                      f"MISSING_RULE)")
    for c in failed:
        print(f"\nFAILED {c.message}")
    exempt = sum(1 for c in checks if not c.checked)
    skipped = sum(c.skipped for c in checks)
    symbolic = sum(1 for c in checks if c.derivatives not in ("", FIRST_ORDER_ONLY))
    first_only = [c.op for c in checks if c.derivatives == FIRST_ORDER_ONLY]
    print(f"\n{len(checks)} operator{'s' * (len(checks) != 1)}: {len(checks) - len(failed) - exempt} passed, {len(failed)} failed, "
          f"{exempt} exempt (gradcheck=False)" + (f"; {len(mine)} plugin{'s' * (len(mine) != 1)} broken" if mine else "")
          + (f"; {skipped} varied case{'s' * (skipped != 1)} skipped (attribute values the operators refuse: "
             f"--cases lists them)" if skipped else "")
          + (f"; symbolic rules checked for {symbolic} (second order, jvp)" if symbolic else "")
          + (f"; first order only (no symbolic rules): {', '.join(first_only)}" if 0 < len(first_only) <= 5
             else f"; {len(first_only)} first order only (no symbolic rules)" if first_only else ""))
    sys.stdout.flush()
    _report([b.message for b in mine], "error")
    return 1 if failed or mine else 0


def _check_row(check) -> dict:
    """One verdict of ``chainrule check --json``: the operator, who provides it, the verdict and every case."""
    return {
        "op": check.op, "plugin": check.plugin, "distribution": check.distribution or None,
        "version": check.version or None, "result": check.status, "derivatives": check.derivatives or None,
        "max_abs_error": _json_number(check.max_abs_error, check.checked),
        "max_rel_error": _json_number(check.max_rel_error, check.checked),
        "message": check.message or None,
        "cases": [{"kind": case.kind, "inputs": case.inputs, "attrs": dict(case.attrs), "varied": case.varied or None,
                   "result": case.status, "max_abs_error": _json_number(case.max_abs_error, case.kind != "float32"),
                   "max_rel_error": _json_number(case.max_rel_error, case.kind != "float32"), "note": case.note or None}
                  for case in check.cases],
    }


def _json_number(value: float, shown: bool) -> float | None:
    return value if shown and value == value else None  # nan (a non-finite gradient) as null


def _number(value: float, checked: bool) -> str:
    return f"{value:.2g}" if checked else "-"


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join([cell.ljust(w) for cell, w in zip(row, widths)] + [row[-1]]).rstrip())


def cmd_ops(args: argparse.Namespace) -> int:
    rows = remote_operators(args) if args.server else local_operators(parse_names(args.prefer))
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
        return 0
    table = [("OPERATOR", "PLUGIN", "INPUTS", "ATTRIBUTES", "DOC")]
    table += [(r["name"], r["plugin"], inputs_text(r["inputs"]),
               ", ".join(f"{k}:{v['type']}" for k, v in r["attrs"].items()), r["doc"]) for r in rows]
    widths = [max(len(row[k]) for row in table) for k in range(3)] + [28]  # long attribute lists overflow
    for row in table:
        print("  ".join([cell.ljust(w) for cell, w in zip(row, widths)] + [row[-1]]).rstrip())
    return 0


def inputs_text(inputs: Sequence[dict]) -> str:
    """``logits, labels:int64|int32`` and ``xs...:float64|...``: each input's name, "..." for the inputs of a
    variadic operator, and the dtypes it accepts unless it accepts all five."""
    def one(i: dict) -> str:
        name = i["name"] + ("..." if i["variadic"] else "")
        return name if set(i["dtypes"]) >= set(ALL_DTYPES) else f"{name}:{'|'.join(i['dtypes'])}"

    return ", ".join(one(i) for i in inputs) or "-"


def _attr(kind: str, required: bool, default: object) -> dict:
    shown = not (required or default is None or kind == "tensor")
    return {"type": kind, "required": required, **({"default": default} if shown else {})}


def local_operators(prefer: Sequence[str] | None = None) -> list[dict]:
    """The installed plugins' operators, one JSON-ready row each; broken plugins and settings naming
    no plugin are warned about on stderr."""
    loaded = load_plugins(prefer=prefer)
    _report(loaded.problems, "warning")
    return [
        {
            "name": op.name,
            "arity": "variadic" if op.variadic else op.arity,
            "inputs": [{"name": i.name, "dtypes": list(i.dtypes), "variadic": i.variadic} for i in described_inputs(op)],
            "attrs": {name: _attr(a.kind, a.required, a.default) for name, a in op.attrs.items()},
            "plugin": op.plugin, "distribution": op.distribution, "version": op.version, "doc": op.doc,
        }
        for op in loaded.registry
    ]


def remote_operators(args: argparse.Namespace) -> list[dict]:
    """A server's operators (ListOperators), in local_operators' rows (an empty provenance field as null)."""
    with remote_client(args) as client:
        operators = client.operators()
    return [
        {
            "name": op.name,
            "arity": "variadic" if op.arity < 0 else op.arity,
            "inputs": [{"name": i.name, "dtypes": list(i.dtypes), "variadic": i.variadic} for i in op.inputs],
            "attrs": {name: _attr(a.type, a.required, a.default) for name, a in op.attrs.items()},
            "plugin": op.plugin, "distribution": op.distribution or None, "version": op.version or None,
            "doc": op.doc,
        }
        for op in operators
    ]
