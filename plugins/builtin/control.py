"""Control flow: ``scan``, one body graph run once per step (``jax.lax.scan``, ONNX ``Scan``).

A scan node's inputs are the initial carries, then the sequences (sliced along
axis 0, one slice per step), then the constants (the same every step: shared
weights). Its body is a graph-valued attribute whose inputs are, in that order,
one carry, one slice and one constant each, and whose outputs are the new
carries, then the per-step outputs. The node's values are the final carries,
then the per-step outputs stacked along a new axis 0.

The body is compiled once, with the graph around it; every step runs the same
plan (no unrolling: a 1,000-step RNN is one body of a handful of nodes). The
forward pass keeps each step's body values as the node's residuals, charged to
the memory budget before the first step; the vjp walks the steps backwards,
seeding the body's outputs with the carries' and outputs' gradients, and sums
the constants' gradients over the steps (the shared-weight ``+=``). The stop
token is checked at every step.

Derivatives as graphs (docs/derivatives.md): scan's symbolic vjp is a scan over
the reversed steps whose body is the body's own symbolic vjp (derive_reverse),
and its jvp one scan whose body is the body's derive_forward, carrying the
tangents beside the carries; both recompute the forward steps rather than keep
them (a derived graph has no residuals). See the rules below.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from chainrule.core import (
    Attr, ChainruleError, GraphIR, InputDecl, Node, OpDef, OpError, Plan, Registry, TensorSpec, compile_graph,
)
from chainrule.core.compile import Shapes, nested_error
from chainrule.core.cost import forward_operations
from chainrule.core.engine import current_run, run_backward, run_forward
from chainrule.core.symbolic import derive_forward, derive_reverse, plan_to_graph, with_symbolic
from chainrule.plugins.authoring import table_hookimpl


@dataclass
class _Steps:
    """scan's residuals: the body's shapes and, per step, its values (and their own residuals)."""

    shapes: Shapes
    steps: list[Any]


def _parts(inputs: Sequence[Any], num_carries: int, num_sequences: int) -> tuple[list, list, list]:
    if num_carries < 0 or num_sequences < 0 or num_carries + num_sequences > len(inputs):
        raise OpError(f"num_carries ({num_carries}) and num_sequences ({num_sequences}) must be >= 0 and "
                      f"together at most the node's {len(inputs)} inputs", reason="BAD_ATTRIBUTE",
                      field="attrs.num_carries")
    split = num_carries + num_sequences
    return list(inputs[:num_carries]), list(inputs[num_carries:split]), list(inputs[split:])


def _length(sequence_shapes: list[tuple[int, ...]], length: int | None) -> int:
    """The number of steps: the sequences' common first dimension, or ``length``."""
    firsts = set()
    for j, shape in enumerate(sequence_shapes):
        if not shape:
            raise OpError(f"sequence {j} is a scalar; a sequence is sliced along its axis 0", reason="SHAPE_MISMATCH")
        firsts.add(shape[0])
    if len(firsts) > 1:
        raise OpError(f"the sequences have different lengths {sorted(firsts)} along axis 0", reason="SHAPE_MISMATCH")
    if length is not None and length < 0:
        raise OpError(f"length must be >= 0, got {length}", reason="BAD_ATTRIBUTE", field="attrs.length")
    if firsts and length is not None and length not in firsts:
        raise OpError(f"length {length} disagrees with the sequences' length {firsts.pop()}",
                      reason="SHAPE_MISMATCH", field="attrs.length")
    if not firsts and length is None:
        raise OpError("with no sequences, say how many steps: the length attribute", reason="BAD_ATTRIBUTE",
                      field="attrs.length")
    return firsts.pop() if firsts else int(length)


