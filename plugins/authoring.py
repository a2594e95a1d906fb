"""Helpers for plugin authors: declare an operator in about ten lines.

Example::

    import numpy as np
    from chainrule.plugins import OperatorSet, same_as_input

    ops = OperatorSet()

    @ops.operator("acme.swish", infer=same_as_input, beta=1.0)
    def swish(x, *, beta):
        "Swish: x * sigmoid(beta * x)."
        return x / (1 + np.exp(-beta * x))

    @swish.vjp
    def _(g, out, x, *, beta):
        s = 1 / (1 + np.exp(-beta * x))
        return (g * (s + beta * out * (1 - s)),)

    register_operators = ops.hookimpl()   # the pluggy hook, ready to expose

``@swish.vjp_graph`` and ``@swish.jvp_graph`` add the optional symbolic rules (the gradient and the
forward-mode tangent written with registered operators through a builder ``b``, docs/derivatives.md),
so that derivatives through the operator can be differentiated again and taken in forward mode.

Attributes are keyword defaults: a float default makes a float attribute, a
tuple of ints an ``ints`` attribute, and so on; pass an :class:`Attr` for a
required attribute or one whose default is None. The other keywords of
:meth:`OperatorSet.operator` (``infer``, ``doc``, ``arity``, ``gradcheck``,
``selective_vjp``, ``input_names``, ``input_dtypes``) set the OpDef fields of those
names, and no attribute may take the name of an OpDef field. ListOperators names the
inputs after the forward rule's parameters (``x`` above) and lists every dtype for
each unless ``input_dtypes`` says less: ``input_dtypes={"labels": INT_DTYPES}``
(``chainrule.core.dtypes``). ``vary`` declares attribute values for the gradient
checker (:class:`chainrule.plugins.testing.Sample`), and :meth:`OperatorSet.add`
takes an operator built elsewhere (:func:`chainrule.plugins.from_jax`).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from chainrule.core import VARIADIC, Attr, OpDef, TensorSpec, broadcast_shapes, coerce_attr
from chainrule.core.dtypes import float_result
from chainrule.core.errors import InvalidOperatorError
from chainrule.core.operator import attr_name_clash

from .hookspecs import hookimpl
from .testing import Sample


def attr_from_default(default: Any) -> Attr:
    """An Attr whose kind is read off a default value (``1.0`` -> float...)."""
    if isinstance(default, Attr):
        return default
    if isinstance(default, bool):
        return Attr("bool", default)
    if isinstance(default, int):
        return Attr("int", default)
    if isinstance(default, float):
        return Attr("float", default)
    if isinstance(default, str):
        return Attr("string", default)
    if isinstance(default, np.ndarray):
        return Attr("tensor", default)
    if isinstance(default, (tuple, list)):
        kind = "ints" if all(isinstance(v, int) and not isinstance(v, bool) for v in default) else "floats"
        return Attr(kind, tuple(default))
    raise TypeError(f"cannot tell the attribute kind of default {default!r}; pass an Attr")


def same_as_input(x: TensorSpec, **_: Any) -> TensorSpec:
    """infer rule of an elementwise operator that keeps shape and dtype."""
    return x


def float_like_input(x: TensorSpec, **_: Any) -> TensorSpec:
    """infer rule of an elementwise float function (integers become float64)."""
    return TensorSpec(x.shape, float_result(x.dtype))


def broadcast_inputs(*specs: TensorSpec, **_: Any) -> TensorSpec:
    """infer rule of an elementwise operator with numpy broadcasting and type promotion."""
    return TensorSpec(broadcast_shapes(*(s.shape for s in specs)), np.result_type(*(s.dtype for s in specs)))


def scalar_of_input(*specs: TensorSpec, **_: Any) -> TensorSpec:
    """infer rule of a loss: a 0-d float of the first input's dtype."""
    return TensorSpec((), float_result(specs[0].dtype))


