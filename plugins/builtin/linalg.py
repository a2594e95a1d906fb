"""Linear algebra: matmul with numpy's batching rules, transpose, and einsum.

matmul follows ``np.matmul``: a 1-D first input is a row vector and a 1-D
second input a column vector (the added axis is dropped from the result), and
leading "batch" axes broadcast. Its vjp promotes 1-D inputs to 2-D, computes
``g @ bᵀ`` and ``aᵀ @ g``, and drops the added axis again; gradients keep the
broadcast batch axes, which the engine sums back to each input's shape.

einsum takes numpy's subscripts (explicit ``->`` output or implicit, ``...``,
repeated subscripts for diagonals and traces). The gradient of each input is
another einsum: of ``g`` and the other inputs, with that input's subscripts as
the output (see ``_einsum_vjp``).
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Callable, NamedTuple

import numpy as np
from numpy.lib.stride_tricks import as_strided

from chainrule.core import VARIADIC, Attr, GraphError, OpDef, OpError, TensorSpec, broadcast_shapes
from chainrule.core.symbolic import with_symbolic
from chainrule.plugins.authoring import table_hookimpl

from .common import block_operations, matmul, stop_check, summed_matmul


# --- matmul ----------------------------------------------------------------------------------

def _matmul_infer(a: TensorSpec, b: TensorSpec) -> TensorSpec:
    if not a.shape or not b.shape:
        raise OpError(f"matmul needs inputs with at least one axis, got shapes {a.shape} and {b.shape}",
                      reason="SHAPE_MISMATCH")
    inner_a = a.shape[-1]
    inner_b = b.shape[-2] if len(b.shape) > 1 else b.shape[0]
    if inner_a != inner_b:
        raise OpError(f"inner dimensions {inner_a} and {inner_b} do not match (shapes {a.shape} and {b.shape})",
                      reason="SHAPE_MISMATCH")
    try:
        batch = broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except OpError:
        raise OpError(f"batch dimensions {a.shape[:-2]} and {b.shape[:-2]} cannot be broadcast together "
                      f"(shapes {a.shape} and {b.shape})", reason="SHAPE_MISMATCH") from None
    rows = a.shape[-2:-1]                          # () for a 1-D first input
    cols = b.shape[-1:] if len(b.shape) > 1 else ()  # () for a 1-D second input
    return TensorSpec(batch + rows + cols, np.result_type(a.dtype, b.dtype))


def _matmul_vjp(g, out, a, b, *, needs=(True, True)):
    """``g @ bᵀ`` and ``aᵀ @ g``; ``needs`` (from the engine) skips a product nobody wants, e.g. for a data batch.
    Large products run in blocks with stop checks (common.matmul, summed_matmul), like the forward."""
    if a.ndim == 1 and b.ndim == 1:                 # vector · vector: out is a scalar
        return (g * b if needs[0] else None), (g * a if needs[1] else None)
    if a.ndim == 2 and b.ndim == 2:                 # matrix · matrix (a dense layer's product): at once
        return (matmul(g, b.T) if needs[0] else None), (matmul(a.T, g) if needs[1] else None)
    a2 = a[np.newaxis, :] if a.ndim == 1 else a     # row vector (1, k)
    b2 = b[:, np.newaxis] if b.ndim == 1 else b     # column vector (k, 1)
    g2 = np.expand_dims(g, -2) if a.ndim == 1 else g
    g2 = np.expand_dims(g2, -1) if b.ndim == 1 else g2
    da = db = None
    if needs[0]:
        da = summed_matmul(g2, np.swapaxes(b2, -1, -2), a2.shape[:-2])
        da = da[..., 0, :] if a.ndim == 1 else da   # drop the added row axis
    if needs[1] and b.ndim == 2 and a.ndim > 2 and a.flags.c_contiguous and g.flags.c_contiguous:
        # a batch times one matrix (a dense layer): one product, no (batch, k, n) temporary
        db = matmul(a.reshape(-1, a.shape[-1]).T, g.reshape(-1, g.shape[-1]))
    elif needs[1]:
        db = summed_matmul(np.swapaxes(a2, -1, -2), g2, b2.shape[:-2])
        db = db[..., 0] if b.ndim == 1 else db      # drop the added column axis
    return da, db


def _matmul_cost(a: TensorSpec, b: TensorSpec) -> float:
    """Floating-point operations: a multiply and an add per output element per term of its sum."""
    return 2.0 * math.prod(_matmul_infer(a, b).shape) * (a.shape[-1] if a.shape else 1)


def _matmul_sample(rng: np.random.Generator):
    shapes = [((3,), (3,)), ((2, 3), (3,)), ((3,), (3, 2)), ((2, 3), (3, 4)),
              ((2, 2, 3), (3, 2)), ((3,), (2, 3, 2)), ((2, 1, 2, 3), (3, 3, 2))]
    a, b = shapes[rng.integers(len(shapes))]
    return [rng.standard_normal(a), rng.standard_normal(b)], {}


# --- transpose -------------------------------------------------------------------------------

def _permutation(ndim: int, axes: tuple[int, ...] | None) -> tuple[int, ...]:
    if axes is None:
        return tuple(reversed(range(ndim)))
    perm = tuple(a + ndim if a < 0 else a for a in axes)
    if sorted(perm) != list(range(ndim)):
        raise OpError(f"axes {list(axes)} are not a permutation of the {ndim} axes of the input",
                      reason="BAD_ATTRIBUTE", field="attrs.axes")
    return perm


def _transpose_infer(x: TensorSpec, *, axes: Any = None) -> TensorSpec:
    perm = _permutation(len(x.shape), axes)
    return TensorSpec(tuple(x.shape[p] for p in perm), x.dtype)


def _transpose_sample(rng: np.random.Generator):
    axes = [None, (1, 0, 2), (2, 0, 1), (-1, 0, 1)][rng.integers(4)]
    return [rng.standard_normal((2, 3, 4))], {"axes": axes}


# --- einsum ----------------------------------------------------------------------------------
#
# The equation is parsed once per (equation, input shapes) into integer labels, numpy's sublist
# form: letters keep their ASCII order (A-Z are 0-25, a-z 26-51, so the implicit output sorts as
# numpy's does); an ellipsis becomes fresh labels, right-aligned across operands as numpy
# broadcasts them; and a size-1 axis broadcast against a larger one of the same label becomes a
# label of its own, so no contraction below ever broadcasts and each gradient keeps its operand's
# shape.

_LABELS = 52   # numpy's einsum takes at most 52 distinct labels


def _label(char: str) -> int:
    return ord(char) - ord("A") if char <= "Z" else ord(char) - ord("a") + 26


def _shown(equation: str) -> str:
    """The equation for a message, cut short: a refusal must fit in gRPC's 8 KiB of trailers."""
    return repr(equation) if len(equation) <= 80 else f"{equation[:60]!r}... ({len(equation)} characters)"


