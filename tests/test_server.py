"""The server's own promises: standard health and reflection, limits, input
checks with rich error details, request logging, and the command line."""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from chainrule.client import Client, GraphBuilder, InvalidArgument, ResourceExhausted
from chainrule.server import ServerConfig, create_server
from chainrule.wire.convert import array_to_tensor
from chainrule.v1 import chainrule_pb2 as pb

MiB = 1 << 20


@pytest.fixture(scope="module")
def server_address():
    config = ServerConfig(max_message_bytes=4 * MiB, max_nodes=50, max_tensor_elements=10_000,
                          max_memory_bytes=1 * MiB)
    server, port = create_server("127.0.0.1:0", config)
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None).wait()


@pytest.fixture(scope="module")
def client(server_address):
    with Client(server_address, timeout=20) as c:
        yield c


def scalar_sum():
    g = GraphBuilder()
    x, y = g.input("x"), g.input("y")
    return (x + y).named("s")


def assert_serves(client):
    assert client.evaluate(scalar_sum(), x=1.0, y=2.0).value == 3.0


def test_health_reports_serving(server_address):
    with grpc.insecure_channel(server_address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "chainrule.v1.Chainrule"):
            status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service_and_describes_it(server_address):
    with grpc.insecure_channel(server_address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = iter([
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="chainrule.v1.Chainrule"),
        ])
        listed, described = list(stub.ServerReflectionInfo(requests, timeout=5))
    names = {s.name for s in listed.list_services_response.service}
    assert {"chainrule.v1.Chainrule", "grpc.health.v1.Health"} <= names
    assert described.file_descriptor_response.file_descriptor_proto  # the .proto, for generic tools


def test_list_operators_gives_every_builtin_with_its_schema(client):
    ops = {op.name: op for op in client.operators()}
    builtin = {"add", "sub", "mul", "div", "neg", "pow", "maximum", "minimum", "exp", "log", "sqrt", "abs", "sin",
               "cos", "tanh", "sigmoid", "relu", "leaky_relu", "softplus", "clip", "matmul", "transpose", "sum",
               "mean", "max", "logsumexp", "reshape", "broadcast_to", "concat", "stack", "slice", "squeeze",
               "expand_dims", "softmax", "log_softmax", "cross_entropy", "mse", "where", "stop_gradient", "const"}
    assert builtin <= set(ops)
    leaky = ops["leaky_relu"]
    assert leaky.plugin == "builtin.elementwise" and leaky.distribution == "chainrule" and leaky.version
    assert leaky.doc and leaky.arity == 1
    alpha = leaky.attrs["alpha"]
    assert alpha.type == "float" and alpha.default == pytest.approx(0.01) and not alpha.required
    assert ops["concat"].arity == -1


def raw_evaluate(address, request: pb.EvaluateRequest):
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary("/chainrule.v1.Chainrule/Evaluate",
                                   request_serializer=pb.EvaluateRequest.SerializeToString,
                                   response_deserializer=pb.EvaluateResponse.FromString)
        return call(request, timeout=10)


def graph_with_vector_input(n=3) -> pb.Graph:
    return pb.Graph(inputs=[pb.InputDecl(name="v", dtype=pb.FLOAT64, shape=[n])],
                    nodes=[pb.Node(name="t", op="sum", inputs=["v"])], outputs=["t"])


@pytest.mark.parametrize("tensor, reason, needle", [
    (pb.Tensor(dtype=pb.FLOAT64, shape=[3], data=b"\0" * 23), "BAD_TENSOR", "23 bytes"),
    (array_to_tensor(np.zeros(4)), "SHAPE_MISMATCH", "declared shape [3], got [4]"),
    (array_to_tensor(np.zeros(3, np.float32)), "DTYPE_MISMATCH", "declared float64, got float32"),
    (pb.Tensor(dtype=pb.FLOAT64, shape=[3], values=pb.DoubleList(values=[1, 2])), "BAD_TENSOR", "values has 2"),
    (pb.Tensor(dtype=pb.FLOAT64, shape=[-3]), "SHAPE_MISMATCH", "negative dimension"),
])
def test_bad_tensors_are_invalid_argument_with_details(client, server_address, tensor, reason, needle):
    request = pb.EvaluateRequest(graph=graph_with_vector_input())
    request.inputs["v"].CopyFrom(tensor)
    with pytest.raises(grpc.RpcError) as info:
        raw_evaluate(server_address, request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in info.value.details() and "Traceback" not in info.value.details()
    from grpc_status import rpc_status
    from google.rpc import error_details_pb2

    status = rpc_status.from_call(info.value)
    kinds = {}
    for detail in status.details:
        for cls in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest):
            if detail.Is(cls.DESCRIPTOR):
                message = cls()
                detail.Unpack(message)
                kinds[cls.__name__] = message
    assert kinds["ErrorInfo"].reason == reason
    assert kinds["BadRequest"].field_violations[0].field.startswith("inputs.v")
    assert_serves(client)