class OperatorDraft:
    """An operator being declared: the forward rule now; vjp, infer, sample and the symbolic rules
    (vjp_graph, jvp_graph) by decorator."""

    def __init__(self, name: str, forward: Callable[..., Any], attrs: dict[str, Attr],
                 infer: Callable[..., TensorSpec] | None, doc: str | None, arity: int | None, *,
                 gradcheck: bool = True, selective_vjp: bool = False,
                 vary: dict[str, tuple[Any, ...]] | None = None, **fields: Any) -> None:
        self.name = name
        self.forward = forward
        self.attrs = attrs
        self.vary = dict(vary or {})  # attribute values for the gradient checker (Sample.vary)
        self.gradcheck = gradcheck
        self.selective_vjp = selective_vjp
        self.fields = fields  # further OpDef fields (input_names, input_dtypes)
        self._infer = infer
        self._vjp: Callable[..., Any] | None = None
        self._vjp_graph: Callable[..., Any] | None = None
        self._jvp_graph: Callable[..., Any] | None = None
        self._sample: Callable[..., Any] | None = None
        self.doc = doc if doc is not None else _first_line(forward.__doc__)
        self.arity = arity if arity is not None else _arity_of(forward)

    def vjp(self, rule: Callable[..., Any]) -> Callable[..., Any]:
        """Decorator: the gradient rule ``(g, out, *inputs, **attrs) -> gradients``."""
        self._vjp = rule
        return rule

    def vjp_graph(self, rule: Callable[..., Any]) -> Callable[..., Any]:
        """Decorator: the symbolic gradient rule ``(b, g, out, *inputs, **attrs) -> gradients``, written with
        registered operators through the builder ``b`` (one Ref or None per input), so that gradients through
        the operator can be differentiated again (docs/derivatives.md)."""
        self._vjp_graph = _symbolic_rule(self, "vjp_graph", rule, "(b, g, out, {inputs})")
        return rule

    def jvp_graph(self, rule: Callable[..., Any]) -> Callable[..., Any]:
        """Decorator: the symbolic forward-mode rule ``(b, tangents, out, *inputs, **attrs) -> tangent``
        (``tangents``: one Ref or None per input; return the output's tangent, or None)."""
        self._jvp_graph = _symbolic_rule(self, "jvp_graph", rule, "(b, tangents, out, {inputs})")
        return rule

    def infer(self, rule: Callable[..., TensorSpec]) -> Callable[..., TensorSpec]:
        """Decorator: the shape/dtype rule ``(*specs, **attrs) -> TensorSpec``."""
        self._infer = rule
        return rule

    def sample(self, rule: Callable[[np.random.Generator], tuple[list[np.ndarray], dict[str, Any]]]) -> Callable:
        """Decorator: valid random inputs for the gradient checker."""
        self._sample = rule
        return rule

    def build(self) -> OpDef:
        sample = Sample(self._sample, self.vary) if self.vary else self._sample
        return OpDef(
            name=self.name, arity=self.arity, forward=self.forward, vjp=self._vjp,  # type: ignore[arg-type]
            infer=self._infer, attrs=self.attrs, doc=self.doc, sample=sample,
            gradcheck=self.gradcheck, selective_vjp=self.selective_vjp, vjp_graph=self._vjp_graph,
            jvp_graph=self._jvp_graph, **self.fields,
        )

    def __call__(self, *inputs: Any, **attrs: Any) -> Any:
        return self.forward(*inputs, **attrs)


