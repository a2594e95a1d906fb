"""LocalClient: the client API over the service in this process, without gRPC.

It calls the server's own domain logic (``ChainruleService``) with the same
plugin registry (``load_plugins()``, honoring CHAINRULE_PLUGINS and
CHAINRULE_DISABLE_PLUGINS), so a graph gives bit-identical results through
both clients. Errors become the same typed exceptions, through the status the
server would have sent. It lives beside the server, not in
``chainrule.client``, because it carries the server: a program that only
calls a remote service imports none of this.
"""
from __future__ import annotations

import sys
import threading
import warnings
import weakref
from typing import Any, Callable, Generator, Iterable, Iterator

import numpy as np

from chainrule.client.base import ClientBase
from chainrule.client.errors import from_status
from chainrule.client.graph import Graph
from chainrule.client.request import EvaluateCall, Selected, to_array
from chainrule.client.result import Contribution, Result
from chainrule.client.transport import Transport
from chainrule.core import Limits, Plan, StopToken
from chainrule.core.diagnostics import diagnose
from chainrule.core.engine import Evaluation
from chainrule.core.engine import evaluate as evaluate_plan
from chainrule.core.errors import ChainruleError
from chainrule.plugins.manager import Loaded, load_plugins
from chainrule.v1 import chainrule_pb2 as pb
from chainrule.wire.convert import check_element_count, dtype_code, tensor_to_array
from chainrule.wire.incoming import Incoming, RawTensor
from chainrule.wire.outgoing import Carrier, InProcess, Outgoing
from chainrule.wire.status import status_for

from .config import ServerConfig
from .service import ChainruleService, evaluate_stream, optimize
from .service.service import write_diagnostics


class LocalClient(ClientBase):
    """Evaluate graphs in this process. ``loaded`` defaults to ``load_plugins()``;
    ``limits`` to those of a server with default settings."""

    transport: "InProcessTransport"

    def __init__(self, loaded: Loaded | None = None, *, limits: Limits | None = None,
                 timeout: float | None = None) -> None:
        if loaded is None:
            loaded = load_plugins()
            for problem in loaded.problems:  # the others load; say which did not, as `chainrule serve` would
                warnings.warn(f"chainrule: {problem}", RuntimeWarning, stacklevel=2)
        service = ChainruleService(loaded, limits or ServerConfig().limits())
        super().__init__(InProcessTransport(service), timeout=timeout)

    @property
    def service(self) -> ChainruleService:
        """The service this client calls."""
        return self.transport.service

    def __repr__(self) -> str:
        return f"<LocalClient: {len(self.service.registry)} operators>"


