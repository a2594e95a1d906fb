"""A Var's graph holds what it depends on and nothing else; names can be re-declared (notebook re-runs)."""
from __future__ import annotations

import gc

import numpy as np
import pytest

from chainrule.client import GraphBuilder
from chainrule.client.errors import ChainruleRpcError
from chainrule.server import LocalClient
from chainrule.v1 import chainrule_pb2 as pb


def wire(graph) -> bytes:
    return graph.message.SerializeToString(deterministic=True)


def cheap_among_unrelated():
    """A cheap f(x, y) on a builder that also holds an expensive node, a broken one and an unused input."""
    g = GraphBuilder()
    x, y = g.input("x"), g.input("y")
    m = g.input("M", (300, 300))
    expensive = (m @ m @ m).named("expensive")
    broken = (g.input("A", (2, 3)) @ g.input("B", (2, 3))).named("broken")  # (2,3) @ (2,3): a shape error
    f = ((x * y).named("xy") + x).named("f")
    return g, x, y, f, expensive, broken


@pytest.fixture(scope="module")
def client():
    with LocalClient() as c:
        yield c


# --- what graph_for sends ------------------------------------------------------------------------------


def test_unrelated_nodes_and_unused_inputs_are_left_out():
    g, x, y, f, expensive, broken = cheap_among_unrelated()
    m = f.graph.message
    assert [d.name for d in m.inputs] == ["x", "y"]
    assert [(n.name, n.op) for n in m.nodes] == [("xy", "mul"), ("f", "add")]
    assert list(m.outputs) == ["f"]
    names = {n.name for n in m.nodes} | {d.name for d in m.inputs}
    assert not names & {"expensive", "broken", "M", "A", "B"}
    assert f.graph is g.graph_for(f)
    assert set(f.graph.inputs) == {"x", "y"}  # what the lead drops other builder inputs' feeds against
    whole = g.build([f])  # build() still gives everything declared
    assert {"expensive", "broken"} <= set(whole.node_names) and set(whole.inputs) == {"x", "y", "M", "A", "B"}


def test_the_message_is_byte_identical_however_much_is_declared_later(client):
    g, x, y, f, *_ = cheap_among_unrelated()
    before = wire(f.graph)
    gid = client.register(f.graph)
    g.input("late")
    for k in range(50):
        (x * float(k)).exp()
    (f * 2.0).named("g2")
    assert wire(f.graph) == before
    assert wire(g.graph_for(f)) == before
    fresh = GraphBuilder()  # the same circuit declared alone: the same message, hence the same id
    fx, fy = fresh.input("x"), fresh.input("y")
    alone = ((fx * fy).named("xy") + fx).named("f")
    assert wire(alone.graph) == before
    assert client.register(alone.graph) == gid


def test_nodes_are_in_declaration_order_and_outputs_as_given():
    g = GraphBuilder()
    a, b = g.input("a"), g.input("b")
    p = (a + 1.0).named("p")          # const_1, p
    unrelated = (b * 3.0).named("u")  # const_2, u
    q = (p * p).named("q")
    r = (b - a).named("r")
    graph = g.graph_for(r, q, r, q)
    assert graph.outputs == ["r", "q"]  # duplicates once, in the given order
    assert [d.name for d in graph.message.inputs] == ["a", "b"]
    assert graph.node_names == ["const_1", "p", "q", "r"]
    assert "u" not in graph.node_names and unrelated.name == "u"
    assert g.graph_for(q, r).outputs == ["q", "r"] and g.graph_for(q, r) is not graph
    assert g.graph_for(q).inputs == {"a": ("float64", ())}  # b is not used by q


def test_graph_for_checks_its_arguments():
    g, other = GraphBuilder(), GraphBuilder()
    x = g.input("x")
    with pytest.raises(ValueError, match="at least one Var"):
        g.graph_for()
    with pytest.raises(ValueError, match="another GraphBuilder"):
        other.graph_for(x)
    with pytest.raises(TypeError, match="expected a Var"):
        g.graph_for("x")


