"""Elementwise math: exp, log, sqrt, abs, sin, cos, tanh, sigmoid, relu, leaky_relu, softplus, clip, erf, gelu,
log1p, expm1, sign.

One table, one row per operator. The vjp rules reuse ``out`` where the
derivative is a function of the value (exp: ``g * out``, tanh: ``g * (1 - out²)``),
so the backward pass does not recompute the forward. Float functions turn int
and bool inputs into float64 and keep float32 as float32 (Python float constants
are "weak" under NEP 50, so ``0.5 * x`` stays float32).

The engine runs rules under ``np.errstate(all="ignore")``; sigmoid and softplus
are still written so that ``exp`` never overflows: it only ever sees ``-|x|``.

At kinks: abs and relu have gradient 0 at x = 0; clip passes the gradient at
its bounds. Masks multiply the gradient (``g * (x > 0)``, as HIPS autograd does;
several times faster than ``np.where``). sign is piecewise constant: its gradient
is 0 (a zeros array, not None: the input is a float that takes a gradient), which
is its true derivative away from 0, so it passes the gradient check on points off 0.

erf (and gelu's normal CDF) without scipy: numpy has no erf, and ``math.erf`` on
each element costs about 110 ms for a million values. Arrays of up to
:data:`ERF_LIBM_MAX` elements go through ``math.erf``/``math.erfc`` (the C
library's, within 1 ulp); larger ones through piecewise polynomials fitted for
this module: erf(x) = x P(x²) for |x| < 1, and erfc(y) = exp(-y²) Q(y) on
[1, 2), [2, 3), [3, 4) and exp(-y²) / (y √π) T(1 / y²) beyond, with y² split so
that exp(-y²) carries no rounding error of its own. Measured against mpmath at
40 digits on 1.4e4 points over [-27, 27]: erf within 2.8e-16 relative (2 ulp),
erfc within 1.1e-15 relative where it is a normal float (tests/test_ops_compare_elementwise.py
holds both to math.erf/math.erfc). A million values take 10 ms (all |x| < 1) to
32 ms (N(0, 4), a quarter of them in each erfc piece), against 110 ms for math.erf.
float32 inputs are computed in float64 and rounded.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable

import numpy as np

from chainrule.core import Attr, OpDef, OpError, TensorSpec
from chainrule.core.dtypes import NUMBER_DTYPES
from chainrule.core.engine import running_rules
from chainrule.core.symbolic import no_jvp_graph, no_vjp_graph, with_symbolic
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
    if x.size < IN_PLACE_MIN and running_rules():  # the engine's errstate already keeps exp's overflow quiet
        return 1 / (1 + np.exp(-x))
    with np.errstate(over="ignore"):
        if x.size < IN_PLACE_MIN:
            return 1 / (1 + np.exp(-x))
        e = np.negative(x)
        np.exp(e, out=e)
        e += 1
        np.reciprocal(e, out=e)
        return e


def sigmoid_into(out: np.ndarray, x: np.ndarray) -> np.ndarray:
    """:func:`sigmoid` of a float array written into ``out`` (which may be ``x`` itself): the same
    four passes, so the same bits, without a fresh buffer."""
    with np.errstate(over="ignore"):
        np.negative(x, out=out)
        np.exp(out, out=out)
        out += 1
        np.reciprocal(out, out=out)
    return out


def softplus(x: Any) -> np.ndarray:
    """log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)): no overflow, exact for large |x|."""
    x = as_float(x)
    e = writable(np.abs(x))
    np.negative(e, out=e)
    np.exp(e, out=e)
    np.log1p(e, out=e)
    e += np.maximum(x, 0)
    return e


def softplus_into(out: np.ndarray, x: np.ndarray) -> np.ndarray:
    """:func:`softplus` written into ``out`` (which may be ``x`` itself): the same passes, so the same
    bits (max(x, 0) taken first, before ``out`` overwrites x)."""
    positive = np.maximum(x, 0)
    np.abs(x, out=out)
    np.negative(out, out=out)
    np.exp(out, out=out)
    np.log1p(out, out=out)
    out += positive
    return out


def copied_into(rule: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    """A ``forward_into`` for a rule that has no in-place form (erf, gelu): its fresh result copied into
    ``out``, a pass of about 1 ns per element beside its 20-35. What it gains is the engine's blocks:
    declaring forward_into says the operator is elementwise, so a large node runs block by block with
    stop checks between (core/engine.py), where erf of 1.3e8 elements ran 4 s in one piece."""
    def into(out: np.ndarray, x: np.ndarray, **attrs: Any) -> np.ndarray:
        np.copyto(out, rule(x, **attrs))
        return out
    return into


# --- vjp rules that update one fresh buffer in place --------------------------------------

def ones_broadcast(g: Any) -> bool:
    """Whether ``g`` is one 1 broadcast to a shape (the gradient a sum hands back): multiplying
    by it is a pass over the array that changes no bit (x * 1 is x), so it can be left out.
    Every element of an array whose strides are all 0 is the one element at its start."""
    return type(g) is np.ndarray and g.ndim > 0 and not any(g.strides) and g.size > 0 and g.flat[0] == 1


def _tanh_vjp(g, out, x):
    if out.size < IN_PLACE_MIN:
        return (g * (1 - out * out),)
    d = out * out
    np.subtract(1, d, out=d)            # 1 - tanh²
    if not ones_broadcast(g):
        d *= g
    return (d,)


def _sigmoid_vjp(g, out, x):
    if out.size < IN_PLACE_MIN:
        return (g * out * (1 - out),)
    d = np.subtract(1, out)
    d *= out                            # σ (1 - σ)
    if not ones_broadcast(g):
        d *= g
    return (d,)


def _tanh_vjp_into(grads, g, out, x):
    """:func:`_tanh_vjp`'s large-array passes, written into ``grads[0]``."""
    d = grads[0]
    np.multiply(out, out, out=d)
    np.subtract(1, d, out=d)
    if not ones_broadcast(g):
        d *= g


