"""Graceful lifecycle of ``chainrule serve``: SIGTERM with 10 calls in flight.

Health turns NOT_SERVING (a Watch stream sees it), new calls get UNAVAILABLE
while the 10 in-flight calls are still computing, all 10 then finish with
correct answers within the grace period, and the process exits 0.
"""
from __future__ import annotations

import signal
import time

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chainrule.server import LocalClient
from chainrule.v1 import chainrule_pb2 as pb

from serving import ServerProcess, free_port, scrape, slow_graph

IN_FLIGHT = 10
EVALUATING = 'chainrule_requests_in_flight{method="chainrule.v1.Chainrule/Evaluate"}'


def server_info(address: str) -> grpc.StatusCode:
    """The code of one ServerInfo call on a fresh connection (no retries)."""
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary("/chainrule.v1.Chainrule/ServerInfo",
                                   request_serializer=pb.ServerInfoRequest.SerializeToString,
                                   response_deserializer=pb.ServerInfoResponse.FromString)
        try:
            call(pb.ServerInfoRequest(), timeout=5)
            return grpc.StatusCode.OK
        except grpc.RpcError as error:
            return error.code()


def test_sigterm_drains_in_flight_calls_refuses_new_ones_and_exits_0():
    graph = slow_graph(steps=500)  # about 0.1 s of work per call alone, a second or so for all ten together
    request = pb.EvaluateRequest(graph=graph.graph.message, inputs={"x": pb.Tensor(values=pb.DoubleList(values=[0.5]))},
                                 return_values=pb.Selection(mode=pb.Selection.NONE),
                                 return_grads=pb.Selection(mode=pb.Selection.NONE))
    expected = LocalClient().evaluate(graph, x=0.5, values="none", grads="none").value

    metrics = free_port()
    with ServerProcess("--grace-seconds", "60", "--metrics-port", str(metrics), "--log-level", "INFO") as server:
        with grpc.insecure_channel(server.address) as channel, grpc.insecure_channel(server.address) as watching:
            watch = health_pb2_grpc.HealthStub(watching).Watch(health_pb2.HealthCheckRequest(), timeout=60)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            evaluate = channel.unary_unary("/chainrule.v1.Chainrule/Evaluate",
                                           request_serializer=pb.EvaluateRequest.SerializeToString,
                                           response_deserializer=pb.EvaluateResponse.FromString)
            calls = [evaluate.future(request, timeout=60) for _ in range(IN_FLIGHT)]
            for _ in range(500):  # until the server reports all ten in flight
                if scrape(metrics).get(EVALUATING, 0) == IN_FLIGHT:
                    break
                time.sleep(0.01)
            assert scrape(metrics)[EVALUATING] == IN_FLIGHT and not any(call.done() for call in calls)

            server.send(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()  # (an open Watch would itself count as in flight until the grace period ends)
            refused = grpc.StatusCode.OK
            for _ in range(100):  # the listener closes right after health turns NOT_SERVING
                refused = server_info(server.address)
                if refused == grpc.StatusCode.UNAVAILABLE:
                    break
                # OK: accepted just before the listener closed. CANCELLED: accepted by the transport
                # as the stop began, then dropped by gRPC with the wrong code (grpc/grpc#41785);
                # the Client retries both UNAVAILABLE and CANCELLED.
                assert refused in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED), refused
                time.sleep(0.02)
            assert refused == grpc.StatusCode.UNAVAILABLE
            assert not all(call.done() for call in calls)  # refused while the in-flight calls still compute

            for call in calls:  # every in-flight call finishes, with the right answer
                assert _scalar(call.result(timeout=60).output_value) == float(expected)
        assert server.wait() == 0
        assert "draining" in server.log()


def _scalar(tensor: pb.Tensor) -> float:
    return float(np.frombuffer(tensor.data, "<f8")[0]) if tensor.data else tensor.values.values[0]
