"""Straight-line programs (core/program.py): a small plan's second run goes through generated code
that must give the loops' results bit for bit, fail as they fail, and stop as they stop."""
from __future__ import annotations

import numpy as np
import pytest

from chainrule.core import GraphIR, InputDecl, Node, compile_graph, evaluate
from chainrule.core.engine import StopToken, checked_inputs
from chainrule.core.errors import CancelledError, GraphError, OperatorFailure
from chainrule.core.operator import OpDef
from chainrule.core import program
from chainrule.core.program import SMALL_ELEMENTS, _build as real_build, _checked
from chainrule.core.registry import Registry
from test_reference import describe, random_graphs


DEFAULT_RUNS_BEFORE_BUILDING = program.RUNS_BEFORE_BUILDING


@pytest.fixture(autouse=True)
def build_on_the_second_run(monkeypatch):
    """Programs built on a combination's second run, so that each test needs two runs, not seventeen
    (test_a_program_is_built_after_the_runs_it_waits_for checks the real count)."""
    monkeypatch.setattr(program, "RUNS_BEFORE_BUILDING", 1)


def programs_of(plan, inputs):
    """The programs built so far for these inputs' shapes (counts of runs are not programs)."""
    shapes = plan.specialize([np.shape(a) for a in checked_inputs(plan, inputs)])
    return [p for p in shapes.programs.values() if callable(p)]


def same_bits(a, b, what):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes(), what


def test_programs_give_the_loops_bits_on_random_graphs(registry):
    """First run: the loops; second: the program. Every value and gradient the same bits, with and
    without wrt= (the program then follows only the pruned edges, and asks matmul only for those)."""
    built = 0
    for seed, graph, inputs, output_seed in random_graphs(150):
        for wrt in (None, [graph.inputs[0].name]):
            plan = compile_graph(graph, registry)
            looped = evaluate(plan, inputs, seed=output_seed, wrt=wrt)
            assert not programs_of(plan, inputs)
            run = evaluate(plan, inputs, seed=output_seed, wrt=wrt)
            built += len(programs_of(plan, inputs))
            for name in plan.names:
                where = f"{name}, wrt={wrt}\n{describe(seed, graph)}"
                same_bits(looped.value(name), run.value(name), f"value of {where}")
                if looped.grad(name) is None:
                    assert run.grad(name) is None, where
                else:
                    same_bits(looped.grad(name), run.grad(name), f"gradient of {where}")
    assert built == 300  # every one of these small graphs got its program on its second run


def mlp():
    nodes = (Node("h", "matmul", ("X", "W")), Node("z", "add", ("h", "b")), Node("y", "sigmoid", ("z",)),
             Node("f", "mse", ("y", "T")))
    inputs = (InputDecl("X", shape=(8, 3)), InputDecl("W", shape=(3, 2)), InputDecl("b", shape=(2,)),
              InputDecl("T", shape=(8, 2)))
    return GraphIR(inputs, nodes, ("f",))


def mlp_inputs(rng, batch=8):
    return {"X": rng.normal(size=(batch, 3)), "W": rng.normal(size=(3, 2)), "b": rng.normal(size=2),
            "T": rng.normal(size=(batch, 2))}


def test_each_combination_gets_its_own_program_and_forward_only_runs_have_one(registry):
    plan = compile_graph(mlp(), registry)
    inputs = mlp_inputs(np.random.default_rng(0))
    for wrt in (None, ["W", "b"], ["b"]):
        first = evaluate(plan, inputs, wrt=wrt)
        second = evaluate(plan, inputs, wrt=wrt)
        for name in wrt or plan.names:
            same_bits(first.grad(name), second.grad(name), f"{name} wrt {wrt}")
    for _ in range(2):
        forward = evaluate(plan, inputs, gradients=False)
    same_bits(forward.output_value, first.output_value, "forward only")
    assert len(programs_of(plan, inputs)) == 4


def test_large_values_and_operators_with_residuals_take_the_loops(registry):
    large = GraphIR((InputDecl("x", shape=(SMALL_ELEMENTS,)),),
                    (Node("y", "sigmoid", ("x",)), Node("f", "sum", ("y",))), ("f",))
    kept = GraphIR((InputDecl("x", shape=(4, 3)),), (Node("y", "log_softmax", ("x",)), Node("f", "sum", ("y",))), ("f",))
    for graph, shape in ((large, (SMALL_ELEMENTS,)), (kept, (4, 3))):
        plan = compile_graph(graph, registry)
        inputs = {"x": np.linspace(-1.0, 1.0, int(np.prod(shape))).reshape(shape)}
        for _ in range(3):
            evaluate(plan, inputs)
        assert not programs_of(plan, inputs)
    small = GraphIR((InputDecl("x", shape=(SMALL_ELEMENTS - 1,)),),
                    (Node("y", "sigmoid", ("x",)), Node("f", "sum", ("y",))), ("f",))
    plan = compile_graph(small, registry)
    inputs = {"x": np.linspace(-1.0, 1.0, SMALL_ELEMENTS - 1)}
    for _ in range(2):
        evaluate(plan, inputs)
    assert len(programs_of(plan, inputs)) == 1


