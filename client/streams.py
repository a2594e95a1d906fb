"""Many evaluations of one graph over EvaluateStream calls (``evaluate_many``), for both clients.

The graph is sent once per call, then the input sets (``batch`` of them per
message, to spread gRPC's per-message cost), and one result is read per set,
in order. ``parallel=N`` opens N such calls at once, each from its own thread,
so that a channel balancing over several replicas (round_robin) keeps them all
busy: the calls take the input sets a message at a time from the one
iterable, at most :data:`WINDOW` messages ahead of their answers, so a faster
replica takes more and none takes everything before the others start; the
results are put back in input-set order.

A call that ends UNAVAILABLE (its server shutting down, SHUTTING_DOWN, or the
connection lost with a replica killed) is followed by another that sends its
unanswered input sets again, up to :data:`RESENDS` times within the timeout:
an evaluation has no side effects, so answering a set twice is harmless, and
the channel takes the new call to a live replica.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from contextlib import closing
from typing import Any, Iterable, Iterator, Mapping

from chainrule.v1 import chainrule_pb2 as pb

from .errors import ChainruleRpcError, Unavailable, from_status
from .graph import Graph
from .request import Selectable, evaluate_request, input_tensors, resolve_target
from .result import Result
from .transport import Transport

#: Messages of input sets one of the parallel calls may have sent and not seen answered before it
#: takes more: enough that its server always has the next one at hand.
WINDOW = 4
#: How many times a call that ended UNAVAILABLE is followed by one sending its unanswered sets again.
RESENDS = 2


def _resendable(exc: BaseException, attempt: int, deadline: float | None) -> bool:
    """Whether a call that failed with ``exc`` (on its ``attempt``-th resend) is followed by another."""
    in_time = deadline is None or time.monotonic() < deadline
    return isinstance(exc, Unavailable) and attempt < RESENDS and in_time


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def evaluate_many(
    transport: Transport, target: Any, input_sets: Iterable[Mapping[Any, Any]], inputs: Mapping[Any, Any] | None,
    *, output: Any, seed: Any, timeout: float | None, values: Selectable, grads: Selectable, unreached: str,
    contributions: bool, diagnostics: bool, batch: int, errors: str, parallel: int = 1,
) -> list[Result | ChainruleRpcError]:
    """See :meth:`ClientBase.evaluate_many`. ``parallel``: how many EvaluateStream calls share the
    input sets (1: one call, which sends them all in order)."""
    if batch < 1:
        raise ValueError(f"batch: expected an integer >= 1, got {batch}")
    if errors not in ("raise", "return"):
        raise ValueError(f"errors: expected 'raise' or 'return', got {errors!r}")
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise ValueError(f"parallel: expected an integer >= 1, got {parallel!r}")
    graph, output_name = resolve_target(target, output)
    options = evaluate_request(graph, output_name, {}, seed=seed, values=values, grads=grads,
                               unreached=unreached, contributions=contributions, diagnostics=diagnostics).message
    options.ClearField("graph")  # the graph goes with the first message only
    common = input_tensors(graph, inputs or {}, skip_unused=True)
    if parallel > 1:
        return _Parallel(transport, graph, options, common, input_sets, timeout=timeout, diagnostics=diagnostics,
                         batch=batch, errors=errors).run(parallel)
    results: list[Result | ChainruleRpcError] = []
    unsendable: list[Exception] = []  # an input set that could not be encoded (gRPC would report "UNKNOWN")
    sets = _Unanswered(input_sets)
    deadline = None if timeout is None else time.monotonic() + timeout
    for attempt in itertools.count():
        requests = _until_unsendable(_stream_requests(graph, options, common, sets.stream(), batch), unsendable)
        try:
            with closing(transport.evaluate_stream(requests, _left(deadline))) as responses:  # closing ends the call
                for response in responses:
                    for item in response.results or [response]:
                        sets.answered()
                        if item.WhichOneof("result") == "response":
                            results.append(Result(item.response, graph, diagnosed=diagnostics))
                            continue
                        error = from_status(item.error)
                        error.index = len(results)  # type: ignore[attr-defined]  (which input set failed)
                        if errors == "raise":
                            raise error
                        results.append(error)
            break
        except Unavailable as exc:
            if unsendable or not _resendable(exc, attempt, deadline):
                raise
            sets.rewind()  # the sets sent and not answered go first on the next call
    if unsendable:
        raise unsendable[0]
    return results


class _Unanswered:
    """The caller's input sets, remembering those sent and not yet answered, so that after a call
    that ended UNAVAILABLE the next one sends them again. Read by gRPC's thread; each call reads
    its own :meth:`stream`, which ends once a later call has begun (a call gRPC has ended may
    still ask for one more set: it must not take one)."""

    def __init__(self, input_sets: Iterable[Mapping[Any, Any]]) -> None:
        self._source = iter(input_sets)
        self._waiting: deque = deque()  # sent, in order, not answered yet
        self._again: deque = deque()    # to send first on the next call
        self._generation = 0
        self._lock = threading.Lock()

    def stream(self) -> Iterator[Mapping[Any, Any]]:
        with self._lock:
            self._generation += 1
            generation = self._generation
        while True:
            with self._lock:
                if generation != self._generation:
                    return
                if self._again:
                    item = self._again.popleft()
                else:
                    try:
                        item = next(self._source)
                    except StopIteration:
                        return
                self._waiting.append(item)
            yield item

    def answered(self) -> None:
        with self._lock:
            self._waiting.popleft()

    def rewind(self) -> None:
        with self._lock:
            self._generation += 1
            self._again.extendleft(reversed(self._waiting))
            self._waiting.clear()


def _until_unsendable(requests: Iterator[pb.EvaluateRequest], unsendable: list[Exception]
                      ) -> Iterator[pb.EvaluateRequest]:
    """The requests, ending the stream at the first that cannot be built; the error is kept in
    ``unsendable`` for the caller to raise (gRPC would turn it into an anonymous UNKNOWN status)."""
    try:
        yield from requests
    except (TypeError, ValueError, KeyError) as exc:
        unsendable.append(exc)


def _stream_requests(graph: Graph, options: pb.EvaluateRequest, common: Mapping[str, pb.Tensor],
                     input_sets: Iterable[Mapping[Any, Any]], batch: int) -> Iterator[pb.EvaluateRequest]:
    """``batch`` input sets per message (one: in ``inputs``; more: in ``input_sets``); the graph goes first only."""
    pending: list[dict[str, pb.Tensor]] = []
    sent = 0
    for input_set in input_sets:
        pending.append(input_tensors(graph, input_set, skip_unused=True))
        if len(pending) == batch:
            yield _message(graph, options, common, pending, batch, first=sent == 0)
            pending, sent = [], sent + 1
    if pending:
        yield _message(graph, options, common, pending, batch, first=sent == 0)


def _message(graph: Graph, options: pb.EvaluateRequest, common: Mapping[str, pb.Tensor],
             sets: list[dict[str, pb.Tensor]], batch: int, *, first: bool) -> pb.EvaluateRequest:
    """One message of a stream: the options, the graph if ``first``, the shared inputs and ``sets``."""
    request = pb.EvaluateRequest()
    request.CopyFrom(options)
    if first:
        request.graph.CopyFrom(graph.message)
    for name, tensor in common.items():
        request.inputs[name].CopyFrom(tensor)
    for tensors in sets:
        feed = request.inputs if batch == 1 else request.input_sets.add().inputs
        for name, tensor in tensors.items():
            feed[name].CopyFrom(tensor)
    return request


# --- parallel calls --------------------------------------------------------------------------------

class _SetFailed(Exception):
    """An input set's error, with errors="raise": ends its call."""

    def __init__(self, error: ChainruleRpcError) -> None:
        super().__init__(error)
        self.error = error


