"""Intra-op threads (core/parallel.py): a large elementwise node's forward runs in slices on several
threads; the answers are the bits of one thread, stops and errors come through, and nothing leaks."""
from __future__ import annotations

import multiprocessing
import threading
import warnings

import numpy as np
import pytest

from chainrule.core import GraphIR, InputDecl, Node, compile_graph, evaluate, parallel
from chainrule.core.engine import PARALLEL_MIN_ELEMENTS, StopToken
from chainrule.core.errors import CancelledError, OperatorFailure
from chainrule.core.operator import OpDef
from chainrule.core.registry import Registry

N = PARALLEL_MIN_ELEMENTS + 12_345  # (not a multiple of anything)


@pytest.fixture
def threads():
    """Set the intra-op threads for one test, and put them back after."""
    before = parallel.threads()
    yield parallel.set_threads
    parallel.set_threads(before)


def mixed_graph():
    """Elementwise nodes of every kind of forward_into: a ufunc with out=, in-place passes (sigmoid,
    softplus), a fresh result copied (erf, gelu), and one written over a dead input's buffer."""
    nodes = (Node("p", "mul", ("a", "b")), Node("q", "add", ("p", "c")), Node("s", "sigmoid", ("q",)),
             Node("e", "erf", ("a",)), Node("u", "gelu", ("b",)), Node("v", "softplus", ("c",)),
             Node("w", "add", ("e", "u")), Node("x", "mul", ("w", "v")), Node("y", "add", ("x", "s")),
             Node("f", "sum", ("y",)))
    return GraphIR(tuple(InputDecl(name, shape=(N,)) for name in "abc"), nodes, ("f",))


def test_every_thread_count_gives_the_bits_of_one(registry, threads, monkeypatch):
    rng = np.random.default_rng(7)
    inputs = {name: rng.normal(scale=3.0, size=N) for name in "abc"}
    shares = []
    run_shares = parallel.run_shares
    monkeypatch.setattr(parallel, "run_shares", lambda work, blocks, check: (
        shares.append(len(blocks)), run_shares(work, blocks, check)))
    results = []
    for count in (1, 2, 3, 8):
        threads(count)
        plan = compile_graph(mixed_graph(), registry)
        results.append(evaluate(plan, inputs, keep=()))
    # the 9 elementwise forwards, then the 3 vjps with vjp_into (sigmoid, two muls), cut for 2, 3 and 8
    # threads: into 8 blocks (4 per thread) or, for more threads, blocks of at least 2^15 elements (9)
    assert shares == [8] * 12 + [9] * 12 + [9] * 12
    one = results[0]
    for other in results[1:]:
        assert other.output_value.tobytes() == one.output_value.tobytes()
        for name in "abc":
            assert other.grad(name).tobytes() == one.grad(name).tobytes()


def test_a_two_dimensional_node_is_cut_along_its_first_long_axis(registry, threads, monkeypatch):
    threads(4)
    cut = []
    run_shares = parallel.run_shares
    monkeypatch.setattr(parallel, "run_shares", lambda work, blocks, check: (
        cut.append(blocks), run_shares(work, blocks, check)))
    graph = GraphIR((InputDecl("x", shape=(1, N)),), (Node("y", "tanh", ("x",)), Node("f", "sum", ("y",))), ("f",))
    x = np.linspace(-3.0, 3.0, N).reshape(1, N)
    result = evaluate(compile_graph(graph, registry), {"x": x})
    assert result.value("y").tobytes() == np.tanh(x).tobytes()
    blocks = cut[0]  # the forward's: along axis 1, every column once
    assert len(blocks) > 4 and all(block[0] == slice(None) for block in blocks)
    assert sum(block[1].stop - block[1].start for block in blocks) == N


def two_threads_each_take_a_block(work):
    """``work`` for blocks 0 and 1 wrapped so that each waits for the other: two threads must take
    one each (a helper that never ran would leave the caller waiting, and the test failing)."""
    barrier = threading.Barrier(2, timeout=10)
    seen = []

    def paired(block):
        if block < 2:
            barrier.wait()
            seen.append(threading.get_ident())
        work(block)
    return paired, seen


def test_a_helper_thread_runs_in_the_callers_errstate(threads):
    threads(2)
    paired, seen = two_threads_each_take_a_block(lambda block: np.exp(np.full(4, 1000.0)))
    with warnings.catch_warnings(), np.errstate(over="ignore"):
        warnings.simplefilter("error")  # an overflow warning in either thread would fail the call
        parallel.run_shares(paired, list(range(8)))
    assert len(set(seen)) == 2


