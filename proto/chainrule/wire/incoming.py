"""Read large tensors straight out of a received message: no copy at all.

Parsing a message with protobuf copies each ``bytes`` field into the
message's arena, and reading the field copies it again into a new ``bytes``
object: two copies of every tensor, each paying page faults on fresh memory
(about 1.5 ms per MiB here when the allocator is not tuned). gRPC hands the
deserializer the whole message as one ``bytes`` object, so a tensor's data
can instead be a read-only numpy view of that object.

:func:`read_message` walks the message's top-level fields. Each large field
that holds a Tensor (a singular Tensor field, or an entry of a
``map<string, Tensor>`` field) and has a plain shape (dtype, shape, data;
each once) is kept as a :class:`RawTensor` view; everything else is parsed
by protobuf as usual. Anything unusual (a truncated field, a key that is not
UTF-8, a tensor field or map key that occurs twice, a group) falls back to
protobuf parsing the whole message, so the result is always what protobuf
alone would give, errors included. Our encoder (``outgoing.py``) puts large
tensors first and aligns their data, so the walk is short and the views are
aligned; a misaligned view is copied once when decoded (see ``convert.py``).
"""
from __future__ import annotations

from typing import Any, Mapping

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from chainrule.core.tensor_spec import MAX_RANK

#: Tensor fields shorter than this are left to protobuf (small ones gain nothing).
LARGE_FIELD_BYTES = 1 << 16
#: The walk stops after this many small fields in a row: the rest goes to protobuf in one piece.
SMALL_FIELDS_IN_A_ROW = 64

_INT32_SIGN, _INT64_SIGN, _UINT64 = 1 << 31, 1 << 63, 1 << 64


class RawTensor:
    """A Tensor message's fields, with ``data`` a view of the received bytes (never copied here)."""

    __slots__ = ("dtype", "shape", "data")

    def __init__(self, dtype: int, shape: tuple[int, ...], data: memoryview) -> None:
        self.dtype = dtype
        self.shape = shape
        self.data = data


class _Irregular(Exception):
    """Something the fast path does not handle; protobuf parses the whole message instead."""


class Incoming:
    """A received message plus the tensors read straight from its bytes.

    ``message`` holds every other field. ``tensor_map(field)`` and
    ``tensor(field)`` give a Tensor field's contents whichever way it was read.
    """

    __slots__ = ("message", "raw_maps", "raw_singles")

    def __init__(self, message: Any, raw_maps: dict[str, dict[str, RawTensor]] | None = None,
                 raw_singles: dict[str, RawTensor] | None = None) -> None:
        self.message = message
        self.raw_maps = raw_maps or {}
        self.raw_singles = raw_singles or {}

    def tensor_map(self, field: str) -> Mapping[str, Any]:
        """The entries of a ``map<string, Tensor>`` field: Tensor messages and RawTensors by key."""
        entries = getattr(self.message, field)
        raw = self.raw_maps.get(field)
        if not raw:
            return entries
        merged: dict[str, Any] = dict(entries)
        merged.update(raw)
        return merged

    def tensor(self, field: str) -> Any:
        """A singular Tensor field: a RawTensor, the Tensor message, or None when it is not set."""
        raw = self.raw_singles.get(field)
        if raw is not None:
            return raw
        return getattr(self.message, field) if self.message.HasField(field) else None

    def complete(self) -> Any:
        """The whole message, as protobuf would have parsed it: the raw tensors copied into it."""
        for field, entries in self.raw_maps.items():
            for key, raw in entries.items():
                _fill(getattr(self.message, field)[key], raw)
        for field, raw in self.raw_singles.items():
            _fill(getattr(self.message, field), raw)
        self.raw_maps, self.raw_singles = {}, {}
        return self.message


def _fill(tensor: Any, raw: RawTensor) -> None:
    tensor.Clear()
    tensor.dtype = raw.dtype
    tensor.shape[:] = raw.shape
    tensor.data = bytes(raw.data)


def read_message(message_type: Any, data: bytes) -> Incoming:
    """Parse ``data`` as ``message_type``, reading large tensors as views of ``data``."""
    if len(data) < LARGE_FIELD_BYTES:
        return Incoming(message_type.FromString(data))
    maps, singles = _tensor_fields(message_type.DESCRIPTOR)
    try:
        rest, raw_maps, raw_singles = _walk(data, maps, singles)
    except (_Irregular, IndexError, UnicodeDecodeError):
        return Incoming(message_type.FromString(data))  # raises DecodeError if data is malformed
    if not (raw_maps or raw_singles):
        return Incoming(message_type.FromString(data))
    message = message_type.FromString(rest)
    for field, entries in raw_maps.items():
        if any(key in getattr(message, field) for key in entries):
            return Incoming(message_type.FromString(data))  # a key sent twice: protobuf's "last one wins"
    if any(message.HasField(field) for field in raw_singles):
        return Incoming(message_type.FromString(data))  # a tensor field sent twice: protobuf merges them
    return Incoming(message, raw_maps, raw_singles)


_FIELDS_CACHE: dict[str, tuple[dict[int, str], dict[int, str]]] = {}


def _tensor_fields(descriptor: Descriptor) -> tuple[dict[int, str], dict[int, str]]:
    """Field numbers of the ``map<string, Tensor>`` fields and of the singular Tensor fields."""
    cached = _FIELDS_CACHE.get(descriptor.full_name)
    if cached is None:
        maps, singles = {}, {}
        for field in descriptor.fields:
            if field.type != FieldDescriptor.TYPE_MESSAGE:
                continue
            entry = field.message_type
            if entry.GetOptions().map_entry:
                key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
                if (key.type == FieldDescriptor.TYPE_STRING and value.message_type is not None
                        and value.message_type.full_name == "chainrule.v1.Tensor"):
                    maps[field.number] = field.name
            elif entry.full_name == "chainrule.v1.Tensor" and not field.is_repeated:
                singles[field.number] = field.name
        cached = _FIELDS_CACHE[descriptor.full_name] = (maps, singles)
    return cached


