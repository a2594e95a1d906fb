"""One function per built-in operator, for use on builder values.

``ops.concat([a, b], axis=0)``, ``ops.where(mask, x, y)``, ``ops.mse(pred, target)``.
Arguments may mix Vars with Python numbers and numpy arrays (they become
``const`` nodes); at least one argument must be a Var, which names the graph.
Every function takes ``name=`` for a chosen node name. Attributes left as
None are not sent, so the operator's default applies.
"""
from __future__ import annotations

from typing import Any, Sequence

from .builder import GraphBuilder, Var
from .dtypes import OPERATORS as _OPERATORS


def _builder(*args: Any) -> GraphBuilder:
    for a in args:
        if isinstance(a, Var):
            return a.builder
    raise TypeError("at least one argument must be a Var from a GraphBuilder")


def op(op: str, *inputs: Any, name: str | None = None, **attrs: Any) -> Var:
    """Any operator by name, built-in or from a plugin: ``ops.op("acme.swish", x, beta=2.0)``."""
    return _builder(*inputs).op(op, *inputs, name=name, **attrs)


# --- arithmetic, with numpy broadcasting ---------------------------------------------------

def add(a: Any, b: Any, *, name: str | None = None) -> Var:
    return op("add", a, b, name=name)


def sub(a: Any, b: Any, *, name: str | None = None) -> Var:
    return op("sub", a, b, name=name)


def mul(a: Any, b: Any, *, name: str | None = None) -> Var:
    return op("mul", a, b, name=name)


def div(a: Any, b: Any, *, name: str | None = None) -> Var:
    return op("div", a, b, name=name)


def neg(x: Var, *, name: str | None = None) -> Var:
    return op("neg", x, name=name)


def pow(a: Any, b: Any, *, name: str | None = None) -> Var:  # noqa: A001 (mirrors the operator name)
    return op("pow", a, b, name=name)


def maximum(a: Any, b: Any, *, name: str | None = None) -> Var:
    return op("maximum", a, b, name=name)


def minimum(a: Any, b: Any, *, name: str | None = None) -> Var:
    return op("minimum", a, b, name=name)


# --- elementwise math -------------------------------------------------------------------------

def exp(x: Var, *, name: str | None = None) -> Var:
    return op("exp", x, name=name)


def log(x: Var, *, name: str | None = None) -> Var:
    return op("log", x, name=name)


def sqrt(x: Var, *, name: str | None = None) -> Var:
    return op("sqrt", x, name=name)


def abs(x: Var, *, name: str | None = None) -> Var:  # noqa: A001
    return op("abs", x, name=name)


def sin(x: Var, *, name: str | None = None) -> Var:
    return op("sin", x, name=name)


def cos(x: Var, *, name: str | None = None) -> Var:
    return op("cos", x, name=name)


def tanh(x: Var, *, name: str | None = None) -> Var:
    return op("tanh", x, name=name)


def sigmoid(x: Var, *, name: str | None = None) -> Var:
    return op("sigmoid", x, name=name)


def relu(x: Var, *, name: str | None = None) -> Var:
    return op("relu", x, name=name)


def leaky_relu(x: Var, alpha: float | None = None, *, name: str | None = None) -> Var:
    return op("leaky_relu", x, name=name, alpha=alpha)


def softplus(x: Var, *, name: str | None = None) -> Var:
    return op("softplus", x, name=name)


def clip(x: Var, min: float | None = None, max: float | None = None, *, name: str | None = None) -> Var:  # noqa: A002
    return op("clip", x, name=name, min=min, max=max)


# --- linear algebra ------------------------------------------------------------------------------

def matmul(a: Any, b: Any, *, name: str | None = None) -> Var:
    return op("matmul", a, b, name=name)


def transpose(x: Var, axes: Sequence[int] | None = None, *, name: str | None = None) -> Var:
    return op("transpose", x, name=name, axes=None if axes is None else list(axes))


# --- reductions ----------------------------------------------------------------------------------

def sum(x: Var, axis: int | Sequence[int] | None = None, keepdims: bool = False, *,  # noqa: A001
        name: str | None = None) -> Var:
    return x.sum(axis, keepdims, name=name)


def mean(x: Var, axis: int | Sequence[int] | None = None, keepdims: bool = False, *, name: str | None = None) -> Var:
    return x.mean(axis, keepdims, name=name)


def max(x: Var, axis: int | Sequence[int] | None = None, keepdims: bool = False, *,  # noqa: A001
        name: str | None = None) -> Var:
    return x.max(axis, keepdims, name=name)


def logsumexp(x: Var, axis: int | Sequence[int] | None = None, keepdims: bool = False, *,
              name: str | None = None) -> Var:
    return x.logsumexp(axis, keepdims, name=name)


# --- shape ---------------------------------------------------------------------------------------

def reshape(x: Var, shape: Sequence[int], *, name: str | None = None) -> Var:
    return x.reshape(tuple(shape), name=name)


def broadcast_to(x: Var, shape: Sequence[int], *, name: str | None = None) -> Var:
    return x.broadcast_to(tuple(shape), name=name)


def concat(values: Sequence[Any], axis: int | None = None, *, name: str | None = None) -> Var:
    return op("concat", *values, name=name, axis=axis)


def stack(values: Sequence[Any], axis: int | None = None, *, name: str | None = None) -> Var:
    return op("stack", *values, name=name, axis=axis)


def slice(x: Var, starts: Sequence[int], ends: Sequence[int], axes: Sequence[int] | None = None,  # noqa: A001
          steps: Sequence[int] | None = None, *, name: str | None = None) -> Var:
    return x.slice(starts, ends, axes, steps, name=name)


def squeeze(x: Var, axis: int | Sequence[int] | None = None, *, name: str | None = None) -> Var:
    return x.squeeze(axis, name=name)


def expand_dims(x: Var, axis: int | Sequence[int], *, name: str | None = None) -> Var:
    return x.expand_dims(axis, name=name)


# --- neural-network losses -----------------------------------------------------------------------

def softmax(x: Var, axis: int | None = None, *, name: str | None = None) -> Var:
    return x.softmax(axis, name=name)


def log_softmax(x: Var, axis: int | None = None, *, name: str | None = None) -> Var:
    return x.log_softmax(axis, name=name)


def cross_entropy(logits: Any, labels: Any, *, name: str | None = None) -> Var:
    """Mean cross-entropy of ``logits`` against integer class ``labels``."""
    return op("cross_entropy", logits, labels, name=name)


def mse(pred: Any, target: Any, *, name: str | None = None) -> Var:
    return op("mse", pred, target, name=name)


# --- selection -----------------------------------------------------------------------------------

def where(cond: Any, x: Any, y: Any, *, name: str | None = None) -> Var:
    return op("where", cond, x, y, name=name)


def stop_gradient(x: Var, *, name: str | None = None) -> Var:
    return op("stop_gradient", x, name=name)


#: One function per built-in operator of the table in chainrule.client.dtypes (const is
#: ``GraphBuilder.const``), plus ``op``; tests/test_client_operator_table.py checks each makes its operator.
__all__ = ["op", *sorted(name for name in _OPERATORS if name != "const")]
