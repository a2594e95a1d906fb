"""Newton-CG through a chainrule server: logistic regression with Hessian-vector products from the service.

    C(w, b) = mean(softplus(z) - y z) + λ/2 |w|²,    z = X w + b

is fitted twice on the same data (500 samples, 10 features of different
scales, generated with a fixed seed; λ = 0.01 keeps the Hessian positive
definite), starting from zero, until the gradient norm is below 1e-8:

* gradient descent, (w, b) ← (w, b) − ε ∇C with the safe step ε = 1/L
  (L = λ + ¼ λmax(X̃ᵀX̃)/n bounds the Hessian, X̃ = [X 1]): one gradient per step;
* Newton-CG: each step solves H p = −∇C by conjugate gradients, where every
  product H v comes from the server. The Hessian is never formed: the graph
  holds ``ops.hvp(C, [w, b], [vw, vb])`` (the gradient of Σ ∇C·v, built by the
  server from its operators' symbolic rules, docs/derivatives.md), registered
  once and evaluated once per CG iteration; a backtracking line search keeps
  each step a descent.

Both runs get their gradients from the server (ordinary Evaluate); the script
prints, for each, the steps to a loss within 1e-8 of the optimum and to a
gradient norm below 1e-8: a handful for Newton-CG, hundreds and over a
thousand for gradient descent, and the two solutions agree.

    python examples/newton.py                    # starts a server in-process
    python examples/newton.py --local            # no server
    python examples/newton.py --server 127.0.0.1:50051
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import numpy as np

from chainrule.client import Client, Graph, GraphBuilder, Var, ops
from chainrule.server import LocalClient

SAMPLES, FEATURES, L2 = 500, 10, 1e-2
TOL = 1e-8


def make_data(samples: int = SAMPLES, features: int = FEATURES, seed: int = 0) -> dict[str, np.ndarray]:
    """Features of scales 0.3..3 (what makes gradient descent slow), labels drawn from a logistic model."""
    rng = np.random.default_rng(seed)
    scales = np.logspace(-0.5, 0.5, features)
    x = rng.standard_normal((samples, features)) * scales
    w_true = rng.standard_normal(features) / scales
    p = 1.0 / (1.0 + np.exp(-(x @ w_true + 0.5)))
    y = (rng.uniform(size=samples) < p).astype(np.float64)
    return {"X": x, "y": y}


@dataclass
class Model:
    """The loss and the Vars a solver reads: the parameters, the HVP's vectors and the HVP."""

    loss: Var
    params: list[Var]           # [w, b]
    vectors: list[Var]          # [vw, vb]: the vector v of H v
    hvp: list[Var]              # [(H v)_w, (H v)_b]
    hvp_graph: Graph = field(repr=False)  # hvp's graph only: registered once, evaluated per CG iteration


def logistic_regression(samples: int = SAMPLES, features: int = FEATURES) -> Model:
    g = GraphBuilder()
    x, y = g.input("X", (samples, features)), g.input("y", (samples,))
    l2 = g.input("l2")
    w, b = g.input("w", (features,)), g.input("b")
    z = (x @ w + b).named("z")
    loss = (ops.mean(ops.softplus(z) - y * z) + 0.5 * l2 * ops.sum(w * w)).named("C")
    vw, vb = g.input("vw", (features,)), g.input("vb")
    hw, hb = ops.hvp(loss, [w, b], [vw, vb], name="Hv")
    return Model(loss, [w, b], [vw, vb], [hw, hb], g.graph_for(hw, hb))


def safe_step(data: dict[str, np.ndarray], l2: float = L2) -> float:
    """1/L: L = λ + ¼ λmax(X̃ᵀX̃)/n bounds every eigenvalue of the Hessian (σ' ≤ ¼)."""
    x = np.hstack([data["X"], np.ones((len(data["X"]), 1))])
    return 1.0 / (l2 + 0.25 * np.linalg.eigvalsh(x.T @ x / len(x))[-1])