class InProcessTransport(Transport):
    """The calls as direct calls of ``service``.

    ``evaluate`` runs the engine on the caller's arrays and builds the Result
    from the engine's arrays: no request or response message, and the plan of
    each Graph object is kept with what every call of it reuses (the inputs'
    dtypes; per selection, the slots to return and the engine's ``wrt=``), in
    the call's template too (``EvaluateCall.template.memo``: a repeated call
    looks nothing up), so a call costs what the engine costs and little more.
    The caller's arrays go to the engine as read-only views, so that no operator
    writes them and only a result that is a view can share their memory (those
    are copied). It makes
    the same checks as the service (the same compile, limits and engine), so
    answers are bit-identical to a server's. The other calls, and
    ``send_evaluate`` (the message path), hand messages to the service, with
    large tensors as read-only views of the arrays themselves.
    """

    def __init__(self, service: ChainruleService) -> None:
        super().__init__()
        self.service = service
        self._plans: weakref.WeakKeyDictionary[Graph, _Compiled] = weakref.WeakKeyDictionary()
        self._plans_lock = threading.Lock()

    def carrier(self) -> Carrier:
        return InProcess()

    def evaluate(self, call: EvaluateCall) -> Result:
        try:
            return self._evaluate(call)
        except ChainruleError as exc:
            raise from_status(status_for(exc)) from exc

    def _compiled(self, graph: Graph) -> "_Compiled":
        """The graph's plan and what calls of it reuse: compiled on its first call, then kept per
        Graph object (a builder returns the same Graph while nothing it depends on changes)."""
        with self._plans_lock:
            known = self._plans.get(graph)
        if known is None:
            gid, plan = self.service.compile(graph.message)  # cached there too, by content hash
            known = _Compiled(gid, plan, graph)
            with self._plans_lock:
                self._plans[graph] = known
        return known

    def _kept(self, call: EvaluateCall) -> "tuple[_Compiled, _Recipe | None]":
        """The plan and recipe kept in the call's template by an earlier call of it (no lock, no
        lookup), else the plan and None: the recipe is worked out after the inputs are checked."""
        template = call.template
        memo = None if template is None else template.memo
        if memo is not None and memo[0] is self:
            return memo[1], memo[2]
        return self._compiled(call.graph), None

    def _recipe(self, call: EvaluateCall, compiled: "_Compiled") -> "_Recipe":
        """The selection's recipe (unknown names fail here, before any work), kept in the call's template."""
        recipe = compiled.recipe(call.values, call.grads)
        if call.template is not None:
            call.template.memo = (self, compiled, recipe)
        return recipe

    def _evaluate(self, call: EvaluateCall) -> Result:
        compiled, recipe = self._kept(call)
        arrays = self._inputs(call, compiled.dtypes)
        seed = None if call.seed is None else _handed_over(call.seed)
        if recipe is None:
            recipe = self._recipe(call, compiled)
        evaluation = _run(compiled.plan, arrays, seed, call, recipe)
        computed = evaluation.values
        value = computed[evaluation.output]
        values = {name: computed[k] for name, k in recipe.values} if recipe.values else {}
        grads, no_gradient = _gradients(evaluation, recipe)
        contributions: list[Contribution] = []
        if evaluation.contributions or _any_view(value, values, grads):  # (the common case: neither)
            callers = _CallersMemory(arrays, seed)
            value = callers.detach(value)
            callers.detach_all(values)
            callers.detach_all(grads)
            contributions = [Contribution(c.node, c.consumer, c.input_index, callers.detach(np.asarray(c.gradient)))
                             for c in evaluation.contributions]
        if recipe.inner_values:  # stacked step by step: fresh arrays
            values.update((name, evaluation.inner_values[name]) for name in recipe.inner_values)
        return Result.of_arrays(
            call.graph, output=evaluation.output_name, graph_id=compiled.gid, value=value, values=values,
            grads=grads, no_gradient=no_gradient, diagnostics=_diagnostics(evaluation) if call.diagnostics else None,
            contributions=contributions,
        )

    def _inputs(self, call: EvaluateCall, dtypes: dict[str, np.dtype]) -> dict[str, Any]:
        """The feeds as arrays the engine may read: read-only views of the caller's own, converted
        to their declared dtypes as the message path converts them.

        ``dtypes`` maps each declared input to its numpy dtype: an array of that dtype (so native
        and sendable), the common case, is handed over as a read-only view after one size check."""
        limit = self.service.limits.max_tensor_elements
        below = _NO_LIMIT if limit is None else limit
        declared = dtypes.get
        arrays: dict[str, Any] = {}
        for name, value in call.feeds.items():
            expected = declared(name)
            if type(value) is np.ndarray and expected is not None and value.dtype == expected and value.size <= below:
                arrays[name] = array = value.view()
                _freeze(array, False)  # an operator never writes its inputs; the caller's stay theirs
            elif type(value) is float and expected is _FLOAT64:
                arrays[name] = np.asarray(value)  # what _other_input makes of it, sooner: a new 0-d array
            else:
                arrays[name] = _other_input(call.graph, name, value, limit)
        return arrays

    @staticmethod
    def _call(work: Callable[[], Any]) -> Any:
        try:
            return work()
        except ChainruleError as exc:
            raise from_status(status_for(exc)) from exc

    def send_evaluate(self, request: Outgoing, timeout: float | None) -> Incoming:
        token = None if timeout is None else StopToken.after(timeout, what="the timeout")
        response = self._call(lambda: self.service.evaluate(request.incoming(), token, InProcess()).incoming())
        return _detached(response, request)

    def register(self, request: pb.RegisterGraphRequest, timeout: float | None) -> pb.RegisterGraphResponse:
        return self._call(lambda: self.service.register_graph(request))

    def list_operators(self, timeout: float | None) -> pb.ListOperatorsResponse:
        return self._call(lambda: self.service.list_operators(pb.ListOperatorsRequest()))

    def derive(self, request: pb.DeriveRequest, timeout: float | None) -> pb.DeriveResponse:
        return self._call(lambda: self.service.derive(request))

    def server_info(self, timeout: float | None) -> pb.ServerInfoResponse:
        return self._call(lambda: self.service.server_info(pb.ServerInfoRequest()))

    def evaluate_stream(self, requests: Iterator[pb.EvaluateRequest],
                        timeout: float | None) -> Generator[pb.EvaluateStreamResponse, None, None]:
        token = None if timeout is None else StopToken.after(timeout)
        return self._follow(evaluate_stream(self.service, requests, token))

    def optimize(self, request: pb.OptimizeRequest,
                 timeout: float | None) -> Generator[pb.OptimizeProgress, None, None]:
        # Named as over gRPC: a run the timeout would cut short stops in time, and says why.
        token = None if timeout is None else StopToken.after(timeout, what="the client's deadline")
        return self._follow(optimize(self.service, request, token))

    @staticmethod
    def _follow(responses: Iterator[Any]) -> Generator[Any, None, None]:
        """The server's own stream generator, with errors raised as the typed exceptions."""
        try:
            yield from responses
        except ChainruleError as exc:
            raise from_status(status_for(exc)) from exc


