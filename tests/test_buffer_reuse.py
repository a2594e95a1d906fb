"""Values written over buffers whose last reader has run (OpDef.forward_into, engine ``keep=``).

The engine may write an elementwise node's value into an input's buffer when no rule reads that
input again and the caller does not keep it. Checked here: the answers are bit for bit those of
a run that keeps every value, the caller's arrays are never written, a kept or fanned-out value
is never written over, an overwritten value reads as None rather than as another node's numbers,
and every built-in ``forward_into`` gives forward's bits.
"""
from __future__ import annotations

import numpy as np
import pytest

from chainrule.core import GraphIR, compile_graph, evaluate
from chainrule.core.engine import REUSE_MIN_ELEMENTS
from chainrule.plugins.manager import load_registry

REGISTRY = load_registry(entry_points=False)
N = REUSE_MIN_ELEMENTS * 2


def _sigmoid_sum(n: int = N) -> GraphIR:
    """The user's elementwise workload: f = sum(sigmoid(a * b + c))."""
    return GraphIR.build([("a", "float64", (n,)), ("b", "float64", (n,)), ("c", "float64", (n,))],
                         [("t", "mul", ("a", "b")), ("u", "add", ("t", "c")), ("s", "sigmoid", ("u",)),
                          ("f", "sum", ("s",))], "f")


def _inputs(names: str, n: int = N, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.uniform(0.5, 1.5, n) for name in names}


def _same(a, b) -> None:
    assert np.array_equal(np.asarray(a), np.asarray(b)), "not bit for bit the same"


def test_the_sigmoid_sum_writes_over_two_dead_buffers_with_the_same_answers():
    plan = compile_graph(_sigmoid_sum(), REGISTRY)
    inputs = _inputs("abc")
    originals = {k: v.copy() for k, v in inputs.items()}
    everything = evaluate(plan, inputs, wrt=list("abc"))
    lean = evaluate(plan, inputs, wrt=list("abc"), keep=())
    _same(everything.output_value, lean.output_value)
    for name in "abc":
        _same(everything.grad(name), lean.grad(name))
        _same(inputs[name], originals[name])  # the caller's arrays are never written
    overwritten = [plan.names[k] for k, v in enumerate(lean.values) if v is None]
    assert overwritten == ["t", "u"]  # t's buffer took u, then s: one fresh array instead of three


def test_kept_values_are_never_written_over():
    plan = compile_graph(_sigmoid_sum(), REGISTRY)
    inputs = _inputs("abc")
    everything = evaluate(plan, inputs, wrt=list("abc"))
    lean = evaluate(plan, inputs, wrt=list("abc"), keep=["t"])
    _same(lean.value("t"), everything.value("t"))
    assert lean.values[plan.slot("u")] is None  # u's buffer, not t's, took s
    _same(lean.value("s"), everything.value("s"))


def test_without_keep_every_value_is_kept():
    plan = compile_graph(_sigmoid_sum(), REGISTRY)
    result = evaluate(plan, _inputs("abc"))
    assert all(v is not None for v in result.values)