def test_a_helpers_exception_comes_through_and_leaves_the_others_no_block(threads):
    """Blocks 0 and 1 go to two threads (the barrier); the helper's fails; the call raises it, and
    the calling thread takes no more than a few blocks after it (the rest are drained)."""
    threads(2)
    done = []

    def work(block):
        if block < 2 and threading.current_thread() is not threading.main_thread():
            raise ValueError("a helper's block failed")
        done.append(block)

    paired, seen = two_threads_each_take_a_block(work)
    with pytest.raises(ValueError, match="a helper's block failed"):
        parallel.run_shares(paired, list(range(10_000)))
    assert len(set(seen)) == 2 and len(done) < 10_000


def test_a_stop_reaches_every_thread(registry, threads):
    threads(2)
    plan = compile_graph(mixed_graph(), registry)
    token = StopToken(event=threading.Event())
    token.event.set()
    with pytest.raises(CancelledError):
        evaluate(plan, {name: np.ones(N) for name in "abc"}, token=token)


def failing_registry(registry):
    """test.half_bad: doubles its input, but its forward_into fails on any slice holding a 7."""
    def into(out, x):
        if (x == 7.0).any():
            raise ValueError("a seven")
        return np.multiply(x, 2.0, out=out)

    bad = OpDef("test.half_bad", 1, lambda x: 2.0 * x, lambda g, out, x: (2.0 * g,), lambda x: x,
                plugin="half", forward_into=into)
    return Registry([*registry, bad])


def test_an_error_in_a_block_of_a_cut_node_names_the_node_and_the_pool_works_after(registry, threads):
    """(Which thread takes the failing block varies; test_a_helpers_exception_comes_through... makes
    it a helper's.)"""
    threads(2)
    graph = GraphIR((InputDecl("x", shape=(N,)),), (Node("y", "test.half_bad", ("x",)), Node("f", "sum", ("y",))),
                    ("f",))
    plan = compile_graph(graph, failing_registry(registry))
    x = np.ones(N)
    x[-1] = 7.0  # in the last block
    with pytest.raises(OperatorFailure) as info:
        evaluate(plan, {"x": x})
    assert info.value.node == "y" and "ValueError: a seven" in info.value.message
    x[-1] = 1.0
    assert float(evaluate(plan, {"x": x}).output_value) == 2.0 * N  # the pool still works


def test_an_overflow_in_a_cut_node_stays_quiet(registry, threads):
    """exp overflows in the last block of a node cut for two threads: no warning, inf (that a helper
    keeps the caller's errstate: test_a_helper_thread_runs_in_the_callers_errstate)."""
    threads(2)
    graph = GraphIR((InputDecl("x", shape=(N,)),), (Node("y", "exp", ("x",)), Node("f", "sum", ("y",))), ("f",))
    x = np.zeros(N)
    x[-1] = 1000.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = evaluate(compile_graph(graph, registry), {"x": x})
    assert np.isinf(result.value("y")[-1]) and result.value("y")[0] == 1.0


def _child(queue):
    from chainrule.plugins.manager import load_plugins
    registry = load_plugins(entry_points=False, only=["builtin"]).registry
    graph = GraphIR((InputDecl("x", shape=(N,)),), (Node("y", "sin", ("x",)), Node("f", "sum", ("y",))), ("f",))
    queue.put(float(evaluate(compile_graph(graph, registry), {"x": np.zeros(N)}).output_value))


def test_a_forked_child_gets_helpers_of_its_own(registry, threads):
    """The parent's helper threads do not exist in a forked child: it must not wait on them."""
    threads(2)
    graph = GraphIR((InputDecl("x", shape=(N,)),), (Node("y", "sin", ("x",)), Node("f", "sum", ("y",))), ("f",))
    evaluate(compile_graph(graph, registry), {"x": np.zeros(N)})  # the parent's pool exists now
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child, args=(queue,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (JAX, when loaded, warns of any fork)
        child.start()
    child.join(60)
    assert child.exitcode == 0 and queue.get(timeout=5) == 0.0


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2"])
def test_a_thread_count_must_be_a_whole_number_of_at_least_one(bad):
    with pytest.raises(ValueError, match="threads"):
        parallel.set_threads(bad)
