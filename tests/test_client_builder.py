"""The graph builder: nodes, names, attributes, constants and the JSON file format."""
from __future__ import annotations

import json

import numpy as np
import pytest

from chainrule.client import Graph, GraphBuilder, ops
from chainrule.wire.convert import attr_to_python, tensor_to_array
from chainrule.v1 import chainrule_pb2 as pb


def nodes_by_name(graph: Graph) -> dict[str, pb.Node]:
    return {n.name: n for n in graph.message.nodes}


def attrs_of(node: pb.Node) -> dict:
    return {k: attr_to_python(v, field=k) for k, v in node.attrs.items()}


def const_value(node: pb.Node) -> np.ndarray:
    assert node.op == "const"
    return tensor_to_array(node.attrs["value"].tensor, field="value")


def test_circuit_nodes_names_and_outputs():
    g = GraphBuilder()
    x, y, z = g.input("x"), g.input("y"), g.input("z")
    p = (x + y).named("p")
    f = (p * z).named("f")
    g.output(f)
    m = g.build().message
    assert [(d.name, d.dtype, list(d.shape)) for d in m.inputs] == [
        ("x", pb.FLOAT64, []), ("y", pb.FLOAT64, []), ("z", pb.FLOAT64, [])]
    assert [(n.name, n.op, list(n.inputs)) for n in m.nodes] == [("p", "add", ["x", "y"]), ("f", "mul", ["p", "z"])]
    assert list(m.outputs) == ["f"]


def test_declared_input_dtype_and_any_size_shape():
    g = GraphBuilder()
    w = g.input("W", shape=(-1, 3), dtype="float32")
    labels = g.input("labels", shape=(4,), dtype=np.int64)
    g.output(w)
    decls = {d.name: d for d in g.build().message.inputs}
    assert (decls["W"].dtype, list(decls["W"].shape)) == (pb.FLOAT32, [-1, 3])
    assert (decls["labels"].dtype, list(decls["labels"].shape)) == (pb.INT64, [4])
    assert w.dtype == "float32" and labels.dtype == "int64"
    with pytest.raises(ValueError, match="invalid shape"):
        g.input("bad", shape=(-2,))
    with pytest.raises(TypeError, match="unsupported dtype"):
        g.input("c", dtype="complex128")


def test_automatic_names_count_up_and_are_readable():
    g = GraphBuilder()
    x, y = g.input("x"), g.input("y")
    a = x + y
    b = a * x
    c = -b
    d = c.sigmoid()
    e = g.op("acme.swish", d, beta=2.0)
    assert [v.name for v in (a, b, c, d, e)] == ["add_1", "mul_2", "neg_3", "sigmoid_4", "swish_5"]
    node = nodes_by_name(g.build([e]))["swish_5"]
    assert node.op == "acme.swish" and list(node.inputs) == ["sigmoid_4"]
    assert attrs_of(node) == {"beta": 2.0}


def test_automatic_name_skips_a_name_the_user_took():
    g = GraphBuilder()
    x = g.input("x")
    taken = (x * 2).named("add_3")   # mul_2 + const_1; the next automatic add would be add_3
    s = x + taken
    assert s.name == "add_4"
    assert len(set(g.names)) == len(g.names)


def test_duplicate_names_are_rejected():
    g = GraphBuilder()
    x = g.input("x")
    assert g.input("x") is x  # the same declaration again is the same input (see test_builder_pruning.py)
    with pytest.raises(ValueError, match="'x' is already declared as float64 of shape \\[\\]"):
        g.input("x", shape=(2,))
    p = (x + 1).named("p")
    with pytest.raises(ValueError, match="'p' is already used"):
        g.input("p")
    with pytest.raises(ValueError, match="'p' is already used"):
        (x * 3).named("p")
    with pytest.raises(ValueError, match="'p' is already used"):
        x.exp(name="p")
    with pytest.raises(ValueError, match="'x' is already used"):
        p.named("x")
    with pytest.raises(ValueError, match="non-empty"):
        p.named("")
    assert p.named("p") is p  # renaming to its own name is fine


def test_renaming_after_use_updates_references():
    g = GraphBuilder()
    x = g.input("x")
    p = x + 1
    q = p * x
    p.named("p")
    g.output(q)
    assert list(nodes_by_name(g.build())[q.name].inputs) == ["p", "x"]


def test_every_overload_makes_its_operator():
    g = GraphBuilder()
    x, y = g.input("x", (2, 2)), g.input("y", (2, 2))
    built = {
        "add": x + y, "sub": x - y, "mul": x * y, "div": x / y, "pow": x ** y, "matmul": x @ y, "neg": -x,
        "abs": abs(x),
    }
    for op, var in built.items():
        assert var.op == op
        assert [v.name for v in var.inputs] == (["x", "y"] if op not in ("neg", "abs") else ["x"])
    assert +x is x


