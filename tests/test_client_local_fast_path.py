"""The repeated call's fast path (client/request.py CallTemplates, server/local.py): what a call resolves
to before its inputs is kept per client and reused only while it still holds, and the caller's arrays
stay theirs whatever form they come in."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from chainrule.client import GraphBuilder, InvalidArgument, Internal
from chainrule.server import LocalClient


@pytest.fixture(scope="module")
def client():
    return LocalClient()


def layer():
    """f = sum(tanh(x * w + b)), with h = tanh(...) and an input 'unused' that f does not read."""
    g = GraphBuilder()
    x, w, b = g.input("x", (3,)), g.input("w", (3,)), g.input("b", (3,))
    g.input("unused", (3,))
    h = (x * w + b).tanh(name="h")
    return g, h, h.sum(name="f")


FEEDS = {"x": np.array([0.5, -1.0, 2.0]), "w": np.array([1.5, 0.25, -0.5]), "b": np.array([0.1, 0.2, 0.3])}


def counting_graph_for(monkeypatch, g):
    calls = []
    real = g.graph_for

    def graph_for(*targets):
        calls.append(targets)
        return real(*targets)

    monkeypatch.setattr(g, "graph_for", graph_for)
    return calls


def test_a_repeated_call_resolves_nothing_again_until_the_builder_changes(client, monkeypatch):
    g, h, f = layer()
    calls = counting_graph_for(monkeypatch, g)
    first = client.evaluate(f, FEEDS, grads=["w", "b"], diagnostics=False)
    second = client.evaluate(f, FEEDS, grads=["w", "b"], diagnostics=False)
    assert len(calls) == 1 and first.graph is second.graph
    assert first.grad["w"].tobytes() == second.grad["w"].tobytes()
    (h * 2.0).named("other")  # a new node elsewhere: resolved again, to the same graph
    third = client.evaluate(f, FEEDS, grads=["w", "b"], diagnostics=False)
    assert len(calls) == 2 and third.graph is first.graph


def test_a_rename_between_calls_is_seen(client):
    g, h, f = layer()
    assert "h" in client.evaluate(f, FEEDS, values=[h]).values
    h.named("hidden")
    again = client.evaluate(f, FEEDS, values=[h])
    assert "hidden" in again.values and "h" not in again.values
    np.testing.assert_array_equal(again.values[h], np.tanh(FEEDS["x"] * FEEDS["w"] + FEEDS["b"]))


def test_a_selection_changed_in_place_is_seen(client):
    g, h, f = layer()
    chosen = ["w"]
    assert set(client.evaluate(f, FEEDS, grads=chosen).grad) == {"w"}
    chosen.append("b")
    assert set(client.evaluate(f, FEEDS, grads=chosen).grad) == {"w", "b"}


def test_a_metadata_change_between_calls_is_seen(client):
    g, h, f = layer()
    before = client.evaluate(f, FEEDS).graph_id
    g.metadata["run"] = "2"
    after = client.evaluate(f, FEEDS)
    assert after.graph_id != before and after.graph.message.metadata["run"] == "2"


def test_a_graphs_selection_of_vars_is_resolved_on_every_call(client):
    """A Graph is frozen, but the names of Vars selected from it are read afresh: a renamed one is
    not in the graph any more."""
    g, h, f = layer()
    graph = g.graph_for(f, h)
    assert "h" in client.evaluate(graph, FEEDS, output="f", values=[h]).values
    h.named("hidden")
    with pytest.raises(InvalidArgument, match="hidden"):
        client.evaluate(graph, FEEDS, output="f", values=[h])


@pytest.mark.parametrize("selection", [{"values": ["nope"]}, {"grads": ["w", "nope"]}])
def test_an_unknown_name_fails_alike_on_every_call(client, selection):
    g, h, f = layer()
    errors = []
    for _ in range(3):
        with pytest.raises(InvalidArgument) as info:
            client.evaluate(f, FEEDS, **selection)
        errors.append((type(info.value), info.value.reason, info.value.message))
    assert errors[0] == errors[1] == errors[2] and "nope" in errors[0][2]
    assert client.evaluate(f, FEEDS).value == client.evaluate(f, FEEDS).value  # the call itself still works


def test_the_callers_mapping_is_read_never_changed_and_unused_inputs_are_ignored(client):
    g, h, f = layer()
    given = dict(FEEDS)
    expected = np.tanh(FEEDS["x"] * FEEDS["w"] + FEEDS["b"]).sum()
    for _ in range(2):
        assert client.evaluate(f, given).value == expected
        assert given.keys() == FEEDS.keys() and all(given[k] is FEEDS[k] for k in FEEDS)
    with_unused = {**FEEDS, "unused": np.zeros(3)}
    assert client.evaluate(f, with_unused).value == expected and "unused" in with_unused
    assert client.evaluate(f, {"x": FEEDS["x"]}, w=FEEDS["w"], b=FEEDS["b"]).value == expected  # mapping and keywords
    assert client.evaluate(f, **FEEDS).value == expected


def test_unused_inputs_are_dropped_and_an_undeclared_name_refused_on_every_call(client):
    g, h, f = layer()
    expected = np.tanh(FEEDS["x"] * FEEDS["w"] + FEEDS["b"]).sum()
    with_unused = {**FEEDS, "unused": np.zeros(3)}
    for _ in range(3):
        assert client.evaluate(f, with_unused).value == expected
    with_typo = {**with_unused, "bb": np.zeros(3)}
    for _ in range(2):
        with pytest.raises(InvalidArgument) as info:
            client.evaluate(f, with_typo)
        assert info.value.reason == "UNEXPECTED_INPUT" and "'bb'" in info.value.message
    missing = {"x": FEEDS["x"], "w": FEEDS["w"], "unused": np.zeros(3)}
    for _ in range(2):
        with pytest.raises(InvalidArgument, match="'b'"):
            client.evaluate(f, missing)
    g.input("bb", (3,))  # now an unused input of the builder: dropped too
    assert client.evaluate(f, with_typo).value == expected


def test_a_selection_given_as_an_iterator_is_read_once_per_call(client):
    g, h, f = layer()
    for _ in range(2):
        assert set(client.evaluate(f, FEEDS, grads=(n for n in ["w", "b"])).grad) == {"w", "b"}


def test_the_kept_templates_are_bounded(client):
    local = LocalClient()  # a fresh client, its own templates
    for _ in range(local._templates.MAX_TEMPLATES + 5):
        g, h, f = layer()
        local.evaluate(f, FEEDS)
    assert len(local._templates._known) <= local._templates.MAX_TEMPLATES


class Tagged(np.ndarray):
    """An ndarray subclass, as np.memmap is: numpy views it as a base-class array sharing its memory."""


def test_an_array_subclass_is_handed_over_read_only_and_never_aliased(client):
    from test_client_local import scribbling_client

    local = scribbling_client()
    g = GraphBuilder()
    x = g.input("x", (4,))
    data = np.zeros(4).view(Tagged)
    with pytest.raises(Internal) as info:
        local.evaluate(g.op("test.scribble", x, name="s").sum(name="f"), x=data)
    assert info.value.node == "s" and not data.any()
    result = local.evaluate(x.reshape((2, 2)).named("r"), x=data, seed=np.ones((2, 2)), values="all")
    data[:] = 5.0
    assert not np.shares_memory(result.values["x"], data) and not np.shares_memory(result.value, data)
    assert not result.values["x"].any() and not result.value.any()


def test_a_python_float_gives_the_bits_of_the_array_it_stands_for(client):
    g = GraphBuilder()
    x, y = g.input("x"), g.input("y")
    f = (x * y + x.sin()).named("f")
    plain = client.evaluate(f, x=0.3, y=-1.7, values="all")
    arrays = client.evaluate(f, x=np.float64(0.3), y=np.array(-1.7), values="all")
    assert plain.value.tobytes() == arrays.value.tobytes()
    assert all(plain.grad[n].tobytes() == arrays.grad[n].tobytes() for n in ("x", "y"))
    assert not plain.values["x"].flags.writeable


def test_threads_sharing_a_client_and_a_call_get_their_own_results(client):
    g, h, f = layer()
    rng = np.random.default_rng(3)
    sets = [{k: rng.normal(size=3) for k in ("x", "w", "b")} for _ in range(8)]
    expected = [client.evaluate(f, s, grads=["w", "b"]).grad["w"].copy() for s in sets]
    failures = []

    def work(k: int) -> None:
        for _ in range(200):
            got = client.evaluate(f, sets[k], grads=["w", "b"], diagnostics=False).grad["w"]
            if got.tobytes() != expected[k].tobytes():
                failures.append(k)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(sets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
