"""The service's domain logic: protobuf requests in, protobuf responses out.

No gRPC here, and no choice of transport: the gRPC servicer
(``chainrule.server.servicer``) and the in-process ``LocalClient`` both call
this class, each handing it the :class:`~chainrule.wire.outgoing.Carrier` its
transport needs, so both give identical results. Errors are raised as typed
ChainruleErrors; ``chainrule.wire.status`` maps them to gRPC statuses.
"""
from __future__ import annotations

import hashlib
import os
import threading
import weakref
from collections import OrderedDict
from typing import Iterable, Sequence

import numpy as np

from chainrule.core import GraphIR, Limits, OpDef, Plan, StopToken, compile_graph
from chainrule.core.compile import Shapes
from chainrule.core.diagnostics import DiagnosticReport, diagnose
from chainrule.core.engine import (
    UNREACHED_OMIT, UNREACHED_ZEROS, Evaluation, check_input_names,
)
from chainrule.core.engine import evaluate as evaluate_plan
from chainrule.core.errors import GraphError, LimitExceeded, OptionError, SharedMemoryUnavailable, UnknownGraphError
from chainrule.core.limits import Hold
from chainrule.core.operator import described_inputs
from chainrule.core.symbolic import derive_forward, derive_reverse, plan_to_graph
from chainrule.plugins.manager import Loaded, chainrule_version
from chainrule.v1 import chainrule_pb2 as pb
from chainrule.wire.convert import (
    NUMPY_TO_DTYPE, array_to_tensor, graph_from_proto, graph_to_proto, inputs_from_proto, plain_array, python_to_attr,
    tensor_to_array,
)
from chainrule.wire.incoming import Incoming
from chainrule.wire.outgoing import Carrier, Outgoing
from chainrule.wire.shared_memory import SharedMemoryDir, TensorFile, check_total

from .requirements import check_requirements


def graph_id(graph: pb.Graph) -> str:
    """Content hash of a graph: the same graph gets the same id on every replica."""
    return hashlib.sha256(graph.SerializeToString(deterministic=True)).hexdigest()


