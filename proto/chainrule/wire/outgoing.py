"""Hand-encoded protobuf for tensors: one copy instead of three for large ones, a fraction of the
runtime's work for small ones (``AllHandEncoded``).

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

import math
import sys
from typing import Any, Callable

import numpy as np

from chainrule.core.errors import BadTensorError

from .convert import DTYPE_CODES, DTYPE_TO_NUMPY, dtype_code, fill_tensor
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


class Carrier:
    """How the large tensors of one outgoing message travel: the base class keeps every
    tensor inside the message (plain protobuf, for messages that nest in another one).

    A carrier holds the state of one message; make a new one per message.
    ``capacity``: the most bytes the message may take (its transport's limit;
    None: no limit), so a sender can refuse a response before computing it.
    """

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity

    def takes(self, array: np.ndarray) -> bool:
        """Whether ``array`` travels outside the message's own protobuf fields."""
        return False

    def put(self, message: Any, field: str, key: str | None, array: np.ndarray) -> None:
        """Carry ``array`` as ``message.<field>[key]`` (``key`` None: a singular field)."""
        raise NotImplementedError  # only called when takes() said yes

    def serialize(self, message: Any) -> bytes:
        return message.SerializeToString()

    def received(self, message: Any) -> Incoming:
        """What a receiver in this process reads."""
        return Incoming(message)


def _large(array: np.ndarray) -> bool:
    return array.nbytes > LARGE_TENSOR_BYTES and dtype_code(array.dtype) is not None


class HandEncoded(Carrier):
    """For gRPC: large tensors encoded straight from their buffers, ahead of the message (one copy)."""

    def __init__(self, capacity: int | None = None) -> None:
        super().__init__(capacity)
        self.parts: list[Any] = []
        self._size = 0

    def takes(self, array: np.ndarray) -> bool:
        return _large(array)

    def put(self, message: Any, field: str, key: str | None, array: np.ndarray) -> None:
        number = message.DESCRIPTOR.fields_by_name[field].number
        prefix = field_prefix(number) if key is None else map_entry_prefix(number, key)
        parts = aligned_tensor(prefix, *_as_payload(array), self._size)
        self.parts += parts
        self._size += sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)

    def serialize(self, message: Any) -> bytes:
        if not self.parts:
            return message.SerializeToString()
        return b"".join([*self.parts, message.SerializeToString()])

    def received(self, message: Any) -> Incoming:
        return Incoming(type(message).FromString(self.serialize(message)) if self.parts else message)


class AllHandEncoded(HandEncoded):
    """For gRPC calls of any size: every tensor encoded by hand, large ones as HandEncoded does,
    small ones as a field header and the array's bytes.

    Protobuf's runtime spends about 3 µs on a small tensor (a map entry made, four fields set,
    the entry serialized), and a call of a small graph sends and answers a dozen of them: more
    than the rest of the client's work. The header (field key and lengths, dtype, shape, data
    key: everything but the data) depends only on the field, the map key, the dtype and the shape,
    so it is made once and kept (:func:`small_tensor_header`); a tensor then costs a dictionary
    lookup and ``tobytes``: the 8 inputs of a small MLP's request take 6 µs instead of 26.
    Any protobuf parser reads the same message.
    """

    def takes(self, array: np.ndarray) -> bool:
        return _LITTLE_ENDIAN_HOST and (array.dtype in DTYPE_CODES or _large(array))

    def put(self, message: Any, field: str, key: str | None, array: np.ndarray) -> None:
        if array.nbytes > LARGE_TENSOR_BYTES:
            super().put(message, field, key, array)
            return
        header = small_tensor_header(message.DESCRIPTOR, field, key, DTYPE_CODES[array.dtype], array.shape)
        data = array.tobytes()  # C order, native (little-endian: see takes)
        self.parts += (header, data)
        self._size += len(header) + len(data)


#: Headers of small tensors by (message type, field, map key, dtype code, shape); emptied when full.
_HEADERS: dict[tuple[Any, str, str | None, int, tuple[int, ...]], bytes] = {}
MAX_HEADERS = 4096
#: Map keys (node and input names) longer than this get their headers made afresh each time, not kept.
MAX_KEPT_KEY_LENGTH = 256
_LITTLE_ENDIAN_HOST = sys.byteorder == "little"


def small_tensor_header(descriptor: Any, field: str, key: str | None, dtype: int, shape: tuple[int, ...]) -> bytes:
    """The bytes of a Tensor field (``key`` None) or ``map<string, Tensor>`` entry of ``descriptor``'s
    ``field`` that come before its data (``dtype`` and ``shape``'s data: their byte count follows), kept."""
    cache_key = (descriptor, field, key, dtype, shape)
    header = _HEADERS.get(cache_key)
    if header is None:
        data_length = math.prod(shape) * DTYPE_TO_NUMPY[dtype].itemsize
        tensor = (_key(1, _WIRE_VARINT) + _varint(dtype) if dtype else b"") + _shape_fields(shape, False)
        tensor += _key(3, _WIRE_BYTES) + _varint(data_length)
        number = descriptor.fields_by_name[field].number
        prefix = field_prefix(number) if key is None else map_entry_prefix(number, key)
        header = prefix(len(tensor) + data_length) + tensor
        if key is None or len(key) <= MAX_KEPT_KEY_LENGTH:  # (a long name is not worth the memory)
            if len(_HEADERS) >= MAX_HEADERS:
                _HEADERS.clear()
            _HEADERS[cache_key] = header
    return header


