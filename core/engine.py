"""Evaluate a Plan: the forward pass, then reverse-mode backpropagation.

Both passes are flat loops over slots: no recursion, no dictionary look-ups.
The forward pass keeps every value. The backward pass seeds the chosen output
and walks the slots in reverse, asking each operator's vjp for its inputs'
gradients and accumulating them with ``+`` where a value fans out.
"""
from __future__ import annotations

import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from .compile import Plan, Shapes, check_memory, with_request_path
from .cost import minimum_seconds
from .dtypes import is_differentiable
from .errors import (
    BadTensorError, CancelledError, ChainruleError, DeadlineError, DTypeError, MissingInputError,
    OperatorFailure, OptionError, OutputError, SeedError, ShapeError, UnexpectedInputError,
)
from . import parallel
from .limits import Limits
from .program import program_for
from .rule_checks import contract, failure, fit_grad, fit_value, miscounted, rule_error
from .tensor_spec import TensorSpec

UNREACHED_ZEROS = "zeros"
UNREACHED_OMIT = "omit"


class StopToken:
    """Tells the engine to stop between nodes: a deadline and/or a cancel event. A training run
    also stops, keeping what it trained, at its next step boundary once asked to wind down."""

    __slots__ = ("deadline", "event", "what", "winding_down")

    def __init__(self, deadline: float | None = None, event: threading.Event | None = None,
                 what: str = "the deadline") -> None:
        self.deadline = deadline  # time.monotonic() value
        self.event = event
        self.what = what  # which deadline, for the message: the client's, or a server limit
        self.winding_down = ""  # why a training run should stop at its next step boundary (a server shutdown)

    def wind_down(self, reason: str) -> None:
        """Ask a training run to stop at its next step boundary and end normally with what it trained,
        ``reason`` as its stop reason (nothing else changes: work between boundaries runs on)."""
        self.winding_down = reason

    @classmethod
    def after(cls, seconds: float | None, event: threading.Event | None = None,
              what: str = "the deadline") -> "StopToken":
        return cls(None if seconds is None else time.monotonic() + seconds, event, what)

    def check(self) -> None:
        if self.event is not None and self.event.is_set():
            raise CancelledError("the call was cancelled; work stopped")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DeadlineError(f"{self.what} passed; work stopped")


@dataclass
class ContributionRecord:
    """One consumer's share of a fanned-out node's gradient (the ``+=`` made visible)."""

    node: str
    consumer: str
    input_index: int
    gradient: Any


@dataclass
class Evaluation:
    """Values and gradients of every slot of a plan after one run.

    Each value or gradient is an ndarray, a numpy scalar, or (from a plan run on
    Python floats) a ``float``; ``np.asarray`` makes any of them an array, as
    :meth:`value` and :meth:`grad` do.
    """

    plan: Plan
    values: list[Any]
    grads: list[Any] | None
    output: int
    differentiable: list[bool]
    contributions: list[ContributionRecord] = field(default_factory=list)
    #: Values and gradients inside graph attributes that ``evaluate(inner=...)`` asked for, by their
    #: ``node/value`` name: one per step of the node, stacked along a new axis 0 (scan's body).
    inner_values: dict[str, Any] = field(default_factory=dict)
    inner_grads: dict[str, Any] = field(default_factory=dict)

    @property
    def output_name(self) -> str:
        return self.plan.names[self.output]

    @property
    def output_value(self) -> np.ndarray:
        return np.asarray(self.values[self.output])

    def value(self, name: str) -> np.ndarray:
        return np.asarray(self.values[self.plan.slot(name, field="name")])

    def grad(self, name: str) -> np.ndarray | None:
        """The gradient of the output with respect to ``name`` (None: no gradient)."""
        if self.grads is None:
            return None
        g = self.grads[self.plan.slot(name, field="name")]
        return None if g is None else np.asarray(g)


def evaluate(
    plan: Plan,
    inputs: Mapping[str, Any],
    *,
    output: str | None = None,
    seed: Any = None,
    gradients: bool = True,
    unreached: str = UNREACHED_ZEROS,
    contributions: bool = False,
    wrt: Iterable[str] | None = None,
    token: StopToken | None = None,
    before_work: Callable[[Shapes, int], int | None] | None = None,
    inner: Iterable[str] = (),
    keep: Iterable[str] | None = None,
    hold: Any = None,
) -> Evaluation:
    """Run forward, then (unless ``gradients=False``) backward from ``output``.

    ``seed`` is the gradient of the output with respect to itself; it may be
    left out only for an output with one element. Nodes that do not reach the
    output get zero gradients (``unreached="zeros"``) or none (``"omit"``).
    ``wrt`` names the nodes whose gradients are wanted (default: every node);
    gradients are then computed only along paths from them to the output,
    and other nodes get none. ``before_work(shapes, output_slot)`` runs once the
    inputs are checked and every shape is inferred, before anything is computed:
    a caller refuses a run there (the service: a response too large to send), or returns the bytes it
    will hold beside the run (the response it will build), counted with the run's own.
    ``inner`` names values inside graph attributes (``"rnn/h"``: the value ``h`` of scan ``rnn``'s
    body): their values at every step, and their gradients, come stacked in
    ``Evaluation.inner_values`` / ``inner_grads``. ``keep`` names the values the caller will read
    (the output's is always kept): the others' buffers may then be written over once their last
    reader has run (``OpDef.forward_into``), and ``Evaluation.values`` holds None for those.
    None (the default) keeps every value. The run's bytes are taken from ``plan.limits.ledger``
    before any work and given back when it ends; with ``hold`` (a core.limits.Hold) they are
    added to it instead, for the caller to give back once what it builds from the run (a
    response) is gone too.
    """
    try:
        return _checked_run(plan, inputs, output, seed, gradients, unreached, contributions, wrt, token, before_work,
                            inner, keep, hold)
    except ChainruleError as exc:  # an error's field becomes a path in the request (graph.nodes[4])
        raise with_request_path(exc, plan.request_index)