class ChainruleService:
    """Evaluate graphs with the operators of ``loaded``, within ``limits``."""

    def __init__(self, loaded: Loaded, limits: Limits | None = None, *, graph_cache_size: int = 256,
                 checks: dict[str, int] | None = None, refused: Sequence[OpDef] = (),
                 shared_memory_dir: str = "") -> None:
        self.loaded = loaded
        #: Where same-host clients exchange large tensors with us (None: not accepted; see shared_memory.py).
        self.shared_memory = SharedMemoryDir(shared_memory_dir, create=True) if shared_memory_dir else None
        self.registry = loaded.registry
        self.limits = limits or Limits()
        self.checks = checks or {}
        #: Operators the start-up gradient check refused: listed as CHECK_FAILED, never served.
        self.refused = tuple(refused)
        self._plans: OrderedDict[str, Plan] = OrderedDict()
        self._plan_bytes: dict[str, int] = {}
        self._cache_size = graph_cache_size
        #: Bytes the cached plans may hold in all (their literal tensors and per-node lists, estimated).
        self._cache_bytes_budget = self.limits.max_memory_bytes
        self._lock = threading.Lock()
        #: Per plan: what each selection asks of it (see asked()); dropped with the plan.
        self._asked: weakref.WeakKeyDictionary[Plan, dict[tuple, Asked]] = weakref.WeakKeyDictionary()

    # --- graphs -------------------------------------------------------------------

    def compile(self, graph: pb.Graph, token: StopToken | None = None) -> tuple[str, Plan]:
        """Compile (or fetch from the cache) a graph message; returns its id and plan. ``token``
        stops a long compile (a million nodes take seconds) with its call's deadline."""
        gid = graph_id(graph)
        plan = self._cached(gid)
        if plan is None:
            stop = None if token is None else token.check
            core_graph = graph_from_proto(graph, max_elements=self.limits.max_tensor_elements, stop=stop)
            # Pins first: a graph needing a missing plugin is FAILED_PRECONDITION, not "unknown operator".
            self._check_requirements(core_graph)
            plan = compile_graph(core_graph, self.registry, self.limits, stop=stop)
            size = plan_bytes(plan)
            with self._lock:
                self._plans[gid] = plan
                self._plan_bytes[gid] = size
                while len(self._plans) > 1 and (len(self._plans) > self._cache_size
                                                or sum(self._plan_bytes.values()) > self._cache_bytes_budget):
                    evicted, _ = self._plans.popitem(last=False)  # least recently used first
                    del self._plan_bytes[evicted]
        return gid, plan

    def _cached(self, gid: str) -> Plan | None:
        with self._lock:
            plan = self._plans.get(gid)
            if plan is not None:
                self._plans.move_to_end(gid)
            return plan

    def _check_requirements(self, graph: GraphIR) -> None:
        """Version pins in graph metadata (see requirements.py)."""
        check_requirements(graph.metadata, self.loaded)

    def register_graph(self, request: pb.RegisterGraphRequest) -> pb.RegisterGraphResponse:
        """Compile and cache a graph; its id is the content hash, the same on every replica.
        ``node_count`` counts operator nodes, not the declared inputs."""
        gid, plan = self.compile(request.graph)
        # Operator nodes only, as the proto says and as max_nodes counts them: what the graph's `nodes` holds.
        return pb.RegisterGraphResponse(graph_id=gid, node_count=len(plan) - plan.n_inputs)

    def plan_for(self, request: pb.EvaluateRequest, token: StopToken | None = None) -> tuple[str, Plan]:
        """The id and plan a request names: its graph (compiled, or from the cache) or a registered id."""
        source = request.WhichOneof("source")
        if source == "graph_id":
            plan = self._cached(request.graph_id)
            if plan is None:
                raise UnknownGraphError(
                    f"graph id '{request.graph_id[:16]}' is not registered on this server; register the graph again",
                    field="graph_id",
                )
            return request.graph_id, plan
        if source == "graph":
            return self.compile(request.graph, token)
        raise GraphError("request has neither a graph nor a graph_id", field="graph")

    # --- evaluation -----------------------------------------------------------------

    def evaluate(self, request: Incoming | pb.EvaluateRequest, token: StopToken | None = None,
                 carrier: Carrier | None = None, hold: Hold | None = None) -> Outgoing:
        """One Evaluate call. Large input tensors may come as views of received bytes (see
        chainrule.wire.incoming); the response's large tensors travel as ``carrier`` decides
        (the caller's choice of transport; by default all inside the message). With ``hold`` (of
        ``self.limits.ledger``) the run's memory and its response's stay counted until the
        caller releases it, once the response is sent."""
        incoming = request if isinstance(request, Incoming) else Incoming(request)
        message = incoming.message
        if message.shared_memory_output and message.response_encoding == pb.TENSOR_ENCODING_VALUES:
            raise OptionError("response_encoding: TENSOR_ENCODING_VALUES puts every tensor in the response as "
                             "numbers; it does not go with shared_memory_output (leave one out)",
                             field="response_encoding")
        gid, plan = self.plan_for(message, token)
        evaluation, asked = self._run(plan, incoming, token, None if carrier is None else carrier.capacity, hold)
        return self.respond(gid, evaluation, message, Outgoing(pb.EvaluateResponse(), carrier), token, asked=asked)

    def open_output_file(self, name: str) -> TensorFile:
        """The shared-memory file a same-host client named for its outputs (checked before any work)."""
        if self.shared_memory is None:
            raise SharedMemoryUnavailable(
                "shared_memory_output: this server has no shared-memory directory (started with "
                "--no-shared-memory): leave shared_memory_output out", field="shared_memory_output")
        return self.shared_memory.open_output(name, field="shared_memory_output")

    def run(self, plan: Plan, request: Incoming | pb.EvaluateRequest, token: StopToken | None, *,
            capacity: int | None = None, hold: Hold | None = None) -> Evaluation:
        """Decode the request's inputs and options and run the plan; every field is checked before work,
        and so is the size of the response when it must fit ``capacity`` bytes (see evaluate's ``hold``)."""
        return self._run(plan, request, token, capacity, hold)[0]

    def _run(self, plan: Plan, request: Incoming | pb.EvaluateRequest, token: StopToken | None,
             capacity: int | None, hold: Hold | None = None) -> tuple[Evaluation, "Asked"]:
        """run(), and what the request's selections ask of the plan (for respond)."""
        incoming = request if isinstance(request, Incoming) else Incoming(request)
        request = incoming.message
        if len(request.input_sets):
            raise OptionError("input_sets: several input sets go through EvaluateStream; Evaluate takes `inputs`",
                             field="input_sets")
        limit = self.limits.max_tensor_elements
        tensors, seed_tensor = incoming.tensor_map("inputs"), incoming.tensor("seed")
        checked: list[bool] = []

        def references_checked() -> None:
            """A reference costs its sender a few bytes, its read costs us all: before reading any,
            the names and the total are checked (the engine checks names again, for every caller)."""
            if self.shared_memory is not None and not checked:
                check_input_names(plan, tensors)
                check_total([*tensors.values(), seed_tensor], self.limits.max_memory_bytes, "inputs")
                checked.append(True)

        inputs = inputs_from_proto(tensors, max_elements=limit, shared_memory=self.shared_memory,
                                   before_others=references_checked)
        seed = None
        if seed_tensor is not None:
            seed = plain_array(seed_tensor, limit)
            if seed is None:
                references_checked()
                seed = tensor_to_array(seed_tensor, field="seed", max_elements=limit, shared_memory=self.shared_memory)
        unreached = UNREACHED_OMIT if request.unreached == pb.UNREACHED_OMIT else UNREACHED_ZEROS
        asked = self.asked(plan, request)  # unknown names fail before any work
        contributions = request.contributions
        before_work = None
        if capacity is not None:
            as_values = request.response_encoding == pb.TENSOR_ENCODING_VALUES

            def fits(shapes: Shapes, out_slot: int) -> int:  # the engine calls it before the forward pass
                size = asked.check_size(shapes, out_slot, capacity, contributions=contributions and asked.gradients,
                                        as_values=as_values)
                # held in the memory budget with the run: the response is built beside the values,
                # then copied once more into gRPC's buffers
                return RESPONSE_COPIES * size

            before_work = fits

        evaluation = evaluate_plan(
            plan, inputs, output=request.output or None, seed=seed,
            gradients=asked.gradients, before_work=before_work,
            # Gradients nobody asked for are not computed (dL/dX of a data batch, say).
            wrt=asked.wrt, unreached=unreached, contributions=contributions, token=token, inner=asked.inner,
            # values nobody reads after the run may be written over (diagnostics read them all)
            keep=None if request.diagnostics != pb.DIAGNOSTICS_OFF else asked.keep, hold=hold,
        )
        return evaluation, asked

    def asked(self, plan: Plan, request: pb.EvaluateRequest) -> "Asked":
        """What ``request``'s return_values and return_grads ask of ``plan``, resolved once per plan
        and selection (a call's bookkeeping that does not depend on its inputs); an unknown name
        raises, every time (a failing selection is never kept)."""
        values, grads = request.return_values, request.return_grads
        if len(values.names) + len(grads.names) > MAX_KEPT_SELECTION_NAMES:  # not kept: see the constant
            return Asked(plan, values, grads)
        key = (values.mode, tuple(values.names[:]), grads.mode, tuple(grads.names[:]))  # (slices: made in C)
        known = self._asked.get(plan)
        if known is None:
            known = self._asked.setdefault(plan, {})
        found = known.get(key)
        if found is None:
            found = Asked(plan, values, grads)
            if len(known) >= MAX_SELECTIONS_PER_PLAN:
                known.clear()
            known[key] = found
        return found

    def respond(self, gid: str, evaluation: Evaluation, request: pb.EvaluateRequest, outgoing: Outgoing,
                token: StopToken | None = None, *, asked: "Asked | None" = None) -> Outgoing:
        """Fill ``outgoing`` with the response; its carrier decides where each tensor travels, unless
        the request asked for every tensor as numbers (TENSOR_ENCODING_VALUES). ``token`` is checked
        every 1,024 tensors: the values and gradients of a million nodes take seconds to encode."""
        plan = evaluation.plan
        if asked is None:  # (run's, when the caller has it)
            asked = self.asked(plan, request)
        response = outgoing.message
        response.output = evaluation.output_name
        response.graph_id = gid
        as_values = request.response_encoding == pb.TENSOR_ENCODING_VALUES
        outgoing.values = as_values

        outgoing.put_tensor("output_value", evaluation.values[evaluation.output], node=evaluation.output_name)
        names = plan.names
        for n, k in enumerate(asked.shown):
            if token is not None and not n & 1023:
                token.check()
            outgoing.put_map_tensor("values", names[k], evaluation.values[k])
        for name in asked.inner_shown:
            outgoing.put_map_tensor("values", name, evaluation.inner_values[name])
        if evaluation.grads is not None:
            grads, differentiable = evaluation.grads, evaluation.differentiable
            for n, k in enumerate(asked.wanted):
                if token is not None and not n & 1023:
                    token.check()
                g = grads[k]
                if g is not None:
                    outgoing.put_map_tensor("gradients", names[k], g)
                elif not differentiable[k]:
                    response.no_gradient.append(names[k])
            for name in asked.inner_wanted:
                if name in evaluation.inner_grads:
                    outgoing.put_map_tensor("gradients", name, evaluation.inner_grads[name])
                else:
                    response.no_gradient.append(name)
        for c in evaluation.contributions:
            response.contributions.add(node=c.node, consumer=c.consumer, input_index=c.input_index,
                                       gradient=array_to_tensor(c.gradient, as_values=as_values))
        if request.diagnostics != pb.DIAGNOSTICS_OFF:
            response.diagnostics.SetInParent()  # present even when all is well: "diagnosed, nothing found"
            write_diagnostics(response.diagnostics, diagnose(evaluation))
        return outgoing

    # --- operators ------------------------------------------------------------------

    # --- derivatives as graphs --------------------------------------------------------------

    def derive(self, request: pb.DeriveRequest, capacity: int | None = None) -> pb.DeriveResponse:
        """One Derive call: the derivative of a graph (or registered id) as a new graph, which is
        compiled and registered here too (its id comes back), so that it can be evaluated by id.

        The derived graph is at most ``max_nodes`` nodes, built from the graph alone (no tensor
        is computed); one whose message passes ``capacity`` bytes is refused before it is
        compiled, registered or sent."""
        source = request.WhichOneof("source")
        if source == "graph":
            self.compile(request.graph)  # pins, validation and the cache, as for Evaluate
            graph = graph_from_proto(request.graph, max_elements=self.limits.max_tensor_elements)
        else:
            graph = plan_to_graph(self.plan_for(request)[1])
        wrt = list(request.wrt)
        output = request.output or None
        if request.mode == pb.DERIVATIVE_MODE_FORWARD:
            if request.seed:
                raise OptionError("seed: a seed input is for reverse mode; forward mode takes one tangent input "
                                 "per wrt name", field="seed")
            derived, names = derive_forward(graph, self.registry, output=output, wrt=wrt, limits=self.limits)
        elif request.mode == pb.DERIVATIVE_MODE_REVERSE:
            derived, names = derive_reverse(graph, self.registry, output=output, wrt=wrt, seed=request.seed,
                                            limits=self.limits)
        else:
            raise OptionError(f"mode: unknown derivative mode {request.mode}", field="mode")
        response = pb.DeriveResponse(graph=graph_to_proto(derived), output=names.output, seed_input=names.seed,
                                     gradients=dict(names.gradients), tangents=dict(names.tangents),
                                     tangent_output=names.tangent_output)
        size = response.ByteSize() + GRAPH_ID_BYTES
        if capacity is not None and size > capacity:
            raise LimitExceeded(
                f"the derived graph's response takes {size} bytes ({len(response.graph.nodes)} nodes); this server sends at "
                f"most {capacity} bytes in one message (max_message_bytes). Derive with respect to fewer inputs "
                f"(wrt), evaluate the derivative directly (Evaluate with grads=), or start the server with a larger "
                f"--max-message-bytes", limit="max_message_bytes", requested=size, allowed=capacity, field="graph")
        response.graph_id, _ = self.compile(response.graph)
        return response

    def list_operators(self, request: pb.ListOperatorsRequest | None = None) -> pb.ListOperatorsResponse:
        """Every operator served, then those the start-up check refused (CHECK_FAILED, not served)."""
        response = pb.ListOperatorsResponse()
        for op in self.registry:
            _describe(response.operators.add(), op, self.checks.get(op.name, pb.CHECK_NOT_RUN))
        for op in self.refused:
            _describe(response.operators.add(), op, pb.CHECK_FAILED)
        return response

    def server_info(self, request: pb.ServerInfoRequest | None = None, worker: int = 0) -> pb.ServerInfoResponse:
        return pb.ServerInfoResponse(version=chainrule_version(), pid=os.getpid(), worker=worker,
                                     shared_memory_dir=self.shared_memory.path if self.shared_memory else "")


