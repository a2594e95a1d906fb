"""Each invalid graph or request raises the right typed error, naming the node."""
from __future__ import annotations

import numpy as np
import pytest

from chainrule.core import GraphIR, InputDecl, Limits, Node, compile_graph, evaluate
from chainrule.core import errors as E
from chainrule.core.compile import WORKSPACE_ARRAYS

from helpers import scalar_graph


def compile_(registry, inputs, nodes, outputs, **limits):
    graph = GraphIR(tuple(InputDecl(*i) for i in inputs), tuple(Node(*n) for n in nodes), tuple(outputs))
    return compile_graph(graph, registry, Limits(**limits) if limits else None)


def test_cycle_names_the_nodes(registry):
    with pytest.raises(E.CycleError) as info:
        compile_(registry, [("x",)], [("a", "add", ("x", "c")), ("b", "neg", ("a",)), ("c", "neg", ("b",))], ["c"])
    assert info.value.node in {"a", "b", "c"}
    assert "a -> b -> c" in info.value.message or "b -> c -> a" in info.value.message or "c -> a -> b" in info.value.message


def test_self_reference_is_a_cycle(registry):
    with pytest.raises(E.CycleError, match="node 'a' \\(neg\\)"):
        compile_(registry, [("x",)], [("a", "neg", ("a",))], ["a"])


def test_unknown_operator(registry):
    with pytest.raises(E.UnknownOperatorError, match="node 'h': unknown operator 'frobnicate'") as info:
        compile_(registry, [("x",)], [("h", "frobnicate", ("x",))], ["h"])
    assert info.value.node == "h" and info.value.reason == "UNKNOWN_OPERATOR"


def test_wrong_arity(registry):
    with pytest.raises(E.ArityError, match="node 's' \\(add\\): takes 2 input\\(s\\), got 1"):
        compile_(registry, [("x",)], [("s", "add", ("x",))], ["s"])


def test_bad_attribute_type(registry):
    with pytest.raises(E.BadAttributeError, match="node 'l' \\(leaky_relu\\): attribute 'alpha': expected a float") as info:
        compile_(registry, [("x",)], [("l", "leaky_relu", ("x",), {"alpha": "big"})], ["l"])
    assert info.value.field == "graph.nodes[0].attrs.alpha"  # a path in the request


def test_unknown_attribute(registry):
    with pytest.raises(E.BadAttributeError, match="unknown attribute 'beta'"):
        compile_(registry, [("x",)], [("l", "relu", ("x",), {"beta": 1.0})], ["l"])


def test_dangling_reference(registry):
    with pytest.raises(E.UnknownNodeError, match="node 'p' \\(add\\): input 'nowhere'"):
        compile_(registry, [("x",)], [("p", "add", ("x", "nowhere"))], ["p"])


def test_missing_input_at_run(registry):
    plan = compile_graph(scalar_graph(["x", "y"], [("p", "add", ("x", "y"))], "p"), registry)
    with pytest.raises(E.MissingInputError, match="input 'y'") as info:
        evaluate(plan, {"x": np.float64(1)})
    assert info.value.node == "y"


def test_unexpected_and_mistyped_inputs(registry):
    plan = compile_graph(scalar_graph(["x"], [("n", "neg", ("x",))], "n"), registry)
    with pytest.raises(E.UnexpectedInputError, match="input 'q'"):
        evaluate(plan, {"x": np.float64(1), "q": np.float64(2)})
    with pytest.raises(E.DTypeError, match="input 'x': declared float64, got float32"):
        evaluate(plan, {"x": np.float32(1)})
    with pytest.raises(E.ShapeError, match="input 'x': declared shape \\[\\], got \\[2\\]"):
        evaluate(plan, {"x": np.zeros(2)})


def test_matmul_shape_mismatch_names_the_node(registry):
    with pytest.raises(E.ShapeError, match="node 'h2' \\(matmul\\): .*4 and 3") as info:
        compile_(registry, [("a", "float64", (2, 4)), ("b", "float64", (3, 5))], [("h2", "matmul", ("a", "b"))], ["h2"])
    assert info.value.node == "h2" and info.value.op == "matmul"


