"""The operator contract: what a plugin provides for each operator.

An operator is data plus rules:

* ``forward(*inputs, **attrs) -> ndarray``
* ``vjp(grad_output, output, *inputs, **attrs) -> one gradient per input``
  (``None`` where an input is not differentiable). It returns
  upstream x local Jacobian without building the Jacobian. Gradients may keep
  the broadcast shape of the output: the engine sums them back to each input's
  shape (see :func:`chainrule.core.broadcast.unbroadcast`), so no rule
  re-implements broadcasting.
* ``infer(*specs, **attrs) -> TensorSpec`` (optional): the output shape and
  dtype from the inputs', so limits are checked before anything is allocated.
  Raise :class:`~chainrule.core.errors.OpError` for inputs the operator cannot take.

Two options change the rules' forms (see :class:`OpDef`): ``residuals=True``
lets forward hand values to vjp (``forward -> (output, saved)``, ``vjp(...,
saved=saved)``), like JAX's residuals or PyTorch's ``ctx.save_for_backward``;
``n_outputs`` other than 1 makes forward return a tuple of values, infer a
list of specs, and vjp take a tuple of output gradients (None where an output
has none) and the tuple of outputs.

Inputs are positional and attributes are keywords in all three rules, so a
numpy ufunc such as ``np.add`` is itself a valid forward rule.
"""
from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .dtypes import SUPPORTED
from .errors import BadAttributeError, InvalidOperatorError
from .graph import CompiledGraph, GraphIR
from .tensor_spec import TensorSpec

#: ``arity`` value of an operator taking one or more inputs (concat, add_n...).
VARIADIC = -1

ATTR_KINDS = ("float", "int", "bool", "string", "ints", "floats", "tensor", "graph")

_REQUIRED = object()
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


@dataclass(frozen=True)
class Attr:
    """One attribute of an operator: its kind, default and a short doc.

    ``default=None`` makes the attribute optional with no value (e.g. ``axis``
    of ``sum``: all axes); leaving ``default`` out makes it required.

    A ``float`` or ``floats`` attribute refuses NaN and infinities (BAD_ATTRIBUTE) unless
    ``allow_nonfinite=True``, for an operator to which they mean something (padding with
    ``-inf`` before a max, say). ``int`` and ``ints`` values must fit in int64 (the wire's
    integers); narrower ranges are the operator's own business (its infer rule).
    """

    kind: str
    default: Any = _REQUIRED
    doc: str = ""
    allow_nonfinite: bool = False

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