#: What a compiled plan holds per node besides its literals: its name, the parallel per-slot lists, the
#: attribute dicts and the inferred specs: about 510 bytes measured with tracemalloc on a 100,000-node
#: chain, counted twice over for the shape specializations a plan adds per input-shape signature.
PLAN_BYTES_PER_NODE = 1024
#: How many copies of a response the memory budget counts: the message built beside the values, and
#: gRPC's own copy of it (its Python API takes only bytes, so the encoded message cannot be lent).
RESPONSE_COPIES = 2
#: Bytes a graph id and its field tag take in a message, at most.
GRAPH_ID_BYTES = 80


def plan_bytes(plan: Plan) -> int:
    """An estimate of the memory a cached plan keeps: per-node overhead plus its literal tensors,
    the plans of its graph attributes (scan's body) included. Iterative over that nesting."""
    total, pending = 0, [plan]
    while pending:
        current = pending.pop()
        total += len(current) * PLAN_BYTES_PER_NODE
        for attrs in current.attrs:
            for value in attrs.values():
                if isinstance(value, np.ndarray):
                    total += value.nbytes
                elif isinstance(value, Plan):
                    pending.append(value)
    return total


def _describe(info: pb.OperatorInfo, op: OpDef, check: int) -> None:
    info.name, info.arity, info.doc, info.check = op.name, op.arity, op.doc, check
    info.plugin, info.distribution, info.version = op.plugin, op.distribution, op.version
    for name, attr in op.attrs.items():
        schema = info.attrs.add(name=name, type=attr.kind, required=attr.required, doc=attr.doc)
        if not attr.required and attr.default is not None:
            schema.default_value.CopyFrom(python_to_attr(attr.default))
    for given in described_inputs(op):
        info.inputs.add(name=given.name, dtypes=[NUMPY_TO_DTYPE[d] for d in given.dtypes], variadic=given.variadic)


