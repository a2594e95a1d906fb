"""``chainrule train graph.json --data data.npz --param W1 --param b1 ... -o trained.npz``.

Every graph input comes from the ``.npz`` data file (arrays by input name):
the ones named by ``--param`` are the parameters' initial values (or come
from ``--init``, to resume from an earlier ``trained.npz``), the others stay
fixed at every step. The run happens on a server (``--server``) or
in-process (``--local``), with a progress bar on a terminal; the trained
parameters are written to ``-o``/``--out`` as ``.npz`` (``--out`` is the file a
command writes in eval, render and train alike; ``--output`` names the output node
to differentiate in eval and render, the role ``--loss`` has here).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .connect import add_connection_arguments, client_for
from .errors import CommandError
from .eval import load_graph


def add_train_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("train", help="train a graph's parameters on a data file; write them to .npz")
    parser.add_argument("graph", type=Path, help="graph in the proto JSON format (chainrule.v1.Graph)")
    parser.add_argument("--data", type=Path, required=True, help=".npz file: an array per graph input")
    parser.add_argument("--param", "-p", action="append", required=True, metavar="NAME",
                        help="a graph input to train (repeat, or separate names with commas)")
    parser.add_argument("--init", type=Path, help=".npz file with the parameters' initial values (default: --data)")
    parser.add_argument("--loss", help="the scalar node to minimize (default: the graph's only output)")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    parser.add_argument("--lr", type=float, default=0.01, help="learning rate (default 0.01)")
    parser.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (default 0)")
    parser.add_argument("--beta1", type=float, help="Adam's first-moment decay (default 0.9)")
    parser.add_argument("--beta2", type=float, help="Adam's second-moment decay (default 0.999)")
    parser.add_argument("--eps", type=float, help="Adam's denominator guard (default 1e-8)")
    parser.add_argument("--steps", type=int, default=100, help="maximum number of steps (default 100)")
    parser.add_argument("--target-loss", type=float, help="stop once the loss is at or below this")
    parser.add_argument("--report-every", type=int, help="steps between progress reports (default: up to 10 a second)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="show a progress bar (default: when stderr is a terminal)")
    parser.add_argument("--timeout", type=float, help="deadline of the whole run, in seconds")
    parser.add_argument("--out", "-o", type=Path, default=Path("trained.npz"), metavar="PATH",
                        help="where to write the trained parameters, as .npz (default trained.npz)")
    add_connection_arguments(parser, local="train in-process, without a server")
    parser.set_defaults(run=cmd_train)


def load_npz(path: Path, what: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as exc:
        raise CommandError(f"{what} {path}: cannot read it as .npz ({exc}); give a file numpy.savez wrote") from None


def cmd_train(args: argparse.Namespace) -> int:
    graph = load_graph(args.graph)
    data = load_npz(args.data, "--data")
    initial = load_npz(args.init, "--init") if args.init else data
    names = [name for text in args.param for name in text.split(",") if name]
    missing = [name for name in names if name not in initial]
    if missing:
        raise CommandError(f"--param {missing[0]}: no array of that name in {args.init or args.data}; "
                           f"the arrays there: {', '.join(sorted(initial)) or '(none)'}")
    params = {name: initial[name] for name in names}
    fixed = {name: value for name, value in data.items() if name not in params}
    with client_for(args) as client:
        result = client.optimize(
            graph, params, fixed, loss=args.loss, optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
            beta1=args.beta1, beta2=args.beta2, eps=args.eps, steps=args.steps, target_loss=args.target_loss,
            report_every=args.report_every, progress=args.progress, timeout=args.timeout,
        )
    try:
        np.savez(args.out, **result.params)
    except OSError as exc:
        raise CommandError(f"-o {args.out}: cannot write it ({exc.strerror or exc})") from None
    first = f"{result.losses[0]:.6g} -> " if len(result.losses) else ""
    stop = " (target reached)" if result.target_reached else ""
    if result.stopped_early:  # a deadline, the server's time cap or its shutdown: what was trained is kept
        stop = f" (stopped early: {result.stop_reason})"
    print(f"loss {first}{result.loss:.6g} after {result.steps} steps{stop}, {result.elapsed:.2f}s; "
          f"wrote {', '.join(result.params)} to {args.out}")
    return 0
