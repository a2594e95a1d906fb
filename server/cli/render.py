"""``chainrule render graph.json --input x=3 --input y=-4 -o out.svg [--server ADDR | --local]``.

Evaluates the graph (with per-edge contributions unless told not to) and
draws it with every node's value and gradient; see chainrule.client.render.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from chainrule.client import Graph
from chainrule.client.errors import ChainruleRpcError
from chainrule.client.render import RenderError

from .eval import client_for, parse_input


def add_render_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "render", help="evaluate a graph file and draw it with every value and gradient (SVG, PNG, PDF or DOT)")
    parser.add_argument("graph", type=Path, help="graph in the proto JSON format (chainrule.v1.Graph)")
    parser.add_argument("--input", "-i", action="append", default=[], metavar="NAME=VALUE",
                        help="a number, a JSON list, or @file.npy; repeat per input")
    parser.add_argument("--out", "-o", type=Path, required=True,
                        help="where to draw: .svg, .png or .pdf (needs Graphviz's dot), or .dot for the text")
    parser.add_argument("--output", default=None, help="which output to differentiate")
    parser.add_argument("--param", action="append", default=None, metavar="NAME",
                        help="draw this input as a parameter, the others as data (repeat; default: every input)")
    parser.add_argument("--contributions", action=argparse.BooleanOptionalAction, default=True,
                        help="label fan-out edges with their share of the gradient (default: on)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--server", default=None, help="address of a chainrule server (default 127.0.0.1:50051)")
    where.add_argument("--local", action="store_true", help="evaluate in-process, without a server")
    parser.set_defaults(run=cmd_render)


def cmd_render(args: argparse.Namespace) -> int:
    graph = Graph.from_json(args.graph.read_text())
    inputs = dict(parse_input(text) for text in args.input)
    client = client_for(args)
    try:
        with client:  # the diagram shows every value: ask for them
            result = client.evaluate(graph, inputs, output=args.output, contributions=args.contributions,
                                     values="all")
        path = result.render(args.out, parameters=args.param)
    except (ChainruleRpcError, RenderError) as exc:
        print(f"error: {exc}")
        return 1
    print(f"wrote {path}: {len(graph.message.inputs) + len(graph)} nodes, {result.output} = {result.value}")
    print(result.diagnostics)
    return 0