def _sigmoid_vjp_into(grads, g, out, x):
    """:func:`_sigmoid_vjp`'s large-array passes, written into ``grads[0]``."""
    d = grads[0]
    np.subtract(1, out, out=d)
    d *= out
    if not ones_broadcast(g):
        d *= g


def _times_g_into(rule: Callable[..., Any]) -> Callable[..., None]:
    """A ``vjp_into`` for a vjp ``g * rule(x)``: rule's result written into ``grads[0]``, then multiplied
    by g (x * y is y * x, bit for bit)."""
    def into(grads, g, out, x):
        rule(grads[0], out, x)
        np.multiply(grads[0], g, out=grads[0])
    return into


def _cos_vjp_into(grads, g, out, x):
    """``-g * sin(x)`` written into ``grads[0]`` as ``-(sin(x) * g)``: the same bits (a product's
    rounding does not depend on its operands' order or signs)."""
    d = grads[0]
    np.sin(x, out=d)
    d *= g
    np.negative(d, out=d)


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


# --- erf, erfc and the normal CDF, without scipy ----------------------------------------------

#: Arrays of at most this many elements go through math.erf / math.erfc one by one: the Python loop
#: (about 0.06 us an element) costs less than the polynomials' sixty-odd numpy calls up to about 1500.
ERF_LIBM_MAX = 1024

