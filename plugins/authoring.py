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

Attributes are keyword defaults: a float default makes a float attribute, a
tuple of ints an ``ints`` attribute, and so on; pass an :class:`Attr` for a
required attribute or one whose default is None. The other keywords of
:meth:`OperatorSet.operator` (``infer``, ``doc``, ``arity``, ``gradcheck``,
``selective_vjp``) set the OpDef fields of those names, and no attribute may take
the name of an OpDef field.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import numpy as np

from chainrule.core import VARIADIC, Attr, OpDef, TensorSpec, broadcast_shapes
from chainrule.core.dtypes import float_result
from chainrule.core.errors import InvalidOperatorError
from chainrule.core.operator import attr_name_clash

from .hookspecs import hookimpl


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
    """An operator being declared: the forward rule now, vjp and infer by decorator."""

    def __init__(self, name: str, forward: Callable[..., Any], attrs: dict[str, Attr],
                 infer: Callable[..., TensorSpec] | None, doc: str | None, arity: int | None, *,
                 gradcheck: bool = True, selective_vjp: bool = False) -> None:
        self.name = name
        self.forward = forward
        self.attrs = attrs
        self.gradcheck = gradcheck
        self.selective_vjp = selective_vjp
        self._infer = infer
        self._vjp: Callable[..., Any] | None = None
        self._sample: Callable[..., Any] | None = None
        self.doc = doc if doc is not None else _first_line(forward.__doc__)
        self.arity = arity if arity is not None else _arity_of(forward)

    def vjp(self, rule: Callable[..., Any]) -> Callable[..., Any]:
        """Decorator: the gradient rule ``(g, out, *inputs, **attrs) -> gradients``."""
        self._vjp = rule
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
        return OpDef(
            name=self.name, arity=self.arity, forward=self.forward, vjp=self._vjp,  # type: ignore[arg-type]
            infer=self._infer, attrs=self.attrs, doc=self.doc, sample=self._sample,
            gradcheck=self.gradcheck, selective_vjp=self.selective_vjp,
        )

    def __call__(self, *inputs: Any, **attrs: Any) -> Any:
        return self.forward(*inputs, **attrs)


class OperatorSet:
    """A plugin's operators, declared with :meth:`operator` and registered together."""

    def __init__(self) -> None:
        self.drafts: list[OperatorDraft] = []

    def operator(self, name: str, *, infer: Callable[..., TensorSpec] | None = None, doc: str | None = None,
                 arity: int | None = None, gradcheck: bool = True, selective_vjp: bool = False,
                 **attrs: Any) -> Callable[[Callable[..., Any]], OperatorDraft]:
        """Decorator declaring an operator from its forward rule.

        ``infer``, ``doc``, ``arity``, ``gradcheck`` and ``selective_vjp`` set the
        OpDef fields of those names (``gradcheck=False``: the vjp is deliberately not
        the derivative, so the gradient checker leaves it alone; ``selective_vjp=True``:
        the vjp takes ``needs=``). Every other keyword declares an attribute, and
        one named like an OpDef field is refused with InvalidOperatorError.
        """
        for key in attrs:
            problem = _attr_problem(key, selective_vjp)
            if problem:
                raise InvalidOperatorError(f"operator '{name}': {problem}", op=name)
        schema = {key: attr_from_default(default) for key, default in attrs.items()}

        def declare(forward: Callable[..., Any]) -> OperatorDraft:
            draft = OperatorDraft(name, forward, schema, infer, doc, arity,
                                  gradcheck=gradcheck, selective_vjp=selective_vjp)
            self.drafts.append(draft)
            return draft

        return declare

    def register_into(self, register: Callable[[OpDef], None]) -> None:
        for draft in self.drafts:
            register(draft.build())

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
    "sample": "declare the gradient checker's inputs with the @<operator>.sample decorator",
    "attrs": "declare each attribute as a keyword of its own (limit=1.0)",
    "variadic": "a forward rule taking *inputs makes the operator variadic",  # a property, but read as a field
    "plugin": "the plugin manager fills it in from the entry point's name",
    "distribution": "the plugin manager fills it in from the installed package",
    "version": "the plugin manager fills it in from the installed package",
}


def _attr_problem(key: str, selective_vjp: bool) -> str | None:
    """Why keyword ``key`` of OperatorSet.operator cannot declare an attribute, and what to do instead."""
    if key in _FIELD_HINTS:
        return f"'{key}' is an OpDef field, not an attribute name ({_FIELD_HINTS[key]}); give the attribute another name"
    return attr_name_clash(key, selective_vjp=selective_vjp)


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
