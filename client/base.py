"""The API both clients share; each supplies only its transport (see transport.py).

``Client`` sends requests over gRPC, ``LocalClient`` hands them to the
service in-process. Everything else (building requests, remembering graph
ids, re-registering after NOT_FOUND, reading results) happens here, once, so
the two give identical results.
"""
from __future__ import annotations

import threading
import weakref
from typing import Any, Callable, Iterable, Mapping, Sequence

from chainrule.core.errors import ChainruleError
from chainrule.v1 import chainrule_pb2 as pb
from chainrule.wire.outgoing import SharedMemory
from chainrule.wire.status import status_for

from . import streams, training
from .errors import ChainruleRpcError, NotFound, from_status
from .graph import Graph
from .info import OperatorInfo, ServerInfo
from .request import Selectable, as_graph, evaluate_request, merge_inputs, resolve_target
from .result import Result
from .shared_memory import read_outputs
from .training import Progress, TrainResult
from .transport import Transport


class ClientBase:
    """Evaluate graphs, register them, list operators, stream and train, over ``transport``.
    A context manager."""

    def __init__(self, transport: Transport, *, timeout: float | None = None) -> None:
        #: How this client reaches its service (see transport.py).
        self.transport = transport
        self.timeout = timeout
        self._ids: weakref.WeakKeyDictionary[Graph, str] = weakref.WeakKeyDictionary()
        self._ids_lock = threading.Lock()

    def close(self) -> None:
        """Release the connection (nothing to release in-process)."""
        self.transport.close()

    def __enter__(self) -> "ClientBase":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the API --------------------------------------------------------------------------------

    def evaluate(
        self,
        target: Any,
        /,
        inputs: Mapping[Any, Any] | None = None,
        *,
        output: Any = None,
        seed: Any = None,
        timeout: float | None = None,
        values: Selectable = "all",
        grads: Selectable = "all",
        unreached: str = "zeros",
        contributions: bool = False,
        diagnostics: bool = True,
        **named_inputs: Any,
    ) -> Result:
        """Run ``target`` forward, then backward from its output; return a :class:`Result`.

        ``target`` is a Var (its graph is sent and it is the output) or a Graph
        (then ``output=`` names the output unless the graph has only one).
        Inputs come as a mapping (names or Vars as keys) and/or keywords; an
        input named like a parameter of this method (``seed``, ``inputs``...)
        goes in the mapping.
        ``values``/``grads``: "all", "none" or a list of names/Vars;
        ``grads="none"`` runs forward only. ``unreached``: "zeros" or "omit".
        A non-scalar output needs ``seed`` of its shape. ``diagnostics=False``
        spares the server the numerical health check (about one read of every
        tensor); ``Result.diagnostics`` is then None.
        """
        graph, output_name = resolve_target(target, output)
        feeds = merge_inputs(inputs, named_inputs, graph.builder)
        timeout = self.timeout if timeout is None else timeout
        graph_id = self.registered_id(graph)
        transport = self.transport
        staging = transport.staging(timeout)
        succeeded = False
        try:
            request = evaluate_request(
                graph, output_name, feeds, graph_id=graph_id, seed=seed, values=values, grads=grads,
                unreached=unreached, contributions=contributions, diagnostics=diagnostics,
                carrier=transport.carrier() if staging is None else SharedMemory(staging),
            )
            if staging is not None:  # the server writes the large tensors of its answer there too
                request.message.shared_memory_output = staging.outputs.name
            try:
                response = transport.evaluate(request, timeout)
            except NotFound:
                if graph_id is None:
                    raise
                # The server does not know the id (restarted, evicted it, or another replica): resend the
                # call with the graph itself, which that very server compiles and keeps under the same id
                # (a separate RegisterGraph could reach another replica behind a balancer).
                request.message.graph.CopyFrom(graph.message)
                response = transport.evaluate(request, timeout)
            if staging is not None:
                response = read_outputs(response, staging)  # before the files go to the next call
            succeeded = True
        except ChainruleError as exc:  # from our own side of shared memory: a full /dev/shm, say
            raise from_status(status_for(exc)) from None
        finally:
            if staging is not None:  # after a failure the server may still be writing into the files
                transport.unstage(staging, reusable=succeeded)
        return Result(response, graph, diagnosed=diagnostics)

    def register(self, graph: Any, *, timeout: float | None = None) -> str:
        """Register a Graph (or a builder's graph); later evaluations of it send only the id."""
        graph = as_graph(graph)
        response = self.transport.register(pb.RegisterGraphRequest(graph=graph.message),
                                           self.timeout if timeout is None else timeout)
        with self._ids_lock:
            self._ids[graph] = response.graph_id
        return response.graph_id

    def registered_id(self, graph: Graph) -> str | None:
        """The id this client registered ``graph`` under, if any."""
        with self._ids_lock:
            return self._ids.get(graph)

    def forget(self, graph: Graph) -> None:
        """Stop sending ``graph`` by id (the next evaluation sends it whole)."""
        with self._ids_lock:
            self._ids.pop(graph, None)

    def operators(self, *, timeout: float | None = None) -> list[OperatorInfo]:
        """Every operator the server can run, sorted by name."""
        response = self.transport.list_operators(self.timeout if timeout is None else timeout)
        return [OperatorInfo.from_proto(op) for op in response.operators]

    def server_info(self, *, timeout: float | None = None) -> ServerInfo:
        return ServerInfo.from_proto(self.transport.server_info(self.timeout if timeout is None else timeout))

    def evaluate_many(
        self,
        target: Any,
        input_sets: Iterable[Mapping[Any, Any]],
        /,
        inputs: Mapping[Any, Any] | None = None,
        *,
        output: Any = None,
        seed: Any = None,
        timeout: float | None = None,
        values: Selectable = "all",
        grads: Selectable = "all",
        unreached: str = "zeros",
        contributions: bool = False,
        diagnostics: bool = True,
        batch: int = 16,
        errors: str = "raise",
    ) -> list[Result | ChainruleRpcError]:
        """Evaluate ``target`` once per input set over one EvaluateStream call; results in order.

        The graph is sent and compiled once. ``inputs`` feed every set (a set's
        own value wins); ``batch`` sets travel per message, with the shared
        ``inputs`` once per message (16 by default: about 5x one call per set
        for small graphs; 1 streams set by set). Other options as in
        :meth:`evaluate`, for every set.
        ``errors="raise"`` raises the first failed set's error (its ``index``
        attribute says which set) and stops the call; ``"return"`` puts each
        failed set's error in the list in place of its Result.
        """
        return streams.evaluate_many(
            self.transport, target, input_sets, inputs, output=output, seed=seed,
            timeout=self.timeout if timeout is None else timeout, values=values, grads=grads,
            unreached=unreached, contributions=contributions, diagnostics=diagnostics, batch=batch, errors=errors,
        )

    def optimize(
        self,
        target: Any,
        params: Mapping[Any, Any],
        /,
        data: Mapping[Any, Any] | None = None,
        *,
        batches: Sequence[Mapping[Any, Any]] = (),
        loss: Any = None,
        optimizer: str = "sgd",
        lr: float = 0.01,
        momentum: float = 0.0,
        beta1: float | None = None,
        beta2: float | None = None,
        eps: float | None = None,
        steps: int = 100,
        target_loss: float | None = None,
        report_every: int | None = None,
        progress: bool | None = None,
        callback: Callable[[Progress], Any] | None = None,
        timeout: float | None = None,
    ) -> TrainResult:
        """Minimize the scalar ``target`` (a Var, or a Graph with ``loss=``) over ``params`` on the server.

        ``params``: initial values of the graph inputs to train. ``data``: the
        other inputs, the same at every step; ``batches``: per-step inputs,
        step k feeding ``batches[k % len(batches)]``. ``optimizer``: "sgd"
        (``lr``, ``momentum``) or "adam" (``lr``, ``beta1``, ``beta2``,
        ``eps``). Runs ``steps`` steps, or fewer once the loss reaches
        ``target_loss``; reports every ``report_every`` steps (default: up to
        10 times a second) to a progress bar (``progress``: None shows it on
        a terminal) and to ``callback(Progress)``. Returns the trained
        parameters and the whole loss history.
        """
        graph, loss_name = resolve_target(target, loss)
        request = training.optimize_request(
            graph, loss_name, params, data=data, batches=batches, optimizer=optimizer, lr=lr, momentum=momentum,
            beta1=beta1, beta2=beta2, eps=eps, steps=steps, target_loss=target_loss, report_every=report_every,
        )
        return training.optimize(self.transport, request, self.timeout if timeout is None else timeout,
                                 progress=progress, callback=callback)