# Polynomials fitted with mpmath.chebyfit at 50 digits (coefficients highest degree first; the fit
# errors, 2e-18 to 2e-17, are below float64 rounding). To refit, with f the function below:
#     mpmath.chebyfit(lambda s: f(mid + half * s), [-1, 1], n, error=True)
# erf(x) / x as a polynomial in t = x² on [0, 1] (12 terms; fitted in t directly):
_ERF_SMALL = (
    -7.795898827002142e-10, 1.3720064546777686e-08, -1.6208483801871705e-07, 1.6447424703317362e-06,
    -1.492473690741966e-05, 0.00012055294904839707, -0.0008548325975389692, 0.0052239776071164225,
    -0.02686617064323777, 0.11283791670945006, -0.37612638903183543, 1.1283791670955126,
)
# erfc(y) exp(y²) on [lower, upper) as a polynomial in s = 2 (y - mid), s in [-1, 1):
_ERFC_PIECES = (
    (1.0, 2.0, 1.5, (
        -1.5053845831299624e-12, 1.100964212179346e-11, -7.259519499451313e-11, 5.033420569164749e-10,
        -3.40590129634009e-09, 2.2329527918697295e-08, -1.4191188983511488e-07, 8.723039535796884e-07,
        -5.171328661078072e-06, 2.9470857585360663e-05, -0.00016081117337237463, 0.0008360838095501772,
        -0.0041163631624454335, 0.019037759963870138, -0.08181145886628004, 0.3215854164543175,
    )),
    (2.0, 3.0, 2.5, (
        2.4476738244522083e-13, -2.077909334188526e-12, 1.637375681273273e-11, -1.3312005000928675e-10,
        1.0598014640676434e-09, -8.2311677340656e-09, 6.235098318984807e-08, -4.5991373707582856e-07,
        3.2971847556287464e-06, -2.292471679603018e-05, 0.0001541898009812305, -0.0010001961727617342,
        0.0062344992716642286, -0.03717367339489736, 0.2108063640611436,
    )),
    (3.0, 4.0, 3.5, (
        -9.707125194831844e-14, 9.5328613963529e-13, -8.870653911274375e-12, 8.415241292189654e-11,
        -7.846511834884602e-10, 7.176546861351153e-09, -6.435926890243138e-08, 5.65339119490151e-07,
        -4.858403694777809e-06, 4.079289543179242e-05, -0.0003341343049554451, 0.0026652832981275275,
        -0.020661788916626248, 0.1552936556088943,
    )),
)
# erfc(y) y √π exp(y²) for y >= 4 as a polynomial in s = 32 / y² - 1 (u = 1 / y² in [0, 1/16]):
_ERFC_TAIL = (
    -4.290965128817457e-13, 1.857367011050534e-12, -6.980887063457579e-12, 3.463963794274915e-11,
    -1.8593517354807396e-10, 1.0631908044890699e-09, -6.650093043419895e-09, 4.6265706216223686e-08,
    -3.658687911795167e-07, 3.393739678831662e-06, -3.874774635933667e-05, 0.0005912853104829893,
    -0.014310447062397036, 0.9850557060634584,
)
_SQRT_PI = math.sqrt(math.pi)
_TOP_BITS = np.uint64(0xFFFFFFFF00000000)   # sign, exponent and the top 20 bits of the mantissa


def _horner(coeffs: tuple[float, ...], s: np.ndarray) -> np.ndarray:
    """The polynomial at ``s`` (a 1-D float64 array), in one fresh buffer."""
    p = coeffs[0] * s
    p += coeffs[1]
    for c in coeffs[2:]:
        p *= s
        p += c
    return p


def _exp_minus_square(y: np.ndarray) -> np.ndarray:
    """exp(-y²) for a 1-D float64 array y >= 0, as exp(-hi²) exp(-(y - hi)(y + hi)) with hi the
    top bits of y: hi² is exact, so y² adds no rounding error (which exp would multiply by y²)."""
    hi = (np.minimum(y, 40.0).view(np.uint64) & _TOP_BITS).view(np.float64)   # exp(-1600) is 0 already
    lo = y - hi
    lo *= y + hi
    np.negative(lo, out=lo)
    np.exp(lo, out=lo)
    hi *= hi
    np.negative(hi, out=hi)
    np.exp(hi, out=hi)
    hi *= lo
    return hi


def _erfc_at_least_one(y: np.ndarray) -> np.ndarray:
    """erfc(y) for a 1-D float64 array of y >= 1 (nan gives nan): a fresh array."""
    out = np.empty_like(y)
    for lower, upper, mid, coeffs in _ERFC_PIECES:
        mask = y < upper
        if lower > 1.0:
            mask &= y >= lower
        idx = np.flatnonzero(mask)   # indices, then take: much faster than boolean indexing here
        if idx.size:
            v = y.take(idx)
            s = v - mid
            s *= 2.0
            p = _horner(coeffs, s)
            p *= _exp_minus_square(v)
            out[idx] = p
    idx = np.flatnonzero(~(y < 4.0))   # nan too
    if idx.size:
        v = y.take(idx)
        s = np.multiply(v, v)
        np.divide(32.0, s, out=s)
        s -= 1.0
        p = _horner(_ERFC_TAIL, s)
        p /= v
        p *= 1 / _SQRT_PI
        p *= _exp_minus_square(v)   # last: the factors before it stay normal floats
        out[idx] = p
    return out


