"""Large tensors read straight out of received bytes give exactly what protobuf would parse."""
from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError

from chainrule.wire import incoming, outgoing as wire
from chainrule.wire.convert import array_to_tensor, tensor_to_array
from chainrule.wire.incoming import RawTensor, read_message
from chainrule.v1 import chainrule_pb2 as pb

RNG = np.random.default_rng(7)
BIG = RNG.normal(size=(300, 70))  # 168,000 bytes: above LARGE_FIELD_BYTES
BIG_F32 = RNG.normal(size=(50_000,)).astype(np.float32)
BIG_I64 = np.arange(3 * 40 * 100, dtype=np.int64).reshape(3, 40, 100)


def response_with(arrays: dict[str, np.ndarray], *, split: bool = True) -> wire.Outgoing:
    outgoing = wire.Outgoing(pb.EvaluateResponse(output="f", graph_id="id"), wire.HandEncoded() if split else None)
    for name, array in arrays.items():
        outgoing.put_map_tensor("values", name, array)
        outgoing.put_map_tensor("gradients", name, -array)
    outgoing.put_tensor("output_value", np.float64(3.5))
    outgoing.put_map_tensor("values", "small", np.ones(3))
    return outgoing


def decoded(message: incoming.Incoming, field: str) -> dict[str, np.ndarray]:
    return {k: tensor_to_array(t, field=k) for k, t in message.tensor_map(field).items()}


@pytest.mark.parametrize("key", ["x", "é" * 70, "k" * 200])
def test_our_encoding_reads_as_aligned_views_equal_to_protobuf(key):
    arrays = {key: BIG, "f32": BIG_F32, "i64": BIG_I64}
    data = response_with(arrays).serialize()
    message = read_message(pb.EvaluateResponse, data)
    assert set(message.raw_maps["values"]) == set(arrays)  # every large tensor read as a view
    values = decoded(message, "values")
    for name, array in arrays.items():
        assert values[name].dtype == array.dtype and np.array_equal(values[name], array)
        assert values[name].flags.aligned and not values[name].flags.owndata  # a view, not a copy
        assert np.array_equal(decoded(message, "gradients")[name], -array)
    assert np.array_equal(values["small"], np.ones(3))
    assert message.complete() == pb.EvaluateResponse.FromString(data)


def test_large_tensors_protobuf_serialized_in_field_order_are_read_as_views_too():
    whole = response_with({"x": BIG, "y": BIG_I64}, split=False).message
    data = whole.SerializeToString()
    message = read_message(pb.EvaluateResponse, data)
    assert set(message.raw_maps["values"]) == {"x", "y"}
    assert np.array_equal(decoded(message, "values")["x"], BIG)
    assert decoded(message, "values")["x"].flags.aligned  # copied once if protobuf left it misaligned
    assert message.complete() == whole


def test_a_request_reads_inputs_and_seed_as_views():
    request = pb.EvaluateRequest(graph_id="g", output="f")
    request.inputs["X"].CopyFrom(array_to_tensor(BIG))
    request.inputs["b"].CopyFrom(array_to_tensor(np.ones(2)))
    request.seed.CopyFrom(array_to_tensor(BIG_F32))
    message = read_message(pb.EvaluateRequest, request.SerializeToString())
    assert isinstance(message.tensor_map("inputs")["X"], RawTensor)
    assert isinstance(message.tensor("seed"), RawTensor) and message.message.graph_id == "g"
    assert np.array_equal(tensor_to_array(message.tensor("seed"), field="seed"), BIG_F32)
    assert message.complete() == request


def test_small_messages_go_to_protobuf_whole():
    data = response_with({"x": np.ones(10)}).serialize()
    message = read_message(pb.EvaluateResponse, data)
    assert not message.raw_maps and not message.raw_singles
    assert message.message == pb.EvaluateResponse.FromString(data)


def entry(field: int, key: str, tensor: pb.Tensor) -> bytes:
    """One map entry, serialized as its own message: concatenating messages concatenates fields."""
    message = pb.EvaluateResponse()
    getattr(message, pb.EvaluateResponse.DESCRIPTOR.fields_by_number[field].name)[key].CopyFrom(tensor)
    return message.SerializeToString()


@pytest.mark.parametrize("case", ["key twice, large then small", "key twice, both large", "singular twice"])
def test_fields_sent_twice_follow_protobufs_rules(case):
    large, other = array_to_tensor(BIG), array_to_tensor(BIG * 2)
    if case == "key twice, large then small":
        data = entry(3, "x", large) + entry(3, "x", array_to_tensor(np.ones(2)))
    elif case == "key twice, both large":
        data = entry(3, "x", large) + entry(3, "x", other)
    else:
        data = (pb.EvaluateResponse(output_value=large).SerializeToString()
                + pb.EvaluateResponse(output_value=other).SerializeToString())
    message = read_message(pb.EvaluateResponse, data)
    assert message.message == pb.EvaluateResponse.FromString(data)  # the last one wins, or they merge
    assert not message.raw_maps and not message.raw_singles


