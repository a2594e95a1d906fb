"""The gRPC servicer: calls in, ChainruleService calls, statuses out; nothing else.

Admission control, the request id, deadlines turned into StopTokens and
errors turned into ``google.rpc.Status`` live here; what a call computes lives
in ``chainrule.server.service``; how the server is built and started lives in
``grpc_server.py``.
"""
from __future__ import annotations

import functools
import logging
import queue
import random
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import grpc
from grpc_status import rpc_status

from chainrule.core import StopToken
from chainrule.core.limits import RETRY_AFTER_SECONDS, Hold
from chainrule.core.errors import (
    CancelledError, ChainruleError, DeadlineError, LimitExceeded, OperatorFailure, ShuttingDown,
)
from chainrule.v1 import chainrule_pb2 as pb
from chainrule.v1 import chainrule_pb2_grpc as pb_grpc
from chainrule.wire import outgoing
from chainrule.wire.incoming import Incoming, read_message
from chainrule.wire.outgoing import AllHandEncoded, Carrier, Outgoing, SharedMemory
from chainrule.wire.status import REQUEST_ID_KEY, code_for, code_name, internal_status, status_for

from .config import ServerConfig
from .guard import guarded
from .service import ChainruleService, evaluate_stream, optimize

log = logging.getLogger("chainrule.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Chainrule"].full_name


class Slots:
    """A number of slots, taken without waiting (False when none is free) and given back.

    A SimpleQueue of free slots, whose ``get_nowait`` and ``put`` are one C call each: a
    ``threading.BoundedSemaphore`` takes its Condition's lock and a dozen lines of Python each
    way, which every unary answer waited for. A slot is given back only by whoever took it,
    once (see _Slot and _UnaryCall), so no count of them needs checking."""

    __slots__ = ("_free",)

    def __init__(self, size: int) -> None:
        self._free: queue.SimpleQueue[None] = queue.SimpleQueue()
        for _ in range(size):
            self._free.put(None)

    def acquire(self, blocking: bool = False) -> bool:
        """Take a slot if one is free (``blocking`` is accepted for Semaphore's spelling, never waited on)."""
        try:
            self._free.get_nowait()
        except queue.Empty:
            return False
        return True

    def release(self) -> None:
        self._free.put(None)


class _Slot:
    """One call's admission slot, released once: when the work ends or when the call does (a deadline
    or a cancel), whichever comes first."""

    __slots__ = ("_semaphore", "_lock", "_held")

    def __init__(self, semaphore: Slots) -> None:
        self._semaphore = semaphore
        self._lock = threading.Lock()
        self._held = False

    def acquire(self) -> bool:
        self._held = self._semaphore.acquire(blocking=False)
        return self._held

    def release(self) -> None:
        with self._lock:
            if self._held:
                self._held = False
                self._semaphore.release()


class _UnaryCall:
    """What one unary call holds: its admission slot, and whether gRPC has ended the call (a
    deadline, a cancel, or its answer sent). One object and one gRPC callback (:meth:`end`) do
    what a :class:`_Slot`, a ``threading.Event`` and two callbacks did: per-call work the answer
    waits for. It is the call's StopToken event (``is_set``), and the slot is released once,
    when the work ends or when the call does, whichever comes first."""

    __slots__ = ("_held", "ended")

    def __init__(self) -> None:
        self._held: list[Slots] = []  # the slot, while held
        self.ended = False

    def admit(self, slots: Slots) -> bool:
        """Take a slot without waiting; False when none is free."""
        if not slots.acquire(blocking=False):
            return False
        self._held.append(slots)
        return True

    def release(self) -> None:
        """Give the slot back, once: ``list.pop`` is atomic, so of two threads releasing at once
        (the work ending, gRPC ending the call) only one gets the slot to release."""
        try:
            slots = self._held.pop()
        except IndexError:
            return
        slots.release()

    def end(self) -> None:
        """gRPC's callback when the call ends: work still running stops at its next check."""
        self.ended = True
        self.release()

    def is_set(self) -> bool:
        """Whether the call has ended (``threading.Event``'s name: StopToken reads it so)."""
        return self.ended


@functools.lru_cache(maxsize=64)
def _limit_text(cap: float, per: str, limit: str) -> str:
    """What a StopToken names when the server's time cap stops a call (made once per cap, not per call)."""
    return f"the server's time limit of {cap:g} s per {per} ({limit})"


