"""GraphBuilder and Var: write a computation as Python arithmetic, get a Graph message.

Example::

    g = GraphBuilder()
    x, y, z = g.input("x"), g.input("y"), g.input("z")
    p = (x + y).named("p")
    f = (p * z).named("f")
    client.evaluate(f, x=1, y=3, z=-3)

Every operation adds one node; nodes get readable automatic names (``add_1``,
``mul_2``) unless given one with ``name=`` or ``.named()``. Python numbers and
numpy arrays mixed into an expression become ``const`` nodes.

Evaluating a Var sends only what it depends on (``Var.graph`` is
``builder.graph_for(var)``): other nodes declared on the same builder, however
expensive or broken, are neither sent nor computed, and inputs it does not use
are not declared. ``g.build()`` / ``g.graph`` give everything declared.
"""
from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from operator import is_
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from chainrule.wire.convert import array_to_tensor, python_to_attr
from chainrule.v1 import chainrule_pb2 as pb

from . import dtypes
from .graph import Graph

#: Stands for "to the end" in slice bounds: the slice operator clamps like numpy.
_END = 2 ** 62

#: Constants up to this many elements are written as a list of numbers (readable JSON).
READABLE_CONST_ELEMENTS = 64


class Var:
    """A symbolic value: a declared input or the output of one node.

    Arithmetic on Vars adds nodes to their builder, and so do the comparisons
    ``<``, ``<=``, ``>``, ``>=`` (bool masks: ``ops.where(x > 0, x, 0.0)``; ``0 < x``
    builds ``greater(x, 0)``) and ``&``, ``|``, ``~`` on bool masks (logical_and,
    logical_or, logical_not).

    ``==`` and ``!=`` build no node, on purpose: Vars compare and hash by identity,
    so they can key dictionaries (``result.grad[x]``) and be looked up in lists and
    sets (``v in outputs``). Those lookups call ``==`` and need a bool back; a
    ``==`` that built a mask node would add stray nodes to the graph and then fail
    (a Var has no truth value). ``x == 0`` raises TypeError rather than giving a
    silent False; build the masks with ``ops.equal(x, 0)`` and ``ops.not_equal(x, 0)``.
    """

    #: Creation order across every builder: declaration order, which orders a pruned graph's message.
    _sequence = itertools.count()

    __array_ufunc__ = None  # numpy defers to our reflected operators: np.ones(3) * x is a node

    def __init__(self, builder: "GraphBuilder", name: str, op: str | None, inputs: tuple["Var", ...],
                 attrs: dict[str, pb.AttrValue], dtype: str | None, shape: tuple[int, ...] | None = None) -> None:
        self.builder = builder
        self._name = name
        self.op = op  # None for a declared input
        self.inputs = inputs
        self.attrs = attrs
        self.dtype = dtype  # best guess; None = unknown
        self.shape = shape  # declared shape of an input; None for nodes
        self._seq = next(Var._sequence)
        #: For one value of a several-output node (scan's): that node, also its only input here.
        self.of: Var | None = None
        #: For a several-output node: its values' Vars, in order (their names go into Node.outputs).
        self.values: list[Var] = []

    @property
    def name(self) -> str:
        return self._name

    def named(self, name: str, *, replace: bool = False) -> "Var":
        """Give this value a chosen name (unique in the builder); returns self.

        A name another Var holds is refused (ValueError naming that Var) unless
        ``replace=True``: then the name moves to this Var and the other gets an
        automatic one (``loss_7``), so graphs already built from it stay valid.
        That is the way to re-run a notebook cell that names its result.
        """
        self.builder._rename(self, name, replace=replace)
        return self

    @property
    def graph(self) -> Graph:
        """The graph of this value and what it depends on, with it as the only output
        (``builder.graph_for(self)``); other nodes of the builder are left out."""
        return self.builder.graph_for(self)

    def __repr__(self) -> str:
        if self.of is not None:
            return f"<Var {self._name!r} = value {self.of.values.index(self)} of {self.of.name} {self.dtype or '?'}>"
        if self.op is None:
            return f"<Var {self._name!r}: input {self.dtype}>"
        args = ", ".join(v.name for v in self.inputs)
        return f"<Var {self._name!r} = {self.op}({args}) {self.dtype or '?'}>"

    def __iter__(self):  # a Var is not a sequence; fail instead of looping forever
        raise TypeError("a Var cannot be iterated; index it instead (x[0], x[1:3])")

    def __getitem__(self, key: Any) -> "Var":
        """Basic indexing with integers and slices: ``x[0]``, ``x[1:3]``, ``x[:, -1]``, ``x[::-1]``.

        Adds a ``slice`` node (and a ``squeeze`` for integer indices), numpy semantics.
        An int Var, a list of ints or an int numpy array picks along axis 0 with a ``gather``
        node (``np.take(x, idx, axis=0)``): ``x[ids]``, ``x[[2, 0, 2]]``.
        """
        if isinstance(key, (Var, list, np.ndarray)):
            if isinstance(key, Var) and key.dtype is not None and key.dtype not in ("int64", "int32"):
                raise TypeError(f"a Var used as an index must be int32 or int64, got {key.dtype} ({key!r})")
            return self.builder.op("gather", self, gather_indices(key))
        keys = key if isinstance(key, tuple) else (key,)
        starts, ends, axes, steps, dropped = [], [], [], [], []
        for axis, k in enumerate(keys):
            if isinstance(k, slice):
                if k == slice(None):
                    continue
                step = 1 if k.step is None else int(k.step)
                if step == 0:
                    raise ValueError("slice step cannot be zero")
                start = int(k.start) if k.start is not None else (0 if step > 0 else _END)
                end = int(k.stop) if k.stop is not None else (_END if step > 0 else -_END)
            elif isinstance(k, (int, np.integer)) and not isinstance(k, (bool, np.bool_)):
                start, step = int(k), 1
                end = start + 1 or _END  # x[-1] ends at the end, not at 0
                dropped.append(axis)
            else:
                raise TypeError(f"a Var supports integer and slice indices only, got {type(k).__name__} "
                                "(one int Var, list of ints or int array alone gathers along axis 0; "
                                "ops.gather(x, idx, axis=...) along another)")
            starts.append(start)
            ends.append(end)
            axes.append(axis)
            steps.append(step)
        out = self
        if axes:
            out = self.builder.op("slice", self, starts=starts, ends=ends, axes=axes,
                                  steps=steps if any(s != 1 for s in steps) else None)
        return out.squeeze(dropped) if dropped else out

    def __bool__(self) -> bool:
        raise TypeError("a Var has no truth value before evaluation (a condition on values is a mask: "
                        "ops.where(x > 0, a, b); 0 < x < 1 needs (x > 0) & (x < 1), and/or/not need &, |, ~)")

    def __eq__(self, other: object) -> bool:
        """Identity between Vars; against anything else an error, not a silent False.

        ``==`` stays identity because Vars key dictionaries (``result.grad[x]``) and are looked
        up in lists, which call ``==`` and need a bool; ``ops.equal(x, 0)`` builds the mask.
        """
        if isinstance(other, Var):
            return self is other
        raise TypeError(f"a Var cannot be compared with {type(other).__name__} by == or !=: these comparisons "
                        "build no node (they compare Vars by identity, as Vars key dictionaries such as "
                        "result.grad); use ops.equal(a, b) or ops.not_equal(a, b) for a mask")

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    __hash__ = object.__hash__

    # --- arithmetic (operands may be Vars, Python numbers or numpy arrays) -----------

    def __add__(self, other: Any) -> "Var":
        return self.builder.op("add", self, other)

    def __radd__(self, other: Any) -> "Var":
        return self.builder.op("add", other, self)

    def __sub__(self, other: Any) -> "Var":
        return self.builder.op("sub", self, other)

    def __rsub__(self, other: Any) -> "Var":
        return self.builder.op("sub", other, self)

    def __mul__(self, other: Any) -> "Var":
        return self.builder.op("mul", self, other)

    def __rmul__(self, other: Any) -> "Var":
        return self.builder.op("mul", other, self)

    def __truediv__(self, other: Any) -> "Var":
        return self.builder.op("div", self, other)

    def __rtruediv__(self, other: Any) -> "Var":
        return self.builder.op("div", other, self)

    def __pow__(self, other: Any) -> "Var":
        return self.builder.op("pow", self, other)

    def __rpow__(self, other: Any) -> "Var":
        return self.builder.op("pow", other, self)

    def __matmul__(self, other: Any) -> "Var":
        return self.builder.op("matmul", self, other)

    def __rmatmul__(self, other: Any) -> "Var":
        return self.builder.op("matmul", other, self)

    def __neg__(self) -> "Var":
        return self.builder.op("neg", self)

    def __pos__(self) -> "Var":
        return self

    def __abs__(self) -> "Var":
        return self.builder.op("abs", self)

    # --- comparisons and logic: bool masks (== and != stay identity, see the class doc) --------
    # Python reflects a comparison by swapping it: ``0 < x`` calls ``x.__gt__(0)``, greater(x, 0).

    def __lt__(self, other: Any) -> "Var":
        return self.builder.op("less", self, other)

    def __le__(self, other: Any) -> "Var":
        return self.builder.op("less_equal", self, other)

    def __gt__(self, other: Any) -> "Var":
        return self.builder.op("greater", self, other)

    def __ge__(self, other: Any) -> "Var":
        return self.builder.op("greater_equal", self, other)

    def __and__(self, other: Any) -> "Var":
        return self.builder.op("logical_and", self, other)

    def __rand__(self, other: Any) -> "Var":
        return self.builder.op("logical_and", other, self)

    def __or__(self, other: Any) -> "Var":
        return self.builder.op("logical_or", self, other)

    def __ror__(self, other: Any) -> "Var":
        return self.builder.op("logical_or", other, self)

    def __invert__(self) -> "Var":
        return self.builder.op("logical_not", self)

    # --- one method per built-in operator ---------------------------------------------

    def maximum(self, other: Any, *, name: str | None = None) -> "Var":
        return self.builder.op("maximum", self, other, name=name)

    def minimum(self, other: Any, *, name: str | None = None) -> "Var":
        return self.builder.op("minimum", self, other, name=name)

    def pow(self, other: Any, *, name: str | None = None) -> "Var":
        return self.builder.op("pow", self, other, name=name)

    def matmul(self, other: Any, *, name: str | None = None) -> "Var":
        return self.builder.op("matmul", self, other, name=name)

    def exp(self, *, name: str | None = None) -> "Var":
        return self.builder.op("exp", self, name=name)

    def log(self, *, name: str | None = None) -> "Var":
        return self.builder.op("log", self, name=name)

    def sqrt(self, *, name: str | None = None) -> "Var":
        return self.builder.op("sqrt", self, name=name)

    def abs(self, *, name: str | None = None) -> "Var":
        return self.builder.op("abs", self, name=name)

    def sin(self, *, name: str | None = None) -> "Var":
        return self.builder.op("sin", self, name=name)

    def cos(self, *, name: str | None = None) -> "Var":
        return self.builder.op("cos", self, name=name)

    def tanh(self, *, name: str | None = None) -> "Var":
        return self.builder.op("tanh", self, name=name)

    def sigmoid(self, *, name: str | None = None) -> "Var":
        return self.builder.op("sigmoid", self, name=name)

    def relu(self, *, name: str | None = None) -> "Var":
        return self.builder.op("relu", self, name=name)

    def leaky_relu(self, alpha: float | None = None, *, name: str | None = None) -> "Var":
        return self.builder.op("leaky_relu", self, name=name, alpha=alpha)

    def softplus(self, *, name: str | None = None) -> "Var":
        return self.builder.op("softplus", self, name=name)

    def clip(self, min: float | None = None, max: float | None = None, *, name: str | None = None) -> "Var":
        return self.builder.op("clip", self, name=name, min=min, max=max)

    def erf(self, *, name: str | None = None) -> "Var":
        return self.builder.op("erf", self, name=name)

    def gelu(self, approximate: str | None = None, *, name: str | None = None) -> "Var":
        """x * Phi(x); ``approximate="tanh"`` for the tanh approximation."""
        return self.builder.op("gelu", self, name=name, approximate=approximate)

    def log1p(self, *, name: str | None = None) -> "Var":
        return self.builder.op("log1p", self, name=name)

    def expm1(self, *, name: str | None = None) -> "Var":
        return self.builder.op("expm1", self, name=name)

    def sign(self, *, name: str | None = None) -> "Var":
        return self.builder.op("sign", self, name=name)

    def transpose(self, *axes: int, name: str | None = None) -> "Var":
        """Permute axes (``x.transpose(1, 0)``); no axes reverses them, like numpy."""
        if len(axes) == 1 and isinstance(axes[0], (list, tuple)):
            axes = tuple(axes[0])
        return self.builder.op("transpose", self, name=name, axes=list(axes) if axes else None)

    @property
    def T(self) -> "Var":
        return self.transpose()

    def sum(self, axis: int | Sequence[int] | None = None, keepdims: bool = False, *, name: str | None = None) -> "Var":
        return self.builder.op("sum", self, name=name, **_reduce_attrs(axis, keepdims))

    def mean(self, axis: int | Sequence[int] | None = None, keepdims: bool = False, *, name: str | None = None) -> "Var":
        return self.builder.op("mean", self, name=name, **_reduce_attrs(axis, keepdims))

    def max(self, axis: int | Sequence[int] | None = None, keepdims: bool = False, *, name: str | None = None) -> "Var":
        return self.builder.op("max", self, name=name, **_reduce_attrs(axis, keepdims))

    def logsumexp(self, axis: int | Sequence[int] | None = None, keepdims: bool = False, *,
                  name: str | None = None) -> "Var":
        return self.builder.op("logsumexp", self, name=name, **_reduce_attrs(axis, keepdims))

    def min(self, axis: int | Sequence[int] | None = None, keepdims: bool = False, *, name: str | None = None) -> "Var":
        return self.builder.op("min", self, name=name, **_reduce_attrs(axis, keepdims))

    def prod(self, axis: int | Sequence[int] | None = None, keepdims: bool = False, *, name: str | None = None) -> "Var":
        return self.builder.op("prod", self, name=name, **_reduce_attrs(axis, keepdims))

    def var(self, axis: int | Sequence[int] | None = None, keepdims: bool = False, ddof: int | None = None, *,
            name: str | None = None) -> "Var":
        """Variance divided by count - ddof (ddof 0 by default), like np.var."""
        return self.builder.op("var", self, name=name, ddof=ddof, **_reduce_attrs(axis, keepdims))

    def std(self, axis: int | Sequence[int] | None = None, keepdims: bool = False, ddof: int | None = None, *,
            name: str | None = None) -> "Var":
        """Standard deviation, like np.std; its gradient is 0 where it is 0."""
        return self.builder.op("std", self, name=name, ddof=ddof, **_reduce_attrs(axis, keepdims))

    def argmax(self, axis: int | None = None, keepdims: bool = False, *, name: str | None = None) -> "Var":
        """Index of the first maximum along ``axis`` (0 by default, as ONNX; numpy flattens), int64."""
        return self.builder.op("argmax", self, name=name, axis=axis, keepdims=True if keepdims else None)

    def argmin(self, axis: int | None = None, keepdims: bool = False, *, name: str | None = None) -> "Var":
        """Index of the first minimum along ``axis`` (0 by default, as ONNX; numpy flattens), int64."""
        return self.builder.op("argmin", self, name=name, axis=axis, keepdims=True if keepdims else None)

    def reshape(self, *shape: int, name: str | None = None) -> "Var":
        """``x.reshape(2, 3)`` or ``x.reshape((2, 3))``; -1 infers one size, like numpy."""
        return self.builder.op("reshape", self, name=name, shape=_shape_arg(shape))

    def broadcast_to(self, *shape: int, name: str | None = None) -> "Var":
        return self.builder.op("broadcast_to", self, name=name, shape=_shape_arg(shape))

    def squeeze(self, axis: int | Sequence[int] | None = None, *, name: str | None = None) -> "Var":
        return self.builder.op("squeeze", self, name=name, axis=_axis_arg(axis))

    def expand_dims(self, axis: int | Sequence[int], *, name: str | None = None) -> "Var":
        return self.builder.op("expand_dims", self, name=name, axis=_axis_arg(axis))

    def slice(self, starts: Sequence[int], ends: Sequence[int], axes: Sequence[int] | None = None,
              steps: Sequence[int] | None = None, *, name: str | None = None) -> "Var":
        return self.builder.op(
            "slice", self, name=name, starts=list(starts), ends=list(ends),
            axes=None if axes is None else list(axes), steps=None if steps is None else list(steps),
        )

    def pad(self, pads: Sequence[int], value: float | None = None, *, name: str | None = None) -> "Var":
        """Pad with ``value`` (0 by default); ``pads`` in ONNX order: all begins, then all ends (negative crops)."""
        return self.builder.op("pad", self, name=name, pads=_ints_arg(pads),
                               value=None if value is None else float(value))

    def tile(self, *repeats: int, name: str | None = None) -> "Var":
        """``x.tile((2, 1))`` or ``x.tile(2, 1)``: copies along each axis (one count per axis), like np.tile."""
        return self.builder.op("tile", self, name=name, repeats=_shape_arg(repeats))

    def cumsum(self, axis: int, exclusive: bool | None = None, reverse: bool | None = None, *,
               name: str | None = None) -> "Var":
        """Running sums along ``axis`` (ONNX CumSum's ``exclusive`` and ``reverse`` flags)."""
        return self.builder.op("cumsum", self, name=name, axis=int(axis), exclusive=exclusive, reverse=reverse)

    def flip(self, axes: int | Sequence[int] | None = None, *, name: str | None = None) -> "Var":
        """Reverse the order of elements along ``axes`` (all axes by default), like np.flip."""
        return self.builder.op("flip", self, name=name, axes=None if axes is None else _ints_arg(axes))

    def softmax(self, axis: int | None = None, *, name: str | None = None) -> "Var":
        return self.builder.op("softmax", self, name=name, axis=axis)

    def log_softmax(self, axis: int | None = None, *, name: str | None = None) -> "Var":
        return self.builder.op("log_softmax", self, name=name, axis=axis)

    def stop_gradient(self, *, name: str | None = None) -> "Var":
        return self.builder.op("stop_gradient", self, name=name)


