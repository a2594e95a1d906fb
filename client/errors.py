"""Typed exceptions for failed calls, read from the google.rpc.Status details.

Both clients raise the same classes: ``Client`` builds them from a
``grpc.RpcError`` (``grpc_status.rpc_status.from_call``), ``LocalClient``
from the ``google.rpc.Status`` the server would have sent. Each carries the
status code, the message, the machine-readable ``reason`` (ErrorInfo) and the
node, operator and field at fault.

Failures the client meets before any chainrule server answers (nothing
listening, an address that does not resolve, a message over gRPC's size limit)
come from gRPC itself, without details: :func:`from_rpc_error` recognizes them
and words them with the address, the cause and the next step, under a reason
of their own (:data:`CLIENT_REASONS`).
"""
from __future__ import annotations

from typing import Any

import re

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
        #: ErrorInfo metadata: node, op, field, request_id, plugin, limit, requested, allowed...; for the
        #: client-side reasons also address, cause and grpc_message (gRPC's own text).
        self.metadata: dict[str, str] = dict(metadata or {})
        #: BadRequest field violations as (field, description) pairs.
        self.violations: list[tuple[str, str]] = list(violations or [])
        #: RetryInfo's delay in seconds, for a refusal that only says "not now" (the server busy, or its
        #: memory held by other calls): the client sends such a call again after it. None otherwise.
        self.retry_delay: float | None = None

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
    retry_delay: float | None = None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend((v.field, v.description) for v in bad.field_violations)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_delay = retry.retry_delay.ToTimedelta().total_seconds()
    error = error_class(code)(code, status.message, reason=reason, metadata=metadata, violations=violations)
    error.retry_delay = retry_delay
    return error


def from_rpc_error(error: grpc.RpcError, *, address: str | None = None, method: str | None = None,
                   connecting: bool = False) -> ChainruleRpcError:
    """The typed exception for a failed gRPC call, with its rich details when present.

    ``address`` (the client's target) and ``method`` (the call's name, "Evaluate"...) word the
    failures gRPC reports itself; ``connecting``: the channel had no connection when the call
    failed (a DEADLINE_EXCEEDED then means the server never answered the connection).
    """
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
    explained = explain(code, message or "", address=address, method=method, connecting=connecting)
    if explained is None:
        return error_class(code)(code, message or code.name, metadata=metadata)
    text, reason, found = explained
    metadata.update(found, grpc_message=message or code.name)
    if address:
        metadata["address"] = address
    return error_class(code)(code, text, reason=reason, metadata=metadata)


# --- failures gRPC reports itself -----------------------------------------------------------------

#: Reasons the client gives the failures gRPC reports without details (no chainrule server spoke):
#: ``UNREACHABLE``: no connection to a server at the address (nothing listening, TLS refused, no
#: answer within the deadline...; ``metadata["cause"]`` says which); ``UNRESOLVABLE``: the address
#: names no host; ``MESSAGE_TOO_LARGE``: a request or response over a message-size limit (``metadata``:
#: limit, requested, allowed, side, message); ``METHOD_NOT_FOUND``: what answered is not a chainrule
#: server, or one without this call.
CLIENT_REASONS = ("UNREACHABLE", "UNRESOLVABLE", "MESSAGE_TOO_LARGE", "METHOD_NOT_FOUND")

_START_A_SERVER = "start `chainrule serve` (or use chainrule.server.LocalClient in-process)"
_RESOLVING = re.compile(r"errors resolving|DNS resolution failed|[Nn]ame resolution|address lookup failed|"
                        r"Domain name not found|Misformatted domain name|Could not contact DNS")
_TOO_LARGE = re.compile(r"(?:(CLIENT|SERVER): )?(Sent|Received) message larger than max \((\d+) vs\. (\d+)\)")
#: gRPC's ceiling for a message (2 GiB - 1): no limit can be raised past it.
_GRPC_CEILING = (1 << 31) - 1


def explain(code: grpc.StatusCode, details: str, *, address: str | None, method: str | None = None,
            connecting: bool = False) -> tuple[str, str, dict[str, str]] | None:
    """(message, reason, metadata) for a status gRPC made itself, or None when it is none we know."""
    where = _where(address)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        found = _TOO_LARGE.search(details)
        if found:
            return _too_large(found, where, method)
    elif code == grpc.StatusCode.UNAVAILABLE:
        if _RESOLVING.search(details):
            return (f"cannot resolve the server address {where}: {_last_cause(details)}. Check the host name and "
                    "port (\"host:port\", a \"dns:///name:port\" target, or a list of IP:port addresses) and that "
                    "this machine's DNS knows the name", "UNRESOLVABLE", {"cause": "UNRESOLVABLE"})
        if "connections to all backends failing" in details or "failed to connect to all addresses" in details:
            return _unreachable(details, where)
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED and connecting:
        return (f"no connection to a chainrule server at {where} before the call's deadline: nothing answers "
                "there (a wrong address, a firewall that drops packets, or a server still starting). Check the "
                f"address and port, or {_START_A_SERVER}", "UNREACHABLE", {"cause": "NO_ANSWER"})
    elif code == grpc.StatusCode.UNIMPLEMENTED and "Method not found" in details:
        call = f"chainrule.v1.Chainrule/{method}" if method else "this call"
        return (f"the server at {where} does not know {call}: it is not a chainrule server, or a chainrule "
                f"version without this call. Check the address and port, or {_START_A_SERVER}",
                "METHOD_NOT_FOUND", {"cause": "METHOD_NOT_FOUND"})
    return None


