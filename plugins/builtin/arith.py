"""Arithmetic with numpy broadcasting and type promotion: add, sub, mul, div, neg, pow, maximum, minimum.

The vjp rules return gradients of the output's (broadcast) shape; the engine
sums them back to each input's shape (unbroadcast), so no rule here
re-implements broadcasting. Gradients take the dtype of ``g``: float32 stays float32.

Gradient semantics (the lecture notes' gates): add distributes, mul swaps,
max routes. When ``maximum``/``minimum`` see a tie (x == y) the gradient is
split evenly, 0.5 to each input.
"""
from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np

from chainrule.core import OpDef, OpError, TensorSpec
from chainrule.core.dtypes import FLOAT64
from chainrule.plugins.authoring import broadcast_inputs, table_hookimpl

from .common import writable


# --- infer rules -----------------------------------------------------------------------------

def _numeric(*specs: TensorSpec, **_: Any) -> TensorSpec:
    """broadcast_inputs, refusing all-bool inputs: numpy would answer with logic, not arithmetic."""
    spec = broadcast_inputs(*specs)
    if spec.dtype == np.bool_:
        raise OpError("all inputs are bool; arithmetic needs an int or float input", reason="DTYPE_MISMATCH")
    return spec


def _true_division(x: TensorSpec, y: TensorSpec) -> TensorSpec:
    """Like numpy's ``/``: integer inputs give float64."""
    spec = _numeric(x, y)
    return spec if spec.dtype.kind == "f" else TensorSpec(spec.shape, FLOAT64)


# --- rules with a few steps ------------------------------------------------------------------

# sums distribute the gradient, products swap it; these work on arrays and floats alike
def _add_vjp(g, out, x, y):
    return g, g


def _sub_vjp(g, out, x, y):
    return g, -g


def _neg_vjp(g, out, x):
    return (-g,)


def _mul_vjp(g, out, x, y):
    return g * y, g * x


def _div_vjp(g, out, x, y):
    dx = g / y
    return dx, -dx * out                        # d(x/y)/dy = -x/y² = -out/y


def _power(x, y):
    if np.result_type(x, y).kind != "f" and np.any(y < 0):
        bad = np.asarray(y)[np.asarray(y) < 0].flat[0]
        raise OpError(f"exponent {bad} is negative; integers to negative powers need a float input",
                      reason="OUT_OF_RANGE")
    return np.power(x, y)


def _pow_vjp(g, out, x, y):
    dx = writable(g * y * np.power(x, y - 1))   # d(x**y)/dx = y x**(y-1), and 0 where y == 0
    dy = writable(g * out * np.log(x))          # d(x**y)/dy = x**y log x, and 0 where x == 0 (as PyTorch)
    return _zero_where(dx, y == 0), _zero_where(dy, x == 0)


def _zero_where(d: np.ndarray, mask: Any) -> np.ndarray:
    if np.any(mask):                            # rare: skip the pass over d otherwise
        d[np.broadcast_to(mask, d.shape)] = 0
    return d


def _route(g, out, x, y):
    """maximum/minimum: the input that gave the output takes the gradient; a tie splits it 0.5 / 0.5."""
    dx = writable(g * (x == out))
    dy = writable(g * (y == out))
    tie = x == y
    if np.any(tie):                             # rare: skip the pass over dx, dy otherwise
        tie = np.broadcast_to(tie, dx.shape)
        dx[tie] *= 0.5
        dy[tie] *= 0.5
    return dx, dy


# --- the same rules on Python floats (OpDef.scalar: a scalar plan runs several times faster) -----

def _max_float(x: float, y: float) -> float:
    return x if x >= y or x != x else y         # as np.maximum: a NaN on either side wins


def _min_float(x: float, y: float) -> float:
    return x if x <= y or x != x else y


def _route_float(g: float, out: float, x: float, y: float) -> tuple[float, float]:
    if x == y:
        return 0.5 * g, 0.5 * g
    return (g, 0.0) if x == out else (0.0, g)


