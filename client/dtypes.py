"""Rough dtype tracking for the graph builder.

The server is the authority on dtypes; the builder only needs a good guess so
that a Python literal in ``x * 2`` becomes a constant of ``x``'s float dtype
(float32 stays float32) and so that inputs can be converted before sending.
``None`` means "not known" and is treated as the default, float64.

Every built-in operator has one entry in :data:`OPERATORS` (its arity and
dtype rule); a test pins the table to the server's built-in operators.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

DEFAULT = "float64"
SUPPORTED = ("float64", "float32", "int64", "int32", "bool")


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


def result_dtype(op: str, dtypes: Sequence[str | None], attrs: Mapping[str, Any] | None = None) -> str | None:
    """Best guess of an operator's result dtype from its inputs' (None: unknown).

    A built-in operator follows its entry in :data:`OPERATORS`; another (a
    plugin's) is taken for an elementwise float function: the first float input's dtype.
    """
    entry = OPERATORS.get(op) or DERIVATIVE_OPERATORS.get(op)
    if entry is None:
        return next((d for d in dtypes if is_float(d)), None)
    return entry.dtype(*dtypes, **(attrs or {}))


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


# --- dtype rules: each mirrors an operator's ``infer`` rule on the server, on dtype names -------

def promoted(*dtypes: str | None, **_: Any) -> str | None:
    """numpy's promotion of all inputs (int32 + float32 is float64, bool + int32 is int32)."""
    return promote(dtypes)


def float_of_promoted(*dtypes: str | None, **_: Any) -> str | None:
    """The promotion of all inputs if it is a float, else float64 (numpy's true division)."""
    dtype = promote(dtypes)
    return dtype if dtype is None or is_float(dtype) else DEFAULT


def same_as_first(*dtypes: str | None, **_: Any) -> str | None:
    """The first input's dtype (values moved or picked, not computed)."""
    return dtypes[0] if dtypes else None


def float_of_first(*dtypes: str | None, **_: Any) -> str | None:
    """A float function: a float first input keeps its dtype, int and bool become float64."""
    first = dtypes[0] if dtypes else None
    return first if first is None or is_float(first) else DEFAULT


def summed(*dtypes: str | None, **_: Any) -> str | None:
    """numpy's sum: floats keep their dtype, ints and bools sum to int64."""
    first = dtypes[0] if dtypes else None
    return first if first is None or is_float(first) else "int64"


def promoted_after_first(*dtypes: str | None, **_: Any) -> str | None:
    """The promotion of every input but the first (where: the bool condition picks, x and y give the values)."""
    return promote(dtypes[1:])


def of_value(*_: str | None, value: Any = None, **__: Any) -> str | None:
    """The dtype of the ``value`` attribute (const); TypeError for an unsupported one."""
    return normalize(value.dtype) if isinstance(value, np.ndarray) else None


def int64_result(*dtypes: str | None, **_: Any) -> str | None:
    """int64 whatever the input (argmax, argmin: indices); unknown while the input is."""
    return None if None in dtypes else "int64"


def of_dtype_attr(*dtypes: str | None, dtype: Any = "float64", **_: Any) -> str | None:
    """The ``dtype`` attribute (one_hot; float64 when not given); unknown while an input is, or for a
    name the server will refuse."""
    return None if None in dtypes or dtype not in SUPPORTED else dtype


def bool_result(*dtypes: str | None, **_: Any) -> str | None:
    """bool whatever the inputs (comparisons and logic: masks); unknown while an input is."""
    return None if None in dtypes else "bool"


def same_as_last(*dtypes: str | None, **_: Any) -> str | None:
    """The last input's dtype (one_hot_like: the dtype of like)."""
    return dtypes[-1] if dtypes else None


def float_of_last(*dtypes: str | None, **_: Any) -> str | None:
    """The last input's dtype if it is a float, else float64 (max_pool_grad, avg_pool_grad: x's)."""
    last = dtypes[-1] if dtypes else None
    return last if last is None or is_float(last) else DEFAULT


def like_if_float(*dtypes: str | None, **_: Any) -> str | None:
    """The second input's dtype when it is a float, else the first's (sum_to, broadcast_like: a gradient
    takes its input's float dtype)."""
    if len(dtypes) < 2 or None in dtypes[:2]:
        return None
    return dtypes[1] if is_float(dtypes[1]) else dtypes[0]


def of_values(*_: str | None, **__: Any) -> str | None:
    """None: an operator with several values (scan); ops.scan gives each value its own dtype."""
    return None


#: ``arity`` of an operator taking one or more inputs (as ``chainrule.core.VARIADIC``).
VARIADIC = -1


class OpRule(NamedTuple):
    """A built-in operator as the client sees it: how many inputs, and the dtype of its result."""

    arity: int
    #: ``dtype(*input_dtypes, **attrs) -> dtype name``, None when not known.
    dtype: Callable[..., str | None]


#: Every built-in operator: its arity and dtype rule, the one list the builder's guesses come from.
#: tests/test_client_operator_table.py holds it to each operator's ``infer`` on the server, for
#: every supported dtype, and fails for a built-in operator that is missing here.
OPERATORS: Mapping[str, OpRule] = MappingProxyType({
    # arithmetic (builtin.arith): numpy broadcasting and promotion
    "add":           OpRule(2, promoted),
    "sub":           OpRule(2, promoted),
    "mul":           OpRule(2, promoted),
    "div":           OpRule(2, float_of_promoted),
    "neg":           OpRule(1, same_as_first),
    "pow":           OpRule(2, promoted),
    "maximum":       OpRule(2, promoted),
    "minimum":       OpRule(2, promoted),
    # elementwise math (builtin.elementwise)
    "exp":           OpRule(1, float_of_first),
    "log":           OpRule(1, float_of_first),
    "sqrt":          OpRule(1, float_of_first),
    "softplus":      OpRule(1, float_of_first),
    "abs":           OpRule(1, same_as_first),
    "relu":          OpRule(1, same_as_first),
    "leaky_relu":    OpRule(1, float_of_first),
    "clip":          OpRule(1, float_of_first),
    "sin":           OpRule(1, float_of_first),
    "cos":           OpRule(1, float_of_first),
    "tanh":          OpRule(1, float_of_first),
    "sigmoid":       OpRule(1, float_of_first),
    "erf":           OpRule(1, float_of_first),
    "gelu":          OpRule(1, float_of_first),
    "log1p":         OpRule(1, float_of_first),
    "expm1":         OpRule(1, float_of_first),
    "sign":          OpRule(1, float_of_first),    # a float: int and bool inputs give float64
    # comparisons and logic (builtin.compare): bool masks; logic refuses inputs that are not bool
    "less":          OpRule(2, bool_result),
    "less_equal":    OpRule(2, bool_result),
    "greater":       OpRule(2, bool_result),
    "greater_equal": OpRule(2, bool_result),
    "equal":         OpRule(2, bool_result),
    "not_equal":     OpRule(2, bool_result),
    "logical_and":   OpRule(2, bool_result),
    "logical_or":    OpRule(2, bool_result),
    "logical_not":   OpRule(1, bool_result),
    # linear algebra (builtin.linalg)
    "matmul":        OpRule(2, promoted),
    "transpose":     OpRule(1, same_as_first),
    "einsum":        OpRule(VARIADIC, promoted),       # as np.einsum (all-bool inputs are refused)
    # reductions (builtin.reduce)
    "sum":           OpRule(1, summed),
    "mean":          OpRule(1, float_of_first),
    "max":           OpRule(1, same_as_first),
    "logsumexp":     OpRule(1, float_of_first),
    "min":           OpRule(1, same_as_first),
    "prod":          OpRule(1, summed),            # as sum: ints and bools give int64
    "var":           OpRule(1, float_of_first),
    "std":           OpRule(1, float_of_first),
    "argmax":        OpRule(1, int64_result),
    "argmin":        OpRule(1, int64_result),
    # indexing (builtin.index)
    "gather":        OpRule(2, same_as_first),     # x's dtype; indices are int32/int64
    "one_hot":       OpRule(1, of_dtype_attr),     # the dtype attribute, float64 by default
    # shape (builtin.shape)
    "reshape":       OpRule(1, same_as_first),
    "squeeze":       OpRule(1, same_as_first),
    "expand_dims":   OpRule(1, same_as_first),
    "broadcast_to":  OpRule(1, same_as_first),
    "concat":        OpRule(VARIADIC, promoted),
    "stack":         OpRule(VARIADIC, promoted),
    "slice":         OpRule(1, same_as_first),
    "pad":           OpRule(1, same_as_first),
    "tile":          OpRule(1, same_as_first),
    "cumsum":        OpRule(1, same_as_first),     # ONNX CumSum: int32 stays int32 (bool is refused)
    "flip":          OpRule(1, same_as_first),
    # neural networks (builtin.nn)
    "softmax":       OpRule(1, float_of_first),
    "log_softmax":   OpRule(1, float_of_first),
    "cross_entropy": OpRule(2, float_of_first),       # the logits' float dtype; labels are ints
    "mse":           OpRule(2, float_of_promoted),
    "layer_norm":    OpRule(3, float_of_promoted),     # x, scale, bias promoted; ints give float64
    # convolution and pooling (builtin.conv): ints give float64
    "conv":          OpRule(2, float_of_promoted),
    "max_pool":      OpRule(1, float_of_first),
    "avg_pool":      OpRule(1, float_of_first),
    # selection and literals (builtin.select)
    "where":         OpRule(3, promoted_after_first),  # cond is bool; x and y give the dtype
    "stop_gradient": OpRule(1, same_as_first),
    "const":         OpRule(0, of_value),
    # derivative helpers of builtin.shape, builtin.index and builtin.conv (docs/derivatives.md)
    "reshape_like":  OpRule(2, same_as_first),
    "unslice":       OpRule(2, same_as_first),     # g's dtype, like's shape
    "untile":        OpRule(2, same_as_first),
    "concat_part":   OpRule(VARIADIC, same_as_first),
    "scatter_add":   OpRule(3, same_as_first),     # x's dtype (updates cast to it)
    "one_hot_like":  OpRule(2, same_as_last),
    "conv_grad_x":   OpRule(3, float_of_promoted),
    "conv_grad_w":   OpRule(3, float_of_promoted),
    "max_pool_grad": OpRule(2, float_of_last),
    "max_pool_pick": OpRule(2, float_of_promoted),
    "avg_pool_grad": OpRule(2, float_of_last),
    # control flow (builtin.control): several values, typed by ops.scan from its carries and body
    "scan":          OpRule(VARIADIC, of_values),
    # helpers of derivatives built as graphs (builtin.derivative, docs/derivatives.md)
    "sum_to":        OpRule(2, like_if_float),     # g summed to like's shape, in like's float dtype
    "broadcast_like": OpRule(2, like_if_float),
    "unreduce":      OpRule(2, same_as_first),
    "zeros_like":    OpRule(1, same_as_first),
    "ones_like":     OpRule(1, same_as_first),
    "scalar_like":   OpRule(1, float_of_first),
    "group_size":    OpRule(1, float_of_first),
    "step":          OpRule(2, float_of_promoted),
    "extremum_weights": OpRule(2, float_of_promoted),
    "prod_except":   OpRule(1, same_as_first),
    "xmul":          OpRule(2, float_of_promoted),
})

#: The compile-time pseudo-operators ``grad`` and ``jvp`` (docs/derivatives.md): not operators of the
#: server (ListOperators does not list them; the server expands them into the nodes of the derivative
#: when it compiles a graph), so not in :data:`OPERATORS`. ``GraphBuilder.grad`` types each gradient as
#: its wrt value; a jvp's tangent has the differentiated output's dtype.
DERIVATIVE_OPERATORS: Mapping[str, OpRule] = MappingProxyType({
    "grad":          OpRule(VARIADIC, of_values),
    "jvp":           OpRule(VARIADIC, same_as_first),
})
