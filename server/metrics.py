"""Prometheus metrics: a server interceptor that measures every call, and the HTTP endpoint.

Measured per call, for every service (chainrule, health, reflection):
``chainrule_requests_total{method,code}``, ``chainrule_request_duration_seconds{method}``
(histogram), ``chainrule_requests_in_flight{method}``, ``chainrule_received_bytes_total{method}`` and
``chainrule_sent_bytes_total{method}`` (serialized message sizes), and
``chainrule_nodes_evaluated_total`` (operator nodes of every graph evaluated, read from
each EvaluateResponse, streamed ones included). ``method`` is the full gRPC method
name without the leading slash; unknown methods are never measured, so the label
set stays bounded whatever clients send.

prometheus_client picks its value store when it is first imported: a shared
directory (``PROMETHEUS_MULTIPROC_DIR``) when several worker processes serve one
port, process memory otherwise. It is therefore imported only once metrics are
turned on, after ``--workers`` has set that variable (see workers.py).
"""
from __future__ import annotations

import time
from typing import Any, Callable

import grpc

from chainrule.core.errors import ChainruleError
from chainrule.v1 import chainrule_pb2 as pb
from chainrule.wire.outgoing import Outgoing

from .guard import HandlerCache, behavior_field
from .service import ChainruleService

#: Request latency buckets (seconds): sub-millisecond cache hits up to the compute cap.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The metric families of one server, in ``registry`` (a fresh one by default)."""

    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter("chainrule_requests", "Calls answered, by gRPC method and status code",
                                ["method", "code"], registry=r)
        self.duration = Histogram("chainrule_request_duration_seconds",
                                  "Time spent answering a call (its handler), by method",
                                  ["method"], buckets=BUCKETS, registry=r)
        self.in_flight = Gauge("chainrule_requests_in_flight", "Calls being served now, by method", ["method"],
                               registry=r, multiprocess_mode="livesum")
        self.nodes = Counter("chainrule_nodes_evaluated", "Operator nodes of the graphs evaluated", registry=r)
        self.received = Counter("chainrule_received_bytes", "Serialized request bytes, by method", ["method"],
                                registry=r)
        self.sent = Counter("chainrule_sent_bytes", "Serialized response bytes, by method", ["method"], registry=r)

    def interceptor(self, service: ChainruleService) -> "MetricsInterceptor":
        return MetricsInterceptor(self, service)


class MetricsInterceptor(grpc.ServerInterceptor):
    """Wraps each known method's handler: counts bytes in its (de)serializers, time and code around its behaviour."""

    def __init__(self, metrics: Metrics, service: ChainruleService) -> None:
        self.metrics = metrics
        self.service = service
        self._wrapped = HandlerCache()  # the measuring handler per method, made once (see HandlerCache)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or not hasattr(handler, "_replace"):  # unknown method: gRPC answers UNIMPLEMENTED
            return handler
        return self._wrapped.get(handler_call_details.method, handler, self._wrap)

    def _wrap(self, full_method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """``handler`` measured: its metric children looked up once here, not on every call."""
        method = full_method.lstrip("/")
        kind = behavior_field(handler)
        return handler._replace(**{
            "request_deserializer": self._count_in(method, handler.request_deserializer),
            "response_serializer": self._count_out(method, handler.response_serializer),
            kind: self._timed(method, getattr(handler, kind), handler.response_streaming),
        })

    def _count_in(self, method: str, deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
        received = self.metrics.received.labels(method)

        def counted(data: bytes) -> Any:
            received.inc(len(data))
            return data if deserialize is None else deserialize(data)

        return counted

    def _count_out(self, method: str, serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes]:
        sent = self.metrics.sent.labels(method)

        def counted(message: Any) -> bytes:
            data = message if serialize is None else serialize(message)
            sent.inc(len(data))
            self._count_nodes(message)
            return data

        return counted

    def _count_nodes(self, message: Any) -> None:
        if isinstance(message, Outgoing):
            message = message.message
        if isinstance(message, pb.EvaluateStreamResponse):
            for item in (message, *message.results):
                if item.HasField("response"):
                    self._count_nodes(item.response)
        elif isinstance(message, pb.EvaluateResponse) and message.graph_id:
            try:  # the plan was just used, so this is a cache hit
                _, plan = self.service.plan_for(pb.EvaluateRequest(graph_id=message.graph_id))
            except ChainruleError:  # evicted meanwhile: not worth failing a response over
                return
            self.metrics.nodes.inc(len(plan) - plan.n_inputs)

    def _timed(self, method: str, behavior: Callable[..., Any], streaming: bool) -> Callable[..., Any]:
        m = self.metrics
        duration, in_flight = m.duration.labels(method), m.in_flight.labels(method)

        def finish(context: grpc.ServicerContext, started: float, failed: BaseException | None) -> None:
            code = context.code()
            if code is None:
                code = grpc.StatusCode.OK if failed is None else (
                    grpc.StatusCode.CANCELLED if isinstance(failed, GeneratorExit) else grpc.StatusCode.UNKNOWN)
            m.requests.labels(method, code.name).inc()
            duration.observe(time.perf_counter() - started)
            in_flight.dec()

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            started, failed = time.perf_counter(), None
            in_flight.inc()
            try:
                return behavior(request, context)
            except BaseException as exc:
                failed = exc
                raise
            finally:
                finish(context, started, failed)

        def stream(request: Any, context: grpc.ServicerContext) -> Any:
            started, failed = time.perf_counter(), None
            in_flight.inc()
            try:
                yield from behavior(request, context)
            except BaseException as exc:
                failed = exc
                raise
            finally:
                finish(context, started, failed)

        return stream if streaming else unary


class Exporter:
    """The HTTP endpoint Prometheus scrapes (``/metrics``), served from a daemon thread."""

    def __init__(self, registry: Any, host: str, port: int) -> None:
        from prometheus_client import start_http_server

        self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        self.port: int = self._httpd.server_port
        self._closed = False

    def close(self) -> None:
        """Stop serving (again: nothing happens)."""
        if not self._closed:
            self._closed = True
            self._httpd.shutdown()
            self._httpd.server_close()


def multiprocess_exporter(host: str, port: int) -> Exporter:
    """An endpoint adding up the metrics every worker wrote to ``PROMETHEUS_MULTIPROC_DIR``."""
    from prometheus_client import CollectorRegistry, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return Exporter(registry, host, port)


def forget_process(pid: int) -> None:
    """A worker exited: drop its share of the live gauges (in-flight calls)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)
