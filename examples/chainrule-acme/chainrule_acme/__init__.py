"""chainrule-acme: three operators chainrule does not build in, as a plugin.

``acme.swish`` (x * sigmoid(beta x)), ``acme.gelu`` (tanh approximation) and
``acme.huber`` (a robust regression loss). Each is a forward rule, a vjp and an
infer rule declared with chainrule's OperatorSet; the entry point ``acme`` in
the ``chainrule`` group (pyproject.toml) points at this module, whose
``register_operators`` hook registers them.
"""
from __future__ import annotations

import numpy as np

from chainrule.core import OpError
from chainrule.plugins import OperatorSet, broadcast_inputs, float_like_input, scalar_of_input

ops = OperatorSet()


def _sigmoid(z):
    """1 / (1 + exp(-z)) written with tanh: no overflow for any z."""
    return 0.5 * (1 + np.tanh(0.5 * z))


# --- acme.swish: x * sigmoid(beta x) ---------------------------------------------------------

@ops.operator("acme.swish", infer=float_like_input, beta=1.0)
def swish(x, *, beta):
    """Swish: x * sigmoid(beta * x) (SiLU when beta = 1)."""
    return x * _sigmoid(beta * x)


@swish.vjp
def _(g, out, x, *, beta):
    s = _sigmoid(beta * x)
    return (g * (s + beta * out * (1 - s)),)


# --- acme.gelu: the tanh approximation of x * Phi(x) -----------------------------------------

_C = float(np.sqrt(2 / np.pi))
_A = 0.044715


@ops.operator("acme.gelu", infer=float_like_input, residuals=True)
def gelu(x):
    """GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    t = np.tanh(_C * (x + _A * x ** 3))
    return 0.5 * x * (1 + t), t  # t is the residual: the vjp needs it and need not take tanh again


@gelu.vjp
def _(g, out, x, *, saved):
    t = saved
    return (g * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _C * (1 + 3 * _A * x * x)),)


# --- acme.huber: mean Huber loss, quadratic within delta, linear beyond ---------------------

@ops.operator("acme.huber", delta=1.0)
def huber(pred, target, *, delta):
    """Huber loss, mean over elements: 0.5 r^2 where |r| <= delta, delta (|r| - delta/2) beyond."""
    r = np.abs(pred - target)
    return np.mean(np.where(r <= delta, 0.5 * r * r, delta * (r - 0.5 * delta)))


@huber.infer
def _(pred, target, *, delta):
    if delta <= 0:
        raise OpError(f"delta must be > 0, got {delta}", reason="BAD_ATTRIBUTE", field="attrs.delta")
    return scalar_of_input(broadcast_inputs(pred, target))


@huber.vjp
def _(g, out, pred, target, *, delta):
    r = pred - target                       # broadcast shape: the engine sums d back to each input's shape
    d = g * np.clip(r, -delta, delta) / r.size
    return d, -d


@huber.sample
def _(rng):
    """A (3, 4) prediction against a broadcast (4,) target, with residuals on both sides of delta."""
    return [3 * rng.standard_normal((3, 4)), rng.standard_normal(4)], {"delta": float(rng.uniform(0.5, 2.0))}


from .logcosh import with_jax_operators  # noqa: E402  (acme.logcosh, from JAX, when JAX is installed)

register_operators = with_jax_operators(ops).hookimpl()