def test_broadcast_mismatch(registry):
    with pytest.raises(E.ShapeError, match="node 's' \\(add\\)"):
        compile_(registry, [("a", "float64", (2, 3)), ("b", "float64", (4,))], [("s", "add", ("a", "b"))], ["s"])


def test_duplicate_node_name(registry):
    with pytest.raises(E.DuplicateNodeError, match="node 'x'"):
        compile_(registry, [("x",)], [("x", "neg", ("x",))], ["x"])


def test_non_scalar_output_needs_a_seed(registry):
    plan = compile_graph(
        GraphIR((InputDecl("v", "float64", (3,)),), (Node("e", "exp", ("v",)),), ("e",)), registry
    )
    with pytest.raises(E.SeedError, match="output 'e' has shape \\[3\\]") as info:
        evaluate(plan, {"v": np.zeros(3)})
    assert info.value.reason == "SEED_REQUIRED"
    ev = evaluate(plan, {"v": np.zeros(3)}, seed=np.array([1.0, 2.0, 3.0]))
    np.testing.assert_array_equal(ev.grad("v"), [1.0, 2.0, 3.0])


def test_several_outputs_need_a_choice(registry):
    graph = GraphIR((InputDecl("x"),), (Node("a", "neg", ("x",)), Node("b", "exp", ("x",))), ("a", "b"))
    plan = compile_graph(graph, registry)
    with pytest.raises(E.OutputError, match="several outputs"):
        evaluate(plan, {"x": np.float64(1)})
    assert evaluate(plan, {"x": np.float64(0)}, output="b").grad("x") == 1.0


def test_limits_are_checked_before_allocation(registry):
    with pytest.raises(E.LimitExceeded) as info:
        compile_(registry, [("x", "float64", (1,))], [("big", "broadcast_to", ("x",), {"shape": [10**6, 10**6]})],
                 ["big"])
    assert info.value.limit == "max_tensor_elements" and info.value.node == "big"
    with pytest.raises(E.LimitExceeded) as info:  # the values alone (x and e) do not fit
        compile_(registry, [("x", "float64", (1000,))], [("e", "exp", ("x",))], ["e"], max_memory_bytes=10_000)
    assert info.value.limit == "max_memory_bytes" and info.value.requested == 2 * 8000
    # values 8008 and workspace 2 x 8000 (the largest array a rule reads or makes, twice: its temporaries)
    plan = compile_(registry, [("x", "float64", (1000,))], [("e", "exp", ("x",)), ("s", "sum", ("e",))], ["s"],
                    max_memory_bytes=36_000)
    assert evaluate(plan, {"x": np.zeros(1000)}, gradients=False).output_value == 1000  # forward only fits
    with pytest.raises(E.LimitExceeded) as info:  # with gradients (8008 more) it does not
        evaluate(plan, {"x": np.zeros(1000)})
    assert info.value.requested == 2 * 8008 + 2 * 8000 + WORKSPACE_ARRAYS * 8000
    with pytest.raises(E.LimitExceeded, match="limit is 2"):
        compile_(registry, [("x",)], [("a", "neg", ("x",)), ("b", "neg", ("a",)), ("c", "neg", ("b",))], ["c"], max_nodes=2)


def test_nodes_in_any_order_are_sorted(registry):
    plan = compile_graph(scalar_graph(["x"], [("b", "exp", ("a",)), ("a", "neg", ("x",))], "b"), registry)
    ev = evaluate(plan, {"x": np.float64(0.5)})
    assert ev.grad("x") == pytest.approx(-np.exp(-0.5))


def test_unreached_nodes_get_zeros_or_nothing_and_integers_no_gradient(registry):
    graph = GraphIR(
        (InputDecl("x"), InputDecl("k", "int64", ())),
        (Node("f", "exp", ("x",)), Node("unused", "sin", ("x",)), Node("kk", "add", ("k", "k"))),
        ("f",),
    )
    plan = compile_graph(graph, registry)
    inputs = {"x": np.float64(0.0), "k": np.int64(2)}
    ev = evaluate(plan, inputs)
    assert ev.grad("unused") == 0.0 and ev.grad("kk") is None and ev.grad("k") is None
    assert evaluate(plan, inputs, unreached="omit").grad("unused") is None


