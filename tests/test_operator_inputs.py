"""OperatorInfo.inputs: each input's name, in order, and the dtypes it accepts; over gRPC, in the
Python client's view, in `chainrule ops` (table, --json, --server), and exact for the built-ins."""
from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from chainrule.client import Client
from chainrule.core import OpDef, TensorSpec
from chainrule.core.dtypes import ALL_DTYPES, INT_DTYPES
from chainrule.core.errors import ChainruleError, InvalidOperatorError
from chainrule.core.operator import check_attrs, described_inputs, validate_opdef
from chainrule.plugins import OperatorSet
from chainrule.plugins.manager import load_plugins
from chainrule.plugins.testing import sample_inputs
from chainrule.server.cli import main
from chainrule.v1 import chainrule_pb2 as pb
from chainrule.v1.chainrule_pb2_grpc import ChainruleStub

from helpers import start_server


@pytest.fixture(scope="module")
def address():
    server, address = start_server()
    yield address
    server.stop(None).wait()


@pytest.fixture(scope="module")
def listed(address) -> dict[str, pb.OperatorInfo]:
    with grpc.insecure_channel(address) as channel:
        response = ChainruleStub(channel).ListOperators(pb.ListOperatorsRequest(), timeout=30)
    return {op.name: op for op in response.operators}


def test_list_operators_names_cross_entropys_inputs_in_order_with_int_labels(listed):
    inputs = listed["cross_entropy"].inputs
    assert [i.name for i in inputs] == ["logits", "labels"]
    assert list(inputs[1].dtypes) == [pb.INT64, pb.INT32]
    assert {pb.FLOAT64, pb.FLOAT32} <= set(inputs[0].dtypes)
    assert not any(i.variadic for i in inputs)


def test_every_operator_lists_one_entry_per_input_or_one_variadic_entry(listed):
    for op in listed.values():
        if op.arity < 0:
            assert len(op.inputs) == 1 and op.inputs[0].variadic, op.name
        else:
            assert len(op.inputs) == op.arity and not any(i.variadic for i in op.inputs), op.name
        assert all(i.name and i.dtypes for i in op.inputs), op.name
    assert [i.name for i in listed["where"].inputs] == ["cond", "x", "y"]
    assert list(listed["where"].inputs[0].dtypes) == [pb.BOOL]
    assert [(i.name, list(i.dtypes)) for i in listed["gather"].inputs][1] == ("indices", [pb.INT64, pb.INT32])
    assert listed["concat"].inputs[0].name == "xs" and listed["const"].inputs == []


def test_the_python_client_shows_inputs_by_dtype_name(address):
    with Client(address, timeout=30) as client:
        ops = {op.name: op for op in client.operators()}
    labels = ops["cross_entropy"].inputs[1]
    assert (labels.name, labels.dtypes, labels.variadic) == ("labels", ("int64", "int32"), False)
    assert ops["concat"].inputs[0].variadic and ops["abs"].inputs[0].dtypes == ("float64", "float32", "int64", "int32")