def _walk(data: bytes, maps: Mapping[int, str], singles: Mapping[int, str]
          ) -> tuple[bytes, dict[str, dict[str, RawTensor]], dict[str, RawTensor]]:
    """Split ``data`` into the bytes protobuf should parse and the large tensors, as views."""
    view = memoryview(data)
    kept: list[memoryview] = []
    raw_maps: dict[str, dict[str, RawTensor]] = {}
    raw_singles: dict[str, RawTensor] = {}
    end, pos, small_start, small_run = len(data), 0, 0, 0
    while pos < end:
        if small_run >= SMALL_FIELDS_IN_A_ROW:
            break
        field_start = pos
        key, pos = _varint32(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type != 2:
            pos = _skip(data, pos, wire_type)
            small_run += 1
            continue
        length, pos = _varint32(data, pos)
        field_end = pos + length
        if field_end > end:
            raise _Irregular
        name = maps.get(number) or singles.get(number)
        if name is None or length < LARGE_FIELD_BYTES:
            pos = field_end
            small_run += 1
            continue
        try:
            if number in maps:
                entry_key, tensor = _map_entry(data, view, pos, field_end)
            else:
                tensor = _tensor(data, view, pos, field_end)
        except (_Irregular, IndexError, UnicodeDecodeError):  # unusual inside: protobuf reads this field
            pos = field_end
            small_run += 1
            continue
        if number in maps:
            entries = raw_maps.setdefault(name, {})
            if entry_key in entries:
                raise _Irregular
            entries[entry_key] = tensor
        else:
            if name in raw_singles:
                raise _Irregular
            raw_singles[name] = tensor
        if field_start > small_start:
            kept.append(view[small_start:field_start])
        pos = small_start = field_end
        small_run = 0
    kept.append(view[small_start:])
    return b"".join(kept), raw_maps, raw_singles


def _map_entry(data: bytes, view: memoryview, pos: int, end: int) -> tuple[str, RawTensor]:
    key: str | None = None
    tensor: RawTensor | None = None
    while pos < end:
        tag, pos = _varint32(data, pos)
        if tag == 0x0A and key is None:  # field 1 (key), length-delimited
            length, pos = _varint32(data, pos)
            key = bytes(view[pos:pos + length]).decode("utf-8")
        elif tag == 0x12 and tensor is None:  # field 2 (value)
            length, pos = _varint32(data, pos)
            tensor = _tensor(data, view, pos, pos + length)
        else:
            raise _Irregular
        pos += length
    if pos != end or tensor is None:
        raise _Irregular
    return key or "", tensor


def _tensor(data: bytes, view: memoryview, pos: int, end: int) -> RawTensor:
    """A Tensor message of dtype, shape (packed, unpacked or both) and data; anything else is irregular."""
    dtype: int | None = None
    shape: list[int] = []
    payload: memoryview | None = None
    while pos < end:
        tag, pos = _varint32(data, pos)
        if tag == 0x08 and dtype is None:  # dtype, an enum: int32 on the wire, negative ones take 10 bytes
            value, pos = _varint(data, pos)
            dtype = value - _UINT64 if value >= _INT64_SIGN else value
            if not -_INT32_SIGN <= dtype < _INT32_SIGN:  # protobuf would truncate it to 32 bits
                raise _Irregular
        elif tag == 0x10:  # one shape element, unpacked
            value, pos = _varint(data, pos)
            shape.append(value - _UINT64 if value >= _INT64_SIGN else value)
        elif tag == 0x12:  # shape elements, packed
            length, pos = _varint32(data, pos)
            if length > 10 * MAX_RANK:  # more dimensions than any tensor may have (10 bytes each at most)
                raise _Irregular
            stop = pos + length
            while pos < stop:
                value, pos = _varint(data, pos)
                shape.append(value - _UINT64 if value >= _INT64_SIGN else value)
            if pos != stop:
                raise _Irregular
        elif tag == 0x1A and payload is None:  # data
            length, pos = _varint32(data, pos)
            payload = view[pos:pos + length]
            pos += length
        else:
            raise _Irregular
        if len(shape) > MAX_RANK:  # no fast path to walk millions of dimensions for: protobuf reads them
            raise _Irregular
    if pos != end or payload is None:
        raise _Irregular
    return RawTensor(dtype or 0, tuple(shape), payload)


def _varint32(data: bytes, pos: int) -> tuple[int, int]:
    """A tag or a length: protobuf refuses more than 5 bytes or 32 bits, so those are irregular."""
    value, end = _varint(data, pos)
    if end - pos > 5 or value > 0xFFFFFFFF:
        raise _Irregular
    return value, end


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    byte = data[pos]
    if byte < 0x80:
        return byte, pos + 1
    value, shift = byte & 0x7F, 7
    while True:
        pos += 1
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if value >= _UINT64:
                raise _Irregular
            return value, pos + 1
        shift += 7
        if shift >= 70:
            raise _Irregular


def _skip(data: bytes, pos: int, wire_type: int) -> int:
    if wire_type == 0:
        return _varint(data, pos)[1]
    if wire_type == 1:
        return pos + 8
    if wire_type == 5:
        return pos + 4
    raise _Irregular  # groups (3, 4) and invalid wire types
