"""Protobuf <-> core conversion, at the edge of the server.

Tensors travel as raw little-endian C-order bytes (the fast path, read with
np.frombuffer without a copy) or, for hand-written JSON, as a list of doubles.
Sizes are checked against the limits before anything is allocated.
"""
from __future__ import annotations

import math
import sys
from typing import Any, Callable, Mapping

import numpy as np

from chainrule.core import GraphIR, InputDecl, Node
from chainrule.core.compile import MAX_GRAPH_NESTING
from chainrule.core.operator import MAX_ATTR_LIST
from chainrule.core.errors import (
    BadAttributeError, BadTensorError, DTypeError, LimitExceeded, ShapeError, SharedMemoryUnavailable,
)
from chainrule.core.tensor_spec import shape_text, unrepresentable
from chainrule.v1 import chainrule_pb2 as pb

from .incoming import RawTensor
from .shared_memory import SharedMemoryDir

DTYPE_TO_NUMPY: dict[int, np.dtype] = {
    pb.DTYPE_UNSPECIFIED: np.dtype("<f8"),
    pb.FLOAT64: np.dtype("<f8"),
    pb.FLOAT32: np.dtype("<f4"),
    pb.INT64: np.dtype("<i8"),
    pb.INT32: np.dtype("<i4"),
    pb.BOOL: np.dtype("?"),
}
NUMPY_TO_DTYPE: dict[str, int] = {
    "float64": pb.FLOAT64, "float32": pb.FLOAT32, "int64": pb.INT64, "int32": pb.INT32, "bool": pb.BOOL,
}
#: The same, keyed by native-order numpy dtypes: hashing a dtype is fast, ``dtype.name`` is not.
DTYPE_CODES: dict[np.dtype, int] = {np.dtype(name): code for name, code in NUMPY_TO_DTYPE.items()}


def dtype_code(dtype: np.dtype) -> int | None:
    """The wire code of a numpy dtype (either byte order), or None if it cannot be sent."""
    code = DTYPE_CODES.get(dtype)
    return code if code is not None or dtype.byteorder in "=|" else DTYPE_CODES.get(dtype.newbyteorder("="))
_BIG_ENDIAN_HOST = sys.byteorder == "big"
_LITTLE_ENDIAN_HOST = not _BIG_ENDIAN_HOST
DTYPE_NAMES: dict[int, str] = {code: dt.name for code, dt in DTYPE_TO_NUMPY.items()}


def dtype_name(code: int, *, field: str) -> str:
    try:
        return DTYPE_NAMES[code]
    except KeyError:
        raise DTypeError(f"{field}: unknown dtype code {code}", field=field) from None


def check_element_count(shape: tuple[int, ...], count: int, max_elements: int | None, field: str) -> None:
    """RESOURCE_EXHAUSTED (max_tensor_elements) for a tensor of more elements than one may have."""
    if max_elements is not None and count > max_elements:
        raise LimitExceeded(
            f"{field}: shape {shape_text(shape)} has {count} elements; the limit per tensor is {max_elements}",
            limit="max_tensor_elements", requested=count, allowed=max_elements, field=field,
        )


def tensor_to_array(tensor: pb.Tensor | RawTensor, *, field: str, max_elements: int | None = None,
                    shared_memory: SharedMemoryDir | None = None) -> np.ndarray:
    """Decode a Tensor (a message, or one read straight from received bytes), checking dtype, shape,
    size limit and byte length. Raw data becomes a view, without a copy when aligned. The array is
    read-only however it was made, so that an operator writing into its input fails alike for every
    sender, whatever the byte offsets of its message."""
    array = _decode(tensor, field, max_elements, shared_memory)
    if array.flags.writeable:  # (a view of immutable bytes already is not)
        array.setflags(write=False)
    return array


#: Shapes found sound (no negative dimension, addressable), with their element counts, by
#: ``(shape, itemsize)``: the checks cost more than decoding a small tensor does, and calls repeat
#: their shapes. Bounded: emptied when full.
_SOUND_SHAPES: dict[tuple[tuple[int, ...], int], int] = {}
MAX_SOUND_SHAPES = 4096