def _step_shapes(specs: Sequence[TensorSpec], body: Plan, num_carries: int, num_sequences: int) -> list[tuple[int, ...]]:
    """The body's input shapes at each step, checked against the body's declarations."""
    if len(specs) != body.n_inputs:
        raise OpError(f"the body declares {body.n_inputs} inputs; the node gives {len(specs)} (carries, sequences, "
                      f"then constants, one body input each)", reason="BAD_ARITY")
    if len(body.outputs) < num_carries:
        raise OpError(f"the body has {len(body.outputs)} outputs, fewer than its {num_carries} carries",
                      reason="BAD_OUTPUT")
    carries, sequences, consts = _parts(specs, num_carries, num_sequences)
    shapes = [tuple(s.shape) for s in carries] + [tuple(s.shape[1:]) for s in sequences] + [tuple(s.shape) for s in consts]
    for k, (spec, shape) in enumerate(zip(specs, shapes)):
        name = body.names[k]
        declared_dtype, declared_shape = body.input_dtypes[k], body.input_shapes[k]
        if spec.dtype != declared_dtype:
            raise OpError(f"body input '{name}' is declared {declared_dtype.name}; the node gives {spec.dtype.name}",
                          reason="DTYPE_MISMATCH")
        if len(shape) != len(declared_shape) or any(d not in (-1, n) for d, n in zip(declared_shape, shape)):
            raise OpError(f"body input '{name}' is declared with shape {list(declared_shape)}; "
                          f"each step gives {list(shape)}", reason="SHAPE_MISMATCH")
    return shapes


def _scan_infer(*specs: TensorSpec, body: Plan, num_carries: int, num_sequences: int = 0,
                length: int | None = None) -> list[TensorSpec]:
    step_shapes = _step_shapes(specs, body, num_carries, num_sequences)
    sequences = _parts(specs, num_carries, num_sequences)[1]
    steps = _length([s.shape for s in sequences], length)
    shapes = body.specialize(step_shapes)
    found = [shapes.specs[s] for s in body.outputs]
    for i, spec in enumerate(found):
        if spec is None:
            raise OpError(f"body output '{body.names[body.outputs[i]]}' has no inferred shape (an operator without "
                          f"an infer rule); scan needs every body operator to have one", reason="SHAPE_MISMATCH")
    for i in range(num_carries):
        if tuple(found[i]) != (tuple(specs[i].shape), specs[i].dtype):
            raise OpError(f"body output '{body.names[body.outputs[i]]}' (new carry {i}) is {found[i]}, but the carry "
                          f"is {TensorSpec(tuple(specs[i].shape), specs[i].dtype)}; a carry keeps its shape and dtype",
                          reason="SHAPE_MISMATCH")
    return found[:num_carries] + [TensorSpec((steps, *spec.shape), spec.dtype) for spec in found[num_carries:]]


def _scan_inner_shapes(*specs: TensorSpec, body: Plan, num_carries: int, num_sequences: int = 0,
                       length: int | None = None) -> tuple[int, Shapes]:
    """How many steps, and the body's shapes at each: what a value of the body asked for by name takes."""
    sequences = _parts(specs, num_carries, num_sequences)[1]
    return _length([s.shape for s in sequences], length), body.specialize(
        _step_shapes(specs, body, num_carries, num_sequences))


def _scan_cost(*specs: TensorSpec, body: Plan, num_carries: int, num_sequences: int = 0,
               length: int | None = None) -> float:
    """The body's floating-point operations, once per step."""
    steps, shapes = _scan_inner_shapes(*specs, body=body, num_carries=num_carries, num_sequences=num_sequences,
                                       length=length)
    return steps * forward_operations(body, shapes)


