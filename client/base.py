"""The API both clients share; each supplies only its transport (see transport.py).

``Client`` sends requests over gRPC, ``LocalClient`` hands them to the
service in-process. Checking arguments, choosing what to send (only what the
output needs) and the feeds happen here, once; the transport carries the
call, so the two give identical results. What a call resolves to before its
inputs are read is kept per client (request.CallTemplates): a repeated call
parses and prunes nothing again.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

from chainrule.v1 import chainrule_pb2 as pb

from . import streams, training
from .builder import Var
from .errors import ChainruleRpcError, NotFound
from .graph import DerivedGraph, Graph
from .info import OperatorInfo, ServerInfo
from .request import CallTemplates, EvaluateCall, Selectable, as_graph, resolve_target
from .result import Result, name_of
from .training import Progress, TrainResult
from .transport import Transport


class ClientBase:
    """Evaluate graphs, register them, list operators, stream and train, over ``transport``.
    A context manager."""

    def __init__(self, transport: Transport, *, timeout: float | None = None) -> None:
        #: How this client reaches its service (see transport.py).
        self.transport = transport
        self.timeout = timeout
        #: What each form of evaluate call resolved to (graph, selections), reused by the next alike.
        self._templates = CallTemplates()

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
        values: Selectable = "none",
        grads: Selectable = "all",
        unreached: str = "zeros",
        contributions: bool = False,
        diagnostics: bool = True,
        **named_inputs: Any,
    ) -> Result:
        """Run ``target`` forward, then backward from its output; return a :class:`Result`.

        ``target`` is a Var (it is the output, and only the nodes it depends on
        are sent and run, with those named in ``values``/``grads``: inputs it
        does not use need no feed, and a feed for one is ignored) or a Graph
        (sent whole; ``output=`` names the output unless the graph has only one).
        Inputs come as a mapping (names or Vars as keys) and/or keywords; an
        input named like a parameter of this method (``seed``, ``inputs``...)
        goes in the mapping.
        By default the result holds the output's value and the gradient of
        every node (``grads="all"``); other nodes' values only when asked
        (``values="all"`` or a list). ``values``/``grads``: "all", "none" or a
        list of names/Vars (a name given twice is returned once);
        ``grads="none"`` runs forward only. ``unreached``: "zeros" or "omit".
        A non-scalar output needs ``seed`` of its shape. ``diagnostics=False``
        spares the server the numerical health check (about one read of every
        tensor); ``Result.diagnostics`` is then None.
        """
        template = self._templates.template(target, output, values, grads, unreached)
        call = EvaluateCall(template.graph, template.output, template.feeds(inputs, named_inputs), seed,
                            template.values, template.grads, unreached, contributions, diagnostics,
                            self.timeout if timeout is None else timeout, template)
        return self.transport.evaluate(call)

    def register(self, graph: Any, *, timeout: float | None = None) -> str:
        """Register a Graph (or a builder's graph); later evaluations of it send only the id."""
        graph = as_graph(graph)
        response = self.transport.register(pb.RegisterGraphRequest(graph=graph.message),
                                           self.timeout if timeout is None else timeout)
        self.transport.remember(graph, response.graph_id)
        return response.graph_id

    def registered_id(self, graph: Graph) -> str | None:
        """The id this client sends ``graph`` by: registered, or learned from the first evaluation."""
        return self.transport.known_id(graph)

    def forget(self, graph: Graph) -> None:
        """Stop sending ``graph`` by id (the next evaluation sends it whole)."""
        self.transport.forget(graph)

    def derive(self, target: Any, /, wrt: Any, *, output: Any = None, mode: str = "reverse", seed: bool = False,
               timeout: float | None = None) -> DerivedGraph:
        """The derivative of ``target`` as a new graph, built by the server from its operators'
        symbolic rules (docs/derivatives.md): evaluate it, register it, render it, derive it again.

        ``target`` is a Var (its graph, differentiated at it) or a Graph (``output=`` names the value
        unless the graph has one output); ``wrt`` one or more Vars or names. ``mode="reverse"``: the
        graph's outputs are the gradients (``.gradients`` maps each wrt name to its output); with
        ``seed=True`` it takes the output's cotangent as an input (``.seed_input``), else the output
        must have one element. ``mode="forward"``: a Jacobian-vector product, with one tangent input
        per wrt name (``.tangents``) and the output's tangent as the output (``.tangent_output``).
        """
        if mode not in ("reverse", "forward"):
            raise ValueError(f"mode: expected 'reverse' or 'forward', got {mode!r}")
        given = [wrt] if isinstance(wrt, (str, Var)) else list(wrt)
        graph, output_name = resolve_target(target, output)
        if isinstance(target, Var):  # a wrt Var the output does not read is still declared (its gradient: zeros)
            graph = target.builder.graph_for(target, *(w for w in given if isinstance(w, Var)))
        names = [name_of(w) for w in given]
        request = pb.DeriveRequest(output=output_name or "", wrt=names, seed=seed,
                                   mode=pb.DERIVATIVE_MODE_FORWARD if mode == "forward" else pb.DERIVATIVE_MODE_REVERSE)
        graph_id = self.transport.known_id(graph)
        if graph_id is not None:
            request.graph_id = graph_id
        else:
            request.graph.CopyFrom(graph.message)
        timeout = self.timeout if timeout is None else timeout
        try:
            response = self.transport.derive(request, timeout)
        except NotFound:
            if graph_id is None:
                raise
            request.graph.CopyFrom(graph.message)
            response = self.transport.derive(request, timeout)
        derived = DerivedGraph.from_proto(response)
        if response.graph_id:
            self.transport.remember(derived, response.graph_id)
        return derived

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
        values: Selectable = "none",
        grads: Selectable = "all",
        unreached: str = "zeros",
        contributions: bool = False,
        diagnostics: bool = True,
        batch: int = 16,
        errors: str = "raise",
        parallel: int = 1,
    ) -> list[Result | ChainruleRpcError]:
        """Evaluate ``target`` once per input set over one EvaluateStream call; results in order.

        The graph is sent and compiled once. ``inputs`` feed every set (a set's
        own value wins); ``batch`` sets travel per message, with the shared
        ``inputs`` once per message (16 by default: about 5x one call per set
        for small graphs; 1 streams set by set). Other options as in
        :meth:`evaluate`, for every set.
        ``parallel=N`` spreads the input sets over N concurrent EvaluateStream
        calls (a round_robin address list then uses every replica); results
        stay in input-set order and errors are as with one call.
        ``errors="raise"`` raises the first failed set's error (its ``index``
        attribute says which set) and stops the call; ``"return"`` puts each
        failed set's error in the list in place of its Result.
        """
        return streams.evaluate_many(
            self.transport, target, input_sets, inputs, output=output, seed=seed,
            timeout=self.timeout if timeout is None else timeout, values=values, grads=grads,
            unreached=unreached, contributions=contributions, diagnostics=diagnostics, batch=batch, errors=errors,
            parallel=parallel,
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
        parameters and the whole loss history. A run that the timeout or the
        server's max_training_seconds would cut short stops in time and returns
        normally with what it trained (``stopped_early`` and ``stop_reason`` set).
        """
        graph, loss_name = resolve_target(target, loss)
        request = training.optimize_request(
            graph, loss_name, params, data=data, batches=batches, optimizer=optimizer, lr=lr, momentum=momentum,
            beta1=beta1, beta2=beta2, eps=eps, steps=steps, target_loss=target_loss, report_every=report_every,
        )
        return training.optimize(self.transport, request, self.timeout if timeout is None else timeout,
                                 progress=progress, callback=callback)