def _checked_run(plan: Plan, inputs: Mapping[str, Any], output: str | None, seed: Any, gradients: bool,
                 unreached: str, contributions: bool, wrt: Iterable[str] | None, token: StopToken | None,
                 before_work: Callable[[Shapes, int], int | None] | None, inner: Iterable[str],
                 keep: Iterable[str] | None, hold: Any) -> Evaluation:
    """evaluate(): the checks before any work, the memory held, then the run."""
    if unreached not in (UNREACHED_ZEROS, UNREACHED_OMIT):
        raise OptionError(f"unreached: expected 'zeros' or 'omit', got {unreached!r}", field="unreached")
    out_slot = output_slot(plan, output)
    arrays = checked_inputs(plan, inputs)
    shapes = plan.shapes_for(arrays)
    planned = shapes.value_bytes + (shapes.grad_bytes if gradients else 0) + shapes.workspace_bytes
    check_memory(plan.limits, planned, "values, gradients and workspace" if gradients else "values and workspace")
    if token is not None and token.deadline is not None:
        _check_time(plan, shapes, gradients, token)
    if before_work is not None:
        beside = before_work(shapes, out_slot)
        if beside:
            planned += beside
            check_memory(plan.limits, planned, "values, gradients, workspace and the response")
    own = hold is None
    if own:
        hold = plan.limits.ledger.hold(planned)  # refused while other calls hold too much of the budget
    else:
        hold.add(planned)
    try:
        return _evaluate(plan, arrays, shapes, out_slot, planned, hold, seed=seed, gradients=gradients,
                         unreached=unreached, contributions=contributions, wrt=wrt, token=token, inner=inner,
                         keep=keep)
    finally:
        if own:
            hold.release()


def _evaluate(plan: Plan, arrays: list[np.ndarray], shapes: Shapes, out_slot: int, planned: int, hold: Any, *,
              seed: Any, gradients: bool, unreached: str, contributions: bool, wrt: Iterable[str] | None,
              token: StopToken | None, inner: Iterable[str], keep: Iterable[str] | None) -> Evaluation:
    """evaluate() once its checks are done and its memory is held."""
    record: list[ContributionRecord] | None = [] if contributions else None
    wanted = None if wrt is None else plan.slots_of(wrt)
    watch: dict[int, dict[int, str]] = {}
    for name in inner:
        head, body, slot = plan.inner(name, field="inner")
        watch.setdefault(id(body), {})[slot] = name
        if wanted is not None:  # the node's vjp must run for its graph's gradients: want its inputs'
            wanted = wanted | frozenset(j for j in plan.in_slots[head] if shapes.differentiable[j])
    with np.errstate(all="ignore"):  # non-finite values are reported by diagnostics, not warnings
        floats = None
        if plan.float_forwards is not None and shapes.float_scalars and not watch:
            floats = _run_on_floats(plan, shapes, arrays, out_slot, seed, gradients, wanted, record, token)
        if floats is not None:
            values, grads = floats
            if grads is None:
                return Evaluation(plan, values, None, out_slot, shapes.differentiable)
        elif not watch and record is None and shapes.complete and (
                program := program_for(plan, shapes, out_slot, wanted, gradients, token)):
            # a small plan run before: its straight-line program (the same rules in the same order)
            outer = _current_run.set(RunContext(token, plan.limits, planned, keep_residuals=gradients, hold=hold))
            try:
                values, grads = program(arrays, lambda: _seed(plan, shapes, out_slot, seed), token)
            finally:
                _current_run.reset(outer)
            if grads is None:
                return Evaluation(plan, values, None, out_slot, shapes.differentiable)
        else:
            if record:
                record.clear()  # a run on floats that gave up part-way
            run = RunContext(token, plan.limits, planned, keep_residuals=gradients, watch=watch, hold=hold)
            if keep is not None and shapes.complete and not watch:
                run.reuse = _reusable(plan, keep, out_slot)
            if gradients and plan.residual_heads:  # residuals, as large as their node's values, counted before work
                run.allowance = _residual_allowance(plan, shapes)
                run.charge(sum(run.allowance.values()), what="values, gradients and residuals")
            values, saved = run_forward(plan, shapes, arrays, run)
            if not shapes.complete:
                shapes = completed(plan, values)
            if not gradients:
                _forget(values, run.overwritten)
                return Evaluation(plan, values, None, out_slot, shapes.differentiable,
                                  inner_values=run.inner_values)
            seed_array = _seed(plan, shapes, out_slot, seed)
            grads = run_backward(plan, shapes, shapes.edges_toward(wanted, plan.in_slots), values, saved,
                                 [(out_slot, seed_array)], run, record)
            _forget(values, run.overwritten)
    if unreached == UNREACHED_ZEROS:
        differentiable = shapes.differentiable
        for k in range(len(differentiable)) if wanted is None else wanted:
            if differentiable[k] and grads[k] is None:
                spec = shapes.specs[k]
                grads[k] = np.zeros(spec.shape, spec.dtype)  # type: ignore[union-attr]
    if watch:
        return Evaluation(plan, values, grads, out_slot, shapes.differentiable, record or [],
                          run.inner_values, run.inner_grads)
    return Evaluation(plan, values, grads, out_slot, shapes.differentiable, record or [])