class OperatorSet:
    """A plugin's operators, declared with :meth:`operator` and registered together."""

    def __init__(self) -> None:
        self.drafts: list[OperatorDraft | OpDef] = []

    def operator(self, name: str, *, infer: Callable[..., TensorSpec] | None = None, doc: str | None = None,
                 arity: int | None = None, gradcheck: bool = True, selective_vjp: bool = False,
                 residuals: bool = False,
                 input_names: Sequence[str] | None = None, input_dtypes: Mapping[str, Sequence[str]] | None = None,
                 vary: Mapping[str, Iterable[Any]] | None = None,
                 **attrs: Any) -> Callable[[Callable[..., Any]], OperatorDraft]:
        """Decorator declaring an operator from its forward rule.

        ``infer``, ``doc``, ``arity``, ``gradcheck``, ``selective_vjp``, ``residuals``, ``input_names``
        and ``input_dtypes`` set the OpDef fields of those names (``gradcheck=False``: the
        vjp is deliberately not the derivative, so the gradient checker leaves it alone;
        ``selective_vjp=True``: the vjp takes ``needs=``; ``residuals=True``: the forward rule
        returns ``(result, saved)`` and the vjp takes ``saved=``, what forward computed that the
        gradient needs; ``input_dtypes``: the dtypes
        ListOperators lists per input, every dtype where not given). ``vary`` maps attribute
        names to the values the gradient checker must try besides those the sample rule draws
        (``vary={"padding": ("valid", "same")}``; ``()`` never varies that attribute), and is
        refused with InvalidOperatorError when it names no attribute or gives a value of the
        wrong kind. Every other keyword declares an attribute, and
        one named like an OpDef field is refused with InvalidOperatorError.
        """
        for key in attrs:
            problem = _attr_problem(key, selective_vjp, residuals)
            if problem:
                raise InvalidOperatorError(f"operator '{name}': {problem}", op=name)
        schema = {key: attr_from_default(default) for key, default in attrs.items()}
        variations = _variations(name, schema, vary)

        def declare(forward: Callable[..., Any]) -> OperatorDraft:
            draft = OperatorDraft(name, forward, schema, infer, doc, arity,
                                  gradcheck=gradcheck, selective_vjp=selective_vjp, vary=variations,
                                  input_names=input_names, residuals=residuals,
                                  input_dtypes=dict(input_dtypes or {}))
            self.drafts.append(draft)
            return draft

        return declare

    def add(self, op: OpDef) -> OpDef:
        """Add an operator built elsewhere (an ``OpDef``, e.g. from :func:`chainrule.plugins.from_jax`)."""
        if not isinstance(op, OpDef):
            raise TypeError(f"OperatorSet.add takes an OpDef, got {type(op).__name__}")
        self.drafts.append(op)
        return op

    def register_into(self, register: Callable[[OpDef], None]) -> None:
        for draft in self.drafts:
            register(draft if isinstance(draft, OpDef) else draft.build())

    def hookimpl(self) -> Callable[[Callable[[OpDef], None]], None]:
        """A ready ``register_operators`` hook implementation for this set."""

        @hookimpl
        def register_operators(register: Callable[[OpDef], None]) -> None:
            self.register_into(register)

        return register_operators


#: What a keyword of OperatorSet.operator named like an OpDef field was probably meant to do.
_FIELD_HINTS = {
    "forward": "the forward rule is the function the decorator is applied to",
    "vjp": "declare the gradient rule with the @<operator>.vjp decorator",
    "vjp_graph": "declare the symbolic gradient rule with the @<operator>.vjp_graph decorator",
    "jvp_graph": "declare the symbolic forward-mode rule with the @<operator>.jvp_graph decorator",
    "sample": "declare the gradient checker's inputs with the @<operator>.sample decorator",
    "attrs": "declare each attribute as a keyword of its own (limit=1.0)",
    "variadic": "a forward rule taking *inputs makes the operator variadic",  # a property, but read as a field
    "plugin": "the plugin manager fills it in from the entry point's name",
    "distribution": "the plugin manager fills it in from the installed package",
    "version": "the plugin manager fills it in from the installed package",
}


def _attr_problem(key: str, selective_vjp: bool, residuals: bool = False) -> str | None:
    """Why keyword ``key`` of OperatorSet.operator cannot declare an attribute, and what to do instead."""
    if key in _FIELD_HINTS:
        return f"'{key}' is an OpDef field, not an attribute name ({_FIELD_HINTS[key]}); give the attribute another name"
    return attr_name_clash(key, selective_vjp=selective_vjp, residuals=residuals)