def _erf_or_erfc(x: np.ndarray, complement: bool) -> np.ndarray:
    """erf(x), or erfc(x) if ``complement``, of a float64 array: a fresh float64 array."""
    if x.size <= ERF_LIBM_MAX:
        f = math.erfc if complement else math.erf
        return np.array([f(v) for v in x.ravel().tolist()], dtype=np.float64).reshape(x.shape)
    flat = x.reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):
        t = flat * flat
        out = _horner(_ERF_SMALL, t)   # erf where |x| < 1; the others are replaced below
        out *= flat
        if complement:
            np.subtract(1.0, out, out=out)
        big = np.flatnonzero(~(np.abs(flat) < 1.0))
        if big.size:
            v = flat.take(big)
            e = _erfc_at_least_one(np.abs(v))
            if complement:
                negative = np.flatnonzero(v < 0)
                e[negative] = 2.0 - e[negative]   # erfc(-y) = 2 - erfc(y)
            else:
                np.subtract(1.0, e, out=e)
                np.copysign(e, v, out=e)
            out[big] = e
    return out.reshape(x.shape)


def erf(x: Any) -> np.ndarray:
    """The error function, elementwise; float32 stays float32, integers give float64."""
    x = as_float(x)
    out = _erf_or_erfc(np.asarray(x, dtype=np.float64), complement=False)
    return out if x.dtype == np.float64 else out.astype(x.dtype)


def _erf_vjp(g, out, x):
    x = as_float(x)
    d = writable(np.square(x))
    np.negative(d, out=d)
    np.exp(d, out=d)
    d *= 2 / _SQRT_PI                   # d erf / dx = 2 / √π exp(-x²)
    d *= g
    return (d,)


# --- gelu ------------------------------------------------------------------------------------

GELU_MODES = ("none", "tanh")
_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
_GELU_CUBIC = 0.044715


def _check_approximate(approximate: str) -> None:
    if approximate not in GELU_MODES:
        raise OpError(f"approximate must be one of {', '.join(repr(m) for m in GELU_MODES)}, got {approximate!r}",
                      reason="BAD_ATTRIBUTE", field="attrs.approximate")


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    """Φ(x) = erfc(-x / √2) / 2 in float64: accurate for very negative x too, where 1 + erf(x / √2) cancels."""
    z = np.asarray(np.asarray(x, dtype=np.float64) * -math.sqrt(0.5))
    p = _erf_or_erfc(z, complement=True)
    p *= 0.5
    return p


def _tanh_argument(x):
    """2 √(2/π) (x + 0.044715 x³): 1 + tanh(z) = 2 sigmoid(2 z), which does not cancel for x << 0."""
    z = writable(x * x)
    z *= _GELU_CUBIC
    z += 1.0
    z *= x
    z *= 2 * _SQRT_2_OVER_PI
    return z


def _gelu(x, *, approximate="none"):
    _check_approximate(approximate)
    x = as_float(x)
    if approximate == "tanh":
        return x * sigmoid(_tanh_argument(x))
    out = _normal_cdf(x)
    out *= x
    return out if x.dtype == np.float64 else out.astype(x.dtype)


def _gelu_vjp(g, out, x, *, approximate="none"):
    x = as_float(x)
    if approximate == "tanh":
        s = sigmoid(_tanh_argument(x))   # d/dx x σ(2z) = σ + x σ (1 - σ) 2z'
        dz = writable(x * x)
        dz *= 3 * _GELU_CUBIC
        dz += 1.0
        dz *= 2 * _SQRT_2_OVER_PI
        dz *= x
        dz *= 1 - s
        dz += 1.0
        dz *= s
        dz *= g
        return (dz,)
    d = writable(np.square(x, dtype=np.float64))  # d/dx x Φ(x) = Φ(x) + x φ(x)
    d *= -0.5
    np.exp(d, out=d)
    d *= x
    d *= 1 / math.sqrt(2 * math.pi)
    d += _normal_cdf(x)
    return (g * d.astype(x.dtype, copy=False),)


