"""acme.logcosh, written in JAX and turned into an operator by chainrule.plugins.from_jax.

log(cosh(x)) is a smooth absolute value (a robust loss: x^2 / 2 near 0, |x| - log 2 far out).
JAX gives the vjp (``jax.vjp``) and the infer rule (``jax.eval_shape``), so only the forward
computation is written here.

It is registered only when JAX is installed (``pip install 'chainrule-acme[jax]'``): without
it, acme still provides its three numpy operators. JAX is imported inside the function, at
its first call, so that importing the plugin (``chainrule ops``, ``chainrule plugins``) does
not pay JAX's import time, about a second.
"""
from __future__ import annotations

from chainrule.plugins import OperatorSet, from_jax
from chainrule.plugins.jax_bridge import jax_available


def logcosh(x):
    """log(cosh(x)), without overflow for large |x|."""
    import jax.numpy as jnp

    return jnp.logaddexp(x, -x) - jnp.log(2.0)


def with_jax_operators(ops: OperatorSet) -> OperatorSet:
    """``ops`` with acme.logcosh added when JAX is installed (unchanged otherwise)."""
    if jax_available():
        ops.add(from_jax("acme.logcosh", logcosh))
    return ops
