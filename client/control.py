"""``ops.scan``: a loop whose body is written once, as with ``jax.lax.scan``.

``step_fn(carry, x, *consts) -> (new_carry, y)`` is called once, on Vars of a
fresh builder, to build the body graph; the server runs that body once per
step. ``carry`` mirrors ``init`` (one Var, or a list of them), ``x`` mirrors
``xs`` (a slice of each sequence along axis 0; None without sequences), and
``y`` may be a Var, a list of Vars or None. The result mirrors them too:
``(final_carry, ys)`` with each ``y`` stacked along a new axis 0.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from .builder import GraphBuilder, Var


def scan(step_fn: Callable[..., Any], init: Var | Sequence[Var], xs: Var | Sequence[Var] | None = None,
         consts: Sequence[Var] = (), *, length: int | None = None,
         shapes: Mapping[Var, Sequence[int]] | None = None, name: str | None = None) -> tuple[Any, Any]:
    """Build a ``scan`` node; returns ``(final_carry, ys)``.

    The body's inputs need shapes: a declared input's is known; for a value a node
    computes, give it in ``shapes`` (``{h1: (16, 32)}``; -1 for a size that varies).
    ``length`` gives the number of steps when there are no sequences.
    """
    carries, one_carry = _as_list(init, "init")
    sequences, one_sequence = _as_list(xs, "xs")
    constants = list(consts)
    if not carries and not sequences:
        raise ValueError("scan needs at least one carry or sequence")
    every = carries + sequences + constants
    outer = every[0].builder
    for v in every:
        if not isinstance(v, Var) or v.builder is not outer:
            raise ValueError(f"scan's init, xs and consts must be Vars of one builder, got {v!r}")
    known = dict(shapes or {})

    body = GraphBuilder()

    def declare(v: Var, name: str, drop_first: bool) -> Var:
        shape = known.get(v, v.shape)
        if shape is None:
            raise ValueError(f"scan: the shape of {v.name} is not known to the builder (a node computes it); "
                             f"pass shapes={{{v.name}: (...)}} with its shape (-1 for a size that varies)")
        shape = tuple(int(n) for n in shape)
        if drop_first:
            if not shape:
                raise ValueError(f"scan: the sequence {v.name} is a scalar; a sequence is sliced along its axis 0")
            shape = shape[1:]
        return body.input(name, shape, v.dtype or "float64")

    carry_vars = [declare(v, v.name, False) for v in carries]
    slice_vars = [declare(v, f"{v.name}_t", True) for v in sequences]
    const_vars = [declare(v, v.name, False) for v in constants]
    carry_in = carry_vars[0] if one_carry else carry_vars
    x_in = (slice_vars[0] if one_sequence else slice_vars) if sequences else None
    returned = step_fn(carry_in, x_in, *const_vars)
    if not isinstance(returned, tuple) or len(returned) != 2:
        raise TypeError("scan's step_fn must return (new_carry, y)")
    new_carry, y = returned
    new_carries, _ = _as_list(new_carry, "the new carry")
    ys, one_y = _as_list(y, "y")
    if len(new_carries) != len(carries):
        raise ValueError(f"scan's step_fn returned {len(new_carries)} carries for {len(carries)} in init")
    for v in new_carries + ys:
        if not isinstance(v, Var) or v.builder is not body:
            raise ValueError(f"scan's step_fn must return Vars built from its arguments, got {v!r}")
    graph = body.build(new_carries + ys)
    if len(set(graph.outputs)) != len(new_carries) + len(ys):
        # one Var returned twice: give each output a node of its own (the body's outputs are listed by name)
        raise ValueError("scan's step_fn returned the same Var twice; return distinct values")
    dtypes_out = [v.dtype for v in carries] + [v.dtype for v in ys]
    values = outer.several("scan", every, {"body": graph, "num_carries": len(carries),
                                           "num_sequences": len(sequences), "length": length},
                           dtypes_out, name=name)
    final, stacked = values[:len(carries)], values[len(carries):]
    final_out = final[0] if one_carry else final
    ys_out = (stacked[0] if one_y else stacked) if ys else None
    return final_out, ys_out


def _as_list(value: Any, what: str) -> tuple[list[Var], bool]:
    """A Var, a list or tuple of Vars, or None, as a list; and whether it was one Var."""
    if value is None:
        return [], False
    if isinstance(value, Var):
        return [value], True
    if isinstance(value, (list, tuple)):
        return list(value), False
    raise TypeError(f"scan: {what} must be a Var, a list of Vars or None, got {type(value).__name__}")
