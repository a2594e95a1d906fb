"""Arithmetic with numpy broadcasting and type promotion: add, sub, mul, div, neg, pow, maximum, minimum.

The vjp rules return gradients of the output's (broadcast) shape; the engine
sums them back to each input's shape (unbroadcast), so no rule here
re-implements broadcasting. Gradients take the dtype of ``g``: float32 stays float32.

Gradient semantics (the lecture notes' gates): add distributes, mul swaps,
max routes. When ``maximum``/``minimum`` see a tie (x == y) the gradient is
split evenly, 0.5 to each input.

Integer overflow is refused, not wrapped: numpy wraps int64 silently (``max + 1``
is ``min``, ``3 ** 63`` is negative), so on integer results add, sub, neg, mul
and pow check their answer and raise OpError (reason OUT_OF_RANGE; the engine
names the node). add and sub use the sign rule (operands of one sign, a result
of the other), neg looks for the dtype's minimum, mul and pow compare a float64
computation with the dtype's range and recompute near its edge exactly with
Python ints. Float results are not checked: one test of the result's dtype.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Callable

import numpy as np

from chainrule.core import OpDef, OpError, TensorSpec
from chainrule.core.dtypes import FLOAT64, NUMBER_DTYPES
from chainrule.core.symbolic import with_symbolic
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


# --- integer overflow: refused in the forward rule, not wrapped ------------------------------

def _overflow(op: str, dtype: np.dtype) -> OpError:
    info = np.iinfo(dtype)
    return OpError(f"{op} overflows {dtype} (its range is {info.min} to {info.max}): numpy would wrap it "
                   f"silently; use a wider integer or a float input", reason="OUT_OF_RANGE")


_FLOAT = np.dtype(np.float64)


def _int_kind(out: Any) -> str:
    """'i' or 'u' for an integer result, '' otherwise (floats, bools, complex; a Python float)."""
    kind = getattr(out, "dtype", _FLOAT).kind
    return kind if kind in "iu" else ""


def _ends(x: Any, which: Any) -> int:
    """x's largest or smallest element as a Python int (0 for an empty x): one reduction, no temporary."""
    x = np.asarray(x)
    if not x.size:
        return 0
    return int(x.max() if which is max else x.min())


def _within(dtype: np.dtype, high: int, low: int) -> bool:
    """Whether every result between ``low`` and ``high`` fits ``dtype``: then no element can overflow."""
    info = np.iinfo(dtype)
    return info.min <= low and high <= info.max


def _add(x, y):
    out = x + y
    kind = _int_kind(out)
    if kind == "i" and not _within(out.dtype, _ends(x, max) + _ends(y, max), _ends(x, min) + _ends(y, min)):
        t = x ^ out       # the bounds allow an overflow: look. Overflow: x and y of one sign, the result of the other
        t &= y ^ out      # in place for arrays: two temporaries, no bool array
        if t.size and t.min() < 0:
            raise _overflow("add", out.dtype)
    elif kind == "u" and np.any(out < np.maximum(x, y)):
        raise _overflow("add", out.dtype)
    return out


def _sub(x, y):
    out = x - y
    kind = _int_kind(out)
    if kind == "i" and not _within(out.dtype, _ends(x, max) - _ends(y, min), _ends(x, min) - _ends(y, max)):
        t = x ^ out       # overflow: x and y of different signs, the result's sign not x's
        t &= x ^ y
        if t.size and t.min() < 0:
            raise _overflow("sub", out.dtype)
    elif kind == "u" and np.any(x < y):
        raise _overflow("sub", out.dtype)
    return out


def _neg(x):
    out = -x
    kind = _int_kind(out)
    if kind == "i" and np.any(x == np.iinfo(out.dtype).min):   # -min is min again
        raise _overflow("neg", out.dtype)
    if kind == "u" and np.any(x != 0):
        raise _overflow("neg", out.dtype)
    return out


def check_int_range(op: str, out: Any, approx: Any, exact: Callable[[np.ndarray], Any]) -> None:
    """Refuse an integer result whose true value is outside its dtype's range.

    ``approx`` is the result computed in float64 (broadcast to out's shape, or a scalar), within
    a relative error of 1e-12 or so; the elements it puts near or beyond the range (beyond 2**(bits-2))
    are recomputed exactly by ``exact(mask)`` (a sequence of Python ints, in mask order). inf and nan
    in ``approx`` count as near the edge too: a true value that large is far outside the range.
    """
    info = np.iinfo(out.dtype)
    approx = np.abs(np.asarray(approx, dtype=np.float64))
    near = ~(approx < 2.0 ** (info.bits - 2))    # nan (0 * inf in a float product) is near too
    if not np.any(near):
        return
    for v in exact(np.broadcast_to(near, np.shape(out))):
        if v is None or not info.min <= v <= info.max:
            raise _overflow(op, out.dtype)