def test_marked_outputs_belong_to_build_not_to_a_vars_graph():
    g = GraphBuilder()
    x = g.input("x")
    f, h = (x * 2.0).named("f"), (x + 1.0).named("h")
    g.output(f)
    assert h.graph.outputs == ["h"] and "f" not in h.graph.node_names
    assert g.graph.outputs == ["f"] and {"f", "h"} <= set(g.graph.node_names)


def test_a_chain_of_100000_nodes_is_walked_without_recursion():
    g = GraphBuilder()
    x = g.input("x")
    g.input("unused")
    v = x
    for _ in range(100_000):
        v = -v
    graph = v.graph
    assert len(graph) == 100_000 and list(graph.inputs) == ["x"]
    assert graph.message.nodes[0].inputs == ["x"] and graph.message.nodes[-1].name == v.name
    assert v.graph is graph


# --- caching --------------------------------------------------------------------------------------------


def test_cached_until_an_ancestor_is_renamed_or_the_metadata_changes():
    g = GraphBuilder()
    x = g.input("x")
    p = x * 2.0
    f = (p + 1.0).named("f")
    first = f.graph
    assert f.graph is first
    x * 5.0                         # new nodes: ancestors of f do not change
    (g.input("z") * 3.0).named("z3")  # an unrelated rename
    assert f.graph is first
    p.named("p")                    # an ancestor renamed: the message changes
    second = f.graph
    assert second is not first and "p" in second.node_names and first.node_names[1] != "p"
    assert f.graph is second
    f.named("loss")                 # the target itself
    third = f.graph
    assert third is not second and third.outputs == ["loss"]
    g.metadata["requires"] = "acme>=0.2"
    fourth = f.graph
    assert fourth is not third and dict(fourth.message.metadata) == {"requires": "acme>=0.2"}
    assert f.graph is fourth


def test_a_displaced_ancestor_invalidates_too():
    g = GraphBuilder()
    x = g.input("x")
    f = (x * x).named("f")
    before = f.graph
    g.input("x", shape=(3,), replace=True)  # x's Var is now called x_<n>: f's message changes
    after = f.graph
    assert after is not before and list(after.inputs) == [x.name] and x.name != "x"


def test_the_cache_is_bounded():
    g = GraphBuilder()
    x = g.input("x")
    f = (x * 2.0).named("f")
    first = f.graph
    others = [x + float(k) for k in range(GraphBuilder.GRAPH_CACHE_SIZE)]
    for v in others:
        v.graph
    assert len(g._pruned) == GraphBuilder.GRAPH_CACHE_SIZE
    again = f.graph  # dropped as least recently used: built anew, the same message
    assert again is not first and wire(again) == wire(first)
    assert others[-1].graph is others[-1].graph


def test_the_cache_does_not_keep_graphs_of_a_dropped_builder_alive():
    import weakref

    g = GraphBuilder()
    f = (g.input("x") * 2.0).named("f")
    ref = weakref.ref(f.graph)
    del g, f
    gc.collect()
    assert ref() is None


# --- evaluating ------------------------------------------------------------------------------------------


def test_evaluating_a_var_next_to_a_broken_node(client):
    g, x, y, f, expensive, broken = cheap_among_unrelated()
    with pytest.raises(ChainruleRpcError):  # the broken node really is broken
        client.evaluate(broken, A=np.ones((2, 3)), B=np.ones((2, 3)), grads="none")
    result = client.evaluate(f.graph, x=2.0, y=5.0)
    assert result.value == 12.0 and result.grad[x] == 6.0 and result.grad[y] == 2.0
    assert "expensive" not in result.values and "broken" not in result.values
    result = client.evaluate(f, x=2.0, y=5.0)  # the Var itself: the same pruned graph
    assert result.value == 12.0 and result.grad["x"] == 6.0


def test_feeds_for_inputs_the_var_does_not_use_are_dropped(client):
    g, x, y, f, *_ = cheap_among_unrelated()
    result = client.evaluate(f, x=2.0, y=5.0, M=np.eye(300), A=np.ones((2, 3)), B=np.ones((2, 3)))
    assert result.value == 12.0 and set(result.grad) == {"x", "y", "xy", "f"}