@dataclass(frozen=True)
class OpDef:
    """An operator: a name, an arity, an attribute schema and its rules."""

    name: str
    arity: int
    forward: Callable[..., Any]
    vjp: Callable[..., Sequence[Any]]
    infer: Callable[..., TensorSpec] | None = None
    attrs: Mapping[str, Attr] = field(default_factory=dict)
    doc: str = ""
    #: Optional ``sample(rng) -> (inputs, attrs)`` giving valid inputs for the
    #: gradient checker when random inputs of the declared shapes do not suit.
    sample: Callable[[np.random.Generator], tuple[list[np.ndarray], dict[str, Any]]] | None = None
    #: True when ``vjp`` accepts ``needs`` (a bool per input, like PyTorch's
    #: ``ctx.needs_input_grad``) and may skip the inputs whose gradient nobody
    #: wants, returning None for them (matmul uses it to skip ``dX`` for data).
    selective_vjp: bool = False
    #: False when vjp is deliberately not the derivative of forward (stop_gradient,
    #: straight-through estimators): the gradient checker then leaves it alone.
    gradcheck: bool = True
    #: Optional ``(forward, vjp)`` for Python floats: the same rules on 0-d float64 values
    #: given and returned as ``float``, without numpy's cost per call (about 0.5 us, ten
    #: times the arithmetic). A plan whose values are all float64 scalars and whose every
    #: operator has them runs on floats (see core/engine.py); they may raise where numpy
    #: gives inf or nan (``math.log(-1)``, ``1 / 0.0``): that run is then redone with numpy.
    scalar: tuple[Callable[..., float], Callable[..., Sequence[Any]]] | None = None
    #: How many values a node of this operator produces: a count, or a function of the
    #: node's checked attributes (scan: one per body output). Other than 1, forward returns
    #: a tuple, infer a list of specs, and vjp takes ``(grads, outputs, *inputs)`` with a
    #: tuple of output gradients (None for an output no gradient reached) and the outputs.
    n_outputs: int | Callable[[Mapping[str, Any]], int] = 1
    #: True when forward returns ``(result, saved)`` and vjp takes ``saved=`` (the
    #: residuals: what forward computed that the gradient needs, so vjp does not recompute
    #: it). The engine keeps ``saved`` until the node's vjp has run, counted in the memory
    #: budget, and drops it at once when no backward pass follows.
    residuals: bool = False
    #: For an operator with a graph attribute that it runs several times (scan): ``inner_shapes(*specs,
    #: **attrs) -> (times, shapes)``, how many times it runs the graph and the graph's Shapes, so that
    #: values inside it asked for by name (``node/value``) are sized before any work.
    inner_shapes: Callable[..., tuple[int, Any]] | None = None
    #: ``cost(*specs, **attrs) -> float``: the floating-point operations forward does, from the input
    #: specs, for operators far above one per output element (matmul, einsum, conv), so that a call
    #: that cannot fit its deadline is refused before it starts (core/cost.py). Others count one per
    #: element they produce.
    cost: Callable[..., float] | None = None
    #: ``workspace(*specs, **attrs) -> int``: bytes of temporaries the rules hold at once, for operators
    #: whose rules need more than the engine assumes (two arrays as large as the largest the node reads
    #: or makes): conv's im2col columns. Counted in the memory budget before any work.
    workspace: Callable[..., int] | None = None
    #: The inputs' names, in order (one name standing for all the inputs of a variadic
    #: operator), as ListOperators shows them. None: the forward rule's positional
    #: parameters (``def forward(logits, labels)``: "logits", "labels"; ``*xs``: "xs").
    input_names: Sequence[str] | None = None
    #: The dtypes each input accepts, by input name (core.dtypes names them: FLOAT_DTYPES,
    #: INT_DTYPES...), as ListOperators shows them; an input left out lists every dtype.
    #: Declare what the infer rule accepts: ``input_dtypes={"labels": INT_DTYPES}``.
    input_dtypes: Mapping[str, Sequence[str]] = field(default_factory=dict)
    #: What the vjp reads of the forward pass besides shapes and dtypes: ``"inputs"``, ``"output"``,
    #: ``"both"`` (the default: assume everything) or ``"none"`` (add: ``g, g``). With
    #: ``forward_into``, it lets the engine write a value over a buffer no rule will read again.
    vjp_reads: str = "both"
    #: For an elementwise operator on floats: ``forward_into(out, *inputs, **attrs)`` computes the
    #: forward result into ``out`` (a float array of the result's shape and dtype, which may be one
    #: of the inputs) and returns it. The engine calls it instead of forward when an input's buffer
    #: is dead once this node has read it (read by this node alone, not returned, and neither vjp
    #: reads it: see ``vjp_reads``), sparing a fresh array and its page faults on large tensors,
    #: as hand-written in-place numpy does. Its result must equal forward's, bit for bit. Declaring it
    #: says the operator is elementwise (forward and vjp alike): on large float arrays the engine
    #: may run both block by block, checking for a stop between blocks.
    forward_into: Callable[..., Any] | None = None
    #: For an elementwise operator (one with ``forward_into``) whose vjp computes its gradients
    #: afresh (mul: ``g * y, g * x``; not add's ``g, g``): ``vjp_into(grads, g, out, *inputs,
    #: **attrs)`` writes the gradient of input i into ``grads[i]``, a float array of the node's shape
    #: and dtype, or leaves it when ``grads[i]`` is None (nobody wants it), and returns nothing. The
    #: engine then runs a large node's vjp in blocks on every intra-op thread (core/parallel.py), on
    #: nodes of at least 2^18 elements whose inputs share their shape and dtype. Its results must
    #: equal vjp's there, bit for bit.
    vjp_into: Callable[..., Any] | None = None
    #: Optional symbolic reverse rule, ``vjp_graph(b, g, out, *inputs, **attrs) -> tuple`` (a Ref or None
    #: per input), written with registered operators through ``b`` (a chainrule.core.symbolic.SymbolicBuilder),
    #: so that a derivative is a graph that can be differentiated again (docs/derivatives.md).
    vjp_graph: Callable[..., Sequence[Any]] | None = None
    #: Optional symbolic forward rule, ``jvp_graph(b, tangents, out, *inputs, **attrs) -> Ref | None``
    #: (tangents: a Ref or None per input): the output's tangent, for forward mode (JVPs).
    jvp_graph: Callable[..., Any] | None = None
    #: Filled in by the plugin manager: who provides this operator.
    plugin: str = ""
    distribution: str = ""
    version: str = ""

    @property
    def variadic(self) -> bool:
        return self.arity == VARIADIC

    def accepts(self, n_inputs: int) -> bool:
        return n_inputs >= 1 if self.arity == VARIADIC else n_inputs == self.arity

    def apply(self, *inputs: Any, **attrs: Any) -> tuple[Any, Any]:
        """Run the forward rule: ``(result, residuals)``, residuals None for an operator without.
        For code that calls rules itself (checkers, tests), whatever ``residuals`` says."""
        result = self.forward(*inputs, **attrs)
        return result if self.residuals else (result, None)

    def apply_vjp(self, g: Any, out: Any, *inputs: Any, saved: Any = None, needs: Sequence[bool] | None = None,
                  **attrs: Any) -> Sequence[Any]:
        """Run the vjp rule with ``saved`` (the residuals :meth:`apply` gave) and ``needs`` passed
        only to a rule that takes them."""
        if self.residuals:
            attrs["saved"] = saved
        if needs is not None and self.selective_vjp:
            attrs["needs"] = tuple(needs)
        return self.vjp(g, out, *inputs, **attrs)

    @property
    def several(self) -> bool:
        """True when the rules use the several-values forms (tuples of values and of gradients,
        a list of specs), whatever the count for one node: scan with one body output too."""
        return self.n_outputs != 1

    def outputs_for(self, attrs: Mapping[str, Any]) -> int:
        """The number of values a node with these (checked) attributes produces."""
        return self.n_outputs if isinstance(self.n_outputs, int) else int(self.n_outputs(attrs))


