"""The client's operator table (chainrule.client.dtypes.OPERATORS) pinned against the server's built-in operators.

The builder guesses each node's dtype from that one table (the client imports
neither the server nor the plugins); these tests hold it to every built-in
operator's own ``infer`` rule, for every combination of the supported dtypes
that the operator accepts, so a new built-in operator without a table entry,
or a changed dtype rule, fails here.
"""
from __future__ import annotations

import inspect
import itertools

import numpy as np
import pytest

from chainrule.client import GraphBuilder, Var, ops
from chainrule.client import dtypes as client_dtypes
from chainrule.core import VARIADIC, OpDef, OpError, TensorSpec, check_attrs
from chainrule.plugins.manager import BUILTIN_FAMILIES, load_plugins
from chainrule.plugins.testing import sample_inputs

DTYPES = ("float64", "float32", "int64", "int32", "bool")


def _builtin_operators() -> dict[str, OpDef]:
    # env={}: CHAINRULE_PLUGINS / CHAINRULE_DISABLE_PLUGINS must not hide a built-in from this test
    loaded = load_plugins(env={}, entry_points=False)
    builtin = {p.name for p in loaded.plugins if p.builtin}
    assert builtin == {f"builtin.{family}" for family in BUILTIN_FAMILIES}
    return {op.name: op for op in loaded.registry if op.plugin in builtin}


BUILTIN = _builtin_operators()


def test_the_table_lists_exactly_the_builtin_operators():
    table = client_dtypes.OPERATORS
    missing = sorted(set(BUILTIN) - set(table))
    assert not missing, (f"built-in operators without an entry in chainrule.client.dtypes.OPERATORS: {missing}; "
                         f"add one (its arity and dtype rule) so the builder guesses their dtypes")
    stale = sorted(set(table) - set(BUILTIN))
    assert not stale, f"chainrule.client.dtypes.OPERATORS lists operators the server does not have: {stale}"
    for name, op in BUILTIN.items():
        assert table[name].arity == op.arity, f"{name}: table arity {table[name].arity}, server {op.arity}"


def _cases(op: OpDef) -> list[tuple[list[np.ndarray], dict]]:
    return sample_inputs(op, np.random.default_rng(0))


def _server_dtype(op: OpDef, shapes: list[tuple[int, ...]], dtypes: tuple[str, ...], attrs: dict) -> str | None:
    """The operator's own answer, or None when it refuses these dtypes."""
    specs = [TensorSpec(shape, np.dtype(d)) for shape, d in zip(shapes, dtypes)]
    try:
        return np.dtype(op.infer(*specs, **check_attrs(op, attrs)).dtype).name
    except OpError:
        return None


@pytest.mark.parametrize("name", sorted(n for n, op in BUILTIN.items() if not op.several))
def test_the_builders_dtype_guess_is_the_servers(name):
    op = BUILTIN[name]
    mismatches, checked = [], set()
    for inputs, attrs in _cases(op):
        shapes = [np.shape(x) for x in inputs]
        if op.arity == 0:  # const: the dtype comes from the value attribute
            for d in DTYPES:
                value = np.asarray(attrs["value"]).astype(d)
                server = _server_dtype(op, [], (), {**attrs, "value": value})
                g = GraphBuilder()
                guesses = {g.op(name, **{**attrs, "value": value}).dtype, g.const(value).dtype}
                checked.add((d,))
                if guesses != {server}:
                    mismatches.append(f"{name}(value {d}): builder {sorted(guesses, key=str)}, server {server}")
            continue
        for combo in itertools.product(DTYPES, repeat=len(inputs)):
            server = _server_dtype(op, shapes, combo, attrs)
            if server is None:
                continue  # the operator refuses these dtypes
            g = GraphBuilder()
            xs = [g.input(f"x{i}", shape, d) for i, (shape, d) in enumerate(zip(shapes, combo))]
            guess = g.op(name, *xs, **attrs).dtype
            checked.add(combo)
            if guess != server:
                mismatches.append(f"{name}({', '.join(combo)}): builder {guess}, server {server}")
    assert checked, f"{name}: the operator refused every dtype combination tried"
    assert not mismatches, "the builder's dtype guesses differ from the server's:\n" + "\n".join(sorted(set(mismatches)))


def test_scans_values_take_the_dtypes_of_the_carries_and_the_body_outputs():
    """scan has several values (the table's rule says unknown); ops.scan types each from its source."""
    from chainrule.server import LocalClient

    g = GraphBuilder()
    h = g.input("h", (2,), "float32")
    xs = g.input("xs", (3, 2), "float32")
    final, ys = ops.scan(lambda c, x: (c + x, ops.argmax(x)), h, xs)
    assert (final.dtype, ys.dtype) == ("float32", "int64")
    result = LocalClient().evaluate(ops.sum(final), h=np.ones(2, np.float32), xs=np.ones((3, 2), np.float32),
                                    values="all")
    assert result.values[final.name].dtype == np.float32 and result.values[ys.name].dtype == np.int64


