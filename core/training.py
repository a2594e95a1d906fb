"""The training loop: forward, backward, update, repeat, over a compiled Plan.

One loop serves the Optimize RPC and the in-process client alike, so the same
run gives bitwise-identical parameters through both. Every feed is checked
against the graph before the first step (a bad batch fails at once, naming
its field, not after minutes of training). A step evaluates the loss and the
gradients of the parameters only (``wrt``: data inputs cost nothing), then
asks the optimizer for new parameters; a stop token is checked at every step
boundary and between nodes.

A run with a deadline (the token's) keeps what it trained: at each step
boundary it estimates what one more step and the final report would take
(:func:`time_needed`: the slowest recent step times a safety factor, plus the
final loss and sending the report) and, when that would not end before the
deadline, stops there with a final report marked ``stopped_early``. Only a
step that overruns the deadline all the same, or a cancel, stops a run with
an error and no final report. A server shutting down asks its runs to wind
down (``StopToken.wind_down``): each ends the same way at its next step boundary.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from .compile import Plan
from .dtypes import is_differentiable
from .engine import StopToken, evaluate
from .errors import DTypeError, GraphError, MissingInputError, OptionError, OutputError, ShapeError, UnexpectedInputError
from .optim import Optimizer

Arrays = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Report:
    """Where a training run stands after ``step`` updates."""

    #: Updates applied so far.
    step: int
    #: Loss at the most recent step; on the final report, the loss at ``params``.
    loss: float
    #: L2 norm of each parameter's gradient at the most recent step.
    grad_norms: dict[str, float]
    #: Seconds since the run started.
    elapsed: float
    #: Loss at every step since the previous report, oldest first (each before its update); at most
    #: MAX_LOSSES_PER_REPORT, a report coming early rather than holding more.
    losses: tuple[float, ...] = ()
    done: bool = False
    #: The trained parameters (final report only).
    params: dict[str, np.ndarray] | None = None
    #: Final report only: the run stopped because the loss reached the target.
    target_reached: bool = False
    #: Final report only: the run stopped before its steps, at a step boundary, because one more
    #: step and this report would not have ended before the token's deadline.
    stopped_early: bool = False
    #: With ``stopped_early``: the limit that stopped it, the token's ``what`` (e.g. "the client's deadline").
    stop_reason: str = ""


@dataclass
class Feeds:
    """What a run feeds the graph: the parameters' names, and the data of each step."""

    parameters: list[str]
    batches: list[dict[str, np.ndarray]] = field(default_factory=list)

    def step_inputs(self, step: int, params: Arrays) -> dict[str, np.ndarray]:
        inputs = dict(self.batches[step % len(self.batches)])
        inputs.update(params)
        return inputs


#: Most losses one report carries (512 KiB of doubles): a run of millions of steps between
#: reports would otherwise pile its history up in memory, and into a final message too big to send.
MAX_LOSSES_PER_REPORT = 1 << 16

#: Steps whose durations predict the next one's (the slowest of them counts).
RECENT_STEPS = 32
#: The next step is budgeted at this many times the slowest recent step (steps vary: the garbage
#: collector, a busy machine).
STEP_SAFETY_FACTOR = 2.0
#: Sending the final report: a fixed allowance (scheduling, serialization, the network's latency)
#: plus its bytes at a modest rate.
SEND_SECONDS = 0.2
SEND_BYTES_PER_SECOND = 25e6


def time_needed(slowest_step: float, report_bytes: int) -> float:
    """Seconds one more step and the final report would take: the step, budgeted at the slowest
    recent one times STEP_SAFETY_FACTOR; the final loss (a forward pass, at most a step); sending
    the report (SEND_SECONDS, plus its bytes at SEND_BYTES_PER_SECOND)."""
    return (STEP_SAFETY_FACTOR + 1) * slowest_step + SEND_SECONDS + report_bytes / SEND_BYTES_PER_SECOND