#: Names no attribute may take: the OpDef's own fields, and ``variadic``. An attribute so
#: named reads like the field but is not it (``OperatorSet.operator("t.f", gradcheck=False)``
#: once declared a bool attribute ``gradcheck`` and left the gradient check on).
RESERVED_ATTR_NAMES = frozenset(f.name for f in fields(OpDef)) | {"variadic"}

_FILLED_IN = ("plugin", "distribution", "version")


def attr_name_clash(name: str, *, selective_vjp: bool = False, residuals: bool = False) -> str | None:
    """Why ``name`` cannot name an attribute, ending in what to do; None when it can."""
    if name in _FILLED_IN:
        return (f"attribute '{name}' has the name of an OpDef field, which the plugin manager fills in; "
                f"give the attribute another name")
    if name == "variadic":
        return ("attribute 'variadic' has the name of an OpDef property (true when arity is VARIADIC); "
                "give the attribute another name")
    if name in RESERVED_ATTR_NAMES:
        return (f"attribute '{name}' has the name of an OpDef field; give the attribute another name "
                f"(to set the field, pass {name}= to OpDef itself)")
    if name == "needs" and selective_vjp:
        return ("attribute 'needs' clashes with the needs= keyword the engine passes to a selective vjp; "
                "give the attribute another name")
    if name == "saved" and residuals:
        return ("attribute 'saved' clashes with the saved= keyword the engine passes to the vjp of an "
                "operator with residuals; give the attribute another name")
    return None