@dataclass
class Run:
    """One solver's run: the parameters reached and, per step, the loss and gradient norm before it."""

    method: str
    w: np.ndarray
    b: float
    losses: list[float]
    grad_norms: list[float]
    hvps: int = 0              # Hessian-vector products evaluated (Newton-CG)
    evaluations: int = 0       # calls to the service
    seconds: float = 0.0

    @property
    def steps(self) -> int:
        """Steps taken until the gradient norm fell below the tolerance (or the limit)."""
        return len(self.losses) - 1

    def steps_to_loss(self, optimum: float, within: float = TOL) -> int | None:
        """The first step whose loss is within ``within`` of ``optimum`` (None: never)."""
        return next((k for k, loss in enumerate(self.losses) if loss - optimum <= within), None)

    def steps_to_gradient(self, tol: float = TOL) -> int | None:
        return next((k for k, norm in enumerate(self.grad_norms) if norm <= tol), None)


class Service:
    """Loss, gradient and Hessian-vector products of the model at (w, b), from a Client or LocalClient."""

    def __init__(self, client, model: Model, data: dict[str, np.ndarray], l2: float = L2) -> None:
        self.client, self.model = client, model
        self.data = {**data, "l2": np.float64(l2)}
        self.calls = self.hvps = 0
        client.register(model.hvp_graph)  # CG's evaluations send its id, not the graph

    def _feeds(self, w: np.ndarray, b: float) -> dict[str, np.ndarray]:
        return {**self.data, "w": w, "b": np.float64(b)}

    def loss(self, w: np.ndarray, b: float) -> float:
        self.calls += 1
        return float(self.client.evaluate(self.model.loss, self._feeds(w, b), grads="none").value)

    def loss_and_gradient(self, w: np.ndarray, b: float) -> tuple[float, np.ndarray, float]:
        """The ordinary Evaluate: the loss and its gradient by the numpy rules."""
        self.calls += 1
        w_var, b_var = self.model.params
        result = self.client.evaluate(self.model.loss, self._feeds(w, b), grads=[w_var, b_var], diagnostics=False)
        return float(result.value), np.asarray(result.grad[w_var]), float(result.grad[b_var])

    def hvp(self, w: np.ndarray, b: float, vw: np.ndarray, vb: float) -> tuple[np.ndarray, float]:
        """H(w, b) · (vw, vb): one evaluation of the registered HVP graph."""
        self.calls += 1
        self.hvps += 1
        (hw, hb), (vw_var, vb_var) = self.model.hvp, self.model.vectors
        feeds = {**self._feeds(w, b), vw_var.name: vw, vb_var.name: np.float64(vb)}
        result = self.client.evaluate(self.model.hvp_graph, feeds, output=hw.name, values=[hb.name], grads="none",
                                      diagnostics=False)
        return np.asarray(result.value), float(result.values[hb.name])


def conjugate_gradients(hvp, g: np.ndarray, tol: float, max_iter: int) -> np.ndarray:
    """An approximate solution p of H p = -g (H positive definite along the iterates), by CG from p = 0,
    stopping when the residual is below ``tol``; on negative curvature, the steepest descent direction."""
    p = np.zeros_like(g)
    r = -g.copy()
    d = r.copy()
    rr = r @ r
    for _ in range(max_iter):
        hd = hvp(d)
        curvature = d @ hd
        if curvature <= 0:
            return -g if not p.any() else p
        alpha = rr / curvature
        p += alpha * d
        r -= alpha * hd
        rr_next = r @ r
        if np.sqrt(rr_next) <= tol:
            break
        d = r + (rr_next / rr) * d
        rr = rr_next
    return p