def training(
    plan: Plan,
    params: Arrays,
    *,
    optimizer: Optimizer,
    steps: int,
    loss: str | None = None,
    fixed: Arrays | None = None,
    batches: Sequence[Arrays] = (),
    target_loss: float | None = None,
    report_every: int = 0,
    report_seconds: float = 0.0,
    token: StopToken | None = None,
) -> Iterator[Report]:
    """Minimize the scalar ``loss`` node over ``params`` (graph inputs, by name).

    Step k feeds ``fixed`` plus ``batches[k mod len(batches)]``. Yields a
    report every ``report_every`` steps (0: every step) but not within
    ``report_seconds`` of the previous one, and always a final one (``done``)
    with the trained parameters; stops early once the loss is at or below
    ``target_loss``.

    With a ``token`` that has a deadline, stops at the first step boundary
    (after the first step) where :func:`time_needed` says one more step and
    the final report would not end before it: the final report then carries
    the steps taken so far, ``stopped_early`` and the token's ``what`` as
    ``stop_reason``. A token asked to wind down (``StopToken.wind_down``: the
    server is shutting down) stops the run the same way at its next step
    boundary, the first one included, with the wind-down's reason. The
    token's cancel, or its deadline passing all the same (a step far slower
    than the recent ones), still raises.
    """
    if steps <= 0:
        raise OptionError(f"steps: must be > 0, got {steps}", field="steps")
    if report_every < 0:
        raise OptionError(f"report_every: must be >= 0, got {report_every}", field="report_every")
    if not report_seconds >= 0:
        raise OptionError(f"report_interval_seconds: must be >= 0, got {report_seconds}",
                         field="report_interval_seconds")
    if target_loss is not None and math.isnan(target_loss):  # no loss is ever <= NaN: it would never stop early
        raise OptionError("target_loss: NaN can never be reached; leave it unset to run every step",
                         field="target_loss")
    feeds = check_feeds(plan, params, fixed or {}, batches, token)
    out = _loss_slot(plan, loss)
    _check_loss_shapes(plan, out, params, feeds, token)
    names, loss_name = feeds.parameters, plan.names[out]
    slots = [plan.slot(name, field="parameters") for name in names]
    params = {name: params[name] for name in names}
    every = report_every or 1
    started = last = time.perf_counter()
    losses: list[float] = []
    grads: dict[str, np.ndarray] = {}
    deadline = token.deadline if token is not None else None
    param_bytes = sum(np.asarray(p).nbytes for p in params.values())
    recent: deque[float] = deque(maxlen=RECENT_STEPS)
    slowest_ever = 0.0  # >= every recent step: when it leaves time enough, the recent ones do too
    boundary = time.monotonic()
    taken = steps  # updates applied when the loop ends: fewer when the deadline stops it
    for k in range(steps):
        if token is not None:
            token.check()
            if token.winding_down:  # the server is shutting down: end here with what was trained
                taken = k
                break
            if deadline is not None and k > 0:
                now = time.monotonic()
                recent.append(now - boundary)
                slowest_ever = max(slowest_ever, now - boundary)
                boundary = now
                report_bytes = param_bytes + 8 * len(losses)
                if (now + time_needed(slowest_ever, report_bytes) > deadline
                        and now + time_needed(max(recent), report_bytes) > deadline):
                    taken = k
                    break
        evaluation = evaluate(plan, feeds.step_inputs(k, params), output=loss_name, wrt=names, token=token)
        value = float(evaluation.values[out])
        if not math.isfinite(value):
            raise _diverged(loss_name, value, k, losses)
        grads = {name: evaluation.grads[slot] for name, slot in zip(names, slots)}
        if target_loss is not None and value <= target_loss:
            # Reached: no update at this step, so its loss is the report's `loss` alone (k updates, k losses).
            yield Report(k, value, _norms(grads), time.perf_counter() - started, tuple(losses),
                         done=True, params=params, target_reached=True)
            return
        losses.append(value)  # one loss per update applied, taken before it
        params = optimizer.step(params, grads)
        due = (k + 1) % every == 0 and time.perf_counter() - last >= report_seconds
        if k + 1 < steps and (due or len(losses) >= MAX_LOSSES_PER_REPORT):
            last = time.perf_counter()
            yield Report(k + 1, value, _norms(grads), last - started, tuple(losses))
            losses = []
    if token is not None:
        token.check()
    final = evaluate(plan, feeds.step_inputs(taken - 1, params), output=loss_name, gradients=False, token=token)
    value = float(final.values[out])
    stopped = taken < steps
    yield Report(taken, value, _norms(grads), time.perf_counter() - started, tuple(losses),
                 done=True, params=params, target_reached=target_loss is not None and value <= target_loss,
                 stopped_early=stopped,
                 stop_reason=(token.winding_down or token.what) if stopped and token is not None else "")


def _norms(grads: Arrays) -> dict[str, float]:
    """L2 norms, computed only for a report (not at every step)."""
    return {name: float(np.linalg.norm(g)) for name, g in grads.items()}


def train(plan: Plan, params: Arrays, *, on_progress: Callable[[Report], None] | None = None,
          **options) -> Report:
    """Run :func:`training` to the end; ``on_progress`` sees every report. Returns the final one."""
    for report in training(plan, params, **options):
        if on_progress is not None:
            on_progress(report)
    return report  # training always ends with a final report


