"""The engine against its readable model (tests/reference.py), on seeded random graphs.

A seeded numpy generator builds random DAGs from a representative set of
built-in operators, with fan-out (a value read by several nodes, or twice by
one), broadcasting between shapes such as (3, 1) and (1, 4), reductions with
and without ``axis``, reshapes, transposes, matmul with 1-D and batched
operands, scalar and non-scalar outputs (the latter with a random seed),
nodes that do not reach the output, and node lists in a shuffled order. Both
evaluators run each graph; every value and every gradient must agree.

Tolerance: rtol 1e-12, atol 0. Both sides call the same forward and vjp rules,
so values are identical; about 0.1% of gradient entries differ by an ulp or two
(at most 4e-16 relative over 2,000 graphs), where the engine adds in another
order: matmul's single product for a batch times one matrix instead of a batched
product summed by unbroadcast, and what flows on from it.
test_tolerance_catches_a_1e9_error shows that an error of one part in 10^9 in
one rule is caught.

The reference itself is checked against the hand-computed numbers of the
worked examples in /work/shared/ARCHITECTURE.md (section 7), and
test_broken_reference_is_caught shows that the comparison notices a reference
that overwrites instead of accumulating, walks forwards instead of backwards, or
ignores the seed.
"""
from __future__ import annotations

import inspect
import itertools
import types
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

import reference
from chainrule.core import GraphIR, InputDecl, Node, compile_graph, evaluate
from chainrule.core.registry import Registry

RTOL, ATOL = 1e-12, 0.0
N_GRAPHS = 300
COVERED = ("add", "sub", "mul", "div", "maximum", "neg", "exp", "tanh", "sigmoid", "sin",
           "matmul", "sum", "mean", "reshape", "transpose", "broadcast_to")
INPUT_SHAPES = [(), (3,), (4,), (3, 1), (1, 4), (3, 4), (4, 3), (2, 3, 4)]


# --- the generator ---------------------------------------------------------------------------

def broadcastable(a, b) -> bool:
    try:
        np.broadcast_shapes(a, b)
        return True
    except ValueError:
        return False


def matmul_shape(a, b):
    """np.matmul's result shape, or None where matmul refuses the pair (or a scalar)."""
    if not a or not b:
        return None
    try:
        return np.matmul(np.zeros(a), np.zeros(b)).shape
    except ValueError:
        return None


