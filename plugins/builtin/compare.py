"""Comparisons and logic: less, less_equal, greater, greater_equal, equal, not_equal, logical_and, logical_or, logical_not.

One table, one row per operator. Every result is a bool mask, the condition of
``where`` (``where(x > 0, x, 0)`` is relu), so none of them has a gradient: a
step function's derivative is 0 wherever it is defined, and a bool value carries
no gradient anyway. Their vjp rules return None for every input (the engine
never asks them: a bool node takes no gradient), and the gradient checker, which
differentiates only float outputs, passes them after comparing infer with forward.

The comparisons follow numpy: broadcasting, and the operands promoted to their
common dtype before comparing (int32 against float32 compares in float64). The
logical operators take bool inputs only: numpy would give ``logical_and(2.5, 0)``
a meaning ("nonzero"), but a mask that is really a float is almost always a
mistake, so it is refused with DTYPE_MISMATCH and a hint to compare first.
Their symbolic rules (``vjp_graph``, ``jvp_graph``; docs/derivatives.md) give
None too: no derivative in any order or mode.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from chainrule.core import OpDef, OpError, TensorSpec, broadcast_shapes
from chainrule.core.dtypes import BOOL, BOOL_DTYPES
from chainrule.core.symbolic import no_jvp_graph, no_vjp_graph, with_symbolic
from chainrule.plugins.authoring import table_hookimpl


# --- infer rules -----------------------------------------------------------------------------

def _compared(x: TensorSpec, y: TensorSpec) -> TensorSpec:
    """numpy broadcasting of the operands (any supported dtypes); a bool mask of that shape."""
    return TensorSpec(broadcast_shapes(x.shape, y.shape), BOOL)


def _bool_inputs(name: str) -> Callable[..., TensorSpec]:
    """The infer rule of logical ``name``: bool inputs only, broadcast together; a bool mask."""

    def infer(*specs: TensorSpec) -> TensorSpec:
        for i, spec in enumerate(specs):
            if spec.dtype != np.bool_:
                which = "its input" if len(specs) == 1 else f"input {i}"
                raise OpError(f"{name} needs bool inputs, but {which} is {spec.dtype.name}; "
                              f"make a mask with a comparison first (greater(x, 0), not_equal(x, 0))",
                              reason="DTYPE_MISMATCH")
        return TensorSpec(broadcast_shapes(*(s.shape for s in specs)), BOOL)

    return infer


# --- vjp rules: no gradient for any input ------------------------------------------------------

def _no_gradient_2(g, out, x, y):
    return None, None


def _no_gradient_1(g, out, x):
    return (None,)


# --- gradient-check samples: broadcasting pairs, ties included ---------------------------------

_PAIRS = [((2, 3), (2, 3)), ((2, 3), (3,)), ((4, 1), (1, 3)), ((), (2, 2)), ((3,), ()), ((), ())]


def _pair_shapes(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return _PAIRS[rng.integers(len(_PAIRS))]


def _numbers(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Floats on a coarse grid, so that equal operands (ties) occur."""
    return np.asarray(rng.integers(-2, 3, shape) * 0.5)


def _compare_sample(rng):
    a, b = _pair_shapes(rng)
    return [_numbers(rng, a), _numbers(rng, b)], {}


def _mask(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return np.asarray(rng.random(shape) < 0.5)


def _logical_pair_sample(rng):
    a, b = _pair_shapes(rng)
    return [_mask(rng, a), _mask(rng, b)], {}


def _logical_sample(rng):
    return [_mask(rng, [(), (5,), (2, 3)][rng.integers(3)])], {}


# --- the table -------------------------------------------------------------------------------

def _comparison(name: str, ufunc: Any, doc: str) -> OpDef:
    return OpDef(name, 2, ufunc, _no_gradient_2, _compared, doc=doc, sample=_compare_sample, input_names=("x", "y"))


def _logical(name: str, arity: int, ufunc: Any, doc: str) -> OpDef:
    vjp = _no_gradient_2 if arity == 2 else _no_gradient_1
    sample = _logical_pair_sample if arity == 2 else _logical_sample
    names = ("x", "y")[:arity]
    return OpDef(name, arity, ufunc, vjp, _bool_inputs(name), doc=doc, sample=sample,
                 input_names=names, input_dtypes=dict.fromkeys(names, BOOL_DTYPES))


OPERATORS: list[OpDef] = [
    # comparisons: numpy broadcasting and promotion of the operands, a bool mask, no gradient
    _comparison("less", np.less, "x < y elementwise with numpy broadcasting; bool result, no gradient."),
    _comparison("less_equal", np.less_equal, "x <= y elementwise with numpy broadcasting; bool result, no gradient."),
    _comparison("greater", np.greater, "x > y elementwise with numpy broadcasting; bool result, no gradient."),
    _comparison("greater_equal", np.greater_equal,
                "x >= y elementwise with numpy broadcasting; bool result, no gradient."),
    _comparison("equal", np.equal, "x == y elementwise with numpy broadcasting; bool result, no gradient."),
    _comparison("not_equal", np.not_equal, "x != y elementwise with numpy broadcasting; bool result, no gradient."),

    # logic on bool masks
    _logical("logical_and", 2, np.logical_and, "x and y elementwise on bool masks, with numpy broadcasting."),
    _logical("logical_or", 2, np.logical_or, "x or y elementwise on bool masks, with numpy broadcasting."),
    _logical("logical_not", 1, np.logical_not, "not x elementwise on a bool mask."),
]

#: No derivative in any order or mode: every symbolic rule gives None.
SYMBOLIC = {op.name: (no_vjp_graph, no_jvp_graph) for op in OPERATORS}

OPERATORS = with_symbolic(OPERATORS, SYMBOLIC)

register_operators = table_hookimpl(OPERATORS)
