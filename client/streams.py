"""Many evaluations of one graph over one EvaluateStream call (``evaluate_many``), for both clients.

The graph is sent once, then the input sets (``batch`` of them per message,
to spread gRPC's per-message cost), and one result is read per set, in order.
"""
from __future__ import annotations

from contextlib import closing
from typing import Any, Iterable, Iterator, Mapping

from chainrule.v1 import chainrule_pb2 as pb

from .errors import ChainruleRpcError, from_status
from .graph import Graph
from .request import Selectable, evaluate_request, input_tensors, resolve_target
from .result import Result
from .transport import Transport


def evaluate_many(
    transport: Transport, target: Any, input_sets: Iterable[Mapping[Any, Any]], inputs: Mapping[Any, Any] | None,
    *, output: Any, seed: Any, timeout: float | None, values: Selectable, grads: Selectable, unreached: str,
    contributions: bool, diagnostics: bool, batch: int, errors: str,
) -> list[Result | ChainruleRpcError]:
    """See :meth:`ClientBase.evaluate_many`."""
    if batch < 1:
        raise ValueError(f"batch: expected an integer >= 1, got {batch}")
    if errors not in ("raise", "return"):
        raise ValueError(f"errors: expected 'raise' or 'return', got {errors!r}")
    graph, output_name = resolve_target(target, output)
    options = evaluate_request(graph, output_name, {}, seed=seed, values=values, grads=grads,
                               unreached=unreached, contributions=contributions, diagnostics=diagnostics).message
    options.ClearField("graph")  # the graph goes with the first message only
    common = input_tensors(graph, inputs or {})
    results: list[Result | ChainruleRpcError] = []
    unsendable: list[Exception] = []  # an input set that could not be encoded (gRPC would report "UNKNOWN")
    requests = _until_unsendable(_stream_requests(graph, options, common, input_sets, batch), unsendable)
    with closing(transport.evaluate_stream(requests, timeout)) as responses:  # closing early ends the call
        for response in responses:
            for item in response.results or [response]:
                if item.WhichOneof("result") == "response":
                    results.append(Result(item.response, graph, diagnosed=diagnostics))
                    continue
                error = from_status(item.error)
                error.index = item.index  # type: ignore[attr-defined]  (which input set failed)
                if errors == "raise":
                    raise error
                results.append(error)
    if unsendable:
        raise unsendable[0]
    return results


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

    def message(sets: list[dict[str, pb.Tensor]], first: bool) -> pb.EvaluateRequest:
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

    pending: list[dict[str, pb.Tensor]] = []
    sent = 0
    for input_set in input_sets:
        pending.append(input_tensors(graph, input_set))
        if len(pending) == batch:
            yield message(pending, sent == 0)
            pending, sent = [], sent + 1
    if pending:
        yield message(pending, sent == 0)