def test_missing_and_extra_inputs(client, server_address):
    request = pb.EvaluateRequest(graph=graph_with_vector_input())
    with pytest.raises(grpc.RpcError, match="input 'v' is declared by the graph but was not given"):
        raw_evaluate(server_address, request)
    request.inputs["v"].CopyFrom(array_to_tensor(np.zeros(3)))
    request.inputs["w"].CopyFrom(array_to_tensor(np.zeros(3)))
    with pytest.raises(grpc.RpcError, match="input 'w' is not declared"):
        raw_evaluate(server_address, request)
    assert_serves(client)


def test_bad_attribute_reason(client):
    g = GraphBuilder()
    x = g.input("x")
    bad = g.op("leaky_relu", x, alpha="steep", name="lr")
    with pytest.raises(InvalidArgument) as info:
        client.evaluate(bad, x=1.0)
    assert info.value.reason == "BAD_ATTRIBUTE" and info.value.node == "lr" and "alpha" in str(info.value)


@pytest.mark.parametrize("build, limit", [
    (lambda g, x: g.op("broadcast_to", x, shape=[100, 1000]), "max_tensor_elements"),
    # each tensor fits (9,900 elements) but values and gradients together exceed 1 MiB
    (lambda g, x: g.op("broadcast_to", x, shape=[100, 99]) * 2.0 * 3.0 * 4.0 * 5.0 * 6.0 * 7.0 * 8.0 * 9.0,
     "max_memory_bytes"),
])
def test_limits_answer_resource_exhausted_with_figures(client, build, limit):
    g = GraphBuilder()
    x = g.input("x", shape=(1,))
    with pytest.raises(ResourceExhausted) as info:
        client.evaluate(build(g, x).sum(), x=np.ones(1))
    assert info.value.metadata["limit"] == limit
    assert int(info.value.metadata["requested"]) > int(info.value.metadata["allowed"])
    assert_serves(client)


def test_too_many_nodes(client):
    g = GraphBuilder()
    v = g.input("x")
    for _ in range(60):
        v = -v
    with pytest.raises(ResourceExhausted, match="60 nodes; the limit is 50"):
        client.evaluate(v, x=1.0)


