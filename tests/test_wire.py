"""Hand-encoded large tensors parse as the very messages protobuf would build."""
from __future__ import annotations

import numpy as np
import pytest

from chainrule.wire import outgoing as wire
from chainrule.wire.convert import array_to_tensor, tensor_to_array
from chainrule.v1 import chainrule_pb2 as pb

ARRAYS = [
    np.arange(20_000, dtype=np.float64).reshape(100, 200),   # large: hand-encoded
    np.linspace(-1, 1, 40_000, dtype=np.float32),
    np.arange(30_000, dtype=np.int64)[::2],                  # strided: copied to C order first
    np.float64(2.5),                                         # 0-d, small: left to protobuf
    np.zeros((0, 3)),
]


@pytest.mark.parametrize("array", ARRAYS, ids=lambda a: f"{np.asarray(a).dtype}{np.shape(a)}")
def test_kept_tensors_are_handed_over_as_views_and_complete_as_protobuf_would(array):
    """InProcess (LocalClient): the receiver reads the arrays themselves, read-only; completing
    or serializing the message still gives exactly protobuf's message."""
    outgoing = wire.Outgoing(pb.EvaluateResponse(output="f"), wire.InProcess())
    outgoing.put_tensor("output_value", array)
    outgoing.put_map_tensor("values", "x", array)
    expected = pb.EvaluateResponse(output="f", output_value=array_to_tensor(array))
    expected.values["x"].CopyFrom(array_to_tensor(array))
    got = tensor_to_array(outgoing.incoming().tensor_map("values")["x"], field="x")
    assert got.dtype == np.asarray(array).dtype and np.array_equal(got, array)
    if np.asarray(array).nbytes > wire.LARGE_TENSOR_BYTES:
        assert not got.flags.writeable
        if np.asarray(array).flags.c_contiguous:
            assert np.shares_memory(got, array)
    assert pb.EvaluateResponse.FromString(outgoing.serialize()) == expected
    assert outgoing.parse() == expected


@pytest.mark.parametrize("array", ARRAYS, ids=lambda a: f"{np.asarray(a).dtype}{np.shape(a)}")
def test_outgoing_response_equals_protobuf_encoding(array):
    outgoing = wire.Outgoing(pb.EvaluateResponse(output="f", graph_id="abc"), wire.HandEncoded())
    outgoing.put_tensor("output_value", array)
    outgoing.put_map_tensor("values", "x", array)
    outgoing.put_map_tensor("gradients", "x", -np.asarray(array))
    parsed = pb.EvaluateResponse.FromString(outgoing.serialize())

    expected = pb.EvaluateResponse(output="f", graph_id="abc", output_value=array_to_tensor(array))
    expected.values["x"].CopyFrom(array_to_tensor(array))
    expected.gradients["x"].CopyFrom(array_to_tensor(-np.asarray(array)))
    assert parsed == expected
    got = tensor_to_array(parsed.values["x"], field="x")
    assert got.dtype == np.asarray(array).dtype and np.array_equal(got, array)


def test_each_carrier_takes_large_tensors_its_own_way_and_leaves_small_ones_in_the_message():
    outgoing = wire.Outgoing(pb.EvaluateResponse(), wire.HandEncoded())
    outgoing.put_map_tensor("values", "small", np.ones(3))
    assert not outgoing.carrier.parts and "small" in outgoing.message.values
    outgoing.put_map_tensor("values", "large", np.ones(wire.LARGE_TENSOR_BYTES))
    assert outgoing.carrier.parts and "large" not in outgoing.message.values
    kept = wire.Outgoing(pb.EvaluateResponse(), wire.InProcess())
    kept.put_map_tensor("values", "large", np.ones(wire.LARGE_TENSOR_BYTES))
    assert "large" not in kept.message.values and "large" in kept.carrier.maps["values"]
    inline = wire.Outgoing(pb.EvaluateResponse())  # the default carrier: plain protobuf
    inline.put_map_tensor("values", "large", np.ones(wire.LARGE_TENSOR_BYTES))
    assert "large" in inline.message.values and inline.serialize() == inline.message.SerializeToString()


def test_a_client_request_with_large_inputs_parses_as_protobuf_would_build_it():
    from chainrule.client import GraphBuilder
    from chainrule.client.request import evaluate_request

    g = GraphBuilder()
    x, y = g.input("x", shape=(50_000,)), g.input("y")
    f = (x * y).sum().named("f")
    big = np.random.default_rng(0).normal(size=50_000)
    split = evaluate_request(f.graph, "f", {"x": big, "y": 2.0}, grads=["x"], seed=1.0, carrier=wire.HandEncoded())
    whole = evaluate_request(f.graph, "f", {"x": big, "y": 2.0}, grads=["x"], seed=1.0)
    assert split.carrier.parts and "x" not in split.message.inputs and "x" in whole.message.inputs
    assert pb.EvaluateRequest.FromString(split.serialize()) == whole.message
    assert wire.serialize(split) == split.serialize() and wire.serialize(whole.message) == whole.serialize()