@pytest.mark.parametrize("expression, op, const_first", [
    (lambda x: 2 + x, "add", True), (lambda x: x + 2, "add", False),
    (lambda x: 2 - x, "sub", True), (lambda x: x - 2, "sub", False),
    (lambda x: 2 * x, "mul", True), (lambda x: 2 / x, "div", True),
    (lambda x: x / 2, "div", False), (lambda x: 2 ** x, "pow", True), (lambda x: x ** 2, "pow", False),
])
def test_reflected_operators_with_python_numbers(expression, op, const_first):
    g = GraphBuilder()
    x = g.input("x")
    v = expression(x)
    assert v.op == op
    const, other = (v.inputs[0], v.inputs[1]) if const_first else (v.inputs[1], v.inputs[0])
    assert other is x
    value = const_value(nodes_by_name(g.build([v]))[const.name])
    assert value.dtype == np.float64 and value.shape == () and value == 2.0


def test_python_scalar_takes_the_float_dtype_of_the_other_operand():
    g = GraphBuilder()
    w = g.input("w", (3,), dtype="float32")
    v = 2 * w + 0.5
    assert v.dtype == "float32"
    nodes = nodes_by_name(g.build([v]))
    consts = [const_value(n) for n in nodes.values() if n.op == "const"]
    assert [c.dtype for c in consts] == [np.float32, np.float32]
    labels = g.input("labels", (3,), dtype="int32")
    shifted = labels + 1
    assert shifted.dtype == "int32"
    assert const_value(nodes_by_name(g.build([shifted]))[shifted.inputs[1].name]).dtype == np.int32


def test_numpy_arrays_become_constants_and_keep_their_dtype():
    g = GraphBuilder()
    x = g.input("x", (3,))
    arr = np.array([1.0, 2.0, 3.0])
    left, right = arr * x, x @ np.eye(3, dtype=np.float32)
    assert left.op == "mul" and left.inputs[1] is x      # numpy deferred to Var.__rmul__
    assert right.op == "matmul" and right.inputs[0] is x
    nodes = nodes_by_name(g.build([left, right]))
    np.testing.assert_array_equal(const_value(nodes[left.inputs[0].name]), arr)
    eye = const_value(nodes[right.inputs[1].name])
    assert eye.dtype == np.float32 and np.array_equal(eye, np.eye(3))
    big = np.arange(1000.0)
    assert nodes_by_name(g.build([x + big]))[g.names[-2]].attrs["value"].tensor.WhichOneof("payload") == "data"
    assert nodes[left.inputs[0].name].attrs["value"].tensor.WhichOneof("payload") == "values"  # readable JSON


def test_methods_and_functions_set_attributes():
    g = GraphBuilder()
    x = g.input("x", (2, 3))
    cases = [
        (x.sum(axis=0), "sum", {"axis": 0}),
        (x.mean(axis=(0, 1), keepdims=True), "mean", {"axis": [0, 1], "keepdims": True}),
        (x.max(), "max", {}),
        (x.logsumexp(1), "logsumexp", {"axis": 1}),
        (x.reshape(3, 2), "reshape", {"shape": [3, 2]}),
        (x.reshape((6,)), "reshape", {"shape": [6]}),
        (x.T, "transpose", {}),
        (x.transpose(1, 0), "transpose", {"axes": [1, 0]}),
        (x.leaky_relu(0.2), "leaky_relu", {"alpha": 0.2}),
        (x.clip(0, 1.5), "clip", {"min": 0, "max": 1.5}),
        (x.clip(max=1.0), "clip", {"max": 1.0}),
        (x.softmax(axis=-1), "softmax", {"axis": -1}),
        (x.squeeze(0), "squeeze", {"axis": 0}),
        (x.expand_dims(0), "expand_dims", {"axis": 0}),
        (x.broadcast_to(4, 2, 3), "broadcast_to", {"shape": [4, 2, 3]}),
        (x.slice([0, 1], [1, 3], axes=[0, 1]), "slice", {"starts": [0, 1], "ends": [1, 3], "axes": [0, 1]}),
        (ops.concat([x, x], axis=0), "concat", {"axis": 0}),
        (ops.stack([x, x], axis=1), "stack", {"axis": 1}),
        (ops.log_softmax(x, axis=1), "log_softmax", {"axis": 1}),
        (ops.transpose(x, [1, 0]), "transpose", {"axes": [1, 0]}),
        (x.stop_gradient(), "stop_gradient", {}),
    ]
    nodes = nodes_by_name(g.build([v for v, _, _ in cases]))
    for var, op, attrs in cases:
        node = nodes[var.name]
        assert node.op == op, var
        assert attrs_of(node) == attrs, var
    assert list(nodes[cases[16][0].name].inputs) == ["x", "x"]


def test_indexing_makes_slice_and_squeeze_nodes():
    g = GraphBuilder()
    x = g.input("x", (4, 5))
    row = x[1]
    assert row.op == "squeeze" and attrs_of(nodes_by_name(g.build([row]))[row.name]) == {"axis": [0]}
    sliced = row.inputs[0]
    assert attrs_of(nodes_by_name(g.build([row]))[sliced.name]) == {"starts": [1], "ends": [2], "axes": [0]}
    tail = x[1:, ::-2]
    assert attrs_of(nodes_by_name(g.build([tail]))[tail.name]) == {
        "starts": [1, 2 ** 62], "ends": [2 ** 62, -(2 ** 62)], "axes": [0, 1], "steps": [1, -2]}
    last = x[:, -1]
    assert attrs_of(nodes_by_name(g.build([last]))[last.inputs[0].name])["ends"] == [2 ** 62]
    assert x[:] is x
    with pytest.raises(TypeError, match="integer and slice"):
        x[None]
    with pytest.raises(TypeError, match="cannot be iterated"):
        list(x)


