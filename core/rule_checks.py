"""What the engine checks of what an operator's rules return, and how it names a rule's fault.

A forward result must match the spec its infer rule promised; a vjp's gradient must fit its input
(summed back over broadcast axes). A mismatch, or an exception a rule raises, is the plugin's bug:
an OperatorFailure naming the node, the operator and the plugin. Shared by the engine's loops
(core/engine.py) and the straight-line programs it generates for small plans (core/program.py).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .broadcast import unbroadcast
from .compile import Plan, nested_error, node_error
from .errors import ChainruleError, LimitExceeded, OpError, OperatorFailure, where
from .tensor_spec import TensorSpec

def fit_value(plan: Plan, k: int, value: Any, spec: TensorSpec | None) -> np.ndarray:
    """Accept a forward result that is a Python scalar or list; check it against the spec."""
    op, name = plan.ops[k], plan.names[k]
    array = np.asarray(value)
    if spec is None:
        if array.dtype.kind not in "fiub":
            raise contract(op, name, f"forward returned dtype {array.dtype}")
        if array.size > plan.limits.max_tensor_elements:
            raise LimitExceeded(
                f"{where(name, op.name)}value has {array.size} elements; the limit per tensor is {plan.limits.max_tensor_elements}",
                limit="max_tensor_elements", requested=array.size, allowed=plan.limits.max_tensor_elements, node=name, op=op.name,
            )
        return array
    if array.shape != spec.shape or (array.dtype != spec.dtype and not np.can_cast(array.dtype, spec.dtype, "same_kind")):
        raise contract(op, name, f"forward returned {array.dtype.name}{list(array.shape)} but infer promised {spec}")
    return array.astype(spec.dtype, copy=False)


def fit_grad(plan: Plan, k: int, pos: int, grad: Any, spec: TensorSpec) -> np.ndarray:
    """Sum a broadcast-shaped gradient back to its input's shape and dtype, or fail naming the rule."""
    op, name = plan.ops[k], plan.names[k]
    array = np.asarray(grad)
    if array.dtype.kind not in "fiu":
        raise contract(op, name, f"vjp gave input {pos} a gradient of dtype {array.dtype}")
    try:
        array = unbroadcast(array, spec.shape)
    except ValueError as exc:
        raise contract(op, name, f"vjp gave input {pos} ({plan.names[plan.in_slots[k][pos]]}) a bad gradient: {exc}") from None
    return array.astype(spec.dtype, copy=False)


def contract(op: Any, node: str, what: str) -> OperatorFailure:
    return OperatorFailure(f"{where(node, op.name)}{what}", node=node, op=op.name, plugin=op.plugin)


def failure(op: Any, node: str, rule: str, exc: Exception) -> OperatorFailure:
    return OperatorFailure(
        f"{where(node, op.name)}{rule} rule raised {type(exc).__name__}: {exc}"
        + (f" (plugin '{op.plugin}')" if op.plugin else ""),
        node=node, op=op.name, plugin=op.plugin,
    )


def rule_error(plan: Plan, k: int, rule: str, exc: Exception) -> Exception:
    """What an exception from node k's ``rule`` ("forward" or "vjp") becomes, to be raised as it is:
    an operator's OpError the GraphError naming the node; an error of a graph run inside the
    operator (scan's body) the same error with the node named first; a vjp's contract failure
    itself; anything else the plugin's bug, an OperatorFailure caused by it."""
    node, op = plan.node_names[k], plan.ops[k]
    if isinstance(exc, OperatorFailure) and rule == "vjp":  # (contract(), raised inside the vjp's try)
        return exc
    if isinstance(exc, OpError):
        return _caused(node_error(exc, node, op), None)
    if isinstance(exc, ChainruleError):
        return _caused(nested_error(exc, node, op), None)
    return _caused(failure(op, node, rule, exc), exc)


def miscounted(plan: Plan, k: int, count: int) -> OperatorFailure:
    """The contract failure of node k's vjp that returned ``count`` gradients (one per input is due)."""
    return contract(plan.ops[k], plan.node_names[k], f"vjp returned {count} gradients for {len(plan.in_slots[k])} inputs")


def _caused(error: Exception, cause: Exception | None) -> Exception:
    """``error`` as ``raise error from cause`` leaves it, for a caller that raises it plainly."""
    error.__cause__ = cause
    error.__suppress_context__ = True
    return error
