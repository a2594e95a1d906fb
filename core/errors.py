"""Typed errors of chainrule, in one place.

Every error carries a machine-readable ``reason`` (a stable upper-case code the
server forwards to clients as ``google.rpc.ErrorInfo``) and, where it applies,
the node, operator and field at fault, so a message never leaves the reader
guessing where to look.

Clients in other languages read these reasons from the wire contract:
``docs/errors.md`` lists every reason with its gRPC status code (see
``chainrule.wire.status.code_for``), its meaning and the ErrorInfo metadata
keys it carries, and the header of ``proto/chainrule/v1/chainrule.proto``
lists them one a line. A new reason (a class's ``reason`` or a ``reason=``
passed anywhere) must be added to both; ``tests/test_contract.py`` fails
until it is.
"""
from __future__ import annotations

from typing import Any

__all__ = [
    "ArityError", "BadAttributeError", "BadTensorError", "CancelledError", "ChainruleError", "CycleError",
    "DTypeError", "DeadlineError", "DuplicateNodeError", "DuplicateOperatorError", "GraphError",
    "InvalidOperatorError", "LimitExceeded", "MissingInputError", "MissingRuleError", "OpError", "OptionError", "OperatorFailure",
    "OutputError",
    "PluginError", "SeedError", "ShapeError", "SharedMemoryFull", "SharedMemoryUnavailable", "UnexpectedInputError",
    "UnknownGraphError", "UnknownNodeError", "UnknownOperatorError", "VersionMismatchError", "where",
]