def element_count(shape: tuple[int, ...], dtype: np.dtype, field: str) -> int:
    """The number of elements of a tensor of ``shape``; ShapeError for a negative dimension or a
    shape numpy cannot represent."""
    key = (shape, dtype.itemsize)
    count = _SOUND_SHAPES.get(key)
    if count is not None:
        return count
    if shape:  # a scalar needs none of these checks
        if any(n < 0 for n in shape):
            raise ShapeError(f"{field}: negative dimension in shape {shape_text(shape)}", field=f"{field}.shape")
        problem = unrepresentable(shape, dtype.itemsize)
        if problem:
            raise ShapeError(f"{field}: shape {shape_text(shape)}: {problem}", field=f"{field}.shape")
    count = math.prod(shape)
    if len(_SOUND_SHAPES) >= MAX_SOUND_SHAPES:
        _SOUND_SHAPES.clear()
    _SOUND_SHAPES[key] = count
    return count


def _decode(tensor: pb.Tensor | RawTensor, field: str, max_elements: int | None,
            shared_memory: SharedMemoryDir | None) -> np.ndarray:
    dtype = DTYPE_TO_NUMPY.get(tensor.dtype)
    if dtype is None:
        raise DTypeError(f"{field}: unknown dtype code {tensor.dtype}", field=f"{field}.dtype")
    shape = tuple(tensor.shape[:])  # (a slice is a list made in C; iterating protobuf's container is not)
    count = element_count(shape, dtype, field)
    if max_elements is not None and count > max_elements:
        check_element_count(shape, count, max_elements, field)
    payload = "data" if isinstance(tensor, RawTensor) else tensor.WhichOneof("payload")
    if payload == "data":
        data = tensor.data
        expected = count * dtype.itemsize
        if len(data) != expected:
            raise BadTensorError(
                f"{field}: data has {len(data)} bytes; shape {list(shape)} of {dtype.name} needs {expected}",
                field=f"{field}.data",
            )
        array = np.ndarray(shape, dtype, data)  # a view, like frombuffer(...).reshape(...) in one step
        if not array.flags.aligned:  # a view of a received message (incoming.py) at an odd offset
            array = array.copy()  # numpy runs up to 15x slower on misaligned data
        return array if _LITTLE_ENDIAN_HOST else array.astype(dtype.newbyteorder("="))
    if payload == "shared_memory":
        if shared_memory is None:
            raise SharedMemoryUnavailable(
                f"{field}: this server does not accept tensors in shared memory here (it does in request "
                "tensors, not graph attributes, unless started with --no-shared-memory)",
                field=f"{field}.shared_memory")
        return shared_memory.read(tensor.shared_memory, dtype.newbyteorder("="), shape, field=field)
    if payload == "values":
        values = tensor.values.values
        if len(values) != count:
            raise BadTensorError(
                f"{field}: values has {len(values)} numbers; shape {list(shape)} needs {count}",
                field=f"{field}.values",
            )
        array = np.array(values, dtype=np.float64).reshape(shape)
        if dtype.kind != "f":
            if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
                raise BadTensorError(f"{field}: {dtype.name} values must be whole numbers", field=f"{field}.values")
            if dtype.kind == "b" and not np.all((array == 0) | (array == 1)):
                raise BadTensorError(f"{field}: bool values must be 0 or 1", field=f"{field}.values")
            if dtype.kind == "i" and array.size and (array.min() < -(2.0 ** (8 * dtype.itemsize - 1))
                                                     or array.max() >= 2.0 ** (8 * dtype.itemsize - 1)):
                raise BadTensorError(f"{field}: values out of range for {dtype.name}", field=f"{field}.values")
        with np.errstate(over="ignore"):  # a double beyond float32's range becomes inf, as IEEE rounding says
            return array.astype(dtype.newbyteorder("="))
    if count == 0:
        return np.zeros(shape, dtype.newbyteorder("="))
    raise BadTensorError(f"{field}: neither data nor values is set", field=field)


def array_to_tensor(array: Any, *, as_values: bool = False) -> pb.Tensor:
    """Encode an array as a Tensor (raw bytes, or a list of doubles when asked)."""
    return fill_tensor(pb.Tensor(), array, as_values=as_values)


