"""Straight-line programs: a small plan's forward and backward passes written out as Python code.

The engine's loops (core/engine.py) decide per node and per run what a fixed plan already
knows: the node's arity, the kind of its vjp, which inputs want a gradient, whether a buffer
may be written over, whether a stop check is due. On small values those decisions cost as
much as the numpy calls themselves (a 32x4 MLP: about 40 of 84 us). For a plan specialised
to its input shapes, with its output and wanted gradients fixed, this module writes the two
passes out once as one function, node by node, every rule, attribute, spec and gradient edge
bound as a constant, and compiles it; a run is then the rules' calls and the checks of what
they return, in the loops' order, so the results are the same bits.

Only plans whose every value is small (under SMALL_ELEMENTS elements, where the loops would
reuse no buffer, run no node in blocks and need no extra stop check) and whose operators are
plain (no residuals, no several values) get one; the rest, and plans of more than
MAX_SLOTS slots (whose code would take long to compile), take the loops. A program is
built on a combination's second run: a one-off call never pays for it. It is the JIT of
PyTorch's TorchScript or JAX's ``jit`` on a small scale, without tracing: the plan is the trace.
"""
from __future__ import annotations

import ast
import re
from typing import Any, Callable

import numpy as np

from .compile import Plan, Shapes, nested_error, node_error
from .errors import ChainruleError, OpError, OperatorFailure
from .rule_checks import contract, failure, fit_grad, fit_value

#: Values with at least this many elements take the engine's loops (its REUSE_MIN_ELEMENTS: below
#: it no buffer is reused, no node runs in blocks and no node needs a stop check of its own).
SMALL_ELEMENTS = 1 << 14

#: Plans with more slots take the loops: compiling their code would cost more than it saves soon.
MAX_SLOTS = 2000

#: A combination of shapes, output, wanted gradients and gradients on/off gets its program on its
#: run after this many: the first run of anything takes the loops.
RUNS_BEFORE_BUILDING = 1

#: Combinations kept per Shapes (counted or built); others take the loops.
MAX_COMBINATIONS = 16

#: What Shapes.programs holds for a combination that cannot have a program.
_NONE = "none"

Program = Callable[[list[Any], Any, Any], tuple[list[Any], list[Any] | None]]


def program_for(plan: Plan, shapes: Shapes, out_slot: int, wanted: frozenset[int] | None,
                edges: list[tuple[tuple[int, int], ...]] | None) -> Program | None:
    """The straight-line program of this combination (``edges``: the gradient edges the backward
    pass follows, None for forward only), built on its second run; None when it takes the loops.
    Called as ``program(arrays, seed, token)``: the inputs in slot order, a function giving the
    output's seed (called after the forward pass, whose errors come first) and the stop token (or
    None); gives (values, grads), grads None when ``edges`` is."""
    key = (out_slot, wanted, edges is not None)
    programs = shapes.programs
    known = programs.get(key)
    if known is None:  # a first run: counted, while there is room (a small fixed set per shapes)
        if len(programs) < MAX_COMBINATIONS:
            programs[key] = 1
        return None
    if type(known) is int:
        if known < RUNS_BEFORE_BUILDING:
            programs[key] = known + 1
            return None
        known = programs[key] = _build(plan, shapes, out_slot, edges) if _eligible(plan, shapes) else _NONE
    return None if known is _NONE else known  # (a race only builds twice)


def _eligible(plan: Plan, shapes: Shapes) -> bool:
    """Whether a plan with these shapes may run as a program (see the module's docstring)."""
    if len(plan.names) > MAX_SLOTS or not shapes.complete or any(plan.unpacked):
        return False
    if any(op is None for op in plan.ops[plan.n_inputs:]):
        return False
    return all(spec.size < SMALL_ELEMENTS for spec in shapes.specs)