def _selected(plan: Plan, selection: pb.Selection, field: str) -> Iterable[int]:
    if selection.mode == pb.Selection.NONE:
        return ()
    if selection.mode == pb.Selection.LISTED:
        # a name given twice is answered once (and counted once by the response's size); names of
        # values inside a graph attribute ("rnn/h") are _inner's
        return list(dict.fromkeys(plan.slot(name, field=f"{field}.names") for name in selection.names
                                  if name in plan.index or "/" not in name))
    if selection.names:
        raise OptionError(f"{field}: names are given but mode is not LISTED", field=f"{field}.mode")
    return range(len(plan.names))


def _inner(plan: Plan, selection: pb.Selection, field: str) -> list[str]:
    """The LISTED names of values inside graph attributes (``node/value``: scan's body), each checked."""
    if selection.mode != pb.Selection.LISTED:
        return []
    found = [name for name in dict.fromkeys(selection.names) if name not in plan.index and "/" in name]
    for name in found:
        plan.inner(name, field=f"{field}.names")  # an unknown one fails before any work
    return found


#: Bytes a response spends on one tensor besides its data: map entry, name, dtype, shape (an upper bound).
TENSOR_OVERHEAD_BYTES = 64
#: What TENSOR_ENCODING_VALUES spends per element (a packed double), and besides (the DoubleList's key and length).
VALUES_ELEMENT_BYTES, VALUES_OVERHEAD_BYTES = 8, 16


