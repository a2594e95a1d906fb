"""EvaluateRequest.response_encoding through a real server: TENSOR_ENCODING_VALUES answers with
numbers (proto JSON and grpcurl users read them, not base64), equal to the data path's, in
Evaluate and in EvaluateStream, counted as 8 bytes per element by the response-size check."""
from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
from google.protobuf import json_format
from grpc_status import rpc_status

from chainrule.client import GraphBuilder, ops
from chainrule.client.errors import from_status
from chainrule.server import ServerConfig
from chainrule.v1 import chainrule_pb2 as pb
from chainrule.v1.chainrule_pb2_grpc import ChainruleStub
from chainrule.wire.convert import array_to_tensor, tensor_to_array

from helpers import start_server

VALUES, DATA = pb.TENSOR_ENCODING_VALUES, pb.TENSOR_ENCODING_DATA


def mixed_graph() -> pb.Graph:
    """Float32, float64, int64 and bool values: f = sum(gather(x, idx) * w) + sum(where(x > 0, x, 0))."""
    g = GraphBuilder()
    x, w, idx = g.input("x", (4,), "float32"), g.input("w", (2,)), g.input("idx", (2,), "int64")
    mask = (x > 0).named("mask")
    picked = ops.gather(x, idx, name="picked")
    f = ((picked * w).sum(name="dot") + ops.where(mask, x, 0.0).sum(name="pos")).named("f")
    return f.graph.message


INPUTS = {"x": np.array([0.5, -1.25, 3.0, 2.0], np.float32), "w": np.array([2.0, -3.0]),
          "idx": np.array([2, 0], np.int64)}


def request(encoding: int, graph: pb.Graph | None = None, **inputs: np.ndarray) -> pb.EvaluateRequest:
    message = pb.EvaluateRequest(response_encoding=encoding, contributions=True,
                                 return_values=pb.Selection(mode=pb.Selection.ALL))
    if graph is not None:
        message.graph.CopyFrom(graph)
    for name, value in (inputs or INPUTS).items():
        message.inputs[name].CopyFrom(array_to_tensor(value))
    return message


@pytest.fixture(scope="module")
def stub():
    server, address = start_server()
    with grpc.insecure_channel(address) as channel:
        yield ChainruleStub(channel)
    server.stop(None).wait()


def tensors(response: pb.EvaluateResponse) -> dict[str, pb.Tensor]:
    out = {"output_value": response.output_value}
    out.update({f"values.{k}": t for k, t in response.values.items()})
    out.update({f"gradients.{k}": t for k, t in response.gradients.items()})
    out.update({f"contributions[{i}]": c.gradient for i, c in enumerate(response.contributions)})
    return out


def assert_same_numbers(as_values: pb.EvaluateResponse, as_data: pb.EvaluateResponse) -> None:
    got, expected = tensors(as_values), tensors(as_data)
    assert got.keys() == expected.keys() and len(got) > 10
    for key, tensor in got.items():
        assert tensor.WhichOneof("payload") == "values", key
        assert expected[key].WhichOneof("payload") == "data", key
        assert (tensor.dtype, list(tensor.shape)) == (expected[key].dtype, list(expected[key].shape)), key
        a, b = tensor_to_array(tensor, field=key), tensor_to_array(expected[key], field=key)
        assert a.dtype == b.dtype and np.array_equal(a, b), key
    assert {t.dtype for t in got.values()} >= {pb.FLOAT32, pb.FLOAT64, pb.INT64, pb.BOOL}


def test_evaluate_answers_in_values_with_the_numbers_of_the_data_path(stub):
    graph = mixed_graph()
    as_values = stub.Evaluate(request(VALUES, graph), timeout=30)
    as_data = stub.Evaluate(request(DATA, graph), timeout=30)
    assert_same_numbers(as_values, as_data)
    assert as_values.contributions  # x fans out to gather, the mask and where
    assert list(as_values.values["x"].values.values) == [0.5, -1.25, 3.0, 2.0]  # C order, one double each


def test_proto_json_of_a_values_response_shows_numbers(stub):
    response = stub.Evaluate(request(VALUES, mixed_graph()), timeout=30)
    text = json_format.MessageToJson(response)
    document = json.loads(text)
    assert document["outputValue"]["values"]["values"] == [float(tensor_to_array(response.output_value, field="f"))]
    assert document["values"]["idx"] == {"dtype": "INT64", "shape": ["2"], "values": {"values": [2.0, 0.0]}}
    assert document["values"]["mask"]["values"]["values"] == [1.0, 0.0, 1.0, 1.0]
    assert document["gradients"]["w"]["values"]["values"] == [3.0, 0.5]
    assert '"data"' not in text  # no base64 anywhere
    again = json_format.Parse(text, pb.EvaluateResponse())  # and back: the same message
    assert again == response


def test_a_json_request_asks_for_values_by_the_enum_name(stub):
    """What a grpcurl user types: the request as proto JSON, the option by its name."""
    body = {"graph": json_format.MessageToDict(mixed_graph()), "responseEncoding": "TENSOR_ENCODING_VALUES",
            "inputs": {"x": {"dtype": "FLOAT32", "shape": [4], "values": {"values": [0.5, -1.25, 3.0, 2.0]}},
                       "w": {"shape": [2], "values": {"values": [2.0, -3.0]}},
                       "idx": {"dtype": "INT64", "shape": [2], "values": {"values": [2, 0]}}}}
    response = stub.Evaluate(json_format.ParseDict(body, pb.EvaluateRequest()), timeout=30)
    document = json_format.MessageToDict(response)
    assert document["output"] == "f" and document["outputValue"]["values"]["values"] == [3.0 * 2.0 - 0.5 * 3.0 + 5.5]