def newton_cg(service: Service, features: int = FEATURES, *, tol: float = TOL, max_steps: int = 50) -> Run:
    """Newton-CG from zero: CG to a relative residual min(0.5, √|∇C|) (superlinear convergence), then a
    backtracking (Armijo) line search that accepts the full Newton step near the optimum."""
    start, calls, hvps = time.perf_counter(), service.calls, service.hvps
    theta = np.zeros(features + 1)
    losses, norms = [], []
    for _ in range(max_steps + 1):
        w, b = theta[:-1], theta[-1]
        loss, gw, gb = service.loss_and_gradient(w, b)
        grad = np.append(gw, gb)
        losses.append(loss)
        norms.append(float(np.linalg.norm(grad)))
        if norms[-1] <= tol or len(losses) > max_steps:
            break

        def hvp(v: np.ndarray) -> np.ndarray:
            hw, hb = service.hvp(w, b, v[:-1], v[-1])
            return np.append(hw, hb)

        forcing = min(0.5, np.sqrt(norms[-1]))
        p = conjugate_gradients(hvp, grad, forcing * norms[-1], max_iter=4 * len(theta))
        t, slope = 1.0, grad @ p
        while t > 1e-10 and service.loss(w + t * p[:-1], b + t * p[-1]) > loss + 1e-4 * t * slope:
            t *= 0.5
        theta = theta + t * p
    return Run("Newton-CG", theta[:-1].copy(), float(theta[-1]), losses, norms, hvps=service.hvps - hvps,
               evaluations=service.calls - calls, seconds=time.perf_counter() - start)


def gradient_descent(service: Service, lr: float, features: int = FEATURES, *, tol: float = TOL,
                     max_steps: int = 20_000) -> Run:
    """(w, b) ← (w, b) − lr ∇C from zero, until |∇C| <= tol or ``max_steps`` steps."""
    start, calls = time.perf_counter(), service.calls
    w, b = np.zeros(features), 0.0
    losses, norms = [], []
    while True:
        loss, gw, gb = service.loss_and_gradient(w, b)
        losses.append(loss)
        norms.append(float(np.sqrt(gw @ gw + gb * gb)))
        if norms[-1] <= tol or len(losses) > max_steps:
            break
        w, b = w - lr * gw, b - lr * gb
    return Run("gradient descent", w, b, losses, norms, evaluations=service.calls - calls,
               seconds=time.perf_counter() - start)


def fit_both(client, data: dict[str, np.ndarray] | None = None, l2: float = L2) -> tuple[Run, Run]:
    """Newton-CG, then gradient descent, on the same data through ``client``."""
    data = make_data() if data is None else data
    samples, features = data["X"].shape
    service = Service(client, logistic_regression(samples, features), data, l2)
    newton = newton_cg(service, features)
    descent = gradient_descent(service, safe_step(data, l2), features)
    return newton, descent


def report(newton: Run, descent: Run) -> list[str]:
    optimum = min(min(newton.losses), min(descent.losses))
    lines = [f"{'method':<17} {'to loss within 1e-8':>20} {'to |grad| < 1e-8':>17} {'HVPs':>5} "
             f"{'calls':>6} {'seconds':>8}  final loss"]
    for run in (newton, descent):
        lines.append(f"{run.method:<17} {str(run.steps_to_loss(optimum)) + ' steps':>20} "
                     f"{str(run.steps_to_gradient()) + ' steps':>17} {run.hvps:>5} {run.evaluations:>6} "
                     f"{run.seconds:>8.2f}  {run.losses[-1]:.12f}")
    gap = max(np.max(np.abs(newton.w - descent.w)), abs(newton.b - descent.b))
    lines.append(f"max |Newton-CG - gradient descent| over the weights: {gap:.1e}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--server", help="address of a running server (default: start one in-process)")
    where.add_argument("--local", action="store_true", help="evaluate in-process, without a server")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--l2", type=float, default=L2)
    args = parser.parse_args(argv)

    server = None
    if args.local:
        client = LocalClient()
    else:
        address = args.server
        if address is None:
            from chainrule.server import create_server

            server, port = create_server("127.0.0.1:0")
            server.start()
            address = f"127.0.0.1:{port}"
        client = Client(address, timeout=60)
    try:
        with client:
            newton, descent = fit_both(client, make_data(seed=args.seed), args.l2)
    finally:
        if server is not None:
            server.stop(grace=None)
    print(f"logistic regression, {SAMPLES} samples, {FEATURES} features, L2 {args.l2:g}")
    for line in report(newton, descent):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
