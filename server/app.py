"""The gRPC server: a thin servicer over ChainruleService, plus health and reflection."""
from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent import futures
from typing import Any, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from chainrule.core import StopToken
from chainrule.core.errors import ChainruleError, LimitExceeded, OperatorFailure
from chainrule.plugins.manager import Loaded, load_plugins
from chainrule.v1 import chainrule_pb2 as pb
from chainrule.v1 import chainrule_pb2_grpc as pb_grpc

from .config import ServerConfig, plugin_filters
from .service import ChainruleService
from .status import code_for, internal_status, status_for, to_grpc_status

log = logging.getLogger("chainrule.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Chainrule"].full_name
REQUEST_ID_KEY = "chainrule-request-id"


class Servicer(pb_grpc.ChainruleServicer):
    """Converts calls into service calls and errors into statuses; nothing else."""

    def __init__(self, service: ChainruleService, config: ServerConfig, worker: int = 0) -> None:
        self.service = service
        self.config = config
        self.worker = worker
        # Admission control: excess calls are refused at once with RESOURCE_EXHAUSTED
        # naming the limit, rather than queueing behind slow ones.
        self._slots = threading.BoundedSemaphore(config.max_concurrent)

    def _call(self, method: str, context: grpc.ServicerContext, work: Callable[[], Any], size: int = 0) -> Any:
        request_id = uuid.uuid4().hex[:12]
        context.send_initial_metadata(((REQUEST_ID_KEY, request_id),))
        started = time.perf_counter()
        outcome = "OK"
        admitted = False
        try:
            admitted = self._slots.acquire(blocking=False)
            if not admitted:
                allowed = self.config.max_concurrent
                raise LimitExceeded(
                    f"the server is already serving {allowed} calls (max_concurrent); retry later",
                    limit="max_concurrent", requested=allowed + 1, allowed=allowed,
                )
            return work()
        except ChainruleError as exc:
            outcome = code_for(exc).name
            if isinstance(exc, OperatorFailure):
                log.error("request %s: %s", request_id, exc.message, exc_info=exc)
            context.abort_with_status(to_grpc_status(status_for(exc, request_id)))
        except Exception:
            outcome = "INTERNAL"
            log.exception("request %s: unexpected error in %s", request_id, method)
            context.abort_with_status(to_grpc_status(internal_status(request_id)))
        finally:
            if admitted:
                self._slots.release()
            log.info("%s id=%s nodes=%d %.1fms %s", method, request_id, size,
                     (time.perf_counter() - started) * 1000, outcome)

    def _token(self, context: grpc.ServicerContext) -> StopToken:
        """Stop work when the client's deadline passes, it cancels, or the compute cap is hit."""
        remaining = context.time_remaining()
        cap = self.config.max_compute_seconds
        seconds = cap if remaining is None else min(remaining, cap)
        cancelled = threading.Event()
        context.add_callback(cancelled.set)
        return StopToken.after(seconds, cancelled)

    def Evaluate(self, request: pb.EvaluateRequest, context: grpc.ServicerContext) -> pb.EvaluateResponse:
        size = len(request.graph.nodes) if request.HasField("graph") else 0
        return self._call("Evaluate", context, lambda: self.service.evaluate(request, self._token(context)), size)

    def RegisterGraph(self, request: pb.RegisterGraphRequest, context: grpc.ServicerContext) -> pb.RegisterGraphResponse:
        return self._call("RegisterGraph", context, lambda: self.service.register_graph(request), len(request.graph.nodes))

    def ListOperators(self, request: pb.ListOperatorsRequest, context: grpc.ServicerContext) -> pb.ListOperatorsResponse:
        return self._call("ListOperators", context, lambda: self.service.list_operators(request))

    def ServerInfo(self, request: pb.ServerInfoRequest, context: grpc.ServicerContext) -> pb.ServerInfoResponse:
        return self._call("ServerInfo", context, lambda: self.service.server_info(request, self.worker))


class Running:
    """A created server with its health servicer, so it can be drained gracefully."""

    def __init__(self, server: grpc.Server, health_servicer: health.HealthServicer, service: ChainruleService) -> None:
        self.server = server
        self.health = health_servicer
        self.service = service

    def drain(self, grace: float) -> threading.Event:
        """Report NOT_SERVING, refuse new calls, let in-flight ones finish within ``grace``."""
        self.health.enter_graceful_shutdown()
        return self.server.stop(grace)


def build_service(config: ServerConfig, loaded: Loaded | None = None) -> ChainruleService:
    loaded = loaded or load_plugins(**plugin_filters(config))
    return ChainruleService(loaded, config.limits(), graph_cache_size=config.graph_cache_size)


def create_server(
    address: str | None = None,
    config: ServerConfig | None = None,
    *,
    service: ChainruleService | None = None,
    worker: int = 0,
) -> tuple[grpc.Server, int]:
    """Build (not start) a server on ``address`` (port 0 picks a free port); returns it and its port."""
    running, port = create_running_server(address, config, service=service, worker=worker)
    return running.server, port


def create_running_server(
    address: str | None = None,
    config: ServerConfig | None = None,
    *,
    service: ChainruleService | None = None,
    worker: int = 0,
    options: list[tuple[str, Any]] | None = None,
) -> tuple[Running, int]:
    """Like create_server, returning a Running handle (for graceful drains)."""
    config = config or ServerConfig()
    service = service or build_service(config)
    # Threads beyond max_concurrent let refusals be answered at once; gRPC's own
    # limit is only a backstop (it counts calls until their clean-up ends).
    spare = max(4, config.max_concurrent // 2)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_concurrent + spare, thread_name_prefix="chainrule"),
        maximum_concurrent_rpcs=2 * config.max_concurrent + spare,
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            *(options or []),
        ],
    )
    pb_grpc.add_ChainruleServicer_to_server(Servicer(service, config, worker), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if config.reflection:
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server,
        )
    port = server.add_insecure_port(address or config.address)
    if port == 0:
        raise OSError(f"could not bind {address or config.address}")
    return Running(server, health_servicer, service), port
