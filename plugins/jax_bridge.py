"""Operators from JAX functions: :func:`from_jax`.

``from_jax("mine.logcosh", fn)`` turns a function of JAX arrays into an operator:

* **forward** calls ``jax.jit(fn)`` and hands back a numpy array;
* **vjp** is ``jax.vjp`` of ``fn``, jit-compiled together with the forward computation it
  needs (one XLA call; the value the engine passes as ``out`` is not used), with respect to
  the float inputs only (int and bool inputs get None);
* **infer** is ``jax.eval_shape`` (no computation), cached per input shapes and dtypes and
  static attributes; a function JAX cannot apply to the inputs (shapes that do not fit) is
  refused as the caller's mistake (OpError, INVALID_ARGUMENT).

Attributes are keyword defaults, as for ``OperatorSet.operator``, and reach ``fn`` as keywords.
Those that can change shapes or control flow are *static* arguments of ``jax.jit`` (int, bool,
string and int-list attributes: one compilation per value); float, float-list and tensor
attributes are traced (dynamic): a new value does not recompile.

**JAX is imported lazily**: ``import chainrule.plugins`` and ``from_jax(...)`` do not import it
(``from_jax`` only checks that it is installed); the first call of a rule does (about a second).
Install it with ``pip install 'chainrule[jax]'``.

**64-bit floats**: JAX computes in 32 bits unless ``jax_enable_x64`` is set. Every rule of an
operator from ``from_jax`` runs inside JAX's ``enable_x64`` context manager, so float64 inputs
stay float64 (and float32 stay float32) while the rest of the process keeps JAX's own setting:
another library's JAX code is not switched to 64 bits behind its back. The setting is per
thread, as JAX's configuration contexts are.

The result is an ``OpDef``: register it from a hook (``register(op)``) or add it to an
``OperatorSet`` (``ops.add(op)``).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import sys
import threading
from collections import OrderedDict
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from chainrule.core import VARIADIC, OpDef, OpError, TensorSpec
from chainrule.core.errors import InvalidOperatorError

from .authoring import _attr_problem, _first_line, _variations, attr_from_default
from .testing import Sample

__all__ = ["JAX_MISSING", "from_jax", "jax_available"]

#: The message of the ImportError from_jax raises when JAX is not installed.
JAX_MISSING = "from_jax needs JAX: pip install 'chainrule[jax]' (or pip install jax jaxlib)"

#: Attribute kinds passed to jax.jit as static arguments (hashable, may change shapes).
STATIC_KINDS = frozenset({"int", "bool", "string", "ints"})

#: How many (shapes, dtypes, static attributes) an operator's infer rule remembers.
INFER_CACHE_SIZE = 256

_UNSET: Any = object()


def jax_available() -> bool:
    """True when JAX can be imported (checked without importing it)."""
    if "jax" in sys.modules:
        return sys.modules["jax"] is not None  # None: importing it is blocked
    try:
        return importlib.util.find_spec("jax") is not None
    except (ImportError, ValueError):
        return False


def from_jax(
    name: str,
    fn: Callable[..., Any],
    *,
    doc: str | None = None,
    arity: int | None = None,
    infer: Callable[..., TensorSpec] | None = _UNSET,
    sample: Callable[[np.random.Generator], tuple[list[np.ndarray], dict[str, Any]]] | None = None,
    vary: Mapping[str, Iterable[Any]] | None = None,
    gradcheck: bool = True,
    **attrs: Any,
) -> OpDef:
    """An operator whose forward rule is ``jax.jit(fn)``, whose vjp comes from ``jax.vjp`` and whose
    infer rule is ``jax.eval_shape``.

    ``fn(*inputs, **attrs)`` takes the inputs positionally and the attributes as keywords and
    returns one array. ``attrs`` declares the attributes by their defaults (``beta=1.0``), as
    ``OperatorSet.operator`` does; ``doc`` defaults to the first line of ``fn``'s docstring and
    ``arity`` to the number of its positional parameters (``*xs``: variadic). ``infer=None``
    leaves the operator without an infer rule, a callable replaces ``jax.eval_shape``.
    ``sample`` and ``vary`` are the gradient checker's, as for ``OperatorSet``.

    Raises ImportError when JAX is not installed, InvalidOperatorError for an attribute the
    operator cannot have.
    """
    if not jax_available():
        raise ImportError(JAX_MISSING)
    if not callable(fn):
        raise InvalidOperatorError(f"operator '{name}': from_jax needs a function, got {type(fn).__name__}", op=name)
    for key in attrs:
        problem = _attr_problem(key, False)
        if problem:
            raise InvalidOperatorError(f"operator '{name}': {problem}", op=name)
    schema = {key: attr_from_default(default) for key, default in attrs.items()}
    variations = _variations(name, schema, vary)
    rules = _JaxRules(name, fn, schema)
    names = _input_names(fn, schema)
    if arity is None:
        arity = VARIADIC if names is None else len(names)
    extra: dict[str, Any] = {}
    if names is not None and arity == len(names) and "input_names" in OpDef.__dataclass_fields__:
        extra["input_names"] = tuple(names)
    return OpDef(
        name=name, arity=arity, forward=rules.forward, vjp=rules.vjp,
        infer=rules.infer if infer is _UNSET else infer,
        attrs=schema, doc=doc if doc is not None else _first_line(fn.__doc__),
        sample=Sample(sample, variations) if variations else sample, gradcheck=gradcheck, **extra,
    )


class _JaxRules:
    """The three rules of one operator from JAX; the jitted functions are built at the first call."""

    def __init__(self, name: str, fn: Callable[..., Any], schema: Mapping[str, Any]) -> None:
        self.name = name
        self.fn = fn
        self.static = tuple(key for key, attr in schema.items() if attr.kind in STATIC_KINDS)
        self._lock = threading.Lock()
        self._jitted: tuple[Callable[..., Any], Callable[..., Any]] | None = None
        self._shapes: OrderedDict[Any, TensorSpec] = OrderedDict()

    # --- the rules, as the engine calls them -------------------------------------------------

    def forward(self, *inputs: Any, **attrs: Any) -> np.ndarray:
        jitted, _ = self._compiled()
        with _x64():
            return np.asarray(jitted(*inputs, **attrs))

    def vjp(self, g: Any, out: Any, *inputs: Any, **attrs: Any) -> tuple[Any, ...]:
        _, pullback = self._compiled()
        with _x64():
            grads = pullback(g, *inputs, **attrs)
        return tuple(None if grad is None else np.asarray(grad) for grad in grads)

    #: The vjp returns one gradient (or None) per input by construction: the load-time call
    #: (chainrule.plugins.testing.vjp_contract_problem) need not compile it.
    vjp.vjp_contract_kept = True  # type: ignore[attr-defined]

    def infer(self, *specs: TensorSpec, **attrs: Any) -> TensorSpec:
        return self._infer(*specs, **attrs)

    #: Read off the function itself, so it declares nothing: the gradient checker's float32 case
    #: wants float32 whatever it says (pass infer= to from_jax to declare another dtype).
    infer.derived_from_forward = True  # type: ignore[attr-defined]

    def _infer(self, *specs: TensorSpec, **attrs: Any) -> TensorSpec:
        key = (tuple((tuple(s.shape), np.dtype(s.dtype).str) for s in specs),
               tuple((k, attrs[k]) for k in self.static if k in attrs),
               # a tensor attribute's shape may shape the output; float values do not
               tuple((k, v.shape, v.dtype.str) for k, v in attrs.items() if isinstance(v, np.ndarray)))
        with self._lock:
            known = self._shapes.get(key)
            if known is not None:
                self._shapes.move_to_end(key)
                return known
        jax = _jax()
        structs = [jax.ShapeDtypeStruct(tuple(s.shape), np.dtype(s.dtype)) for s in specs]
        try:
            with _x64():
                result = jax.eval_shape(functools.partial(self.fn, **attrs), *structs)
        except (TypeError, ValueError, IndexError) as exc:  # JAX's refusal of these shapes or attributes
            shown = ", ".join(str(TensorSpec(tuple(s.shape), np.dtype(s.dtype))) for s in specs)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise OpError(f"{self.name}: the JAX function cannot take inputs {shown}: {first[:300]}") from None
        if not hasattr(result, "shape") or not hasattr(result, "dtype"):
            raise TypeError(f"{self.name}: the JAX function returned {type(result).__name__}; from_jax operators "
                            f"return one array")
        spec = TensorSpec(tuple(int(n) for n in result.shape), np.dtype(result.dtype))
        with self._lock:
            self._shapes[key] = spec
            if len(self._shapes) > INFER_CACHE_SIZE:
                self._shapes.popitem(last=False)
        return spec

    # --- internals --------------------------------------------------------------------------

    def _compiled(self) -> tuple[Callable[..., Any], Callable[..., Any]]:
        if self._jitted is None:
            with self._lock:
                if self._jitted is None:
                    self._jitted = _build(self.fn, self.static)
        return self._jitted


def _build(fn: Callable[..., Any], static: Sequence[str]) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``(jit(fn), jit(pullback))``: the forward rule, and ``(g, *inputs, **attrs) -> gradients``."""
    jax = _jax()
    jnp = jax.numpy

    def pullback(g: Any, *inputs: Any, **attrs: Any) -> tuple[Any, ...]:
        floats = [i for i, x in enumerate(inputs) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]

        def of_floats(*values: Any) -> Any:
            args = list(inputs)
            for i, value in zip(floats, values):
                args[i] = value
            return fn(*args, **attrs)

        out, back = jax.vjp(of_floats, *[inputs[i] for i in floats])
        parts = back(jnp.asarray(g, dtype=out.dtype))
        grads: list[Any] = [None] * len(inputs)
        for i, part in zip(floats, parts):
            grads[i] = part
        return tuple(grads)

    return jax.jit(fn, static_argnames=tuple(static)), jax.jit(pullback, static_argnames=tuple(static))


@functools.cache
def _jax() -> Any:
    try:
        import jax
    except ImportError as exc:
        raise ImportError(f"{JAX_MISSING} ({exc})") from None
    return jax


def _x64() -> contextlib.AbstractContextManager[Any]:
    """JAX's 64-bit mode for the calls inside (this thread only), whatever the process's setting."""
    jax = _jax()
    scope = getattr(jax, "enable_x64", None)
    if callable(scope):
        return scope(True)
    from jax.experimental import enable_x64  # JAX < 0.6

    return enable_x64()


def _input_names(fn: Callable[..., Any], schema: Mapping[str, Any]) -> list[str] | None:
    """The positional parameters of ``fn`` that are not attributes; None for ``*inputs`` (variadic)
    or a signature Python cannot read."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in schema]