def _scan(*inputs: Any, body: Plan, num_carries: int, num_sequences: int = 0,
          length: int | None = None) -> tuple[tuple[Any, ...], _Steps]:
    run = current_run()
    carries, sequences, consts = _parts(inputs, num_carries, num_sequences)
    steps = _length([np.shape(s) for s in sequences], length)
    shapes = body.specialize([np.shape(c) for c in carries] + [np.shape(s)[1:] for s in sequences]
                             + [np.shape(c) for c in consts])
    keep = run.keep_residuals  # False when no backward pass follows: nothing is kept per step
    if keep:  # what the backward pass keeps: every step's body values; and one step's gradients at a time
        run.charge(steps * shapes.value_bytes + shapes.grad_bytes, what="values, gradients and scan's per-step values")
    outputs = body.outputs[num_carries:]
    stacked = [np.empty((steps, *shapes.specs[s].shape), shapes.specs[s].dtype) for s in outputs]
    watched = _watched(run, body, shapes, steps, run.inner_values, "values of scan's body asked for")
    kept: list[Any] = [None] * steps
    arrays = carries + [None] * len(sequences) + consts
    for t in range(steps):
        run.check()
        for j, sequence in enumerate(sequences):
            arrays[num_carries + j] = sequence[t]
        try:
            values, saved = run_forward(body, shapes, arrays, run)
        except ChainruleError as exc:
            raise nested_error(exc, None, None, f"step {t}: ") from None
        if keep:
            kept[t] = (values, saved)
        for i in range(num_carries):
            arrays[i] = values[body.outputs[i]]
        for out, s in zip(stacked, outputs):
            out[t] = values[s]
        for s, out in watched:
            out[t] = values[s]
    return (*arrays[:num_carries], *stacked), _Steps(shapes, kept)


def _watched(run: Any, body: Plan, shapes: Shapes, steps: int, into: dict[str, Any], what: str, *,
             zeros: bool = False) -> list[tuple[int, np.ndarray]]:
    """(slot, stacked array) for each body value the evaluation asked for (``evaluate(inner=)``),
    the arrays charged to the memory budget and put in ``into`` by their ``node/value`` names."""
    asked = run.watch.get(id(body)) if run.watch else None
    if not asked:
        return []
    found = []
    for slot, name in asked.items():
        spec = shapes.specs[slot]
        run.charge(steps * spec.nbytes, what=what)
        into[name] = (np.zeros if zeros else np.empty)((steps, *spec.shape), spec.dtype)
        found.append((slot, into[name]))
    return found


def _scan_vjp(grads: tuple[Any, ...], outs: tuple[Any, ...], *inputs: Any, body: Plan, num_carries: int,
              num_sequences: int = 0, length: int | None = None, saved: _Steps) -> tuple[Any, ...]:
    """Walk the steps backwards: seed the body's outputs with the carries' gradients (from the
    step after) and this step's slice of the outputs' gradients; the body's input gradients give
    the carries' gradients for the step before, a slice of each sequence's, and a term of each
    constant's sum."""
    run = current_run()
    carries, sequences, consts = _parts(inputs, num_carries, num_sequences)
    shapes, kept = saved.shapes, saved.steps
    carry_grads = list(grads[:num_carries])
    output_grads = grads[num_carries:]
    sequence_grads: list[Any] = [None] * len(sequences)
    const_grads: list[Any] = [None] * len(consts)
    first_const = num_carries + len(sequences)
    slots = body.outputs
    watched = [(s, out) for s, out in _watched(run, body, shapes, len(kept), run.inner_grads,
                                               "gradients of scan's body asked for", zeros=True)
               if shapes.differentiable[s]]
    for t in range(len(kept) - 1, -1, -1):
        run.check()
        seeds = [(slots[i], g) for i, g in enumerate(carry_grads) if g is not None]
        seeds += [(slots[num_carries + j], g[t]) for j, g in enumerate(output_grads) if g is not None]
        if not seeds:
            kept[t] = None
            continue
        values, inner = kept[t]
        kept[t] = None  # this step's values are not needed again
        try:
            found = run_backward(body, shapes, shapes.grad_edges, values, inner, seeds, run)
        except ChainruleError as exc:
            raise nested_error(exc, None, None, f"step {t}: ") from None
        for s, out in watched:
            if found[s] is not None:
                out[t] = found[s]
        carry_grads = found[:num_carries]
        for j, sequence in enumerate(sequences):
            g = found[num_carries + j]
            if g is not None:
                if sequence_grads[j] is None:
                    sequence_grads[j] = np.zeros(np.shape(sequence), shapes.specs[num_carries + j].dtype)
                sequence_grads[j][t] = g
        for c in range(len(consts)):
            g = found[first_const + c]
            if g is None:
                continue
            if const_grads[c] is None:
                const_grads[c] = np.array(g, copy=True)
            else:
                np.add(const_grads[c], g, out=const_grads[c])
    return (*carry_grads, *sequence_grads, *const_grads)


