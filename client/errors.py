"""Typed exceptions for failed calls, read from the google.rpc.Status details.

Both clients raise the same classes: ``Client`` builds them from a
``grpc.RpcError`` (``grpc_status.rpc_status.from_call``), ``LocalClient``
from the ``google.rpc.Status`` the server would have sent. Each carries the
status code, the message, the machine-readable ``reason`` (ErrorInfo) and the
node, operator and field at fault.
"""
from __future__ import annotations

from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

from chainrule.wire.status import REQUEST_ID_KEY


class ChainruleRpcError(Exception):
    """A call failed. ``code`` is a grpc.StatusCode; ``reason`` is ErrorInfo's
    reason (``UNKNOWN_OPERATOR``, ``SEED_REQUIRED``...) or "" when absent."""

    def __init__(self, code: grpc.StatusCode, message: str, *, reason: str = "",
                 metadata: dict[str, str] | None = None,
                 violations: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        #: ErrorInfo metadata: node, op, field, request_id, plugin, limit, requested, allowed...
        self.metadata: dict[str, str] = dict(metadata or {})
        #: BadRequest field violations as (field, description) pairs.
        self.violations: list[tuple[str, str]] = list(violations or [])

    @property
    def node(self) -> str | None:
        return self.metadata.get("node")

    @property
    def op(self) -> str | None:
        return self.metadata.get("op")

    @property
    def field(self) -> str | None:
        """The request field at fault (ErrorInfo, else the first BadRequest violation)."""
        return self.metadata.get("field") or (self.violations[0][0] if self.violations and self.violations[0][0] else None)

    @property
    def request_id(self) -> str | None:
        return self.metadata.get("request_id")

    def __str__(self) -> str:
        suffix = f" [{self.reason}]" if self.reason else ""
        return f"{self.code.name}: {self.message}{suffix}"

    def __reduce__(self) -> tuple[Any, ...]:  # picklable despite keyword-only arguments
        return (_rebuild, (type(self), self.code, self.message, self.reason, self.metadata, self.violations))


def _rebuild(cls: type, code: grpc.StatusCode, message: str, reason: str, metadata: dict[str, str],
             violations: list[tuple[str, str]]) -> ChainruleRpcError:
    return cls(code, message, reason=reason, metadata=metadata, violations=violations)


class InvalidArgument(ChainruleRpcError):
    """The graph or request is invalid (INVALID_ARGUMENT)."""


class NotFound(ChainruleRpcError):
    """An unknown graph id (NOT_FOUND)."""


class ResourceExhausted(ChainruleRpcError):
    """A limit would be exceeded (RESOURCE_EXHAUSTED); ``metadata`` has limit, requested, allowed."""


class FailedPrecondition(ChainruleRpcError):
    """The server cannot satisfy the graph's requirements, e.g. plugin versions (FAILED_PRECONDITION)."""


class DeadlineExceeded(ChainruleRpcError):
    """The call's deadline passed (DEADLINE_EXCEEDED)."""


class Cancelled(ChainruleRpcError):
    """The call was cancelled (CANCELLED)."""


class Unavailable(ChainruleRpcError):
    """The server could not be reached (UNAVAILABLE)."""


class Unauthenticated(ChainruleRpcError):
    """Credentials were missing or refused (UNAUTHENTICATED)."""


class Internal(ChainruleRpcError):
    """The server or a plugin failed (INTERNAL); ``request_id`` finds the server log entry."""


_BY_CODE: dict[grpc.StatusCode, type[ChainruleRpcError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.INTERNAL: Internal,
}
_CODE_OF_NUMBER: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def error_class(code: grpc.StatusCode) -> type[ChainruleRpcError]:
    return _BY_CODE.get(code, ChainruleRpcError)


def from_status(status: status_pb2.Status) -> ChainruleRpcError:
    """The typed exception for a google.rpc.Status (as LocalClient and streams receive them)."""
    code = _CODE_OF_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN)
    reason, metadata, violations = "", {}, []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend((v.field, v.description) for v in bad.field_violations)
    return error_class(code)(code, status.message, reason=reason, metadata=metadata, violations=violations)


def from_rpc_error(error: grpc.RpcError) -> ChainruleRpcError:
    """The typed exception for a failed gRPC call, with its rich details when present."""
    # Imported on the first failed call, not with the client: grpc_status (and the grpc.experimental
    # it pulls in) is 1.5 ms of `import chainrule.client`.
    from grpc_status import rpc_status

    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except ValueError:  # details disagree with the call's code or message: trust the call
        status = None
    if status is not None:
        return from_status(status)
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN  # type: ignore[attr-defined]
    message = error.details() if hasattr(error, "details") else str(error)  # type: ignore[attr-defined]
    metadata = {}
    try:  # the server sends the request id (trailers of unary calls, headers of streams)
        sent = [*(error.trailing_metadata() or ()), *(error.initial_metadata() or ())]  # type: ignore[attr-defined]
        request_id = dict(sent).get(REQUEST_ID_KEY)
    except Exception:
        request_id = None
    if request_id:
        metadata["request_id"] = request_id
    return error_class(code)(code, message or code.name, metadata=metadata)