def _variations(name: str, schema: Mapping[str, Attr],
                vary: Mapping[str, Iterable[Any]] | None) -> dict[str, tuple[Any, ...]]:
    """``vary``, checked against the attribute schema (InvalidOperatorError naming the problem)."""
    if vary is None:
        return {}
    if not isinstance(vary, Mapping):
        raise InvalidOperatorError(f"operator '{name}': vary= must map attribute names to lists of values, "
                                   f"got {type(vary).__name__}", op=name)
    checked: dict[str, tuple[Any, ...]] = {}
    for key, values in vary.items():
        if key not in schema:
            known = ", ".join(schema) or "none"
            raise InvalidOperatorError(f"operator '{name}': vary= names '{key}', which is not one of its attributes "
                                       f"({known}); name a declared attribute", op=name)
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            raise InvalidOperatorError(f"operator '{name}': vary['{key}'] must be a list of values, got {values!r}",
                                       op=name)
        attr = schema[key]
        try:
            checked[key] = tuple(coerce_attr(attr.kind, v, allow_nonfinite=attr.allow_nonfinite) for v in values)
        except (TypeError, ValueError) as exc:
            raise InvalidOperatorError(f"operator '{name}': vary['{key}'] ({attr.kind}): {exc}", op=name) from None
    return checked


def _symbolic_rule(draft: OperatorDraft, role: str, rule: Callable[..., Any], form: str) -> Callable[..., Any]:
    """``rule``, checked as it is declared: a function taking the builder, the cotangent (or the tangents),
    the output and one positional parameter per input; a numpy vjp's signature (``g, out, x``: no ``b``)
    is the likely slip, refused with InvalidOperatorError naming the form. Whether it takes every declared
    attribute is checked when the plugin loads, as for the other rules."""
    if not callable(rule):
        raise InvalidOperatorError(f"operator '{draft.name}': the {role} decorator was given a "
                                   f"{type(rule).__name__}, not a function", op=draft.name)
    try:
        params = list(inspect.signature(rule).parameters.values())
    except (TypeError, ValueError):  # a signature Python cannot read: left to the gradient check
        return rule
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in draft.attrs]
    required = [p for p in positional if p.default is p.empty]
    star = any(p.kind is p.VAR_POSITIONAL for p in params)
    variadic = draft.arity == VARIADIC
    wanted = 4 if variadic else 3 + draft.arity
    if (len(positional) < wanted and not star) or (len(required) > wanted and not variadic):
        inputs = "*xs" if variadic else ", ".join(_input_names(draft))
        expected = form.format(inputs=inputs).replace(", )", ")")
        names = ", ".join(p.name for p in positional) or "none"
        raise InvalidOperatorError(
            f"operator '{draft.name}': the {role} rule takes {len(positional)} positional parameter"
            f"{'s' * (len(positional) != 1)} ({names}); a {role} rule takes {expected}"
            + (" and the attributes as keywords" if draft.attrs else "")
            + ": the builder b first, unlike a vjp", op=draft.name)
    return rule


def _input_names(draft: OperatorDraft) -> list[str]:
    """The draft's input names: ``input_names=``, else the forward rule's positional parameters."""
    given = draft.fields.get("input_names")
    if given:
        return list(given)
    try:
        params = inspect.signature(draft.forward).parameters.values()
    except (TypeError, ValueError):
        return [f"x{i}" for i in range(draft.arity)]
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return (names + [f"x{i}" for i in range(len(names), draft.arity)])[:draft.arity]


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0].strip() if text and text.strip() else ""


def _arity_of(forward: Callable[..., Any]) -> int:
    try:
        params = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):
        return VARIADIC
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return VARIADIC
    return sum(1 for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def table_hookimpl(table: list[OpDef]) -> Callable[[Callable[[OpDef], None]], None]:
    """A ``register_operators`` hook implementation registering every OpDef of a table."""

    @hookimpl
    def register_operators(register: Callable[[OpDef], None]) -> None:
        for op in table:
            register(op)

    return register_operators