def test_unknown_dtypes_stay_unknown():
    for name, entry in client_dtypes.OPERATORS.items():
        if entry.arity != 0:
            n = 2 if entry.arity == VARIADIC else entry.arity
            assert client_dtypes.result_dtype(name, [None] * n) is None, name


def test_every_builtin_operator_but_const_has_an_ops_function_that_makes_it():
    """ops' exports are the table's operators (const is ``GraphBuilder.const``) plus ``op``."""
    assert sorted(ops.__all__) == sorted(["op", *(n for n in client_dtypes.OPERATORS if n != "const")])
    for name in ops.__all__:
        assert callable(getattr(ops, name)), name
    g = GraphBuilder()
    x = g.input("x", (2, 3))
    labels = g.input("labels", (2,), "int64")
    mask = g.input("mask", (2, 3), "bool")
    special = {
        "concat": lambda: ops.concat([x, x]), "stack": lambda: ops.stack([x, x]),
        "cross_entropy": lambda: ops.cross_entropy(x, labels), "where": lambda: ops.where(mask, x, 0.0),
        "reshape": lambda: ops.reshape(x, (3, 2)), "broadcast_to": lambda: ops.broadcast_to(x, (4, 2, 3)),
        "slice": lambda: ops.slice(x, [0], [1]), "expand_dims": lambda: ops.expand_dims(x, 0),
        "gather": lambda: ops.gather(x, labels), "one_hot": lambda: ops.one_hot(labels, 3),
        "pad": lambda: ops.pad(x, [0, 0, 1, 1]), "tile": lambda: ops.tile(x, [2, 1]), "cumsum": lambda: ops.cumsum(x, -1),
        "einsum": lambda: ops.einsum("ij->ji", x), "max_pool": lambda: ops.max_pool(x, [2]),
        "avg_pool": lambda: ops.avg_pool(x, [2]),
        # scan's values are Vars of their own; the node they come from is the scan
        "scan": lambda: ops.scan(lambda c, step: (c + step, None), x, g.input("steps", (4, 2, 3)))[0].of,
        # derivative helpers of builtin.shape, builtin.index and builtin.conv
        "unslice": lambda: ops.unslice(x, x, [0], [2]), "untile": lambda: ops.untile(x, x, [1, 1]),
        "concat_part": lambda: ops.concat_part(x, [x], 0), "scatter_add": lambda: ops.scatter_add(x, labels, x),
        "one_hot_like": lambda: ops.one_hot_like(labels, x), "max_pool_grad": lambda: ops.max_pool_grad(x, x, [2]),
        "max_pool_pick": lambda: ops.max_pool_pick(x, x, [2]), "avg_pool_grad": lambda: ops.avg_pool_grad(x, x, [2]),
    }
    for name in ops.__all__:
        if name == "op":
            continue
        function = getattr(ops, name)
        if name in special:
            var = special[name]()
        else:
            arity = client_dtypes.OPERATORS[name].arity
            var = function(*[x] * arity)
        assert isinstance(var, Var) and var.op == name, name


def test_var_methods_named_after_an_operator_make_that_operator():
    g = GraphBuilder()
    x = g.input("x", (2, 3))
    args = {"reshape": (3, 2), "broadcast_to": (4, 2, 3), "slice": ([0], [1]), "expand_dims": (0,),
            "maximum": (x,), "minimum": (x,), "pow": (x,), "matmul": (x.T,),
            "pad": ([0, 0, 1, 1],), "tile": ((2, 1),), "cumsum": (-1,)}
    methods = [name for name, _ in inspect.getmembers(Var, callable) if name in client_dtypes.OPERATORS]
    assert len(methods) > 20
    for name in methods:
        var = getattr(x, name)(*args.get(name, ()))
        assert var.op == name, name


def test_the_issues_examples_through_a_local_server():
    """int / 2 is float64 and the sum of int32 is int64 on the server; the builder now says so."""
    from chainrule.server import LocalClient

    g = GraphBuilder()
    n = g.input("n", (3,), "int32")
    half, total = (n / 2).named("half"), n.sum().named("total")
    g.output(half)
    assert (half.dtype, total.dtype) == ("float64", "int64")
    with LocalClient() as client:
        r = client.evaluate(total, n=np.array([1, 2, 3], np.int32), grads="none", values=[half, total])
        got = {name: r.values[name].dtype.name for name in ("half", "total")}
    assert got == {"half": half.dtype, "total": total.dtype}