#: Selections kept per plan (see ChainruleService.asked); beyond, they are worked out afresh.
MAX_SELECTIONS_PER_PLAN = 32
#: Response sizes kept per selection: one per input-shape signature, output and options.
MAX_SIZES_PER_SELECTION = 64
#: Selections naming more nodes than this are worked out on every call, never kept: a request may
#: name a node millions of times, and a kept key would hold every copy of the name.
MAX_KEPT_SELECTION_NAMES = 4096


class Asked:
    """What one request's selections ask of a plan: the slots whose values (``shown``) and
    gradients (``wanted``) go into the response, the ``node/value`` names inside graph attributes
    (``inner_shown``, ``inner_wanted``), and the engine's ``gradients``, ``wrt`` and ``inner``.

    Resolved once per plan and selection (ChainruleService.asked): a call that asks what the
    previous one asked repeats none of it. The response's size for given shapes is kept too
    (:meth:`check_size`). Building one raises the error an unknown name deserves."""

    __slots__ = ("shown", "wanted", "inner_shown", "inner_wanted", "gradients", "wrt", "inner", "keep", "_plan",
                 "_sizes")

    def __init__(self, plan: Plan, values: pb.Selection, grads: pb.Selection) -> None:
        self._plan = weakref.ref(plan)  # (kept per plan, so it must not keep its plan alive)
        self.shown: Sequence[int] = _selected(plan, values, "return_values")
        self.wanted: Sequence[int] = _selected(plan, grads, "return_grads")
        self.inner_shown: list[str] = _inner(plan, values, "return_values")
        self.inner_wanted: list[str] = _inner(plan, grads, "return_grads")
        self.gradients = grads.mode != pb.Selection.NONE
        listed = grads.mode == pb.Selection.LISTED
        self.wrt: list[str] | None = [plan.names[k] for k in self.wanted] if listed else None
        self.inner: list[str] = list(dict.fromkeys([*self.inner_shown, *self.inner_wanted]))
        #: The values the response carries (the output's besides): the engine's ``keep``.
        self.keep: list[str] = [plan.names[k] for k in self.shown]
        self._sizes: dict[tuple, tuple[Shapes, int]] = {}

    def check_size(self, shapes: Shapes, output: int, capacity: int, *, contributions: bool,
                   as_values: bool) -> int:
        """The response's bytes for this selection (response_bytes, worked out once per shapes); a
        response that would not fit ``capacity`` bytes is refused (refuse_response)."""
        key = (id(shapes), output, contributions, as_values)
        known = self._sizes.get(key)
        if known is not None and known[0] is shapes:
            total = known[1]
        else:
            plan = self._plan()
            assert plan is not None  # the caller holds the plan it runs
            gradients = self.wanted if self.gradients else ()
            total = response_bytes(plan, shapes, output, self.shown, gradients, contributions=contributions,
                                   as_values=as_values,
                                   inner=[*self.inner_shown, *(self.inner_wanted if self.gradients else ())])
            if len(self._sizes) >= MAX_SIZES_PER_SELECTION:
                self._sizes.clear()
            self._sizes[key] = (shapes, total)
        if total > capacity:
            refuse_response(total, len(self.shown), len([k for k in (self.wanted if self.gradients else ())
                                                         if shapes.differentiable[k]]),
                            capacity, contributions=contributions)
        return total