# --- symbolic rules (docs/derivatives.md): a scan's derivatives are scans --------------------------------
#
# reverse mode: a scan of the body's symbolic vjp over the steps in reverse. Its carries are the
# carries' gradients (seeded with the final carries' gradients) and running sums of the constants'
# gradients; its sequences are the steps' carries (from a forward scan whose body also outputs its
# carry inputs), the sequences and the per-step outputs' gradients, all flipped in time; its
# per-step outputs are the sequences' gradients (flipped back). The body's vjp is derive_reverse of
# the body with one scalar output, sum_i sum(output_i * seed_i), the seeds being new body inputs.
#
# forward mode: one scan whose carries are the carries and their tangents, whose sequences and
# constants are given with theirs: its body is derive_forward of the body, its float outputs
# flattened and concatenated into one value (derive_forward follows one output), then cut apart
# again with concat_part and reshape_like.

def _is_float(dtype: Any) -> bool:
    return np.dtype(dtype).kind == "f"


def _body_graph(body: GraphIR | Plan) -> GraphIR:
    """The body as a GraphIR: as it is, or rebuilt from a compiled plan (a checker's sample gives one)."""
    return body if isinstance(body, GraphIR) else plan_to_graph(body)


class _Fresh:
    """Names not used in some graphs: ``base``, else ``base_1``, ``base_2``..."""

    def __init__(self, *graphs: GraphIR) -> None:
        self.taken = {name for g in graphs for name in _names(g)}

    def __call__(self, base: str) -> str:
        name, k = base, 0
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name


def _names(graph: GraphIR) -> list[str]:
    return [d.name for d in graph.inputs] + [v for n in graph.nodes for v in (n.name, *n.outputs)]


def _step_spec(b, ref) -> tuple[str, tuple[int, ...]]:
    """The dtype and per-step shape of a stacked per-step output, from its static spec."""
    spec = b.spec(ref)
    if spec is None:
        raise OpError("scan's derivative needs the shapes of its per-step outputs, which shape inference cannot tell",
                      reason="SHAPE_MISMATCH")
    return spec.dtype.name, tuple(spec.shape[1:])