def faulty_registry(registry, forward=None, vjp=None):
    """The built-ins plus test.faulty: y = 2x, with the given rules in place of its own."""
    faulty = OpDef("test.faulty", 1, forward or (lambda x: 2 * x), vjp or (lambda g, out, x: (2 * g,)),
                   lambda x: x, plugin="faulty")
    return Registry([*registry, faulty])


def faulty_graph():
    nodes = (Node("y", "test.faulty", ("x",)), Node("f", "sum", ("y",)))
    return GraphIR((InputDecl("x", shape=(3,)),), nodes, ("f",))


@pytest.mark.parametrize("forward, vjp, kind, text", [
    (lambda x: 1 / 0, None, OperatorFailure, "forward rule raised ZeroDivisionError: division by zero (plugin 'faulty')"),
    (lambda x: np.ones(4), None, OperatorFailure, "forward returned float64[4] but infer promised"),
    (None, lambda g, out, x: (g, g), OperatorFailure, "vjp returned 2 gradients for 1 inputs"),
    (None, lambda g, out, x: (np.ones(5),), OperatorFailure, "vjp gave input 0 (x) a bad gradient"),
    (None, lambda g, out, x: 3, OperatorFailure, "vjp rule raised TypeError"),
])
def test_a_programs_rule_failures_are_the_loops(registry, forward, vjp, kind, text):
    """A rule that fails only from its third call on: the first run (loops) and the second (the program
    being built) pass, the third fails in the program, with the loops' error."""
    calls = {"n": 0}

    def third(rule, good):
        def rule_from_third_call(*args):
            calls["n"] += 1
            return (rule if calls["n"] > 2 and rule else good)(*args)
        return rule_from_third_call

    plan = compile_graph(faulty_graph(), faulty_registry(
        registry, forward=third(forward, lambda x: 2 * x) if forward else None,
        vjp=third(vjp, lambda g, out, x: (2 * g,)) if vjp else None))
    inputs = {"x": np.arange(3.0)}
    for _ in range(2):
        evaluate(plan, inputs)
    assert programs_of(plan, inputs)
    with pytest.raises(kind) as info:
        evaluate(plan, inputs)
    assert info.value.node == "y" and text in info.value.message
    loops = compile_graph(faulty_graph(), faulty_registry(registry, forward=forward, vjp=vjp))
    with pytest.raises(kind) as looped:
        evaluate(loops, inputs)
    assert looped.value.message == info.value.message


def test_an_operators_own_error_names_its_node_in_a_program(registry):
    """An OpError from a rule becomes the GraphError naming the node, as in the loops."""
    from chainrule.core.errors import OpError
    state = {"n": 0}

    def forward(x):
        state["n"] += 1
        if state["n"] > 2:
            raise OpError("x must be positive", reason="BAD_ATTRIBUTE")
        return 2 * x

    plan = compile_graph(faulty_graph(), faulty_registry(registry, forward=forward))
    inputs = {"x": np.arange(3.0)}
    evaluate(plan, inputs)
    evaluate(plan, inputs)
    with pytest.raises(GraphError) as info:
        evaluate(plan, inputs)
    assert info.value.node == "y" and "node 'y' (test.faulty): x must be positive" in info.value.message


def test_a_program_stops_when_its_token_says_so(registry):
    nodes = tuple(Node(f"n{i}", "sin", (f"n{i - 1}" if i else "x",)) for i in range(20)) + (Node("f", "sum", ("n19",)),)
    plan = compile_graph(GraphIR((InputDecl("x", shape=(3,)),), nodes, ("f",)), registry)
    inputs = {"x": np.arange(3.0)}
    evaluate(plan, inputs)
    evaluate(plan, inputs)
    assert programs_of(plan, inputs)
    cancelled = StopToken(event=__import__("threading").Event())
    cancelled.event.set()
    with pytest.raises(CancelledError):
        evaluate(plan, inputs, token=cancelled)


def test_a_programs_source_may_not_hold_text():
    """The guard that keeps a request's text out of generated code: no literal, no unknown name."""
    assert _checked("def program(arrays, seed, token):\n    v1 = f1(v0)\n", {"f1": None})
    with pytest.raises(AssertionError, match="literal"):  # (a quote: no string can be written)
        _checked("def program(arrays, seed, token):\n    v1 = f1('x')\n", {"f1": None})
    with pytest.raises(AssertionError, match="unknown name"):
        _checked("def program(arrays, seed, token):\n    v1 = open(v0)\n", {})