def _bad_equation(message: str) -> OpError:
    return OpError(message, reason="BAD_ATTRIBUTE", field="attrs.equation")


@lru_cache(maxsize=1024)
def _parse_equation(equation: str) -> tuple[tuple[tuple[Any, ...], ...], tuple[Any, ...] | None]:
    """The syntax alone: each operand's subscripts (ints, and ``...`` as Ellipsis) and the output's
    (None: implicit form, no ``->``)."""
    text = "".join(equation.split())                      # numpy ignores whitespace
    lhs, arrow, rhs = text.partition("->")
    if any(c in part for c in "->" for part in (lhs, rhs)):
        raise _bad_equation(f"equation {_shown(equation)}: '-' and '>' may only appear together, once, as '->'")

    def term(part: str, what: str) -> tuple[Any, ...]:
        labels: list[Any] = []
        k = 0
        while k < len(part):
            if part.startswith("...", k):
                if Ellipsis in labels:
                    raise _bad_equation(f"equation {_shown(equation)}: {what} has more than one ellipsis '...'")
                labels.append(Ellipsis)
                k += 3
                continue
            char, k = part[k], k + 1
            if char == ".":
                raise _bad_equation(f"equation {_shown(equation)}: {what} has a '.' that is not part of an ellipsis '...'")
            if not ("a" <= char <= "z" or "A" <= char <= "Z"):
                raise _bad_equation(f"equation {_shown(equation)}: {what} has {char!r}; subscripts are the letters a-z, A-Z")
            labels.append(_label(char))
        return tuple(labels)

    operands = tuple(term(part, f"operand {i}") for i, part in enumerate(lhs.split(",")))
    if not arrow:
        return operands, None
    output = term(rhs, "the output")
    seen: set[int] = set()
    for label in output:
        if label is not Ellipsis and label in seen:
            raise _bad_equation(f"equation {_shown(equation)}: the output repeats subscript {_char(label)!r}")
        seen.add(label)
    used = {label for labels in operands for label in labels}
    missing = [label for label in output if label is not Ellipsis and label not in used]
    if missing:
        raise _bad_equation(f"equation {_shown(equation)}: output subscript {_char(missing[0])!r} is in no operand")
    return operands, output


