"""LocalClient: the same API as Client, in-process, without gRPC.

It calls the server's own domain logic (``ChainruleService``) with the same
plugin registry (``load_plugins()``, honoring CHAINRULE_PLUGINS and
CHAINRULE_DISABLE_PLUGINS), so a graph gives bit-identical results through
both clients. Errors become the same typed exceptions, through the status the
server would have sent.
"""
from __future__ import annotations

from typing import Any, Callable, Generator, Iterator

import numpy as np

from chainrule.core import Limits, StopToken
from chainrule.core.errors import ChainruleError
from chainrule.plugins.manager import Loaded, load_plugins
from chainrule.server.config import ServerConfig
from chainrule.server.incoming import Incoming, RawTensor
from chainrule.server.optimize import optimize
from chainrule.server.service import ChainruleService
from chainrule.server.status import status_for
from chainrule.server.streaming import evaluate_stream
from chainrule.server.wire import Outgoing
from chainrule.v1 import chainrule_pb2 as pb

from .base import ClientBase
from .errors import from_status


class LocalClient(ClientBase):
    """Evaluate graphs in this process. ``loaded`` defaults to ``load_plugins()``;
    ``limits`` to those of a server with default settings."""

    def __init__(self, loaded: Loaded | None = None, *, limits: Limits | None = None,
                 timeout: float | None = None) -> None:
        super().__init__(timeout=timeout)
        self.service = ChainruleService(loaded if loaded is not None else load_plugins(),
                                        limits or ServerConfig().limits())

    def __repr__(self) -> str:
        return f"<LocalClient: {len(self.service.registry)} operators>"

    def _call(self, work: Callable[[], Any]) -> Any:
        try:
            return work()
        except ChainruleError as exc:
            raise from_status(status_for(exc)) from exc

    #: Large tensors go to the service and come back as the arrays themselves (read-only views):
    #: the same checks as over the wire, without copying 16 MiB through protobuf each way.
    keep_large_tensors = True

    def _evaluate(self, request: Outgoing, timeout: float | None) -> Incoming:
        token = None if timeout is None else StopToken.after(timeout, what="the timeout")
        response = self._call(lambda: self.service.evaluate_wire(request.incoming(), token, split=False,
                                                                 keep=True).incoming())
        return _detached(response, request)

    def _register(self, request: pb.RegisterGraphRequest, timeout: float | None) -> pb.RegisterGraphResponse:
        return self._call(lambda: self.service.register_graph(request))

    def _list_operators(self, timeout: float | None) -> pb.ListOperatorsResponse:
        return self._call(lambda: self.service.list_operators(pb.ListOperatorsRequest()))

    def _server_info(self, timeout: float | None) -> pb.ServerInfoResponse:
        return self._call(lambda: self.service.server_info(pb.ServerInfoRequest()))

    def _evaluate_stream(self, requests: Iterator[pb.EvaluateRequest],
                         timeout: float | None) -> Generator[pb.EvaluateStreamResponse, None, None]:
        token = None if timeout is None else StopToken.after(timeout)
        return self._follow(evaluate_stream(self.service, requests, token))

    def _optimize(self, request: pb.OptimizeRequest,
                  timeout: float | None) -> Generator[pb.OptimizeProgress, None, None]:
        token = None if timeout is None else StopToken.after(timeout)
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
    kept = [*request.kept_singles.values(), *(t for entries in request.kept_maps.values() for t in entries.values())]
    if not kept:
        return response
    sources = [np.asarray(raw.data) for raw in kept]
    for tensors in (*response.raw_maps.values(), response.raw_singles):
        for key, raw in list(tensors.items()):
            data = np.asarray(raw.data)
            if any(np.may_share_memory(data, source) for source in sources):
                tensors[key] = RawTensor(raw.dtype, raw.shape, memoryview(data.copy()).toreadonly())
    return response