class ChainruleError(Exception):
    """Base class: a message plus the reason code and what it concerns.

    ``reason`` defaults to the class's; ``reason=`` overrides it for one error (for example
    ``GraphError(..., reason="NONFINITE_LOSS")``). ERROR, the base class's own, is answered
    INTERNAL; the server always raises a subclass.
    """

    reason: str = "ERROR"

    def __init__(
        self,
        message: str,
        *,
        node: str | None = None,
        op: str | None = None,
        field: str | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.node = node
        self.op = op
        self.field = field
        if reason is not None:
            self.reason = reason


def where(node: str | None, op: str | None) -> str:
    """The standard prefix ``node 'h2' (matmul): `` used in every message."""
    if node is None:
        return f"operator '{op}': " if op else ""
    return f"node '{node}' ({op}): " if op else f"node '{node}': "


# --- raised by operator rules ------------------------------------------------

class OpError(ChainruleError):
    """Raised by an operator's infer, forward or vjp rule that refuses its inputs or
    attributes: the caller's mistake (INVALID_ARGUMENT), not the plugin's. The rule
    does not know the node; the compiler or engine adds it.

    Say what kind of refusal it is with ``reason=`` where one fits, so clients can
    act on it: ``SHAPE_MISMATCH``, ``DTYPE_MISMATCH``, ``BAD_ATTRIBUTE`` (with
    ``field="attrs.<name>"``) or ``OUT_OF_RANGE``. Without one, the reason is
    ``OPERATOR_REFUSED``: the operator refused this node, and the message says why.
    """

    reason = "OPERATOR_REFUSED"


# --- invalid graphs and requests (INVALID_ARGUMENT) ---------------------------

class GraphError(ChainruleError):
    """The graph or the request is invalid."""

    reason = "INVALID_GRAPH"


class UnknownOperatorError(GraphError):
    reason = "UNKNOWN_OPERATOR"


class UnknownNodeError(GraphError):
    reason = "UNKNOWN_NODE"


class DuplicateNodeError(GraphError):
    reason = "DUPLICATE_NODE"


class CycleError(GraphError):
    reason = "CYCLE"


class ArityError(GraphError):
    reason = "BAD_ARITY"


class BadAttributeError(GraphError):
    reason = "BAD_ATTRIBUTE"


class ShapeError(GraphError):
    reason = "SHAPE_MISMATCH"


class DTypeError(GraphError):
    reason = "DTYPE_MISMATCH"


class MissingInputError(GraphError):
    reason = "MISSING_INPUT"


class UnexpectedInputError(GraphError):
    reason = "UNEXPECTED_INPUT"


class BadTensorError(GraphError):
    reason = "BAD_TENSOR"


class OutputError(GraphError):
    reason = "BAD_OUTPUT"


class SeedError(GraphError):
    reason = "SEED_REQUIRED"


class OptionError(GraphError):
    """A request's option is invalid: a field other than the graph and its tensors (Optimize's steps
    or target_loss, a Selection's mode and names, unreached, response_encoding, wrt...); ``field``
    names it."""

    reason = "BAD_OPTION"


class MissingRuleError(GraphError):
    """A derivation (chainrule.core.symbolic: Derive, a graph's grad or jvp node) reached an
    operator without the symbolic rule it needs (``rule``: "vjp_graph" or "jvp_graph")."""

    reason = "MISSING_RULE"

    def __init__(self, message: str, *, rule: str = "", **where_: Any) -> None:
        super().__init__(message, **where_)
        self.rule = rule


# --- limits (RESOURCE_EXHAUSTED) -----------------------------------------------

class LimitExceeded(ChainruleError):
    """A configured limit would be exceeded; says which, what was asked and what is allowed."""

    reason = "LIMIT_EXCEEDED"

    def __init__(self, message: str, *, limit: str, requested: int, allowed: int, retry_after: float | None = None,
                 **where_: Any) -> None:
        super().__init__(message, **where_)
        self.limit = limit
        self.requested = requested
        self.allowed = allowed
        #: Seconds after which the same call may succeed, for a refusal that only says "not now" (the
        #: server busy: max_concurrent, or its memory held by other calls); None when retrying is futile.
        self.retry_after = retry_after


# --- stopping work ----------------------------------------------------------------

class DeadlineError(ChainruleError):
    """Work stopped: the caller's deadline or one of the server's time limits passed (the message says which)."""

    reason = "DEADLINE_EXCEEDED"


class CancelledError(ChainruleError):
    """Work stopped: the caller cancelled the call."""

    reason = "CANCELLED"


class ShuttingDown(ChainruleError):
    """The server is shutting down: a stream ended after the answers it had sent (UNAVAILABLE);
    send the rest again, to this server's replacement or another replica."""

    reason = "SHUTTING_DOWN"


# --- the service's own refusals ------------------------------------------------------

class UnknownGraphError(ChainruleError):
    """An Evaluate named a graph id this server has not registered (NOT_FOUND)."""

    reason = "UNKNOWN_GRAPH"


class SharedMemoryUnavailable(ChainruleError):
    """A tensor came in shared memory, but this server does not accept it (FAILED_PRECONDITION)."""

    reason = "SHARED_MEMORY_DISABLED"


class SharedMemoryFull(ChainruleError):
    """The directory's filesystem has no room left for a call's tensors (RESOURCE_EXHAUSTED)."""

    reason = "SHARED_MEMORY_FULL"


# --- plugin faults ---------------------------------------------------------------

class OperatorFailure(ChainruleError):
    """An operator's rule raised, or returned something that breaks its contract.

    This is the plugin's fault, not the caller's: the server answers INTERNAL.
    """

    reason = "OPERATOR_FAILED"

    def __init__(self, message: str, *, plugin: str | None = None, **where_: Any) -> None:
        super().__init__(message, **where_)
        self.plugin = plugin


class PluginError(ChainruleError):
    """A plugin could not be loaded or provides an invalid operator."""

    reason = "PLUGIN_ERROR"

    def __init__(self, message: str, *, plugin: str | None = None, **where_: Any) -> None:
        super().__init__(message, **where_)
        self.plugin = plugin


class InvalidOperatorError(PluginError):
    reason = "INVALID_OPERATOR"


class DuplicateOperatorError(PluginError):
    reason = "DUPLICATE_OPERATOR"


class VersionMismatchError(ChainruleError):
    """A graph pins an operator or plugin version the server does not have."""

    reason = "VERSION_MISMATCH"