def _detached(response: Incoming, request: Outgoing) -> Incoming:
    """The response with every tensor that may share memory with the caller's inputs copied.

    An input's own value, or a reshape of it, would otherwise be a view of the
    caller's array; a Result must stay what the call returned, as over gRPC,
    whatever the caller later writes into its arrays.
    """
    kept = request.carrier.kept() if isinstance(request.carrier, InProcess) else []
    if not kept:
        return response
    sources = [np.asarray(raw.data) for raw in kept]
    for tensors in (*response.raw_maps.values(), response.raw_singles):
        for key, raw in list(tensors.items()):
            data = np.asarray(raw.data)
            if any(np.may_share_memory(data, source) for source in sources):
                tensors[key] = RawTensor(raw.dtype, raw.shape, memoryview(data.copy()).toreadonly())
    return response


#: Declared dtype names as numpy dtypes (``dtype.name`` costs a microsecond; comparing dtypes does not).
_DTYPES = {name: np.dtype(name) for name in ("float64", "float32", "int64", "int32", "bool")}


class _Recipe:
    """What one selection of values and gradients asks of a plan, resolved once per plan and
    selection: the (name, slot) pairs to return, and the engine's ``wrt=`` and ``inner=``.

    Building one raises the error an unknown name deserves (OutputError naming the field),
    so a selection that fails is never kept and fails alike every time."""

    __slots__ = ("values", "grads", "all_grads", "inner_values", "inner_grads", "wrt", "inner", "keep")

    def __init__(self, plan: Plan, values: Selected, grads: Selected) -> None:
        names = plan.names
        self.values: list[tuple[str, int]] = [(names[k], k) for k in _slots(plan, values, "return_values")]
        grad_slots = _slots(plan, grads, "return_grads")
        #: Names of values inside graph attributes ("rnn/h": scan's body), which the engine collects.
        self.inner_values: list[str] = _inner(plan, values)
        self.inner_grads: list[str] = _inner(plan, grads)
        #: grads="all" (the default): every slot's gradient, read in one pass, no pairs kept.
        self.all_grads = grads == "all"
        self.grads: list[tuple[str, int]] = [] if self.all_grads else [(names[k], k) for k in grad_slots]
        self.wrt: tuple[str, ...] | None = (
            None if isinstance(grads, str) else tuple(name for name in grads if name not in self.inner_grads))
        self.inner: tuple[str, ...] = tuple(dict.fromkeys([*self.inner_values, *self.inner_grads]))
        #: The values read after the run (the output's besides): others' buffers may be written over.
        self.keep: tuple[str, ...] = tuple(name for name, _ in self.values)