def response_bytes(plan: Plan, shapes: Shapes, output: int, shown: Iterable[int], wanted: Iterable[int], *,
                   contributions: bool = False, as_values: bool = False, inner: Iterable[str] = ()) -> int:
    """The bytes a response takes at most, from shape inference (``shapes``): the output's value,
    each selected value and each selected gradient of a float value (gradients of other
    dtypes are never sent), and with ``contributions`` every consumer's share of
    each fanned-out float value. A value whose operator has no infer rule has no size yet
    and is not counted here (the memory budget still bounds it). With ``as_values`` (the
    request's TENSOR_ENCODING_VALUES) every element takes a double's 8 bytes, whatever its dtype.
    ``inner`` names values inside a graph attribute (``rnn/h``), each counted once per step.
    """
    specs, names = shapes.specs, plan.names

    def size(k: int) -> int:
        spec = specs[k]
        if spec is None:
            return 0
        data = spec.size * VALUES_ELEMENT_BYTES + VALUES_OVERHEAD_BYTES if as_values else spec.nbytes
        return data + len(names[k]) + TENSOR_OVERHEAD_BYTES

    wanted = [k for k in wanted if shapes.differentiable[k]]
    total = size(output) + sum(size(k) for k in shown) + sum(size(k) for k in wanted)
    for name in inner:  # values inside scan's body: one per step, stacked
        times, spec = plan.inner_spec(name, shapes, field="return_values")
        if spec is not None:
            elements = times * spec.size
            data = elements * VALUES_ELEMENT_BYTES + VALUES_OVERHEAD_BYTES if as_values else elements * spec.dtype.itemsize
            total += data + len(name) + TENSOR_OVERHEAD_BYTES
    if contributions:
        total += sum(size(k) * n for k, n in enumerate(plan.consumers) if n > 1 and shapes.differentiable[k])
    return total


