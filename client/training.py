"""Many evaluations over one stream, and training through the service: shared by both clients.

``evaluate_many`` sends the graph once, then the input sets (``batch`` of
them per message, to spread gRPC's per-message cost), and reads one result
per set, in order. ``optimize`` sends one OptimizeRequest and follows its
progress reports with a progress bar (tqdm when installed, else one line of
text; only on a terminal unless asked) and/or a callback, for notebooks.
The transports (``_evaluate_stream``, ``_optimize``) come from the client.
"""
from __future__ import annotations

import sys
from contextlib import closing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from chainrule.server.convert import tensor_to_array
from chainrule.v1 import chainrule_pb2 as pb

from .errors import ChainruleRpcError, from_status
from .graph import Graph
from .request import Selectable, evaluate_request, resolve_target, to_tensor
from .result import Result, name_of

if TYPE_CHECKING:
    from .base import ClientBase


# --- evaluate_many ----------------------------------------------------------------------------

def evaluate_many(
    client: "ClientBase", target: Any, input_sets: Iterable[Mapping[Any, Any]], inputs: Mapping[Any, Any] | None,
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
    common = _tensors(graph, inputs or {})
    results: list[Result | ChainruleRpcError] = []
    unsendable: list[Exception] = []  # an input set that could not be encoded (gRPC would report "UNKNOWN")
    requests = _until_unsendable(_stream_requests(graph, options, common, input_sets, batch), unsendable)
    with closing(client._evaluate_stream(requests, timeout)) as responses:  # closing early ends the call
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
        pending.append(_tensors(graph, input_set))
        if len(pending) == batch:
            yield message(pending, sent == 0)
            pending, sent = [], sent + 1
    if pending:
        yield message(pending, sent == 0)


def _tensors(graph: Graph, values: Mapping[Any, Any]) -> dict[str, pb.Tensor]:
    declared = graph.inputs
    tensors = {}
    for key, value in values.items():
        name = name_of(key, graph.builder)
        spec = declared.get(name)
        tensors[name] = to_tensor(name, value, spec.dtype if spec else None)
    return tensors


# --- optimize ---------------------------------------------------------------------------------

#: Progress reports per second by default: a smooth progress bar, and a negligible cost per step
#: (each report is one gRPC message, a fraction of a millisecond).
REPORTS_PER_SECOND = 10


@dataclass(frozen=True)
class Progress:
    """One progress report of a training run."""

    step: int
    #: Loss at the most recent step; on the final report, the loss at the trained parameters.
    loss: float
    grad_norms: dict[str, float]
    elapsed: float
    #: Loss at every step since the previous report.
    losses: tuple[float, ...]
    done: bool

    @classmethod
    def from_proto(cls, message: pb.OptimizeProgress) -> "Progress":
        return cls(message.step, message.loss, dict(message.grad_norms), message.elapsed_seconds,
                   tuple(message.losses), message.done)


@dataclass(frozen=True)
class TrainResult:
    """The outcome of :meth:`ClientBase.optimize`."""

    #: Trained parameters by name (writable arrays).
    params: dict[str, np.ndarray]
    #: Loss at the trained parameters.
    loss: float
    #: Updates applied.
    steps: int
    #: Loss at every step, in order (each before its update): the whole history.
    losses: np.ndarray
    #: Every progress report received, the final one last.
    history: list[Progress]
    target_reached: bool
    elapsed: float


def optimize_request(
    graph: Graph, loss: str, params: Mapping[Any, Any], *, data: Mapping[Any, Any] | None,
    batches: Sequence[Mapping[Any, Any]], optimizer: str, lr: float, momentum: float, beta1: float | None,
    beta2: float | None, eps: float | None, steps: int, target_loss: float | None, report_every: int | None,
) -> pb.OptimizeRequest:
    """The OptimizeRequest for one call (the graph travels whole)."""
    settings = pb.Optimizer(kind=optimizer, learning_rate=lr, momentum=momentum)
    for field, value in (("beta1", beta1), ("beta2", beta2), ("epsilon", eps)):
        if value is not None:
            setattr(settings, field, value)
    request = pb.OptimizeRequest(graph=graph.message, loss=loss, optimizer=settings, steps=steps)
    if report_every is None:  # every step, but at most REPORTS_PER_SECOND times a second
        request.report_every, request.report_interval_seconds = 1, 1 / REPORTS_PER_SECOND
    else:
        request.report_every = report_every
    if target_loss is not None:
        request.target_loss = target_loss
    for name, tensor in _tensors(graph, params).items():
        request.parameters.append(name)
        request.initial[name].CopyFrom(tensor)
    for name, tensor in _tensors(graph, data or {}).items():
        request.fixed_inputs[name].CopyFrom(tensor)
    for values in batches:
        entry = request.batches.add()
        for name, tensor in _tensors(graph, values).items():
            entry.inputs[name].CopyFrom(tensor)
    return request


def optimize(client: "ClientBase", request: pb.OptimizeRequest, timeout: float | None, *,
             progress: bool | None, callback: Callable[[Progress], Any] | None) -> TrainResult:
    """Run the request and follow its reports; see :meth:`ClientBase.optimize`."""
    bar = _progress_bar(request.steps, progress)
    history: list[Progress] = []
    losses: list[float] = []
    final = None
    try:
        # Closing the reports ends the call: a callback that raises, or Ctrl-C, stops the server's work too.
        with closing(client._optimize(request, timeout)) as reports:
            for message in reports:
                report = Progress.from_proto(message)
                history.append(report)
                losses.extend(report.losses)
                if bar is not None:
                    bar.show(report)
                if callback is not None:
                    callback(report)
                if message.done:
                    final = message
    finally:
        if bar is not None:
            bar.close()
    if final is None:
        raise RuntimeError("the Optimize stream ended without a final report")
    params = {name: np.array(tensor_to_array(final.parameters[name], field=f"parameters.{name}"))
              for name in request.parameters}
    return TrainResult(params, final.loss, final.step, np.array(losses), history, final.target_reached,
                       final.elapsed_seconds)


# --- progress bar ------------------------------------------------------------------------------

class _Bar:
    """tqdm when installed, else a one-line text bar redrawn on stderr."""

    def __init__(self, total: int) -> None:
        self.total = total
        try:
            from tqdm.auto import tqdm
        except ImportError:
            self._tqdm = None
        else:
            self._tqdm = tqdm(total=total, unit="step", desc="train", file=sys.stderr)

    def show(self, report: Progress) -> None:
        if self._tqdm is not None:
            self._tqdm.update(report.step - self._tqdm.n)
            self._tqdm.set_postfix(loss=f"{report.loss:.4g}", refresh=False)
            return
        width = 30
        filled = width * report.step // max(self.total, 1)
        sys.stderr.write(f"\rtrain {report.step:>{len(str(self.total))}}/{self.total} "
                         f"[{'#' * filled}{'.' * (width - filled)}] loss {report.loss:.4g}  {report.elapsed:.1f}s")
        sys.stderr.flush()

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
        else:
            sys.stderr.write("\n")


def _progress_bar(total: int, progress: bool | None) -> _Bar | None:
    """A bar when asked (``True``), or by default (``None``) when stderr is a terminal."""
    wanted = sys.stderr.isatty() if progress is None else progress
    return _Bar(total) if wanted else None
