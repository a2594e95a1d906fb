"""Client: the chainrule API over a gRPC channel.

Example::

    with Client("127.0.0.1:50051") as client:
        result = client.evaluate(f, x=1.0, y=3.0, z=-3.0)
        result.value, result.grad[x]
"""
from __future__ import annotations

import functools
import random
import time
from collections.abc import Generator as GeneratorABC
from typing import Any, Callable, Generator, Iterator, Sequence

import grpc

from chainrule.v1 import chainrule_pb2 as pb, chainrule_pb2_grpc
from chainrule.wire import outgoing
from chainrule.wire.incoming import Incoming, read_message
from chainrule.wire.outgoing import AllHandEncoded, Carrier, Outgoing

from .base import ClientBase
from .channel import IDEMPOTENT_METHODS, TLS, open_channel, retry_buffer_bytes, target_for
from .errors import ChainruleRpcError, from_rpc_error
from .request import EvaluateCall
from .shared_memory import SameHost, StagingFile
from .transport import Transport

#: Default send/receive limit: gRPC's ceiling (2 GiB - 1; its own default of 4 MiB is too small for
#: real tensors). The server bounds what it accepts and sends by its memory budget, and refuses a
#: response too large for its limit before computing it, so the client adds no wall of its own.
MAX_MESSAGE_BYTES = (1 << 31) - 1
#: How many times a call refused "not now" (RetryInfo) is sent again, each after twice the last delay.
BUSY_RETRIES = 5


class Client(ClientBase):
    """Talks to chainrule servers at ``address``: "host:port", a gRPC target
    ("dns:///name:port", "ipv4:10.0.0.1:50051,10.0.0.2:50051"), or a list of
    IP:port addresses. Calls are spread over every address (round_robin) and
    retried on UNAVAILABLE (see channel.py).

    ``timeout`` (seconds) is the default deadline of every call; ``options``
    are extra gRPC channel arguments (they win over the defaults);
    ``tls=True`` or a :class:`~chainrule.client.channel.TLS` makes a secure
    channel (``credentials``, ready-made gRPC credentials, also do);
    ``token`` is sent as ``authorization: Bearer <token>``.
    ``shared_memory`` says when the large inputs and outputs of ``evaluate``
    go through files of the server's shared-memory directory instead of the
    messages, which only works with one address, on the server's host, as
    the server's user (see chainrule.client.shared_memory): ``"auto"`` (the
    default) for calls whose input arrays add up to 256 KiB or more, once
    one ServerInfo call has shown the server's directory usable from here,
    otherwise (and after a call that shared memory failed) quietly through
    the messages; ``True`` for every call, a reason it cannot being a
    FailedPrecondition; ``False`` never.
    A call the server refuses "not now" (RESOURCE_EXHAUSTED with RetryInfo:
    all its ``max_concurrent`` slots taken, or its memory budget held by other
    calls; refused before any work) is sent again after the delay the server
    names, doubled each time, up to ``busy_retries`` times within the timeout.
    """

    transport: "GrpcTransport"

    def __init__(self, address: str | Sequence[str], *, timeout: float | None = None,
                 options: Sequence[tuple[str, Any]] | None = None,
                 credentials: grpc.ChannelCredentials | None = None,
                 tls: bool | TLS | None = None, token: str | None = None,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, shared_memory: bool | str = "auto",
                 busy_retries: int = BUSY_RETRIES) -> None:
        super().__init__(GrpcTransport(address, options=options, credentials=credentials, tls=tls, token=token,
                                       max_message_bytes=max_message_bytes, shared_memory=shared_memory,
                                       busy_retries=busy_retries),
                         timeout=timeout)

    @property
    def address(self) -> str:
        """The gRPC target this client calls."""
        return self.transport.address

    @property
    def channel(self) -> grpc.Channel:
        return self.transport.channel

    def __repr__(self) -> str:
        return f"<Client {self.address}>"


