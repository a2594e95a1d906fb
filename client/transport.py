"""How a client reaches a service: the one thing ``Client`` and ``LocalClient`` do differently.

A :class:`Transport` makes the calls of the chainrule API and raises a
:class:`~chainrule.client.errors.ChainruleRpcError` when one fails; everything
else (checking arguments, choosing the graph to send, reading results,
streams and training) is shared in ``base.py``, ``streams.py`` and
``training.py``, which see only this interface. ``Client`` uses a gRPC
channel (``client.py``), ``LocalClient`` the service in its own process
(``chainrule.server.local``), which runs an evaluation on the engine
directly instead of through request and response messages.
"""
from __future__ import annotations

import threading
import weakref
from typing import Generator, Iterator

from chainrule.core.errors import ChainruleError
from chainrule.v1 import chainrule_pb2 as pb
from chainrule.wire.incoming import Incoming
from chainrule.wire.outgoing import Carrier, Outgoing, SharedMemory
from chainrule.wire.status import status_for

from .errors import NotFound, from_status
from .graph import Graph
from .request import EvaluateCall
from .result import Result
from .shared_memory import StagingFile, read_outputs


class Transport:
    """The calls; subclasses implement them. Streaming calls return generators: closing one ends the call.

    It also remembers the id the service gave each Graph object, so that later
    calls send the id instead of the graph.
    """

    def __init__(self) -> None:
        self._ids: weakref.WeakKeyDictionary[Graph, str] = weakref.WeakKeyDictionary()
        self._ids_lock = threading.Lock()

    # --- graph ids -------------------------------------------------------------------------------

    def known_id(self, graph: Graph) -> str | None:
        with self._ids_lock:
            return self._ids.get(graph)

    def remember(self, graph: Graph, graph_id: str) -> None:
        with self._ids_lock:
            self._ids[graph] = graph_id

    def forget(self, graph: Graph) -> None:
        with self._ids_lock:
            self._ids.pop(graph, None)

    # --- evaluate --------------------------------------------------------------------------------

    def evaluate(self, call: EvaluateCall) -> Result:
        """One evaluation, as request and response messages through :meth:`send_evaluate`.

        The graph travels whole the first time and by id afterwards; a service
        that does not know the id (restarted, evicted it, or another replica
        behind a balancer) answers NOT_FOUND, and the call is sent again with
        the graph, which that very service then compiles and keeps.
        """
        graph = call.graph
        graph_id = self.known_id(graph)
        staging = self.staging(call.timeout)
        succeeded = False
        try:
            request = call.request(graph_id=graph_id,
                                   carrier=self.carrier() if staging is None else SharedMemory(staging))
            if staging is not None:  # the server writes the large tensors of its answer there too
                request.message.shared_memory_output = staging.outputs.name
            try:
                response = self.send_evaluate(request, call.timeout)
            except NotFound:
                if graph_id is None:
                    raise
                request.message.graph.CopyFrom(graph.message)
                response = self.send_evaluate(request, call.timeout)
            if staging is not None:
                response = read_outputs(response, staging)  # before the files go to the next call
            succeeded = True
        except ChainruleError as exc:  # from our own side of shared memory: a full /dev/shm, say
            raise from_status(status_for(exc)) from None
        finally:
            if staging is not None:  # after a failure the server may still be writing into the files
                self.unstage(staging, reusable=succeeded)
        if graph_id is None and response.message.graph_id:
            self.remember(graph, response.message.graph_id)
        return Result(response, graph, diagnosed=call.diagnostics)

    # --- the calls (subclasses) ------------------------------------------------------------------

    def carrier(self) -> Carrier:
        """How a request's large tensors travel on this transport (a new carrier per request)."""
        raise NotImplementedError

    def send_evaluate(self, request: Outgoing, timeout: float | None) -> Incoming:
        """One Evaluate call: the request message out, the response back."""
        raise NotImplementedError

    def register(self, request: pb.RegisterGraphRequest, timeout: float | None) -> pb.RegisterGraphResponse:
        raise NotImplementedError

    def list_operators(self, timeout: float | None) -> pb.ListOperatorsResponse:
        raise NotImplementedError

    def derive(self, request: pb.DeriveRequest, timeout: float | None) -> pb.DeriveResponse:
        raise NotImplementedError

    def server_info(self, timeout: float | None) -> pb.ServerInfoResponse:
        raise NotImplementedError

    def evaluate_stream(self, requests: Iterator[pb.EvaluateRequest],
                        timeout: float | None) -> Generator[pb.EvaluateStreamResponse, None, None]:
        """The answers, lazily."""
        raise NotImplementedError

    def optimize(self, request: pb.OptimizeRequest,
                 timeout: float | None) -> Generator[pb.OptimizeProgress, None, None]:
        """The progress reports, lazily."""
        raise NotImplementedError

    def staging(self, timeout: float | None) -> StagingFile | None:
        """Where one call may write its large inputs instead of sending them (shared memory), or None."""
        return None

    def unstage(self, file: StagingFile, *, reusable: bool) -> None:
        """The call that had ``file`` has ended (and failed, when not ``reusable``)."""

    def close(self) -> None:
        """Release the connection (nothing to release in-process)."""