# --- checks before the first step ---------------------------------------------------------

def check_feeds(plan: Plan, params: Arrays, fixed: Arrays, batches: Sequence[Arrays],
                token: StopToken | None = None) -> Feeds:
    """Every declared input fed exactly once per step with the declared dtype and shape
    (``token`` is checked every 1,024 batches: a request may carry a million)."""
    declared = {plan.names[k]: k for k in range(plan.n_inputs)}
    if not params:
        raise OptionError("parameters: name at least one graph input to train", field="parameters")
    for name, value in params.items():
        if name not in declared:
            what = "a node" if name in plan.index else "not in the graph"
            raise UnexpectedInputError(f"parameter '{name}' is {what}; parameters must be graph inputs",
                                       node=name, field="parameters")
        _check_value(plan, declared[name], value, f"initial.{name}")
        if not is_differentiable(np.asarray(value).dtype):
            raise DTypeError(f"parameter '{name}' has dtype {np.asarray(value).dtype.name}; only float inputs can be "
                             "trained", node=name, field=f"initial.{name}")
    sources = [("fixed_inputs", fixed)] + [(f"batches[{i}].inputs", b) for i, b in enumerate(batches)]
    for i, (where, feed) in enumerate(sources):
        if token is not None and i % 1024 == 0:
            token.check()
        for name, value in feed.items():
            if name not in declared:
                raise UnexpectedInputError(f"{where}.{name}: the graph declares no input '{name}'",
                                           node=name, field=f"{where}.{name}")
            if name in params:
                raise OptionError(f"{where}.{name}: '{name}' is a parameter; feed it only in initial",
                                 node=name, field=f"{where}.{name}")
            if where != "fixed_inputs" and name in fixed:
                raise OptionError(f"{where}.{name}: '{name}' is also in fixed_inputs; feed it in one place only",
                                 node=name, field=f"{where}.{name}")
            _check_value(plan, declared[name], value, f"{where}.{name}")
    for name in declared:
        if name in params or name in fixed:
            continue
        for i, batch in enumerate(batches or [{}]):
            if name not in batch:
                where = f"batches[{i}].inputs" if batches else "fixed_inputs"
                raise MissingInputError(f"input '{name}' is fed neither as a parameter, nor in fixed_inputs, "
                                        f"nor in {where}", node=name, field=f"{where}.{name}")
    return Feeds(list(params), [{**fixed, **b} for b in batches] or [dict(fixed)])


def _check_value(plan: Plan, slot: int, value: np.ndarray, field: str) -> None:
    name = plan.names[slot]
    array = np.asarray(value)
    dtype, shape = plan.input_dtypes[slot], plan.input_shapes[slot]
    if array.dtype != dtype:
        raise DTypeError(f"{field}: input '{name}' is declared {dtype.name}, got {array.dtype.name}",
                         node=name, field=field)
    if len(array.shape) != len(shape) or any(d not in (-1, n) for d, n in zip(shape, array.shape)):
        raise ShapeError(f"{field}: input '{name}' is declared with shape {list(shape)}, got {list(array.shape)}",
                         node=name, field=field)


def _loss_slot(plan: Plan, loss: str | None) -> int:
    if loss:
        return plan.slot(loss, field="loss")
    if len(plan.outputs) != 1:
        listed = ", ".join(plan.names[s] for s in plan.outputs)
        raise OutputError(f"loss: the graph has several outputs ({listed}); say which to minimize", field="loss")
    return plan.outputs[0]


def _check_loss_shapes(plan: Plan, out: int, params: Arrays, feeds: Feeds, token: StopToken | None) -> None:
    """Infer shapes for every batch (checking the limits) and that the loss is a float scalar."""
    for i, batch in enumerate(feeds.batches):
        if token is not None and i % 1024 == 0:
            token.check()
        inputs = {**batch, **params}
        shapes = plan.specialize([np.shape(inputs[plan.names[k]]) for k in range(plan.n_inputs)])
        spec = shapes.specs[out]
        if spec is not None and (spec.size != 1 or not is_differentiable(spec.dtype)):
            raise OutputError(f"loss: node '{plan.names[out]}' is {spec}; the loss must be a float scalar",
                              node=plan.names[out], field="loss")


def _diverged(loss: str, value: float, step: int, losses: list[float]) -> GraphError:
    before = f" (it was {losses[-1]:.6g} the step before)" if losses else ""
    return GraphError(
        f"loss '{loss}' is {value} at step {step}{before}: training diverged; lower the learning rate "
        "or check the data and initial values", node=loss, field="loss", reason="NONFINITE_LOSS",
    )