def test_evaluate_stream_answers_in_values_per_request_and_per_input_set(stub):
    graph = mixed_graph()
    first = request(VALUES, graph)
    sets = request(VALUES)
    for scale in (1.0, -2.0):
        sets.input_sets.add().inputs["w"].CopyFrom(array_to_tensor(INPUTS["w"] * scale))
    plain = request(DATA)
    answers = list(stub.EvaluateStream(iter([first, sets, plain]), timeout=30))
    assert_same_numbers(answers[0].response, answers[2].response)
    assert [r.WhichOneof("result") for r in answers[1].results] == ["response", "response"]
    for result in answers[1].results:
        assert all(t.WhichOneof("payload") == "values" for t in tensors(result.response).values())
    assert all(t.WhichOneof("payload") == "data" for t in tensors(answers[2].response).values())
    second = tensor_to_array(answers[1].results[1].response.output_value, field="f")
    direct = stub.Evaluate(request(DATA, graph, x=INPUTS["x"], w=INPUTS["w"] * -2.0, idx=INPUTS["idx"]), timeout=30)
    assert second == tensor_to_array(direct.output_value, field="f")


def int64_graph() -> pb.Graph:
    g = GraphBuilder()
    n, x = g.input("n", (2,), "int64"), g.input("x")
    return (x * 2.0 + ops.sum(n, name="total") * 0).named("f").graph.message


def rich_error(error: grpc.RpcError):
    """The client's typed error for a failed raw call (reason, node, field, metadata, message)."""
    return from_status(rpc_status.from_call(error))


def test_an_int64_beyond_two_to_the_53_is_refused_naming_the_node_and_data_still_works(stub):
    graph = int64_graph()
    exact = request(VALUES, graph, n=np.array([2 ** 53, -(2 ** 53)], np.int64), x=np.array(1.0))
    response = stub.Evaluate(exact, timeout=30)
    assert list(response.values["n"].values.values) == [2.0 ** 53, -(2.0 ** 53)]
    big = np.array([3, 2 ** 53 + 1], np.int64)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Evaluate(request(VALUES, graph, n=big, x=np.array(1.0)), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = rich_error(caught.value)
    assert (error.reason, error.node, error.field) == ("OUT_OF_RANGE", "n", "response_encoding")
    assert str(2 ** 53 + 1) in error.message and "TENSOR_ENCODING_DATA" in error.message
    data = stub.Evaluate(request(DATA, graph, n=big, x=np.array(1.0)), timeout=30)
    assert tensor_to_array(data.values["n"], field="n").tolist() == [3, 2 ** 53 + 1]
    answers = list(stub.EvaluateStream(iter([request(VALUES, graph, n=big, x=np.array(1.0))]), timeout=30))
    assert from_status(answers[0].error).reason == "OUT_OF_RANGE"


def test_values_with_shared_memory_output_names_response_encoding(tmp_path):
    server, address = start_server(ServerConfig(shared_memory_dir=str(tmp_path / "shm")))
    try:
        with grpc.insecure_channel(address) as channel:
            stub = ChainruleStub(channel)
            message = request(VALUES, mixed_graph())
            name = "chainrule-" + "a" * 32
            path = tmp_path / "shm" / name
            path.write_bytes(b"")
            message.shared_memory_output = name
            with pytest.raises(grpc.RpcError) as caught:
                stub.Evaluate(message, timeout=30)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert rich_error(caught.value).field == "response_encoding"
    finally:
        server.stop(None).wait()


def test_the_size_check_counts_eight_bytes_per_element_for_values():
    """A bool tensor of 200,000 elements: 200 kB as data, 1.6 MB as values; a 1 MiB limit takes one
    and refuses the other before computing anything."""
    config = ServerConfig(max_message_bytes=1 << 20)
    server, address = start_server(config)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = ChainruleStub(channel)
            g = GraphBuilder()
            x = g.input("x")
            graph = (ops.broadcast_to(x, [200_000]) > 0).named("mask").graph.message
            ok = pb.EvaluateRequest(graph=graph, return_grads=pb.Selection(mode=pb.Selection.NONE),
                                    return_values=pb.Selection(mode=pb.Selection.NONE),
                                    diagnostics=pb.DIAGNOSTICS_OFF)
            ok.inputs["x"].CopyFrom(array_to_tensor(np.array(1.0)))
            assert stub.Evaluate(ok, timeout=30).output_value.dtype == pb.BOOL
            ok.response_encoding = VALUES
            with pytest.raises(grpc.RpcError) as caught:
                stub.Evaluate(ok, timeout=30)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            error = rich_error(caught.value)
            assert error.reason == "LIMIT_EXCEEDED" and int(error.metadata["requested"]) > 8 * 200_000
    finally:
        server.stop(None).wait()


def test_a_large_tensor_comes_as_values_too(stub):
    """Tensors over 64 KiB are hand-encoded as raw bytes on the data path; asked for values, they are numbers."""
    g = GraphBuilder()
    x = g.input("x")
    graph = (ops.broadcast_to(x, [20_000]) * 2.0).named("big").graph.message
    message = pb.EvaluateRequest(graph=graph, seed=array_to_tensor(np.ones(20_000)),
                                 return_values=pb.Selection(mode=pb.Selection.ALL), response_encoding=VALUES)
    message.inputs["x"].CopyFrom(array_to_tensor(np.array(1.5)))
    response = stub.Evaluate(message, timeout=30)
    assert response.output_value.WhichOneof("payload") == "values"
    assert list(response.output_value.values.values) == [3.0] * 20_000
    assert list(response.gradients["x"].values.values) == [40_000.0]
