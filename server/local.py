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

from typing import Any, Callable, Generator, Iterator

import numpy as np

from chainrule.client.base import ClientBase
from chainrule.client.errors import from_status
from chainrule.client.transport import Transport
from chainrule.core import Limits, StopToken
from chainrule.core.errors import ChainruleError
from chainrule.plugins.manager import Loaded, load_plugins
from chainrule.v1 import chainrule_pb2 as pb
from chainrule.wire.incoming import Incoming, RawTensor
from chainrule.wire.outgoing import Carrier, InProcess, Outgoing
from chainrule.wire.status import status_for

from .config import ServerConfig
from .service import ChainruleService, evaluate_stream, optimize


class LocalClient(ClientBase):
    """Evaluate graphs in this process. ``loaded`` defaults to ``load_plugins()``;
    ``limits`` to those of a server with default settings."""

    transport: "InProcessTransport"

    def __init__(self, loaded: Loaded | None = None, *, limits: Limits | None = None,
                 timeout: float | None = None) -> None:
        service = ChainruleService(loaded if loaded is not None else load_plugins(),
                                   limits or ServerConfig().limits())
        super().__init__(InProcessTransport(service), timeout=timeout)

    @property
    def service(self) -> ChainruleService:
        """The service this client calls."""
        return self.transport.service

    def __repr__(self) -> str:
        return f"<LocalClient: {len(self.service.registry)} operators>"


class InProcessTransport(Transport):
    """The calls as direct calls of ``service``. Large tensors go to the service and come back
    as the arrays themselves (read-only views): the same checks as over the wire, without
    copying them through protobuf each way."""

    def __init__(self, service: ChainruleService) -> None:
        self.service = service

    def carrier(self) -> Carrier:
        return InProcess()

    @staticmethod
    def _call(work: Callable[[], Any]) -> Any:
        try:
            return work()
        except ChainruleError as exc:
            raise from_status(status_for(exc)) from exc

    def evaluate(self, request: Outgoing, timeout: float | None) -> Incoming:
        token = None if timeout is None else StopToken.after(timeout, what="the timeout")
        response = self._call(lambda: self.service.evaluate(request.incoming(), token, InProcess()).incoming())
        return _detached(response, request)

    def register(self, request: pb.RegisterGraphRequest, timeout: float | None) -> pb.RegisterGraphResponse:
        return self._call(lambda: self.service.register_graph(request))

    def list_operators(self, timeout: float | None) -> pb.ListOperatorsResponse:
        return self._call(lambda: self.service.list_operators(pb.ListOperatorsRequest()))

    def server_info(self, timeout: float | None) -> pb.ServerInfoResponse:
        return self._call(lambda: self.service.server_info(pb.ServerInfoRequest()))

    def evaluate_stream(self, requests: Iterator[pb.EvaluateRequest],
                        timeout: float | None) -> Generator[pb.EvaluateStreamResponse, None, None]:
        token = None if timeout is None else StopToken.after(timeout)
        return self._follow(evaluate_stream(self.service, requests, token))

    def optimize(self, request: pb.OptimizeRequest,
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
