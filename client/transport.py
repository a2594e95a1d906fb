"""How a client reaches a service: the one thing ``Client`` and ``LocalClient`` do differently.

A :class:`Transport` makes the calls of the chainrule API and raises a
:class:`~chainrule.client.errors.ChainruleRpcError` when one fails; everything
else (building requests, graph ids, reading results, streams and training)
is shared in ``base.py``, ``streams.py`` and ``training.py``, which see only
this interface. ``Client`` uses a gRPC channel (``client.py``), ``LocalClient``
the service in its own process (``chainrule.server.local``).
"""
from __future__ import annotations

from typing import Generator, Iterator

from chainrule.v1 import chainrule_pb2 as pb
from chainrule.wire.incoming import Incoming
from chainrule.wire.outgoing import Carrier, Outgoing

from .shared_memory import StagingFile


class Transport:
    """The calls; subclasses implement them. Streaming calls return generators: closing one ends the call."""

    def carrier(self) -> Carrier:
        """How a request's large tensors travel on this transport (a new carrier per request)."""
        raise NotImplementedError

    def evaluate(self, request: Outgoing, timeout: float | None) -> Incoming:
        raise NotImplementedError

    def register(self, request: pb.RegisterGraphRequest, timeout: float | None) -> pb.RegisterGraphResponse:
        raise NotImplementedError

    def list_operators(self, timeout: float | None) -> pb.ListOperatorsResponse:
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