def _char(label: int) -> str:
    return chr(ord("A") + label) if label < 26 else chr(ord("a") + label - 26)


class _Einsum(NamedTuple):
    """An equation fitted to its input shapes: integer labels for each operand and the output."""

    operands: tuple[tuple[int, ...], ...]
    output: tuple[int, ...]
    sizes: dict
    shape: tuple[int, ...]
    #: Product of all label sizes: the work of a direct (unoptimized) contraction.
    work: int


@lru_cache(maxsize=1024)
def _fit_equation(equation: str, shapes: tuple[tuple[int, ...], ...]) -> _Einsum:
    parsed, output = _parse_equation(equation)
    if len(parsed) != len(shapes):
        raise _bad_equation(f"equation {_shown(equation)} has {len(parsed)} operand{'s' if len(parsed) != 1 else ''} "
                            f"but {len(shapes)} input{'s are' if len(shapes) != 1 else ' is'} given")
    letters = {label for labels in parsed for label in labels if label is not Ellipsis}
    free = (label for label in range(_LABELS) if label not in letters)
    # ellipsis: each operand's own rank, right-aligned against the longest
    ranks = []
    for i, (labels, shape) in enumerate(zip(parsed, shapes)):
        named = len(labels) - (Ellipsis in labels)
        if Ellipsis not in labels and len(shape) != named or len(shape) < named:
            raise OpError(f"equation {_shown(equation)}: operand {i} has {named} subscript{'s' if named != 1 else ''} "
                          f"but input {i} has shape {list(shape)}"
                          + ("" if Ellipsis in labels else " (use '...' for extra leading axes)"),
                          reason="SHAPE_MISMATCH")
        ranks.append(len(shape) - named if Ellipsis in labels else 0)
    broadcast_rank = max(ranks, default=0)
    if output is not None and Ellipsis not in output and broadcast_rank:
        raise OpError(f"equation {_shown(equation)}: the '...' axes of the inputs have no '...' in the output",
                      reason="SHAPE_MISMATCH")
    try:
        ellipsis = [next(free) for _ in range(broadcast_rank)]
    except StopIteration:
        raise _bad_equation(f"equation {_shown(equation)}: needs more than {_LABELS} distinct subscripts") from None
    operands = []
    for labels, rank in zip(parsed, ranks):
        expanded: list[int] = []
        for label in labels:
            expanded.extend(ellipsis[broadcast_rank - rank:] if label is Ellipsis else [label])
        operands.append(expanded)
    # sizes: repeated labels within an operand must agree; across operands numpy broadcasts size 1
    sizes: dict[int, int] = {}
    for i, (labels, shape) in enumerate(zip(operands, shapes)):
        own: dict[int, int] = {}
        for label, size in zip(labels, shape):
            if own.setdefault(label, size) != size:
                raise OpError(f"equation {_shown(equation)}: operand {i} repeats subscript {_char(label)!r} on axes "
                              f"of sizes {own[label]} and {size} (shape {list(shape)})", reason="SHAPE_MISMATCH")
        for label, size in own.items():
            if sizes.get(label, 1) != 1 and size not in (1, sizes[label]):
                what = "the '...' axes have" if label in ellipsis else f"subscript {_char(label)!r} has"
                raise OpError(f"equation {_shown(equation)}: {what} sizes {sizes[label]} and {size} in the inputs "
                              f"{[list(s) for s in shapes]}", reason="SHAPE_MISMATCH")
            if sizes.get(label, 1) == 1:                  # else size is 1 or the same
                sizes[label] = size
    if output is None:
        counts: dict[int, int] = {}
        for labels in parsed:
            for label in labels:
                if label is not Ellipsis:
                    counts[label] = counts.get(label, 0) + 1
        out = ellipsis + sorted(label for label, n in counts.items() if n == 1)
    else:
        out = []
        for label in output:
            out.extend(ellipsis if label is Ellipsis else [label])
    # a size-1 axis broadcast against a larger one: a label of its own (summed over, a single term)
    try:
        for labels, shape in zip(operands, shapes):
            renamed: dict[int, int] = {}
            for k, (label, size) in enumerate(zip(labels, shape)):
                if size == 1 and sizes[label] != 1:
                    labels[k] = renamed.setdefault(label, next(free))
                    sizes[labels[k]] = 1
    except StopIteration:
        raise _bad_equation(f"equation {_shown(equation)}: needs more than {_LABELS} distinct subscripts") from None
    work = math.prod(sizes.values())
    return _Einsum(tuple(tuple(labels) for labels in operands), tuple(out), sizes,
                   tuple(sizes[label] for label in out), work)


