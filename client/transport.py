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

from .errors import ChainruleRpcError, NotFound, from_status
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
        the graph, which that very service then compiles and keeps. Large
        tensors go through shared memory when :meth:`staging` gives files for
        them; a call that shared memory failed goes through the messages when
        :meth:`shared_memory_failed` says so.
        """
        graph = call.graph
        graph_id = self.known_id(graph)
        staging = self.staging(call)
        response = None if staging is None else self._evaluate_staged(call, graph_id, staging)
        if response is None:
            response = self._send(call, call.request(graph_id=graph_id, carrier=self.carrier()), graph_id)
        if graph_id is None and response.message.graph_id:
            self.remember(graph, response.message.graph_id)
        return Result(response, graph, diagnosed=call.diagnostics)

    def _evaluate_staged(self, call: EvaluateCall, graph_id: str | None, staging: StagingFile) -> Incoming | None:
        """The response of the call sent with its large tensors in ``staging``'s files; None when shared
        memory failed it and it is to go through the messages instead (see shared_memory_failed)."""
        succeeded = False
        try:
            request = call.request(graph_id=graph_id, carrier=SharedMemory(staging))
            request.message.shared_memory_output = staging.outputs.name  # the large tensors of the answer go there
            response = read_outputs(self._send(call, request, graph_id), staging)  # before the files are reused
            succeeded = True
            return response
        except ChainruleError as exc:  # from our own side of shared memory: a full /dev/shm, say
            error = from_status(status_for(exc))
        except ChainruleRpcError as exc:
            error = exc
        finally:  # after a failure the server may still be writing into the files
            self.unstage(staging, reusable=succeeded)
        if self.shared_memory_failed(error):
            return None
        raise error

    def _send(self, call: EvaluateCall, request: Outgoing, graph_id: str | None) -> Incoming:
        """:meth:`send_evaluate`, and once more with the whole graph when the service does not know its id."""
        try:
            return self.send_evaluate(request, call.timeout)
        except NotFound:
            if graph_id is None:
                raise
            request.message.graph.CopyFrom(call.graph.message)
            return self.send_evaluate(request, call.timeout)

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

    def staging(self, call: EvaluateCall) -> StagingFile | None:
        """Where ``call`` may write its large inputs instead of sending them (shared memory), or None."""
        return None

    def unstage(self, file: StagingFile, *, reusable: bool) -> None:
        """The call that had ``file`` has ended (and failed, when not ``reusable``)."""

    def shared_memory_failed(self, error: ChainruleRpcError) -> bool:
        """A call in shared memory failed with ``error``: whether to send it again through the messages."""
        return False

    def close(self) -> None:
        """Release the connection (nothing to release in-process)."""