def test_a_million_node_chain(registry):
    n = 1_000_000
    nodes = tuple(Node(f"n{i}", "neg", (f"n{i - 1}" if i else "x",)) for i in range(n))
    plan = compile_graph(GraphIR((InputDecl("x"),), nodes, (f"n{n - 1}",)), registry)
    ev = evaluate(plan, {"x": np.float64(2.0)})
    assert ev.output_value == 2.0  # an even number of negations
    assert ev.grad("x") == 1.0 and ev.grad("n0") == -1.0


def test_float32_stays_float32(registry):
    graph = GraphIR((InputDecl("x", "float32", (3,)),), (Node("s", "sigmoid", ("x",)), Node("t", "sum", ("s",))), ("t",))
    ev = evaluate(compile_graph(graph, registry), {"x": np.array([0.0, 1.0, -1.0], np.float32)})
    assert ev.value("s").dtype == np.float32 and ev.grad("x").dtype == np.float32


def test_operators_without_infer_are_checked_as_values_appear(registry):
    from chainrule.core import OpDef, Registry

    def grow(x):
        return np.zeros(1000)  # no infer rule: the size is known only once it exists

    ops = Registry([*registry, OpDef("test.grow", 1, grow, lambda g, out, x: (None,))])
    graph = GraphIR((InputDecl("x"),), (Node("big", "test.grow", ("x",)), Node("s", "sum", ("big",))), ("s",))
    plan = compile_graph(graph, ops, Limits(max_memory_bytes=10_000))
    with pytest.raises(E.LimitExceeded) as info:
        evaluate(plan, {"x": np.float64(1)})
    assert info.value.node == "big" and info.value.limit == "max_memory_bytes"
    ev = evaluate(compile_graph(graph, ops), {"x": np.float64(1)})
    assert ev.value("s") == 0 and ev.grad("big").shape == (1000,)  # downstream shapes found at run time


def test_none_for_an_attribute_with_a_real_default_is_refused_naming_it():
    """Issue 17: "an int attribute given None silently takes its default". None is a value only where
    it is the default itself (sum's axis: all axes)."""
    import pytest

    from chainrule.core import check_attrs
    from chainrule.core.errors import BadAttributeError
    from chainrule.plugins.manager import load_registry

    registry = load_registry(entry_points=False)
    with pytest.raises(BadAttributeError, match=r"attribute 'axis' is None; leave it out for its default \(-1\)") as caught:
        check_attrs(registry["softmax"], {"axis": None}, node="p")
    assert caught.value.field == "attrs.axis" and caught.value.node == "p"
    with pytest.raises(BadAttributeError, match="attribute .epsilon. is None"):
        check_attrs(registry["layer_norm"], {"epsilon": None})
    assert check_attrs(registry["sum"], {"axis": None})["axis"] is None  # None is sum's own default


def test_a_list_attribute_of_millions_is_refused_before_its_values_are_read():
    """Issue 14: a 30 MB ints attribute cost 11-14 s of CPU, mostly checking and formatting the error."""
    import time

    import pytest

    from chainrule.core.errors import BadAttributeError
    from chainrule.core.operator import MAX_ATTR_LIST, coerce_attr
    from chainrule.v1 import chainrule_pb2 as pb
    from chainrule.wire.convert import graph_from_proto

    graph = pb.Graph(outputs=["s"])
    graph.inputs.add(name="x", dtype=pb.FLOAT64, shape=[3])
    node = graph.nodes.add(name="s", op="sum", inputs=["x"])
    node.attrs["axis"].ints.values.extend(range(3_000_000))
    started = time.perf_counter()
    with pytest.raises(BadAttributeError, match=f"3000000 values; a list attribute holds at most {MAX_ATTR_LIST}") as caught:
        graph_from_proto(graph)
    assert time.perf_counter() - started < 0.1
    assert caught.value.field == "graph.nodes[0].attrs.axis"
    with pytest.raises(ValueError, match="a list attribute holds at most"):  # Python callers: the same limit
        coerce_attr("floats", [0.5] * (MAX_ATTR_LIST + 1))
    assert len(coerce_attr("ints", list(range(MAX_ATTR_LIST)))) == MAX_ATTR_LIST