def gather_indices(value: Any) -> Any:
    """Indices for gather and one_hot: a Var as it is; a list or array of ints as an int array, so
    that it becomes a const of ints, never of the data's float dtype (int32 and int64 arrays kept)."""
    if isinstance(value, Var):
        return value
    array = np.asarray(value)
    if array.size == 0 and array.dtype.kind == "f":  # [] reads as float64
        return array.astype(np.int64)
    if array.dtype.kind not in "iu":
        raise TypeError(f"indices must be integers, got {array.dtype.name} {value!r:.40}")
    return array if array.dtype in (np.int32, np.int64) else array.astype(np.int64)


def _reduce_attrs(axis: Any, keepdims: bool) -> dict[str, Any]:
    return {"axis": _axis_arg(axis), "keepdims": True if keepdims else None}


def _axis_arg(axis: Any) -> Any:
    return list(axis) if isinstance(axis, tuple) else axis


def _ints_arg(values: Any) -> list[int]:
    """An int or a sequence of ints as a list (an ``ints`` attribute, empty lists included)."""
    return [int(values)] if isinstance(values, (int, np.integer)) else [int(n) for n in values]


def _shape_arg(shape: tuple[Any, ...]) -> list[int]:
    if len(shape) == 1 and isinstance(shape[0], (list, tuple)):
        shape = tuple(shape[0])
    return [int(n) for n in shape]


