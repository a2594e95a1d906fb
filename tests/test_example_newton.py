"""examples/newton.py, run for real: logistic regression by Newton-CG (Hessian-vector products from the
service) against gradient descent, through a real server and through LocalClient.

- the service's HVPs equal the analytic Hessian (X̃ᵀ diag(σ(1-σ)) X̃ / n + λ) times the vector, and the
  same product built with Client.derive (forward mode over the reverse-mode gradient graph);
- Newton-CG reaches |∇C| < 1e-8 in a few steps, gradient descent in a hundred times more, and both reach
  the weights of a numpy Newton with the analytic Hessian;
- the script (--local) prints both step counts.
"""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from chainrule.server import LocalClient

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


newton = load_example("newton")
DATA = newton.make_data()
L2 = newton.L2


def design(data):
    return np.hstack([data["X"], np.ones((len(data["X"]), 1))])


def hessian(data, theta, l2=L2):
    """The analytic Hessian of the example's loss at theta = (w, b)."""
    x = design(data)
    s = 1.0 / (1.0 + np.exp(-(x @ theta)))
    reg = np.full(len(theta), l2)
    reg[-1] = 0.0  # no penalty on the intercept
    return x.T @ (x * (s * (1 - s))[:, None]) / len(x) + np.diag(reg)


def reference_solution(data, l2=L2):
    """Newton's method in numpy with the analytic gradient and Hessian, to machine precision."""
    x, y = design(data), data["y"]
    theta = np.zeros(x.shape[1])
    for _ in range(50):
        s = 1.0 / (1.0 + np.exp(-(x @ theta)))
        grad = x.T @ (s - y) / len(y)
        grad[:-1] += l2 * theta[:-1]
        if np.linalg.norm(grad) < 1e-14:
            break
        theta = theta - np.linalg.solve(hessian(data, theta, l2), grad)
    return theta


REFERENCE = reference_solution(DATA)


@pytest.fixture(scope="module")
def remote_runs(client):
    return newton.fit_both(client, DATA)


@pytest.fixture(scope="module")
def local_runs():
    with LocalClient() as local:
        return newton.fit_both(local, DATA)


def test_service_hvp_is_the_analytic_hessian_times_the_vector(client):
    rng = np.random.default_rng(3)
    service = newton.Service(client, newton.logistic_regression(), DATA)
    for _ in range(3):
        theta, v = rng.normal(scale=0.5, size=newton.FEATURES + 1), rng.standard_normal(newton.FEATURES + 1)
        hw, hb = service.hvp(theta[:-1], theta[-1], v[:-1], v[-1])
        np.testing.assert_allclose(np.append(hw, hb), hessian(DATA, theta) @ v, rtol=1e-12, atol=1e-15)
    assert service.hvps == 3 and client.registered_id(service.model.hvp_graph)


def test_the_same_hvp_by_client_derive_forward_over_reverse(client):
    """Client.derive, the other way to the product: the gradient graph, then its JVP along v."""
    model = newton.logistic_regression()
    rng = np.random.default_rng(4)
    theta, v = rng.normal(scale=0.5, size=newton.FEATURES + 1), rng.standard_normal(newton.FEATURES + 1)
    feeds = {**DATA, "l2": np.float64(L2), "w": theta[:-1], "b": np.float64(theta[-1])}
    gradient = client.derive(model.loss, model.params)
    product = []
    for name in ("w", "b"):
        forward = client.derive(gradient, ["w", "b"], output=gradient.gradients[name], mode="forward")
        tangents = {forward.tangents["w"]: v[:-1], forward.tangents["b"]: np.float64(v[-1])}
        product.append(np.atleast_1d(client.evaluate(forward, {**feeds, **tangents}, grads="none").value))
    np.testing.assert_allclose(np.concatenate(product), hessian(DATA, theta) @ v, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("where", ["server", "local"])
def test_newton_cg_converges_in_few_steps_and_gradient_descent_in_many(where, remote_runs, local_runs):
    run_newton, run_descent = remote_runs if where == "server" else local_runs
    assert run_newton.grad_norms[-1] <= newton.TOL and run_descent.grad_norms[-1] <= newton.TOL
    assert run_newton.steps < 10 and run_newton.hvps > 0
    assert run_descent.steps > 100 * run_newton.steps and run_descent.hvps == 0
    optimum = min(run_newton.losses[-1], run_descent.losses[-1])
    assert run_newton.steps_to_loss(optimum) < 10 < 100 < run_descent.steps_to_loss(optimum)
    # gradient descent's loss falls at every step (the step 1/L is safe); Newton-CG's too (line search),
    # up to rounding once both are at the optimum
    assert np.all(np.diff(run_descent.losses) <= 1e-15) and np.all(np.diff(run_newton.losses) <= 1e-15)


@pytest.mark.parametrize("where", ["server", "local"])
def test_both_reach_the_reference_weights(where, remote_runs, local_runs):
    for run in remote_runs if where == "server" else local_runs:
        theta = np.append(run.w, run.b)
        # |∇C| < 1e-8 and the smallest Hessian eigenvalue (~0.025) bound the distance to the optimum
        np.testing.assert_allclose(theta, REFERENCE, rtol=0, atol=1e-6, err_msg=run.method)
    assert np.abs(np.append(remote_runs[0].w, remote_runs[0].b) - REFERENCE).max() < 1e-9  # Newton: much closer


def test_server_and_local_runs_agree(remote_runs, local_runs):
    for remote, local in zip(remote_runs, local_runs):
        assert remote.steps == local.steps and remote.hvps == local.hvps
        np.testing.assert_allclose(remote.w, local.w, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(remote.losses, local.losses, rtol=1e-13)


def test_example_main_runs_locally_and_prints_both_counts(capsys):
    assert newton.main(["--local"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(("Newton-CG", "gradient descent"))}
    assert set(rows) == {"Newton-CG", "gradient"}
    newton_steps = [int(n) for n in re.findall(r"(\d+) steps", rows["Newton-CG"])]
    descent_steps = [int(n) for n in re.findall(r"(\d+) steps", rows["gradient"])]
    assert len(newton_steps) == len(descent_steps) == 2  # to the loss within 1e-8, to |grad| < 1e-8
    assert max(newton_steps) < 10 and min(descent_steps) > 100
    assert "max |Newton-CG - gradient descent| over the weights" in out