class GrpcTransport(Transport):
    """The calls over a gRPC channel: large tensors hand-encoded (or in shared memory) on the way
    out, read as views of the received bytes on the way back."""

    def __init__(self, address: str | Sequence[str], *, options: Sequence[tuple[str, Any]] | None,
                 credentials: grpc.ChannelCredentials | None, tls: bool | TLS | None, token: str | None,
                 max_message_bytes: int, shared_memory: bool | str = "auto",
                 busy_retries: int = BUSY_RETRIES) -> None:
        super().__init__()
        self.address = target_for(address)
        #: How many times a call refused "not now" (RetryInfo) is sent again (0: never).
        self.busy_retries = busy_retries
        #: When evaluate's large tensors go through shared memory (see chainrule.client.shared_memory).
        self.same_host = SameHost(shared_memory, self.address)
        given = list(options or [])
        keys = {key for key, _ in given}
        defaults = [("grpc.max_send_message_length", max_message_bytes),
                    ("grpc.max_receive_message_length", max_message_bytes),
                    # A retried call's request is kept until its answer starts; gRPC's default
                    # (256 KiB) would give up retrying any larger one (see channel.py).
                    ("grpc.per_rpc_retry_buffer_size", retry_buffer_bytes(max_message_bytes))]
        channel_options = given + [(k, v) for k, v in defaults if k not in keys]
        self.channel = open_channel(address, options=channel_options, credentials=credentials, tls=tls, token=token)
        self._stub = chainrule_pb2_grpc.ChainruleStub(self.channel)
        # Evaluate with its inputs hand-encoded (see chainrule.wire.outgoing): one copy, not three;
        # large outputs read as views of the received bytes (chainrule.wire.incoming): no copy.
        self.evaluate_call = self.channel.unary_unary(
            "/chainrule.v1.Chainrule/Evaluate",
            request_serializer=outgoing.serialize,
            response_deserializer=functools.partial(read_message, pb.EvaluateResponse),
        )

    def carrier(self) -> Carrier:
        return AllHandEncoded()

    def close(self) -> None:
        self.channel.close()
        self.same_host.close()

    def staging(self, call: EvaluateCall) -> StagingFile | None:
        return self.same_host.staging(call.feeds, call.timeout, self._shared_memory_dir)

    def unstage(self, file: StagingFile, *, reusable: bool) -> None:
        self.same_host.release(file, reusable=reusable)

    def _shared_memory_dir(self, timeout: float | None) -> str:
        """The directory the server advertises for shared memory ("" when it takes none)."""
        return self.server_info(timeout).shared_memory_dir

    def shared_memory_failed(self, error: ChainruleRpcError) -> bool:
        return self.same_host.failed(error)

    def _call(self, name: str, method: Callable[..., Any], request: Any, timeout: float | None) -> Any:
        ends = None if timeout is None else time.monotonic() + timeout
        for attempt in range(self.busy_retries + 1):
            try:
                return self._call_once(name, method, request, ends)
            except ChainruleRpcError as error:
                # A refusal that says "not now" (RetryInfo: the server busy, or its memory held by other
                # calls) comes before any work: an idempotent call is sent again after the delay it names,
                # doubled each time, while the timeout allows.
                delay = None if error.retry_delay is None else error.retry_delay * (2 ** attempt) * random.uniform(1, 1.5)
                if (delay is None or name not in IDEMPOTENT_METHODS or attempt == self.busy_retries
                        or (ends is not None and time.monotonic() + delay >= ends)):
                    raise
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _call_once(self, name: str, method: Callable[..., Any], request: Any, ends: float | None) -> Any:
        timeout = None if ends is None else max(0.0, ends - time.monotonic())
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as error:
            failed = error
        # gRPC retries an idempotent call until the server starts answering; one whose server died
        # while sending the answer (UNAVAILABLE, after the headers) is sent once more here. Not a
        # call in shared memory: the server that was writing its output file may still be alive
        # (in auto mode, Transport.evaluate sends it again through the messages, with new files).
        if (failed.code() == grpc.StatusCode.UNAVAILABLE and name in IDEMPOTENT_METHODS  # type: ignore[attr-defined]
                and not _in_shared_memory(request)):
            remaining = None if ends is None else ends - time.monotonic()
            if remaining is None or remaining > 0:
                try:
                    return method(request, timeout=remaining)
                except grpc.RpcError as error:
                    failed = error
        raise self.error(failed, name) from None

    def error(self, error: grpc.RpcError, method: str) -> ChainruleRpcError:
        """The typed exception for a failed call of ``method``; the failures gRPC reports itself
        (nothing listening, a message too large...) name this client's address (errors.explain)."""
        connecting = False
        if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:  # type: ignore[attr-defined]
            connecting = _connected(self.channel) is False  # the deadline passed before any connection
        return from_rpc_error(error, address=self.address, method=method, connecting=connecting)

    def send_evaluate(self, request: Outgoing, timeout: float | None) -> Incoming:
        return self._call("Evaluate", self.evaluate_call, request, timeout)

    def register(self, request: pb.RegisterGraphRequest, timeout: float | None) -> pb.RegisterGraphResponse:
        return self._call("RegisterGraph", self._stub.RegisterGraph, request, timeout)

    def list_operators(self, timeout: float | None) -> pb.ListOperatorsResponse:
        return self._call("ListOperators", self._stub.ListOperators, pb.ListOperatorsRequest(), timeout)

    def derive(self, request: pb.DeriveRequest, timeout: float | None) -> pb.DeriveResponse:
        return self._call("Derive", self._stub.Derive, request, timeout)

    def server_info(self, timeout: float | None) -> pb.ServerInfoResponse:
        return self._call("ServerInfo", self._stub.ServerInfo, pb.ServerInfoRequest(), timeout)

    def evaluate_stream(self, requests: Iterator[pb.EvaluateRequest],
                        timeout: float | None) -> Generator[pb.EvaluateStreamResponse, None, None]:
        return CallResponses(self._stub.EvaluateStream(requests, timeout=timeout), self, "EvaluateStream")

    def optimize(self, request: pb.OptimizeRequest,
                 timeout: float | None) -> Generator[pb.OptimizeProgress, None, None]:
        return CallResponses(self._stub.Optimize(request, timeout=timeout), self, "Optimize")


