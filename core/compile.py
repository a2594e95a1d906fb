"""Compile a GraphIR into a flat Plan: resolve, check, order, infer shapes.

Compilation is done once per graph; ``engine.evaluate(plan, ...)`` then runs it
many times (the engine imports the plan, never the other way round). All walks are iterative (Kahn's algorithm for the order), so graphs of
millions of nodes never meet Python's recursion limit.
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .dtypes import is_differentiable, parse_dtype
from .errors import (
    ArityError, BadAttributeError, ChainruleError, CycleError, DTypeError, DuplicateNodeError,
    GraphError, LimitExceeded, OpError, OperatorFailure, OutputError, ShapeError, UnknownNodeError,
    UnknownOperatorError, where,
)
from .graph import CompiledGraph, GraphIR
from .limits import Limits
from .operator import OpDef, check_attrs
from .registry import Registry
from .tensor_spec import TensorSpec, shape_text, unrepresentable

_SPEC_CACHE_SIZE = 32
_NEVER = (-1,)  # a shape no value has
_FLOAT64 = np.dtype(np.float64)


class Shapes:
    """A plan specialised to its input shapes: every value's spec (None where an
    operator has no infer rule), the bytes they take, and the gradient edges."""

    __slots__ = ("specs", "value_bytes", "grad_bytes", "differentiable", "grad_edges", "complete", "_pruned",
                 "shape_of", "dtype_of", "scalar_type", "float_scalars", "head_of", "result_shape",
                 "result_scalar", "operations", "workspace_bytes", "chunked", "large", "programs", "__weakref__")

    def __init__(self, specs: list[TensorSpec | None], in_slots: list[tuple[int, ...]], n_inputs: int,
                 head_of: list[int], unpacked: list[bool] | None = None) -> None:
        self.specs = specs
        self.complete = all(s is not None for s in specs)
        # Flat per-slot copies for the hot loops: an ndarray fits when its shape and dtype
        # match; a numpy scalar fits when its type is the 0-d spec's scalar type.
        self.shape_of = [None if s is None else s.shape for s in specs]
        self.dtype_of = [None if s is None else s.dtype for s in specs]
        self.scalar_type = [s.dtype.type if s is not None and s.shape == () else None for s in specs]
        # What the forward loop compares results with: the same, except that the result of a node
        # whose forward returns (result, saved) or several values never fits as it comes, so it
        # takes the slow path, which unpacks it (engine._unpack).
        self.result_shape = list(self.shape_of)
        self.result_scalar = list(self.scalar_type)
        for k, slow in enumerate(unpacked or ()):
            if slow:
                self.result_shape[k], self.result_scalar[k] = _NEVER, None
        # Float values carry gradients; literals (operators without inputs, e.g. const) do not,
        # like constants in PyTorch: their gradient is never wanted and may be undefined
        # (the exponent of pow at a negative base).
        # (A later value of a several-output node is fed when its node is: see Plan.head_of.)
        self.differentiable = [
            s is not None and is_differentiable(s.dtype) and (k < n_inputs or bool(in_slots[head]))
            for k, (s, head) in enumerate(zip(specs, head_of))
        ]
        self.head_of = head_of
        diff = self.differentiable
        #: per slot: (position, input slot) of each input that takes a gradient
        self.grad_edges: list[tuple[tuple[int, int], ...]] = [
            tuple((pos, j) for pos, j in enumerate(slots) if diff[j]) for slots in in_slots
        ]
        #: Every value is a float64 scalar: the plan may run on Python floats (engine._run_floats).
        self.float_scalars = all(s is not None and s.shape == () and s.dtype == _FLOAT64 for s in specs)
        self.value_bytes = sum(s.nbytes for s in specs if s is not None)
        self.grad_bytes = sum(s.nbytes for s, d in zip(specs, self.differentiable) if d)
        self.workspace_bytes = _workspace(specs, in_slots, n_inputs)
        #: The large elementwise nodes the engine may run in blocks, by the least size it runs so
        #: (engine._chunked), and those whose vjp it runs so (engine._split_vjps).
        self.chunked: dict[Any, frozenset[int]] = {}
        #: The nodes large enough for a stop check of their own (engine._large).
        self.large: frozenset[int] | None = None
        self._pruned: dict[frozenset[int], list[tuple[tuple[int, int], ...]]] = {}
        #: The forward pass's floating-point operations (core/cost.py), counted once when first asked.
        self.operations: float | None = None
        #: Straight-line programs (core/program.py) by (output slot, wanted slots, gradients), or
        #: how many runs each combination has had before it gets one.
        self.programs: dict[tuple[Any, ...], Any] = {}

    def edges_toward(self, wanted: frozenset[int] | None,
                     in_slots: list[tuple[int, ...]]) -> list[tuple[tuple[int, int], ...]]:
        """Gradient edges pruned to those on a path from a ``wanted`` slot to the output (all of
        them when ``wanted`` is None).

        Like ``requires_grad=False`` in PyTorch: the gradient of a data input
        nobody asked for (and of everything only it feeds) is never computed.
        """
        if wanted is None:
            return self.grad_edges
        cached = self._pruned.get(wanted)
        if cached is not None:
            return cached
        needed = [k in wanted for k in range(len(in_slots))]
        head_of = self.head_of
        for k, slots in enumerate(in_slots):
            if not needed[k] and (any(needed[j] for j in slots) or needed[head_of[k]]):
                needed[k] = True
        pruned = [tuple(e for e in edges if needed[e[1]]) for edges in self.grad_edges]
        if len(self._pruned) < 8:  # a small fixed set per plan; a race only recomputes
            self._pruned[wanted] = pruned
        return pruned


class Plan(CompiledGraph):
    """A compiled graph: parallel lists indexed by slot, in topological order.

    Slots ``0 .. n_inputs-1`` are the declared inputs; every later slot is a
    node whose inputs all have smaller slots. A node with several values
    (``OpDef.n_outputs``) takes one slot per value, in a row: the first (its
    head) holds the operator and its inputs; the others have no operator and no
    inputs of their own (``head_of`` points back), and the engine fills them
    when it runs the head.
    """

    def __init__(
        self,
        *,
        names: list[str],
        ops: list[OpDef | None],
        in_slots: list[tuple[int, ...]],
        attrs: list[dict[str, Any]],
        input_dtypes: list[np.dtype],
        input_shapes: list[tuple[int, ...]],
        outputs: tuple[int, ...],
        metadata: Mapping[str, str],
        limits: Limits,
        n_out: list[int] | None = None,
        node_names: list[str] | None = None,
        stop: Callable[[], None] | None = None,
        origin: list[int] | None = None,
    ) -> None:
        self.names = names
        self.ops = ops
        self.in_slots = in_slots
        self.attrs = attrs
        self.input_dtypes = input_dtypes
        self.input_shapes = input_shapes
        self.n_inputs = len(input_dtypes)
        self.outputs = outputs
        self.metadata = dict(metadata)
        self.limits = limits
        self.index = {name: slot for slot, name in enumerate(names)}
        #: Per slot: how many values its node produces (0 on the later values of a several-output node).
        self.n_out = n_out or [1] * len(names)
        #: Per slot: the node's name, for messages (a several-output node's values have names of their own).
        self.node_names = node_names or names
        #: Per slot: the node's position in the request's graph.nodes, for error fields (None when the
        #: graph's grad and jvp nodes were expanded: its nodes are no longer the request's).
        self.origin = origin
        head_of, head = [], 0
        for k, count in enumerate(self.n_out):
            head = k if count else head
            head_of.append(head)
        self.head_of = head_of
        # The rules themselves, looked up once rather than per node per run (None on later values).
        self.forwards = [None if op is None or not n else op.forward for op, n in zip(ops, self.n_out)]
        self.vjps = [None if op is None or not n else op.vjp for op, n in zip(ops, self.n_out)]
        self.selective = [op is not None and op.selective_vjp for op in ops]
        self.residual = [op is not None and op.residuals for op in ops]
        #: Nodes the backward pass calls through engine._general_vjp: selective, several values or residuals.
        self.several = [op is not None and op.several for op in ops]
        self.general = [sel or res or sev for sel, res, sev in zip(self.selective, self.residual, self.several)]
        #: Selective vjps with neither residuals nor several values: called inline with needs=.
        self.plain_selective = [sel and not un for sel, un in zip(self.selective, [r or v for r, v in
                                                                                  zip(self.residual, self.several)])]
        #: The heads of nodes with residuals, whose bytes are counted before a run; not those of an
        #: operator that runs a graph (scan), which counts every step's values itself before its first.
        self.residual_heads = [k for k, (op, res, n) in enumerate(zip(ops, self.residual, self.n_out))
                               if res and n and op.inner_shapes is None]
        #: Heads whose forward result the engine takes apart: residuals or several values.
        self.unpacked = [res or sev for res, sev in zip(self.residual, self.several)]
        # The same rules for Python floats, when every operator has them (see OpDef.scalar).
        scalar = [op.scalar if op is not None else (None, None) for op in ops[self.n_inputs:]]
        floats_possible = all(rule is not None for rule in scalar)
        self.float_forwards = [None] * self.n_inputs + [r[0] for r in scalar] if floats_possible else None
        self.float_vjps = [None] * self.n_inputs + [r[1] for r in scalar] if floats_possible else None
        self.consumers = _count_consumers(in_slots, len(names))
        #: Per slot: the input slot over whose buffer the node may write its value (-1: none); the
        #: engine checks the buffer itself at run time (see engine._forward and OpDef.forward_into).
        self.into = _dead_after_reading(ops, in_slots, self.n_inputs, self.consumers)
        self._reuse: dict[frozenset[int], list[int] | None] = {}
        self._slot_sets: dict[tuple[str, ...], frozenset[int]] = {}
        self._shapes: dict[tuple[tuple[int, ...], ...], Shapes] = {}
        self._lock = threading.Lock()
        if all(-1 not in shape for shape in input_shapes):
            self.specialize(input_shapes, stop=stop)

    def __len__(self) -> int:
        return len(self.names)

    def reuse_for(self, kept: frozenset[int]) -> list[int] | None:
        """:attr:`into` without the inputs in ``kept`` (slots whose values the caller reads after
        the run); None when no node may write over an input then. Cached per ``kept``."""
        if kept in self._reuse:
            return self._reuse[kept]
        into = [-1 if j in kept else j for j in self.into]
        found = into if any(j >= 0 for j in into) else None
        if len(self._reuse) < 8:  # a small fixed set per plan; a race only recomputes
            self._reuse[kept] = found
        return found

    def slots_of(self, names: Sequence[str], *, field: str = "wrt") -> frozenset[int]:
        """The slots of ``names`` (a caller's ``wrt``), cached per tuple of names: calls repeat them."""
        key = names if type(names) is tuple else tuple(names)
        found = self._slot_sets.get(key)
        if found is None:
            found = frozenset(self.slot(name, field=field) for name in key)
            if len(self._slot_sets) < 64:  # a small fixed set per plan; a race only recomputes
                self._slot_sets[key] = found
        return found

    def shapes_for(self, arrays: Sequence[Any]) -> Shapes:
        """:meth:`specialize` for the shapes of ``arrays``, found in the cache without rebuilding its key."""
        key = tuple([a.shape for a in arrays])
        found = self._shapes.get(key)
        return found if found is not None else self.specialize(key)

    def slot(self, name: str, *, field: str = "output") -> int:
        try:
            return self.index[name]
        except KeyError:
            raise OutputError(f"{field}: no node or input named '{name}'", node=name, field=field) from None

    def request_index(self, name: str) -> int | None:
        """The position in the request's graph.nodes of the node that ``name`` (a value or node) names."""
        if self.origin is None:
            return None
        slot = self.index.get(name)
        if slot is None:
            slot = next((k for k, n in enumerate(self.node_names) if n == name), None)
        return None if slot is None or slot < self.n_inputs else self.origin[slot]

    def inner(self, name: str, *, field: str) -> tuple[int, "Plan", int]:
        """Where ``node/value`` lies: a value inside the graph attribute of node ``node`` (scan's
        body), named by the node's name, '/' and the value's name. Gives (the node's head slot, the
        attribute's plan, the value's slot there); OutputError naming ``name`` when there is none.
        One level: a body's own bodies are not reached."""
        node, sep, rest = name.partition("/")
        head = next((k for k, n in enumerate(self.node_names) if n == node and self.n_out[k] and sep), None)
        bodies = [] if head is None else [v for v in self.attrs[head].values() if isinstance(v, Plan)]
        if not bodies:
            raise OutputError(f"{field}: no node or input named '{name}' (nor a node with a graph attribute "
                              f"named '{node}')" if sep else f"{field}: no node or input named '{name}'",
                              node=name, field=field)
        body = bodies[0]
        if rest not in body.index:
            raise OutputError(f"{field}: '{name}': node '{node}''s graph has no node or input named '{rest}'",
                              node=name, field=field)
        return head, body, body.index[rest]

    def inner_spec(self, name: str, shapes: Shapes, *, field: str) -> tuple[int, TensorSpec | None]:
        """(times, spec) of ``node/value`` for these shapes: the value's spec inside the graph
        attribute and how many times the node runs it (so asking for it returns times x spec);
        (0, None) when the operator cannot say before running."""
        head, body, slot = self.inner(name, field=field)
        op, specs = self.ops[head], [shapes.specs[j] for j in self.in_slots[head]]
        if op is None or op.inner_shapes is None or any(s is None for s in specs):
            return 0, None
        times, inner = op.inner_shapes(*specs, **self.attrs[head])
        return times, inner.specs[slot]

    def _declared_workspace(self, specs: list[TensorSpec | None]) -> int:
        """The largest workspace an operator of this plan declares for these specs (OpDef.workspace), 0 if none."""
        largest = 0
        for k, op in enumerate(self.ops):
            if op is None or op.workspace is None or not self.n_out[k]:
                continue
            inputs = [specs[j] for j in self.in_slots[k]]
            if any(spec is None for spec in inputs):
                continue
            try:
                declared = int(op.workspace(*inputs, **self.attrs[k]))
            except Exception as exc:  # the plugin's bug: named, as a broken infer rule is
                raise OperatorFailure(f"{where(self.node_names[k], op.name)}workspace rule raised "
                                      f"{type(exc).__name__}: {exc}", node=self.node_names[k], op=op.name,
                                      plugin=op.plugin) from exc
            largest = max(largest, declared)
        return largest

    def specialize(self, input_shapes: Sequence[tuple[int, ...]], *, stop: Callable[[], None] | None = None) -> Shapes:
        """Infer every value's spec for these input shapes and check the limits (cached). ``stop``
        (a StopToken's check) is called every 4,096 nodes: a million-node graph takes seconds."""
        key = tuple(tuple(s) for s in input_shapes)
        cached = self._shapes.get(key)
        if cached is not None:
            return cached
        specs: list[TensorSpec | None] = [
            TensorSpec(shape, dtype) for shape, dtype in zip(key, self.input_dtypes)
        ]
        specs.extend([None] * (len(self.names) - self.n_inputs))
        limit = self.limits.max_tensor_elements
        for k in range(self.n_inputs, len(self.names)):
            if stop is not None and not k & 4095:
                stop()
            op = self.ops[k]  # an OpDef: slots past the inputs are nodes
            inputs = [specs[j] for j in self.in_slots[k]]
            if op is None or op.infer is None or not self.n_out[k] or any(s is None for s in inputs):
                continue
            node = self.node_names[k]
            found = _infer(op, inputs, self.attrs[k], node, self.n_out[k])
            for spec in found:
                if spec.size > limit:
                    raise LimitExceeded(
                        f"{where(node, op.name)}value of shape {spec.shape} has {spec.size} elements; "
                        f"the limit per tensor is {limit}",
                        limit="max_tensor_elements", requested=spec.size, allowed=limit, node=node, op=op.name,
                    )
            specs[k:k + len(found)] = found
        shapes = Shapes(specs, self.in_slots, self.n_inputs, self.head_of, self.unpacked)
        shapes.workspace_bytes = max(shapes.workspace_bytes, self._declared_workspace(specs))
        check_memory(self.limits, shapes.value_bytes, "values")  # the least any run needs
        with self._lock:  # plans are shared by concurrent requests
            if len(self._shapes) >= _SPEC_CACHE_SIZE:
                self._shapes.pop(next(iter(self._shapes)))
            self._shapes[key] = shapes
        return shapes


#: What one rule may allocate besides the values and gradients the plan counts, in arrays as large as
#: the largest its node reads or makes: a vjp's temporaries (``g * y`` before it is summed back to
#: y's shape, ``1 - out`` then ``* g``). Rules run one at a time, so the largest node's counts.
WORKSPACE_ARRAYS = 2


def _workspace(specs: list[TensorSpec | None], in_slots: list[tuple[int, ...]], n_inputs: int) -> int:
    """Bytes of temporaries one rule may hold at once: WORKSPACE_ARRAYS of its node's largest array."""
    widest = 0
    for k in range(n_inputs, len(specs)):
        spec = specs[k]
        if spec is None:
            continue
        nbytes = spec.nbytes
        for j in in_slots[k]:
            given = specs[j]
            if given is not None and given.nbytes > nbytes:
                nbytes = given.nbytes
        if nbytes > widest:
            widest = nbytes
    return WORKSPACE_ARRAYS * widest


def check_memory(limits: Limits, total: int, what: str = "values and gradients", node: str | None = None,
                 op: str | None = None) -> None:
    """Raise LimitExceeded when ``total`` bytes exceed the memory budget per request."""
    budget = limits.max_memory_bytes
    if total > budget:
        raise LimitExceeded(
            f"{where(node, op)}{what} would take {total} bytes; the memory budget per request is {budget}",
            limit="max_memory_bytes", requested=total, allowed=budget, node=node, op=op,
        )


def _infer(op: OpDef, inputs: list[TensorSpec], attrs: dict[str, Any], node: str, n_out: int) -> list[TensorSpec]:
    """The specs of a node's values, from its operator's infer rule, each checked."""
    try:
        found = op.infer(*inputs, **attrs)  # type: ignore[misc]
    except OpError as exc:
        raise node_error(exc, node, op) from None
    except ChainruleError as exc:  # from a graph attribute's own plan (scan's body)
        raise nested_error(exc, node, op) from None
    except Exception as exc:  # the plugin's bug, not the caller's
        raise OperatorFailure(
            f"{where(node, op.name)}infer rule raised {type(exc).__name__}: {exc}",
            node=node, op=op.name, plugin=op.plugin,
        ) from exc
    if not op.several:
        return [_checked_spec(op, node, found)]
    if not isinstance(found, (list, tuple)) or len(found) != n_out:
        raise OperatorFailure(
            f"{where(node, op.name)}infer rule returned {found!r}, expected a list of {n_out} TensorSpecs",
            node=node, op=op.name, plugin=op.plugin,
        )
    return [_checked_spec(op, node, spec) for spec in found]


def _checked_spec(op: OpDef, node: str, spec: Any) -> TensorSpec:
    if not isinstance(spec, tuple) or len(spec) != 2:
        raise OperatorFailure(
            f"{where(node, op.name)}infer rule returned {spec!r}, expected a TensorSpec",
            node=node, op=op.name, plugin=op.plugin,
        )
    shape, dtype = spec
    try:
        spec = TensorSpec(tuple(int(n) for n in shape), parse_dtype(dtype))
    except (TypeError, ValueError, DTypeError) as exc:
        raise OperatorFailure(
            f"{where(node, op.name)}infer rule returned an invalid spec {spec!r}: {exc}",
            node=node, op=op.name, plugin=op.plugin,
        ) from None
    if any(n < 0 for n in spec.shape):
        raise ShapeError(f"{where(node, op.name)}inferred a negative dimension {spec.shape}", node=node, op=op.name)
    problem = unrepresentable(spec.shape, spec.dtype.itemsize)
    if problem:
        raise ShapeError(f"{where(node, op.name)}value of shape {spec.shape}: {problem}", node=node, op=op.name)
    return spec


_OP_ERRORS: dict[str, type[GraphError]] = {
    "SHAPE_MISMATCH": ShapeError,
    "DTYPE_MISMATCH": DTypeError,
    "BAD_ATTRIBUTE": BadAttributeError,
}


def node_error(exc: ChainruleError, node: str, op: OpDef) -> GraphError:
    """Turn an operator's OpError into the matching GraphError with the node named."""
    cls = _OP_ERRORS.get(exc.reason, GraphError)
    return cls(f"{where(node, op.name)}{exc.message}", node=node, op=op.name, field=exc.field, reason=exc.reason)


def nested_error(exc: ChainruleError, node: str, op: OpDef | None, what: str = "") -> ChainruleError:
    """The same error, raised by a graph inside ``node`` (scan's body), with the outer node
    named first: ``node 'rnn' (scan): step 3: node 'h' (tanh): ...``. Its class and reason stay
    the inner error's, so its status code does not change; its node and field become the outer
    node's (the inner one is in the message), so that the field is a path in the caller's request."""
    message = f"{where(node, op.name if op else None)}{what}{exc.message}"
    nested = type(exc).__new__(type(exc))  # (copy.copy would call __init__ without its keywords)
    Exception.__init__(nested, message)
    nested.__dict__.update(exc.__dict__)
    nested.message = message
    if node is not None:
        nested.node, nested.field = node, None
    return nested


def with_request_path(exc: ChainruleError, index_of: Callable[[str], int | None]) -> ChainruleError:
    """``exc`` with its field made a path in the request (``graph.nodes[4]``, ``graph.nodes[4].attrs.axis``)
    where it names a node and its field is missing or relative to the node (``attrs.axis``):
    BadRequest.field is always a request path. ``index_of(name)`` is the node's position in the
    request's ``graph.nodes`` (None: not a node of it)."""
    if exc.node is None or (exc.field and not exc.field.startswith("attrs.")):
        return exc
    index = index_of(exc.node)
    if index is not None:
        exc.field = f"graph.nodes[{index}]" + (f".{exc.field}" if exc.field else "")
    return exc


def _request_index(graph: GraphIR) -> Callable[[str], int | None]:
    def index_of(name: str) -> int | None:
        return next((i for i, node in enumerate(graph.nodes) if name == node.name or name in node.outputs), None)
    return index_of


#: How deep graph attributes may nest (a scan in a scan's body is depth 2).
MAX_GRAPH_NESTING = 8

#: The compile-time pseudo-operators: a ``grad`` or ``jvp`` node is replaced by the nodes of its
#: derivative before the graph is compiled (docs/derivatives.md). They are not in any registry.
DERIVATIVE_OPS = frozenset({"grad", "jvp"})

#: ``expand(graph, registry, limits) -> GraphIR`` without grad and jvp nodes: installed by
#: chainrule.core.symbolic when chainrule.core is imported (symbolic compiles subgraphs itself,
#: so this module cannot import it). Graphs without those nodes never reach it.
expand_derivatives: Any = None


def compile_graph(graph: GraphIR, registry: Registry, limits: Limits | None = None, *, depth: int = 0,
                  stop: Callable[[], None] | None = None) -> Plan:
    """Check ``graph`` against ``registry`` and build its Plan, or raise a GraphError subclass.

    A ``graph`` attribute (scan's body) is compiled here too, against the same
    registry and limits, and reaches the operator as a Plan; its errors name the
    outer node and the attribute first. ``depth`` counts that nesting. ``stop`` (a StopToken's
    check) is called every 4,096 nodes, so that compiling a huge graph ends with its caller's deadline.
    """
    try:
        return _compile_graph(graph, registry, limits, depth=depth, stop=stop)
    except ChainruleError as exc:
        raise with_request_path(exc, _request_index(graph))


def _compile_graph(graph: GraphIR, registry: Registry, limits: Limits | None, *, depth: int,
                   stop: Callable[[], None] | None) -> Plan:
    limits = limits or Limits()
    expanded = False
    if any(node.op in DERIVATIVE_OPS for node in graph.nodes):
        expanded = True
        if expand_derivatives is None:  # (chainrule.core.symbolic installs it; every built-in family imports it)
            raise GraphError("grad and jvp nodes need chainrule.core.symbolic, which is not imported: import it, "
                             "or load the built-in operators (chainrule.plugins), whose rules they use",
                             field="graph.nodes")
        graph = expand_derivatives(graph, registry, limits)
    n_total = len(graph.nodes)
    if n_total > limits.max_nodes:
        raise LimitExceeded(
            f"graph has {n_total} nodes; the limit is {limits.max_nodes}",
            limit="max_nodes", requested=n_total, allowed=limits.max_nodes,
        )
    if not graph.outputs:
        raise OutputError("graph declares no outputs", field="graph.outputs")

    position: dict[str, tuple[int, int]] = {}  # value name -> (position among inputs then nodes, value index)
    input_dtypes, input_shapes = [], []
    for i, decl in enumerate(graph.inputs):
        field = f"graph.inputs[{i}]"
        _check_name(decl.name, position, field)
        position[decl.name] = (i, 0)
        input_dtypes.append(parse_dtype(decl.dtype, field=f"{field}.dtype ('{decl.name}')"))
        shape = tuple(decl.shape)
        if any((not isinstance(n, (int, np.integer))) or n < -1 for n in shape):
            raise ShapeError(f"input '{decl.name}': invalid shape {shape_text(shape)} (sizes are >= 0, or -1 for any)",
                             node=decl.name, field=f"{field}.shape")
        input_shapes.append(tuple(int(n) for n in shape))
    n_inputs = len(graph.inputs)

    ops: list[OpDef] = []
    attrs: list[dict[str, Any]] = []
    counts: list[int] = []
    several: dict[str, tuple[str, ...]] = {}  # name of a several-output node -> its values' names
    for i, node in enumerate(graph.nodes):
        if stop is not None and not i & 4095:
            stop()
        op = registry.find(node.op)
        if op is None:
            raise UnknownOperatorError(
                f"node '{node.name}': unknown operator '{node.op}'", node=node.name, op=node.op,
                field=f"graph.nodes[{i}].op",
            )
        if not op.accepts(len(node.inputs)):
            expected = "one or more" if op.variadic else str(op.arity)
            raise ArityError(
                f"{where(node.name, op.name)}takes {expected} input(s), got {len(node.inputs)}",
                node=node.name, op=op.name, field=f"graph.nodes[{i}].inputs",
            )
        checked = check_attrs(op, node.attrs, node=node.name)
        for key, value in checked.items():
            if isinstance(value, GraphIR):
                checked[key] = _compile_attribute(value, registry, limits, depth, node.name, op, f"graph.nodes[{i}].attrs.{key}")
        count = op.outputs_for(checked)
        names = node.value_names
        if len(names) != count:
            given = f"names {len(names)}" if node.outputs else "gives none"
            raise OutputError(
                f"{where(node.name, op.name)}produces {count} values; Node.outputs must name each "
                f"(it {given})", node=node.name, op=op.name, field=f"graph.nodes[{i}].outputs",
            )
        _check_name(node.name, position, f"graph.nodes[{i}].name")
        if node.outputs:
            several[node.name] = names
            position[node.name] = (-1, 0)  # the node's own name: taken, but no value
            for j, name in enumerate(names):
                _check_name(name, position, f"graph.nodes[{i}].outputs[{j}]")
                position[name] = (n_inputs + i, j)
        else:
            position[node.name] = (n_inputs + i, 0)
        ops.append(op)
        attrs.append(checked)
        counts.append(count)

    # Resolve references to (position, value index).
    node_inputs: list[tuple[int, ...]] = []
    value_of: list[tuple[int, ...]] = []
    for i, node in enumerate(graph.nodes):
        refs, which = [], []
        for ref in node.inputs:
            p, j = _resolve(ref, position, several, f"{where(node.name, node.op)}input", f"graph.nodes[{i}].inputs")
            refs.append(p)
            which.append(j)
        node_inputs.append(tuple(refs))
        value_of.append(tuple(which))

    order = _topological_order(graph, node_inputs, n_inputs)
    slot_of = list(range(n_inputs)) + [0] * len(graph.nodes)
    next_slot = n_inputs
    for i in order:
        slot_of[n_inputs + i] = next_slot
        next_slot += counts[i]

    names = [d.name for d in graph.inputs]
    node_names = list(names)
    plan_ops: list[OpDef | None] = [None] * n_inputs
    plan_attrs: list[dict[str, Any]] = [{}] * n_inputs
    in_slots: list[tuple[int, ...]] = [()] * n_inputs
    n_out = [1] * n_inputs
    origin = [-1] * n_inputs  # per slot: the node's position in the request's graph.nodes
    for i in order:
        node = graph.nodes[i]
        for j, name in enumerate(node.value_names):
            origin.append(i)
            names.append(name)
            node_names.append(node.name)
            plan_ops.append(ops[i])
            plan_attrs.append(attrs[i] if j == 0 else {})
            in_slots.append(tuple(slot_of[p] + v for p, v in zip(node_inputs[i], value_of[i])) if j == 0 else ())
            n_out.append(counts[i] if j == 0 else 0)

    outputs = []
    for i, out in enumerate(graph.outputs):
        p, j = _resolve(out, position, several, f"graph.outputs[{i}]: output", f"graph.outputs[{i}]", OutputError)
        outputs.append(slot_of[p] + j)

    return Plan(
        names=names, ops=plan_ops, in_slots=in_slots, attrs=plan_attrs,
        input_dtypes=input_dtypes, input_shapes=input_shapes, outputs=tuple(outputs),
        metadata=graph.metadata, limits=limits, n_out=n_out, node_names=node_names, stop=stop,
        origin=None if expanded else origin,
    )


def _resolve(ref: str, position: dict[str, tuple[int, int]], several: dict[str, tuple[str, ...]], what: str,
             field: str, error: type[GraphError] = UnknownNodeError) -> tuple[int, int]:
    """(position, value index) of the value ``ref`` names, or an error saying what it is instead."""
    found = position.get(ref)
    if found is None:
        raise error(f"{what} '{ref}' is neither a declared input nor a node", node=ref, field=field)
    if found[0] < 0:
        listed = ", ".join(several[ref])
        raise error(f"{what} '{ref}' is a node with several values ({listed}); name one of them",
                    node=ref, field=field)
    return found


def _compile_attribute(body: GraphIR, registry: Registry, limits: Limits, depth: int, node: str, op: OpDef,
                       field: str) -> Plan:
    """Compile a graph-valued attribute; its errors name the outer node and the attribute first."""
    if depth + 1 > MAX_GRAPH_NESTING:
        raise BadAttributeError(f"{where(node, op.name)}graphs nest more than {MAX_GRAPH_NESTING} deep",
                                node=node, op=op.name, field=field)
    try:
        return compile_graph(body, registry, limits, depth=depth + 1)
    except ChainruleError as exc:
        nested = nested_error(exc, node, op, f"attribute '{field.rsplit('.', 1)[-1]}': ")
        nested.field = f"{field}.{exc.field.removeprefix('graph.')}" if exc.field else field
        raise nested from None


def _check_name(name: str, seen: dict[str, Any], field: str) -> None:
    if not isinstance(name, str) or not name:
        raise GraphError(f"{field}: a name must be a non-empty string", field=field)
    if name in seen:
        raise DuplicateNodeError(f"node '{name}': the name is used twice", node=name, field=field)


def _topological_order(graph: GraphIR, node_inputs: list[tuple[int, ...]], n_inputs: int) -> list[int]:
    """Node indices in an order where every node follows its inputs (Kahn).

    Keeps the given order when it is already topological (the common case, and
    a single pass); raises CycleError naming the nodes of one cycle otherwise.
    """
    n = len(node_inputs)
    if all(p < n_inputs + i for i, refs in enumerate(node_inputs) for p in refs):
        return list(range(n))
    pending = [0] * n
    children: list[list[int]] = [[] for _ in range(n)]
    for i, refs in enumerate(node_inputs):
        for p in refs:
            if p >= n_inputs:
                pending[i] += 1
                children[p - n_inputs].append(i)
    order = kahn_order(pending, children)
    if len(order) == n:
        return order
    cycle = _find_cycle(pending, node_inputs, n_inputs)
    names = [graph.nodes[i].name for i in cycle]
    path = " -> ".join(names + [names[0]])
    raise CycleError(f"node '{names[0]}' ({graph.nodes[cycle[0]].op}): graph has a cycle: {path}",
                     node=names[0], op=graph.nodes[cycle[0]].op)


def kahn_order(pending: list[int], children: list[list[int]]) -> list[int]:
    """Kahn's algorithm: indices in an order where each comes after all it waits for. ``pending[i]``
    counts what i waits for, ``children[j]`` lists who waits for j; afterwards ``pending`` is nonzero
    exactly at the indices left out (a cycle, or what waits for one)."""
    ready = deque(i for i, count in enumerate(pending) if count == 0)
    order: list[int] = []
    while ready:
        i = ready.popleft()
        order.append(i)
        for c in children[i]:
            pending[c] -= 1
            if pending[c] == 0:
                ready.append(c)
    return order


def _find_cycle(pending: list[int], node_inputs: list[tuple[int, ...]], n_inputs: int) -> list[int]:
    """Walk input edges among unsorted nodes until one repeats: that loop is a cycle."""
    start = next(i for i, count in enumerate(pending) if count > 0)
    seen: dict[int, int] = {}
    path: list[int] = []
    i = start
    while i not in seen:
        seen[i] = len(path)
        path.append(i)
        i = next(p - n_inputs for p in node_inputs[i] if p >= n_inputs and pending[p - n_inputs] > 0)
    cycle = path[seen[i]:]
    cycle.reverse()  # data-flow direction: producer -> consumer
    return cycle


def _dead_after_reading(ops: list[OpDef | None], in_slots: list[tuple[int, ...]], n_inputs: int,
                        consumers: list[int]) -> list[int]:
    """Per slot k, an input j of k that no rule reads once k's forward has read it, else -1.

    j qualifies when k is its only reader, j's operator makes fresh arrays (it has
    ``forward_into`` itself: elementwise, never a view of its input nor a residual) and
    its vjp does not read its output, and k's vjp does not read k's inputs. Whether j's
    value is returned is the caller's to say (engine.evaluate's ``keep``).
    """
    into = [-1] * len(in_slots)
    for k in range(n_inputs, len(in_slots)):
        op = ops[k]
        if op is None or op.forward_into is None or op.vjp_reads not in ("output", "none"):
            continue
        for j in in_slots[k]:
            producer = ops[j] if j >= n_inputs else None
            if (consumers[j] == 1 and producer is not None and producer.forward_into is not None
                    and producer.vjp_reads in ("inputs", "none")):
                into[k] = j
                break
    return into


def _count_consumers(in_slots: list[tuple[int, ...]], n: int) -> list[int]:
    counts = [0] * n
    for slots in in_slots:
        for j in slots:
            counts[j] += 1
    return counts
