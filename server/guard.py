"""Malformed messages answer INVALID_ARGUMENT, like every other bad request.

gRPC answers a request its deserializer cannot parse with INTERNAL ("Exception
deserializing request!"), which blames the server for the client's bytes. A
guarded handler (:func:`guarded`, which the chainrule servicer's handlers are
when registered; :class:`MalformedRequestInterceptor` makes any service's so)
parses requests itself: an unparsable message reaches the servicer as a
:class:`Malformed` marker and is refused with INVALID_ARGUMENT (reason
MALFORMED_REQUEST) and the usual google.rpc details. In a request stream, the
bad message fails the call the same way.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import grpc
from google.protobuf.message import DecodeError
from grpc_status import rpc_status

from chainrule.core.errors import GraphError
from chainrule.wire.status import status_for


class Malformed:
    """Stands in for a request message that did not parse."""

    __slots__ = ("error",)

    def __init__(self, error: GraphError) -> None:
        self.error = error


class MalformedRequestInterceptor(grpc.ServerInterceptor):
    """Turns parse failures of ``service``'s requests into INVALID_ARGUMENT answers."""

    def __init__(self, service: str) -> None:
        self._prefix = f"/{service}/"
        self._wrapped = HandlerCache()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if (handler is None or not hasattr(handler, "_replace") or handler.request_deserializer is None
                or not handler_call_details.method.startswith(self._prefix)):
            return handler
        return self._wrapped.get(handler_call_details.method, handler, guarded)


def guarded(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """``handler`` of ``method`` (its full path) with its requests parsed tolerantly and a malformed one
    refused with INVALID_ARGUMENT. The chainrule servicer's handlers are made so when they are
    registered (see servicer.add_servicer), so that no interceptor runs on every call for it; the
    interceptor above does the same for any other server."""
    kind = behavior_field(handler)
    behavior = getattr(handler, kind)
    return handler._replace(**{
        "request_deserializer": _tolerant(handler.request_deserializer, method),
        kind: _checking_stream(behavior) if handler.request_streaming else _checking(behavior),
    })


class HandlerCache:
    """An interceptor's wrapped handler per method, made on the method's first call and reused.

    gRPC runs the interceptors on every call, and hands them the same handler object each time
    (the registered one), while the wrappers hold no state of any one call; wrapping it afresh
    (a new handler tuple and closures per call) is work the answer waits for. A handler that is
    not the one seen last (another interceptor's per-call refusal, say) is wrapped afresh and
    replaces it. Only methods that have a handler get here (gRPC answers unknown ones itself),
    and at most MAX_CACHED_METHODS are kept.
    """

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def get(self, method: str, handler: grpc.RpcMethodHandler,
            wrap: Callable[[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler]) -> grpc.RpcMethodHandler:
        """``wrap(method, handler)``, the same object as last time for the same handler."""
        entry = self._entries.get(method)
        if entry is not None and entry[0] is handler:
            return entry[1]
        wrapped = wrap(method, handler)
        if entry is not None or len(self._entries) < MAX_CACHED_METHODS:
            self._entries[method] = (handler, wrapped)  # one assignment: concurrent readers see either entry
        return wrapped


#: Methods a HandlerCache keeps at most (a server has a few dozen; unknown methods have no handler).
MAX_CACHED_METHODS = 256


def behavior_field(handler: grpc.RpcMethodHandler) -> str:
    """The name of the handler's field that holds its behaviour: ``unary_unary``, ``stream_stream``..."""
    requests = "stream" if handler.request_streaming else "unary"
    return f"{requests}_{'stream' if handler.response_streaming else 'unary'}"


def _tolerant(parse: Callable[[bytes], Any], method: str) -> Callable[[bytes], Any]:
    name = method.rsplit("/", 1)[-1]

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return Malformed(GraphError(f"the {name} request is not a valid protobuf message: {exc}",
                                        field="request", reason="MALFORMED_REQUEST"))

    return deserialize


def _checking(behavior: Callable[..., Any]) -> Callable[..., Any]:
    def checked(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, Malformed):
            context.abort_with_status(rpc_status.to_status(status_for(request.error)))
        return behavior(request, context)

    return checked


def _checking_stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
    def checked(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        return behavior(_parsed(requests), context)

    return checked


def _parsed(requests: Iterator[Any]) -> Iterator[Any]:
    """The request stream; a malformed message raises its GraphError, which the servicer reports."""
    for request in requests:
        if isinstance(request, Malformed):
            raise request.error
        yield request