def test_a_small_sigmoid_skips_its_errstate_only_under_the_engine(registry):
    """sigmoid leaves overflow to the engine's errstate while rules run (engine.running_rules); its
    exp overflows at x = -1000 either way, and nobody hears of it: not through the loops, not
    through a program, not called directly (its own errstate)."""
    import warnings

    from chainrule.core.engine import running_rules
    graph = GraphIR((InputDecl("x", shape=(3,)),), (Node("y", "sigmoid", ("x",)), Node("f", "sum", ("y",))), ("f",))
    plan = compile_graph(graph, registry)
    inputs = {"x": np.array([-1000.0, 0.0, 1000.0])}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(over="raise"):
            for _ in range(3):
                run = evaluate(plan, inputs)
                np.testing.assert_array_equal(run.value("y"), [0.0, 0.5, 1.0])
            np.testing.assert_array_equal(registry["sigmoid"].forward(inputs["x"]), [0.0, 0.5, 1.0])
    assert programs_of(plan, inputs) and not running_rules()


def test_programs_are_kept_for_a_bounded_set_of_combinations(registry, monkeypatch):
    """Past MAX_COMBINATIONS (output, wrt) combinations per shapes, the others take the loops: never
    a program built anew on every call."""
    nodes = tuple(Node(f"n{i}", "sin", (f"n{i - 1}" if i else "x",)) for i in range(24)) + (Node("f", "sum", ("n23",)),)
    plan = compile_graph(GraphIR((InputDecl("x", shape=(3,)),), nodes, ("f",)), registry)
    inputs = {"x": np.arange(3.0)}
    built = []
    monkeypatch.setattr(program, "_build", lambda *args: built.append(1) or real_build(*args))
    for i in range(program.MAX_COMBINATIONS + 4):
        for _ in range(4):
            result = evaluate(plan, inputs, wrt=[f"n{i}"])
        assert result.grad(f"n{i}") is not None
    assert len(built) == program.MAX_COMBINATIONS


def sin_chain(registry, length=20):
    nodes = tuple(Node(f"n{i}", "sin", (f"n{i - 1}" if i else "x",)) for i in range(length))
    return compile_graph(GraphIR((InputDecl("x", shape=(3,)),), nodes + (Node("f", "sum", (f"n{length - 1}",)),),
                                 ("f",)), registry)


def test_a_program_is_built_after_the_runs_it_waits_for(registry, monkeypatch):
    """By default a combination runs RUNS_BEFORE_BUILDING times through the loops first: a caller
    who runs a graph a few times never pays for a build."""
    monkeypatch.setattr(program, "RUNS_BEFORE_BUILDING", DEFAULT_RUNS_BEFORE_BUILDING)
    assert DEFAULT_RUNS_BEFORE_BUILDING > 1
    plan, inputs = sin_chain(registry), {"x": np.arange(3.0)}
    for _ in range(DEFAULT_RUNS_BEFORE_BUILDING):
        evaluate(plan, inputs)
    assert not programs_of(plan, inputs)
    evaluate(plan, inputs)
    assert programs_of(plan, inputs)


def test_a_build_waits_for_a_call_with_time_for_it(registry):
    """A build is counted against the call's deadline before it starts: a call that could not
    afford one takes the loops, and a later call with time builds."""
    plan, inputs = sin_chain(registry), {"x": np.arange(3.0)}
    evaluate(plan, inputs)
    short = program.BUILD_SECONDS_PER_SLOT * len(plan.names) * 5  # (a build wants 10x its estimate left)
    for _ in range(3):
        result = evaluate(plan, inputs, token=StopToken.after(short))
        assert not programs_of(plan, inputs) and result.grad("x") is not None
    evaluate(plan, inputs, token=StopToken.after(600))
    assert programs_of(plan, inputs)


def test_programs_are_built_within_the_process_budget(registry, monkeypatch):
    """Each program's bytes are taken from the process's budget before its build and given back when
    its plan goes; with no room left a combination takes the loops, with the same answers."""
    budget = program._ProgramBudget(program.PROGRAM_BYTES_PER_SLOT * 30)  # room for one 22-slot program
    monkeypatch.setattr(program, "_budget", budget)
    first, second = sin_chain(registry), sin_chain(registry)
    inputs = {"x": np.arange(3.0)}
    for plan in (first, second):
        for _ in range(3):
            result = evaluate(plan, inputs)
    assert programs_of(first, inputs) and not programs_of(second, inputs)
    assert result.grad("x").tobytes() == evaluate(first, inputs).grad("x").tobytes()
    assert budget.held == program.PROGRAM_BYTES_PER_SLOT * len(first.names)
    del first
    import gc
    gc.collect()
    assert budget.held == 0  # given back with the plan's Shapes