class GraphBuilder:
    """Collects declared inputs and nodes; gives the :class:`Graph` to send.

    * ``var.graph`` / ``g.graph_for(*vars)``: the graph of those values and their
      ancestors only (what ``client.evaluate(var)`` sends). Nodes declared for
      something else, expensive or broken, are left out, and so are inputs the
      values do not use.
    * ``g.build()`` / ``g.graph``: everything declared, with the outputs marked by
      :meth:`output`; for saving or registering a whole graph.

    Names are unique in a builder. Re-running code that declares them (a
    notebook cell) works as follows:

    * ``g.input("x", shape, dtype)`` again with the same dtype and shape returns
      the existing input Var. With another dtype or shape it raises ValueError;
      ``g.input("x", ..., replace=True)`` then declares a new input ``x`` and the
      old one gets an automatic name (``x_7``): graphs built from it keep working.
    * ``var.named("loss")`` when another Var is called ``loss`` raises ValueError
      naming it; ``var.named("loss", replace=True)`` moves the name to ``var`` and
      the other gets an automatic name (``loss_8``), its own graphs staying valid.
    """

    #: How many graph_for results a builder keeps (least recently used dropped first).
    GRAPH_CACHE_SIZE = 16

    def __init__(self, metadata: Mapping[str, str] | None = None) -> None:
        self.metadata: dict[str, str] = dict(metadata or {})
        self._inputs: list[Var] = []
        self._nodes: list[Var] = []
        self._names: dict[str, Var] = {}
        self._outputs: list[Var] = []
        self._counter = 0
        self._lock = threading.Lock()
        self._cache: tuple[tuple[Any, ...], Graph] | None = None
        self._version = 0
        #: Bumped by every rename: a graph_for entry built under another value re-checks its names.
        self._renames = 0
        self._pruned: OrderedDict[tuple[int, ...], _Pruned] = OrderedDict()

    @property
    def version(self) -> int:
        """Bumped by every change of what the builder declares: a node, an input, a name, the marked
        outputs (not by the metadata, a plain dict). Equal versions: the same graphs."""
        return self._version

    # --- declaring ---------------------------------------------------------------------

    def input(self, name: str, shape: Sequence[int] = (), dtype: Any = "float64", *, replace: bool = False) -> Var:
        """Declare a graph input (scalar float64 by default; -1 in ``shape`` = any size).

        Declaring ``name`` again with the same dtype and shape returns the existing
        input. Another dtype or shape, or a name a node holds, is refused unless
        ``replace=True``: then this is a new input and the old holder of the name
        gets an automatic one.
        """
        shape = tuple(int(n) for n in shape)
        if any(n < -1 for n in shape):
            raise ValueError(f"input '{name}': invalid shape {list(shape)} (sizes are >= 0, or -1 for any)")
        dtype = dtypes.normalize(dtype)
        with self._lock:
            _check_name(name)
            other = self._names.get(name)
            if other is not None and other.op is None and other.dtype == dtype and other.shape == shape:
                return other  # the same declaration again (a re-run cell): the same input
            if other is not None and not replace:
                if other.op is None:
                    what = (f"the input '{name}' is already declared as {other.dtype} of shape {list(other.shape)}, "
                            f"not {dtype} of shape {list(shape)}")
                else:
                    what = f"the name '{name}' is already used in this graph by {other!r}"
                raise ValueError(f"{what}; g.input({name!r}, ..., replace=True) declares a new input under this "
                                 "name (the other gets an automatic name), or choose another name")
            if other is not None:
                self._displace(other)
            var = Var(self, name, None, (), {}, dtype, shape)
            self._names[name] = var
            self._inputs.append(var)
            self._version += 1
        return var

    def const(self, value: Any, *, dtype: Any = None, name: str | None = None) -> Var:
        """A tensor literal (a ``const`` node); ``dtype`` defaults to the value's (float64 for Python floats)."""
        array = np.asarray(value, dtype=None if dtype is None else dtypes.normalize(dtype))
        if array.dtype.kind in "iu" and dtype is None and not isinstance(value, np.ndarray):
            array = array.astype(np.int64)
        tensor = _const_tensor(array)
        return self._add("const", (), {"value": pb.AttrValue(tensor=tensor)},
                         dtypes.result_dtype("const", [], {"value": array}), name)

    def op(self, op: str, *inputs: Any, name: str | None = None, **attrs: Any) -> Var:
        """Apply any operator by name, built-in or from a plugin: ``g.op("acme.swish", x, beta=2.0)``.

        Adds one node; non-Var inputs become const nodes of a fitting dtype.
        Attributes given as None are left out (the operator's default applies).
        """
        like = next((v.dtype for v in inputs if isinstance(v, Var) and dtypes.is_float(v.dtype)), None)
        if like is None:
            like = next((v.dtype for v in inputs if isinstance(v, Var)), None)
        args = tuple(self._lift(v, like) for v in inputs)
        given = {key: value for key, value in attrs.items() if value is not None}
        encoded = {key: _encode_attr(op, key, value) for key, value in given.items()}
        return self._add(op, args, encoded, dtypes.result_dtype(op, [a.dtype for a in args], given), name)

    def several(self, op: str, inputs: Sequence[Var], attrs: Mapping[str, Any], dtypes_out: Sequence[str | None],
                *, name: str | None = None) -> list[Var]:
        """A node with several values (``scan``): one Var per value, named ``<node>.0``,
        ``<node>.1``... (``.named()`` renames them). The node itself is no value."""
        for v in inputs:
            self._check_own(v)
        encoded = {key: _encode_attr(op, key, value) for key, value in attrs.items() if value is not None}
        node = self._add(op, tuple(inputs), encoded, None, name)
        with self._lock:
            for i, dtype in enumerate(dtypes_out):
                value = Var(self, "", None, (node,), {}, dtype)
                value._name = self._free_name(f"{node.name}.{i}")
                value.of = node
                self._names[value.name] = value
                node.values.append(value)
            self._version += 1
        return list(node.values)

    def grad(self, f: Var, wrt: Sequence[Var] | Var, seed: Any = None, *, name: str | None = None) -> list[Var]:
        """Symbolic gradients of ``f`` with respect to ``wrt``, one Var per wrt value (like
        ``tf.gradients``): a ``grad`` node, which the server replaces by the nodes of the derivative
        when it compiles the graph (docs/derivatives.md). ``seed`` is f's cotangent (a Var, or an array
        of f's shape); without one, f must have one element. The gradients are values like any other:
        ``g.grad(ops.sum(g.grad(f, [x])[0] * v), [x])`` is a Hessian-vector product."""
        values = [wrt] if isinstance(wrt, Var) else list(wrt)
        if not values:
            raise ValueError("grad needs at least one value to differentiate with respect to")
        self._check_own(f)
        inputs = [f, *values]
        if seed is not None:
            inputs.append(self._lift(seed, f.dtype))
        return self.several("grad", inputs, {"seeded": True if seed is not None else None},
                            [v.dtype for v in values], name=name)

    def output(self, *values: Var) -> None:
        """Mark values as the graph's outputs (in order; repeated calls append)."""
        with self._lock:
            for v in values:
                self._check_own(v)
                if v not in self._outputs:
                    self._outputs.append(v)
            self._version += 1

    # --- building -------------------------------------------------------------------------

    def build(self, outputs: Iterable[Var] | None = None) -> Graph:
        """The Graph of everything declared so far. ``outputs`` defaults to those marked
        with :meth:`output`; an unchanged builder returns the same Graph object."""
        outs = tuple(self._outputs if outputs is None else outputs)
        for v in outs:
            self._check_own(v)
        if not outs:
            raise ValueError("the graph has no outputs: call g.output(...) or evaluate a Var")
        with self._lock:
            key = (self._version, tuple(id(v) for v in outs), tuple(sorted(self.metadata.items())))
            if self._cache is not None and self._cache[0] == key:
                return self._cache[1]
            graph = Graph(self._message(self._inputs, self._nodes, outs), builder=self)
            self._cache = (key, graph)
            return graph

    @property
    def graph(self) -> Graph:
        """Everything declared, with the marked outputs (``build()``)."""
        return self.build()

    def graph_for(self, *targets: Var) -> Graph:
        """The graph of ``targets`` and their ancestors only: what evaluating them needs.

        Nodes and inputs in declaration order (declared inputs only those some
        target depends on: ``graph.inputs`` lists them); outputs the targets'
        names in order, a repeated target once. The message depends on nothing
        else, so declaring more nodes later changes neither it nor its graph id.

        Cached: the same targets (by identity) give the same Graph object until
        a name among them or their ancestors changes, or the metadata does
        (ancestors never change otherwise: a Var's inputs are fixed). The last
        :attr:`GRAPH_CACHE_SIZE` target tuples are kept. The walk is iterative,
        so chains of any length work.
        """
        key = tuple(map(id, targets))
        with self._lock:  # the common case first: these very targets again (checked when first seen)
            graph = self._cached_graph(key, targets)
        if graph is not None:
            return graph
        if not targets:
            raise ValueError("graph_for needs at least one Var")
        for v in targets:
            self._check_own(v)
        with self._lock:
            graph = self._cached_graph(key, targets)  # built meanwhile by another thread
            if graph is not None:
                return graph
            inputs, nodes = _ancestors(targets)
            graph = Graph(self._message(inputs, nodes, _unique(targets)), builder=self)
            named = inputs + nodes + [value for node in nodes for value in node.values]
            self._pruned[key] = _Pruned(targets, named, dict(self.metadata), self._renames, graph)
            self._pruned.move_to_end(key)
            while len(self._pruned) > self.GRAPH_CACHE_SIZE:
                self._pruned.popitem(last=False)
            return graph

    def _cached_graph(self, key: tuple[int, ...], targets: tuple[Var, ...]) -> Graph | None:
        """The graph_for result kept for ``targets`` if it still holds (under the lock), else None."""
        entry = self._pruned.get(key)
        if entry is None or not entry.valid(targets, self.metadata, self._renames):
            return None
        self._pruned.move_to_end(key)
        return entry.graph

    def _message(self, inputs: Iterable[Var], nodes: Iterable[Var], outputs: Iterable[Var]) -> pb.Graph:
        message = pb.Graph(outputs=[v.name for v in outputs], metadata=self.metadata)
        for v in inputs:
            message.inputs.add(name=v.name, dtype=pb.DType.Value(v.dtype.upper()), shape=v.shape)
        for v in nodes:
            node = message.nodes.add(name=v.name, op=v.op, inputs=[a.name for a in v.inputs],
                                     outputs=[o.name for o in v.values])
            for attr_name, value in v.attrs.items():
                node.attrs[attr_name].CopyFrom(value)
        return message

    def __getitem__(self, name: str) -> Var:
        return self._names[name]

    def vars_named(self, names: Iterable[str]) -> list[Var]:
        """The Vars of ``names`` that this builder knows, in order (unknown names are skipped)."""
        known = self._names.get
        return [v for v in map(known, names) if v is not None]

    def __contains__(self, name: object) -> bool:
        return name in self._names

    @property
    def names(self) -> list[str]:
        """Every input and node name, inputs first, in creation order."""
        return [v.name for v in self._inputs] + [v.name for v in self._nodes]

    # --- internals --------------------------------------------------------------------------

    def _lift(self, value: Any, like: str | None) -> Var:
        if isinstance(value, Var):
            self._check_own(value)
            return value
        if isinstance(value, np.ndarray):
            return self.const(value)
        if isinstance(value, (bool, int, float, list, tuple, np.generic)):
            return self.const(value, dtype=dtypes.literal_dtype(value, like))
        raise TypeError(f"cannot use {type(value).__name__} {value!r:.40} in a graph; expected a Var, a number or an array")

    def _add(self, op: str, inputs: tuple[Var, ...], attrs: dict[str, pb.AttrValue], dtype: str | None,
             name: str | None) -> Var:
        with self._lock:
            if name is None:
                name = self._auto_name(op)
            var = Var(self, name, op, inputs, attrs, dtype)
            self._claim(name, var)
            self._nodes.append(var)
            self._version += 1
        return var

    def _free_name(self, base: str) -> str:
        """``base``, or ``base_N`` when taken (under the lock)."""
        name = base
        while name in self._names:
            self._counter += 1
            name = f"{base}_{self._counter}"
        return name

    def _auto_name(self, op: str) -> str:
        base = op.rsplit(".", 1)[-1]
        while True:
            self._counter += 1
            name = f"{base}_{self._counter}"
            if name not in self._names:
                return name

    def _claim(self, name: str, var: Var) -> None:
        """Give a new node ``name`` (from ``name=``)."""
        _check_name(name)
        if name in self._names:
            raise ValueError(f"the name '{name}' is already used in this graph by {self._names[name]!r}; "
                             f"to move it to the new value, create it without name= and call "
                             f".named({name!r}, replace=True) (the other gets an automatic name), "
                             "or choose another name")
        self._names[name] = var

    def _rename(self, var: Var, name: str, replace: bool = False) -> None:
        self._check_own(var)
        with self._lock:
            if name == var.name:
                return
            _check_name(name)
            other = self._names.get(name)
            if other is not None:
                if not replace:
                    raise ValueError(f"the name '{name}' is already used in this graph by {other!r}; "
                                     f".named({name!r}, replace=True) moves the name to {var.name!r} "
                                     "(the other gets an automatic name), or choose another name")
                self._displace(other)
            del self._names[var.name]
            self._names[name] = var
            var._name = name
            self._version += 1
            self._renames += 1

    def _displace(self, var: Var) -> None:
        """Give ``var`` an automatic name built on its own (under the lock): its name goes to another Var."""
        while True:
            self._counter += 1
            new = f"{var.name}_{self._counter}"
            if new not in self._names:
                break
        del self._names[var.name]
        self._names[new] = var
        var._name = new
        self._version += 1
        self._renames += 1

    def _check_own(self, var: Any) -> None:
        if not isinstance(var, Var):
            raise TypeError(f"expected a Var, got {type(var).__name__}")
        if var.builder is not self:
            raise ValueError(f"{var!r} belongs to another GraphBuilder")
        if var.values:
            listed = ", ".join(v.name for v in var.values)
            raise ValueError(f"{var.name} is a node with several values ({listed}); use one of them")


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"a name must be a non-empty string, got {name!r}")