def reshape_targets(shape):
    """Shapes of rank 0 to 3 with the same number of elements."""
    size = int(np.prod(shape))
    divisors = [d for d in range(1, size + 1) if size % d == 0]
    targets = [(size,), (1, size), (size, 1)] + [(d, size // d) for d in divisors]
    targets += [(d, e, size // (d * e)) for d in divisors for e in divisors if size % (d * e) == 0]
    return targets + ([()] if size == 1 else [])


def random_graph(rng: np.random.Generator, n_nodes: int):
    """A random DAG of about ``n_nodes`` nodes: (graph, inputs, seed)."""
    decls = [InputDecl(f"x{i}", "float64", INPUT_SHAPES[rng.integers(len(INPUT_SHAPES))])
             for i in range(rng.integers(2, 5))]
    pool = [(d.name, d.shape) for d in decls]  # every value so far: name, shape
    nodes: list[Node] = []

    def pick(candidates=None):
        candidates = pool if candidates is None else candidates
        if rng.random() < 0.5:                 # often a recent value, for depth; else any, for fan-out
            return candidates[-1 - rng.integers(min(3, len(candidates)))]
        return candidates[rng.integers(len(candidates))]

    def emit(op, inputs, shape, attrs=None):
        name = f"n{len(nodes)}"
        nodes.append(Node(name, op, tuple(inputs), attrs or {}))
        pool.append((name, shape))
        return name, shape

    while len(nodes) < n_nodes:
        op = COVERED[rng.integers(len(COVERED))]
        a, shape = pick()
        if op in ("add", "sub", "mul", "div", "maximum"):
            b, b_shape = pick([v for v in pool if broadcastable(shape, v[1])])
            if op == "div":                    # a denominator in [1/e, e]: exp(tanh(b))
                b, b_shape = emit("exp", [emit("tanh", [b], b_shape)[0]], b_shape)
            emit(op, [a, b], np.broadcast_shapes(shape, b_shape))
        elif op == "exp":                      # exp(tanh(a)): no overflow however deep the graph
            emit("exp", [emit("tanh", [a], shape)[0]], shape)
        elif op in ("neg", "tanh", "sigmoid", "sin"):
            emit(op, [a], shape)
        elif op == "matmul":
            pairs = [(u, v) for u, v in itertools.product(pool, pool) if matmul_shape(u[1], v[1]) is not None]
            if pairs:
                (a, shape), (b, b_shape) = pairs[rng.integers(len(pairs))]
                emit(op, [a, b], matmul_shape(shape, b_shape))
        elif op in ("sum", "mean"):
            attrs = {"keepdims": bool(rng.integers(2))}
            if shape and rng.random() < 0.6:   # some axes (negative ones too), else all of them
                axes = [ax for ax in range(len(shape)) if rng.random() < 0.5] or [0]
                attrs["axis"] = tuple(ax - len(shape) if rng.random() < 0.3 else ax for ax in axes)
            kept = np.sum(np.zeros(shape), axis=attrs.get("axis"), keepdims=attrs["keepdims"]).shape
            emit(op, [a], kept, attrs)
        elif op == "reshape":
            targets = reshape_targets(shape)
            target = targets[rng.integers(len(targets))]
            emit(op, [a], target, {"shape": target})
        elif op == "transpose":
            axes = tuple(int(ax) for ax in rng.permutation(len(shape)))
            attrs = {"axes": axes} if rng.random() < 0.5 else {}
            emit(op, [a], np.zeros(shape).transpose(attrs.get("axes")).shape, attrs)
        elif op == "broadcast_to":
            target = tuple(3 if n == 1 and rng.random() < 0.7 else n for n in shape)
            target = ((2,) if len(target) < 3 and rng.random() < 0.5 else ()) + target
            emit(op, [a], target, {"shape": target})

    out, out_shape = pool[-1]
    seed = None
    if out_shape and rng.random() < 0.5:       # a scalar output: seed None means d out/d out = 1
        out, out_shape = emit("sum", [out], ())
    elif out_shape or rng.random() < 0.3:      # a non-scalar output needs a seed of its shape
        seed = np.asarray(rng.standard_normal(out_shape))
    if rng.random() < 0.5:                     # nodes in any order: compile and the reference sort them
        nodes = [nodes[i] for i in rng.permutation(len(nodes))]
    inputs = {d.name: np.asarray(rng.uniform(-1.5, 1.5, d.shape)) for d in decls}
    return GraphIR(tuple(decls), tuple(nodes), (out,)), inputs, seed


def random_graphs(n=N_GRAPHS):
    """(seed, graph, inputs, output seed) for ``n`` seeded graphs of 1 to 14 nodes."""
    for seed in range(n):
        rng = np.random.default_rng(seed)
        yield (seed, *random_graph(rng, int(rng.integers(1, 15))))


# --- the comparison --------------------------------------------------------------------------

def describe(seed, graph):
    lines = [f"random graph {seed}:"] + [f"  {d.name}: {d.shape}" for d in graph.inputs]
    lines += [f"  {n.name} = {n.op}({', '.join(n.inputs)}) {n.attrs or ''}" for n in graph.nodes]
    return "\n".join(lines + [f"  output {graph.outputs[0]}"])


def assert_same(expected, actual, what):
    actual = np.asarray(actual)
    assert actual.shape == np.shape(expected) and actual.dtype == np.float64, (what, actual.shape, np.shape(expected))
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL, err_msg=what)


def compare(registry, seed, graph, inputs, output_seed, *, model=reference, engine_registry=None):
    """Evaluate with the engine and with ``model``; every value and gradient must agree."""
    plan = compile_graph(graph, engine_registry or registry)
    ev = evaluate(plan, inputs, seed=output_seed)
    values, grads = model.evaluate(graph, registry, inputs, seed=output_seed)
    where = describe(seed, graph)
    assert sorted(values) == sorted(plan.names), where
    for name in plan.names:
        assert_same(values[name], ev.value(name), f"value of {name}\n{where}")
        assert_same(grads[name], ev.grad(name), f"gradient of {name}\n{where}")


def test_engine_matches_reference_on_random_graphs(registry):
    for seed, graph, inputs, output_seed in random_graphs():
        compare(registry, seed, graph, inputs, output_seed)


def test_engine_with_wrt_matches_reference(registry):
    """``wrt=`` prunes the backward pass (and skips matmul products via ``needs``): same gradients."""
    for seed, graph, inputs, output_seed in random_graphs(N_GRAPHS // 3):
        rng = np.random.default_rng(seed)
        wanted = [d.name for d in graph.inputs if rng.random() < 0.5] or [graph.inputs[0].name]
        ev = evaluate(compile_graph(graph, registry), inputs, seed=output_seed, wrt=wanted)
        _, grads = reference.evaluate(graph, registry, inputs, seed=output_seed)
        for name in wanted:
            assert_same(grads[name], ev.grad(name), f"gradient of {name}, wrt={wanted}\n{describe(seed, graph)}")


def test_reference_order_is_topological():
    for seed, graph, _, _ in random_graphs(N_GRAPHS // 3):
        order = reference.topological_order(graph)
        assert sorted(n.name for n in order) == sorted(n.name for n in graph.nodes)
        done = {d.name for d in graph.inputs}
        for node in order:
            assert set(node.inputs) <= done, describe(seed, graph)
            done.add(node.name)


def test_generator_covers_what_it_claims(registry):
    """The random graphs really contain every operator, fan-out, broadcasting, and the other cases."""
    seen: Counter = Counter()
    for _, graph, inputs, output_seed in random_graphs():
        values, _ = reference.evaluate(graph, registry, inputs, seed=output_seed)
        shape = {name: np.shape(value) for name, value in values.items()}
        reads = Counter(name for n in graph.nodes for name in n.inputs)
        later = {n.name: i for i, n in enumerate(graph.nodes)}
        binary = [n for n in graph.nodes if len(n.inputs) == 2 and n.op != "matmul"]
        matmuls = [(shape[a], shape[b]) for n in graph.nodes if n.op == "matmul" for a, b in [n.inputs]]
        seen.update(n.op for n in graph.nodes)
        seen["fan-out"] += any(count > 1 for count in reads.values())
        seen["one node reads a value twice"] += any(len(set(n.inputs)) < len(n.inputs) for n in graph.nodes)
        seen["unreached"] += any(n.name not in reads and n.name != graph.outputs[0] for n in graph.nodes)
        seen["seed given"] += output_seed is not None
        seen["scalar output, no seed"] += output_seed is None
        seen["nodes out of order"] += any(later.get(name, -1) > i for i, n in enumerate(graph.nodes) for name in n.inputs)
        seen["sum with axis"] += any(n.op == "sum" and "axis" in n.attrs for n in graph.nodes)
        seen["sum without axis"] += any(n.op == "sum" and "axis" not in n.attrs for n in graph.nodes)
        seen["keepdims"] += any(n.attrs.get("keepdims") for n in graph.nodes)
        seen["broadcast"] += any(shape[a] != shape[b] for n in binary for a, b in [n.inputs])
        seen["both sides stretched, like (3,1) and (1,4)"] += any(
            shape[n.name] not in (shape[a], shape[b]) for n in binary for a, b in [n.inputs])
        seen["matmul with a 1-D operand"] += any(1 in (len(a), len(b)) for a, b in matmuls)
        seen["batched matmul"] += any(max(len(a), len(b)) > 2 for a, b in matmuls)
    cases = ("fan-out", "one node reads a value twice", "unreached", "seed given", "scalar output, no seed",
             "nodes out of order", "sum with axis", "sum without axis", "keepdims", "broadcast",
             "both sides stretched, like (3,1) and (1,4)", "matmul with a 1-D operand", "batched matmul")
    assert set(seen) == set(COVERED + cases), seen
    assert all(seen[case] >= 10 for case in COVERED + cases), seen


# --- the reference against the hand-computed numbers ---------------------------------------

def scalars(**values):
    return {k: np.asarray(v, np.float64) for k, v in values.items()}


def scalar_graph(inputs, nodes, output):
    return GraphIR.build([(name, "float64", ()) for name in inputs], nodes, output)


@pytest.mark.parametrize("x, y, z, p, g, dz, dp, dx, dy", [
    (1.0, 3.0, -3.0, 4.0, -12.0, 4.0, -3.0, -3.0, -3.0),   # example 1
    (-2.0, 5.0, -4.0, 3.0, -12.0, 3.0, -4.0, -4.0, -4.0),  # example 2
])
def test_reference_add_then_multiply(registry, x, y, z, p, g, dz, dp, dx, dy):
    graph = scalar_graph("xyz", [("p", "add", ("x", "y")), ("g", "mul", ("p", "z"))], "g")
    values, grads = reference.evaluate(graph, registry, scalars(x=x, y=y, z=z))
    assert (values["p"], values["g"]) == (p, g)
    assert {k: grads[k] for k in "zpxyg"} == {"z": dz, "p": dp, "x": dx, "y": dy, "g": 1.0}
    compare(registry, "example 1/2", graph, scalars(x=x, y=y, z=z), None)


def test_reference_sigmoid_neuron(registry):
    """Example 3: f = sigmoid(w0 x0 + w1 x1 + w2) at w = [2, -3, -3], x = [-1, -2]."""
    graph = scalar_graph(["w0", "w1", "w2", "x0", "x1"], [
        ("a", "mul", ("w0", "x0")), ("b", "mul", ("w1", "x1")), ("ab", "add", ("a", "b")),
        ("z", "add", ("ab", "w2")), ("f", "sigmoid", ("z",)),
    ], "f")
    inputs = scalars(w0=2.0, w1=-3.0, w2=-3.0, x0=-1.0, x1=-2.0)
    values, grads = reference.evaluate(graph, registry, inputs)
    assert values["f"] == pytest.approx(0.7310585786300049, rel=RTOL)
    assert grads["z"] == pytest.approx(0.19661193324148185, rel=RTOL)   # the local gradient (1-f)f
    for name, expected in {"x0": 0.3932238664829637, "x1": -0.5898357997244456, "w0": -0.19661193324148185,
                           "w1": -0.3932238664829637, "w2": 0.19661193324148185}.items():
        assert grads[name] == pytest.approx(expected, rel=RTOL), name
    compare(registry, "example 3", graph, inputs, None)


def test_reference_staged_circuit_with_fan_out(registry):
    """Example 4: x and y fan out, so their gradients are sums (``+=``)."""
    graph = scalar_graph("xy", [
        ("sigy", "sigmoid", ("y",)), ("num", "add", ("x", "sigy")), ("sigx", "sigmoid", ("x",)),
        ("xpy", "add", ("x", "y")), ("xpysqr", "mul", ("xpy", "xpy")), ("den", "add", ("sigx", "xpysqr")),
        ("one", "const", (), {"value": np.array(1.0)}), ("invden", "div", ("one", "den")),
        ("f", "mul", ("num", "invden")),
    ], "f")
    values, grads = reference.evaluate(graph, registry, scalars(x=3.0, y=-4.0))
    for name, expected in {"f": 1.5456448841066441, "sigy": 0.01798620996209156, "num": 3.0179862099620918,
                           "sigx": 0.9525741268224334, "den": 1.9525741268224333, "invden": 0.5121444488396316}.items():
        assert values[name] == pytest.approx(expected, rel=RTOL), name
    for name, expected in {"x": 2.0595697955721652, "y": 1.5922327514838093, "num": 0.5121444488396316,
                           "invden": 3.0179862099620918, "den": -0.7915934472725935, "xpy": 1.583186894545187}.items():
        assert grads[name] == pytest.approx(expected, rel=RTOL), name


def test_reference_max_gate(registry):
    """Example 5: max(x, y) at x=4, y=2 with upstream 2 routes it all to x."""
    graph = scalar_graph("xy", [("f", "maximum", ("x", "y"))], "f")
    _, grads = reference.evaluate(graph, registry, scalars(x=4.0, y=2.0), seed=2.0)
    assert (grads["x"], grads["y"]) == (2.0, 0.0)


# --- every comparison can fail ---------------------------------------------------------------

MUTANTS = {
    "overwrite instead of accumulating": ("grads[name] += unbroadcast", "grads[name] = unbroadcast"),
    "backward in forward order": ("for node in reversed(order):", "for node in order:"),
    "seed ignored": ("if seed is None else", "if True else"),
}


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_broken_reference_is_caught(registry, mutant):
    """Each small break of the reference makes some random graph disagree with the engine."""
    source = inspect.getsource(reference)
    old, new = MUTANTS[mutant]
    assert source.count(old) == 1, f"the reference no longer contains {old!r}"
    broken = types.ModuleType("broken_reference")
    exec(compile(source.replace(old, new), "broken_reference", "exec"), broken.__dict__)
    with pytest.raises(AssertionError):
        for seed, graph, inputs, output_seed in random_graphs():
            compare(registry, seed, graph, inputs, output_seed, model=broken)


def test_tolerance_catches_a_1e9_error(registry):
    """An engine whose mul rule is off by one part in 10^9 disagrees with the reference."""
    mul = registry["mul"]
    off = replace(mul, vjp=lambda g, out, x, y: tuple(d * (1 + 1e-9) for d in mul.vjp(g, out, x, y)))
    engine_registry = Registry([off if op.name == "mul" else op for op in registry])
    with pytest.raises(AssertionError):
        for seed, graph, inputs, output_seed in random_graphs():
            compare(registry, seed, graph, inputs, output_seed, engine_registry=engine_registry)