def _reusable(plan: Plan, keep: Iterable[str], out_slot: int) -> list[int] | None:
    """``plan.into`` without the slots whose values the caller keeps; None when nothing is left."""
    kept = frozenset([out_slot, *(plan.slot(name, field="return_values") for name in keep)])
    return plan.reuse_for(kept)


def _forget(values: list[Any], overwritten: list[int] | None) -> None:
    """None for the values whose buffers later values were written over (nobody may read them)."""
    for j in overwritten or ():
        values[j] = None


def _check_time(plan: Plan, shapes: Shapes, gradients: bool, token: StopToken) -> None:
    """Refuse, before any work, a run whose least possible time exceeds what is left of the deadline."""
    left = token.deadline - time.monotonic()
    seconds, operations, nbytes = minimum_seconds(plan, shapes, gradients)
    if seconds > left:
        raise DeadlineError(
            f"this call needs at least {seconds:.3g} s ({operations:.3g} floating-point operations and {nbytes} bytes "
            f"of values{' and gradients' if gradients else ''}, at this server's best rates) and {token.what} "
            f"leaves {max(left, 0.0):.3g} s: refused before starting. Allow more time, or send less work")


def output_slot(plan: Plan, output: str | None) -> int:
    """The slot of the output to differentiate: ``output``, or the graph's only output."""
    if output:
        return plan.slot(output)
    if len(plan.outputs) != 1:
        listed = ", ".join(plan.names[s] for s in plan.outputs)
        raise OutputError(f"output: the graph has several outputs ({listed}); say which to differentiate", field="output")
    return plan.outputs[0]


def check_input_names(plan: Plan, names: Iterable[str]) -> None:
    """Refuse a name the graph does not declare (before anything is decoded or read for it)."""
    extra = sorted(set(names) - set(plan.names[: plan.n_inputs]))
    if extra:
        raise UnexpectedInputError(f"input '{extra[0]}' is not declared by the graph", node=extra[0], field=f"inputs.{extra[0]}")


def checked_inputs(plan: Plan, inputs: Mapping[str, Any]) -> list[np.ndarray]:
    """The inputs as arrays in slot order, each checked against its declaration (name, dtype, shape)."""
    if len(inputs) != plan.n_inputs:  # all declared names are looked up below: an extra one shows in the count
        check_input_names(plan, inputs)
    arrays = []
    names, dtypes, shapes = plan.names, plan.input_dtypes, plan.input_shapes
    for k in range(plan.n_inputs):
        name = names[k]
        value = inputs.get(name, _MISSING)
        if type(value) is np.ndarray:  # the common case: no conversion
            array = value
        elif value is _MISSING:
            check_input_names(plan, inputs)  # an undeclared name is the clearer error, when there is one
            raise MissingInputError(f"input '{name}' is declared by the graph but was not given", node=name, field=f"inputs.{name}")
        elif isinstance(value, (np.ndarray, np.generic)):
            array = np.asarray(value)
        else:
            raise BadTensorError(f"input '{name}': expected a numpy array, got {type(value).__name__}", node=name, field=f"inputs.{name}")
        declared_dtype, declared_shape = dtypes[k], shapes[k]
        if array.dtype != declared_dtype:
            raise DTypeError(f"input '{name}': declared {declared_dtype.name}, got {array.dtype.name}", node=name, field=f"inputs.{name}")
        shape = array.shape
        if shape != declared_shape and (len(shape) != len(declared_shape)
                                        or any(d not in (-1, n) for d, n in zip(declared_shape, shape))):
            raise ShapeError(f"input '{name}': declared shape {list(declared_shape)}, got {list(shape)}", node=name, field=f"inputs.{name}")
        arrays.append(array)
    return arrays


_MISSING = object()


class RunContext:
    """What one evaluation shares with the graphs run inside it (scan's body, step by step):
    the stop token and the memory budget, charged as residuals and values without an infer
    rule appear, so a nested run cannot exceed what the whole call may hold."""

    __slots__ = ("token", "limits", "charged", "keep_residuals", "watch", "inner_values", "inner_grads", "reuse",
                 "overwritten", "allowance", "hold")

    def __init__(self, token: StopToken | None, limits: Any, planned: int, keep_residuals: bool = True,
                 watch: dict[int, dict[int, str]] | None = None, hold: Any = None) -> None:
        self.token = token
        self.limits = limits
        self.charged = planned  # bytes: the plan's values (and gradients, workspace), known before the run
        #: What the evaluation holds in its Limits' ledger (core.limits.Hold): charges add to it.
        self.hold = hold
        #: False when no backward pass follows: residuals are dropped as they come (and not charged).
        self.keep_residuals = keep_residuals
        #: Values inside graph attributes to collect: id(the attribute's plan) -> {slot: "node/value"}.
        self.watch = watch or {}
        #: What was collected, by "node/value": stacked over the node's steps.
        self.inner_values: dict[str, Any] = {}
        self.inner_grads: dict[str, Any] = {}
        #: Per slot of the outer plan: the input whose buffer its value may be written into (-1:
        #: none), or None for no reuse at all (see evaluate's ``keep``).
        self.reuse: list[int] | None = None
        #: The slots whose buffers were written over.
        self.overwritten: list[int] | None = None
        #: Per slot of the outer plan whose operator has residuals: the bytes already charged for
        #: them before the run (only more than that is charged as they appear).
        self.allowance: dict[int, int] | None = None

    def charge(self, nbytes: int, node: str | None = None, op: str | None = None, what: str = "values and gradients") -> None:
        """Count ``nbytes`` more against the memory budget, or raise LimitExceeded naming the node."""
        self.charged += nbytes
        check_memory(self.limits, self.charged, what, node=node, op=op)
        if self.hold is not None:
            self.hold.add(nbytes)

    def check(self) -> None:
        if self.token is not None:
            self.token.check()


