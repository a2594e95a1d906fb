"""Rough dtype tracking for the graph builder.

The server is the authority on dtypes; the builder only needs a good guess so
that a Python literal in ``x * 2`` becomes a constant of ``x``'s float dtype
(float32 stays float32) and so that inputs can be converted before sending.
``None`` means "not known" and is treated as the default, float64.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT = "float64"
SUPPORTED = ("float64", "float32", "int64", "int32", "bool")

#: Operators whose result has the dtype of numpy's promotion of their inputs.
PROMOTING = frozenset({
    "add", "sub", "mul", "div", "pow", "maximum", "minimum", "matmul", "concat", "stack",
})
#: Operators whose result keeps the dtype of their first input.
SAME_AS_FIRST = frozenset({
    "neg", "abs", "relu", "leaky_relu", "clip", "transpose", "reshape", "broadcast_to", "squeeze",
    "expand_dims", "slice", "sum", "max", "stop_gradient",
})
#: Float-valued functions: float inputs keep their dtype, integers become float64.
FLOAT_OF_FIRST = frozenset({
    "exp", "log", "sqrt", "sin", "cos", "tanh", "sigmoid", "softplus", "softmax", "log_softmax",
    "logsumexp", "mean", "cross_entropy", "mse",
})


def normalize(dtype: object) -> str:
    """The canonical name of a supported dtype (``np.float32`` -> ``"float32"``)."""
    name = np.dtype(dtype).name  # type: ignore[call-overload]
    if name not in SUPPORTED:
        raise TypeError(f"unsupported dtype {dtype!r}; expected one of {', '.join(SUPPORTED)}")
    return name


def is_float(dtype: str | None) -> bool:
    return dtype in ("float64", "float32")


def promote(dtypes: Sequence[str | None]) -> str | None:
    known = [d for d in dtypes if d is not None]
    if len(known) != len(dtypes) or not known:
        return None
    return normalize(np.result_type(*known))


def result_dtype(op: str, dtypes: Sequence[str | None]) -> str | None:
    """Best guess of an operator's result dtype from its inputs' (None: unknown)."""
    if op in PROMOTING:
        return promote(dtypes)
    if op == "where":
        return promote(dtypes[1:])
    first = dtypes[0] if dtypes else None
    if op in SAME_AS_FIRST:
        return first
    if op in FLOAT_OF_FIRST:
        return first if is_float(first) else (DEFAULT if first is not None else None)
    # A plugin operator: most are elementwise float functions.
    return next((d for d in dtypes if is_float(d)), None)


def literal_dtype(value: object, like: str | None) -> str:
    """The dtype of a Python literal used next to a value of dtype ``like``.

    Python numbers (and lists of them) are "weak": a float takes the float
    dtype of the other operand, an int takes its integer or float dtype.
    Without a known float partner the default is float64.
    """
    array = np.asarray(value)
    if array.dtype.kind == "b":
        return "bool"
    if is_float(like):
        return like  # type: ignore[return-value]
    if array.dtype.kind in "iu" and like in ("int64", "int32"):
        return like
    return DEFAULT