def new_request_id() -> str:
    """12 random hex digits naming one call in logs, trailers and error details. From the
    ``random`` module (reseeded in forked workers), not ``uuid4``: no system call per call."""
    return f"{random.getrandbits(48):012x}"


def log_call(method: str, request_id: str, size: int, started: float, outcome: str) -> None:
    """The call's log line: at DEBUG for a call answered OK, at INFO otherwise. Making and writing
    a line cost a small call's answer 0.07-0.12 ms in a serving thread (measured against a server
    logging nothing), more than the rest of the per-call bookkeeping together; ``--log-level DEBUG``
    shows every call."""
    level = logging.DEBUG if outcome == "OK" else logging.INFO
    if log.isEnabledFor(level):
        log.log(level, "%s id=%s nodes=%d %.1fms %s", method, request_id, size,
                (time.perf_counter() - started) * 1000, outcome)


class Servicer(pb_grpc.ChainruleServicer):
    """Converts calls into service calls and errors into statuses; nothing else."""

    def __init__(self, service: ChainruleService, config: ServerConfig, worker: int = 0) -> None:
        self.service = service
        self.config = config
        self.worker = worker
        # Admission control: excess calls are refused at once with RESOURCE_EXHAUSTED
        # naming the limit, rather than queueing behind slow ones.
        self._slots = Slots(config.max_concurrent)
        # Open EvaluateStream calls: each holds a thread (waiting for its client's messages),
        # and a slot of _slots only while it computes an input set.
        self._streams = Slots(config.max_streams)
        # The tokens of the Optimize runs in progress, told to wind down when the server shuts down.
        self._training: set[StopToken] = set()
        self._training_lock = threading.Lock()
        # Why the server is shutting down, once it is: training runs stop at their next step and
        # streams before reading another message.
        self._winding_down = ""

    def _call(self, method: str, context: grpc.ServicerContext, work: Callable[[_UnaryCall], Any],
              size: int = 0) -> Any:
        """One unary call: request id, admission control, error statuses and the log line around
        ``work``, which gets the call's state (its StopToken event). What _serving does for a
        stream, without a generator, a lock or an Event: a unary answer waits for all of it.

        The request id travels in the trailers (headers sent early would cost a write and stop
        the client's transparent retries)."""
        request_id = new_request_id()
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
        started = time.perf_counter()
        outcome = "OK"
        call = _UnaryCall()
        try:
            if not call.admit(self._slots):
                raise self._refusal(streams=False)
            # The call's end frees its slot even while abandoned work runs on to its next stop check
            # (see _serving).
            context.add_callback(call.end)
            return work(call)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            outcome, status = self._failure(exc, method, request_id)
            context.abort_with_status(status)
        finally:
            call.release()
            log_call(method, request_id, size, started, outcome)

    def _stream(self, method: str, context: grpc.ServicerContext, work: Callable[[str], Iterator[Any]],
                size: int = 0, streams: bool = False) -> Iterator[Any]:
        """Like _call for a streaming response; ``work`` gets the request id. The slot is held to the
        end: an admission slot, or with ``streams`` one of the open-stream slots (max_streams)."""
        with self._serving(method, context, size, streams=streams) as request_id:
            yield from work(request_id)

    def _refusal(self, streams: bool) -> LimitExceeded:
        if streams:
            allowed = self.config.max_streams
            return LimitExceeded(
                f"the server already has {allowed} EvaluateStream calls open (max_streams); retry later, or send "
                f"more input sets through fewer streams", limit="max_streams", requested=allowed + 1, allowed=allowed,
                retry_after=RETRY_AFTER_SECONDS)
        allowed = self.config.max_concurrent
        return LimitExceeded(f"the server is already serving {allowed} calls (max_concurrent); retry later",
                             limit="max_concurrent", requested=allowed + 1, allowed=allowed,
                             retry_after=RETRY_AFTER_SECONDS)

    @contextmanager
    def _admitted(self) -> Iterator[None]:
        """An admission slot for one input set of a stream, or LimitExceeded (max_concurrent)."""
        if not self._slots.acquire(blocking=False):
            raise self._refusal(streams=False)
        try:
            yield
        finally:
            self._slots.release()

    @contextmanager
    def _serving(self, method: str, context: grpc.ServicerContext, size: int,
                 streams: bool = False) -> Iterator[str]:
        """Request id, admission control, error statuses and the log line around one streaming call
        (_call does the same for a unary one).

        The request id travels in the headers of a stream, so the client knows the call has started.
        """
        request_id = new_request_id()
        context.send_initial_metadata(((REQUEST_ID_KEY, request_id),))
        started = time.perf_counter()
        outcome = "OK"
        slot = _Slot(self._streams if streams else self._slots)
        try:
            if not slot.acquire():
                raise self._refusal(streams)
            # The call's end frees its slot even while abandoned work runs on to its next stop check
            # (inside one BLAS product, say): the slot counts calls someone waits for, so a client's
            # deadline or cancel never leaves it taken.
            context.add_callback(slot.release)
            yield request_id
        except GeneratorExit:  # a streaming call closed by gRPC: the client went away
            outcome = "CANCELLED"
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            outcome, status = self._failure(exc, method, request_id)
            context.abort_with_status(status)
        finally:
            slot.release()
            log_call(method, request_id, size, started, outcome)

    @staticmethod
    def _failure(exc: Exception, method: str, request_id: str) -> tuple[str, grpc.Status]:
        """The outcome's code name and the status to answer a failed call with; an operator's
        failure and an unexpected error are logged with their traceback."""
        if isinstance(exc, ChainruleError):
            if isinstance(exc, OperatorFailure):
                log.error("request %s: %s", request_id, exc.message, exc_info=exc)
            status = rpc_status.to_status(status_for(exc, request_id))
            return code_name(code_for(exc)), _with_request_id(status, request_id)
        log.error("request %s: unexpected error in %s", request_id, method, exc_info=exc)
        return "INTERNAL", _with_request_id(rpc_status.to_status(internal_status(request_id)), request_id)

    def _token(self, context: grpc.ServicerContext, cap: float | None = None, limit: str = "max_compute_seconds",
               per: str = "request", ended: _UnaryCall | None = None) -> StopToken:
        """Stop work when the client's deadline passes, it cancels, or the server's time cap is hit.
        ``ended``: a unary call's state, which already learns of the call's end (no Event needed)."""
        remaining = context.time_remaining()
        cap = self.config.max_compute_seconds if cap is None else cap
        cancelled: Any = ended
        if cancelled is None:
            cancelled = threading.Event()
            context.add_callback(cancelled.set)
        if remaining is not None and remaining <= cap:
            return StopToken.after(remaining, cancelled, "the client's deadline")
        return StopToken.after(cap, cancelled, _limit_text(cap, per, limit))

    def Evaluate(self, request: Incoming, context: grpc.ServicerContext) -> Outgoing:
        message = request.message
        size = len(message.graph.nodes) if message.HasField("graph") else 0
        return self._call("Evaluate", context, lambda call: self._evaluate(request, context, call), size)

    def _evaluate(self, request: Incoming, context: grpc.ServicerContext, call: _UnaryCall) -> Outgoing:
        """The response's tensors hand-encoded into the reply, or its large ones written into the
        shared-memory file a same-host client named (opened and checked before any work)."""
        # The run's memory and its response's stay counted until both the work here and gRPC's
        # sending of the response (or end of the call) are done.
        hold = Hold(self.service.limits.ledger, parties=2)
        if not context.add_callback(hold.release):  # the call has ended already
            hold.release()
        try:
            output_file = request.message.shared_memory_output
            if not output_file:
                token = self._token(context, ended=call)
                return self.service.evaluate(request, token, AllHandEncoded(capacity=self.config.message_limit),
                                             hold=hold)
            with self._shared_memory_carrier(output_file) as carrier:
                return self.service.evaluate(request, self._token(context, ended=call), carrier, hold=hold)
        finally:
            hold.release()

    @contextmanager
    def _shared_memory_carrier(self, output_file: str) -> Iterator[Carrier]:
        """The shared-memory file a same-host client named for the response's large tensors."""
        file = self.service.open_output_file(output_file)
        try:
            yield SharedMemory(file)
        finally:
            file.close()

    def RegisterGraph(self, request: pb.RegisterGraphRequest, context: grpc.ServicerContext) -> pb.RegisterGraphResponse:
        return self._call("RegisterGraph", context, lambda _: self.service.register_graph(request),
                          len(request.graph.nodes))

    def Derive(self, request: pb.DeriveRequest, context: grpc.ServicerContext) -> pb.DeriveResponse:
        size = len(request.graph.nodes) if request.HasField("graph") else 0
        return self._call("Derive", context, lambda _: self.service.derive(request, self.config.message_limit), size)

    def ListOperators(self, request: pb.ListOperatorsRequest, context: grpc.ServicerContext) -> pb.ListOperatorsResponse:
        return self._call("ListOperators", context, lambda _: self.service.list_operators(request))

    def ServerInfo(self, request: pb.ServerInfoRequest, context: grpc.ServicerContext) -> pb.ServerInfoResponse:
        return self._call("ServerInfo", context, lambda _: self.service.server_info(request, self.worker))

    def EvaluateStream(self, requests: Iterator[pb.EvaluateRequest],
                       context: grpc.ServicerContext) -> Iterator[pb.EvaluateStreamResponse]:
        # A stream waiting for the client's next message is ended by the same token as its work:
        # client_requests waits for each message only until the token's deadline, then raises
        # DeadlineError in this thread, which _serving turns into DEADLINE_EXCEEDED naming the
        # limit (with its google.rpc details) and which frees the admission slot.
        # The stream holds no admission slot while it waits: each input set takes one as it is computed.
        token = call_token(context, self.config.max_stream_seconds)
        return self._stream("EvaluateStream", context, lambda request_id: evaluate_stream(
            self.service, client_requests(requests, token, self.config.stream_idle_seconds,
                                          lambda: self._winding_down), token,
            self.config.max_compute_seconds, request_id, max_reply_bytes=self.config.message_limit // 2,
            admit=self._admitted), streams=True)

    def Optimize(self, request: pb.OptimizeRequest, context: grpc.ServicerContext) -> Iterator[pb.OptimizeProgress]:
        size = len(request.graph.nodes) if request.HasField("graph") else 0
        # A run its deadline would cut short stops in time with what it trained (stopped_early).
        token = self._token(context, self.config.max_training_seconds, "max_training_seconds", "training run")

        def work(request_id: str) -> Iterator[pb.OptimizeProgress]:
            with self._training_run(token):
                yield from optimize(self.service, request, token, request_id)

        return self._stream("Optimize", context, work, size)

    @contextmanager
    def _training_run(self, token: StopToken) -> Iterator[None]:
        with self._training_lock:
            self._training.add(token)
            if self._winding_down:
                token.wind_down(self._winding_down)
        try:
            yield
        finally:
            with self._training_lock:
                self._training.discard(token)

    def wind_down(self, reason: str) -> int:
        """The server is shutting down: every training run in progress (and any starting meanwhile)
        ends at its next step boundary with what it trained, ``reason`` as its stop_reason; every
        EvaluateStream ends before reading another message (SHUTTING_DOWN), its answers sent.
        How many training runs."""
        with self._training_lock:
            self._winding_down = reason
            for token in self._training:
                token.wind_down(reason)
            return len(self._training)