_NO_LIMITS = Limits()
_current_run: ContextVar[RunContext | None] = ContextVar("chainrule_run", default=None)


def current_run() -> RunContext:
    """The RunContext of the evaluation whose operator is running (one without limits outside any)."""
    run = _current_run.get()
    return run if run is not None else RunContext(None, _NO_LIMITS, 0)


def running_rules() -> bool:
    """Whether an evaluation's rules are running now, in this thread: they run under
    ``np.errstate(all="ignore")``, so a rule need not pay for an errstate of its own (about 1.3 us,
    the price of a small sigmoid's arithmetic) to keep an overflow quiet."""
    return _current_run.get() is not None


def completed(plan: Plan, values: list[Any]) -> Shapes:
    """Shapes read off the values of a run whose plan lacked some infer rules."""
    return Shapes([TensorSpec.of(np.asarray(v)) for v in values], plan.in_slots, plan.n_inputs, plan.head_of,
                  plan.unpacked)


def run_forward(plan: Plan, shapes: Shapes, arrays: list[Any], run: RunContext) -> tuple[list[Any], list[Any] | None]:
    """The forward pass: every slot's value, and the residuals operators saved (None when none did)."""
    outer = _current_run.set(run)
    try:
        return _forward(plan, shapes, arrays, run)
    finally:
        _current_run.reset(outer)


def _forward(plan: Plan, shapes: Shapes, arrays: list[Any], run: RunContext) -> tuple[list[Any], list[Any] | None]:
    forwards, ins, attrs = plan.forwards, plan.in_slots, plan.attrs
    shape_of, dtype_of, scalar_type = shapes.result_shape, shapes.dtype_of, shapes.result_scalar
    ndarray = np.ndarray
    token = run.token
    values: list[Any] = arrays + [None] * (len(ins) - plan.n_inputs)
    saved: list[Any] | None = None
    reuse, allowance = run.reuse, run.allowance
    run.allowance = None  # for this plan only, not for graphs run inside its operators
    chunked = _split(plan, shapes, token)
    large = _large(plan, shapes) if token is not None else ()
    if reuse is not None:
        run.reuse = None
        run.overwritten = []
    for k in range(plan.n_inputs, len(ins)):
        if token is not None and (not k & 7 or k in large):  # every 8th node (a check costs as much as a
            token.check()                                     # scalar op), and before every large one
        s = ins[k]
        try:
            if chunked is not None and k in chunked:  # a large elementwise node: in blocks, on every intra-op
                j = reuse[k] if reuse is not None else -1  # thread, stop checks between blocks
                if j >= 0 and _fits(values[j], shape_of[k], dtype_of[k]):
                    run.overwritten.append(j)
                    out = values[j]
                else:
                    out = _touched(np.empty(shape_of[k], dtype_of[k]))
                v = _forward_in_blocks(plan.ops[k].forward_into, out, [values[i] for i in s], attrs[k], token)
            elif reuse is not None and reuse[k] >= 0 and _fits(values[reuse[k]], shape_of[k], dtype_of[k]):
                j = reuse[k]  # write over j's buffer: no rule reads it again (compile._dead_after_reading)
                v = plan.ops[k].forward_into(values[j], *[values[i] for i in s], **attrs[k])
                run.overwritten.append(j)
            elif len(s) == 2:
                v = forwards[k](values[s[0]], values[s[1]], **attrs[k])
            elif len(s) == 1:
                v = forwards[k](values[s[0]], **attrs[k])
            elif forwards[k] is None:  # a later value of a several-output node: its head filled it
                continue
            else:
                v = forwards[k](*[values[j] for j in s], **attrs[k])
        except Exception as exc:
            raise rule_error(plan, k, "forward", exc)
        if (v.shape != shape_of[k] or v.dtype != dtype_of[k]) if type(v) is ndarray else type(v) is not scalar_type[k]:
            if plan.unpacked[k]:
                if saved is None:
                    saved = [None] * len(ins)
                v = _unpack(plan, shapes, k, v, values, saved, run, allowance.get(k, 0) if allowance else 0)
            else:
                v = fit_value(plan, k, v, shapes.specs[k])
                if shapes.specs[k] is None:  # no infer rule: charge the memory budget as values appear
                    run.charge(v.nbytes * 2, plan.node_names[k], plan.ops[k].name)
        values[k] = v
    return values, saved


#: Elementwise nodes with at least this many elements run in blocks of BLOCK_ELEMENTS when a stop
#: token is given: one pass of a costly ufunc (pow, tanh) over 36 million values takes a second,
#: which no check between nodes could interrupt; a block takes milliseconds.
BLOCKED_MIN_ELEMENTS = 1 << 22
BLOCK_ELEMENTS = 1 << 20

#: Elementwise nodes with at least this many elements run their forward on every intra-op thread
#: (core/parallel.py), when there are several: a pass over 2 MiB of float64 takes 0.1 ms or more,
#: and handing half of it to another thread about 0.03.
PARALLEL_MIN_ELEMENTS = 1 << 18
#: The least a block holds when a node is cut for threads, and about how many blocks each thread gets.
MIN_SHARE_ELEMENTS = 1 << 15
BLOCKS_PER_THREAD = 4


