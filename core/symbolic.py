"""Derivatives as graphs: reverse mode (gradients) and forward mode (JVPs) built from registered operators.

Each operator may have two symbolic rules besides its numpy ``vjp`` (see :class:`~chainrule.core.OpDef`):
``vjp_graph(b, g, out, *inputs, **attrs)`` and ``jvp_graph(b, tangents, out, *inputs, **attrs)``, which
build their derivative with a :class:`SymbolicBuilder` ``b`` out of registered operators. From them:

* :func:`derive_reverse` turns a graph into the graph of its gradients (one reverse walk);
* :func:`derive_forward` turns a graph into the graph of a Jacobian-vector product (one forward walk);
* :func:`expand_derivatives` replaces a graph's ``grad`` and ``jvp`` nodes (compile-time pseudo-operators)
  by their derivatives, innermost first, so that a grad of a grad (a Hessian-vector product) works.
  ``compile_graph`` calls it (this module installs it as ``chainrule.core.compile.expand_derivatives``).

The results are plain GraphIRs: they compile, run, render and differentiate again like any graph.
docs/derivatives.md describes the API for rule authors. All walks are iterative.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from . import compile as _compile
from .compile import DERIVATIVE_OPS, Plan, compile_graph, kahn_order
from .dtypes import is_differentiable
from .errors import (
    ArityError, BadAttributeError, ChainruleError, CycleError, DTypeError, GraphError, LimitExceeded, MissingRuleError,
    OperatorFailure, OptionError, OutputError, SeedError, ShapeError, UnknownNodeError, UnknownOperatorError, where,
)
from .graph import GraphIR, InputDecl, Node
from .limits import Limits
from .operator import OpDef, check_attrs
from .registry import Registry
from .tensor_spec import TensorSpec

__all__ = [
    "DerivedNames", "Ref", "SymbolicBuilder", "derive_forward", "derive_reverse", "expand_derivatives", "hvp_graph",
    "linear_jvp", "no_jvp_graph", "no_vjp_graph", "plan_to_graph", "with_symbolic",
]

#: Sizes that stand in for the free (-1) dimensions of the inputs when shapes are inferred for a
#: derivation: two runs of shape inference, and a dimension whose size differs between them varies.
_PROBES = (2, 3)
#: Shape inference for a derivation checks no tensor or memory limit (nothing is allocated).
_UNLIMITED = 1 << 62

Probe = tuple  # (TensorSpec | None, TensorSpec | None): a value's spec under each probe


# --- helpers for rule tables ---------------------------------------------------------------------

def with_symbolic(table: Sequence[OpDef], rules: Mapping[str, tuple[Callable | None, Callable | None]]) -> list[OpDef]:
    """The table with each named operator's ``(vjp_graph, jvp_graph)`` filled in (dataclasses.replace).
    KeyError for a name that is not in the table: a misspelt entry must not pass unnoticed."""
    names = {op.name for op in table}
    unknown = sorted(set(rules) - names)
    if unknown:
        raise KeyError(f"symbolic rules for operators not in the table: {', '.join(unknown)}")
    return [replace(op, vjp_graph=rules[op.name][0], jvp_graph=rules[op.name][1]) if op.name in rules else op
            for op in table]


def no_vjp_graph(b: "SymbolicBuilder", g: Any, out: Any, *inputs: Any, **attrs: Any) -> tuple:
    """The vjp_graph of an operator whose derivative is zero (or that has none): None for every input."""
    return (None,) * len(inputs)


def no_jvp_graph(b: "SymbolicBuilder", tangents: Any, out: Any, *inputs: Any, **attrs: Any) -> None:
    """The jvp_graph of an operator whose derivative is zero (or that has none)."""
    return None


def linear_jvp(op_name: str) -> Callable[..., Any]:
    """The jvp_graph of an operator linear in its float inputs together (sum, transpose, add,
    concat, gather's table...): the operator itself applied to the tangents. A missing (None)
    tangent of a float input stands for zeros; an int or bool input (indices, a mask) is passed as it is."""
    def jvp_graph(b: "SymbolicBuilder", tangents: Sequence[Any], out: Any, *inputs: Any, **attrs: Any) -> Any:
        if all(t is None for t in tangents):
            return None
        args = [t if t is not None else (b.zeros_like(x) if b.is_float(x) else x) for t, x in zip(tangents, inputs)]
        return b.op(op_name, *args, **attrs)
    jvp_graph.__name__ = f"linear_jvp_{op_name}"
    return jvp_graph


def hvp_graph(graph: GraphIR, output: str, wrt: Sequence[str]) -> GraphIR:
    """``graph`` plus ``S = Σ_i sum(grad(output, wrt)_i · v_i)`` through a ``grad`` node, with an input
    ``v.<name>`` per wrt name (declared like that input): what ``ops.hvp`` builds. Its reverse derivative
    with respect to ``wrt`` is the Hessian-vector product of ``output`` along the v's."""
    declared = {d.name: d for d in graph.inputs}
    grads = tuple(f"G.{w}" for w in wrt)
    vs = [InputDecl(f"v.{w}", declared[w].dtype, declared[w].shape) for w in wrt]
    nodes = list(graph.nodes) + [Node("G", "grad", (output, *wrt), {}, grads)]
    total = None
    for w, g, v in zip(wrt, grads, vs):
        nodes += [Node(f"gv.{w}", "mul", (g, v.name)), Node(f"s.{w}", "sum", (f"gv.{w}",))]
        if total is None:
            total = f"s.{w}"
        else:
            nodes.append(Node(f"S.{w}", "add", (total, f"s.{w}")))
            total = f"S.{w}"
    return GraphIR(graph.inputs + tuple(vs), tuple(nodes), (total,))


# --- symbolic values ------------------------------------------------------------------------------

class Ref:
    """A symbolic value of a derived graph: an input or node of the original graph, or a value
    a rule built. Python operators build nodes: ``g * y`` is ``b.op("mul", g, y)``; Python numbers
    become 0-d values of the other operand's dtype (``b.scalar``)."""

    __slots__ = ("b", "name", "probe", "node", "bound")

    def __init__(self, b: "SymbolicBuilder", name: str, probe: Probe, node: "_NewNode | None" = None) -> None:
        self.b = b
        self.name = name
        self.probe = probe
        self.node = node      # the new node producing it (None: an original value or input)
        self.bound = False    # its name is final (a grad node's output, a settled d.<value>)

    @property
    def spec(self) -> TensorSpec | None:
        return self.b.spec(self)

    def __repr__(self) -> str:
        return f"<Ref {self.name!r} {self.spec or '?'}>"

    def __add__(self, other: Any) -> "Ref":
        return self.b.op("add", self, other)

    def __radd__(self, other: Any) -> "Ref":
        return self.b.op("add", other, self)

    def __sub__(self, other: Any) -> "Ref":
        return self.b.op("sub", self, other)

    def __rsub__(self, other: Any) -> "Ref":
        return self.b.op("sub", other, self)

    def __mul__(self, other: Any) -> "Ref":
        return self.b.op("mul", self, other)

    def __rmul__(self, other: Any) -> "Ref":
        return self.b.op("mul", other, self)

    def __truediv__(self, other: Any) -> "Ref":
        return self.b.op("div", self, other)

    def __rtruediv__(self, other: Any) -> "Ref":
        return self.b.op("div", other, self)

    def __neg__(self) -> "Ref":
        return self.b.op("neg", self)

    def __pow__(self, other: Any) -> "Ref":
        return self.b.op("pow", self, other)

    def __rpow__(self, other: Any) -> "Ref":
        return self.b.op("pow", other, self)

    def __matmul__(self, other: Any) -> "Ref":
        return self.b.op("matmul", self, other)

    def __rmatmul__(self, other: Any) -> "Ref":
        return self.b.op("matmul", other, self)


def _memo_key(name: str, refs: Sequence[Ref], attrs: Mapping[str, Any]) -> tuple | None:
    """What identifies a node (its operator, inputs and attributes), or None when an attribute is a tensor
    or a graph (not compared)."""
    items = []
    for key in sorted(attrs):
        value = attrs[key]
        if isinstance(value, (list, tuple)):
            value = ("seq", *value)
        elif isinstance(value, (np.ndarray, GraphIR)) or not isinstance(value, (bool, int, float, str, np.generic)):
            return None
        items.append((key, type(value).__name__, value))
    return (name, *(id(r) for r in refs), *items)


class _NewNode:
    """A node a rule built: its values are Refs, whose names may still change until emitted."""

    __slots__ = ("op", "inputs", "attrs", "values", "several", "name")

    def __init__(self, op: str, inputs: list[Ref], attrs: dict[str, Any], several: bool, name: str) -> None:
        self.op = op
        self.inputs = inputs
        self.attrs = attrs
        self.several = several
        self.name = name       # the node's own name (a one-value node is named by its value's Ref)
        self.values: list[Ref] = []


class _Names:
    """Names not yet taken: ``base``, else ``base_1``, ``base_2``..."""

    def __init__(self, taken: Iterable[str]) -> None:
        self.taken = set(taken)
        self.counters: dict[str, int] = {}

    def fresh(self, base: str) -> str:
        if base not in self.taken:
            self.taken.add(base)
            return base
        k = self.counters.get(base, 0)
        while True:
            k += 1
            name = f"{base}_{k}"
            if name not in self.taken:
                break
        self.counters[base] = k
        self.taken.add(name)
        return name


class SymbolicBuilder:
    """What a symbolic rule builds its derivative with (``b`` in ``vjp_graph(b, g, out, *inputs)``).

    ``b.op(name, *refs, **attrs)`` adds a node of a registered operator; ``b.const``, ``b.scalar``
    and the helpers (``sum_to``, ``broadcast_like``, ``zeros_like``, ``ones_like``) add literals
    and the shape-agnostic operators of builtin.derivative. ``b.spec(ref)`` is a value's static
    spec when shape inference knows it (sizes -1 where they vary with the inputs' free sizes).
    """

    def __init__(self, registry: Registry, names: _Names, limits: Limits, concrete: bool) -> None:
        self.registry = registry
        self.names = names
        self.limits = limits
        self.concrete = concrete       # the inputs' shapes are all known: one probe stands for both
        self.nodes: list[_NewNode] = []
        self.prefix = "d"
        self.rule = ""                 # the rule running, for error messages: "vjp_graph of node 'h' (tanh)"
        self._plans: dict[int, Plan] = {}
        self._memo: dict[tuple, Any] = {}

    # --- values -------------------------------------------------------------------------------

    def spec(self, ref: Ref) -> TensorSpec | None:
        """The static spec of ``ref``: its shape with -1 for a size that varies with the inputs'
        free sizes; None when shape inference could not tell."""
        a, c = ref.probe
        if a is None or c is None:
            return None
        if a is c or a == c:
            return a
        if len(a.shape) != len(c.shape):
            return None
        return TensorSpec(tuple(n if n == m else -1 for n, m in zip(a.shape, c.shape)), a.dtype)

    def is_float(self, ref: Ref) -> bool:
        """Whether ``ref`` is of a float dtype (True when not known)."""
        spec = self.spec(ref)
        return spec is None or is_differentiable(spec.dtype)

    def same(self, a: Ref, b: Ref) -> bool:
        """Whether ``a`` and ``b`` surely have one shape and dtype."""
        pa, pb = a.probe, b.probe
        return all(x is not None and y is not None and x == y for x, y in zip(pa, pb))

    # --- nodes --------------------------------------------------------------------------------

    def op(self, name: str, *inputs: Any, **attrs: Any) -> Any:
        """One node of operator ``name``: a Ref, or a tuple of Refs for an operator with several values.
        Attributes given as None are left out (the default applies)."""
        opdef = self.registry.find(name)
        if opdef is None:
            raise UnknownOperatorError(f"{self.rule}needs operator '{name}', which this server does not load "
                                       f"(derivatives use builtin.derivative and the built-in families)",
                                       op=name)
        like = next((x for x in inputs if isinstance(x, Ref)), None)
        refs = [x if isinstance(x, Ref) else self._lift(x, like) for x in inputs]
        for r in refs:
            if r.b is not self:
                raise OperatorFailure(f"{self.rule}used a value of another derivation", op=name)
        if not opdef.accepts(len(refs)):
            raise OperatorFailure(f"{self.rule}built a '{name}' node with {len(refs)} input(s)", op=name)
        given = {key: value for key, value in attrs.items() if value is not None}
        key = _memo_key(name, refs, given)
        if key is not None and key in self._memo:  # the same node again (1 - out, step(x, 0)...): built once
            return self._memo[key]
        try:
            checked = check_attrs(opdef, given)
        except BadAttributeError as exc:
            raise OperatorFailure(f"{self.rule}built a '{name}' node with bad attributes: {exc.message}",
                                  op=name) from None
        count = opdef.outputs_for(checked)
        node_name = self.names.fresh(f"{self.prefix}.{name.rsplit('.', 1)[-1]}")
        node = _NewNode(name, refs, given, opdef.several, node_name)
        probes = self._infer(opdef, refs, checked, count, node_name)
        for i in range(count):
            value_name = self.names.fresh(f"{node_name}.{i}") if opdef.several else node_name
            node.values.append(Ref(self, value_name, probes[i], node))
        self.nodes.append(node)
        result = tuple(node.values) if opdef.several else node.values[0]
        if key is not None:
            self._memo[key] = result
        return result

    def const(self, value: Any, dtype: Any = None) -> Ref:
        """A ``const`` node holding ``np.asarray(value, dtype)``."""
        return self.op("const", value=np.asarray(value, dtype=dtype))

    def scalar(self, value: float, like: Ref | None) -> Ref:
        """A 0-d ``value`` of ``like``'s dtype (float64 without ``like``)."""
        if like is None:
            return self.const(float(value), np.float64)
        return self.op("scalar_like", like, value=float(value))

    def sum_to(self, g: Ref, like: Ref) -> Ref:
        return self.op("sum_to", g, like)

    def broadcast_like(self, x: Ref, like: Ref) -> Ref:
        return self.op("broadcast_like", x, like)

    def zeros_like(self, x: Ref) -> Ref:
        return self.op("zeros_like", x)

    def ones_like(self, x: Ref) -> Ref:
        return self.op("ones_like", x)

    def add_tangents(self, *terms: Ref | None) -> Ref | None:
        """The sum of the terms that are not None (None when all are): tangents and gradients
        where None stands for zero."""
        total = None
        for t in terms:
            if t is not None:
                total = t if total is None else self.op("add", total, t)
        return total

    def _lift(self, value: Any, like: Ref | None) -> Ref:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise OperatorFailure(f"{self.rule}passed {type(value).__name__} {value!r:.40} as an input; "
                                  f"expected a Ref or a number")
        return self.scalar(float(value), like)

    def _infer(self, op: OpDef, refs: list[Ref], attrs: dict[str, Any], count: int, node: str) -> list[Probe]:
        if op.infer is None:
            return [(None, None)] * count
        for key, value in attrs.items():
            if isinstance(value, GraphIR):
                plan = self._plans.get(id(value))
                if plan is None:
                    plan = self._plans[id(value)] = compile_graph(value, self.registry, self.limits)
                attrs = {**attrs, key: plan}
        found: list[list[TensorSpec | None]] = []
        for k in range(1 if self.concrete else 2):
            specs = [r.probe[k] for r in refs]
            if any(s is None for s in specs):
                found.append([None] * count)
                continue
            try:
                result = op.infer(*specs, **attrs)
                result = list(result) if op.several else [result]
                found.append([TensorSpec(tuple(int(n) for n in s[0]), np.dtype(s[1])) for s in result])
            except Exception as exc:  # noqa: BLE001 - a concrete failure is the rule's bug; a probe's may be the probe
                if not self.concrete:
                    found.append([None] * count)
                    continue
                text = exc.message if isinstance(exc, ChainruleError) else f"{type(exc).__name__}: {exc}"
                shown = ", ".join(str(s) for s in specs)
                raise OperatorFailure(f"{self.rule}built node '{node}' ({op.name}) on inputs {shown}, which its "
                                      f"operator refuses: {text}", node=node, op=op.name) from None
        if self.concrete:
            return [(s, s) for s in found[0]]
        return list(zip(found[0], found[1]))

    # --- the derived graph ------------------------------------------------------------------------

    def _settle(self, ref: Ref, base: str) -> None:
        """Give a value that is complete (a gradient all of whose contributions are in) a readable name."""
        if ref.node is not None and not ref.bound and not ref.node.several:
            ref.name = ref.node.name = self.names.fresh(base)
            ref.bound = True

    def _bind(self, ref: Ref, name: str) -> Ref:
        """Make the value named ``name`` (a name reserved already) equal to ``ref``: ``ref`` itself,
        renamed, when it is a new one-value node not bound yet; else an alias node (sum_to(ref, ref))."""
        if ref.node is None or ref.bound or ref.node.several:
            memo, self._memo = self._memo, {}  # a node of its own, never one built before
            try:
                ref = self.op("sum_to", ref, ref)
            finally:
                self._memo = memo
        ref.name = ref.node.name = name
        ref.bound = True
        return ref

    def emit(self, roots: Iterable[Ref]) -> list[Node]:
        """The new nodes ``roots`` depend on, in creation order (a topological order)."""
        needed: set[int] = set()
        stack = [r.node for r in roots if r.node is not None]
        while stack:
            node = stack.pop()
            if id(node) in needed:
                continue
            needed.add(id(node))
            stack.extend(r.node for r in node.inputs if r.node is not None and id(r.node) not in needed)
        out = []
        for node in self.nodes:
            if id(node) not in needed:
                continue
            if node.several:
                out.append(Node(node.name, node.op, tuple(r.name for r in node.inputs), dict(node.attrs),
                                tuple(v.name for v in node.values)))
            else:
                out.append(Node(node.values[0].name, node.op, tuple(r.name for r in node.inputs), dict(node.attrs)))
        return out


# --- the graph being differentiated -------------------------------------------------------------------

class _Source:
    """A graph without grad or jvp nodes, compiled: its nodes in topological order, each value's
    producer and probe specs, and Refs for its values in one SymbolicBuilder."""

    def __init__(self, graph: GraphIR, registry: Registry, limits: Limits | None) -> None:
        limits = limits or Limits()
        self.limits = Limits(max_nodes=limits.max_nodes, max_tensor_elements=_UNLIMITED, max_memory_bytes=_UNLIMITED)
        self.graph = graph
        self.registry = registry
        plan = compile_graph(graph, registry, self.limits)
        by_name = {node.name: node for node in graph.nodes}
        self.order: list[Node] = []
        self.ops: dict[str, OpDef] = {}
        for k in range(plan.n_inputs, len(plan)):
            if plan.n_out[k]:
                node = by_name[plan.node_names[k]]
                self.order.append(node)
                self.ops[node.name] = plan.ops[k]  # type: ignore[assignment]
        self.producer: dict[str, Node] = {v: node for node in self.order for v in node.value_names}
        self.input_names = [d.name for d in graph.inputs]
        shapes = plan.input_shapes
        self.concrete = all(-1 not in shape for shape in shapes)
        self.probes: dict[str, Probe] = {}
        try:
            if self.concrete:
                specs = plan.specialize(shapes).specs
                self.probes = {name: (s, s) for name, s in zip(plan.names, specs)}
            else:
                runs = [plan.specialize([tuple(p if n == -1 else n for n in shape) for shape in shapes]).specs
                        for p in _PROBES]
                self.probes = {name: (a, c) for name, a, c in zip(plan.names, *runs)}
        except ChainruleError:  # shape inference fails on the probe sizes: no static specs
            self.probes = {}
        self.b = SymbolicBuilder(registry, _Names(_all_names(graph)), self.limits, self.concrete)
        self._refs: dict[str, Ref] = {}
        self._attrs: dict[str, dict[str, Any]] = {}

    def ref(self, name: str) -> Ref:
        ref = self._refs.get(name)
        if ref is None:
            ref = self._refs[name] = Ref(self.b, name, self.probes.get(name, (None, None)))
            ref.bound = True
        return ref

    def spec(self, name: str) -> TensorSpec | None:
        return self.b.spec(self.ref(name))

    def differentiable(self, name: str) -> bool:
        spec = self.spec(name)
        return spec is None or is_differentiable(spec.dtype)

    def attrs(self, node: Node) -> dict[str, Any]:
        checked = self._attrs.get(node.name)
        if checked is None:
            checked = self._attrs[node.name] = check_attrs(self.ops[node.name], node.attrs, node=node.name)
        return checked

    def check_name(self, name: str, field: str) -> None:
        if name not in self.producer and name not in self.input_names:
            raise OutputError(f"{field}: no node or input named '{name}'", node=name, field=field)

    def ancestors(self, names: Iterable[str]) -> set[str]:
        """The names of the nodes the values ``names`` depend on (their own nodes included)."""
        seen: set[str] = set()
        stack = [self.producer[n] for n in names if n in self.producer]
        while stack:
            node = stack.pop()
            if node.name in seen:
                continue
            seen.add(node.name)
            stack.extend(self.producer[i] for i in node.inputs if i in self.producer)
        return seen


def _all_names(graph: GraphIR) -> list[str]:
    names = [d.name for d in graph.inputs]
    for node in graph.nodes:
        names.append(node.name)
        names.extend(node.outputs)
    return names


def _call(rule: Callable[..., Any], op: OpDef, node: Node, role: str, *args: Any, **attrs: Any) -> Any:
    try:
        return rule(*args, **attrs)
    except ChainruleError:
        raise
    except Exception as exc:  # the rule's bug
        raise OperatorFailure(f"{where(node.name, op.name)}{role} raised {type(exc).__name__}: {exc}",
                              node=node.name, op=op.name, plugin=op.plugin) from exc


def _missing(op: OpDef, node: Node, role: str) -> MissingRuleError:
    mode = "reverse mode (a gradient graph, a second derivative)" if role == "vjp_graph" else "forward mode (a JVP)"
    who = f"plugin '{op.plugin}'" if op.plugin else "its plugin"
    return MissingRuleError(
        f"{where(node.name, op.name)}operator '{op.name}' has no {role} rule, so it cannot be differentiated in "
        f"{mode}; it still works to first order (Evaluate). {who} can add {role} (docs/derivatives.md)",
        node=node.name, op=op.name, rule=role)


def _checked_refs(result: Any, count: int, op: OpDef, node: Node, role: str, b: SymbolicBuilder) -> list[Ref | None]:
    items = [result] if count == 1 and not isinstance(result, (tuple, list)) and role == "jvp_graph" else result
    if not isinstance(items, (tuple, list)) or len(items) != count:
        raise OperatorFailure(f"{where(node.name, op.name)}{role} returned {result!r:.80}; expected "
                              + (f"a tuple of {count} (a Ref or None per input)" if role == "vjp_graph"
                                 else f"{count} tangent(s)"), node=node.name, op=op.name, plugin=op.plugin)
    for item in items:
        if item is not None and (not isinstance(item, Ref) or item.b is not b):
            raise OperatorFailure(f"{where(node.name, op.name)}{role} returned {item!r:.60}, not a Ref of its builder "
                                  f"or None", node=node.name, op=op.name, plugin=op.plugin)
    return list(items)


# --- the two walks ----------------------------------------------------------------------------------

def _reverse(src: _Source, output: str, wrt: Sequence[str], seed: Ref) -> dict[str, Ref | None]:
    """Gradients of ``output`` (cotangent ``seed``) with respect to ``wrt``: one walk over the nodes
    in reverse topological order, fan-out accumulated with ``add``."""
    b = src.b
    relevant = src.ancestors([output])
    depends = set(wrt)                       # the values that depend on some wrt value
    for node in src.order:
        if node.name in relevant and any(i in depends for i in node.inputs):
            depends.update(node.value_names)
    grads: dict[str, Ref] = {output: seed}
    for node in reversed(src.order):
        if node.name not in relevant:
            continue
        values = node.value_names
        gs = [grads.get(v) for v in values]
        for v, g in zip(values, gs):
            if g is not None:
                b._settle(g, f"d.{v}")
        if all(g is None for g in gs) or not any(i in depends for i in node.inputs):
            continue
        op = src.ops[node.name]
        if op.vjp_graph is None:
            raise _missing(op, node, "vjp_graph")
        b.prefix, b.rule = f"d.{node.name}", f"vjp_graph of {where(node.name, op.name)}"
        outs = [src.ref(v) for v in values]
        inputs = [src.ref(i) for i in node.inputs]
        result = _call(op.vjp_graph, op, node, "vjp_graph", b, tuple(gs) if op.several else gs[0],
                       tuple(outs) if op.several else outs[0], *inputs, **src.attrs(node))
        for name, x, r in zip(node.inputs, inputs, _checked_refs(result, len(inputs), op, node, "vjp_graph", b)):
            if r is None or name not in depends or not src.differentiable(name):
                continue
            if not b.same(r, x):
                r = b.op("sum_to", r, x)
            previous = grads.get(name)
            grads[name] = r if previous is None else b.op("add", previous, r)
    for w in wrt:
        if w in grads:
            b._settle(grads[w], f"d.{w}")
    return {w: grads.get(w) for w in wrt}


def _forward(src: _Source, output: str, tangents: Mapping[str, Ref]) -> Ref | None:
    """The tangent of ``output`` given the tangents of some values: one walk in topological order."""
    b = src.b
    relevant = src.ancestors([output])
    known: dict[str, Ref] = dict(tangents)
    for node in src.order:
        if node.name not in relevant or any(v in tangents for v in node.value_names):
            continue
        ts = [known.get(i) if src.differentiable(i) else None for i in node.inputs]
        if all(t is None for t in ts):
            continue
        op = src.ops[node.name]
        if op.jvp_graph is None:
            raise _missing(op, node, "jvp_graph")
        b.prefix, b.rule = f"t.{node.name}", f"jvp_graph of {where(node.name, op.name)}"
        values = node.value_names
        outs = [src.ref(v) for v in values]
        result = _call(op.jvp_graph, op, node, "jvp_graph", b, tuple(ts), tuple(outs) if op.several else outs[0],
                       *(src.ref(i) for i in node.inputs), **src.attrs(node))
        if result is None:
            continue
        for v, out, t in zip(values, outs, _checked_refs(result, len(values), op, node, "jvp_graph", b)):
            if t is None or not src.differentiable(v):
                continue
            if not b.same(t, out):
                t = b.op("broadcast_like", t, out)
            b._settle(t, f"t.{v}")
            known[v] = t
    return known.get(output)


# --- public API -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class DerivedNames:
    """The names a derived graph gives: reverse mode's ``gradients`` (wrt name -> output name) and
    ``seed`` (the seed input's name; "" when the seed is 1), forward mode's ``tangents`` (wrt name ->
    tangent input name) and ``tangent_output``; and the differentiated ``output``."""

    gradients: Mapping[str, str] = field(default_factory=dict)
    seed: str = ""
    #: The differentiated output (resolved when not given).
    output: str = ""
    tangents: Mapping[str, str] = field(default_factory=dict)
    tangent_output: str = ""


def _output_name(graph: GraphIR, output: str | None) -> str:
    if output:
        return output
    if len(graph.outputs) != 1:
        raise OutputError(f"output: the graph has {len(graph.outputs)} outputs; say which to differentiate",
                          field="output")
    return graph.outputs[0]


def _check_request(src: _Source, output: str, wrt: Sequence[str]) -> None:
    src.check_name(output, "output")
    if not src.differentiable(output):
        raise DTypeError(f"output: '{output}' is {src.spec(output).dtype.name}; only float values have derivatives",
                         node=output, field="output")
    if not wrt:
        raise OptionError("wrt: name at least one graph input or node to differentiate with respect to", field="wrt")
    for i, w in enumerate(wrt):
        src.check_name(w, f"wrt[{i}]")
        if not src.differentiable(w):
            raise DTypeError(f"wrt[{i}]: '{w}' is {src.spec(w).dtype.name}; only float values have derivatives",
                             node=w, field=f"wrt[{i}]")


def _ones_seed(src: _Source, output: str, what: str, node: str | None = None) -> Ref:
    spec = src.spec(output)  # (unknown when an operator has no infer rule: ones of its shape, whatever it is)
    if spec is not None and (-1 in spec.shape or spec.size != 1):
        raise SeedError(f"{what}output '{output}' has shape {list(spec.shape)}, not one element: give a seed of "
                        f"its shape", node=node or output, field="seed")
    src.b.prefix = f"d.{output}"
    return src.b.op("ones_like", src.ref(output))


def _assemble(src: _Source, inputs: Sequence[InputDecl], outputs: Sequence[str], roots: Sequence[Ref]) -> GraphIR:
    """The derived graph: every declared input, the original nodes it reads, the new nodes, pruned."""
    new = src.b.emit(roots)
    reads = set(outputs)
    for node in new:
        reads.update(node.inputs)
    keep = src.ancestors(reads)
    nodes = tuple(node for node in src.graph.nodes if node.name in keep) + tuple(new)
    return GraphIR(tuple(inputs), nodes, tuple(outputs), dict(src.graph.metadata))


def derive_reverse(graph: GraphIR, registry: Registry, *, output: str | None = None, wrt: Sequence[str],
                   seed: bool = False, limits: Limits | None = None) -> tuple[GraphIR, DerivedNames]:
    """The graph of the gradients of ``output`` with respect to ``wrt``.

    Its inputs are ``graph``'s, plus with ``seed=True`` one input for the output's cotangent (of
    its dtype and shape; ``names.seed``); without, the output must have one element and the seed is
    1. Its outputs are one gradient per wrt name, in order (``names.gradients``); a name the output
    does not depend on gets zeros. ``grad`` and ``jvp`` nodes of ``graph`` are expanded first.
    """
    graph = expand_derivatives(graph, registry, limits)
    output = _output_name(graph, output)
    wrt = list(wrt)
    src = _Source(graph, registry, limits)
    _check_request(src, output, wrt)
    inputs = list(graph.inputs)
    seed_name = ""
    if seed:
        spec = src.spec(output)
        if spec is None:
            raise ShapeError(f"output '{output}': its shape cannot be inferred, so the seed input cannot be declared; "
                             f"declare the graph's input shapes", node=output, field="output")
        seed_name = src.b.names.fresh("seed")
        inputs.append(InputDecl(seed_name, spec.dtype.name, spec.shape))
        seed_ref = Ref(src.b, seed_name, src.probes.get(output, (None, None)))
        seed_ref.bound = True
    else:
        seed_ref = _ones_seed(src, output, "")
    grads = _reverse(src, output, wrt, seed_ref)
    results = []
    for w in wrt:
        g = grads[w]
        if g is None:
            src.b.prefix = f"d.{w}"
            g = src.b.zeros_like(src.ref(w))
            src.b._settle(g, f"d.{w}")
        results.append(g)
    names = [r.name for r in results]
    derived = _assemble(src, inputs, names, results)
    return derived, DerivedNames(gradients=dict(zip(wrt, names)), seed=seed_name, output=output)


def derive_forward(graph: GraphIR, registry: Registry, *, output: str | None = None, wrt: Sequence[str],
                   limits: Limits | None = None) -> tuple[GraphIR, DerivedNames]:
    """The graph of a Jacobian-vector product: ``graph``'s inputs plus one tangent input per wrt
    name (same dtype and shape; ``names.tangents``), and one output, the tangent of ``output``
    (``names.tangent_output``): the derivative of ``output`` along the given tangents."""
    graph = expand_derivatives(graph, registry, limits)
    output = _output_name(graph, output)
    wrt = list(wrt)
    src = _Source(graph, registry, limits)
    _check_request(src, output, wrt)
    if len(set(wrt)) != len(wrt):
        raise OptionError("wrt: a name is given twice; forward mode takes one tangent per value", field="wrt")
    inputs = list(graph.inputs)
    declared = {d.name: d for d in graph.inputs}
    tangents: dict[str, Ref] = {}
    for w in wrt:
        name = src.b.names.fresh(f"t.{w}")
        decl = declared.get(w)
        if decl is not None:
            inputs.append(InputDecl(name, decl.dtype, decl.shape))
        else:
            spec = src.spec(w)
            if spec is None:
                raise ShapeError(f"wrt: the shape of '{w}' cannot be inferred, so its tangent input cannot be "
                                 f"declared; declare the graph's input shapes", node=w, field="wrt")
            inputs.append(InputDecl(name, spec.dtype.name, spec.shape))
        ref = tangents[w] = Ref(src.b, name, src.probes.get(w, (None, None)))
        ref.bound = True
    t = _forward(src, output, tangents)
    if t is None:
        src.b.prefix = f"t.{output}"
        t = src.b.zeros_like(src.ref(output))
        src.b._settle(t, f"t.{output}")
    derived = _assemble(src, inputs, [t.name], [t])
    return derived, DerivedNames(tangents={w: r.name for w, r in tangents.items()}, tangent_output=t.name,
                                 output=output)


def plan_to_graph(plan: Plan) -> GraphIR:
    """The GraphIR of a compiled plan (a registered graph known by its id): its inputs, its nodes in
    topological order with their checked attributes (defaults spelt out, unset optional ones left out;
    graph attributes back as GraphIRs) and its outputs. grad and jvp nodes are expanded already."""
    inputs = tuple(InputDecl(plan.names[k], plan.input_dtypes[k].name, tuple(plan.input_shapes[k]))
                   for k in range(plan.n_inputs))
    nodes = []
    for k in range(plan.n_inputs, len(plan)):
        op, count = plan.ops[k], plan.n_out[k]
        if op is None or not count:
            continue
        attrs = {key: plan_to_graph(value) if isinstance(value, Plan) else value
                 for key, value in plan.attrs[k].items() if value is not None}
        outputs = tuple(plan.names[k:k + count]) if op.several else ()
        nodes.append(Node(plan.node_names[k], op.name, tuple(plan.names[j] for j in plan.in_slots[k]), attrs, outputs))
    return GraphIR(inputs, tuple(nodes), tuple(plan.names[k] for k in plan.outputs), dict(plan.metadata))


# --- grad and jvp nodes -------------------------------------------------------------------------------

def expand_derivatives(graph: GraphIR, registry: Registry, limits: Limits | None = None) -> GraphIR:
    """``graph`` with its ``grad`` and ``jvp`` nodes replaced by the nodes of their derivatives.

    One node at a time, the first in topological order (whose ancestors are then all plain
    nodes), so a grad of a grad, or a jvp of a grad, works. The values keep their names: the
    derivative's last node of each takes the name the grad or jvp node gave it.
    """
    nodes = list(graph.nodes)
    if not any(node.op in DERIVATIVE_OPS for node in nodes):
        return graph
    budget = (limits or Limits()).max_nodes
    spent = 0
    while True:
        order = _order(graph.inputs, nodes)
        first = next((i for i in order if nodes[i].op in DERIVATIVE_OPS), None)
        if first is None:
            return replace(graph, nodes=tuple(nodes))
        expanded, read = _expand_one(graph, nodes, first, registry, limits)
        nodes[first:first + 1] = expanded
        # Each expansion derives the part of the graph it reads: bound the total (nested grads grow
        # the graph geometrically, and many grad nodes over one large graph would cost its size each).
        spent += read
        if spent > budget or len(nodes) > budget:
            raise LimitExceeded(
                f"expanding the graph's grad and jvp nodes derives {max(spent, len(nodes))} nodes or more; the "
                f"limit is {budget} (max_nodes): fewer or smaller derivatives per graph",
                limit="max_nodes", requested=max(spent, len(nodes)), allowed=budget)


def _order(inputs: Sequence[InputDecl], nodes: Sequence[Node]) -> list[int]:
    """Node indices in topological order (Kahn); names that resolve nowhere are left for compile_graph."""
    producer: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for v in node.value_names:
            producer[v] = i
    pending = [0] * len(nodes)
    children: list[list[int]] = [[] for _ in nodes]
    for i, node in enumerate(nodes):
        for name in node.inputs:
            j = producer.get(name)
            if j is not None:
                pending[i] += 1
                children[j].append(i)
    order = kahn_order(pending, children)
    if len(order) != len(nodes):
        stuck = next(nodes[i] for i in range(len(nodes)) if pending[i])
        raise CycleError(f"node '{stuck.name}' ({stuck.op}): graph has a cycle", node=stuck.name, op=stuck.op)
    return order


def _expand_one(graph: GraphIR, nodes: list[Node], index: int, registry: Registry,
                limits: Limits | None) -> tuple[list[Node], int]:
    node = nodes[index]
    field = f"graph.nodes[{graph.nodes.index(node)}]" if node in graph.nodes else f"node '{node.name}'"
    prefix = where(node.name, node.op)
    inputs = list(node.inputs)
    if node.op == "grad":
        unknown = sorted(set(node.attrs) - {"seeded"})
        if unknown:
            raise BadAttributeError(f"{prefix}unknown attribute '{unknown[0]}' (known: seeded)", node=node.name,
                                    op=node.op, field=f"{field}.attrs.{unknown[0]}")
        seeded = node.attrs.get("seeded", False)
        if not isinstance(seeded, (bool, np.bool_)):
            raise BadAttributeError(f"{prefix}attribute 'seeded': expected a bool, got {seeded!r:.40}",
                                    node=node.name, op=node.op, field=f"{field}.attrs.seeded")
        count = len(inputs) - 1 - bool(seeded)
        if count < 1:
            raise ArityError(f"{prefix}takes the output, one or more values to differentiate with respect to"
                             + (", then the seed" if seeded else "") + f"; got {len(inputs)} input(s)",
                             node=node.name, op=node.op, field=f"{field}.inputs")
    elif node.attrs:
        name = sorted(node.attrs)[0]
        raise BadAttributeError(f"{prefix}unknown attribute '{name}' (known: none)", node=node.name, op=node.op,
                                field=f"{field}.attrs.{name}")
    else:
        if len(inputs) < 3 or len(inputs) % 2 == 0:
            raise ArityError(f"{prefix}takes the output, k values and their k tangents (an odd number, at least 3); "
                             f"got {len(inputs)} input(s)", node=node.name, op=node.op, field=f"{field}.inputs")
        count = (len(inputs) - 1) // 2
    names = node.value_names
    expected = count if node.op == "grad" else 1
    if len(names) != expected and not (node.op == "grad" and count == 1 and not node.outputs):
        raise OutputError(f"{prefix}produces {expected} value(s); Node.outputs must name each (it names "
                          f"{len(node.outputs)})", node=node.name, op=node.op, field=f"{field}.outputs")
    # the plain graph this node reads: the declared inputs and the ancestors of its inputs
    producer = {v: n for n in nodes for v in n.value_names}
    for name in inputs:
        if name not in producer and name not in {d.name for d in graph.inputs}:
            raise UnknownNodeError(f"{prefix}input '{name}' is neither a declared input nor a node", node=name,
                                   field=f"{field}.inputs")
    seen: set[str] = set()
    stack = [producer[n] for n in inputs if n in producer]
    while stack:
        n = stack.pop()
        if n.name in seen:
            continue
        seen.add(n.name)
        stack.extend(producer[i] for i in n.inputs if i in producer)
    sub = GraphIR(graph.inputs, tuple(n for n in nodes if n.name in seen), tuple(dict.fromkeys(inputs)),
                  dict(graph.metadata))
    src = _Source(sub, registry, limits)
    src.b.names = _Names(_all_names(replace(graph, nodes=tuple(nodes))))
    output, wrt = inputs[0], inputs[1:1 + count]
    try:
        _check_request(src, output, wrt)
    except GraphError as exc:  # said of the node's inputs, not of a request's fields
        raise type(exc)(f"{prefix}{exc.message.split(': ', 1)[-1]}", node=node.name, op=node.op,
                        field=f"{field}.inputs") from None
    b = src.b
    if node.op == "grad":
        if seeded:
            seed = src.ref(inputs[-1])
            _check_like(src, inputs[-1], output, prefix, node, field, "seed")
        else:
            seed = _ones_seed(src, output, prefix, node.name)
        grads = _reverse(src, output, wrt, seed)
        results = []
        for w, name in zip(wrt, names):
            g = grads[w]
            if g is None:
                b.prefix = f"d.{w}"
                g = b.zeros_like(src.ref(w))
            results.append(b._bind(g, name))
    else:
        tangents = {}
        for w, t in zip(wrt, inputs[1 + count:]):
            _check_like(src, t, w, prefix, node, field, "tangent")
            if w in tangents:
                raise GraphError(f"{prefix}'{w}' is given twice; one tangent per value", node=node.name, op=node.op,
                                 field=f"{field}.inputs")
            tangents[w] = src.ref(t)
        t = _forward(src, output, tangents)
        if t is None:
            b.prefix = f"t.{output}"
            t = b.zeros_like(src.ref(output))
        results = [b._bind(t, node.name)]
    return b.emit(results), len(sub.nodes)


def _check_like(src: _Source, name: str, like: str, prefix: str, node: Node, field: str, what: str) -> None:
    """A seed or tangent must have the shape and dtype of its value, where both are known."""
    a, c = src.spec(name), src.spec(like)
    if a is None or c is None:
        return
    if a.dtype != c.dtype:
        raise DTypeError(f"{prefix}the {what} '{name}' is {a.dtype.name}, '{like}' is {c.dtype.name}",
                         node=node.name, op=node.op, field=f"{field}.inputs")
    if len(a.shape) != len(c.shape) or any(n != m and -1 not in (n, m) for n, m in zip(a.shape, c.shape)):
        raise ShapeError(f"{prefix}the {what} '{name}' has shape {list(a.shape)}, '{like}' has shape "
                         f"{list(c.shape)}", node=node.name, op=node.op, field=f"{field}.inputs")


_compile.expand_derivatives = expand_derivatives
