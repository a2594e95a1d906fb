"""Malformed messages answer INVALID_ARGUMENT, like every other bad request.

gRPC answers a request its deserializer cannot parse with INTERNAL ("Exception
deserializing request!"), which blames the server for the client's bytes. This
interceptor parses chainrule requests itself: an unparsable message reaches the
servicer as a :class:`Malformed` marker and is refused with INVALID_ARGUMENT
(reason MALFORMED_REQUEST) and the usual google.rpc details. In a request
stream, the bad message fails the call the same way.
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

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if (handler is None or not hasattr(handler, "_replace") or handler.request_deserializer is None
                or not handler_call_details.method.startswith(self._prefix)):
            return handler
        kind = behavior_field(handler)
        behavior = getattr(handler, kind)
        return handler._replace(**{
            "request_deserializer": _tolerant(handler.request_deserializer, handler_call_details.method),
            kind: _checking_stream(behavior) if handler.request_streaming else _checking(behavior),
        })


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