def _unique(values: Iterable[Var]) -> list[Var]:
    """In order, each once (by identity)."""
    seen: set[int] = set()
    return [v for v in values if not (id(v) in seen or seen.add(id(v)))]


def _ancestors(targets: Sequence[Var]) -> tuple[list[Var], list[Var]]:
    """The declared inputs and the nodes ``targets`` depend on (themselves included), each in
    declaration order. Iterative: a chain of a million nodes needs no recursion."""
    seen: dict[int, Var] = {}
    stack = list(targets)
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen[id(v)] = v
        stack.extend(a for a in v.inputs if id(a) not in seen)
    ordered = sorted(seen.values(), key=lambda v: v._seq)  # (a node's values are in its message entry)
    return [v for v in ordered if v.op is None and v.of is None], [v for v in ordered if v.op is not None]


class _Pruned:
    """One graph_for result and what it was built from, to tell whether it still holds."""

    __slots__ = ("targets", "members", "names", "metadata", "renames", "graph")

    def __init__(self, targets: tuple[Var, ...], members: list[Var], metadata: dict[str, str], renames: int,
                 graph: Graph) -> None:
        self.targets = targets
        self.members = members
        self.names = [v.name for v in members]
        self.metadata = metadata
        self.renames = renames
        self.graph = graph

    def valid(self, targets: tuple[Var, ...], metadata: dict[str, str], renames: int) -> bool:
        """Whether this entry is the graph of ``targets`` under the builder's ``metadata`` (compared with
        a copy taken when it was built) after ``renames`` renames."""
        if len(targets) != len(self.targets) or not all(map(is_, targets, self.targets)):
            return False  # another tuple of Vars under recycled ids
        if metadata != self.metadata:
            return False
        if renames != self.renames:  # some Var was renamed since: still ours if none of ours was
            if any(v.name != n for v, n in zip(self.members, self.names)):
                return False
            self.renames = renames
        return True


def _const_tensor(array: np.ndarray) -> pb.Tensor:
    """Small constants as a readable list of numbers, large ones as raw bytes."""
    exact_as_double = array.dtype.kind in "fb" or (array.size and np.abs(array).max() < 2 ** 53) or not array.size
    return array_to_tensor(array, as_values=bool(array.size <= READABLE_CONST_ELEMENTS and exact_as_double))


def _encode_attr(op: str, name: str, value: Any) -> pb.AttrValue:
    """``python_to_attr``, its TypeError or ValueError naming the operator and the attribute."""
    try:
        return python_to_attr(value)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{op}: attribute '{name}': {exc}") from None