def _where(address: str | None) -> str:
    """The address as the user wrote it: a list target ("ipv4:a,b") as its addresses."""
    if not address:
        return "the given address"
    scheme, _, rest = address.partition(":")
    if scheme in ("ipv4", "ipv6") and "," in rest:
        return "any of " + ", ".join(rest.split(","))
    return address


def _last_cause(details: str) -> str:
    """gRPC's innermost reason: "...: Domain name not found]" -> "Domain name not found"."""
    return details.rstrip("]").rsplit(": ", 1)[-1].strip() or details


def _unreachable(details: str, where: str) -> tuple[str, str, dict[str, str]]:
    last = details.split("last error: ", 1)[-1]
    if "Connection refused" in last:
        return (f"cannot reach a chainrule server at {where}: connection refused, nothing is listening there"
                f"{_port_note(where)}. Check the address and port, or {_START_A_SERVER}", "UNREACHABLE",
                {"cause": "CONNECTION_REFUSED"})
    if "andshake failed" in last or "SSL" in last or "certificate" in last.lower():
        return (f"cannot reach a chainrule server at {where}: the TLS handshake failed ({last}). Check tls=: "
                "TLS(ca=...) must name the CA that signed the server's certificate, TLS(server_name=...) the name it "
                "was issued for, TLS(cert=..., key=...) a client certificate if the server asks for one; a server "
                "without TLS needs no tls=", "UNREACHABLE", {"cause": "TLS_HANDSHAKE"})
    if "Failed parsing HTTP/2" in last:
        return (f"cannot reach a chainrule server at {where}: what listens there does not speak gRPC ({last}); "
                "is it another service, or the server's --metrics-port? Check the address and port, or "
                f"{_START_A_SERVER}", "UNREACHABLE", {"cause": "NOT_GRPC"})
    if "Socket closed" in last or "Connection reset" in last:
        return (f"cannot reach a chainrule server at {where}: the connection was closed during the handshake. "
                "The server may require TLS (Client(..., tls=...)) or a client certificate, or what listens there "
                "is not a gRPC server: check the address, port and tls=", "UNREACHABLE", {"cause": "CONNECTION_CLOSED"})
    return (f"cannot reach a chainrule server at {where}: {last}. Check the address, port and network, or "
            f"{_START_A_SERVER}", "UNREACHABLE", {"cause": "CONNECT_FAILED"})


def _port_note(where: str) -> str:
    """A hint for an address without a port ("localhost"): gRPC then tries 443, not 50051."""
    if "," in where or "://" in where or where.startswith(("unix:", "ipv4:", "ipv6:", "the given")):
        return ""
    host, _, port = where.rpartition(":")
    if host and port.isdigit() and not where.endswith("]"):
        return ""
    return " (the address has no port, so gRPC tried 443; chainrule serve listens on 50051 by default)"


def _too_large(found: re.Match[str], where: str, method: str | None) -> tuple[str, str, dict[str, str]]:
    side, verb, size, limit = found.group(1), found.group(2), int(found.group(3)), int(found.group(4))
    # The sender's limit ("Sent") or the receiver's ("Received"): which message it is follows from the side.
    if side == "SERVER":
        message = "response" if verb == "Sent" else "request"
    elif side == "CLIENT":
        message = "request" if verb == "Sent" else "response"
    else:  # a gRPC that does not say whose limit: take it for this client's
        message, side = ("request" if verb == "Sent" else "response"), "CLIENT"
    figures = {"limit": "max_message_bytes", "requested": str(size), "allowed": str(limit),
               "side": side.lower(), "message": message, "cause": "MESSAGE_TOO_LARGE"}
    if message == "request":
        smaller = ("send less per call: smaller or fewer inputs" +
                   (" (evaluate_many sends batch= input sets per message: lower it)"
                    if method in (None, "EvaluateStream") else ""))
    else:
        smaller = "ask for less: fewer values or gradients (values=[...], grads=[...], or \"none\"), no contributions=True"
    shared = ("on the same host, shared memory (Client(..., shared_memory=True)) passes the large tensors of "
              "evaluate() outside the messages")
    if side == "SERVER":
        whose = (f"the server at {where} {'accepts' if message == 'request' else 'may send'} ({limit} bytes, "
                 "its message limit)")
        raise_it = ("raise the server's limit (chainrule serve --max-message-bytes, or --max-memory-bytes, "
                    "from which it derives by default)")
    else:
        whose = f"this client {'sends' if message == 'request' else 'accepts'} ({limit} bytes, Client(max_message_bytes=))"
        raise_it = "raise Client(max_message_bytes=...)"
    ways = f"{smaller}; {shared}; or {raise_it}" if limit < _GRPC_CEILING else f"{smaller}; or {shared}"
    text = f"the {message} is {size} bytes, more than {whose}. To fit: {ways}"
    return text, "MESSAGE_TOO_LARGE", figures