#: The range of an ``int`` attribute: the wire's int64.
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def coerce_attr(kind: str, value: Any, *, allow_nonfinite: bool = False) -> Any:
    """Normalise an attribute value to its kind, or raise TypeError (wrong type) or
    ValueError (a non-finite float without ``allow_nonfinite``, an int beyond int64) saying why.

    ints and floats come back as tuples; an int stands for a one-element
    ``ints``; an int is a valid float; a bool is never an int.
    """
    if kind == "float":
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TypeError(f"expected a float, got {_describe(value)}")
        try:
            number = float(value)
        except OverflowError:  # an int beyond a double's range
            raise ValueError(f"{_describe(value)} is beyond the range of a float") from None
        if not allow_nonfinite and not math.isfinite(number):
            raise ValueError(f"expected a finite float, got {number}; this attribute takes no NaN or infinity")
        return number
    if kind == "int":
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"expected an int, got {_describe(value)}")
        number = int(value)
        if not INT64_MIN <= number <= INT64_MAX:
            raise ValueError(f"{number} is out of range: an int attribute must fit in int64 "
                             f"(from {INT64_MIN} to {INT64_MAX})")
        return number
    if kind == "bool":
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"expected a bool, got {_describe(value)}")
        return bool(value)
    if kind == "string":
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {_describe(value)}")
        return value
    if kind == "ints":
        items = (value,) if isinstance(value, (int, np.integer)) else value
        if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, (Sequence, np.ndarray)):
            raise TypeError(f"expected a list of ints, got {_describe(value)}")
        _check_list_length(items)
        return tuple(coerce_attr("int", item) for item in items)
    if kind == "floats":
        items = (value,) if isinstance(value, (int, float, np.integer, np.floating)) else value
        if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, (Sequence, np.ndarray)):
            raise TypeError(f"expected a list of floats, got {_describe(value)}")
        _check_list_length(items)
        return tuple(coerce_attr("float", item, allow_nonfinite=allow_nonfinite) for item in items)
    if kind == "graph":
        if not isinstance(value, (GraphIR, CompiledGraph)):
            raise TypeError(f"expected a graph, got {_describe(value)}")
        return value
    if kind == "tensor":
        if not isinstance(value, np.ndarray):
            raise TypeError(f"expected a tensor, got {_describe(value)}")
        if value.dtype not in SUPPORTED.values():
            raise TypeError(f"tensor dtype {value.dtype} is not supported")
        return value
    raise TypeError(f"unknown attribute kind {kind!r}")


#: The most values an ``ints`` or ``floats`` attribute holds (axes, pads, strides, shapes need a few dozen;
#: a tensor travels as a ``tensor`` attribute or an input). Longer lists are refused before each value is
#: checked: 3.75 million ints once cost seconds of checking and of formatting the error.
MAX_ATTR_LIST = 1 << 16


def _check_list_length(items: Any) -> None:
    if len(items) > MAX_ATTR_LIST:
        raise ValueError(f"{len(items)} values; a list attribute holds at most {MAX_ATTR_LIST} "
                         f"(send a tensor as an input or a tensor attribute)")


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}"


def check_attrs(op: OpDef, given: Mapping[str, Any], *, node: str | None = None) -> dict[str, Any]:
    """Check ``given`` against the operator's schema; return it with defaults filled in."""
    unknown = sorted(set(given) - set(op.attrs))
    if unknown:
        known = ", ".join(op.attrs) or "none"
        raise BadAttributeError(
            f"{_where(node, op)}unknown attribute '{unknown[0]}' (known: {known})",
            node=node, op=op.name, field=f"attrs.{unknown[0]}",
        )
    checked: dict[str, Any] = {}
    for name, schema in op.attrs.items():
        if name in given and given[name] is None and schema.default is not None:
            # None is a value only where it is the default ("unset", as sum's axis); elsewhere it would
            # silently stand for a default the caller may not know, or for a required value
            raise BadAttributeError(
                f"{_where(node, op)}attribute '{name}' is None; leave it out for its default"
                + ("" if schema.required else f" ({schema.default!r})"),
                node=node, op=op.name, field=f"attrs.{name}",
            )
        if name not in given or given[name] is None:
            if schema.required:
                raise BadAttributeError(
                    f"{_where(node, op)}missing required attribute '{name}' ({schema.kind})",
                    node=node, op=op.name, field=f"attrs.{name}",
                )
            checked[name] = schema.default
            continue
        try:
            checked[name] = coerce_attr(schema.kind, given[name], allow_nonfinite=schema.allow_nonfinite)
        except (TypeError, ValueError) as exc:
            raise BadAttributeError(
                f"{_where(node, op)}attribute '{name}': {exc}",
                node=node, op=op.name, field=f"attrs.{name}",
            ) from None
    return checked


def _where(node: str | None, op: OpDef) -> str:
    return f"node '{node}' ({op.name}): " if node is not None else f"operator '{op.name}': "


#: The values of ``OpDef.vjp_reads``.
VJP_READS = ("both", "inputs", "output", "none")