def _exact_elementwise(f: Callable[[int, int], Any], x: Any, y: Any) -> Callable[[np.ndarray], list]:
    def exact(mask: np.ndarray) -> list:
        xs, ys = np.broadcast_arrays(np.asarray(x), np.asarray(y))
        return [f(int(a), int(b)) for a, b in zip(xs[mask].tolist(), ys[mask].tolist())]
    return exact


def _mul(x, y):
    out = x * y
    if _int_kind(out):
        check_int_range("mul", out, np.multiply(x, y, dtype=np.float64),
                        _exact_elementwise(operator.mul, x, y))
    return out


def _int_pow(a: int, b: int) -> int | None:
    """a ** b for an integer, or None when it is too large to bother (|a| >= 2 and b >= 64)."""
    return a ** b if abs(a) < 2 or b < 64 else None


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


def _mul_vjp_into(grads, g, out, x, y):
    """:func:`_mul_vjp` written into the gradients wanted."""
    dx, dy = grads
    if dx is not None:
        np.multiply(g, y, out=dx)
    if dy is not None:
        np.multiply(g, x, out=dy)


def _div_vjp(g, out, x, y):
    dx = g / y
    return dx, -dx * out                        # d(x/y)/dy = -x/y² = -out/y


def _div_vjp_into(grads, g, out, x, y):
    """:func:`_div_vjp` written into the gradients wanted: ``g / y``, and ``-(g / y) * out``."""
    dx, dy = grads
    quotient = dx if dx is not None else np.empty_like(dy)
    np.divide(g, y, out=quotient)
    if dy is not None:
        np.negative(quotient, out=dy)
        dy *= out