def _pow_float(x: float, y: float) -> float:
    return math.pow(x, y)                       # ValueError (negative base, fractional power): numpy runs


def _pow_vjp_float(g: float, out: float, x: float, y: float) -> tuple[float, float]:
    dx = 0.0 if y == 0 else g * y * math.pow(x, y - 1)
    dy = 0.0 if x == 0 else g * out * math.log(x)
    return dx, dy


# --- gradient-check samples: broadcasting pairs, nonzero divisors, positive bases, no ties ----

_PAIRS = [((2, 3), (2, 3)), ((2, 3), (3,)), ((4, 1), (1, 3)), ((), (2, 2)), ((3,), ())]


def _pair_shapes(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return _PAIRS[rng.integers(len(_PAIRS))]


def _pair(rng):
    a, b = _pair_shapes(rng)
    return [np.asarray(rng.standard_normal(a)), np.asarray(rng.standard_normal(b))], {}


def _nonzero_divisor(rng):
    a, b = _pair_shapes(rng)
    y = rng.choice([-1.0, 1.0], b) * rng.uniform(0.5, 2.0, b)
    return [np.asarray(rng.standard_normal(a)), np.asarray(y)], {}


def _positive_base(rng):
    a, b = _pair_shapes(rng)
    return [np.asarray(rng.uniform(0.5, 2.0, a)), np.asarray(rng.uniform(-2.0, 2.0, b))], {}


def _apart(rng):
    """x near integers, y near half-integers: never within 0.3 of each other."""
    a, b = _pair_shapes(rng)
    x = rng.integers(-3, 3, a) + rng.uniform(-0.1, 0.1, a)
    y = rng.integers(-3, 3, b) + 0.5 + rng.uniform(-0.1, 0.1, b)
    return [np.asarray(x), np.asarray(y)], {}


# --- the table: forward rules are Python's operators, which dispatch to the same numpy
# ufuncs for arrays but skip the ufunc call overhead (about 0.5 us) for 0-d values -------------------------------------------------------------------------------

OPERATORS: list[OpDef] = [
    # sums distribute the gradient, products swap it
    OpDef("add", 2, operator.add, _add_vjp, _numeric,
          doc="x + y with numpy broadcasting.", sample=_pair, scalar=(operator.add, _add_vjp)),
    OpDef("sub", 2, operator.sub, _sub_vjp, _numeric,
          doc="x - y with numpy broadcasting.", sample=_pair, scalar=(operator.sub, _sub_vjp)),
    OpDef("neg", 1, operator.neg, _neg_vjp, _numeric,
          doc="-x elementwise.", scalar=(operator.neg, _neg_vjp)),
    OpDef("mul", 2, operator.mul, _mul_vjp, _numeric,
          doc="x * y with numpy broadcasting.", sample=_pair, scalar=(operator.mul, _mul_vjp)),
    OpDef("div", 2, operator.truediv, _div_vjp, _true_division,
          doc="x / y with numpy broadcasting; integer inputs give float64.", sample=_nonzero_divisor,
          scalar=(operator.truediv, _div_vjp)),

    # powers
    OpDef("pow", 2, _power, _pow_vjp, _numeric,
          doc="x ** y; the gradient for y is g * out * log(x), and 0 where x == 0.", sample=_positive_base,
          scalar=(_pow_float, _pow_vjp_float)),

    # max routes the gradient to the winner
    OpDef("maximum", 2, np.maximum, _route, _numeric,
          doc="Elementwise max(x, y); the larger takes the gradient, ties split it 0.5 / 0.5.", sample=_apart,
          scalar=(_max_float, _route_float)),
    OpDef("minimum", 2, np.minimum, _route, _numeric,
          doc="Elementwise min(x, y); the smaller takes the gradient, ties split it 0.5 / 0.5.", sample=_apart,
          scalar=(_min_float, _route_float)),
]

register_operators = table_hookimpl(OPERATORS)