def _with_request_id(status: grpc.Status, request_id: str) -> grpc.Status:
    """The status with the request id added to its trailers (aborting replaces the call's own)."""
    return status._replace(trailing_metadata=(*status.trailing_metadata, (REQUEST_ID_KEY, request_id)))


def add_servicer(server: grpc.Server, servicer: Servicer) -> None:
    """Register every RPC of the service, like the generated ``add_ChainruleServicer_to_server``,
    but with a serializer that also takes responses whose tensors are pre-encoded, Evaluate's
    requests read by ``read_message``, and malformed requests refused (guard.guarded)."""
    factories = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    # Evaluate's large input tensors are read as views of the received bytes (see chainrule.wire.incoming).
    readers = {"Evaluate": functools.partial(read_message, pb.EvaluateRequest)}
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["Chainrule"].methods:
        factory = factories[(method.client_streaming, method.server_streaming)]
        # Guarded here, once, rather than by an interceptor on every call: a malformed request is
        # INVALID_ARGUMENT (see guard.py).
        handlers[method.name] = guarded(f"/{SERVICE_NAME}/{method.name}", factory(
            getattr(servicer, method.name),
            request_deserializer=readers.get(method.name, getattr(pb, method.input_type.name).FromString),
            response_serializer=outgoing.serialize,
        ))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def call_token(context: grpc.ServicerContext, max_seconds: float) -> StopToken:
    """Stops when the client's deadline passes, it cancels, or the stream has lived ``max_seconds``
    (a stream holds an admission slot, so an idle one must not hold it for ever)."""
    remaining = context.time_remaining()
    cancelled = threading.Event()
    context.add_callback(cancelled.set)
    if remaining is not None and remaining <= max_seconds:
        return StopToken.after(remaining, cancelled, "the client's deadline")
    return StopToken.after(max_seconds, cancelled, f"the server's time limit of {max_seconds:g} s per stream (max_stream_seconds)")