# --- re-declaring names (a notebook cell run again) -----------------------------------------------------


def test_named_on_a_taken_name_says_who_holds_it_and_the_way_out():
    g = GraphBuilder()
    x = g.input("x")
    old = (x * x).named("loss")
    new = x * 3.0
    with pytest.raises(ValueError) as info:
        new.named("loss")
    message = str(info.value)
    assert "'loss' is already used" in message and repr(old) in message
    assert ".named('loss', replace=True)" in message
    assert g["loss"] is old and new.name == "mul_3"
    with pytest.raises(ValueError, match=r"replace=True"):
        x.exp(name="loss")


def test_named_with_replace_moves_the_name_and_keeps_the_other_graphs_valid(client):
    g = GraphBuilder()
    x = g.input("x")
    old = (x * x).named("loss")
    old_graph = old.graph
    new = (x * 3.0).named("loss", replace=True)
    assert new.name == "loss" and g["loss"] is new
    assert old.name.startswith("loss_") and g[old.name] is old and old.name in g.names
    assert len(set(g.names)) == len(g.names)
    assert old.graph is not old_graph and old.graph.outputs == [old.name]
    assert client.evaluate(old, x=4.0).value == 16.0
    assert client.evaluate(new, x=4.0).value == 12.0
    assert new.named("loss", replace=True) is new and new.name == "loss"  # already its name: nothing moves


def test_a_notebook_cell_run_twice():
    g = GraphBuilder()

    def cell():
        x = g.input("x", (3,))
        w = g.input("w", (3,))
        loss = ((x * w).sum()).named("loss", replace=True)
        return x, w, loss

    x1, w1, loss1 = cell()
    x2, w2, loss2 = cell()
    assert (x2, w2) == (x1, w1)          # the same inputs again
    assert g["loss"] is loss2 and loss1.name != "loss"
    graph = loss2.graph
    assert list(graph.inputs) == ["x", "w"] and loss1.name not in graph.node_names
    with LocalClient() as client:
        result = client.evaluate(loss2, x=[1.0, 2.0, 3.0], w=[1.0, 1.0, 1.0])
    assert result.value == 6.0 and np.array_equal(result.grad[w2], [1.0, 2.0, 3.0])


def test_an_input_redeclared_differently_is_refused_unless_replaced(client):
    g = GraphBuilder()
    x = g.input("x", (2,))
    assert g.input("x", [2], "float64") is x and g.input("x", (2,), np.float64) is x
    with pytest.raises(ValueError) as info:
        g.input("x", (3,))
    assert "'x' is already declared as float64 of shape [2], not float64 of shape [3]" in str(info.value)
    assert "g.input('x', ..., replace=True)" in str(info.value)
    with pytest.raises(ValueError, match="already declared as float64 .* not float32"):
        g.input("x", (2,), dtype="float32")
    old_f = x.sum().named("f")
    x3 = g.input("x", (3,), replace=True)
    assert x3 is not x and g["x"] is x3 and x3.shape == (3,) and x.name.startswith("x_")
    assert g.input("x", (3,), replace=True) is x3  # replace with the same declaration: nothing to replace
    new_f = (x3 * 2.0).sum().named("f", replace=True)
    assert list(new_f.graph.inputs) == ["x"] and list(old_f.graph.inputs) == [x.name]
    assert client.evaluate(new_f, x=[1.0, 2.0, 3.0]).value == 12.0
    assert client.evaluate(old_f, {x: [1.0, 2.0]}).value == 3.0
    # both are declared in the whole graph
    assert set(g.build([old_f, new_f]).inputs) == {"x", x.name}


def test_an_input_over_a_node_name():
    g = GraphBuilder()
    x = g.input("x")
    node = (x * 2.0).named("y")
    with pytest.raises(ValueError, match=r"'y' is already used in this graph by <Var 'y' = mul.*replace=True"):
        g.input("y")
    y = g.input("y", replace=True)
    assert g["y"] is y and y.op is None and node.name.startswith("y_")
    assert g.graph_for(node).inputs == {"x": ("float64", ())}
    assert isinstance(g.graph_for(node).message, pb.Graph)
