"""``chainrule render graph.json --input x=3 --input y=-4 -o out.svg [--server ADDR | --local]``.

Evaluates the graph (with per-edge contributions unless told not to) and
draws it with every node's value and gradient; see chainrule.client.render.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .connect import add_connection_arguments, client_for
from .eval import load_graph, parse_input


def add_render_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "render", help="evaluate a graph file and draw it with every value and gradient (SVG, PNG, PDF or DOT)")
    parser.add_argument("graph", type=Path, help="graph in the proto JSON format (chainrule.v1.Graph)")
    parser.add_argument("--input", "-i", action="append", default=[], metavar="NAME=VALUE",
                        help="a number, a JSON list, or @file.npy; repeat per input")
    parser.add_argument("--out", "-o", type=Path, required=True,
                        help="where to draw: .svg, .png or .pdf (needs Graphviz's dot), or .dot for the text")
    parser.add_argument("--output", default=None, metavar="NAME", help="which output node to differentiate "
                                                                        "(default: the graph's only output)")
    parser.add_argument("--param", "-p", action="append", default=None, metavar="NAME",
                        help="draw this input as a parameter, the others as data (repeat, or separate names with "
                             "commas; default: every input)")
    parser.add_argument("--contributions", action=argparse.BooleanOptionalAction, default=True,
                        help="label fan-out edges with their share of the gradient (default: on)")
    add_connection_arguments(parser, local="evaluate in-process, without a server")
    parser.set_defaults(run=cmd_render)


def cmd_render(args: argparse.Namespace) -> int:
    graph = load_graph(args.graph)
    inputs = dict(parse_input(text) for text in args.input)
    with client_for(args) as client:  # the diagram shows every value: ask for them
        result = client.evaluate(graph, inputs, output=args.output, contributions=args.contributions, values="all")
    params = None if args.param is None else [name for text in args.param for name in text.split(",") if name]
    path = result.render(args.out, parameters=params)  # a RenderError is reported by errors.report
    print(f"wrote {path}: {len(graph.message.inputs) + len(graph)} nodes, {result.output} = {result.value}")
    print(result.diagnostics)
    return 0