@pytest.mark.parametrize("cut", [1, 100, len(array_to_tensor(BIG).data) // 2])
def test_truncated_messages_fail_as_protobuf_fails(cut):
    data = entry(3, "x", array_to_tensor(BIG))[:-cut]
    with pytest.raises(DecodeError):
        pb.EvaluateResponse.FromString(data)
    with pytest.raises(DecodeError):
        read_message(pb.EvaluateResponse, data)


def test_a_key_that_is_not_utf8_fails_as_protobuf_fails():
    data = entry(3, "xy", array_to_tensor(BIG)).replace(b"xy", b"\xff\xfe", 1)
    with pytest.raises(DecodeError):
        read_message(pb.EvaluateResponse, data)


def test_an_unusual_tensor_is_left_to_protobuf():
    as_values = array_to_tensor(BIG.ravel()[:20_000], as_values=True)  # a large packed-double tensor
    data = entry(3, "v", as_values) + entry(3, "x", array_to_tensor(BIG))
    message = read_message(pb.EvaluateResponse, data)
    assert set(message.raw_maps["values"]) == {"x"} and "v" in message.message.values
    assert np.array_equal(decoded(message, "values")["v"], BIG.ravel()[:20_000])


def test_misaligned_data_is_copied_into_an_aligned_array():
    data = b"\x00" * 3 + BIG.tobytes()  # the tensor starts 3 bytes into the buffer
    array = tensor_to_array(RawTensor(pb.FLOAT64, BIG.shape, memoryview(data)[3:]), field="x")
    assert array.flags.aligned and np.array_equal(array, BIG)


def test_raw_tensors_are_checked_like_messages():
    raw = RawTensor(pb.FLOAT64, (10, 10), memoryview(BIG.tobytes())[:100 * 8 - 1])
    with pytest.raises(Exception, match="x: data has 799 bytes"):
        tensor_to_array(raw, field="x")


def varint(value: int, width: int = 0) -> bytes:
    """``value`` as a varint, padded with continuation bytes to ``width`` bytes (protobuf writes the shortest)."""
    out = bytearray()
    while True:
        out.append(value & 0x7F)
        value >>= 7
        if not value and len(out) >= width:
            break
        out[-1] |= 0x80
    return bytes(out)


def tensor_bytes(dtype: bytes = b"\x08\x01", shape: bytes = b"", length_width: int = 0) -> bytes:
    """A Tensor message whose parts are spelt as given (field 1 dtype, 2 packed shape, 3 data)."""
    payload = BIG.tobytes()
    return dtype + shape + b"\x1a" + varint(len(payload), length_width) + payload


def packed(*dims: int) -> bytes:
    body = b"".join(varint(n) for n in dims)
    return b"\x12" + varint(len(body)) + body


def as_value(tensor: bytes, key: bytes = b"x") -> bytes:
    body = b"\x0a" + varint(len(key)) + key + b"\x12" + varint(len(tensor)) + tensor
    return b"\x1a" + varint(len(body)) + body  # EvaluateResponse.values


def test_a_dtype_beyond_32_bits_reads_as_protobuf_truncates_it():
    data = as_value(tensor_bytes(dtype=b"\x08" + varint((1 << 63) + 1), shape=packed(21000)))
    message = read_message(pb.EvaluateResponse, data)
    assert message.complete() == pb.EvaluateResponse.FromString(data)
    assert decoded(message, "values")["x"].dtype == np.float64  # 2**63 + 1 is FLOAT64 (1) to protobuf


@pytest.mark.parametrize("width", [6, 10])
def test_an_overlong_length_fails_as_protobuf_fails(width):
    data = as_value(tensor_bytes(shape=packed(21000), length_width=width))
    with pytest.raises(DecodeError):
        pb.EvaluateResponse.FromString(data)
    with pytest.raises(DecodeError):
        read_message(pb.EvaluateResponse, data)


def test_a_shape_of_more_dimensions_than_any_tensor_has_is_left_to_protobuf():
    """No pure-Python walk over a million shape elements: protobuf reads them, and the rank check refuses."""
    data = as_value(tensor_bytes(shape=packed(*[1] * 100_000, 21000)))
    message = read_message(pb.EvaluateResponse, data)
    assert not message.raw_maps and message.message == pb.EvaluateResponse.FromString(data)
    with pytest.raises(Exception, match=r"x: shape \[1, 1, 1, 1, \.\.\. \(100001 dimensions\)\]"):
        decoded(message, "values")


@pytest.mark.parametrize("tensor", [
    RawTensor(pb.FLOAT64, BIG.shape, memoryview(b"\x00" * 3 + BIG.tobytes())[3:]),  # misaligned: copied
    array_to_tensor(np.arange(4.0), as_values=True),
    pb.Tensor(dtype=pb.FLOAT64, shape=[0, 3]),
    array_to_tensor(BIG),
], ids=["misaligned", "values", "empty", "data"])
def test_every_decoded_tensor_is_read_only_however_it_came(tensor):
    """An operator that writes into its input fails alike for every sender, whatever the byte offsets."""
    assert not tensor_to_array(tensor, field="x").flags.writeable
