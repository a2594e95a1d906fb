"""The gRPC server: a thin servicer over ChainruleService, plus health and reflection."""
from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from concurrent import futures
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from chainrule.core import StopToken
from chainrule.core.errors import ChainruleError, LimitExceeded, OperatorFailure
from chainrule.plugins.manager import Loaded, load_plugins
from chainrule.v1 import chainrule_pb2 as pb
from chainrule.v1 import chainrule_pb2_grpc as pb_grpc

from . import auth, tls, wire
from .config import ServerConfig, plugin_filters
from .guard import MalformedRequestInterceptor
from .incoming import Incoming, read_message
from .metrics import Exporter, Metrics
from .optimize import optimize
from .service import ChainruleService
from .streaming import call_token, client_requests, evaluate_stream
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
        with self._serving(method, context, size, headers_first=False):
            return work()

    def _stream(self, method: str, context: grpc.ServicerContext, work: Callable[[str], Iterator[Any]],
                size: int = 0) -> Iterator[Any]:
        """Like _call for a streaming response; ``work`` gets the request id. The slot is held to the end."""
        with self._serving(method, context, size) as request_id:
            yield from work(request_id)

    @contextmanager
    def _serving(self, method: str, context: grpc.ServicerContext, size: int,
                 headers_first: bool = True) -> Iterator[str]:
        """Request id, admission control, error statuses and the log line around one call.

        The request id travels in the trailers of a unary call (headers sent early would
        cost a write and stop the client's transparent retries) and in the headers of a
        stream, so the client knows the call has started.
        """
        request_id = uuid.uuid4().hex[:12]
        if headers_first:
            context.send_initial_metadata(((REQUEST_ID_KEY, request_id),))
        else:
            context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
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
            yield request_id
        except GeneratorExit:  # a streaming call closed by gRPC: the client went away
            outcome = "CANCELLED"
            raise
        except ChainruleError as exc:
            outcome = code_for(exc).name
            if isinstance(exc, OperatorFailure):
                log.error("request %s: %s", request_id, exc.message, exc_info=exc)
            context.abort_with_status(_with_request_id(to_grpc_status(status_for(exc, request_id)), request_id))
        except Exception:
            outcome = "INTERNAL"
            log.exception("request %s: unexpected error in %s", request_id, method)
            context.abort_with_status(_with_request_id(to_grpc_status(internal_status(request_id)), request_id))
        finally:
            if admitted:
                self._slots.release()
            log.info("%s id=%s nodes=%d %.1fms %s", method, request_id, size,
                     (time.perf_counter() - started) * 1000, outcome)

    def _token(self, context: grpc.ServicerContext, cap: float | None = None, limit: str = "max_compute_seconds") -> StopToken:
        """Stop work when the client's deadline passes, it cancels, or the server's time cap is hit."""
        remaining = context.time_remaining()
        cap = self.config.max_compute_seconds if cap is None else cap
        cancelled = threading.Event()
        context.add_callback(cancelled.set)
        if remaining is not None and remaining <= cap:
            return StopToken.after(remaining, cancelled, "the client's deadline")
        return StopToken.after(cap, cancelled, f"the server's time limit of {cap:g} s per request ({limit})")

    def Evaluate(self, request: Incoming, context: grpc.ServicerContext) -> wire.Outgoing:
        message = request.message
        size = len(message.graph.nodes) if message.HasField("graph") else 0
        return self._call("Evaluate", context, lambda: self.service.evaluate_wire(request, self._token(context)), size)

    def RegisterGraph(self, request: pb.RegisterGraphRequest, context: grpc.ServicerContext) -> pb.RegisterGraphResponse:
        return self._call("RegisterGraph", context, lambda: self.service.register_graph(request), len(request.graph.nodes))

    def ListOperators(self, request: pb.ListOperatorsRequest, context: grpc.ServicerContext) -> pb.ListOperatorsResponse:
        return self._call("ListOperators", context, lambda: self.service.list_operators(request))

    def ServerInfo(self, request: pb.ServerInfoRequest, context: grpc.ServicerContext) -> pb.ServerInfoResponse:
        return self._call("ServerInfo", context, lambda: self.service.server_info(request, self.worker))

    def EvaluateStream(self, requests: Iterator[pb.EvaluateRequest],
                       context: grpc.ServicerContext) -> Iterator[pb.EvaluateStreamResponse]:
        # A stream waiting for the client's next message checks no token: a timer ends it
        # after max_stream_seconds, so an idle stream cannot keep its admission slot.
        limit = threading.Timer(self.config.max_stream_seconds, context.cancel)
        limit.daemon = True
        limit.start()
        context.add_callback(limit.cancel)
        return self._stream("EvaluateStream", context, lambda request_id: evaluate_stream(
            self.service, client_requests(requests), call_token(context, self.config.max_stream_seconds),
            self.config.max_compute_seconds, request_id, max_reply_bytes=self.config.max_message_bytes // 2))

    def Optimize(self, request: pb.OptimizeRequest, context: grpc.ServicerContext) -> Iterator[pb.OptimizeProgress]:
        size = len(request.graph.nodes) if request.HasField("graph") else 0
        token = self._token(context, self.config.max_training_seconds, "max_training_seconds")
        return self._stream("Optimize", context, lambda request_id: optimize(self.service, request, token, request_id), size)


def _with_request_id(status: grpc.Status, request_id: str) -> grpc.Status:
    """The status with the request id added to its trailers (aborting replaces the call's own)."""
    return status._replace(trailing_metadata=(*status.trailing_metadata, (REQUEST_ID_KEY, request_id)))


class Running:
    """A created server with its health servicer, so it can be drained gracefully."""

    def __init__(self, server: grpc.Server, health_servicer: health.HealthServicer, service: ChainruleService,
                 metrics: Exporter | None = None) -> None:
        self.server = server
        self.health = health_servicer
        self.service = service
        #: The Prometheus endpoint (``metrics.port``), when metrics are on and exported by this process.
        self.metrics = metrics

    def drain(self, grace: float) -> threading.Event:
        """Report NOT_SERVING, refuse new calls, let in-flight ones finish within ``grace``."""
        self.health.enter_graceful_shutdown()
        if self.metrics is not None:
            self.metrics.close()
        return self.server.stop(grace)


def add_servicer(server: grpc.Server, servicer: Servicer) -> None:
    """Register every RPC of the service, like the generated ``add_ChainruleServicer_to_server``,
    but with a serializer that also takes responses whose large tensors are pre-encoded, and
    Evaluate's requests read by ``read_message``."""
    factories = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    # Evaluate's large input tensors are read as views of the received bytes (see incoming.py).
    readers = {"Evaluate": functools.partial(read_message, pb.EvaluateRequest)}
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["Chainrule"].methods:
        factory = factories[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = factory(
            getattr(servicer, method.name),
            request_deserializer=readers.get(method.name, getattr(pb, method.input_type.name).FromString),
            response_serializer=wire.serialize,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def connection_age_options(config: ServerConfig) -> list[tuple[str, int]]:
    """Close connections after ``max_connection_age_seconds`` (GOAWAY; calls in flight get the grace period)."""
    if config.max_connection_age_seconds <= 0:
        return []
    return [("grpc.max_connection_age_ms", int(config.max_connection_age_seconds * 1000)),
            ("grpc.max_connection_age_grace_ms", int(config.grace_seconds * 1000))]


def build_service(config: ServerConfig, loaded: Loaded | None = None) -> ChainruleService:
    loaded = loaded or load_plugins(**plugin_filters(config))
    checks = None
    if config.check_operators:  # refuse operators whose vjp disagrees with finite differences
        from chainrule.plugins.checking import check_and_refuse

        loaded, verdicts = check_and_refuse(loaded, log)
        checks = {c.op: pb.CHECK_PASSED if c.passed else pb.CHECK_FAILED for c in verdicts if c.checked}
    return ChainruleService(loaded, config.limits(), graph_cache_size=config.graph_cache_size, checks=checks,
                            shared_memory_dir=config.shared_memory_dir)


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
    export_metrics: bool = True,
) -> tuple[Running, int]:
    """Like create_server, returning a Running handle (for graceful drains).

    ``export_metrics=False`` records metrics without serving them (a worker
    process whose parent serves the metrics of all workers).
    """
    config = (config or ServerConfig()).validate()
    service = service or build_service(config)
    metrics = Metrics() if config.metrics_port else None
    # Outermost first: metrics count every call, refused ones too; auth refuses before parsing.
    interceptors = [i for i in (metrics and metrics.interceptor(service),
                                auth.interceptor_for(config.token_file, config.open_health_and_reflection),
                                MalformedRequestInterceptor(SERVICE_NAME)) if i]
    # Threads beyond max_concurrent let refusals be answered at once; gRPC's own
    # limit is only a backstop (it counts calls until their clean-up ends).
    spare = max(4, config.max_concurrent // 2)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_concurrent + spare, thread_name_prefix="chainrule"),
        maximum_concurrent_rpcs=2 * config.max_concurrent + spare,
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            *connection_age_options(config),
            *(options or []),
        ],
    )
    add_servicer(server, Servicer(service, config, worker))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if config.reflection:
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server,
        )
    credentials = tls.server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
    bind = address or config.address
    try:
        port = server.add_secure_port(bind, credentials) if credentials else server.add_insecure_port(bind)
    except RuntimeError as exc:  # grpc raises RuntimeError when the address is taken or invalid
        raise OSError(f"could not bind {bind}: {exc}") from None
    exporter = Exporter(metrics.registry, config.host, config.metrics_port) if metrics and export_metrics else None
    return Running(server, health_servicer, service, exporter), port
