"""``chainrule eval graph.json --input x=1 --input W=@w.npy [--seed S] [--json] [-o out.npz] [--server ADDR | --local]``.

With ``--json`` stdout is one JSON object (see JSON_SCHEMA); ``-o`` writes the
value and every gradient to an ``.npz`` ("value", and "grad/<name>").
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import json_format

from chainrule.client import Graph

from .connect import add_connection_arguments, client_for  # noqa: F401  (client_for: used by render, train)
from .errors import CommandError

JSON_SCHEMA = """\
--json prints one object:
  {"output": NAME,                      the differentiated output
   "value": V,                          its value
   "gradients": {INPUT_OR_NODE: V, ...}, d output / d each, in the graph file's order
   "diagnostics": null | {"finite": BOOL,
                          "first_nonfinite_value": null | {"node": S, "op": S, "count": N},
                          "first_nonfinite_gradient": null | {"node": S, "op": S, "count": N},
                          "flags": [{"kind": S, "node": S, "message": S}, ...]}}
  where V is a number or nested lists of numbers (numpy's tolist()), and a NaN or an
  infinity is the string "nan", "inf" or "-inf"; "diagnostics" is null with --no-diagnostics."""


def add_eval_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("eval", help="evaluate a graph file and print its value and every gradient",
                                 epilog=JSON_SCHEMA, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("graph", type=Path, help="graph in the proto JSON format (chainrule.v1.Graph)")
    parser.add_argument("--input", "-i", action="append", default=[], metavar="NAME=VALUE",
                        help="a number, a JSON list, or @file.npy; repeat per input")
    parser.add_argument("--output", default=None, metavar="NAME", help="which output node to differentiate "
                                                                        "(default: the graph's only output)")
    parser.add_argument("--seed", default=None, metavar="VALUE",
                        help="d(loss)/d(output) to start from, needed for a non-scalar output: a number, "
                             "a JSON list, or @file.npy of the output's shape")
    parser.add_argument("--no-diagnostics", dest="diagnostics", action="store_false",
                        help="skip the numerical health report (one read of every tensor fewer)")
    parser.add_argument("--json", action="store_true", help="print the value, gradients and diagnostics as JSON "
                                                            "(schema below)")
    parser.add_argument("--out", "-o", type=Path, default=None, metavar="PATH",
                        help='also write the value and every gradient to this .npz (keys "value", "grad/<name>")')
    add_connection_arguments(parser, local="evaluate in-process, without a server")
    parser.set_defaults(run=cmd_eval)


def parse_value(text: str, flag: str) -> np.ndarray:
    """A number, a JSON list, or @file.npy, as --input and --seed take them."""
    if text.startswith("@"):
        path = Path(text[1:])
        try:
            return np.load(path, allow_pickle=False)
        except OSError as exc:
            raise CommandError(f"{flag}: cannot read {path} ({exc.strerror or exc}); give an existing .npy file "
                               "(numpy.save writes one)") from None
        except ValueError as exc:
            raise CommandError(f"{flag}: {path} is not a .npy file ({exc}); write it with numpy.save") from None
    try:
        return np.asarray(json.loads(text))
    except json.JSONDecodeError:
        raise CommandError(f"{flag}: {text!r} is neither a number, a JSON list, nor @file.npy", 2) from None


def parse_input(text: str) -> tuple[str, np.ndarray]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise CommandError(f"--input {text!r}: expected NAME=VALUE", 2)
    return name, parse_value(value, f"--input {name}")


def load_graph(path: Path) -> Graph:
    """The graph in a proto-JSON file, or a CommandError naming the file and what is wrong with it."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise CommandError(f"{path}: cannot read the graph file ({exc.strerror or exc}); give the path of a graph "
                           "saved as JSON (graph.save(path) or Graph.to_json() write one)") from None
    except UnicodeDecodeError:
        raise CommandError(f"{path}: not a text file; give a graph saved as JSON (graph.save(path))") from None
    try:
        return Graph.from_json(text)
    except json_format.ParseError as exc:
        raise CommandError(f"{path}: not a chainrule graph: {str(exc).rstrip('.')}. Check the file against the chainrule.v1.Graph "
                           "JSON format (fields inputs, nodes, outputs; graph.save(path) writes one)") from None


def cmd_eval(args: argparse.Namespace) -> int:
    graph = load_graph(args.graph)
    inputs = dict(parse_input(text) for text in args.input)
    seed = None if args.seed is None else parse_value(args.seed, "--seed")
    with client_for(args) as client:
        result = client.evaluate(graph, inputs, output=args.output, seed=seed, diagnostics=args.diagnostics)
    order = [d.name for d in graph.message.inputs] + graph.node_names  # as the file lists them, wherever it ran
    names = sorted(result.grads, key=lambda n: order.index(n) if n in order else len(order))
    grads = {name: np.asarray(result.grads[name]) for name in names}
    value = np.asarray(result.value)
    if args.out is not None:
        try:
            np.savez(args.out, value=value, **{f"grad/{name}": grad for name, grad in grads.items()})
        except OSError as exc:
            raise CommandError(f"-o {args.out}: cannot write it ({exc.strerror or exc})") from None
    if args.json:
        print(json.dumps({"output": result.output, "value": to_json(value),
                          "gradients": {name: to_json(grad) for name, grad in grads.items()},
                          "diagnostics": diagnostics_json(result.diagnostics)}))
        return 0
    np.set_printoptions(precision=10, suppress=False)
    print(f"{result.output} = {result.value}")
    for name, grad in grads.items():
        print(f"d{result.output}/d{name} = {grad}")
    diagnostics = "" if result.diagnostics is None else str(result.diagnostics)
    if diagnostics.strip():
        print(diagnostics)
    if args.out is not None:
        print(f"wrote value and {len(grads)} gradient{'s' * (len(grads) != 1)} to {args.out}")
    return 0


def to_json(array: np.ndarray) -> Any:
    """Numbers as nested lists; NaN and infinities as the strings "nan", "inf", "-inf" (JSON has no such numbers)."""
    return _finite(array.tolist())


def _finite(item: Any) -> Any:
    if isinstance(item, list):
        return [_finite(x) for x in item]
    if isinstance(item, float) and not math.isfinite(item):
        return "nan" if math.isnan(item) else ("inf" if item > 0 else "-inf")
    return item


def diagnostics_json(diagnostics: Any) -> dict[str, Any] | None:
    if diagnostics is None:
        return None

    def nonfinite(found: Any) -> dict[str, Any] | None:
        return None if found is None else {"node": found.node, "op": found.op, "count": found.count}

    return {"finite": diagnostics.finite,
            "first_nonfinite_value": nonfinite(diagnostics.first_nonfinite_value),
            "first_nonfinite_gradient": nonfinite(diagnostics.first_nonfinite_gradient),
            "flags": [{"kind": f.kind, "node": f.node, "message": f.message} for f in diagnostics.flags]}