class _Compiled:
    """A graph's plan and what every call of it reuses: its id, the numpy dtype of each declared
    input (to hand over an array of that dtype without converting it), and a :class:`_Recipe`
    per selection asked for (at most :attr:`MAX_RECIPES`; beyond, they are worked out afresh)."""

    __slots__ = ("gid", "plan", "dtypes", "_recipes")

    MAX_RECIPES = 32

    def __init__(self, gid: str, plan: Plan, graph: Graph) -> None:
        self.gid = gid
        self.plan = plan
        self.dtypes: dict[str, np.dtype] = {
            name: _DTYPES[spec.dtype] for name, spec in graph.inputs.items() if spec.dtype in _DTYPES}
        self._recipes: dict[tuple[Selected, Selected], _Recipe] = {}

    def recipe(self, values: Selected, grads: Selected) -> _Recipe:
        """The recipe of this selection (selections are tuples of names or "all"/"none": hashable)."""
        key = (values, grads)
        recipe = self._recipes.get(key)
        if recipe is None:
            recipe = _Recipe(self.plan, values, grads)
            if len(self._recipes) >= self.MAX_RECIPES:
                self._recipes = {}  # rebound, not cleared: a concurrent reader keeps a whole dict
            self._recipes[key] = recipe
        return recipe


def _slots(plan: Plan, chosen: Selected, field: str) -> Iterable[int]:
    if chosen == "none":
        return ()
    if chosen == "all":
        return range(len(plan.names))
    # (each name once already; names of values inside a graph attribute, "rnn/h", are _inner's)
    return [plan.slot(name, field=f"{field}.names") for name in chosen if name in plan.index or "/" not in name]


def _inner(plan: Plan, chosen: Selected) -> list[str]:
    """Chosen names of values inside graph attributes (``node/value``: scan's body)."""
    if isinstance(chosen, str):
        return []
    return [name for name in chosen if name not in plan.index and "/" in name]


def _converted(graph: Graph, name: str, value: Any) -> np.ndarray:
    """A feed that is not an array of its declared dtype, as the message path would encode it:
    cast to the declared dtype where that keeps its values, in native byte order, or TypeError."""
    spec = graph.inputs.get(name)
    array = to_array(name, value, spec.dtype if spec else None)
    if dtype_code(array.dtype) is None:
        raise TypeError(f"input '{name}': dtype {array.dtype} cannot be sent; "
                        "supported: float64, float32, int64, int32, bool")
    if array.dtype.byteorder not in "=|":
        array = array.astype(array.dtype.newbyteorder("="))
    return array


def _run(plan: Plan, arrays: dict[str, Any], seed: Any, call: EvaluateCall, recipe: _Recipe) -> Evaluation:
    """The engine's run of the call. The common call passes only the options it sets: each keyword
    argument costs, twice (the engine's wrapper passes them on)."""
    output = call.output or None
    gradients = call.grads != "none"
    keep = None if call.diagnostics else recipe.keep  # diagnostics read every value
    if seed is None and call.timeout is None and call.unreached == "zeros" and not call.contributions:
        return evaluate_plan(plan, arrays, output=output, gradients=gradients, wrt=recipe.wrt, inner=recipe.inner,
                             keep=keep)
    token = None if call.timeout is None else StopToken.after(call.timeout, what="the timeout")
    return evaluate_plan(plan, arrays, output=output, seed=seed, gradients=gradients, wrt=recipe.wrt,
                         unreached=call.unreached, contributions=call.contributions, token=token,
                         inner=recipe.inner, keep=keep)


def _gradients(evaluation: Evaluation, recipe: _Recipe) -> tuple[dict[str, Any], list[str]]:
    """The selected gradients by name, and the selected names that have none because they cannot
    (constants, integer- and bool-typed values) rather than because none reached them."""
    found = evaluation.grads
    if found is None:
        return {}, []
    if recipe.all_grads:  # the default: one pass over the slots, no per-slot calls
        names = evaluation.plan.names
        grads = {name: g for name, g in zip(names, found) if g is not None}
        no_gradient = [name for name, g, d in zip(names, found, evaluation.differentiable) if g is None and not d]
    else:
        grads, no_gradient = {}, []
        differentiable = evaluation.differentiable
        for name, k in recipe.grads:
            g = found[k]
            if g is not None:
                grads[name] = g
            elif not differentiable[k]:
                no_gradient.append(name)
    if recipe.inner_grads:
        inner = evaluation.inner_grads
        grads.update((name, inner[name]) for name in recipe.inner_grads if name in inner)
    return grads, no_gradient


