"""Elementwise math: exp, log, sqrt, abs, sin, cos, tanh, sigmoid, relu, leaky_relu, softplus, clip.

One table, one row per operator. The vjp rules reuse ``out`` where the
derivative is a function of the value (exp: ``g * out``, tanh: ``g * (1 - out²)``),
so the backward pass does not recompute the forward. Float functions turn int
and bool inputs into float64 and keep float32 as float32 (Python float constants
are "weak" under NEP 50, so ``0.5 * x`` stays float32).

The engine runs rules under ``np.errstate(all="ignore")``; sigmoid and softplus
are still written so that ``exp`` never overflows: it only ever sees ``-|x|``.

At kinks: abs and relu have gradient 0 at x = 0; clip passes the gradient at
its bounds. Masks multiply the gradient (``g * (x > 0)``, as HIPS autograd does;
several times faster than ``np.where``).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from chainrule.core import Attr, OpDef, OpError, TensorSpec
from chainrule.plugins.authoring import float_like_input, table_hookimpl

from .common import as_float, writable


# --- stable sigmoid and softplus ----------------------------------------------------------

#: Arrays at least this large are computed in one fresh buffer with in-place ufuncs
#: (fewer allocations and page faults); smaller ones, 0-d values above all, with
#: plain expressions, which skip the ufunc-call overhead of ``out=``.
IN_PLACE_MIN = 1 << 14


def sigmoid(x: Any) -> np.ndarray:
    """1 / (1 + exp(-x)). For x < -709, exp(-x) is inf and the result is exactly 0
    (the true value is below 1e-308): no nan and no overflow warning. Four passes
    over one buffer for large arrays, against four allocations for the naive formula."""
    x = as_float(x)
    with np.errstate(over="ignore"):
        if x.size < IN_PLACE_MIN:
            return 1 / (1 + np.exp(-x))
        e = np.negative(x)
        np.exp(e, out=e)
        e += 1
        np.reciprocal(e, out=e)
        return e


def softplus(x: Any) -> np.ndarray:
    """log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)): no overflow, exact for large |x|."""
    x = as_float(x)
    e = writable(np.abs(x))
    np.negative(e, out=e)
    np.exp(e, out=e)
    np.log1p(e, out=e)
    e += np.maximum(x, 0)
    return e


# --- vjp rules that update one fresh buffer in place --------------------------------------

def _tanh_vjp(g, out, x):
    if out.size < IN_PLACE_MIN:
        return (g * (1 - out * out),)
    d = out * out
    np.subtract(1, d, out=d)            # 1 - tanh²
    d *= g
    return (d,)


def _sigmoid_vjp(g, out, x):
    if out.size < IN_PLACE_MIN:
        return (g * out * (1 - out),)
    d = np.subtract(1, out)
    d *= out                            # σ (1 - σ)
    d *= g
    return (d,)


def _sqrt_vjp(g, out, x):
    d = writable(g / out)
    d *= 0.5                            # d√x/dx = 1 / (2 √x)
    return (d,)


def _softplus_vjp(g, out, x):
    s = sigmoid(x)                      # d softplus / dx = σ(x)
    s *= g
    return (s,)


def _leaky_relu(x, *, alpha):
    x = as_float(x)
    slanted = writable(alpha * x)
    # x for x > 0, alpha x otherwise: the larger of the two when alpha <= 1, else the smaller
    return (np.maximum if alpha <= 1 else np.minimum)(x, slanted, out=slanted)


def _leaky_relu_vjp(g, out, x, *, alpha):
    slope = writable((x > 0).astype(g.dtype))
    slope *= 1 - alpha
    slope += alpha                      # 1 for x > 0, alpha otherwise
    slope *= g
    return (slope,)


# --- clip ------------------------------------------------------------------------------------

def _clip(x, *, min=None, max=None):  # noqa: A002 - the attribute names are min and max
    x = as_float(x)
    if min is None and max is None:
        return x
    return np.clip(x, min, max)


def _clip_vjp(g, out, x, *, min=None, max=None):  # noqa: A002
    lo = -np.inf if min is None else min
    hi = np.inf if max is None else max
    return (g * ((x >= lo) & (x <= hi)),)   # 1 inside [min, max] (bounds included), 0 outside


def _clip_infer(x: TensorSpec, *, min=None, max=None) -> TensorSpec:  # noqa: A002
    if min is not None and max is not None and min > max:
        raise OpError(f"min {min} is greater than max {max}", reason="BAD_ATTRIBUTE", field="attrs.min")
    return float_like_input(x)


# --- infer rule of abs and relu: same dtype, but a number ----------------------------------

def _numeric_input(x: TensorSpec, **_: Any) -> TensorSpec:
    if x.dtype == np.bool_:
        raise OpError("input is bool; this operator needs an int or float input", reason="DTYPE_MISMATCH")
    return x


# --- gradient-check samples: keep points off kinks and out of the domain's edges -----------

def _shape(rng: np.random.Generator) -> tuple[int, ...]:
    return [(), (5,), (2, 3)][rng.integers(3)]


def _positive(rng):
    return [np.asarray(rng.uniform(0.5, 3.0, _shape(rng)))], {}


def _off_zero(rng):
    shape = _shape(rng)
    return [np.asarray(rng.choice([-1.0, 1.0], shape) * rng.uniform(0.1, 2.0, shape))], {}


def _off_zero_alpha(rng):
    inputs, _ = _off_zero(rng)
    return inputs, {"alpha": 0.2}


def _clip_sample(rng):
    shape = _shape(rng)   # values k/2 + 1/4 ± 0.1: never within 0.15 of the bounds ±0.5
    x = rng.integers(-3, 3, shape) * 0.5 + 0.25 + rng.uniform(-0.1, 0.1, shape)
    return [np.asarray(x)], {"min": -0.5, "max": 0.5}


# --- the table -------------------------------------------------------------------------------

OPERATORS: list[OpDef] = [
    # exponentials and logarithms
    OpDef("exp", 1, lambda x: np.exp(as_float(x)), lambda g, out, x: (g * out,), float_like_input,
          doc="e**x elementwise."),
    OpDef("log", 1, lambda x: np.log(as_float(x)), lambda g, out, x: (g / x,), float_like_input,
          doc="Natural logarithm elementwise (-inf at 0, nan below).", sample=_positive),
    OpDef("sqrt", 1, lambda x: np.sqrt(as_float(x)), _sqrt_vjp, float_like_input,
          doc="Square root elementwise.", sample=_positive),
    OpDef("softplus", 1, softplus, _softplus_vjp, float_like_input,
          doc="log(1 + e**x), computed without overflow."),

    # sign and magnitude: the gradient at the kink x = 0 is 0
    OpDef("abs", 1, np.abs, lambda g, out, x: (g * np.sign(x),), _numeric_input,
          doc="|x| elementwise; gradient sign(x), 0 at x = 0.", sample=_off_zero),
    OpDef("relu", 1, lambda x: np.maximum(x, 0), lambda g, out, x: (g * (x > 0),), _numeric_input,
          doc="max(x, 0) elementwise; gradient 1 for x > 0, else 0.", sample=_off_zero),
    OpDef("leaky_relu", 1,
          _leaky_relu, _leaky_relu_vjp, float_like_input, attrs={"alpha": Attr("float", 0.01, "slope for x <= 0")},
          doc="x for x > 0, alpha * x otherwise.", sample=_off_zero_alpha),
    OpDef("clip", 1, _clip, _clip_vjp, _clip_infer,
          attrs={"min": Attr("float", None, "lower bound; none if unset"),
                 "max": Attr("float", None, "upper bound; none if unset")},
          doc="x limited to [min, max]; gradient 1 inside (bounds included), 0 outside.", sample=_clip_sample),

    # trigonometric and squashing
    OpDef("sin", 1, lambda x: np.sin(as_float(x)), lambda g, out, x: (g * np.cos(x),), float_like_input,
          doc="Sine elementwise (radians)."),
    OpDef("cos", 1, lambda x: np.cos(as_float(x)), lambda g, out, x: (-g * np.sin(x),), float_like_input,
          doc="Cosine elementwise (radians)."),
    OpDef("tanh", 1, lambda x: np.tanh(as_float(x)), _tanh_vjp, float_like_input,
          doc="Hyperbolic tangent elementwise."),
    OpDef("sigmoid", 1, sigmoid, _sigmoid_vjp, float_like_input,
          doc="Logistic function 1 / (1 + e**-x), computed without overflow."),
]

register_operators = table_hookimpl(OPERATORS)