def validate_opdef(op: Any, *, plugin: str | None = None) -> None:
    """Raise InvalidOperatorError naming the plugin and the reason if ``op`` breaks the contract."""
    who = f"plugin '{plugin}': " if plugin else ""
    if not isinstance(op, OpDef):
        raise InvalidOperatorError(f"{who}registered {type(op).__name__}, expected an OpDef", plugin=plugin)
    if not isinstance(op.name, str) or not _NAME.match(op.name):
        raise InvalidOperatorError(f"{who}invalid operator name {op.name!r}", plugin=plugin, op=str(op.name))
    what = f"{who}operator '{op.name}': "
    if not isinstance(op.arity, int) or isinstance(op.arity, bool) or (op.arity < 0 and op.arity != VARIADIC):
        raise InvalidOperatorError(f"{what}arity must be a count >= 0 or VARIADIC, got {op.arity!r}", plugin=plugin, op=op.name)
    if not callable(op.forward):
        raise InvalidOperatorError(f"{what}forward is not callable", plugin=plugin, op=op.name)
    if not callable(op.vjp):
        raise InvalidOperatorError(f"{what}has no vjp (gradient rule)", plugin=plugin, op=op.name)
    if op.infer is not None and not callable(op.infer):
        raise InvalidOperatorError(f"{what}infer is not callable", plugin=plugin, op=op.name)
    for role in ("vjp_graph", "jvp_graph", "workspace"):
        if getattr(op, role) is not None and not callable(getattr(op, role)):
            raise InvalidOperatorError(f"{what}{role} is not callable", plugin=plugin, op=op.name)
    problem = inputs_problem(op)
    if problem:
        raise InvalidOperatorError(f"{what}{problem}", plugin=plugin, op=op.name)
    if not callable(op.n_outputs) and (not isinstance(op.n_outputs, int) or isinstance(op.n_outputs, bool)
                                       or op.n_outputs < 1):
        raise InvalidOperatorError(f"{what}n_outputs must be a count >= 1 or a function of the attributes, "
                                   f"got {op.n_outputs!r}", plugin=plugin, op=op.name)
    if op.vjp_reads not in VJP_READS:
        raise InvalidOperatorError(f"{what}vjp_reads must be one of {', '.join(VJP_READS)}, got {op.vjp_reads!r}",
                                   plugin=plugin, op=op.name)
    if op.vjp_into is not None and (not callable(op.vjp_into) or op.forward_into is None):
        raise InvalidOperatorError(f"{what}vjp_into must be callable, for an operator with forward_into (elementwise)",
                                   op=op.name, plugin=plugin)
    if op.forward_into is not None and (not callable(op.forward_into) or op.n_outputs != 1 or op.residuals):
        raise InvalidOperatorError(f"{what}forward_into must be callable, for one output without residuals",
                                   plugin=plugin, op=op.name)
    if op.scalar is not None and (op.n_outputs != 1 or op.residuals):
        raise InvalidOperatorError(f"{what}scalar rules are for one output without residuals; drop scalar=",
                                   plugin=plugin, op=op.name)
    if not isinstance(op.attrs, Mapping):
        raise InvalidOperatorError(f"{what}attrs must map names to Attr", plugin=plugin, op=op.name)
    for name, schema in op.attrs.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise InvalidOperatorError(f"{what}invalid attribute name {name!r}", plugin=plugin, op=op.name)
        clash = attr_name_clash(name, selective_vjp=bool(op.selective_vjp), residuals=bool(op.residuals))
        if clash:
            raise InvalidOperatorError(f"{what}{clash}", plugin=plugin, op=op.name)
        if not isinstance(schema, Attr) or schema.kind not in ATTR_KINDS:
            kind = getattr(schema, "kind", schema)
            raise InvalidOperatorError(
                f"{what}attribute '{name}' has kind {kind!r}; expected one of {', '.join(ATTR_KINDS)}",
                plugin=plugin, op=op.name,
            )
        if schema.kind == "graph" and not schema.required and schema.default is not None:
            raise InvalidOperatorError(f"{what}graph attribute '{name}' cannot have a default", plugin=plugin, op=op.name)
        if not schema.required and schema.default is not None:
            try:
                coerce_attr(schema.kind, schema.default, allow_nonfinite=schema.allow_nonfinite)
            except (TypeError, ValueError) as exc:
                raise InvalidOperatorError(
                    f"{what}default of attribute '{name}': {exc}", plugin=plugin, op=op.name
                ) from None


@dataclass(frozen=True)
class InputInfo:
    """One input of an operator as ListOperators describes it: its name, the dtypes it accepts,
    and whether it stands for every input of a variadic operator."""

    name: str
    dtypes: tuple[str, ...]
    variadic: bool = False