class InProcess(Carrier):
    """For a receiver in this process (LocalClient): large tensors stay arrays, handed over as
    read-only views through the same checks as received bytes; nothing is copied."""

    def __init__(self) -> None:
        super().__init__()
        self.maps: dict[str, dict[str, RawTensor]] = {}
        self.singles: dict[str, RawTensor] = {}

    def takes(self, array: np.ndarray) -> bool:
        return _large(array)

    def put(self, message: Any, field: str, key: str | None, array: np.ndarray) -> None:
        code, shape, payload = _as_payload(array)
        raw = RawTensor(code, shape, payload.toreadonly())
        if key is None:
            self.singles[field] = raw
        else:
            self.maps.setdefault(field, {})[key] = raw

    def kept(self) -> list[RawTensor]:
        """Every tensor kept as an array."""
        return [*self.singles.values(), *(raw for entries in self.maps.values() for raw in entries.values())]

    def serialize(self, message: Any) -> bytes:  # kept for an in-process receiver, yet sent after all
        return self.received(message).complete().SerializeToString()

    def received(self, message: Any) -> Incoming:
        return Incoming(message, {field: dict(entries) for field, entries in self.maps.items()}, dict(self.singles))


class SharedMemory(Carrier):
    """For a peer on this host: large tensors written into a shared-memory file
    (``shared_memory.TensorFile`` or a client's staging file), the message referring to them."""

    def __init__(self, file: Any) -> None:
        super().__init__()
        self.file = file

    def takes(self, array: np.ndarray) -> bool:
        return _large(array)

    def put(self, message: Any, field: str, key: str | None, array: np.ndarray) -> None:
        tensor = getattr(message, field) if key is None else getattr(message, field)[key]
        tensor.dtype = dtype_code(array.dtype)
        tensor.shape[:] = array.shape
        tensor.shared_memory.CopyFrom(self.file.put(array))


class Outgoing:
    """A message whose large tensors travel as its :class:`Carrier` decides.

    ``put_tensor``/``put_map_tensor`` place an array in the message, or give it
    to the carrier when the carrier takes it; the sender never branches on the
    transport. With ``values=True`` (a request's TENSOR_ENCODING_VALUES) every
    tensor goes inside the message as ``values``, one double per element, and
    the carrier takes none; an int64 element a double cannot hold exactly is
    refused (see :func:`check_exact_as_values`).
    """

    __slots__ = ("message", "carrier", "values")

    def __init__(self, message: Any, carrier: Carrier | None = None, *, values: bool = False) -> None:
        self.message = message
        self.carrier = carrier if carrier is not None else Carrier()
        self.values = values

    def put_map_tensor(self, field: str, key: str, array: Any) -> None:
        """``message.<field>[key] = array`` for a ``map<string, Tensor>`` field."""
        array = np.asarray(array)
        if self.values:
            check_exact_as_values(array, key)
            fill_tensor(getattr(self.message, field)[key], array, as_values=True)
        elif self.carrier.takes(array):
            self.carrier.put(self.message, field, key, array)
        else:
            fill_tensor(getattr(self.message, field)[key], array)

    def put_tensor(self, field: str, array: Any, *, node: str = "") -> None:
        """``message.<field> = array`` for a singular Tensor field (``node``: whose value it is, for an error)."""
        array = np.asarray(array)
        if self.values:
            check_exact_as_values(array, node)
            fill_tensor(getattr(self.message, field), array, as_values=True)
        elif self.carrier.takes(array):
            self.carrier.put(self.message, field, None, array)
        else:
            fill_tensor(getattr(self.message, field), array)

    def serialize(self) -> bytes:
        return self.carrier.serialize(self.message)

    def incoming(self) -> Incoming:
        """What a receiver in this process reads (kept arrays as read-only views, nothing copied)."""
        return self.carrier.received(self.message)

    def parse(self) -> Any:
        """The complete message, every tensor inside it."""
        return self.incoming().complete()


#: The largest magnitude up to which a double holds every integer exactly.
EXACT_DOUBLE_INTEGER = 1 << 53


def check_exact_as_values(array: np.ndarray, node: str) -> None:
    """Refuse an int64 array with an element beyond 2**53 in magnitude: as a double in ``values`` it would
    arrive rounded. INVALID_ARGUMENT (reason OUT_OF_RANGE) naming the node; the other dtypes always fit."""
    if array.dtype.kind != "i" or array.dtype.itemsize < 8 or not array.size:
        return
    low, high = int(array.min()), int(array.max())
    worst = high if high > EXACT_DOUBLE_INTEGER else low if low < -EXACT_DOUBLE_INTEGER else None
    if worst is not None:
        raise BadTensorError(
            f"response_encoding: the int64 value of '{node}' holds {worst}, beyond 2**53 in magnitude, which a "
            f"double in `values` cannot hold exactly; ask for TENSOR_ENCODING_DATA (raw bytes) instead",
            node=node or None, field="response_encoding", reason="OUT_OF_RANGE")


def serialize(message: Any) -> bytes:
    """gRPC serializer accepting protobuf messages, Outgoing objects and bytes."""
    if isinstance(message, Outgoing):
        return message.serialize()
    if isinstance(message, (bytes, bytearray)):
        return bytes(message)
    return message.SerializeToString()
