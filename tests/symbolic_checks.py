"""What the symbolic-rule tests share: running a derived graph, the numpy rules' gradients, a
tolerant comparison, and the check of an HVP graph against finite differences of gradients."""
from __future__ import annotations

import numpy as np

from chainrule.core import GraphIR, compile_graph, evaluate
from chainrule.core.symbolic import derive_reverse, hvp_graph
from chainrule.plugins.manager import load_plugins

LOADED = load_plugins(env={}, entry_points=False, only=["builtin"])
R = LOADED.registry
EPS = 1e-6


def run(graph: GraphIR, feeds: dict, output: str | None = None) -> dict[str, np.ndarray]:
    """Every output of ``graph`` (forward only)."""
    ev = evaluate(compile_graph(graph, R), feeds, output=output or graph.outputs[0], gradients=False)
    return {name: np.asarray(ev.value(name)) for name in graph.outputs}


def numpy_grads(graph: GraphIR, feeds: dict, output: str, wrt: list[str], seed=None) -> list[np.ndarray]:
    """The gradients of ``output`` the engine's numpy vjp rules give."""
    ev = evaluate(compile_graph(graph, R), feeds, output=output, seed=seed, wrt=wrt)
    return [np.asarray(ev.grad(w), dtype=np.float64) for w in wrt]


def close(a, b, what, rtol=1e-5, atol=1e-6):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    scale = max(1.0, float(np.max(np.abs(b))) if b.size else 1.0)
    assert np.allclose(a, b, rtol=rtol, atol=atol * scale), f"{what}: {a} != {b} (max err {np.max(np.abs(a - b))})"


def check_hvp(graph: GraphIR, output: str, wrt: list[str], feeds: dict, vs: dict, what: str,
              rtol: float = 1e-4, atol: float = 1e-6) -> None:
    """H v through a grad node (``vs``: ``v.<name>`` per wrt name) against central finite
    differences of the numpy gradients along v."""
    hvp, names = derive_reverse(hvp_graph(graph, output, wrt), R, wrt=wrt)
    got = run(hvp, {**feeds, **vs})
    plus = {**feeds, **{w: feeds[w] + EPS * vs[f"v.{w}"] for w in wrt}}
    minus = {**feeds, **{w: feeds[w] - EPS * vs[f"v.{w}"] for w in wrt}}
    for w, gp, gm in zip(wrt, numpy_grads(graph, plus, output, wrt), numpy_grads(graph, minus, output, wrt)):
        close(got[names.gradients[w]], (gp - gm) / (2 * EPS), f"{what}Hv for {w}", rtol=rtol, atol=atol)