def _scan_vjp_graph(b, grads, outs, *inputs, body, num_carries, num_sequences=0, length=None):
    body = _body_graph(body)
    nc, ns = num_carries, num_sequences
    _, sequences, consts = _parts(inputs, nc, ns)
    decls = list(body.inputs)
    floats = [k for k, d in enumerate(decls) if _is_float(d.dtype)]
    float_carries = [i for i in floats if i < nc]               # a carry keeps its dtype
    float_consts = [k for k in floats if k >= nc + ns]
    seeded = [j for j in range(len(outs) - nc) if grads[nc + j] is not None and b.is_float(outs[nc + j])]
    if not floats or not (float_carries or seeded):
        return (None,) * len(inputs)
    fresh = _Fresh(body)

    # the body's vjp: d/d(inputs) of S = sum(new carry_i * seed_i) + sum(output_j * seed_j)
    carry_seeds = [InputDecl(fresh(f"seed.{decls[i].name}"), decls[i].dtype, decls[i].shape) for i in float_carries]
    output_seeds = [InputDecl(fresh(f"seed.{body.outputs[nc + j]}"), *_step_spec(b, outs[nc + j])) for j in seeded]
    nodes, terms = list(body.nodes), []
    for value, seed in zip([body.outputs[i] for i in float_carries] + [body.outputs[nc + j] for j in seeded],
                           carry_seeds + output_seeds):
        product, total = fresh(f"{seed.name}.mul"), fresh(f"{seed.name}.sum")
        nodes += [Node(product, "mul", (value, seed.name)), Node(total, "sum", (product,))]
        terms.append(total)
    objective = terms[0]
    for term in terms[1:]:
        nodes.append(Node(fresh("objective"), "add", (objective, term)))
        objective = nodes[-1].name
    seeded_body = GraphIR(tuple(decls + carry_seeds + output_seeds), tuple(nodes), (objective,), dict(body.metadata))
    wrt = [decls[k].name for k in floats]
    derived, names = derive_reverse(seeded_body, b.registry, output=objective, wrt=wrt, limits=b.limits)
    d = dict(zip(floats, (names.gradients[w] for w in wrt)))

    # the reverse body: carries (seeds of the carries, running sums of the constants' gradients),
    # sequences (the steps' carries, the sequences, the outputs' seeds), the constants
    fresh = _Fresh(derived)
    sums = [InputDecl(fresh(f"sum.{decls[k].name}"), decls[k].dtype, decls[k].shape) for k in float_consts]
    added = [Node(fresh(f"sum.{decls[k].name}.next"), "add", (s.name, d[k])) for s, k in zip(sums, float_consts)]
    reverse_body = GraphIR(
        tuple(carry_seeds + sums + decls[:nc + ns] + output_seeds + decls[nc + ns:]), derived.nodes + tuple(added),
        tuple([d[i] for i in float_carries] + [n.name for n in added] + [d[k] for k in floats if nc <= k < nc + ns]),
        dict(body.metadata))

    flip = lambda v: b.op("flip", v, axes=(0,))  # noqa: E731
    steps: list[Any] = []
    if nc:  # each step's carries: the body with its carry inputs as more per-step outputs
        forward_body = GraphIR(body.inputs, body.nodes, body.outputs + tuple(d.name for d in decls[:nc]),
                               dict(body.metadata))
        steps = list(b.op("scan", *inputs, body=forward_body, num_carries=nc, num_sequences=ns,
                          length=length)[len(outs):])
    found = b.op("scan",
                 *[grads[i] if grads[i] is not None else b.zeros_like(outs[i]) for i in float_carries],
                 *[b.zeros_like(inputs[k]) for k in float_consts],
                 *map(flip, steps), *map(flip, sequences), *[flip(grads[nc + j]) for j in seeded], *consts,
                 body=reverse_body, num_carries=len(float_carries) + len(float_consts),
                 num_sequences=nc + ns + len(seeded), length=length)
    result: list[Any] = [None] * len(inputs)
    for i, g in zip(float_carries + float_consts, found):
        result[i] = g
    for k, g in zip([k for k in floats if nc <= k < nc + ns], found[len(float_carries) + len(float_consts):]):
        result[k] = flip(g)
    return tuple(result)


