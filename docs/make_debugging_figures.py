"""Regenerate the figures of docs/debugging.md from real evaluations.

    python docs/make_debugging_figures.py           # writes docs/figures/*.dot, *.svg, *.txt
    python docs/make_debugging_figures.py --no-svg  # DOT and diagnostics text only (no Graphviz needed)

Each example is evaluated in-process (LocalClient, the same service code a
server runs) and written three ways: ``NAME.dot`` (the diagram as DOT text),
``NAME.svg`` (drawn by Graphviz's dot), and ``NAME.txt`` (the printed
diagnostics, quoted in debugging.md). tests/test_render.py regenerates the
DOT and text and fails when the committed ones are stale, so the document
stays true.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import numpy as np

from chainrule.client import GraphBuilder, Result
from chainrule.server import LocalClient

FIGURES = Path(__file__).resolve().parent / "figures"

#: depth of the sigmoid stack in the vanishing-gradient example
DEPTH = 12


def staged(client: LocalClient) -> Result:
    """f(x,y) = (x + σ(y)) / (σ(x) + (x+y)²) at x=3, y=-4, stage by stage as in the lecture notes."""
    g = GraphBuilder()
    x, y = g.input("x"), g.input("y")
    sigy = y.sigmoid(name="sigy")
    num = (x + sigy).named("num")
    sigx = x.sigmoid(name="sigx")
    xpy = (x + y).named("xpy")
    xpysqr = (xpy ** 2).named("xpysqr")
    den = (sigx + xpysqr).named("den")
    invden = (1 / den).named("invden")
    f = (num * invden).named("f")
    return client.evaluate(f, x=3.0, y=-4.0, contributions=True, values="all")


def neuron(client: LocalClient) -> Result:
    """The sigmoid neuron f = σ(w0·x0 + w1·x1 + w2) at w=[2,-3,-3], x=[-1,-2]."""
    g = GraphBuilder()
    w0, w1, w2, x0, x1 = (g.input(n) for n in ("w0", "w1", "w2", "x0", "x1"))
    dot = (w0 * x0 + w1 * x1 + w2).named("dot")
    f = dot.sigmoid(name="f")
    return client.evaluate(f, w0=2.0, w1=-3.0, w2=-3.0, x0=-1.0, x1=-2.0, values="all")


def vanishing(client: LocalClient) -> Result:
    """A deep stack h_i = σ(w_i · h_{i-1}), all weights 1: early weights get almost no gradient."""
    g = GraphBuilder()
    h = g.input("x")
    weights = {}
    for i in range(DEPTH):
        w = g.input(f"w{i}")
        weights[w.name] = 1.0
        h = (w * h).named(f"z{i}").sigmoid(name=f"h{i}")
    return client.evaluate(h, weights, x=1.0, values="all")


def nan(client: LocalClient) -> Result:
    """log(x - 5) at x = 1: the log of a negative number is NaN, and everything after it."""
    g = GraphBuilder()
    x = g.input("x")
    d = (x - 5).named("d")
    loss = (d.log(name="l") + x * x).named("loss")
    return client.evaluate(loss, x=1.0, values="all")


EXAMPLES: dict[str, Callable[[LocalClient], Result]] = {
    "staged": staged, "neuron": neuron, "vanishing": vanishing, "nan": nan,
}


def make_figures(out: Path = FIGURES, *, svg: bool = True) -> list[Path]:
    """Write every example's .dot and .txt (and .svg) into ``out``; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with np.errstate(all="ignore"), LocalClient() as client:
        for name, example in EXAMPLES.items():
            result = example(client)
            dot, txt = out / f"{name}.dot", out / f"{name}.txt"
            dot.write_text(result.to_dot(), encoding="utf-8")
            txt.write_text(str(result.diagnostics) + "\n", encoding="utf-8")
            written += [dot, txt]
            if svg:
                written.append(result.render(out / f"{name}.svg"))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-svg", action="store_true", help="skip the SVGs (no Graphviz needed)")
    parser.add_argument("--out", type=Path, default=FIGURES, help="where to write (default docs/figures)")
    args = parser.parse_args()
    for path in make_figures(args.out, svg=not args.no_svg):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