def fill_tensor(tensor: pb.Tensor, array: Any, *, as_values: bool = False) -> pb.Tensor:
    """Write an array into an existing Tensor message (a map entry, say) without an extra copy."""
    array = np.asarray(array)
    if not as_values and _LITTLE_ENDIAN_HOST:
        code = DTYPE_CODES.get(array.dtype)  # only native dtypes, so little-endian ones, are found
        if code is not None:  # the common case, in as few steps as it takes (a response has many)
            tensor.dtype = code
            if array.ndim:
                tensor.shape[:] = array.shape
            elif tensor.shape:
                del tensor.shape[:]
            tensor.data = array.tobytes()  # C order
            return tensor
    code = dtype_code(array.dtype)
    if code is None:
        raise DTypeError(f"dtype {array.dtype} cannot be sent; supported: {', '.join(NUMPY_TO_DTYPE)}")
    tensor.dtype = code
    if array.ndim:
        tensor.shape[:] = array.shape
    elif tensor.shape:
        del tensor.shape[:]
    if as_values:
        tensor.values.values[:] = array.astype(np.float64).ravel().tolist()
    elif array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and _BIG_ENDIAN_HOST):
        tensor.data = array.astype(array.dtype.newbyteorder("<")).tobytes()
    else:
        tensor.data = array.tobytes()  # C order, and already little-endian
    return tensor


def attr_to_python(value: pb.AttrValue, *, field: str, max_elements: int | None = None, depth: int = 0) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        raise BadAttributeError(f"{field}: no value set", field=field)
    if kind == "graph":
        if depth >= MAX_GRAPH_NESTING:
            raise BadAttributeError(f"{field}: graphs nest more than {MAX_GRAPH_NESTING} deep", field=field)
        return graph_from_proto(value.graph, max_elements=max_elements, field=field, depth=depth + 1)
    if kind in ("floats", "ints"):
        values = getattr(value, kind).values
        if len(values) > MAX_ATTR_LIST:  # refused before millions of values are copied and checked
            raise BadAttributeError(f"{field}: {len(values)} values; a list attribute holds at most {MAX_ATTR_LIST} "
                                    f"(send a tensor as an input or a tensor attribute)", field=field)
        return list(values)
    if kind == "tensor":
        return tensor_to_array(value.tensor, field=field, max_elements=max_elements)
    return getattr(value, kind)


_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def _int64(value: Any) -> int:
    number = int(value)
    if not _INT64_MIN <= number <= _INT64_MAX:
        raise ValueError(f"{number} is out of range: integer attributes travel as int64 "
                         f"(from {_INT64_MIN} to {_INT64_MAX})")
    return number


def python_to_attr(value: Any) -> pb.AttrValue:
    """The AttrValue of a Python value; TypeError for a value no attribute can hold (None
    included: leave an attribute out for its default), ValueError for an int beyond int64."""
    if isinstance(value, pb.AttrValue):
        return value
    if value is None:
        raise TypeError("None is not an attribute value (leave the attribute out for its default)")
    if isinstance(value, (bool, np.bool_)):
        return pb.AttrValue(b=bool(value))
    if isinstance(value, (int, np.integer)):
        return pb.AttrValue(i=_int64(value))
    if isinstance(value, (float, np.floating)):
        return pb.AttrValue(f=float(value))
    if isinstance(value, str):
        return pb.AttrValue(s=value)
    if isinstance(value, np.ndarray):
        return pb.AttrValue(tensor=array_to_tensor(value))
    if isinstance(value, pb.Graph):
        return pb.AttrValue(graph=value)
    message = getattr(value, "message", None)  # a client Graph
    if isinstance(message, pb.Graph):
        return pb.AttrValue(graph=message)
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in value):
            return pb.AttrValue(ints=pb.Ints(values=[_int64(v) for v in value]))
        if any(v is None or not isinstance(v, (int, float, np.integer, np.floating)) for v in value):
            bad = next(v for v in value if v is None or not isinstance(v, (int, float, np.integer, np.floating)))
            raise TypeError(f"cannot encode attribute value {value!r}: a list attribute holds numbers, "
                            f"not {type(bad).__name__}")
        try:
            return pb.AttrValue(floats=pb.Floats(values=[float(v) for v in value]))
        except OverflowError:
            raise ValueError(f"cannot encode attribute value {value!r}: an integer is beyond a float's range") from None
    raise TypeError(f"cannot encode attribute value {value!r}")


