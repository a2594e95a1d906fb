"""EvaluateStream: many input sets against one compiled graph, answered in order.

:func:`evaluate_stream` is the domain logic (no gRPC), shared by the servicer
and the in-process client. The graph is compiled once: a request without a
graph or graph_id reuses the previous request's. A failing input set is
answered with its own ``google.rpc.Status`` and the stream goes on; only a
cancelled call, a passed call deadline or the server's shutdown ends it. The server's compute cap
(``max_compute_seconds``) applies to each input set, like to one Evaluate.
"""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from typing import Callable, ContextManager, Iterable, Iterator

from chainrule.core import Plan, StopToken
from chainrule.core.errors import CancelledError, ChainruleError, GraphError, OperatorFailure, OptionError
from chainrule.core.limits import Hold
from chainrule.v1 import chainrule_pb2 as pb
from chainrule.wire.outgoing import Outgoing
from chainrule.wire.status import status_for

from .service import ChainruleService

log = logging.getLogger("chainrule.server.service.streaming")


def evaluate_stream(service: ChainruleService, requests: Iterable[pb.EvaluateRequest], call: StopToken | None = None,
                    item_seconds: float | None = None, request_id: str = "",
                    max_reply_bytes: int | None = None,
                    admit: Callable[[], ContextManager[None]] = nullcontext) -> Iterator[pb.EvaluateStreamResponse]:
    """Answer each request (or each of its input sets) in order.

    ``call`` stops the whole stream (client deadline, cancellation), checked
    before every input set; ``item_seconds`` caps the compute time of each
    input set. The answers to one message's sets go out in one reply, or in
    several consecutive ones once a reply holds ``max_reply_bytes``, so that
    no reply passes the message limit and none piles up in memory; an answer
    larger than ``max_reply_bytes`` is refused before it is computed. ``admit()`` is entered
    around the work of each input set (the server's admission slot: a busy server answers that
    set with RESOURCE_EXHAUSTED, and the stream goes on).
    """
    index = 0
    graph: tuple[str, Plan] | ChainruleError | None = None
    for request in requests:
        if call is not None:
            call.check()
        if request.WhichOneof("source") is not None:
            try:
                graph = service.plan_for(request, call)
            except ChainruleError as exc:
                graph = exc  # later requests without a graph fail the same way
        elif graph is None:
            graph = GraphError("the first request of a stream needs a graph or a graph_id", field="graph")
        # Answers travel inside the stream's messages: refuse rather than ignore an output file.
        graph_or_refusal = graph if not request.shared_memory_output else OptionError(
            "shared_memory_output: EvaluateStream answers in its messages; only Evaluate writes outputs "
            "to shared memory", field="shared_memory_output")
        if not request.input_sets:
            answer = pb.EvaluateStreamResponse(index=index)
            _answer(service, graph_or_refusal, request, answer, _item_token(call, item_seconds), request_id,
                    max_reply_bytes, admit)
            index += 1
            yield answer
            continue
        template = _options_of(request)
        response = pb.EvaluateStreamResponse(index=index)
        reply_bytes = 0
        for input_set in request.input_sets:
            if call is not None:
                call.check()  # many small sets in one message must not outlive the call
            if max_reply_bytes is not None and reply_bytes >= max_reply_bytes:
                yield response  # full: the next sets' answers follow in another reply
                response, reply_bytes = pb.EvaluateStreamResponse(index=index), 0
            item = pb.EvaluateRequest()
            item.CopyFrom(template)
            item.inputs.MergeFrom(input_set.inputs)
            answer = response.results.add(index=index)
            _answer(service, graph_or_refusal, item, answer, _item_token(call, item_seconds), request_id,
                    max_reply_bytes, admit)
            reply_bytes += answer.ByteSize()
            index += 1
        yield response


def _answer(service: ChainruleService, graph: tuple[str, Plan] | ChainruleError, request: pb.EvaluateRequest,
            answer: pb.EvaluateStreamResponse, token: StopToken | None, request_id: str,
            capacity: int | None, admit: Callable[[], ContextManager[None]] = nullcontext) -> None:
    """Fill ``answer`` with the response, or with the error status of this input set (one too large
    for ``capacity`` bytes is refused before it is computed)."""
    error = graph  # a graph that failed to compile fails every input set run on it
    if not isinstance(graph, ChainruleError):
        gid, plan = graph
        try:
            hold = Hold(plan.limits.ledger)  # the run's memory, counted until its answer is written
            try:
                with admit():
                    # Written in place, every tensor inside: this message nests in the stream's reply.
                    service.respond(gid, service.run(plan, request, token, capacity=capacity, hold=hold), request,
                                    Outgoing(answer.response), token)
            finally:
                hold.release()
            return
        except CancelledError:
            raise
        except ChainruleError as exc:
            if isinstance(exc, OperatorFailure):
                log.error("request %s, input set %d: %s", request_id, answer.index, exc.message, exc_info=exc)
            error = exc
    answer.error.CopyFrom(status_for(error, request_id))  # the oneof drops any half-written response


def _options_of(request: pb.EvaluateRequest) -> pb.EvaluateRequest:
    """The request without its graph and input sets: what each input set is evaluated with."""
    options = pb.EvaluateRequest(output=request.output, unreached=request.unreached,
                                 contributions=request.contributions, diagnostics=request.diagnostics,
                                 response_encoding=request.response_encoding, inputs=request.inputs)
    for field in ("seed", "return_values", "return_grads"):
        if request.HasField(field):
            getattr(options, field).CopyFrom(getattr(request, field))
    return options


def _item_token(call: StopToken | None, seconds: float | None) -> StopToken | None:
    if seconds is None:
        return call
    deadline = time.monotonic() + seconds
    cap = f"the server's time limit of {seconds:g} s per input set (max_compute_seconds)"
    if call is None:
        return StopToken(deadline, what=cap)
    if call.deadline is not None and call.deadline < deadline:
        return call
    return StopToken(deadline, call.event, cap)
