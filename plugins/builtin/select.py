"""Selection and literals: where, stop_gradient, const.

``None`` in a vjp result means "no gradient for this input": where's bool
condition gets none, and stop_gradient gives none on purpose, which cuts the
graph for the backward pass while the forward value passes through.

Derivatives as graphs (docs/derivatives.md): where's ``vjp_graph`` and
``jvp_graph`` select g, or the tangents, with the same condition;
stop_gradient and const have none, in any order and mode.
"""
from __future__ import annotations

import numpy as np

from chainrule.core import Attr, OpDef, OpError, TensorSpec, broadcast_shapes
from chainrule.core.dtypes import BOOL_DTYPES
from chainrule.core.symbolic import no_jvp_graph, no_vjp_graph, with_symbolic
from chainrule.plugins.authoring import same_as_input, table_hookimpl


# --- where -----------------------------------------------------------------------------------

def _where_infer(cond: TensorSpec, x: TensorSpec, y: TensorSpec) -> TensorSpec:
    if cond.dtype != np.bool_:
        raise OpError(f"the condition must be bool, got {cond.dtype.name}", reason="DTYPE_MISMATCH")
    return TensorSpec(broadcast_shapes(cond.shape, x.shape, y.shape), np.result_type(x.dtype, y.dtype))


def _where_sample(rng: np.random.Generator):
    shapes = [((2, 3), (2, 3), (2, 3)), ((2, 3), (2, 3), (3,)), ((3,), (2, 1), ()), ((), (2,), (2,))]
    c, a, b = shapes[rng.integers(len(shapes))]
    return [np.asarray(rng.random(c) < 0.5), np.asarray(rng.standard_normal(a)), np.asarray(rng.standard_normal(b))], {}


# --- const -----------------------------------------------------------------------------------

def _const(*, value: np.ndarray) -> np.ndarray:
    """The literal, read-only: a caller writing into a result cannot change the graph. (A literal
    decoded from a message is read-only already and is returned as it is: a scalar chain has a
    const beside every other node.)"""
    if not value.flags.writeable:
        return value
    view = value.view()
    view.flags.writeable = False
    return view


def _const_float(*, value: np.ndarray) -> float:
    """The literal of a plan on Python floats (OpDef.scalar): a 0-d float64 as a float."""
    return float(value)


def _literal_vjp(g, out, *, value):
    return ()


# --- stop_gradient -----------------------------------------------------------------------------

def _identity(x):
    return x


def _no_gradient(g, out, x):
    return (None,)


# --- symbolic rules (docs/derivatives.md) --------------------------------------------------------------

def _where_vjp_graph(b, g, out, cond, x, y):
    zero = b.scalar(0.0, g)
    return None, b.op("where", cond, g, zero), b.op("where", cond, zero, g)


def _where_jvp_graph(b, tangents, out, cond, x, y):
    _, tx, ty = tangents
    zero = b.scalar(0.0, out)
    return b.op("where", cond, zero if tx is None else tx, zero if ty is None else ty)


# --- the table -------------------------------------------------------------------------------

OPERATORS: list[OpDef] = [
    OpDef("where", 3,
          np.where,
          lambda g, out, cond, x, y: (None, np.where(cond, g, 0), np.where(cond, 0, g)),
          _where_infer,
          doc="x where cond is true, else y (bool cond, numpy broadcasting); cond gets no gradient.",
          sample=_where_sample, input_names=("cond", "x", "y"), input_dtypes={"cond": BOOL_DTYPES}),
    OpDef("stop_gradient", 1, _identity, _no_gradient, same_as_input,
          doc="x unchanged, but no gradient flows back through it.", gradcheck=False,
          scalar=(_identity, _no_gradient)),
    OpDef("const", 0, _const, _literal_vjp, lambda *, value: TensorSpec.of(value),
          attrs={"value": Attr("tensor", doc="the literal tensor")},
          doc="A tensor literal given as the attribute value.",
          sample=lambda rng: ([], {"value": rng.standard_normal((2, 3))}),
          scalar=(_const_float, _literal_vjp)),
]

SYMBOLIC = {
    #  name:          (vjp_graph,                  jvp_graph)
    "where":          (_where_vjp_graph,           _where_jvp_graph),
    "stop_gradient":  (no_vjp_graph,               no_jvp_graph),     # no gradient, on purpose: in every order
    "const":          (no_vjp_graph,               no_jvp_graph),     # a literal has no inputs
}

OPERATORS = with_symbolic(OPERATORS, SYMBOLIC)

register_operators = table_hookimpl(OPERATORS)
