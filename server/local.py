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
    each Graph object is kept, so a call costs what the engine costs. It makes
    the same checks as the service (the same compile, limits and engine), so
    answers are bit-identical to a server's. The other calls, and
    ``send_evaluate`` (the message path), hand messages to the service, with
    large tensors as read-only views of the arrays themselves.
    """

    def __init__(self, service: ChainruleService) -> None:
        super().__init__()
        self.service = service
        self._plans: weakref.WeakKeyDictionary[Graph, tuple[str, Plan]] = weakref.WeakKeyDictionary()
        self._plans_lock = threading.Lock()

    def carrier(self) -> Carrier:
        return InProcess()

    def evaluate(self, call: EvaluateCall) -> Result:
        try:
            return self._evaluate(call)
        except ChainruleError as exc:
            raise from_status(status_for(exc)) from exc

    def _plan(self, graph: Graph) -> tuple[str, Plan]:
        with self._plans_lock:
            known = self._plans.get(graph)
        if known is None:
            known = self.service.compile(graph.message)  # cached there too, by content hash
            with self._plans_lock:
                self._plans[graph] = known
        return known

    def _evaluate(self, call: EvaluateCall) -> Result:
        gid, plan = self._plan(call.graph)
        arrays, given = self._inputs(call)
        seed = None if call.seed is None else np.asarray(call.seed)
        value_slots = _slots(plan, call.values, "return_values")  # unknown names fail before any work
        grad_slots = _slots(plan, call.grads, "return_grads")
        inner_values, inner_grads = _inner(plan, call.values), _inner(plan, call.grads)  # "rnn/h": scan's body
        token = None if call.timeout is None else StopToken.after(call.timeout, what="the timeout")
        evaluation = evaluate_plan(
            plan, arrays, output=call.output or None, seed=seed, gradients=call.grads != "none",
            wrt=None if isinstance(call.grads, str) else [name for name in call.grads if name not in inner_grads],
            unreached=call.unreached, contributions=call.contributions, token=token,
            inner=list(dict.fromkeys([*inner_values, *inner_grads])),
        )
        if seed is not None and isinstance(call.seed, np.ndarray):
            given.append(call.seed)
        detach = _Detacher(given)
        names, computed = plan.names, evaluation.values
        values = {names[k]: detach(computed[k]) for k in value_slots}
        values.update((name, evaluation.inner_values[name]) for name in inner_values)
        grads: dict[str, Any] = {}
        no_gradient: list[str] = []
        if evaluation.grads is not None:
            found = evaluation.grads
            if call.grads == "all":  # the default: one pass over the slots, no per-slot calls
                grads = {name: g for name, g in zip(names, found) if g is not None}
                no_gradient = [name for name, g, d in zip(names, found, evaluation.differentiable) if g is None and not d]
            else:
                for k in grad_slots:
                    if found[k] is not None:
                        grads[names[k]] = found[k]
                    elif not evaluation.differentiable[k]:
                        no_gradient.append(names[k])
            grads.update((name, evaluation.inner_grads[name]) for name in inner_grads if name in evaluation.inner_grads)
            if given:
                grads = {name: detach(g) for name, g in grads.items()}
        contributions = [Contribution(c.node, c.consumer, c.input_index, detach(np.asarray(c.gradient)))
                         for c in evaluation.contributions]
        return Result.of_arrays(
            call.graph, output=evaluation.output_name, graph_id=gid,
            value=detach(evaluation.values[evaluation.output]), values=values, grads=grads,
            no_gradient=no_gradient, diagnostics=_diagnostics(evaluation) if call.diagnostics else None,
            contributions=contributions,
        )

    def _inputs(self, call: EvaluateCall) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
        """The feeds as arrays the engine may read (read-only views of the caller's own), converted
        to their declared dtypes as the message path converts them; and the caller's arrays."""
        declared = call.graph.inputs
        limit = self.service.limits.max_tensor_elements
        arrays: dict[str, np.ndarray] = {}
        given: list[np.ndarray] = []
        for name, value in call.feeds.items():
            spec = declared.get(name)
            if type(value) is np.ndarray and spec is not None and value.dtype == _DTYPES.get(spec.dtype):
                array = value  # the common case: an array of the declared dtype, as it is
            elif isinstance(value, pb.Tensor):
                arrays[name] = tensor_to_array(value, field=f"inputs.{name}", max_elements=limit)
                continue
            else:
                array = to_array(name, value, spec.dtype if spec else None)
            if dtype_code(array.dtype) is None:
                raise TypeError(f"input '{name}': dtype {array.dtype} cannot be sent; "
                                "supported: float64, float32, int64, int32, bool")
            if array.dtype.byteorder not in "=|":
                array = array.astype(array.dtype.newbyteorder("="))
            check_element_count(array.shape, array.size, limit, f"inputs.{name}")
            if array is value or (type(value) is np.ndarray and np.may_share_memory(array, value)):
                given.append(value)
                array = array.view()
                array.flags.writeable = False  # an operator never writes its inputs; the caller's stay theirs
            arrays[name] = array
        return arrays, given

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


def _diagnostics(evaluation: Evaluation) -> pb.Diagnostics:
    message = pb.Diagnostics()
    write_diagnostics(message, diagnose(evaluation))
    return message


class _Detacher:
    """Copies a result that may share memory with an array the caller gave (an input's own value, a
    reshape of it, the seed passed through), so that a Result stays what the call returned.

    Arrays that share memory share the object at the root of their ``base`` chain (the caller's
    array, or the buffer under it), so one set lookup per result decides, however many inputs.
    """

    __slots__ = ("roots",)

    def __init__(self, given: list[np.ndarray]) -> None:
        self.roots = {id(_root(g)) for g in given}

    def __call__(self, value: Any) -> Any:
        if self.roots and isinstance(value, np.ndarray) and id(_root(value)) in self.roots:
            return value.copy()
        return value


def _root(array: np.ndarray) -> Any:
    """The object that owns an array's memory: the end of its chain of bases."""
    while isinstance(array, np.ndarray) and array.base is not None:
        array = array.base
    return array