#: Nodes whose value has at least this many elements get a stop check of their own (others one
#: every eighth node): seven such nodes in a row could run a second or more past a deadline.
CHECKED_MIN_ELEMENTS = 1 << 20


def _large(plan: Plan, shapes: Shapes) -> frozenset[int]:
    """The slots of ``shapes`` with at least CHECKED_MIN_ELEMENTS elements (cached on it)."""
    found = shapes.large
    if found is None:
        found = frozenset(k for k, spec in enumerate(shapes.specs)
                          if spec is not None and spec.size >= CHECKED_MIN_ELEMENTS)
        shapes.large = found
    return found


def _least_split(token: StopToken | None) -> int | None:
    """The fewest elements of a node run in blocks: on every intra-op thread when there are several,
    and with stop checks between blocks when a token is given; None: no node is."""
    least = PARALLEL_MIN_ELEMENTS if parallel.threads() > 1 else None
    if token is not None:
        least = BLOCKED_MIN_ELEMENTS if least is None else min(least, BLOCKED_MIN_ELEMENTS)
    return least


def _split(plan: Plan, shapes: Shapes, token: StopToken | None) -> frozenset[int] | None:
    """The nodes whose forward runs in blocks (see _least_split); None when there are none."""
    least = _least_split(token)
    return None if least is None else _chunked(plan, shapes, least)


def _split_vjps(plan: Plan, shapes: Shapes, token: StopToken | None) -> frozenset[int] | None:
    """The nodes whose vjp runs through ``vjp_into`` in blocks (the nodes _split cuts whose operator has
    one and whose inputs share the node's dtype), cached on ``shapes``; None when there are none."""
    least = _least_split(token)
    if least is None:
        return None
    key = ("vjp_into", least)
    found = shapes.chunked.get(key)
    if found is None:
        specs = shapes.specs
        found = frozenset(k for k in _chunked(plan, shapes, least) or ()
                          if plan.ops[k].vjp_into is not None
                          and all(specs[j].dtype == specs[k].dtype for j in plan.in_slots[k]))
        shapes.chunked[key] = found
    return found or None


def _chunked(plan: Plan, shapes: Shapes, minimum: int = BLOCKED_MIN_ELEMENTS) -> frozenset[int] | None:
    """The nodes of ``shapes`` that may run in blocks (cached on it per ``minimum``), None when there
    are none: those with ``forward_into`` (elementwise) and a float result of at least ``minimum``
    elements whose inputs all have the result's shape."""
    found = shapes.chunked.get(minimum)
    if found is None:
        specs = shapes.specs
        found = frozenset(
            k for k in range(plan.n_inputs, len(plan.names))
            if plan.ops[k] is not None and plan.ops[k].forward_into is not None and specs[k] is not None
            and specs[k].size >= minimum and specs[k].dtype.kind == "f" and specs[k].shape
            and all(specs[j] is not None and specs[j].shape == specs[k].shape for j in plan.in_slots[k]))
        shapes.chunked[minimum] = found
    return found or None


