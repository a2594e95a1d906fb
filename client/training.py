"""Training through the service (the Optimize call), for both clients.

``optimize`` sends one OptimizeRequest and follows its progress reports with
a tqdm progress bar (only on a terminal unless asked) and/or a callback, for
notebooks. A run that the timeout (or the server's max_training_seconds)
would cut short stops in time on the server and returns what it trained,
marked ``stopped_early``.
"""
from __future__ import annotations

import sys
from contextlib import closing
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from chainrule.v1 import chainrule_pb2 as pb
from chainrule.wire.convert import tensor_to_array

from .graph import Graph
from .request import input_tensors
from .transport import Transport

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
    #: The run stopped before its steps because a time limit would have cut it short: the
    #: timeout (the client's deadline) or the server's max_training_seconds. ``params``,
    #: ``losses`` and ``steps`` are those of the steps taken.
    stopped_early: bool = False
    #: With ``stopped_early``: which limit, e.g. "the client's deadline", or "the server's time
    #: limit of 3600 s per training run (max_training_seconds)".
    stop_reason: str = ""


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
    for name, tensor in input_tensors(graph, params).items():
        request.parameters.append(name)
        request.initial[name].CopyFrom(tensor)
    for name, tensor in input_tensors(graph, data or {}).items():
        request.fixed_inputs[name].CopyFrom(tensor)
    for values in batches:
        entry = request.batches.add()
        for name, tensor in input_tensors(graph, values).items():
            entry.inputs[name].CopyFrom(tensor)
    return request


def optimize(transport: Transport, request: pb.OptimizeRequest, timeout: float | None, *,
             progress: bool | None, callback: Callable[[Progress], Any] | None) -> TrainResult:
    """Run the request and follow its reports; see :meth:`ClientBase.optimize`.

    A run stopped early by a time limit returns normally: the server stops it at a
    step boundary early enough for the final report to arrive before ``timeout``,
    and the TrainResult has ``stopped_early`` and ``stop_reason`` set, with the
    parameters and losses of the steps taken. Only a step that overruns the limit
    all the same raises DeadlineExceeded (nothing is returned); closing the stream
    (a callback that raises, Ctrl-C) cancels the run and returns nothing.
    """
    bar = _progress_bar(request.steps, progress)
    history: list[Progress] = []
    losses: list[float] = []
    final = None
    try:
        # Closing the reports ends the call: a callback that raises, or Ctrl-C, stops the server's work too.
        with closing(transport.optimize(request, timeout)) as reports:
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
                       final.elapsed_seconds, final.stopped_early, final.stop_reason)


# --- progress bar ------------------------------------------------------------------------------

class _Bar:
    """A tqdm bar on stderr (tqdm.auto: a widget in a notebook), the loss beside it.

    tqdm is imported here, when a bar is shown, not with the client: most programs never train.
    """

    def __init__(self, total: int) -> None:
        from tqdm.auto import tqdm

        self._tqdm = tqdm(total=total, unit="step", desc="train", file=sys.stderr)

    def show(self, report: Progress) -> None:
        self._tqdm.update(report.step - self._tqdm.n)
        self._tqdm.set_postfix(loss=f"{report.loss:.4g}", refresh=False)

    def close(self) -> None:
        self._tqdm.close()


def _progress_bar(total: int, progress: bool | None) -> _Bar | None:
    """A bar when asked (``True``), or by default (``None``) when stderr is a terminal."""
    wanted = sys.stderr.isatty() if progress is None else progress
    return _Bar(total) if wanted else None