def graph_from_proto(graph: pb.Graph, *, max_elements: int | None = None, field: str = "graph",
                     depth: int = 0, stop: Callable[[], None] | None = None) -> GraphIR:
    """The core GraphIR of a Graph message. ``field`` is its path in the request, for messages;
    ``depth`` counts graph attributes around it (scan's body is 1 deep). ``stop`` (a StopToken's
    check) is called every 4,096 nodes."""
    inputs = tuple(
        InputDecl(d.name, dtype_name(d.dtype, field=f"{field}.inputs[{i}].dtype"), tuple(d.shape))
        for i, d in enumerate(graph.inputs)
    )
    nodes = []
    for i, n in enumerate(graph.nodes):
        if stop is not None and not i & 4095:
            stop()
        nodes.append(Node(
            n.name, n.op, tuple(n.inputs),
            {key: attr_to_python(v, field=f"{field}.nodes[{i}].attrs.{key}", max_elements=max_elements, depth=depth)
             for key, v in n.attrs.items()},
            tuple(n.outputs),
        ))
    return GraphIR(inputs, tuple(nodes), tuple(graph.outputs), dict(graph.metadata))


def graph_to_proto(graph: GraphIR) -> pb.Graph:
    """The Graph message of a core GraphIR (a derived graph, say); graph attributes are converted too.
    Small constants stay readable lists of numbers only if written that way: tensors go as raw bytes."""
    message = pb.Graph(outputs=list(graph.outputs), metadata=dict(graph.metadata))
    for decl in graph.inputs:
        message.inputs.add(name=decl.name, dtype=NUMPY_TO_DTYPE[str(decl.dtype)], shape=[int(n) for n in decl.shape])
    for node in graph.nodes:
        entry = message.nodes.add(name=node.name, op=node.op, inputs=list(node.inputs), outputs=list(node.outputs))
        for key, value in node.attrs.items():
            if isinstance(value, GraphIR):
                entry.attrs[key].graph.CopyFrom(graph_to_proto(value))
            else:
                entry.attrs[key].CopyFrom(python_to_attr(value))
    return message


def inputs_from_proto(tensors: Mapping[str, Any], *, max_elements: int | None = None,
                      shared_memory: SharedMemoryDir | None = None,
                      before_others: Callable[[], None] | None = None) -> dict[str, np.ndarray]:
    """The request's input tensors as read-only arrays, each checked as tensor_to_array checks it
    (the common small one the short way: :func:`plain_array`). ``before_others`` runs once before
    the first tensor that is not such a plain one is decoded (it may be a reference into shared
    memory, whose read costs what its few bytes do not say: the caller checks the total first)."""
    arrays, others = {}, []
    for name in list(tensors):  # (keys then get: faster than items() on protobuf's map)
        tensor = tensors[name]
        array = plain_array(tensor, max_elements)
        if array is None:
            others.append(name)
        else:
            arrays[name] = array
    if others and before_others is not None:
        before_others()
    for name in others:
        arrays[name] = tensor_to_array(tensors[name], field=f"inputs.{name}", max_elements=max_elements,
                                       shared_memory=shared_memory)
    return arrays


def plain_array(tensor: Any, max_elements: int | None = None) -> np.ndarray | None:
    """The common small tensor decoded in the fewest steps (each protobuf attribute read costs): a
    Tensor message of a known dtype, a shape already found sound (element_count's cache) within
    ``max_elements``, not empty, and data of the right length, on a little-endian host, becomes a
    view of the message's immutable bytes, so read-only. None for anything else, which
    tensor_to_array decodes, with its checks and errors."""
    if type(tensor) is not _TENSOR or not _LITTLE_ENDIAN_HOST:
        return None
    dtype = DTYPE_TO_NUMPY.get(tensor.dtype)
    if dtype is None:
        return None
    shape = tuple(tensor.shape[:])
    count = _SOUND_SHAPES.get((shape, dtype.itemsize))
    if not count or (max_elements is not None and count > max_elements):
        return None
    data = tensor.data  # (empty unless the payload is data: then the length test fails)
    if len(data) != count * dtype.itemsize:
        return None
    array = np.ndarray(shape, dtype, data)
    return array if array.flags.aligned else None


_TENSOR = type(pb.Tensor())
