"""Hand-encoded protobuf for large tensors: one copy instead of three.

Serializing a message that holds a 16 MiB ``bytes`` field costs protobuf about
10 ms (it copies the payload into its arena, then into the output), against
about 1 ms for the copy itself. Protobuf's wire format is a concatenation of
fields, and map entries and message fields may come in any order, so a message
can be sent as the large tensors, encoded here straight from the numpy
buffers, followed by its small part serialized by protobuf. Any protobuf
parser reads the result as one ordinary message; ours (``incoming.py``) reads
the large tensors without copying them, so each one's data is placed at an
aligned offset.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .convert import dtype_code, fill_tensor
from .incoming import Incoming, RawTensor

#: Tensors with more payload bytes than this are encoded by hand.
LARGE_TENSOR_BYTES = 1 << 16

_WIRE_VARINT, _WIRE_BYTES = 0, 2


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


#: Hand-encoded tensor data starts at a multiple of this many bytes from the start of the message,
#: so the receiver's views of it (incoming.py) are aligned: numpy runs misaligned data up to 15x slower.
DATA_ALIGNMENT = 16
_EMPTY_SHAPE_CHUNK = b"\x12\x00"  # a packed shape field holding no elements: adds nothing, takes 2 bytes


def _shape_fields(shape: tuple[int, ...], odd: bool) -> bytes:
    """The shape field packed, or (``odd``) with its first element unpacked: one byte apart in length.

    Parsers must accept packed and unpacked elements of a repeated field in any
    mix; the two spellings let the encoder shift the data by one byte.
    """
    if not shape:
        return b""
    if not odd:
        packed = b"".join(_varint(int(n)) for n in shape)
        return _key(2, _WIRE_BYTES) + _varint(len(packed)) + packed
    head = _key(2, _WIRE_VARINT) + _varint(int(shape[0]))
    return head + (_shape_fields(shape[1:], False) if len(shape) > 1 else b"")


def aligned_tensor(field_prefix: Callable[[int], bytes], dtype: int, shape: tuple[int, ...], payload: Any, offset: int) -> list[Any]:
    """A length-delimited Tensor field whose data starts at an aligned position.

    ``field_prefix(tensor_length)`` gives the bytes written before the tensor
    (the field key and length, or a map entry's key, length and map key);
    ``offset`` is where those start in the message. The padding is made of
    valid fields only (see _shape_fields and _EMPTY_SHAPE_CHUNK), so any
    protobuf parser reads the same tensor.
    """
    data_length = payload.nbytes if isinstance(payload, memoryview) else len(payload)
    data_key = _key(3, _WIRE_BYTES) + _varint(data_length)
    dtype_field = _key(1, _WIRE_VARINT) + _varint(dtype) if dtype else b""
    for chunks in range(DATA_ALIGNMENT + 1):
        for odd in (False, True):
            header = dtype_field + _shape_fields(shape, odd) + _EMPTY_SHAPE_CHUNK * chunks + data_key
            prefix = field_prefix(len(header) + data_length)
            if (offset + len(prefix) + len(header)) % DATA_ALIGNMENT == 0:
                return [prefix, header, payload]
    raise AssertionError("no padding aligns the data")  # unreachable: both parities, every even step


def _as_payload(array: np.ndarray) -> tuple[int, tuple[int, ...], memoryview]:
    """dtype code, shape and memory (little-endian, C order) of an array, copied only when it must be."""
    array = np.asarray(array)
    array = array.astype(array.dtype.newbyteorder("<"), copy=False)
    if not array.flags.c_contiguous:
        array = array.copy(order="C")  # (ascontiguousarray would turn a 0-d array into 1-d)
    return dtype_code(array.dtype), array.shape, memoryview(array.reshape(-1)).cast("B")


def map_entry_prefix(field: int, key: str) -> Callable[[int], bytes]:
    """The bytes before the value of one ``map<string, Tensor>`` entry, given the value's length."""
    key_bytes = key.encode()
    key_field = _key(1, _WIRE_BYTES) + _varint(len(key_bytes)) + key_bytes

    def prefix(tensor_length: int) -> bytes:
        value_key = _key(2, _WIRE_BYTES) + _varint(tensor_length)
        entry_length = len(key_field) + len(value_key) + tensor_length
        return _key(field, _WIRE_BYTES) + _varint(entry_length) + key_field + value_key

    return prefix


def field_prefix(field: int) -> Callable[[int], bytes]:
    """The bytes before a singular message field's contents, given their length."""
    return lambda length: _key(field, _WIRE_BYTES) + _varint(length)


class Outgoing:
    """A message plus hand-encoded fields, serialized into one bytes object on demand.

    ``put_tensor``/``put_map_tensor`` place a large array in the hand-encoded
    part and a small one in the message; with ``split=False`` everything goes
    in the message. The hand-encoded part comes first, so a reader finds the
    large tensors at once. With ``keep=True`` (for an in-process receiver) large
    arrays are kept as they are, and :meth:`incoming` hands them over uncopied.
    """

    __slots__ = ("message", "parts", "split", "stage", "keep", "kept_maps", "kept_singles", "_size")

    def __init__(self, message: Any, *, split: bool = True, stage: Any = None, keep: bool = False) -> None:
        self.message = message
        self.parts: list[Any] = []
        self.split = split
        #: A file (shared_memory.TensorFile) that takes the large tensors instead: the message refers to them.
        self.stage = stage
        self.keep = keep
        self.kept_maps: dict[str, dict[str, RawTensor]] = {}
        self.kept_singles: dict[str, RawTensor] = {}
        self._size = 0

    def _large(self, array: np.ndarray) -> bool:
        return ((self.split or self.keep or self.stage is not None) and array.nbytes > LARGE_TENSOR_BYTES
                and dtype_code(array.dtype) is not None)

    def _stage(self, tensor: Any, array: np.ndarray) -> None:
        tensor.dtype = dtype_code(array.dtype)
        tensor.shape[:] = array.shape
        tensor.shared_memory.CopyFrom(self.stage.put(array))

    def _append(self, prefix: Callable[[int], bytes], array: np.ndarray) -> None:
        parts = aligned_tensor(prefix, *_as_payload(array), self._size)
        self.parts += parts
        self._size += sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)

    def put_map_tensor(self, field: str, key: str, array: Any) -> None:
        """``message.<field>[key] = array`` for a ``map<string, Tensor>`` field."""
        array = np.asarray(array)
        if self._large(array) and self.stage is not None:
            self._stage(getattr(self.message, field)[key], array)
        elif self._large(array) and self.keep:
            self.kept_maps.setdefault(field, {})[key] = _kept(array)
        elif self._large(array):
            self._append(map_entry_prefix(self.message.DESCRIPTOR.fields_by_name[field].number, key), array)
        else:
            fill_tensor(getattr(self.message, field)[key], array)

    def put_tensor(self, field: str, array: Any) -> None:
        """``message.<field> = array`` for a singular Tensor field."""
        array = np.asarray(array)
        if self._large(array) and self.stage is not None:
            self._stage(getattr(self.message, field), array)
        elif self._large(array) and self.keep:
            self.kept_singles[field] = _kept(array)
        elif self._large(array):
            self._append(field_prefix(self.message.DESCRIPTOR.fields_by_name[field].number), array)
        else:
            fill_tensor(getattr(self.message, field), array)

    def serialize(self) -> bytes:
        if self.kept_maps or self.kept_singles:  # kept for an in-process receiver, yet sent after all
            return self.parse().SerializeToString()
        if not self.parts:
            return self.message.SerializeToString()
        return b"".join([*self.parts, self.message.SerializeToString()])

    def parse(self) -> Any:
        """The complete message."""
        if self.kept_maps or self.kept_singles:
            return self.incoming().complete()
        return self.message if not self.parts else type(self.message).FromString(self.serialize())

    def incoming(self) -> Incoming:
        """What a receiver in this process reads: the message, and the kept arrays as read-only
        views (the receiver's numpy arrays then share their memory; nothing is copied)."""
        if self.parts:
            return Incoming(type(self.message).FromString(self.serialize()))
        return Incoming(self.message, {field: dict(entries) for field, entries in self.kept_maps.items()},
                        dict(self.kept_singles))


def _kept(array: np.ndarray) -> RawTensor:
    code, shape, payload = _as_payload(array)
    return RawTensor(code, shape, payload.toreadonly())


def serialize(message: Any) -> bytes:
    """gRPC serializer accepting protobuf messages, Outgoing objects and bytes."""
    if isinstance(message, Outgoing):
        return message.serialize()
    if isinstance(message, (bytes, bytearray)):
        return bytes(message)
    return message.SerializeToString()