def _build(plan: Plan, shapes: Shapes, out_slot: int, edges: list[tuple[tuple[int, int], ...]] | None) -> Program:
    """Write the program's source, compile it, and return its function."""
    constants: dict[str, Any] = {
        "ndarray": np.ndarray, "plan": plan, "fit_value": fit_value, "fit_grad": fit_grad,
        "forward_error": _forward_error(plan), "vjp_error": _vjp_error(plan), "miscounted": _miscounted(plan),
    }
    n = len(plan.names)
    lines = ["def program(arrays, seed, token):"]
    inputs = ", ".join(f"v{k}" for k in range(plan.n_inputs))
    lines.append(f"    {inputs}{',' if plan.n_inputs == 1 else ''} = arrays" if plan.n_inputs else "    pass")
    for k in range(plan.n_inputs, n):
        _forward_node(plan, shapes, k, lines, constants)
    values = "[" + ", ".join(f"v{k}" for k in range(n)) + "]"
    if edges is None:
        lines.append(f"    return {values}, None")
    else:
        reached = _backward(plan, shapes, out_slot, edges, lines, constants)
        grads = "[" + ", ".join(f"g{k}" if reached[k] else "None" for k in range(n)) + "]"
        lines.append(f"    return {values}, {grads}")
    source = "\n".join(lines) + "\n"
    code = compile(_checked(source, constants), f"<chainrule program: {len(plan.names)} slots>", "exec")
    exec(code, constants)  # noqa: S102 - our own source, written from slot numbers and axes (see _checked)
    return constants["program"]


#: The names a program's source may use besides its constants: its own function, arguments and locals.
_LOCAL_NAME = re.compile(r"(program|arrays|seed|token|exc|p|q|type|len|Exception|[vg]\d+)")


def _checked(source: str, constants: dict[str, Any]) -> str:
    """``source`` once it is known to hold nothing a request wrote: a request's text (node names,
    operator names, attribute values) reaches a program only through ``constants``, never its
    source, which is written from slot numbers and axes. Any string or bytes literal, or a name
    that is neither a constant nor one of the program's locals, fails (a bug here, not the caller's)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)):
            raise AssertionError(f"a program's source holds a literal {node.value!r}")
        if isinstance(node, ast.Name) and node.id not in constants and not _LOCAL_NAME.fullmatch(node.id):
            raise AssertionError(f"a program's source uses an unknown name {node.id!r}")
    return source


def _check(name: str, spec_key: str) -> str:
    """The test that a rule's result ``name`` does not fit its spec as it comes (as engine._forward tests)."""
    return (f"(({name}.shape != S{spec_key} or {name}.dtype != D{spec_key}) if type({name}) is ndarray "
            f"else type({name}) is not C{spec_key})")


def _bind_spec(shapes: Shapes, k: int, constants: dict[str, Any]) -> None:
    constants[f"S{k}"] = shapes.shape_of[k]
    constants[f"D{k}"] = shapes.dtype_of[k]
    constants[f"C{k}"] = shapes.scalar_type[k]
    constants[f"SPEC{k}"] = shapes.specs[k]


def _call(rule: str, k: int, arguments: list[str], plan: Plan, constants: dict[str, Any]) -> str:
    """The call of node k's rule (``f`` forward, ``b`` vjp) on ``arguments``, with its attributes."""
    if plan.attrs[k]:
        constants[f"a{k}"] = plan.attrs[k]
        arguments = [*arguments, f"**a{k}"]
    return f"{rule}{k}({', '.join(arguments)})"


def _forward_node(plan: Plan, shapes: Shapes, k: int, lines: list[str], constants: dict[str, Any]) -> None:
    constants[f"f{k}"] = plan.forwards[k]
    _bind_spec(shapes, k, constants)
    if not k & 7:  # every eighth node, as the loop checks
        lines.append("    if token is not None: token.check()")
    call = _call("f", k, [f"v{j}" for j in plan.in_slots[k]], plan, constants)
    lines += [
        "    try:",
        f"        v{k} = {call}",
        "    except Exception as exc:",
        f"        raise forward_error({k}, exc)",
        f"    if {_check(f'v{k}', str(k))}:",
        f"        v{k} = fit_value(plan, {k}, v{k}, SPEC{k})",
    ]


