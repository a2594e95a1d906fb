"""The proto is the contract: what its comments promise, a real server does.

A client written from chainrule.proto alone (the issue "Every client") must
not trip on a comment that disagrees with the server. Each test here checks
one promise through a real server on a loopback port (raw stubs, as another
language's client would call it) or through the clients; the last ones keep
docs/errors.md and the proto's header in step with every ErrorInfo reason the
code can give, both ways.
"""
from __future__ import annotations

import re
from pathlib import Path

import grpc
import numpy as np
import pytest

import chainrule.core.errors as core_errors
from chainrule.client import GraphBuilder
from chainrule.client.errors import CLIENT_REASONS, from_rpc_error
from chainrule.server import LocalClient, ServerConfig
from chainrule.v1 import chainrule_pb2 as pb
from chainrule.v1.chainrule_pb2_grpc import ChainruleStub
from chainrule.wire.convert import array_to_tensor, tensor_to_array
from chainrule.wire.status import code_for, code_name

from helpers import start_server

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto" / "chainrule" / "v1" / "chainrule.proto"
ERRORS_MD = ROOT / "docs" / "errors.md"


@pytest.fixture(scope="module")
def stub(client):
    return ChainruleStub(client.channel)


def small_graph() -> pb.Graph:
    """Three declared inputs, two operator nodes: h = x * y, L = sum(h) (z is declared, unused)."""
    g = pb.Graph(outputs=["L"])
    g.inputs.add(name="x", shape=[])
    g.inputs.add(name="y", shape=[2])
    g.inputs.add(name="z", shape=[])
    g.nodes.add(name="h", op="mul", inputs=["x", "y"])
    g.nodes.add(name="L", op="sum", inputs=["h"])
    return g


def small_inputs() -> dict[str, pb.Tensor]:
    return {"x": array_to_tensor(np.float64(2.0)), "y": array_to_tensor(np.array([1.0, 3.0])),
            "z": array_to_tensor(np.float64(5.0))}


def quadratic():
    """L(w) = ½ Σ (w - c)², minimized by SGD: w moves a fixed fraction of the way each step."""
    g = GraphBuilder()
    w, c = g.input("w", (3,)), g.input("c", (3,))
    d = (w - c).named("d")
    return (0.5 * (d * d).sum()).named("L")


C = np.array([1.0, -2.0, 0.5])


def reason_of(error: grpc.RpcError) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    typed = from_rpc_error(error)
    return typed.code, typed.reason, typed.metadata


# --- RegisterGraphResponse.node_count ------------------------------------------------------------------

def test_node_count_counts_operator_nodes_not_declared_inputs(stub):
    graph = small_graph()
    response = stub.RegisterGraph(pb.RegisterGraphRequest(graph=graph), timeout=30)
    assert response.node_count == len(graph.nodes) == 2


def test_node_count_is_the_same_in_process():
    graph = small_graph()
    response = LocalClient().transport.register(pb.RegisterGraphRequest(graph=graph), None)
    assert response.node_count == 2


# --- Diagnostics.grad_norms ---------------------------------------------------------------------------

def test_grad_norms_cover_graph_inputs_only(stub):
    request = pb.EvaluateRequest(graph=small_graph(), inputs=small_inputs())
    response = stub.Evaluate(request, timeout=30)
    assert set(response.gradients) == {"x", "y", "z", "h", "L"}  # every gradient returned...
    assert [n.node for n in response.diagnostics.grad_norms] == ["x", "y", "z"]  # ...norms of the inputs only
    # nodes never get one, whatever is returned
    request.return_values.CopyFrom(pb.Selection(mode=pb.Selection.NONE))
    response = stub.Evaluate(request, timeout=30)
    assert [n.node for n in response.diagnostics.grad_norms] == ["x", "y", "z"] and not response.values
    # with LISTED, only the listed inputs' gradients are computed, so only theirs are normed
    request.return_grads.CopyFrom(pb.Selection(mode=pb.Selection.LISTED, names=["y", "h"]))
    response = stub.Evaluate(request, timeout=30)
    assert [n.node for n in response.diagnostics.grad_norms] == ["y"]
    norm = response.diagnostics.grad_norms[0]
    assert norm.grad_norm == pytest.approx(np.linalg.norm([2.0, 2.0]))
    assert norm.value_norm == pytest.approx(np.linalg.norm([1.0, 3.0]))


# --- EvaluateRequest.input_sets and return_values --------------------------------------------------------

