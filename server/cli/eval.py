"""``chainrule eval graph.json --input x=1 --input W=@w.npy [--server ADDR | --local]``."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from chainrule.client import Client, Graph
from chainrule.client.errors import ChainruleRpcError

from ..local import LocalClient


def add_eval_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("eval", help="evaluate a graph file and print its value and every gradient")
    parser.add_argument("graph", type=Path, help="graph in the proto JSON format (chainrule.v1.Graph)")
    parser.add_argument("--input", "-i", action="append", default=[], metavar="NAME=VALUE",
                        help="a number, a JSON list, or @file.npy; repeat per input")
    parser.add_argument("--output", default=None, help="which output to differentiate")
    parser.add_argument("--no-diagnostics", dest="diagnostics", action="store_false",
                        help="skip the numerical health report (one read of every tensor fewer)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--server", default=None, help="address of a chainrule server (default 127.0.0.1:50051)")
    where.add_argument("--local", action="store_true", help="evaluate in-process, without a server")
    parser.set_defaults(run=cmd_eval)


def parse_input(text: str) -> tuple[str, np.ndarray]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"--input {text!r}: expected NAME=VALUE")
    if value.startswith("@"):
        return name, np.load(value[1:], allow_pickle=False)
    try:
        return name, np.asarray(json.loads(value))
    except json.JSONDecodeError:
        raise SystemExit(f"--input {name}: {value!r} is neither a number, a JSON list, nor @file.npy") from None


def client_for(args: argparse.Namespace) -> Client | LocalClient:
    """The client --local or --server asks for (a server on 127.0.0.1:50051 by default)."""
    return LocalClient() if args.local else Client(args.server or "127.0.0.1:50051")


def cmd_eval(args: argparse.Namespace) -> int:
    graph = Graph.from_json(args.graph.read_text())
    inputs = dict(parse_input(text) for text in args.input)
    client = client_for(args)
    try:
        with client:
            result = client.evaluate(graph, inputs, output=args.output, diagnostics=args.diagnostics)
    except ChainruleRpcError as exc:
        print(f"error: {exc}")
        return 1
    np.set_printoptions(precision=10, suppress=False)
    print(f"{result.output} = {result.value}")
    order = [d.name for d in graph.message.inputs] + graph.node_names  # as the file lists them, wherever it ran
    for name in sorted(result.grads, key=lambda n: order.index(n) if n in order else len(order)):
        print(f"d{result.output}/d{name} = {result.grads[name]}")
    diagnostics = "" if result.diagnostics is None else str(result.diagnostics)
    if diagnostics.strip():
        print(diagnostics)
    return 0