class _Call:
    """One of the parallel EvaluateStream calls: the input sets it sent (their places among all the
    input sets, in the order sent) and how many of them are answered."""

    def __init__(self) -> None:
        self.sent: list[int] = []
        self.answered = 0
        self.sets: dict[int, Mapping[Any, Any]] = {}  # the sets sent and not answered, by their places
        self.again: list[int] = []  # places of sets to send first, on a call following one that ended UNAVAILABLE
        self.generation = 0  # which of its calls is current: an ended call's request iterator takes nothing
        self.responses: Any = None  # the transport's response generator, once opened
        self.ended = False  # its thread is done with it
        self.cancelled = False
        self.thread: threading.Thread | None = None

    def waiting_for(self) -> int | None:
        """The first of its input sets without an answer yet."""
        return self.sent[self.answered] if self.answered < len(self.sent) else None


class _Parallel:
    """Input sets spread over several EvaluateStream calls, results in input-set order.

    Errors are those of one call: with errors="raise" the failed set with the
    lowest index is raised (its ``index`` is its place among all the input
    sets), so calls holding only later sets are cancelled at once and calls
    with earlier ones are let finish those; a call that fails as a whole fails
    at its first unanswered set; an input set that cannot be encoded, at its
    own place. Every call has ended when ``run`` returns or raises.
    """

    def __init__(self, transport: Transport, graph: Graph, options: pb.EvaluateRequest,
                 common: Mapping[str, pb.Tensor], input_sets: Iterable[Mapping[Any, Any]], *,
                 timeout: float | None, diagnostics: bool, batch: int, errors: str) -> None:
        self.transport, self.graph, self.options, self.common = transport, graph, options, common
        self.timeout, self.diagnostics, self.batch, self.errors = timeout, diagnostics, batch, errors
        self.source = iter(input_sets)
        self.source_lock = threading.Lock()  # one call reads the caller's iterable at a time, in order
        self.lock = threading.Condition()  # everything below; notified when a set is answered or work stops
        self.next_index = 0
        self.dispatching = True  # more input sets may be handed out
        self.results: list[Result | ChainruleRpcError | None] = []
        self.failure: tuple[int, BaseException] | None = None
        self.calls: list[_Call] = []

    def run(self, parallel: int) -> list[Result | ChainruleRpcError]:
        self.calls = [_Call() for _ in range(parallel)]
        for k, call in enumerate(self.calls):
            call.thread = threading.Thread(target=self._serve, args=(call,), daemon=True,
                                           name=f"chainrule-evaluate-many-{k}")
        try:
            for call in self.calls:
                call.thread.start()  # type: ignore[union-attr]
            for call in self.calls:
                call.thread.join()  # type: ignore[union-attr]
        except BaseException:  # KeyboardInterrupt, say: end every call before leaving
            self._cancel(list(self.calls), stop=True)
            for call in self.calls:
                if call.thread.is_alive():  # type: ignore[union-attr]
                    call.thread.join()  # type: ignore[union-attr]
            raise
        if self.failure is not None:
            raise self.failure[1]
        missing = [k for k, result in enumerate(self.results) if result is None]
        if missing:  # every call ended without an error, yet a set has no answer
            raise RuntimeError(f"evaluate_many: input set {missing[0]} was never answered")
        return self.results  # type: ignore[return-value]

    # --- one call, in its own thread -----------------------------------------------------------

    def _serve(self, call: _Call) -> None:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        try:
            for attempt in itertools.count():
                try:
                    self._one_call(call, _left(deadline))
                    return
                except Unavailable as exc:
                    if not _resendable(exc, attempt, deadline) or not self._resend(call):
                        raise
        except BaseException as exc:  # noqa: BLE001 - settled below, raised by run()
            self._fail_call(call, exc)
        finally:
            with self.lock:
                call.ended = True
                self.lock.notify_all()  # its request iterator may be waiting for answers

    def _one_call(self, call: _Call, timeout: float | None) -> None:
        responses = self.transport.evaluate_stream(self._requests(call), timeout)
        with self.lock:
            call.responses = responses
            cancelled = call.cancelled
        with closing(responses):  # closing early cancels the call
            if cancelled:
                return
            for response in responses:
                for item in response.results or [response]:
                    self._answer(call, item)
                if self._moot(call):
                    return

    def _resend(self, call: _Call) -> bool:
        """Prepare ``call`` to send its unanswered sets again on a new call; False when it is cancelled."""
        with self.lock:
            if call.cancelled:
                return False
            call.again = call.sent[call.answered:]
            call.sent, call.answered = [], 0
            call.generation += 1
            call.responses = None
            self.lock.notify_all()  # the ended call's request iterator stops waiting
            return True

    def _answer(self, call: _Call, item: pb.EvaluateStreamResponse) -> None:
        if item.WhichOneof("result") == "response":
            outcome: Result | ChainruleRpcError = Result(item.response, self.graph, diagnosed=self.diagnostics)
        else:
            outcome = from_status(item.error)
        with self.lock:
            if not 0 <= item.index < len(call.sent) or item.index != call.answered:
                raise RuntimeError(f"evaluate_many: an answer to input set {item.index} of a stream, "
                                   f"expected {call.answered}")
            index = call.sent[item.index]
            call.sets.pop(index, None)
            call.answered += 1
            self.lock.notify_all()  # a window opens
            if isinstance(outcome, ChainruleRpcError):
                outcome.index = index  # type: ignore[attr-defined]  (which input set failed)
                if self.errors == "raise":
                    raise _SetFailed(outcome)
            self.results[index] = outcome

    def _moot(self, call: _Call) -> bool:
        """Whether the sets this call still waits for all come after a failure (then it is ended)."""
        with self.lock:
            if call.cancelled:
                return True
            if self.failure is None:
                return False
            waiting = call.waiting_for()
            if waiting is not None and waiting < self.failure[0]:
                return False
            call.cancelled = True
            return True

    def _fail_call(self, call: _Call, exc: BaseException) -> None:
        with self.lock:
            if call.cancelled:  # cancelled: whatever it ended with does not matter
                return
            if isinstance(exc, _SetFailed):
                index, exc = exc.error.index, exc.error  # type: ignore[attr-defined]
            else:  # the call failed as a whole: at the first set it had no answer for
                waiting = call.waiting_for()
                index = self.next_index if waiting is None else waiting
            call.cancelled = True
            moot = self._record(index, exc)
        self._cancel(moot)

    def _fail(self, index: int, exc: BaseException) -> None:
        with self.lock:
            moot = self._record(index, exc)
        self._cancel(moot)

    def _record(self, index: int, exc: BaseException) -> list[_Call]:
        """A failure at input set ``index`` (under the lock): no more sets go out; returns the calls
        that hold only later sets, to be cancelled."""
        if self.failure is None or index < self.failure[0]:
            self.failure = (index, exc)
        self.dispatching = False
        self.lock.notify_all()
        first = self.failure[0]
        return [c for c in self.calls if not c.ended and not c.cancelled
                and ((w := c.waiting_for()) is None or w > first)]

    def _cancel(self, calls: list[_Call], *, stop: bool = False) -> None:
        with self.lock:
            if stop:
                self.dispatching = False
            for call in calls:
                call.cancelled = True
            opened = [call.responses for call in calls if call.responses is not None]
            self.lock.notify_all()
        for responses in opened:
            try:
                responses.close()  # a gRPC call is cancelled at once, from any thread
            except ValueError:
                # A generator running in its own thread (the in-process transport) cannot be closed from
                # here: it ends after its current message, as its requests stop and it sees `cancelled`.
                pass

    # --- what one call sends (read by gRPC's thread, or in-process by the call's own) ------------

    def _requests(self, call: _Call) -> Iterator[pb.EvaluateRequest]:
        first = True
        generation = call.generation
        while True:
            taken = self._again(call, generation) or self._take(call, generation)
            if taken is None:
                return
            start, sets = taken
            tensors = []
            for k, input_set in enumerate(sets):
                try:
                    tensors.append(input_tensors(self.graph, input_set, skip_unused=True))
                except Exception as exc:  # noqa: BLE001 - raised by run(), like an unsendable set of one call
                    with self.lock:
                        del call.sent[len(call.sent) - len(sets):]  # none of this message goes out
                    self._fail(start + k, exc)
                    return
            yield _message(self.graph, self.options, self.common, tensors, self.batch, first=first)
            first = False

    def _again(self, call: _Call, generation: int) -> tuple[int, list[Mapping[Any, Any]]] | None:
        """Up to ``batch`` of the sets an earlier call of ``call`` left unanswered, each sent as its
        own message (their places need not follow each other); None when there are none left."""
        with self.lock:
            if not call.again or call.generation != generation or call.cancelled:
                return None
            place = call.again.pop(0)
            call.sent.append(place)
            return place, [call.sets[place]]

    def _take(self, call: _Call, generation: int) -> tuple[int, list[Mapping[Any, Any]]] | None:
        """The next ``batch`` input sets for ``call`` and the place of the first, once it has fewer
        than WINDOW messages unanswered; None when there are no more, or it is to stop."""
        with self.lock:
            # Waiting for answers on the thread that reads them (in-process) would never end.
            while (self.dispatching and not call.cancelled and not call.ended and call.generation == generation
                   and threading.current_thread() is not call.thread
                   and len(call.sent) - call.answered >= WINDOW * self.batch):
                self.lock.wait()
            if not self.dispatching or call.cancelled or call.ended or call.generation != generation:
                return None  # (another generation: a call that has ended takes nothing)
        with self.source_lock:
            with self.lock:
                if not self.dispatching:
                    return None
                start = self.next_index
            sets: list[Mapping[Any, Any]] = []
            try:
                sets.extend(itertools.islice(self.source, self.batch))
            except Exception as exc:  # noqa: BLE001 - the caller's iterable failed: raised by run()
                self._fail(start + len(sets), exc)
                return None
            with self.lock:
                if len(sets) < self.batch:
                    self.dispatching = False  # the iterable is exhausted
                self.next_index = start + len(sets)  # taken, so later sets keep their places
                self.results.extend([None] * len(sets))
                if not sets or call.cancelled:  # (cancelled: after a failure, which will be raised)
                    return None
                call.sets.update(zip(range(start, start + len(sets)), sets))
                if call.generation != generation:  # its call ended meanwhile: the next call sends them
                    call.again.extend(range(start, start + len(sets)))
                    return None
                call.sent.extend(range(start, start + len(sets)))
        return start, sets
