"""Map chainrule errors to ``google.rpc.Status`` messages with rich details (no gRPC needed).

Every error becomes a ``google.rpc.Status`` whose message names the node,
operator or field, with ``ErrorInfo`` (a stable reason code plus the node,
operator and limit figures as metadata) and, for invalid requests,
``BadRequest`` field violations, so clients in any language can act on them.
"""
from __future__ import annotations

from datetime import timedelta

from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from chainrule.core.errors import (
    CancelledError, ChainruleError, DeadlineError, GraphError, LimitExceeded, OperatorFailure, SharedMemoryFull,
    SharedMemoryUnavailable, ShuttingDown, UnknownGraphError, VersionMismatchError,
)

DOMAIN = "chainrule.dev"
#: Metadata key of the request id a server gives every call (trailers of unary calls, headers of streams).
REQUEST_ID_KEY = "chainrule-request-id"


def code_for(exc: ChainruleError) -> int:
    """The status code (``google.rpc.Code``, the numbers gRPC uses) that ``exc`` is answered with."""
    if isinstance(exc, GraphError):
        return code_pb2.INVALID_ARGUMENT
    if isinstance(exc, (LimitExceeded, SharedMemoryFull)):
        return code_pb2.RESOURCE_EXHAUSTED
    if isinstance(exc, UnknownGraphError):
        return code_pb2.NOT_FOUND
    if isinstance(exc, (VersionMismatchError, SharedMemoryUnavailable)):
        return code_pb2.FAILED_PRECONDITION
    if isinstance(exc, DeadlineError):
        return code_pb2.DEADLINE_EXCEEDED
    if isinstance(exc, CancelledError):
        return code_pb2.CANCELLED
    if isinstance(exc, ShuttingDown):
        return code_pb2.UNAVAILABLE
    return code_pb2.INTERNAL


def code_name(code: int) -> str:
    """``INVALID_ARGUMENT`` for 3, as gRPC spells its codes."""
    return code_pb2.Code.Name(code)


def _pack(message) -> any_pb2.Any:
    detail = any_pb2.Any()
    detail.Pack(message)
    return detail


#: Most UTF-8 bytes of a message, and of a name in the details. The status travels in trailers, which
#: gRPC caps at 8 KiB (the message percent-encoded, the details in base64), and a request may name a
#: node or an input with a megabyte of characters.
MAX_MESSAGE_BYTES, MAX_NAME_BYTES = 600, 300


def _clip(text: str, limit: int = MAX_NAME_BYTES) -> str:
    data = text.encode()
    if len(data) <= limit:
        return text
    return f"{data[:limit - 40].decode('utf-8', 'ignore')}… ({len(text)} characters in all)"


def status_for(exc: ChainruleError, request_id: str = "") -> status_pb2.Status:
    """The google.rpc.Status describing ``exc``."""
    code = code_for(exc)
    message = _clip(exc.message, MAX_MESSAGE_BYTES)
    metadata = {key: _clip(str(value)) for key, value in (("node", exc.node), ("op", exc.op), ("field", exc.field))
                if value}
    if isinstance(exc, LimitExceeded):
        metadata.update(limit=exc.limit, requested=str(exc.requested), allowed=str(exc.allowed))
    if isinstance(exc, OperatorFailure):
        if exc.plugin:
            metadata["plugin"] = exc.plugin
        message = f"{message} [request id {request_id}]" if request_id else message
    if request_id:
        metadata["request_id"] = request_id
    details = [_pack(error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN, metadata=metadata))]
    if code == code_pb2.INVALID_ARGUMENT:
        violation = error_details_pb2.BadRequest.FieldViolation(field=_clip(exc.field or exc.node or ""),
                                                                description=message)
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[violation])))
    retry_after = getattr(exc, "retry_after", None)
    if retry_after:  # "not now": google.rpc.RetryInfo says when the same call may succeed
        delay = duration_pb2.Duration()
        delay.FromTimedelta(timedelta(seconds=retry_after))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    return status_pb2.Status(code=code, message=message, details=details)


def internal_status(request_id: str) -> status_pb2.Status:
    """For an unexpected exception: no internals leak, only the id to find the log entry."""
    info = error_details_pb2.ErrorInfo(reason="INTERNAL", domain=DOMAIN, metadata={"request_id": request_id})
    return status_pb2.Status(
        code=code_pb2.INTERNAL, message=f"internal error; the server log has the details under request id {request_id}",
        details=[_pack(info)],
    )