def described_inputs(op: OpDef) -> tuple[InputInfo, ...]:
    """The inputs of ``op``, in order: ``arity`` entries, or one variadic entry.

    Names are ``op.input_names``, else the forward rule's positional parameters that are not
    attributes (``*xs`` of a variadic rule gives "xs"); where the signature cannot be read or
    has too few, "input0", "input1"... Dtypes are ``op.input_dtypes``' (in SUPPORTED's order),
    else every dtype.
    """
    count = 1 if op.variadic else op.arity
    names = list(op.input_names) if op.input_names is not None else _forward_input_names(op, count)
    return tuple(InputInfo(name, _ordered_dtypes(op.input_dtypes.get(name, SUPPORTED)), op.variadic)
                 for name in names)


def _ordered_dtypes(names: Any) -> tuple[str, ...]:
    wanted = set(names)
    return tuple(name for name in SUPPORTED if name in wanted)


def _forward_input_names(op: OpDef, count: int) -> list[str]:
    try:
        params = list(inspect.signature(op.forward).parameters.values())
    except (TypeError, ValueError):  # some C functions
        params = []
    positional = [p.name for p in params
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in op.attrs]
    if op.variadic:
        star = [p.name for p in params if p.kind is p.VAR_POSITIONAL]
        return [star[0] if star else positional[0] if positional else "inputs"]
    names = positional[:count]
    return names + [f"input{i}" for i in range(len(names), count)]


def inputs_problem(op: OpDef) -> str | None:
    """Why ``op``'s input_names or input_dtypes cannot describe its inputs; None when they can."""
    if op.input_names is not None:
        names = op.input_names
        if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
            return f"input_names must be a list of non-empty strings, got {names!r}"
        count = 1 if op.variadic else op.arity
        if len(names) != count:
            return (f"input_names gives {len(names)} name{'s' * (len(names) != 1)} for "
                    + ("a variadic operator (give one, standing for every input)" if op.variadic
                       else f"{op.arity} input{'s' * (op.arity != 1)}"))
        if len(set(names)) != len(names):
            return f"input_names repeats a name: {list(names)}"
    if not isinstance(op.input_dtypes, Mapping):
        return f"input_dtypes must map input names to dtype names, got {op.input_dtypes!r}"
    known = [i.name for i in described_inputs(op)] if op.input_names is None else list(op.input_names)
    for name, dtypes in op.input_dtypes.items():
        if name not in known:
            return f"input_dtypes names '{name}', which is not an input (the inputs: {', '.join(known) or 'none'})"
        if isinstance(dtypes, str) or not dtypes or any(d not in SUPPORTED for d in dtypes):
            return (f"input_dtypes['{name}'] must be a non-empty list of dtype names from "
                    f"{', '.join(SUPPORTED)}, got {dtypes!r}")
    return None


def rule_signature_problem(op: OpDef) -> str | None:
    """Why ``op``'s forward, vjp or infer rule cannot take the attributes its schema declares, ending
    in the fix; None when each accepts every declared attribute as a keyword (or takes ``**kwargs``).

    A selective vjp must take ``needs`` too, and the vjp of an operator with residuals ``saved``.
    A rule whose signature Python cannot read (some C functions) is not judged.
    """
    vjp_keywords = ("needs",) * bool(op.selective_vjp) + ("saved",) * bool(op.residuals)
    for role, rule, more in (("forward", op.forward, ()), ("vjp", op.vjp, vjp_keywords), ("infer", op.infer, ()),
                             ("vjp_graph", op.vjp_graph, ()), ("jvp_graph", op.jvp_graph, ())):
        if rule is None:
            continue
        try:
            params = list(inspect.signature(rule).parameters.values())
        except (TypeError, ValueError):
            continue
        if any(p.kind is p.VAR_KEYWORD for p in params):
            continue
        accepted = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        missing = [name for name in (*op.attrs, *more) if name not in accepted]
        if missing:
            listed = ", ".join(f"'{m}'" for m in missing)
            what = "keyword" if set(missing) <= set(more) else "attribute" + ("s" if len(missing) > 1 else "")
            return (f"operator '{op.name}': the {role} rule does not accept the declared {what} {listed} "
                    f"(the engine passes every attribute as a keyword); add {', '.join(missing)} to its parameters "
                    f"(def {role}(..., *, {', '.join(missing)})) or end them with **attrs")
    return None