def test_evaluate_refuses_input_sets_with_invalid_argument(stub):
    request = pb.EvaluateRequest(graph=small_graph(), inputs=small_inputs())
    request.input_sets.add()
    with pytest.raises(grpc.RpcError) as caught:
        stub.Evaluate(request, timeout=30)
    code, reason, metadata = reason_of(caught.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and reason == "BAD_OPTION"
    assert metadata["field"] == "input_sets"


def test_unset_return_values_means_all(stub):
    response = stub.Evaluate(pb.EvaluateRequest(graph=small_graph(), inputs=small_inputs()), timeout=30)
    assert set(response.values) == {"x", "y", "z", "h", "L"}
    assert tensor_to_array(response.values["h"], field="h").tolist() == [2.0, 6.0]


# --- AttrSchema.default_value ---------------------------------------------------------------------------

def test_optional_attribute_without_default_has_no_default_value(stub):
    operators = {op.name: op for op in stub.ListOperators(pb.ListOperatorsRequest(), timeout=30).operators}
    attrs = {a.name: a for a in operators["sum"].attrs}
    axis, keepdims = attrs["axis"], attrs["keepdims"]
    assert not axis.required and not axis.HasField("default_value")  # optional, unset by default: all axes
    assert not keepdims.required and keepdims.HasField("default_value") and keepdims.default_value.b is False
    for op in operators.values():  # a required attribute never has a default
        for attr in op.attrs:
            assert not (attr.required and attr.HasField("default_value")), (op.name, attr.name)


def test_sum_without_axis_reduces_every_axis(stub):
    g = pb.Graph(outputs=["s"])
    g.inputs.add(name="m", shape=[2, 3])
    g.nodes.add(name="s", op="sum", inputs=["m"])
    m = np.arange(6.0).reshape(2, 3)
    response = stub.Evaluate(pb.EvaluateRequest(graph=g, inputs={"m": array_to_tensor(m)}), timeout=30)
    assert tensor_to_array(response.output_value, field="s") == 15.0


# --- EvaluateStream: graph-less requests after a failed graph -----------------------------------------------

def test_graph_less_requests_repeat_the_failed_graphs_error(stub):
    bad = small_graph()
    bad.nodes[0].op = "no_such_op"
    inputs = small_inputs()
    requests = [
        pb.EvaluateRequest(graph=bad, inputs=inputs),
        pb.EvaluateRequest(inputs=inputs),
        pb.EvaluateRequest(inputs=inputs),
        pb.EvaluateRequest(graph=small_graph(), inputs=inputs),
        pb.EvaluateRequest(inputs=inputs),
    ]
    replies = list(stub.EvaluateStream(iter(requests), timeout=30))
    assert [r.index for r in replies] == [0, 1, 2, 3, 4]
    assert [r.WhichOneof("result") for r in replies] == ["error"] * 3 + ["response"] * 2
    assert replies[0].error == replies[1].error == replies[2].error
    assert replies[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "no_such_op" in replies[1].error.message


def test_a_first_request_without_a_graph_fails_and_so_do_the_graph_less_ones_after_it(stub):
    inputs = small_inputs()
    requests = [pb.EvaluateRequest(inputs=inputs), pb.EvaluateRequest(inputs=inputs),
                pb.EvaluateRequest(graph=small_graph(), inputs=inputs)]
    replies = list(stub.EvaluateStream(iter(requests), timeout=30))
    assert [r.WhichOneof("result") for r in replies] == ["error", "error", "response"]
    assert replies[0].error == replies[1].error
    assert replies[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


# --- message limits ------------------------------------------------------------------------------------

def test_message_limit_defaults_to_the_memory_budget_up_to_2_gib():
    assert ServerConfig(max_memory_bytes=1 << 20).message_limit == 1 << 20
    assert ServerConfig(max_memory_bytes=1 << 40).message_limit == (1 << 31) - 1
    assert ServerConfig(max_message_bytes=4096).message_limit == 4096


def test_oversized_response_is_refused_before_computing_with_limit_exceeded():
    server, address = start_server(ServerConfig(max_message_bytes=64 * 1024))
    try:
        g = pb.Graph(outputs=["s"])
        g.inputs.add(name="v", shape=[-1])
        g.nodes.add(name="e", op="exp", inputs=["v"])
        g.nodes.add(name="s", op="sum", inputs=["e"])
        request = pb.EvaluateRequest(graph=g, inputs={"v": array_to_tensor(np.zeros(4000))},
                                     return_values=pb.Selection(mode=pb.Selection.NONE),
                                     return_grads=pb.Selection(mode=pb.Selection.NONE))
        with grpc.insecure_channel(address) as channel:
            stub = ChainruleStub(channel)
            assert stub.Evaluate(request, timeout=30).output_value  # fits
            request.return_values.CopyFrom(pb.Selection())  # unset: ALL, 4 tensors of 32 KB: too large
            request.return_grads.CopyFrom(pb.Selection())
            with pytest.raises(grpc.RpcError) as caught:
                stub.Evaluate(request, timeout=30)
    finally:
        server.stop(None).wait()
    code, reason, metadata = reason_of(caught.value)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and reason == "LIMIT_EXCEEDED"
    assert metadata["limit"] == "max_message_bytes" and metadata["allowed"] == str(64 * 1024)
    assert int(metadata["requested"]) > 64 * 1024


# --- Optimize: one loss per update applied ---------------------------------------------------------------

@pytest.mark.parametrize("report_every", [None, 1, 7])
def test_optimize_stopping_at_its_target_sends_one_loss_per_step(report_every):
    target = 1e-6
    result = LocalClient().optimize(quadratic(), {"w": np.zeros(3)}, {"c": C}, lr=0.05, steps=10_000,
                                    target_loss=target, report_every=report_every, progress=False)
    assert result.target_reached and 0 < result.steps < 10_000
    assert len(result.losses) == result.steps  # not steps + 1
    assert result.loss <= target < result.losses.min()  # the reached loss is `loss`, not in the history
    # each loss is the one before its update: SGD on this quadratic shrinks it by (1 - lr)² per step
    assert result.losses[0] == pytest.approx(0.5 * float(C @ C))
    assert result.loss == pytest.approx(result.losses[-1] * 0.95 ** 2)
    assert sum(len(p.losses) for p in result.history) == result.history[-1].step == result.steps


def test_optimize_through_grpc_counts_the_same(client):
    run = dict(lr=0.05, steps=10_000, target_loss=1e-6, progress=False)
    remote = client.optimize(quadratic(), {"w": np.zeros(3)}, {"c": C}, **run)
    local = LocalClient().optimize(quadratic(), {"w": np.zeros(3)}, {"c": C}, **run)
    assert remote.steps == local.steps == len(remote.losses) and remote.target_reached
    assert remote.losses.tobytes() == local.losses.tobytes() and remote.loss == local.loss


def test_optimize_at_its_target_from_the_start_applies_no_update():
    result = LocalClient().optimize(quadratic(), {"w": C.copy()}, {"c": C}, lr=0.05, steps=100,
                                    target_loss=1e-6, progress=False)
    assert result.target_reached and result.steps == 0 and len(result.losses) == 0 and result.loss == 0.0
    assert np.array_equal(result.params["w"], C)


def test_optimize_running_every_step_counts_alike():
    result = LocalClient().optimize(quadratic(), {"w": np.zeros(3)}, {"c": C}, lr=0.05, steps=30,
                                    target_loss=1e-12, progress=False)
    assert not result.target_reached and result.steps == 30 and len(result.losses) == 30
    assert result.loss == pytest.approx(result.losses[-1] * 0.95 ** 2)


# --- every ErrorInfo reason is documented, and every documented one exists -----------------------------------

def _error_classes() -> list[type[core_errors.ChainruleError]]:
    found, todo = [], [core_errors.ChainruleError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return [cls for cls in found if cls.__module__ == core_errors.__name__]


EXPLICIT = re.compile(r"""\breason\s*=\s*["']([A-Z][A-Z0-9_]*)["']""")
SOURCE_DIRS = ("core", "server", "client", "plugins", "proto/chainrule")


def code_reasons() -> dict[str, str]:
    """Every reason the code can give, with where it comes from."""
    reasons = {cls.reason: f"core/errors.py {cls.__name__}" for cls in _error_classes()}
    for directory in SOURCE_DIRS:
        for path in sorted((ROOT / directory).rglob("*.py")):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            for reason in EXPLICIT.findall(path.read_text()):
                reasons.setdefault(reason, str(path.relative_to(ROOT)))
    for reason in CLIENT_REASONS:
        reasons.setdefault(reason, "client/errors.py CLIENT_REASONS")
    return reasons


def documented() -> dict[str, str]:
    """docs/errors.md: reason -> the gRPC code column of its table row."""
    rows = re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \| ([^|]+) \|", ERRORS_MD.read_text(), re.MULTILINE)
    assert len(rows) == len(dict(rows)), "a reason is documented twice"
    return {reason: code.strip() for reason, code in rows}


def proto_header() -> str:
    return PROTO.read_text().split("\nsyntax = ", 1)[0]


def test_the_scan_finds_the_reasons_it_should():
    """Guards the test itself: a broken pattern would make the two-way check vacuous."""
    reasons = code_reasons()
    for reason in ("INVALID_GRAPH", "LIMIT_EXCEEDED", "MALFORMED_REQUEST", "NONFINITE_LOSS", "BAD_OPTIMIZER",
                   "INTERNAL", "OUT_OF_RANGE", "SHARED_MEMORY_FORBIDDEN", "UNREACHABLE", "MESSAGE_TOO_LARGE"):
        assert reason in reasons
    assert len(documented()) >= 30


def test_every_reason_in_the_code_is_documented():
    missing = {r: where for r, where in code_reasons().items() if r not in documented()}
    assert not missing, f"reasons given by the code but missing from docs/errors.md: {missing}"


def test_every_documented_reason_exists_in_the_code():
    stale = set(documented()) - set(code_reasons())
    assert not stale, f"docs/errors.md lists reasons no code gives: {sorted(stale)}"


def test_documented_codes_match_the_server():
    docs = documented()
    for cls in _error_classes():
        if cls is core_errors.OpError:  # never answered as such: the node's GraphError carries its reason
            continue
        error = Exception.__new__(cls)  # no __init__: code_for looks at the class only
        code = code_name(code_for(error))
        assert docs[cls.reason] == code, (cls.__name__, cls.reason, docs[cls.reason], code)


def test_the_proto_header_lists_every_reason_once_and_points_to_the_docs():
    header = proto_header()
    assert "docs/errors.md" in header
    listed = []
    for line in re.findall(r"^// - ([A-Z][A-Z0-9_, ]*[A-Z0-9_]) ?(?:\(|:)", header, re.MULTILINE):
        listed.extend(name.strip() for name in line.split(","))
    assert len(listed) == len(set(listed)), sorted(listed)
    assert set(listed) == set(documented()), (set(listed) ^ set(documented()))


def test_bad_options_have_a_reason_of_their_own_not_invalid_graph(stub):
    """Issue 16: INVALID_GRAPH was a catch-all for things that are not graphs (steps: 0, a NaN
    target_loss, names with mode ALL). They are BAD_OPTION, naming the field."""
    import numpy as np

    from chainrule.client import GraphBuilder, InvalidArgument
    from chainrule.server import LocalClient

    g = GraphBuilder()
    w = g.input("w", (2,))
    loss = (w * w).sum().named("L")
    client = LocalClient()
    cases = [
        (lambda: client.optimize(loss, {"w": np.ones(2)}, {}, steps=0, progress=False), "steps"),
        (lambda: client.optimize(loss, {"w": np.ones(2)}, {}, steps=3, target_loss=float("nan"), progress=False),
         "target_loss"),
    ]
    for call, field in cases:
        with pytest.raises(InvalidArgument) as caught:
            call()
        assert caught.value.reason == "BAD_OPTION" and caught.value.metadata["field"] == field
    request = pb.EvaluateRequest(graph=small_graph(), inputs=small_inputs())
    request.return_values.names.append("x")  # names, but mode ALL (the default)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Evaluate(request, timeout=30)
    code, reason, metadata = reason_of(caught.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and reason == "BAD_OPTION"
    assert metadata["field"] == "return_values.mode"


def _bad_request_fields(error: grpc.RpcError) -> list[str]:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(error)
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return fields


def test_bad_request_field_is_always_a_request_path(stub):
    """Issue 16: BadRequest.field was sometimes a bare node name ('f') or relative ('attrs.axis').
    Errors of a node now name its place in the request: compile time, run time, by graph_id too."""
    import numpy as np

    from chainrule.client import GraphBuilder, ops
    from chainrule.wire.convert import array_to_tensor

    g = GraphBuilder()
    a, b = g.input("a", (2,)), g.input("b", (3,))
    h = (a * 2.0).named("h")
    f = (h + b).named("f")  # shapes (2,) and (3,): refused by shape inference
    message = f.graph.message
    position = [n.name for n in message.nodes].index("f")
    request = pb.EvaluateRequest(graph=message, output="f")
    with pytest.raises(grpc.RpcError) as caught:
        stub.Evaluate(request, timeout=30)
    assert _bad_request_fields(caught.value) == [f"graph.nodes[{position}]"]

    g = GraphBuilder()
    x = g.input("x", (2, 3))
    s = x.sum(axis=7, name="s")
    with pytest.raises(grpc.RpcError) as caught:
        stub.Evaluate(pb.EvaluateRequest(graph=s.graph.message), timeout=30)
    assert _bad_request_fields(caught.value) == ["graph.nodes[0].attrs.axis"]

    g = GraphBuilder()
    table, ids = g.input("table", (4, 2)), g.input("ids", (3,), "int64")
    picked = ops.gather(table, ids, name="picked").sum(name="total")
    graph_id = stub.RegisterGraph(pb.RegisterGraphRequest(graph=picked.graph.message), timeout=30).graph_id
    request = pb.EvaluateRequest(graph_id=graph_id)
    request.inputs["table"].CopyFrom(array_to_tensor(np.zeros((4, 2))))
    request.inputs["ids"].CopyFrom(array_to_tensor(np.array([0, 9, 1])))  # out of range at run time
    with pytest.raises(grpc.RpcError) as caught:
        stub.Evaluate(request, timeout=30)
    position = [n.name for n in picked.graph.message.nodes].index("picked")
    assert _bad_request_fields(caught.value) == [f"graph.nodes[{position}]"]