def _diagnostics(evaluation: Evaluation) -> pb.Diagnostics:
    message = pb.Diagnostics()
    write_diagnostics(message, diagnose(evaluation))
    return message


# --- the caller's arrays: handed over read-only, never aliased by results -----------------------------

#: ``setflags`` called positionally: twice as fast as ``array.setflags(write=False)``.
_freeze = np.ndarray.setflags
#: No limit on a tensor's elements (max_tensor_elements None).
_NO_LIMIT = sys.maxsize
_FLOAT64 = _DTYPES["float64"]


def _other_input(graph: Graph, name: str, value: Any, limit: int | None) -> Any:
    """A feed that is not an array of its declared dtype: a Tensor message decoded, anything else
    converted as the message path converts it (:func:`_converted`); read-only when it is (or shares
    memory with) the caller's array."""
    if isinstance(value, pb.Tensor):
        return tensor_to_array(value, field=f"inputs.{name}", max_elements=limit)
    array = _converted(graph, name, value)
    check_element_count(array.shape, array.size, limit, f"inputs.{name}")
    if array is not value and array.base is None:
        return array  # a new array of our own (from a number, a list, a cast)
    return _handed_over(array)


def _handed_over(value: Any) -> Any:
    """``value`` as the engine may hold it: an array, read-only when it may be the caller's memory
    (the value itself, a view of it as of a subclass, or an object exposing its buffer). The engine
    never holds a caller's array object then, so only a view can share the caller's memory."""
    array = np.asarray(value)
    if array is value or array.base is not None:
        array = array.view()
        _freeze(array, False)
    return array


def _any_view(value: Any, values: dict[str, Any], grads: dict[str, Any]) -> bool:
    """Whether any result is a view (``base`` set): only a view can share the caller's memory."""
    if isinstance(value, np.ndarray) and value.base is not None:
        return True
    for results in (values, grads):
        for result in results.values():
            if isinstance(result, np.ndarray) and result.base is not None:
                return True
    return False


class _CallersMemory:
    """Tells which results share memory with the arrays handed to the engine (:func:`_handed_over`),
    to copy those: a Result stays what the call returned whatever the caller later writes.

    The engine holds views of the caller's arrays, never the arrays, so only a result that is a view
    (``base`` set) can share their memory; the common case, every result its own array, costs one
    attribute read per result. Arrays that share memory share the object at the root of their ``base``
    chain (the caller's array, or the buffer under it): those roots are found on the first view."""

    __slots__ = ("_arrays", "_seed", "_roots")

    def __init__(self, arrays: dict[str, Any], seed: Any) -> None:
        self._arrays = arrays  # what the engine was given
        self._seed = seed
        self._roots: set[int] | None = None

    def detach(self, value: Any) -> Any:
        """``value``, or a copy of it when it may share memory with one of the caller's arrays."""
        if isinstance(value, np.ndarray) and value.base is not None and _root_of_view(value) in self._roots_of():
            return value.copy()
        return value

    def detach_all(self, results: dict[str, Any]) -> None:
        """:meth:`detach` every result of ``results``, in place."""
        roots = None
        for name, value in results.items():
            if isinstance(value, np.ndarray) and value.base is not None:
                if roots is None:
                    roots = self._roots_of()
                if _root_of_view(value) in roots:
                    results[name] = value.copy()  # (a value replaced, no key added: the loop goes on)

    def _roots_of(self) -> set[int]:
        """The ids of the objects at the roots of the handed-over arrays (found once)."""
        roots = self._roots
        if roots is None:
            handed = (*self._arrays.values(), self._seed)
            roots = self._roots = {_root_id(a) for a in handed if isinstance(a, np.ndarray)}
        return roots


def _root_of_view(view: np.ndarray) -> int:
    """:func:`_root_id` of a view, the common case first: a view of an array that owns its memory."""
    base = view.base
    if type(base) is np.ndarray and base.base is None:
        return id(base)
    return _root_id(view)


def _root_id(array: np.ndarray) -> int:
    """The id of the object that owns an array's memory: the end of its chain of bases."""
    base = array.base
    if base is None:  # the common case: the array owns its memory
        return id(array)
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    return id(base)
