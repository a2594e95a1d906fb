"""Registers ``acme.swish`` too (as SiLU, without beta): a name with chainrule-acme's prefix, so refused."""
from __future__ import annotations

import numpy as np

from chainrule.plugins import OperatorSet, float_like_input

ops = OperatorSet()


@ops.operator("acme.swish", infer=float_like_input)
def silu(x):
    """SiLU: x * sigmoid(x)."""
    return x * 0.5 * (1 + np.tanh(0.5 * x))


@silu.vjp
def _(g, out, x):
    s = 0.5 * (1 + np.tanh(0.5 * x))
    return (g * (s + out * (1 - s)),)


register_operators = ops.hookimpl()