def test_functions_for_losses_and_selection():
    g = GraphBuilder()
    logits = g.input("logits", (4, 3))
    labels = g.input("labels", (4,), dtype="int64")
    target = g.input("target", (4, 3))
    mask = g.input("mask", (4, 3), dtype="bool")
    ce = ops.cross_entropy(logits, labels, name="ce")
    mse = ops.mse(logits, target)
    chosen = ops.where(mask, logits, 0.0)
    assert (ce.name, ce.op, [v.name for v in ce.inputs]) == ("ce", "cross_entropy", ["logits", "labels"])
    assert mse.op == "mse" and mse.dtype == "float64"
    assert chosen.op == "where" and chosen.inputs[0] is mask and chosen.inputs[2].op == "const"
    assert ops.maximum(logits, 0).op == "maximum" and ops.minimum(0, logits).inputs[1] is logits
    with pytest.raises(TypeError, match="at least one argument must be a Var"):
        ops.add(1, 2)


def test_vars_of_another_builder_are_refused():
    a, b = GraphBuilder(), GraphBuilder()
    x, y = a.input("x"), b.input("y")
    with pytest.raises(ValueError, match="another GraphBuilder"):
        x + y
    with pytest.raises(TypeError, match="cannot use str"):
        x + "two"


def test_json_round_trip_is_the_same_message():
    g = GraphBuilder(metadata={"requires": "acme>=0.2"})
    x = g.input("x", (2,), dtype="float32")
    w = g.input("w", (2, 2))
    y = ((x @ w).sigmoid().sum(axis=0) * 0.5 + np.array([1.0, 2.0])).named("y")
    g.output(y)
    graph = g.build()
    text = graph.to_json()
    parsed = json.loads(text)
    assert parsed["outputs"] == ["y"] and parsed["metadata"] == {"requires": "acme>=0.2"}
    again = Graph.from_json(text)
    assert again.message == graph.message
    assert again.message.SerializeToString(deterministic=True) == graph.message.SerializeToString(deterministic=True)
    assert again.outputs == ["y"]
    assert again.inputs == {"x": ("float32", (2,)), "w": ("float64", (2, 2))}


def test_graph_file_save_and_load(tmp_path):
    g = GraphBuilder()
    x = g.input("x")
    g.output((x * x + x).named("f"))
    path = tmp_path / "graph.json"
    g.build().save(path)
    assert Graph.load(path).message == g.build().message


def test_from_json_rejects_unknown_fields():
    with pytest.raises(Exception, match="nodez"):
        Graph.from_json('{"nodez": []}')


def test_build_is_cached_until_the_builder_changes():
    g = GraphBuilder()
    x = g.input("x")
    f = x * 2
    assert f.graph is f.graph
    first = f.graph
    f.named("f")
    assert f.graph is not first and f.graph.outputs == ["f"]
    g.output(f)
    other = x + 1
    assert other.graph.outputs == [other.name]  # a Var's graph has it alone as output, marked ones or not
    assert g.graph.outputs == ["f"] and g.graph is g.build()
    with pytest.raises(ValueError, match="no outputs"):
        GraphBuilder().build()


def test_comparing_a_var_with_a_value_is_an_error_not_a_silent_false():
    g = GraphBuilder()
    x, y = g.input("x"), g.input("y")
    for compare in (lambda: x == 0, lambda: x != 0.0, lambda: np.float64(0) == x, lambda: x == np.zeros(3)):
        with pytest.raises(TypeError, match="comparisons build no node"):
            compare()
    assert x == x and x != y and {x: 1, y: 2}[y] == 2 and y in [x, y]  # identity, as keys and in lists


def test_a_built_graph_pickles_and_deep_copies_as_a_plain_graph():
    import copy
    import pickle

    g = GraphBuilder()
    x = g.input("x")
    graph = (x * 2.0).named("f").graph
    for twin in (pickle.loads(pickle.dumps(graph)), copy.deepcopy(graph)):
        assert twin.message == graph.message and twin.builder is None
    assert graph.builder is g  # the original keeps its builder


def test_op_is_the_one_name_for_any_operator():
    g = GraphBuilder()
    x = g.input("x", (3,), dtype="float32")
    h = ops.op("acme.swish", x, beta=2.0, name="h")
    assert (h.op, h.name, h.inputs, h.dtype) == ("acme.swish", "h", (x,), "float32")
    assert attrs_of(nodes_by_name(g.build([h]))["h"]) == {"beta": 2.0}
    assert g.op("add", x, 1).dtype == "float32" and g.op("const", value=np.zeros(2, np.int32)).dtype == "int32"
    assert not hasattr(GraphBuilder, "apply") and not hasattr(ops, "apply")