def _backward(plan: Plan, shapes: Shapes, out_slot: int, edges: list[tuple[tuple[int, int], ...]],
              lines: list[str], constants: dict[str, Any]) -> list[bool]:
    """Write the backward pass from ``out_slot``; gives, per slot, whether a gradient may reach it."""
    reached = [False] * len(plan.names)
    reached[out_slot] = True
    for k in range(out_slot, plan.n_inputs - 1, -1):
        if reached[k]:
            for _, j in edges[k]:
                reached[j] = True
    waiting = [f"g{j} = None" for j in range(len(plan.names)) if reached[j] and j != out_slot]
    if waiting:
        lines.append("    " + "; ".join(waiting))
    lines.append(f"    g{out_slot} = seed()  # after the forward pass, as the loops make it")
    for k in range(out_slot, plan.n_inputs - 1, -1):
        if not reached[k] or not edges[k]:
            continue
        s = plan.in_slots[k]
        constants[f"b{k}"] = plan.vjps[k]
        arguments = [f"g{k}", f"v{k}", *(f"v{j}" for j in s)]
        if plan.plain_selective[k]:  # tell the rule which gradients are wanted
            wanted = {pos for pos, _ in edges[k]}
            constants[f"N{k}"] = tuple(pos in wanted for pos in range(len(s)))
            arguments.append(f"needs=N{k}")
        call = _call("b", k, arguments, plan, constants)
        lines.append(f"    if g{k} is not None:")
        if not k & 7:
            lines.append("        if token is not None: token.check()")
        lines += [
            "        try:",
            f"            p = {call}",
            f"            if len(p) != {len(s)}:",
            f"                raise miscounted({k}, len(p))",
            "        except Exception as exc:",
            f"            raise vjp_error({k}, exc)",
        ]
        for pos, j in edges[k]:
            _bind_spec(shapes, j, constants)
            lines += [f"        q = p[{pos}]", "        if q is not None:"]
            lines += _summed_back(shapes.shape_of[k], shapes.shape_of[j], k, j, constants)
            lines += [
                f"            if {_check('q', str(j))}:",
                f"                q = fit_grad(plan, {k}, {pos}, q, SPEC{j})",
                f"            g{j} = q if g{j} is None else g{j} + q",
            ]
    return reached


def _summed_back(out_shape: tuple[int, ...], in_shape: tuple[int, ...], k: int, j: int,
                 constants: dict[str, Any]) -> list[str]:
    """Lines that sum a gradient of the node's broadcast shape back to its input's, when the input
    was broadcast (a bias): the sums core.broadcast.unbroadcast would do, with axes worked out here
    once (the same two reductions, so the same bits). A gradient of another shape is left to the
    general check that follows (rule_checks.fit_grad)."""
    extra = len(out_shape) - len(in_shape)
    if out_shape == in_shape or extra < 0:
        return []
    stretched = tuple(i for i, n in enumerate(in_shape) if n == 1 and out_shape[extra + i] != 1)
    if any(n != out_shape[extra + i] for i, n in enumerate(in_shape) if i not in stretched and n != 1):
        return []  # not a broadcast of the input (infer would have refused): leave it to fit_grad
    constants[f"SO{k}"] = out_shape
    lines = [f"            if type(q) is ndarray and q.shape == SO{k}:"]
    if extra:
        lines.append(f"                q = q.sum(axis={tuple(range(extra))!r})")
    if stretched:
        lines.append(f"                q = q.sum(axis={stretched!r}, keepdims=True)")
    return lines


def _miscounted(plan: Plan) -> Callable[[int, int], Exception]:
    """The contract failure of a vjp at slot k that returned ``count`` gradients (one per input is due)."""
    def error(k: int, count: int) -> Exception:
        return contract(plan.ops[k], plan.node_names[k],
                        f"vjp returned {count} gradients for {len(plan.in_slots[k])} inputs")
    return error


def _forward_error(plan: Plan) -> Callable[[int, Exception], Exception]:
    """What a forward rule's exception at slot k becomes, as engine._forward makes it."""
    def error(k: int, exc: Exception) -> Exception:
        node, op = plan.node_names[k], plan.ops[k]
        if isinstance(exc, OpError):
            return _caused(node_error(exc, node, op), None)
        if isinstance(exc, ChainruleError):  # from a graph run inside the operator (scan's body)
            return _caused(nested_error(exc, node, op), None)
        return _caused(failure(op, node, "forward", exc), exc)
    return error


def _vjp_error(plan: Plan) -> Callable[[int, Exception], Exception]:
    """What a vjp rule's exception at slot k becomes, as engine._backward makes it."""
    def error(k: int, exc: Exception) -> Exception:
        node, op = plan.node_names[k], plan.ops[k]
        if isinstance(exc, OperatorFailure):
            return exc
        if isinstance(exc, OpError):
            return _caused(node_error(exc, node, op), None)
        if isinstance(exc, ChainruleError):
            return _caused(nested_error(exc, node, op), None)
        return _caused(failure(op, node, "vjp", exc), exc)
    return error


def _caused(error: Exception, cause: Exception | None) -> Exception:
    """``error`` as ``raise error from cause`` leaves it (the generated code raises it plainly)."""
    error.__cause__ = cause
    error.__suppress_context__ = True
    return error