def _scan_jvp_graph(b, tangents, outs, *inputs, body, num_carries, num_sequences=0, length=None):
    body = _body_graph(body)
    nc, ns = num_carries, num_sequences
    decls = list(body.inputs)
    float_carries = [i for i in range(nc) if _is_float(decls[i].dtype)]
    moving = float_carries + [k for k in range(nc, len(decls)) if tangents[k] is not None]
    float_outputs = float_carries + [i for i in range(nc, len(outs)) if b.is_float(outs[i])]
    if not float_outputs:
        return (None,) * len(outs)
    fresh = _Fresh(body)

    # one value for derive_forward to follow: the float outputs, flattened and concatenated
    flat = [Node(fresh(f"flat.{body.outputs[i]}"), "reshape", (body.outputs[i],), {"shape": (-1,)})
            for i in float_outputs]
    packed = Node(fresh("packed"), "concat", tuple(n.name for n in flat), {"axis": 0})
    packed_body = GraphIR(body.inputs, body.nodes + tuple(flat) + (packed,), (packed.name,), dict(body.metadata))
    wrt = [decls[k].name for k in moving]
    derived, names = derive_forward(packed_body, b.registry, output=packed.name, wrt=wrt, limits=b.limits)

    # cut the packed tangent apart again, each piece in its output's shape and dtype
    fresh = _Fresh(derived, packed_body)
    nodes = {n.name: n for n in packed_body.nodes}
    nodes.update((n.name, n) for n in derived.nodes)
    tangent_of = {}
    for part, (i, f) in enumerate(zip(float_outputs, flat)):
        value = body.outputs[i]
        piece = Node(fresh(f"t.{value}.part"), "concat_part", (names.tangent_output, *(n.name for n in flat)),
                     {"part": part, "axis": 0})
        shaped = Node(fresh(f"t.{value}.shaped"), "reshape_like", (piece.name, value))
        cast = Node(fresh(f"t.{value}"), "broadcast_like", (shaped.name, value))   # the dtype, if concat promoted
        nodes.update((n.name, n) for n in (piece, shaped, cast))
        tangent_of[i] = cast.name
    tangent_decls = {k: InputDecl(names.tangents[decls[k].name], decls[k].dtype, decls[k].shape) for k in moving}
    blocks = [range(nc), range(nc, nc + ns), range(nc + ns, len(decls))]
    jvp_inputs = [decl for block in blocks for decl in [decls[k] for k in block] + [tangent_decls[k] for k in block
                                                                                    if k in tangent_decls]]
    float_ys = [i for i in float_outputs if i >= nc]
    jvp_outputs = (list(body.outputs[:nc]) + [tangent_of[i] for i in float_carries] + list(body.outputs[nc:])
                   + [tangent_of[i] for i in float_ys])
    jvp_body = GraphIR(tuple(jvp_inputs), tuple(nodes.values()), tuple(jvp_outputs), dict(body.metadata))

    def given(k):
        return tangents[k] if tangents[k] is not None else b.zeros_like(inputs[k])

    args = [x for block in blocks for x in [inputs[k] for k in block] + [given(k) for k in block if k in tangent_decls]]
    found = b.op("scan", *args, body=jvp_body, num_carries=nc + len(float_carries),
                 num_sequences=ns + len([k for k in moving if nc <= k < nc + ns]), length=length)
    result: list[Any] = [None] * len(outs)
    for i, t in zip(float_carries, found[nc:nc + len(float_carries)]):
        result[i] = t
    for i, t in zip(float_ys, found[nc + len(float_carries) + len(outs) - nc:]):
        result[i] = t
    return tuple(result)


def _scan_sample(rng: np.random.Generator) -> tuple[list[np.ndarray], dict[str, Any]]:
    """A body of wiring only (it needs no other operator, so no registry): the new carry is the
    slice, the per-step outputs the previous carry and the constant. What the gradient checker
    sees is scan's own work: slicing, carrying, stacking, and summing the constant over steps.
    Bodies of real operators are checked against unrolled graphs in tests/test_scan.py."""
    steps, size = int(rng.integers(1, 4)), int(rng.integers(1, 3))
    body = GraphIR.build([("h", "float64", (size,)), ("x", "float64", (size,)), ("c", "float64", (size,))], [],
                         ["x", "h", "c"])
    inputs = [rng.standard_normal(size), rng.standard_normal((steps, size)), rng.standard_normal(size)]
    return inputs, {"body": compile_graph(body, Registry()), "num_carries": 1, "num_sequences": 1}


def _scan_outputs(attrs: dict[str, Any]) -> int:
    return len(attrs["body"].outputs)


OPERATORS: list[OpDef] = [
    OpDef("scan", -1, _scan, _scan_vjp, _scan_infer,
          attrs={"body": Attr("graph", doc="the step: inputs (carries, slices, constants) -> outputs (new carries, "
                                           "per-step outputs)"),
                 "num_carries": Attr("int", doc="how many of the node's first inputs are carries"),
                 "num_sequences": Attr("int", 0, "how many inputs after the carries are sequences (sliced on axis 0)"),
                 "length": Attr("int", None, "the number of steps, when there are no sequences")},
          doc="Run a body graph once per step (jax.lax.scan): final carries, then per-step outputs stacked on axis 0.",
          n_outputs=_scan_outputs, residuals=True, sample=_scan_sample, inner_shapes=_scan_inner_shapes,
          cost=_scan_cost),
]

SYMBOLIC = {
    #  name:          (vjp_graph,                  jvp_graph)
    "scan":           (_scan_vjp_graph,            _scan_jvp_graph),
}

OPERATORS = with_symbolic(OPERATORS, SYMBOLIC)

register_operators = table_hookimpl(OPERATORS)
