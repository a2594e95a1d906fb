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
built once a combination has run RUNS_BEFORE_BUILDING times, when the call's deadline leaves
time for it and the process's program budget room: a caller who runs a graph a few times
never pays for one. It is the JIT of
PyTorch's TorchScript or JAX's ``jit`` on a small scale, without tracing: the plan is the trace.
"""
from __future__ import annotations

import keyword
import re
import threading
import time
import weakref
from typing import Any, Callable

import numpy as np

from .compile import Plan, Shapes
from .rule_checks import fit_grad, fit_value, miscounted, rule_error

#: Values with at least this many elements take the engine's loops (its REUSE_MIN_ELEMENTS: below
#: it no buffer is reused, no node runs in blocks and no node needs a stop check of its own).
SMALL_ELEMENTS = 1 << 14

#: Plans with more slots take the loops. A program's gain per run shrinks as the plan grows (a
#: chain of 18 slots on 3-element values: 0.12 -> 0.10 ms a run; of 500: 1.30 -> 1.06; of 2,000:
#: 5.63 -> 5.47) while its build grows with it (6, 170 and 790 ms).
MAX_SLOTS = 256

#: A combination of shapes, output, wanted gradients and gradients on/off gets its program on its
#: run after this many. A build costs what a few hundred runs save (measured above): a caller that
#: runs a graph a few times never pays for one; a training loop or a service called repeatedly does.
RUNS_BEFORE_BUILDING = 16

#: Combinations kept per Shapes (counted or built); others take the loops.
MAX_COMBINATIONS = 16

#: What a build costs, per slot, counted before it starts: its time against the call's deadline
#: (about 0.35 ms a slot measured, taken at twice that), its memory against PROGRAM_BUDGET_BYTES
#: (2.3-2.4 KiB a slot measured for its code and constants).
BUILD_SECONDS_PER_SLOT = 7e-4
PROGRAM_BYTES_PER_SLOT = 2400

#: What the programs of this process may hold together (programs go with their plans' Shapes).
PROGRAM_BUDGET_BYTES = 64 << 20

#: What Shapes.programs holds for a combination that cannot have a program.
_NONE = "none"

Program = Callable[[list[Any], Any, Any], tuple[list[Any], list[Any] | None]]


class _ProgramBudget:
    """The bytes the programs of this process hold, taken before a build and given back when the
    Shapes that keeps the program is freed (its plan left the cache)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held = 0
        self._lock = threading.Lock()

    def take(self, owner: Shapes, nbytes: int) -> bool:
        with self._lock:
            if self.held + nbytes > self.capacity:
                return False
            self.held += nbytes
        weakref.finalize(owner, self._give_back, nbytes)
        return True

    def _give_back(self, nbytes: int) -> None:
        with self._lock:
            self.held -= nbytes


_budget = _ProgramBudget(PROGRAM_BUDGET_BYTES)


def program_for(plan: Plan, shapes: Shapes, out_slot: int, wanted: frozenset[int] | None, gradients: bool,
                token: Any = None) -> Program | None:
    """The straight-line program of this combination, built on its run after RUNS_BEFORE_BUILDING
    when there is time before ``token``'s deadline and room in the process's program budget; None
    when it takes the loops. Called as ``program(arrays, seed, token)``: the inputs in slot order, a
    function giving the output's seed (called after the forward pass, whose errors come first) and
    the stop token (or None); gives (values, grads), grads None without ``gradients``."""
    key = (out_slot, wanted, gradients)
    programs = shapes.programs
    known = programs.get(key)
    if known is None:  # a first run: counted, while there is room (a small fixed set per shapes)
        if len(programs) < MAX_COMBINATIONS:
            programs[key] = 1
        return None
    if type(known) is int:
        if known < RUNS_BEFORE_BUILDING or not _time_to_build(plan, token):
            programs[key] = known + 1
            return None
        known = programs[key] = _built(plan, shapes, out_slot, wanted, gradients)
    return None if known is _NONE else known  # (a race only builds twice)


def _time_to_build(plan: Plan, token: Any) -> bool:
    """Whether a build fits well within what the call's deadline leaves (else a later call builds)."""
    deadline = None if token is None else token.deadline
    return deadline is None or deadline - time.monotonic() > 10 * BUILD_SECONDS_PER_SLOT * len(plan.names)


def _built(plan: Plan, shapes: Shapes, out_slot: int, wanted: frozenset[int] | None, gradients: bool) -> Any:
    """The combination's program, or _NONE when it may not have one (not eligible, or no room)."""
    if not _eligible(plan, shapes) or not _budget.take(shapes, PROGRAM_BYTES_PER_SLOT * len(plan.names)):
        return _NONE
    return _build(plan, shapes, out_slot, shapes.edges_toward(wanted, plan.in_slots) if gradients else None)


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
        "forward_error": lambda k, exc: rule_error(plan, k, "forward", exc),
        "vjp_error": lambda k, exc: rule_error(plan, k, "vjp", exc),
        "miscounted": lambda k, count: miscounted(plan, k, count),
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


#: The names a program's source may use besides its constants: its own function, arguments and locals,
#: Python's keywords, and the attributes and keywords of numpy calls it makes.
_LOCAL_NAME = re.compile(r"(program|arrays|seed|token|exc|p|q|type|len|Exception|[vg]\d+)")
_OTHER_NAMES = frozenset(keyword.kwlist) | {"shape", "dtype", "sum", "axis", "keepdims", "check", "needs"}
#: What a program's source is made of: no quote or backslash, so no string or bytes literal.
_SOURCE = re.compile(r"[\w \n(),.=:;!*+<>\[\]-]*")
_NAME = re.compile(r"[A-Za-z_]\w*")


def _checked(source: str, constants: dict[str, Any]) -> str:
    """``source`` once it is known to hold nothing a request wrote: a request's text (node names,
    operator names, attribute values) reaches a program only through ``constants``, never its
    source, which is written from slot numbers and axes. A character that could open a literal
    (a quote, a backslash), or a name that is neither a constant, a local of the program nor one of
    _OTHER_NAMES, fails (a bug here, not the caller's). Two regular expressions over the text: an
    ast walk cost more than the compile itself."""
    if not _SOURCE.fullmatch(source):
        bad = next(c for c in source if not _SOURCE.fullmatch(c))
        raise AssertionError(f"a program's source holds a literal's character {bad!r}")
    for name in set(_NAME.findall(source)):
        if name not in constants and name not in _OTHER_NAMES and not _LOCAL_NAME.fullmatch(name):
            raise AssertionError(f"a program's source uses an unknown name {name!r}")
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
    lines.append(f"    g{out_slot} = seed()")  # (after the forward pass, as the loops make it)
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