class CallResponses(GeneratorABC):
    """A streaming call's responses, as a generator: a failure raises the typed error, and
    ``close()`` cancels the call, from any thread (a generator function cannot be closed while
    another thread waits inside it; evaluate_many's parallel streams close each other's)."""

    def __init__(self, call: Any, transport: GrpcTransport, method: str) -> None:
        self._call = call
        self._transport = transport
        self._method = method
        self._closed = False

    def send(self, value: Any) -> Any:
        if self._closed:
            raise StopIteration
        try:
            return next(self._call)
        except StopIteration:
            self._closed = True
            raise
        except grpc.RpcError as error:
            if self._closed:  # cancelled by close(): the end, not a failure
                raise StopIteration from None
            self._closed = True
            raise self._transport.error(error, self._method) from None

    def throw(self, typ: Any = None, value: Any = None, traceback: Any = None) -> Any:
        self.close()
        return super().throw(typ, value, traceback)

    def close(self) -> None:
        self._closed = True
        self._call.cancel()  # thread-safe; a no-op once the call has ended


def _in_shared_memory(request: Any) -> bool:
    """Whether ``request`` is an Evaluate call whose answer the server writes into our files."""
    return isinstance(request, Outgoing) and bool(request.message.shared_memory_output)


def _connected(channel: grpc.Channel) -> bool | None:
    """Whether ``channel`` has a connection now (None: cannot tell). gRPC's Python API tells only
    through a subscription (a polling thread); the core channel inside answers at once."""
    inner: Any = channel
    for _ in range(3):  # an intercepted channel (bearer token) wraps the grpc one, which wraps the core's
        check = getattr(inner, "check_connectivity_state", None)
        if check is not None:
            try:
                return check(False) == _READY
            except Exception:
                return None
        inner = getattr(inner, "_channel", None)
        if inner is None:
            return None
    return None


#: The core's number for the READY connectivity state.
_READY = grpc.ChannelConnectivity.READY.value[0]