def _contract(operands: list, labels: list, output: list, work: int):
    """np.einsum in sublist form; numpy's path optimizer (BLAS for pairs) once the work is worth it.
    Work of more than a block, in a run that can be stopped, goes in blocks (see _blocked)."""
    optimize = len(operands) > 1 and work > 4096
    blas = all(np.result_type(x).kind == "f" for x in operands)
    check = stop_check() if 2.0 * work > block_operations(blas) else None
    if check is not None:
        blocked = _blocked(operands, labels, output, work, optimize, check, block_operations(blas))
        if blocked is not None:
            return blocked
    args = [item for pair in zip(operands, labels) for item in pair]
    return np.einsum(*args, list(output), optimize=optimize)


def _blocked(operands: list, labels: list, output: list, work: int, optimize: bool,
             check: Callable[[], None], per_block: float) -> Any:
    """The contraction computed in slices of one output label (the first that each operand holds at
    most once), each about a block's work, with a stop check before each; None when no label allows
    it (a full contraction, or a label repeated within an operand)."""
    label = next((lab for lab in output if output.count(lab) == 1 and all(ls.count(lab) <= 1 for ls in labels)),
                 None)
    holders = [ls.index(label) if label in ls else None for ls in labels] if label is not None else []
    size = next((np.shape(x)[axis] for x, axis in zip(operands, holders) if axis is not None), 1)
    if label is None or size < 2:
        return None
    step = max(1, int(size * per_block // (2.0 * work)))
    at = output.index(label)
    result = None
    for start in range(0, size, step):
        check()
        part = slice(start, min(start + step, size))
        sliced = [x if axis is None else x[(slice(None),) * axis + (part,)] for x, axis in zip(operands, holders)]
        args = [item for pair in zip(sliced, labels) for item in pair]
        piece = np.einsum(*args, list(output), optimize=optimize)
        if result is None:
            shape = list(np.shape(piece))
            shape[at] = size
            result = np.empty(shape, np.result_type(piece))
        result[(slice(None),) * at + (part,)] = piece
    return result


def _einsum_infer(*xs: TensorSpec, equation: str) -> TensorSpec:
    fitted = _fit_equation(equation, tuple(tuple(x.shape) for x in xs))
    dtype = np.result_type(*(x.dtype for x in xs))
    if dtype == np.bool_:
        raise OpError("all inputs are bool; einsum sums products and needs an int or float input",
                      reason="DTYPE_MISMATCH")
    return TensorSpec(fitted.shape, dtype)


def _einsum_cost(*xs: TensorSpec, equation: str) -> float:
    """Floating-point operations: a multiply and an add for every combination of the labels' values."""
    return 2.0 * _fit_equation(equation, tuple(tuple(x.shape) for x in xs)).work


def _einsum(*xs, equation: str):
    fitted = _fit_equation(equation, tuple(np.shape(x) for x in xs))
    return _contract(list(xs), list(fitted.operands), list(fitted.output), fitted.work)


def _einsum_vjp(g, out, *xs, equation: str, needs=None):
    """Input i's gradient is the einsum of g and the other inputs, with i's subscripts as the output.

    Labels of i that appear nowhere else (summed over i alone) are broadcast afterwards; a label
    repeated within i (a diagonal, a trace) is computed once and written into that diagonal of a
    zero array, every position off the diagonal having gradient 0.
    """
    fitted = _fit_equation(equation, tuple(np.shape(x) for x in xs))
    grads: list[Any] = []
    for i, x in enumerate(xs):
        if needs is not None and not needs[i]:
            grads.append(None)
            continue
        own = fitted.operands[i]
        unique = list(dict.fromkeys(own))                  # first appearance order
        others = [j for j in range(len(xs)) if j != i]
        present = set(fitted.output).union(*(fitted.operands[j] for j in others))
        kept = [label for label in unique if label in present]
        grad = _contract([g, *(xs[j] for j in others)], [list(fitted.output), *(list(fitted.operands[j]) for j in others)],
                         kept, fitted.work)
        grad = np.asarray(grad)
        if len(kept) < len(unique):                        # labels of x alone: d/dx of a sum over them is 1
            grad = grad.reshape([fitted.sizes[label] if label in present else 1 for label in unique])
            grad = np.broadcast_to(grad, [fitted.sizes[label] for label in unique])
        if len(unique) < len(own):                         # a diagonal: the gradient lives on it only
            full = np.zeros(np.shape(x), grad.dtype)
            strides = [sum(full.strides[k] for k, label in enumerate(own) if label == u) for u in unique]
            as_strided(full, grad.shape, strides)[...] = grad
            grad = full
        grads.append(grad)
    return tuple(grads)


def _einsum_sample(rng: np.random.Generator):
    equation, shapes = [
        ("ij,jk->ik", [(2, 3), (3, 4)]),
        ("ij,jk", [(2, 3), (3, 2)]),
        ("bij,bjk->bik", [(2, 2, 3), (2, 3, 2)]),
        ("...ij,...jk->...ik", [(2, 1, 2, 3), (3, 3, 2)]),
        ("ii->", [(3, 3)]),
        ("ii->i", [(3, 3)]),
        ("i,j->ij", [(3,), (4,)]),
        ("ij,ij->i", [(1, 3), (2, 3)]),
        ("ijk->kj", [(2, 3, 4)]),
        ("ij,jk,kl->il", [(2, 3), (3, 2), (2, 2)]),
        ("iij,j->i", [(2, 2, 3), (3,)]),
    ][rng.integers(11)]
    return [rng.standard_normal(shape) for shape in shapes], {"equation": equation}


# --- the table -------------------------------------------------------------------------------

OPERATORS: list[OpDef] = [
    OpDef("matmul", 2, matmul, _matmul_vjp, _matmul_infer,
          doc="Matrix product with numpy's rules: 1-D vectors, broadcast batch axes.", sample=_matmul_sample,
          selective_vjp=True, cost=_matmul_cost),
    OpDef("transpose", 1,
          lambda x, *, axes=None: np.transpose(x, _permutation(np.ndim(x), axes)),
          lambda g, out, x, *, axes=None: (np.transpose(g, np.argsort(_permutation(np.ndim(x), axes))),),
          _transpose_infer,
          attrs={"axes": Attr("ints", None, "the new order of the axes (negative allowed); none: reversed")},
          doc="Permute the axes (reverse them by default).", sample=_transpose_sample),
    OpDef("einsum", VARIADIC, _einsum, _einsum_vjp, _einsum_infer, cost=_einsum_cost,
          attrs={"equation": Attr("string", doc="numpy's subscripts: 'ij,jk->ik', implicit 'ij,jk', '...' for "
                                                "broadcast axes, repeated subscripts for diagonals")},
          doc="Einstein summation over one or more inputs, with numpy's np.einsum subscripts.",
          sample=_einsum_sample, selective_vjp=True),
]


# --- symbolic rules (docs/derivatives.md): the gradients as graphs of registered operators. Ranks are
# static (shape inference knows them); batch axes a gradient gains by broadcasting are summed back by the
# deriver (sum_to). einsum's gradient for an input is an einsum of g, the other inputs and constant ones
# vectors and identity matrices (for subscripts of the input alone, and for diagonals), with that input's
# subscripts as the output. ------------------------------------------------------------------------------

def _rank(b, x) -> int:
    spec = b.spec(x)
    if spec is None:
        raise GraphError(f"{b.rule}the rank of '{x.name}' cannot be inferred (declare the graph's input shapes)",
                         node=x.name)
    return len(spec.shape)


def _swap_last(b, x, rank: int):
    return b.op("transpose", x, axes=list(range(rank - 2)) + [rank - 1, rank - 2])


_BATCH = "zyxwvutsrqponml"   # subscripts for batch axes (matmul's own are a..k)


def _matmul_vjp_graph(b, g, out, a, c):
    ra, rc = _rank(b, a), _rank(b, c)
    if ra == 1 and rc == 1:                          # a dot product: out is a scalar
        return g * c, g * a
    if ra == 1:                                      # a (k), c (... k n), out (... n)
        return (b.op("einsum", g, c, equation="...n,...kn->...k"),
                b.op("einsum", g, a, equation="...n,k->...kn"))
    if rc == 1:                                      # a (... m k), c (k), out (... m)
        return (b.op("einsum", g, c, equation="...m,k->...mk"),
                b.op("einsum", g, a, equation="...m,...mk->...k"))
    da = b.op("matmul", g, _swap_last(b, c, rc))
    if rc == 2 and ra > 2:                           # a batch times one matrix (a dense layer): one contraction
        batch = _BATCH[:ra - 2]
        dc = b.op("einsum", a, g, equation=f"{batch}mk,{batch}mn->kn")
    else:
        dc = b.op("matmul", _swap_last(b, a, ra), g)
    return da, dc


def _matmul_jvp_graph(b, tangents, out, a, c):
    ta, tc = tangents
    return b.add_tangents(None if ta is None else b.op("matmul", ta, c), None if tc is None else b.op("matmul", a, tc))


def _transpose_vjp_graph(b, g, out, x, *, axes=None):
    if axes is None:                                 # reversing the axes is its own inverse
        return (b.op("transpose", g),)
    perm = [a % len(axes) for a in axes]
    return (b.op("transpose", g, axes=[int(k) for k in np.argsort(perm)]),)


def _transpose_jvp_graph(b, tangents, out, x, *, axes=None):
    return b.op("transpose", tangents[0], axes=None if axes is None else list(axes))


def _subscripts(labels) -> str:
    return "".join("..." if label is Ellipsis else _char(label) for label in labels)


def _einsum_terms(equation: str):
    """Each operand's subscripts and the output's, the output made explicit (numpy's implicit form: the
    ellipsis, then the subscripts used once, in alphabetical order)."""
    operands, output = _parse_equation(equation)
    if output is None:
        counts: dict[int, int] = {}
        for labels in operands:
            for label in labels:
                if label is not Ellipsis:
                    counts[label] = counts.get(label, 0) + 1
        ellipsis = (Ellipsis,) if any(Ellipsis in labels for labels in operands) else ()
        output = ellipsis + tuple(sorted(label for label, n in counts.items() if n == 1))
    return operands, output


def _einsum_vjp_graph(b, g, out, *xs, equation: str):
    """Input i's gradient: one einsum of g, the other inputs and constants, with i's subscripts as the
    output: a ones vector for a subscript of i alone (the gradient is broadcast along it) and an identity
    matrix tying each repeated subscript to a fresh one (the gradient lives on the diagonal). Those two
    need the axis' size statically; where it varies, a subscript of i alone is put back with unreduce."""
    operands, output = _einsum_terms(equation)
    used = {label for labels in operands for label in labels if label is not Ellipsis}
    free = [label for label in range(_LABELS) if label not in used]
    grads = []
    for i, x in enumerate(xs):
        own = operands[i]
        others = [j for j in range(len(xs)) if j != i]
        present = set(output).union(*(operands[j] for j in others))
        spec = b.spec(x)
        rank = len(spec.shape) if spec is not None else None
        terms = [_subscripts(output)] + [_subscripts(operands[j]) for j in others]
        refs = [g] + [xs[j] for j in others]
        target: list = []
        alone: list[int] = []                       # positions of subscripts of x alone (no static size)
        seen: set = set()
        fresh = iter(free)
        position = 0
        for label in own:
            if label is Ellipsis:
                target.append(Ellipsis)
                position += (rank - (len(own) - 1)) if rank is not None else 0
                continue
            size = spec.shape[position] if spec is not None else -1
            if label in seen:                       # a diagonal: x's gradient is zero off it
                if size < 0:
                    raise GraphError(f"{b.rule}einsum {equation!r} repeats a subscript of input {i} on an axis of "
                                     f"varying size; declare the input's shape", node=x.name)
                twin = next(fresh)
                terms.append(_subscripts((label, twin)))
                refs.append(b.const(np.eye(size, dtype=spec.dtype)))
                target.append(twin)
            elif label not in present:              # summed over x alone: the gradient is broadcast along it
                if size < 0:
                    alone.append(position)
                else:
                    terms.append(_subscripts((label,)))
                    refs.append(b.const(np.ones(size, dtype=spec.dtype)))
                    target.append(label)
            else:
                target.append(label)
            seen.add(label)
            position += 1
        if alone and len(set(label for label in own if label is not Ellipsis)) < len(own) - (Ellipsis in own):
            raise GraphError(f"{b.rule}einsum {equation!r}: input {i} has a diagonal and an axis of varying size "
                             f"summed over it alone; declare the input's shape", node=x.name)
        if Ellipsis not in target and any(Ellipsis in labels for labels in [output, *(operands[j] for j in others)]):
            # x has no broadcast axes but the others do (a vector times a batch of matrices): keep them in
            # the gradient, whose broadcast shape the deriver sums back to x's (sum_to)
            if alone:
                raise GraphError(f"{b.rule}einsum {equation!r}: input {i} is broadcast against the others and "
                                 f"has an axis of varying size summed over it alone; declare the input's shape",
                                 node=x.name)
            target.insert(0, Ellipsis)
        grad = b.op("einsum", *refs, equation=f"{','.join(terms)}->{_subscripts(target)}")
        if alone:
            grad = b.op("unreduce", grad, x, axis=alone)
        grads.append(grad)
    return tuple(grads)


def _einsum_jvp_graph(b, tangents, out, *xs, equation: str):
    terms = [b.op("einsum", *xs[:i], t, *xs[i + 1:], equation=equation) for i, t in enumerate(tangents) if t is not None]
    return b.add_tangents(*terms)


SYMBOLIC = {
    #  name:      (vjp_graph,             jvp_graph)
    "matmul":     (_matmul_vjp_graph,     _matmul_jvp_graph),
    "transpose":  (_transpose_vjp_graph,  _transpose_jvp_graph),
    "einsum":     (_einsum_vjp_graph,     _einsum_jvp_graph),
}

OPERATORS = with_symbolic(OPERATORS, SYMBOLIC)

register_operators = table_hookimpl(OPERATORS)