def test_a_message_over_the_size_limit_is_resource_exhausted(client):
    g = GraphBuilder()
    x = g.input("x", shape=(-1,))
    with pytest.raises(ResourceExhausted):
        client.evaluate(x.sum(), x=np.zeros(5 * MiB // 8))
    assert_serves(client)


def test_one_log_line_per_request_without_tensor_contents(client, caplog):
    # A call answered OK is logged at DEBUG (writing a line per call costs the answer more than the
    # rest of the server's bookkeeping), any other outcome at INFO.
    with caplog.at_level(logging.DEBUG, logger="chainrule.server"):
        client.evaluate(scalar_sum(), x=123456.0, y=654321.0)
    records = [r for r in caplog.records if r.name == "chainrule.server"]
    lines = [r.getMessage() for r in records]
    assert len(lines) == 1 and lines[0].startswith("Evaluate") and lines[0].endswith("OK")
    assert records[0].levelno == logging.DEBUG
    assert "123456" not in lines[0] and "654321" not in lines[0]


def test_a_failed_call_is_logged_at_info(client, caplog):
    with caplog.at_level(logging.INFO, logger="chainrule.server"):
        client.evaluate(scalar_sum(), x=1.0, y=2.0)  # OK: not at INFO
        with pytest.raises(InvalidArgument):
            client.evaluate(scalar_sum(), x=1.0)  # y missing
    lines = [r.getMessage() for r in caplog.records if r.name == "chainrule.server" and r.levelno == logging.INFO]
    assert len(lines) == 1 and lines[0].startswith("Evaluate") and lines[0].endswith("INVALID_ARGUMENT"), lines


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chainrule.server.cli", *args],
                          capture_output=True, text=True, timeout=60)


def test_cli_eval_on_a_json_graph_file(tmp_path, server_address):
    g = GraphBuilder()
    x, y, z = g.input("x"), g.input("y"), g.input("z")
    f = ((x + y) * z).named("f")
    path = tmp_path / "graph.json"
    path.write_text(f.graph.to_json())
    np.save(tmp_path / "z.npy", np.float64(-4.0))
    for where in (["--local"], ["--server", server_address]):
        done = run_cli("eval", str(path), "--input", "x=-2", "--input", "y=5", "--input", f"z=@{tmp_path / 'z.npy'}", *where)
        assert done.returncode == 0, done.stderr
        out = done.stdout
        assert "f = -12.0" in out and "df/dx = -4.0" in out and "df/dz = 3.0" in out


def test_cli_eval_reports_errors_without_traceback(tmp_path):
    path = tmp_path / "graph.json"
    path.write_text(json.dumps({"inputs": [{"name": "x"}], "nodes": [{"name": "h", "op": "nope", "inputs": ["x"]}],
                                "outputs": ["h"]}))
    done = run_cli("eval", str(path), "--input", "x=1", "--local")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("chainrule: error: ") and "unknown operator 'nope'" in done.stderr


def test_cli_ops_lists_operators_with_plugins():
    done = run_cli("ops", "--json")
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    assert rows["matmul"]["plugin"] == "builtin.linalg" and "axis" in rows["sum"]["attrs"]


def test_input_sets_belong_to_the_stream(server_address):
    request = pb.EvaluateRequest(graph=graph_with_vector_input())
    request.inputs["v"].CopyFrom(array_to_tensor(np.zeros(3)))
    request.input_sets.add().inputs["v"].CopyFrom(array_to_tensor(np.ones(3)))
    with pytest.raises(grpc.RpcError, match="input_sets: several input sets go through EvaluateStream") as info:
        raw_evaluate(server_address, request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("name, tensor, reason, shown", [
    ("é" * 100_000, array_to_tensor(np.zeros(3)), "UNEXPECTED_INPUT", "characters in all"),
    ("v", pb.Tensor(dtype=pb.FLOAT64, shape=[1] * 1000), "SHAPE_MISMATCH", "... (1000 dimensions)"),
], ids=["long name", "long shape"])
def test_an_error_about_a_huge_name_or_shape_still_fits_in_the_trailers(client, name, tensor, reason, shown):
    """gRPC caps trailers at 8 KiB: the message is clipped, not replaced by a transport error."""
    with pytest.raises(InvalidArgument) as info:
        client.evaluate(graph_with_vector_input(), {"v": np.zeros(3), name: tensor} if name != "v" else {"v": tensor})
    assert info.value.reason == reason and shown in info.value.message and len(info.value.message.encode()) < 700
    assert client.evaluate(graph_with_vector_input(), v=np.ones(3)).value.shape == ()


def test_the_server_caps_compute_time_without_a_client_deadline():
    server, port = create_server("127.0.0.1:0", ServerConfig(max_compute_seconds=0.2))
    server.start()
    try:
        g = GraphBuilder()
        v = g.input("W", shape=(200, 200))
        for _ in range(400):
            v = (v @ v).tanh()
        from chainrule.client import DeadlineExceeded

        with Client(f"127.0.0.1:{port}") as client:  # no timeout: only the server's cap applies
            with pytest.raises(DeadlineExceeded, match=r"server's time limit of 0.2 s .*max_compute_seconds"):
                client.evaluate(v.sum(), W=np.eye(200) * 0.5)
            assert_serves(client)
    finally:
        server.stop(None).wait()


def test_limits_come_from_the_environment_and_flags_win():
    from chainrule.server import config as config_module

    env = {"CHAINRULE_MAX_NODES": "7", "CHAINRULE_MAX_COMPUTE_SECONDS": "1.5", "CHAINRULE_REFLECTION": "off",
           "CHAINRULE_DISABLE_PLUGINS": "acme, builtin.nn"}
    config = config_module.from_sources(None, env=env)
    assert (config.max_nodes, config.max_compute_seconds, config.reflection) == (7, 1.5, False)
    assert config.disable_plugins == ["acme", "builtin.nn"]
    import argparse

    parser = argparse.ArgumentParser()
    config_module.add_arguments(parser)
    assert config_module.from_sources(parser.parse_args(["--max-nodes", "9"]), env=env).max_nodes == 9


def test_a_server_built_from_the_environment_enforces_its_limit(monkeypatch):
    from chainrule.server import config as config_module

    monkeypatch.setenv("CHAINRULE_MAX_NODES", "3")
    server, port = create_server("127.0.0.1:0", config_module.from_sources(None))
    server.start()
    try:
        g = GraphBuilder()
        v = g.input("x")
        for _ in range(4):
            v = -v
        with Client(f"127.0.0.1:{port}", timeout=10) as client:
            with pytest.raises(ResourceExhausted, match="4 nodes; the limit is 3"):
                client.evaluate(v, x=1.0)
    finally:
        server.stop(None).wait()


@pytest.mark.parametrize("variable, value", [("CHAINRULE_MAX_NODES", "lots"), ("CHAINRULE_REFLECTION", "perhaps")])
def test_a_bad_environment_value_is_named_without_a_traceback(variable, value):
    import os

    done = subprocess.run([sys.executable, "-m", "chainrule.server.cli", "serve", "--port", "0"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, variable: value})
    assert done.returncode == 2
    assert f"{variable}={value!r}" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("setting, needle", [
    ({"max_concurrent": 0}, "max_concurrent must be at least 1"),
    ({"graph_cache_size": 0}, "graph_cache_size must be at least 1"),
    ({"max_compute_seconds": 0.0}, "max_compute_seconds must be positive"),
    ({"port": 70000}, "port must be a port number"),
    ({"log_level": "chatty"}, "log_level must be"),
])
def test_settings_no_server_can_run_with_are_refused(setting, needle):
    from chainrule.server.config import ConfigError

    with pytest.raises(ConfigError, match=needle):
        create_server("127.0.0.1:0", ServerConfig(**setting))