def refuse_response(total: int, values: int, gradients: int, capacity: int, *, contributions: bool) -> None:
    """RESOURCE_EXHAUSTED (max_message_bytes) for a response of ``total`` bytes: nothing was computed."""
    raise LimitExceeded(
        f"the response would take about {total} bytes ({values} values, {gradients} gradients, the "
        f"output's value{' and the contributions' if contributions else ''}); this server sends at most {capacity} bytes in one message (max_message_bytes). "
        "Nothing was computed. Ask for fewer values or gradients (values=/grads=, return_values/"
        "return_grads) or no contributions, use shared memory on the same host (Client(..., shared_memory=True)), or start "
        "the server with a larger --max-message-bytes / --max-memory-bytes",
        limit="max_message_bytes", requested=total, allowed=capacity, field="return_values",
    )


def write_diagnostics(message: pb.Diagnostics, diagnostics: DiagnosticReport) -> None:
    for name in ("first_nonfinite_value", "first_nonfinite_gradient"):
        d = getattr(diagnostics, name)
        if d is not None:
            getattr(message, name).CopyFrom(pb.NonFinite(
                node=d.node, op=d.op, count=d.count,
                inputs_summary=d.inputs_summary, consumers_summary=d.consumers_summary))
    for n in diagnostics.grad_norms:
        message.grad_norms.add(node=n.node, grad_norm=n.grad_norm, value_norm=n.value_norm)
    for f in diagnostics.flags:
        message.flags.add(kind=f.kind, node=f.node, message=f.message)
