"""Write the example graph files the README's commands use (run it again after changing them).

    .venv/bin/python examples/graphs/make_graphs.py

* ``circuit.json``: the staged circuit f = (x + y) * z of the quick start.
* ``fit.json``: the loss of a line fitted to points, mse(w * x + b, t).
* ``fit-data.npz``: its data (x, t: 20 points near t = 3x - 1) and starting values (w = b = 0).

Each graph is built with GraphBuilder and written with ``Graph.save`` (the proto
JSON form of ``chainrule.v1.Graph``, which ``chainrule eval``, ``render`` and
``train`` read and ``Graph.load`` reads back). tests/test_readme.py checks that
the files are what this script writes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from chainrule.client import Graph, GraphBuilder, ops

HERE = Path(__file__).resolve().parent


def circuit() -> Graph:
    g = GraphBuilder()
    x, y, z = g.input("x"), g.input("y"), g.input("z")
    q = (x + y).named("q")
    return (q * z).named("f").graph


def fit() -> Graph:
    g = GraphBuilder()
    w, b = g.input("w"), g.input("b")
    x, t = g.input("x", (-1,)), g.input("t", (-1,))
    prediction = (w * x + b).named("prediction")
    return ops.mse(prediction, t, name="loss").graph


def fit_data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    x = np.linspace(-1.0, 1.0, 20)
    return {"x": x, "t": 3.0 * x - 1.0 + 0.05 * rng.standard_normal(20), "w": np.float64(0.0), "b": np.float64(0.0)}


def main() -> None:
    circuit().save(HERE / "circuit.json")
    fit().save(HERE / "fit.json")
    np.savez(HERE / "fit-data.npz", **fit_data())


if __name__ == "__main__":
    main()