def _gelu_infer(x: TensorSpec, *, approximate="none") -> TensorSpec:
    _check_approximate(approximate)
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


def _above_minus_one(rng):
    """log1p's domain, kept 0.5 away from the pole at -1."""
    return [np.asarray(rng.uniform(-0.5, 3.0, _shape(rng)))], {}


def _gelu_sample(rng):
    shape = _shape(rng)
    return [np.asarray(rng.uniform(-4.0, 4.0, shape))], {"approximate": GELU_MODES[rng.integers(2)]}


def _clip_sample(rng):
    shape = _shape(rng)   # values k/2 + 1/4 ± 0.1: never within 0.15 of the bounds ±0.5
    x = rng.integers(-3, 3, shape) * 0.5 + 0.25 + rng.uniform(-0.1, 0.1, shape)
    return [np.asarray(x)], {"min": -0.5, "max": 0.5}



# --- the same rules on Python floats (OpDef.scalar: a plan of float64 scalars runs on these) ----
# math raises where numpy gives inf or nan (math.log(0.0), math.exp(1000.0)): the engine then
# redoes that run with the rules above.

def _sigmoid_float(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _softplus_float(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _sign_float(x: float) -> float:
    return 1.0 if x > 0 else -1.0 if x < 0 else x   # 0.0, -0.0 and nan stay themselves


def _relu_float(x: float) -> float:
    return x if x > 0 or x != x else 0.0            # as np.maximum(x, 0): nan stays nan


FLOAT_RULES = {
    "exp": (math.exp, lambda g, out, x: (g * out,)),
    "log": (math.log, lambda g, out, x: (g / x,)),
    "sqrt": (math.sqrt, lambda g, out, x: (0.5 * (g / out),)),
    "softplus": (_softplus_float, lambda g, out, x: (g * _sigmoid_float(x),)),
    "abs": (abs, lambda g, out, x: (g * _sign_float(x),)),
    "relu": (_relu_float, lambda g, out, x: (g if x > 0 else 0.0,)),
    "sin": (math.sin, lambda g, out, x: (g * math.cos(x),)),
    "cos": (math.cos, lambda g, out, x: (-g * math.sin(x),)),
    "tanh": (math.tanh, lambda g, out, x: (g * (1.0 - out * out),)),
    "sigmoid": (_sigmoid_float, lambda g, out, x: (g * out * (1.0 - out),)),
    "log1p": (math.log1p, lambda g, out, x: (g / (1.0 + x),)),
    "expm1": (math.expm1, lambda g, out, x: (g * (out + 1.0),)),
}


# --- the table -------------------------------------------------------------------------------

OPERATORS: list[OpDef] = [
    # exponentials and logarithms
    OpDef("exp", 1, lambda x: np.exp(as_float(x)), lambda g, out, x: (g * out,), float_like_input,
          doc="e**x elementwise.", vjp_reads="output", forward_into=lambda out, x: np.exp(x, out=out),
          vjp_into=lambda grads, g, out, x: np.multiply(g, out, out=grads[0])),
    OpDef("log", 1, lambda x: np.log(as_float(x)), lambda g, out, x: (g / x,), float_like_input,
          doc="Natural logarithm elementwise (-inf at 0, nan below).", sample=_positive,
          vjp_reads="inputs", forward_into=lambda out, x: np.log(x, out=out),
          vjp_into=lambda grads, g, out, x: np.divide(g, x, out=grads[0])),
    OpDef("sqrt", 1, lambda x: np.sqrt(as_float(x)), _sqrt_vjp, float_like_input,
          doc="Square root elementwise.", sample=_positive,
          vjp_reads="output", forward_into=lambda out, x: np.sqrt(x, out=out)),
    OpDef("softplus", 1, softplus, _softplus_vjp, float_like_input,
          doc="log(1 + e**x), computed without overflow.", forward_into=softplus_into),

    # sign and magnitude: the gradient at the kink x = 0 is 0
    OpDef("abs", 1, np.abs, lambda g, out, x: (g * np.sign(x),), _numeric_input,
          doc="|x| elementwise; gradient sign(x), 0 at x = 0.", sample=_off_zero, input_dtypes={"x": NUMBER_DTYPES}),
    OpDef("relu", 1, lambda x: np.maximum(x, 0), lambda g, out, x: (g * (x > 0),), _numeric_input,
          doc="max(x, 0) elementwise; gradient 1 for x > 0, else 0.", sample=_off_zero,
          input_dtypes={"x": NUMBER_DTYPES}, vjp_reads="inputs", forward_into=lambda out, x: np.maximum(x, 0, out=out),
          vjp_into=lambda grads, g, out, x: np.multiply(g, x > 0, out=grads[0])),
    OpDef("leaky_relu", 1,
          _leaky_relu, _leaky_relu_vjp, float_like_input, attrs={"alpha": Attr("float", 0.01, "slope for x <= 0")},
          doc="x for x > 0, alpha * x otherwise.", sample=_off_zero_alpha),
    OpDef("clip", 1, _clip, _clip_vjp, _clip_infer,
          attrs={"min": Attr("float", None, "lower bound; none if unset"),
                 "max": Attr("float", None, "upper bound; none if unset")},
          doc="x limited to [min, max]; gradient 1 inside (bounds included), 0 outside.", sample=_clip_sample),

    # trigonometric and squashing
    OpDef("sin", 1, lambda x: np.sin(as_float(x)), lambda g, out, x: (g * np.cos(x),), float_like_input,
          doc="Sine elementwise (radians).", forward_into=lambda out, x: np.sin(x, out=out),
          vjp_into=_times_g_into(lambda d, out, x: np.cos(x, out=d))),
    OpDef("cos", 1, lambda x: np.cos(as_float(x)), lambda g, out, x: (-g * np.sin(x),), float_like_input,
          doc="Cosine elementwise (radians).", forward_into=lambda out, x: np.cos(x, out=out),
          vjp_into=_cos_vjp_into),
    OpDef("tanh", 1, lambda x: np.tanh(as_float(x)), _tanh_vjp, float_like_input,
          doc="Hyperbolic tangent elementwise.", vjp_reads="output", forward_into=lambda out, x: np.tanh(x, out=out),
          vjp_into=_tanh_vjp_into),
    OpDef("sigmoid", 1, sigmoid, _sigmoid_vjp, float_like_input,
          doc="Logistic function 1 / (1 + e**-x), computed without overflow.",
          vjp_reads="output", forward_into=lambda out, x: sigmoid_into(out, x), vjp_into=_sigmoid_vjp_into),

    # accurate near zero, and the error function
    OpDef("log1p", 1, lambda x: np.log1p(as_float(x)), lambda g, out, x: (g / (1 + x),), float_like_input,
          doc="log(1 + x) elementwise, accurate for small x (-inf at -1, nan below).", sample=_above_minus_one),
    OpDef("expm1", 1, lambda x: np.expm1(as_float(x)), lambda g, out, x: (g * (out + 1),), float_like_input,
          doc="e**x - 1 elementwise, accurate for small x."),
    OpDef("erf", 1, erf, _erf_vjp, float_like_input,
          doc="Error function 2/sqrt(pi) * integral of exp(-t**2) from 0 to x, elementwise (without scipy).",
          forward_into=copied_into(erf)),
    OpDef("gelu", 1, _gelu, _gelu_vjp, _gelu_infer, forward_into=copied_into(_gelu),
          attrs={"approximate": Attr("string", "none", "'none': x * Phi(x) exactly; 'tanh': the tanh approximation")},
          doc="Gaussian error linear unit x * Phi(x), Phi the standard normal CDF; approximate='tanh' approximates it.",
          sample=_gelu_sample),

    # piecewise constant: the gradient is 0 (zeros, not None: a float input takes a gradient)
    OpDef("sign", 1, lambda x: np.sign(as_float(x)), lambda g, out, x: (np.zeros_like(g),), float_like_input,
          doc="-1, 0 or 1 by the sign of x (nan for nan); gradient 0.", sample=_off_zero),
]

OPERATORS = [replace(op, scalar=FLOAT_RULES[op.name]) if op.name in FLOAT_RULES else op for op in OPERATORS]


# --- symbolic rules (docs/derivatives.md): each function's derivative f'(x) as a graph of registered
# operators; the vjp is g * f'(x) (or g / something) and the jvp t * f'(x), since an elementwise function's
# Jacobian is diagonal. The masks of relu, leaky_relu and clip are builtin.derivative's step (no gradient of
# its own), so their second derivatives are 0 away from the kinks. sign's derivative is 0: no rules. --------

def _times(factor):
    """(vjp_graph, jvp_graph) of an elementwise function whose derivative is ``factor(b, out, x, **attrs)``."""
    def vjp_graph(b, g, out, x, **attrs):
        return (g * factor(b, out, x, **attrs),)

    def jvp_graph(b, tangents, out, x, **attrs):
        return None if tangents[0] is None else tangents[0] * factor(b, out, x, **attrs)
    return vjp_graph, jvp_graph


def _over(divisor):
    """(vjp_graph, jvp_graph) of an elementwise function whose derivative is ``1 / divisor(b, out, x)``."""
    def vjp_graph(b, g, out, x, **attrs):
        return (g / divisor(b, out, x),)

    def jvp_graph(b, tangents, out, x, **attrs):
        return None if tangents[0] is None else tangents[0] / divisor(b, out, x)
    return vjp_graph, jvp_graph


def _leaky_slope(b, out, x, *, alpha):
    return b.op("step", x, 0.0) * (1.0 - alpha) + alpha        # 1 for x > 0, alpha otherwise


def _clip_slope(b, out, x, *, min=None, max=None):  # noqa: A002
    """1 inside [min, max], bounds included; 0 outside."""
    slope = None
    if min is not None:
        slope = b.op("step", x, min, tie=1.0)
    if max is not None:
        upper = b.op("step", max, x, tie=1.0)
        slope = upper if slope is None else slope * upper
    return b.ones_like(x) if slope is None else slope


def _erf_slope(b, out, x):
    return b.op("exp", -(x * x)) * (2 / _SQRT_PI)                 # 2 / sqrt(pi) exp(-x**2)


def _gelu_slope(b, out, x, *, approximate="none"):
    if approximate == "tanh":                                      # x sigmoid(2z): s + x s (1 - s) 2z'
        u = x * x
        s = b.op("sigmoid", x * (u * _GELU_CUBIC + 1.0) * (2 * _SQRT_2_OVER_PI))
        dz = (u * (3 * _GELU_CUBIC) + 1.0) * (2 * _SQRT_2_OVER_PI)
        return s + x * (s * (1.0 - s)) * dz
    cdf = b.op("erf", x * math.sqrt(0.5)) * 0.5 + 0.5              # Phi(x) + x phi(x)
    return cdf + x * b.op("exp", x * x * -0.5) * (1 / math.sqrt(2 * math.pi))


SYMBOLIC = {
    #  name:       (vjp_graph, jvp_graph)
    "exp":         _times(lambda b, out, x: out),
    "log":         _over(lambda b, out, x: x),
    "sqrt":        _over(lambda b, out, x: out * 2.0),
    "softplus":    _times(lambda b, out, x: b.op("sigmoid", x)),
    "abs":         _times(lambda b, out, x: b.op("sign", x)),
    "relu":        _times(lambda b, out, x: b.op("step", x, 0.0)),
    "leaky_relu":  _times(_leaky_slope),
    "clip":        _times(_clip_slope),
    "sin":         _times(lambda b, out, x: b.op("cos", x)),
    "cos":         _times(lambda b, out, x: -b.op("sin", x)),
    "tanh":        _times(lambda b, out, x: 1.0 - out * out),
    "sigmoid":     _times(lambda b, out, x: out * (1.0 - out)),
    "log1p":       _over(lambda b, out, x: x + 1.0),
    "expm1":       _times(lambda b, out, x: out + 1.0),
    "erf":         _times(_erf_slope),
    "gelu":        _times(_gelu_slope),
    "sign":        (no_vjp_graph, no_jvp_graph),
}

OPERATORS = with_symbolic(OPERATORS, SYMBOLIC)

register_operators = table_hookimpl(OPERATORS)