def run(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().out


def test_chainrule_ops_prints_the_inputs_locally_and_from_a_server(address, capsys):
    code, table = run(capsys, "ops")
    assert code == 0 and table.splitlines()[0].split()[:4] == ["OPERATOR", "PLUGIN", "INPUTS", "ATTRIBUTES"]
    line = next(line for line in table.splitlines() if line.startswith("cross_entropy "))
    assert "logits, labels:int64|int32" in line
    assert "cond:bool, x, y" in next(line for line in table.splitlines() if line.startswith("where "))
    assert "xs..." in next(line for line in table.splitlines() if line.startswith("concat "))
    code, remote = run(capsys, "ops", "--server", address)
    assert code == 0 and remote == table
    code, text = run(capsys, "ops", "--json", "--server", address)
    rows = {row["name"]: row for row in json.loads(text)}
    assert rows["cross_entropy"]["inputs"] == [
        {"name": "logits", "dtypes": list(ALL_DTYPES), "variadic": False},
        {"name": "labels", "dtypes": ["int64", "int32"], "variadic": False}]
    code, local = run(capsys, "ops", "--json")
    assert json.loads(local) == json.loads(text)


# --- what the built-ins declare is what their infer rules accept ---------------------------------

def accepted(op: OpDef, position: int, reasons: set[str] | None = None) -> set[str]:
    """The dtypes ``op``'s infer rule takes at ``position``, the other inputs as its samples have them
    (the reasons of its refusals go into ``reasons``)."""
    taken: set[str] = set()
    try:
        cases = sample_inputs(op, np.random.default_rng(0))
    except ValueError:
        return taken
    for inputs, attrs in cases:
        if position >= len(inputs):
            continue
        attrs = check_attrs(op, attrs)
        for dtype in ALL_DTYPES:
            specs = [TensorSpec(np.shape(x), np.asarray(x).dtype) for x in inputs]
            specs[position] = TensorSpec(specs[position].shape, np.dtype(dtype))
            try:
                op.infer(*specs, **attrs)
            except ChainruleError as exc:
                if reasons is not None:
                    reasons.add(exc.reason)
                continue
            taken.add(dtype)
    return taken


# scan is left out: the dtypes it accepts are those its body declares (a graph attribute), not its own.
BUILTINS = [op for op in load_plugins().registry
            if op.plugin.startswith("builtin") and op.infer is not None and not any(
                a.kind == "graph" for a in op.attrs.values())]


@pytest.mark.parametrize("op", BUILTINS, ids=lambda op: op.name)
def test_a_builtin_lists_exactly_the_dtypes_its_infer_rule_accepts(op):
    inputs = described_inputs(op)
    positions = range(3) if op.variadic else range(op.arity)
    for position in positions:
        declared = inputs[0 if op.variadic else position]
        reasons: set[str] = set()
        found = accepted(op, position, reasons)
        if found:  # (a position no sample reaches tells nothing)
            assert set(declared.dtypes) == found, (op.name, declared.name)
            if set(declared.dtypes) != set(ALL_DTYPES):  # a dtype not listed is DTYPE_MISMATCH, as the proto says
                assert reasons == {"DTYPE_MISMATCH"}, (op.name, declared.name, reasons)


# --- declaring inputs ------------------------------------------------------------------------------

def test_names_come_from_the_forward_rule_and_dtypes_from_input_dtypes():
    ops = OperatorSet()

    @ops.operator("t.pick", input_dtypes={"index": INT_DTYPES}, scale=1.0)
    def pick(table, index, *, scale):
        """table[index] * scale."""
        return np.take(table, index) * scale

    @pick.vjp
    def _(g, out, table, index, *, scale):
        return (None, None)

    op = ops.drafts[0].build()
    validate_opdef(op)
    assert [(i.name, i.dtypes) for i in described_inputs(op)] == [("table", ALL_DTYPES), ("index", INT_DTYPES)]

    @ops.operator("t.sum_all")
    def sum_all(*parts):
        return sum(parts)

    assert [(i.name, i.variadic) for i in described_inputs(ops.drafts[1].build())] == [("parts", True)]


@pytest.mark.parametrize("fields, problem", [
    ({"input_names": ("a",)}, "gives 1 name for 2 inputs"),
    ({"input_names": ("a", "a")}, "repeats a name"),
    ({"input_dtypes": {"z": INT_DTYPES}}, "'z', which is not an input"),
    ({"input_dtypes": {"x": ("float16",)}}, "dtype names"),
    ({"input_dtypes": {"x": ()}}, "non-empty"),
])
def test_declarations_that_do_not_fit_the_operator_are_refused(fields, problem):
    with pytest.raises(InvalidOperatorError, match=problem):
        validate_opdef(OpDef("t.add", 2, lambda x, y: x + y, lambda g, out, x, y: (g, g), **fields))


def test_a_forward_rule_without_a_readable_signature_gets_numbered_names():
    op = OpDef("t.hypot", 2, np.hypot, lambda g, out, x, y: (g, g))  # a ufunc: numpy names them x1, x2
    assert [i.name for i in described_inputs(op)] == ["x1", "x2"]
    op = OpDef("t.any", 2, lambda *xs: xs[0], lambda g, out, x, y: (g, g))
    assert [i.name for i in described_inputs(op)] == ["input0", "input1"]