def test_a_value_read_twice_or_through_a_view_or_by_its_own_vjp_is_not_written_over():
    graph = GraphIR.build(
        [("a", "float64", (N,)), ("b", "float64", (N,))],
        [("t", "mul", ("a", "b")),            # read twice: by u and by v
         ("u", "add", ("t", "a")), ("v", "tanh", ("t",)),
         ("w", "exp", ("v",)),                # tanh's vjp reads its output v: w gets a fresh buffer
         ("r", "reshape", ("w",), {"shape": [2, N // 2]}), ("q", "neg", ("r",)),  # r is a view of w
         ("z", "add", ("u", "w")), ("m", "sum", ("z",)), ("n", "sum", ("q",)), ("f", "add", ("m", "n"))],
        "f")
    plan = compile_graph(graph, REGISTRY)
    inputs = _inputs("ab")
    everything = evaluate(plan, inputs)
    lean = evaluate(plan, inputs, keep=())
    _same(everything.output_value, lean.output_value)
    for name in plan.names:
        if everything.grads[plan.slot(name)] is not None:
            _same(everything.grad(name), lean.grad(name))
    for name in ("t", "v", "w", "r"):
        assert lean.values[plan.slot(name)] is not None, name


def test_small_arrays_and_integers_get_fresh_buffers():
    small = compile_graph(_sigmoid_sum(100), REGISTRY)
    assert all(v is not None for v in evaluate(small, _inputs("abc", 100), keep=()).values)
    ints = GraphIR.build([("a", "int64", (N,)), ("b", "int64", (N,))],
                         [("t", "mul", ("a", "b")), ("u", "add", ("t", "a")), ("f", "sum", ("u",))], "f")
    plan = compile_graph(ints, REGISTRY)
    arrays = {"a": np.arange(N, dtype=np.int64), "b": np.ones(N, dtype=np.int64)}
    result = evaluate(plan, arrays, gradients=False, keep=())
    assert all(v is not None for v in result.values)
    assert int(result.output_value) == int((np.arange(N) * 2).sum())


FORWARD_INTO = [op for op in REGISTRY if op.forward_into is not None]


def test_some_builtins_write_in_place():
    assert {"add", "sub", "mul", "neg", "exp", "tanh", "sigmoid"} <= {op.name for op in FORWARD_INTO}


@pytest.mark.parametrize("op", FORWARD_INTO, ids=lambda op: op.name)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_every_forward_into_gives_forwards_bits_over_its_own_input(op, dtype):
    rng = np.random.default_rng(3)
    inputs = [rng.uniform(0.1, 3.0, N).astype(dtype) for _ in range(op.arity)]
    expected = np.asarray(op.forward(*inputs))
    for position in range(op.arity):  # the buffer written over is each input in turn
        given = [x.copy() for x in inputs]
        got = op.forward_into(given[position], *given)
        assert got is given[position]
        _same(got, expected)
        assert got.dtype == expected.dtype


VJP_INTO = [op for op in REGISTRY if op.vjp_into is not None]


def test_some_builtins_write_their_gradients_in_place():
    assert {"mul", "div", "exp", "log", "sin", "cos", "relu", "tanh", "sigmoid"} <= {op.name for op in VJP_INTO}


@pytest.mark.parametrize("op", VJP_INTO, ids=lambda op: op.name)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("seed", ["array", "ones"])  # a gradient, or a sum's broadcast 1 (skipped by some)
def test_every_vjp_into_gives_vjps_bits_whole_and_in_slices(op, dtype, seed):
    """On a node large enough to be cut (at least 2^18 elements), whole and slice by slice, for each
    set of wanted gradients: vjp's bits, and nothing written where no gradient is wanted."""
    from chainrule.core.engine import PARALLEL_MIN_ELEMENTS
    n = PARALLEL_MIN_ELEMENTS
    rng = np.random.default_rng(4)
    inputs = [rng.uniform(0.1, 3.0, n).astype(dtype) for _ in range(op.arity)]
    out = np.asarray(op.forward(*inputs))
    g = rng.normal(size=n).astype(dtype) if seed == "array" else np.broadcast_to(np.ones((), dtype), (n,))
    expected = op.vjp(g, out, *inputs)
    for wanted in ({0}, set(range(op.arity))):
        grads = [np.full(n, np.nan, dtype) if pos in wanted else None for pos in range(op.arity)]
        op.vjp_into(grads, g, out, *inputs)
        sliced = [np.full(n, np.nan, dtype) if pos in wanted else None for pos in range(op.arity)]
        for block in (slice(0, n // 3), slice(n // 3, n)):
            op.vjp_into([None if d is None else d[block] for d in sliced], g[block], out[block],
                        *[x[block] for x in inputs])
        for pos in range(op.arity):
            if pos in wanted:
                _same(grads[pos], np.asarray(expected[pos]).astype(dtype, copy=False))
                _same(sliced[pos], grads[pos])


def test_vjp_into_needs_an_elementwise_operator():
    from chainrule.core import OpDef
    from chainrule.core.errors import InvalidOperatorError
    from chainrule.core.operator import validate_opdef
    with pytest.raises(InvalidOperatorError, match="vjp_into must be callable, for an operator with forward_into"):
        validate_opdef(OpDef("t.no_into", 1, np.exp, lambda g, out, x: (g * out,), lambda x: x,
                             vjp_into=lambda grads, g, out, x: None))


def test_local_client_writes_over_dead_buffers_and_returns_what_was_asked():
    """Through LocalClient: the same answers whether the engine may write over buffers (the
    default) or must keep every value (diagnostics read them all); a value asked for by name is
    kept intact; the caller's arrays are untouched."""
    from chainrule.client import GraphBuilder
    from chainrule.server import LocalClient

    g = GraphBuilder()
    a, b, c = (g.input(name, shape=(N,)) for name in "abc")
    t = (a * b).named("t")
    u = (t + c).named("u")
    f = u.sigmoid().sum().named("f")
    inputs = _inputs("abc")
    originals = {k: v.copy() for k, v in inputs.items()}
    with LocalClient() as client:
        lean = client.evaluate(f, inputs, grads=list("abc"), diagnostics=False)
        full = client.evaluate(f, inputs, grads=list("abc"), diagnostics=True)
        asked = client.evaluate(f, inputs, grads=list("abc"), values=["u"], diagnostics=False)
    _same(lean.value, full.value)
    for name in "abc":
        _same(lean.grad[name], full.grad[name])
        _same(inputs[name], originals[name])
    _same(asked.values["u"], originals["a"] * originals["b"] + originals["c"])


# --- large elementwise nodes run in blocks, with a stop check between blocks --------------------------

def test_blocks_give_the_same_bits_and_a_cancel_stops_between_them(monkeypatch, request):
    import threading

    from chainrule.core import OpDef, Registry, StopToken, TensorSpec
    from chainrule.core import engine, parallel
    from chainrule.core.errors import CancelledError

    monkeypatch.setattr(engine, "BLOCKED_MIN_ELEMENTS", 1 << 12)
    monkeypatch.setattr(engine, "BLOCK_ELEMENTS", 1 << 10)
    threads = parallel.threads()
    parallel.set_threads(1)  # one thread takes the blocks in turn (tests/test_intra_op_threads.py: several)
    request.addfinalizer(lambda: parallel.set_threads(threads))
    graph = GraphIR.build([("x", "float64", (200, 100)), ("y", "float64", (200, 100))],
                          [("p", "pow", ("x", "y")), ("t", "tanh", ("p",)), ("m", "mul", ("t", "x")),
                           ("f", "sum", ("m",))], "f")
    plan = compile_graph(graph, REGISTRY)
    rng = np.random.default_rng(5)
    inputs = {"x": rng.uniform(0.5, 1.5, (200, 100)), "y": rng.uniform(-1, 1, (200, 100))}
    whole = evaluate(plan, inputs)
    blocked = evaluate(plan, inputs, token=StopToken.after(600))
    for name in plan.names:
        _same(whole.value(name), blocked.value(name))
        if whole.grads[plan.slot(name)] is not None:
            _same(whole.grad(name), blocked.grad(name))

    cancel, blocks = threading.Event(), []

    def counted_exp(out, x):
        blocks.append(1)
        cancel.set()  # the caller goes away during the first block
        return np.exp(x, out=out)

    slow = OpDef("t.exp", 1, np.exp, lambda g, out, x: (g * out,), lambda x: TensorSpec(x.shape, x.dtype),
                 vjp_reads="output", forward_into=counted_exp)
    one = GraphIR.build([("x", "float64", (200, 100))], [("e", "t.exp", ("x",)), ("f", "sum", ("e",))], "f")
    with pytest.raises(CancelledError):
        evaluate(compile_graph(one, Registry([*REGISTRY, slow])), {"x": np.zeros((200, 100))},
                 token=StopToken(None, cancel))
    assert blocks == [1]  # stopped at the next block, not after the ~20 blocks of the node


def test_a_sums_gradient_of_ones_is_not_multiplied_in_and_changes_no_bit():
    from chainrule.plugins.builtin.elementwise import ones_broadcast

    assert ones_broadcast(np.broadcast_to(np.float64(1.0), (5, 3)))
    assert not ones_broadcast(np.broadcast_to(np.float64(2.0), (5, 3)))
    assert not ones_broadcast(np.ones((5, 3)))  # a real array: it could hold anything after its first 1
    assert not ones_broadcast(np.float64(1.0))
    sigmoid = REGISTRY["sigmoid"]
    out = sigmoid.forward(np.random.default_rng(2).normal(size=N))
    (lean,) = sigmoid.vjp(np.broadcast_to(np.float64(1.0), out.shape), out, None)
    (full,) = sigmoid.vjp(np.ones(out.shape), out, None)
    _same(lean, full)