def _power(x, y):
    if np.result_type(x, y).kind != "f" and np.any(y < 0):
        bad = np.asarray(y)[np.asarray(y) < 0].flat[0]
        raise OpError(f"exponent {bad} is negative; integers to negative powers need a float input",
                      reason="OUT_OF_RANGE")
    out = np.power(x, y)
    if _int_kind(out):
        with np.errstate(over="ignore"):     # inf: far outside the range, as check_int_range expects
            approx = np.power(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
        check_int_range("pow", out, approx, _exact_elementwise(_int_pow, x, y))
    return out


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


# --- the table: forward rules use Python's operators, which dispatch to the same numpy
# ufuncs for arrays but skip the ufunc call overhead (about 0.5 us) for 0-d values; add, sub,
# neg and mul wrap them with the integer overflow check (float plans of 0-d values run the
# ``scalar`` rules, which stay Python's operators) -------------------------------------------------------------------------------

OPERATORS: list[OpDef] = [
    # sums distribute the gradient, products swap it
    OpDef("add", 2, _add, _add_vjp, _numeric,
          doc="x + y with numpy broadcasting.", sample=_pair, scalar=(operator.add, _add_vjp),
          vjp_reads="none", forward_into=lambda out, x, y: np.add(x, y, out=out)),
    OpDef("sub", 2, _sub, _sub_vjp, _numeric,
          doc="x - y with numpy broadcasting.", sample=_pair, scalar=(operator.sub, _sub_vjp),
          vjp_reads="none", forward_into=lambda out, x, y: np.subtract(x, y, out=out)),
    OpDef("neg", 1, _neg, _neg_vjp, _numeric,
          doc="-x elementwise.", scalar=(operator.neg, _neg_vjp), input_dtypes={"x": NUMBER_DTYPES},
          vjp_reads="none", forward_into=lambda out, x: np.negative(x, out=out)),
    OpDef("mul", 2, _mul, _mul_vjp, _numeric,
          doc="x * y with numpy broadcasting.", sample=_pair, scalar=(operator.mul, _mul_vjp),
          vjp_reads="inputs", forward_into=lambda out, x, y: np.multiply(x, y, out=out), vjp_into=_mul_vjp_into),
    OpDef("div", 2, operator.truediv, _div_vjp, _true_division,
          doc="x / y with numpy broadcasting; integer inputs give float64.", sample=_nonzero_divisor,
          scalar=(operator.truediv, _div_vjp), input_names=("x", "y"), vjp_reads="both",
          forward_into=lambda out, x, y: np.true_divide(x, y, out=out), vjp_into=_div_vjp_into),

    # powers
    OpDef("pow", 2, _power, _pow_vjp, _numeric,
          doc="x ** y; the gradient for y is g * out * log(x), and 0 where x == 0.", sample=_positive_base,
          scalar=(_pow_float, _pow_vjp_float),
          vjp_reads="both", forward_into=lambda out, x, y: np.power(x, y, out=out)),

    # max routes the gradient to the winner
    OpDef("maximum", 2, np.maximum, _route, _numeric,
          doc="Elementwise max(x, y); the larger takes the gradient, ties split it 0.5 / 0.5.", sample=_apart,
          scalar=(_max_float, _route_float)),
    OpDef("minimum", 2, np.minimum, _route, _numeric,
          doc="Elementwise min(x, y); the smaller takes the gradient, ties split it 0.5 / 0.5.", sample=_apart,
          scalar=(_min_float, _route_float)),
]


# --- symbolic rules (docs/derivatives.md): the same derivatives as graphs of registered operators, so
# that gradients can be differentiated again and forward mode costs one pass. Gradients may keep the
# broadcast shape: the deriver sums them back (sum_to). pow's rules multiply with xmul (0 where its first
# factor is 0), as the numpy rule zeroes dx where y == 0 and dy where x == 0 (dy at x == 0 and y == 0 is
# -inf here). maximum and minimum route with step (1 / 0.5 at a tie / 0). -------------------------------

def _add_vjp_graph(b, g, out, x, y):
    return g, g


def _add_jvp_graph(b, tangents, out, x, y):
    return b.add_tangents(*tangents)


def _sub_vjp_graph(b, g, out, x, y):
    return g, -g


def _sub_jvp_graph(b, tangents, out, x, y):
    tx, ty = tangents
    if tx is not None and ty is not None:
        return tx - ty
    return tx if ty is None else -ty


def _neg_vjp_graph(b, g, out, x):
    return (-g,)


def _neg_jvp_graph(b, tangents, out, x):
    return -tangents[0]


def _mul_vjp_graph(b, g, out, x, y):
    return g * y, g * x


def _mul_jvp_graph(b, tangents, out, x, y):
    tx, ty = tangents
    return b.add_tangents(None if tx is None else tx * y, None if ty is None else x * ty)


def _div_vjp_graph(b, g, out, x, y):
    dx = g / y
    return dx, -(dx * out)                      # d(x/y)/dy = -out/y


def _div_jvp_graph(b, tangents, out, x, y):
    tx, ty = tangents
    return b.add_tangents(tx, None if ty is None else -(out * ty)) / y


def _pow_factors(b, out, x, y):
    """d(x**y)/dx = y x**(y-1) (0 where y == 0) and d(x**y)/dy = out log x (0 where out == 0)."""
    return b.op("xmul", y, b.op("pow", x, y - 1.0)), b.op("xmul", out, b.op("log", x))


def _pow_vjp_graph(b, g, out, x, y):
    dx, dy = _pow_factors(b, out, x, y)
    return g * dx, g * dy


def _pow_jvp_graph(b, tangents, out, x, y):
    tx, ty = tangents
    dx, dy = _pow_factors(b, out, x, y)
    return b.add_tangents(None if tx is None else tx * dx, None if ty is None else ty * dy)


def _routes(b, x, y, larger):
    """The weights of x and y in maximum (larger) or minimum: 1 for the winner, 0.5 each at a tie."""
    first, second = b.op("step", x, y, tie=0.5), b.op("step", y, x, tie=0.5)
    return (first, second) if larger else (second, first)


def _route_graphs(larger: bool):
    def vjp_graph(b, g, out, x, y):
        wx, wy = _routes(b, x, y, larger)
        return g * wx, g * wy

    def jvp_graph(b, tangents, out, x, y):
        wx, wy = _routes(b, x, y, larger)
        tx, ty = tangents
        return b.add_tangents(None if tx is None else tx * wx, None if ty is None else ty * wy)
    return vjp_graph, jvp_graph


SYMBOLIC = {
    #  name:     (vjp_graph,        jvp_graph)
    "add":       (_add_vjp_graph,   _add_jvp_graph),
    "sub":       (_sub_vjp_graph,   _sub_jvp_graph),
    "neg":       (_neg_vjp_graph,   _neg_jvp_graph),
    "mul":       (_mul_vjp_graph,   _mul_jvp_graph),
    "div":       (_div_vjp_graph,   _div_jvp_graph),
    "pow":       (_pow_vjp_graph,   _pow_jvp_graph),
    "maximum":   _route_graphs(larger=True),
    "minimum":   _route_graphs(larger=False),
}

OPERATORS = with_symbolic(OPERATORS, SYMBOLIC)

register_operators = table_hookimpl(OPERATORS)