_END = object()
#: How often a stream waiting for its client's next message looks whether the server is closing.
CLOSING_POLL_SECONDS = 0.1


def _check_open(closing: Callable[[], str] | None) -> None:
    """Raise ShuttingDown once the server has begun to shut down (``closing()`` gives why)."""
    reason = closing() if closing is not None else ""
    if reason:
        raise ShuttingDown(f"the stream was ended by {reason}; the answers sent so far stand: send the remaining "
                           f"requests again, to another replica or once the server is back")


def client_requests(requests: Iterator[pb.EvaluateRequest], call: StopToken | None = None,
                    idle_seconds: float | None = None,
                    closing: Callable[[], str] | None = None) -> Iterator[pb.EvaluateRequest]:
    """The request stream, with a client gone mid-stream reported as CANCELLED (not an internal error).

    With a ``call`` token that has a deadline, each message is awaited only until that deadline:
    then ``call.check()`` raises (DeadlineError naming the limit) in the caller's thread; and only
    ``idle_seconds`` (the server's stream_idle_seconds), after which a DeadlineError names that
    limit: a stream that sends nothing, or headers only, gives its thread back. Once ``closing()``
    gives a reason (the server shuts down), no further message is read: ShuttingDown ends the stream. grpc's
    request iterator cannot be waited on with a timeout, and ``context.abort`` from another
    thread leaves the handler blocked in it (grpc 1.85; grpc/grpc#41074), so a helper thread
    reads the messages, one at a time and only when asked (no read-ahead). It ends with the
    call: grpc ends the request iterator once the status is sent.
    """
    if call is None or call.deadline is None:
        try:
            yield from requests
        except grpc.RpcError:
            raise CancelledError("the client cancelled the stream; work stopped") from None
        return
    ready: queue.SimpleQueue = queue.SimpleQueue()
    wanted = threading.Semaphore(0)
    closed = False

    def read() -> None:
        while True:
            wanted.acquire()
            if closed:
                return
            try:
                item: Any = next(requests)
            except StopIteration:
                item = _END
            except BaseException as exc:  # noqa: BLE001 - handed to the stream's thread
                item = exc
            ready.put(item)
            if item is _END or isinstance(item, BaseException):
                return

    threading.Thread(target=read, name="chainrule-stream-reader", daemon=True).start()
    try:
        while True:
            _check_open(closing)
            wanted.release()
            idle_until = None if idle_seconds is None else time.monotonic() + idle_seconds
            while True:
                until = call.deadline if idle_until is None else min(call.deadline, idle_until)
                if closing is not None:  # wake up now and then to see whether the server is closing
                    until = min(until, time.monotonic() + CLOSING_POLL_SECONDS)
                try:
                    item = ready.get(timeout=max(0.0, until - time.monotonic()) + 0.001)
                    break
                except queue.Empty:
                    _check_open(closing)
                    call.check()  # raises once the deadline has passed (or the call was cancelled)
                    if idle_until is not None and time.monotonic() >= idle_until:
                        raise DeadlineError(
                            f"the stream sent no message for {idle_seconds:g} s (the server's stream_idle_seconds); "
                            f"it was ended and its slot given back: send the next request sooner, or open a "
                            f"stream when there is work")
            if item is _END:
                return
            if isinstance(item, grpc.RpcError):
                raise CancelledError("the client cancelled the stream; work stopped") from None
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        closed = True
        wanted.release()  # a reader waiting to be asked for more ends now