def _blocks(shape: tuple[int, ...], threads: int = 1) -> list[tuple[slice, ...]]:
    """Index tuples cutting ``shape`` along its first axis longer than 1 into blocks of at most
    BLOCK_ELEMENTS elements (at least one row each), and with several ``threads`` into about
    BLOCKS_PER_THREAD blocks per thread where that axis is long enough (but none under
    MIN_SHARE_ELEMENTS then: a rule may pick its method by size, erf below 1,025 elements, and a
    block must take the whole array's)."""
    axis = next((i for i, n in enumerate(shape) if n > 1), 0)
    rows = shape[axis]
    per_row = max(1, int(np.prod(shape[axis + 1:], dtype=np.int64)))
    # about BLOCKS_PER_THREAD blocks for each thread (a thread that gets no core leaves its blocks to
    # the others), none under MIN_SHARE_ELEMENTS
    shared = max(-(-rows // (threads * BLOCKS_PER_THREAD)), -(-MIN_SHARE_ELEMENTS // per_row)) if threads > 1 else rows
    step = max(1, min(BLOCK_ELEMENTS // per_row, shared))
    lead = (slice(None),) * axis  # (the axes before it have length 1)
    return [(*lead, slice(start, min(start + step, rows))) for start in range(0, rows, step)]


#: Bytes of a memory page (4 KiB on the platforms numpy runs on; a larger page is touched more than once).
PAGE_BYTES = 4096


def _touched(array: np.ndarray) -> np.ndarray:
    """``array`` (fresh from np.empty) with every page written once, by this thread: the kernel
    gives a new page its memory at the first write (a fault, and 4 KiB zeroed), and faults of
    several threads in one process wait on each other. Written here one byte a page, before the
    blocks are shared out, they cost what they cost one thread (none when malloc reused the
    memory: a strided write of a byte a page); shared out, the sigmoid sum at 10^6 took 20 ms on
    two threads against 11 on one."""
    if array.nbytes >= PAGE_BYTES:
        array.reshape(-1).view(np.uint8)[::PAGE_BYTES] = 0
    return array


def _forward_in_blocks(into: Callable[..., Any], out: np.ndarray, inputs: list[Any], attrs: dict[str, Any],
                       token: StopToken | None) -> np.ndarray:
    """An elementwise forward written into ``out`` block by block, the blocks shared out over the
    intra-op threads (the same bits as in one pass)."""
    def write(block: tuple[slice, ...]) -> None:
        into(out[block], *[x[block] for x in inputs], **attrs)

    parallel.run_shares(write, _blocks(out.shape, parallel.threads()), None if token is None else token.check)
    return out


def _vjp_into_blocks(into: Callable[..., Any], edges: tuple[tuple[int, int], ...], g: Any, out: np.ndarray,
                     inputs: list[Any], attrs: dict[str, Any], token: StopToken | None) -> list[Any]:
    """An elementwise vjp written by its ``vjp_into`` into fresh gradients, one for each input an edge
    wants, block by block, the blocks shared out over the intra-op threads (the same bits as vjp's)."""
    wanted = {pos for pos, _ in edges}
    grads = [_touched(np.empty(out.shape, out.dtype)) if pos in wanted else None for pos in range(len(inputs))]

    def write(block: tuple[slice, ...]) -> None:
        into([None if d is None else d[block] for d in grads], g[block], out[block], *[x[block] for x in inputs],
             **attrs)

    parallel.run_shares(write, _blocks(out.shape, parallel.threads()), None if token is None else token.check)
    return grads


def _vjp_in_blocks(vjp: Callable[..., Any], g: Any, out: Any, inputs: list[Any], attrs: dict[str, Any],
                   token: StopToken) -> list[Any]:
    """An elementwise vjp run block by block into full-size gradients (the same bits as in one pass)."""
    parts: list[Any] = [None] * len(inputs)
    for block in _blocks(out.shape):
        token.check()
        pieces = vjp(g[block], out[block], *[x[block] for x in inputs], **attrs)
        for pos, piece in enumerate(pieces):
            if piece is None:
                continue
            if parts[pos] is None:
                parts[pos] = np.empty(out.shape, np.result_type(piece))
            parts[pos][block] = piece
    return parts


#: Smallest buffer worth writing over: below it, numpy's cache of small blocks makes a fresh
#: array cheap and the ``out=`` call costs more than it saves.
REUSE_MIN_ELEMENTS = 1 << 14


def _fits(buffer: Any, shape: tuple[int, ...], dtype: np.dtype) -> bool:
    """Whether ``buffer`` can take a result of ``shape`` and ``dtype``: a large float array of
    them that owns its memory (not a view of another value) and may be written."""
    return (type(buffer) is np.ndarray and buffer.size >= REUSE_MIN_ELEMENTS and buffer.shape == shape
            and buffer.dtype == dtype and dtype.kind == "f" and buffer.base is None and buffer.flags.writeable)


def _residual_allowance(plan: Plan, shapes: Shapes) -> dict[int, int]:
    """Bytes to count for the residuals of each node that keeps some, before any work: as many as
    the node's own values (what layer_norm, log_softmax and gelu keep), 0 for values without a spec."""
    allowance = {}
    for k in plan.residual_heads:
        specs = shapes.specs[k:k + plan.n_out[k]]
        allowance[k] = sum(spec.nbytes for spec in specs if spec is not None)
    return allowance


def _unpack(plan: Plan, shapes: Shapes, k: int, result: Any, values: list[Any], saved: list[Any],
            run: RunContext, allowance: int = 0) -> Any:
    """Take apart what the forward rule of a node with residuals or several values returned:
    keep the residuals (charged to the memory budget beyond the ``allowance`` counted before
    the run), put the later values in their slots, and return the first value, each checked
    against its spec."""
    op, node = plan.ops[k], plan.node_names[k]
    if op.residuals:
        if not isinstance(result, tuple) or len(result) != 2:
            raise contract(op, node, f"forward returned {type(result).__name__}, expected (result, saved) "
                                      f"(the operator declares residuals)")
        result, residuals = result
        if run.keep_residuals:
            saved[k] = residuals
            beyond = _nbytes(residuals) - allowance
            if beyond > 0:
                run.charge(beyond, node, op.name, "values, gradients and residuals")
    count = plan.n_out[k]
    if not op.several:
        results = [result]
    elif isinstance(result, (tuple, list)) and len(result) == count:
        results = list(result)
    else:
        raise contract(op, node, f"forward returned {type(result).__name__}, expected a tuple of {count} values")
    for j, value in enumerate(results):
        spec = shapes.specs[k + j]
        fitted = fit_value(plan, k + j, value, spec)
        if spec is None:  # no infer rule: charge the memory budget as values appear
            run.charge(fitted.nbytes * 2, node, op.name)
        values[k + j] = fitted
    return values[k]


def _nbytes(saved: Any) -> int:
    """Bytes held by residuals: the arrays in ``saved`` (a tuple, list or one array), walked without recursion."""
    total, pending = 0, [saved]
    while pending:
        item = pending.pop()
        if isinstance(item, np.ndarray):
            total += item.nbytes
        elif isinstance(item, (tuple, list)):
            pending.extend(item)
    return total


def _run_on_floats(
    plan: Plan, shapes: Shapes, arrays: list[np.ndarray], out_slot: int, seed: Any, gradients: bool,
    wanted: frozenset[int] | None, record: list[ContributionRecord] | None, token: StopToken | None,
) -> tuple[list[Any], list[Any] | None] | None:
    """Forward and backward of a plan whose values are all float64 scalars, on Python floats.

    The same walk as :func:`_forward` and :func:`_backward` with each operator's
    ``OpDef.scalar`` rules: a float operation costs a tenth of numpy's on a 0-d
    value, so a scalar chain runs several times faster. Values and gradients stay
    Python floats (boxing each as a numpy scalar would cost 50 ns a slot);
    ``Evaluation`` says so, and ``np.asarray`` of one is the 0-d float64 value. ``math``'s functions may differ
    from numpy's in the last bit (tanh, exp, log). None when a rule raised an
    ArithmeticError or ValueError (``1 / 0.0``, ``math.log(-1.0)``, an overflow)
    where numpy gives inf or nan: the caller then runs the plan with numpy.
    """
    forwards, vjps, ins, attrs = plan.float_forwards, plan.float_vjps, plan.in_slots, plan.attrs
    values: list[Any] = [float(a) for a in arrays] + [None] * (len(ins) - plan.n_inputs)
    k = plan.n_inputs
    try:
        for k in range(plan.n_inputs, len(ins)):
            if token is not None and not k & 7:
                token.check()
            s = ins[k]
            if len(s) == 2:
                v = forwards[k](values[s[0]], values[s[1]], **attrs[k])
            elif len(s) == 1:
                v = forwards[k](values[s[0]], **attrs[k])
            else:
                v = forwards[k](*[values[j] for j in s], **attrs[k])
            if type(v) is not float:
                raise contract(plan.ops[k], plan.names[k], f"scalar forward returned {type(v).__name__}, not float")
            values[k] = v
        if not gradients:
            return values, None
        seed_value = float(_seed(plan, shapes, out_slot, seed))
        edges = shapes.edges_toward(wanted, plan.in_slots)
        grads: list[Any] = [None] * len(ins)
        grads[out_slot] = seed_value
        for k in range(out_slot, plan.n_inputs - 1, -1):
            g = grads[k]
            if g is None or not edges[k]:
                continue
            if token is not None and not k & 7:
                token.check()
            s = ins[k]
            if len(s) == 2:
                parts = vjps[k](g, values[k], values[s[0]], values[s[1]], **attrs[k])
            elif len(s) == 1:
                parts = vjps[k](g, values[k], values[s[0]], **attrs[k])
            else:
                parts = vjps[k](g, values[k], *[values[j] for j in s], **attrs[k])
            for pos, j in edges[k]:
                gj = parts[pos]
                if gj is None:
                    continue
                if type(gj) is not float:
                    raise contract(plan.ops[k], plan.names[k], f"scalar vjp gave {type(gj).__name__}, not float")
                if record is not None and plan.consumers[j] > 1:
                    record.append(ContributionRecord(plan.names[j], plan.names[k], pos, np.float64(gj)))
                current = grads[j]
                grads[j] = gj if current is None else current + gj
    except (ArithmeticError, ValueError):
        return None  # where numpy gives inf or nan: run numpy instead
    except (OperatorFailure, ChainruleError):
        raise
    except Exception as exc:
        raise failure(plan.ops[k], plan.names[k], "scalar rule", exc) from exc
    return values, grads




def _seed(plan: Plan, shapes: Shapes, out_slot: int, seed: Any) -> np.ndarray:
    spec = shapes.specs[out_slot]  # complete: unknown specs were filled from the values
    name = plan.names[out_slot]
    if not is_differentiable(spec.dtype):
        raise OutputError(f"output '{name}' has dtype {spec.dtype.name}, which has no gradient", node=name, field="output")
    if seed is None:
        if spec.size != 1:
            raise SeedError(
                f"the output '{name}' has shape {list(spec.shape)}: pass seed= (the gradient of the output with "
                f"respect to itself: an array of shape {list(spec.shape)}; all ones differentiate the sum of its "
                "elements), or grads=\"none\" to run forward only",
                node=name, field="seed",
            )
        return np.ones(spec.shape, spec.dtype)
    seed = np.asarray(seed)
    if seed.shape != spec.shape:
        raise ShapeError(f"seed: shape {list(seed.shape)} does not match output '{name}' of shape {list(spec.shape)}",
                         node=name, field="seed", reason="SHAPE_MISMATCH")
    if seed.dtype.kind not in "fiu":
        raise DTypeError(f"seed: dtype {seed.dtype.name} is not numeric", node=name, field="seed")
    return np.array(seed, dtype=spec.dtype, copy=True)


def run_backward(
    plan: Plan, shapes: Shapes, edges: list[tuple[tuple[int, int], ...]], values: list[Any], saved: list[Any] | None,
    seeds: list[tuple[int, Any]], run: RunContext, record: list[ContributionRecord] | None = None,
) -> list[Any]:
    """The backward pass from ``seeds`` (slot, gradient) pairs: every slot's gradient (None where none
    reached). Residuals in ``saved`` are dropped as their vjps finish."""
    outer = _current_run.set(run)
    try:
        return _backward(plan, shapes, edges, values, saved, seeds, run.token, record)
    finally:
        _current_run.reset(outer)


def _backward(
    plan: Plan, shapes: Shapes, edges: list[tuple[tuple[int, int], ...]], values: list[Any], saved: list[Any] | None,
    seeds: list[tuple[int, Any]], token: StopToken | None, record: list[ContributionRecord] | None,
) -> list[Any]:
    """Reverse-mode pass: each slot's gradient, from the seeded slots back to the inputs.

    The readable model is ``evaluate`` in tests/reference.py (about 30 lines):
    walk the nodes in reverse order, ask each one's vjp for its inputs'
    gradients, unbroadcast each to its input's shape and add it into that
    input's gradient (``+=`` where a value fans out). This loop computes the
    same thing, and tests/test_reference.py checks it on random graphs. What
    it adds, each marked below: no gradient yet is None rather than zeros
    (nothing is allocated for a slot that does not reach the output); only the
    ``edges`` (differentiable inputs, pruned to ``wrt=``) are followed;
    arity fast paths; selective vjp, residuals and several-output nodes
    (``_general_vjp``); contract checks and unbroadcasting only
    when a shape or type differs; the contribution log; and buffer ownership,
    so a sum is added in place only into an array this loop allocated.
    """
    vjps, general, ins, attrs, n_out = plan.vjps, plan.general, plan.in_slots, plan.attrs, plan.n_out
    plain_selective = plan.plain_selective
    shape_of, dtype_of, scalar_type = shapes.shape_of, shapes.dtype_of, shapes.scalar_type
    ndarray = np.ndarray
    grads: list[Any] = [None] * len(ins)
    owned = [False] * len(ins)  # True where grads[j] is a buffer we allocated and may add into
    split = _split_vjps(plan, shapes, token)  # vjps written into gradients in blocks, on every intra-op thread
    chunked = _chunked(plan, shapes) if token is not None else None  # other vjps: in blocks for stop checks
    large = _large(plan, shapes) if token is not None else ()
    for slot, seed in seeds:  # several seeds (a body's outputs) may name one slot: add them
        grads[slot] = seed if grads[slot] is None else grads[slot] + seed
    start = max(slot for slot, _ in seeds)
    for k in range(start, plan.n_inputs - 1, -1):  # slots after the last seed cannot reach it
        g = grads[k]
        if (g is None and n_out[k] < 2) or not edges[k]:  # skip: no gradient reached k, or no input wants one
            continue
        if token is not None and (not k & 7 or k in large):  # every 8th node, and before every large one
            token.check()
        s = ins[k]
        try:
            if split is not None and k in split:  # a large elementwise node: its vjp_into in blocks, on threads
                parts = _vjp_into_blocks(plan.ops[k].vjp_into, edges[k], g, values[k], [values[j] for j in s],
                                         attrs[k], token)
            elif chunked is not None and k in chunked:  # one large elementwise node: in blocks, stop checks between
                parts = _vjp_in_blocks(vjps[k], g, values[k], [values[j] for j in s], attrs[k], token)
            elif general[k]:  # selective vjp, residuals, several values
                if plain_selective[k]:  # selective only (matmul): tell the rule which gradients are wanted
                    needed = {pos for pos, _ in edges[k]}
                    parts = vjps[k](g, values[k], *[values[j] for j in s],
                                    needs=tuple(pos in needed for pos in range(len(s))), **attrs[k])
                else:  # residuals or several values: the slower general call
                    parts = _general_vjp(plan, k, grads, values, saved, edges[k])
                    if parts is None:  # none of the node's values got a gradient
                        continue
            elif len(s) == 2:  # arity fast paths: no list built for one or two inputs
                parts = vjps[k](g, values[k], values[s[0]], values[s[1]], **attrs[k])
            elif len(s) == 1:
                parts = vjps[k](g, values[k], values[s[0]], **attrs[k])
            else:
                parts = vjps[k](g, values[k], *[values[j] for j in s], **attrs[k])
            if len(parts) != len(s):  # contract check: one gradient (or None) per input
                raise miscounted(plan, k, len(parts))
        except Exception as exc:
            raise rule_error(plan, k, "vjp", exc)
        for pos, j in edges[k]:  # input pos of k is slot j
            gj = parts[pos]
            if gj is None:  # the rule gives this input no gradient
                continue
            # unbroadcast and contract check, only when the shape, dtype or scalar type is off
            t = type(gj)
            if t is ndarray:
                if gj.shape != shape_of[j] or gj.dtype != dtype_of[j]:
                    gj = fit_grad(plan, k, pos, gj, shapes.specs[j])
            elif t is not scalar_type[j]:
                gj = fit_grad(plan, k, pos, gj, shapes.specs[j])
            if record is not None and plan.consumers[j] > 1:  # contribution log: the += made visible
                record.append(ContributionRecord(plan.names[j], plan.node_names[k], pos, gj))
            # grads[j] += gj, with buffer ownership: the first contribution is kept as given (no
            # copy; it may alias a rule's array or a read-only view), the second is added into a
            # fresh array, and later ones go into that array in place
            current = grads[j]
            if current is None:
                grads[j] = gj
            elif owned[j]:
                np.add(current, gj, out=current)
            else:
                total = current + gj
                grads[j] = total
                owned[j] = type(total) is ndarray
    return grads


def _general_vjp(plan: Plan, k: int, grads: list[Any], values: list[Any], saved: list[Any] | None,
                 edges: tuple[tuple[int, int], ...]) -> Any:
    """Call the vjp of a node that is selective, has residuals or has several values; None when
    none of its values got a gradient. Its residuals are dropped once the vjp has run."""
    s, count = plan.in_slots[k], plan.n_out[k]
    keywords = dict(plan.attrs[k])
    if plan.selective[k]:  # tell the rule which inputs' gradients are wanted
        needed = {pos for pos, _ in edges}
        keywords["needs"] = tuple(pos in needed for pos in range(len(s)))
    if plan.residual[k]:
        keywords["saved"] = None if saved is None else saved[k]
    if plan.several[k]:
        g = tuple(grads[k:k + count])
        if all(part is None for part in g):
            return None
        out = tuple(values[k:k + count])
    else:
        g, out = grads[k], values[k]
    parts = plan.vjps[k](g, out, *[values[j] for j in s], **keywords)
    if saved is not None:
        saved[k] = None  # the residuals' last reader has run
    return parts
