"""Nothing from a request ever runs as code.

Statically: no module of the package unpickles, evals, or imports by a name
it did not write itself (checked on the syntax tree of every source file).
Dynamically: dtype codes outside the enum (17 is numpy's number for
``object``) are INVALID_ARGUMENT wherever a tensor or dtype appears, and a
request naming an importable module as an operator, a plugin requirement or
an attribute value never imports it.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from chainrule.client.errors import from_rpc_error
from chainrule.server import ServerConfig, create_server
from chainrule.v1 import chainrule_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "plugins", "server", "client")
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
UNSAFE_CALLS = {"eval", "exec", "compile", "__import__"}
#: Import by computed name, and why each is safe: the name comes from the code, never from a request.
KNOWN_DYNAMIC_IMPORTS = {("plugins/manager.py", "import_module"): "built-in families from the constant BUILTIN_FAMILIES"}
#: Code compiled at run time, and why each is safe: its source holds no text from a request.
KNOWN_CODE_GENERATION = {
    ("core/program.py", "compile"): "a plan's straight-line program, written from slot numbers and axes only: "
                                    "program._checked rejects a quote, a backslash or an unknown name in it",
    ("core/program.py", "exec"): "runs that compiled program's definition (see compile)",
}


def sources() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def findings(path: Path, root: Path = ROOT) -> list[str]:
    """What in one source file could run code named by data."""
    relative = path.relative_to(root).as_posix()
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=relative)):
        where = f"{relative}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: imports {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"{where}: imports from {node.module}")
        elif isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            keywords = {k.arg: k.value for k in node.keywords}
            builtin = isinstance(node.func, ast.Name) or getattr(getattr(node.func, "value", None), "id", "") == "builtins"
            if name in UNSAFE_CALLS and builtin and (relative, name) not in KNOWN_CODE_GENERATION:
                found.append(f"{where}: calls {name}()")  # (re.compile and self.compile are no builtins)
            if "allow_pickle" in keywords and not (isinstance(keywords["allow_pickle"], ast.Constant)
                                                   and keywords["allow_pickle"].value is False):
                found.append(f"{where}: allow_pickle is not False")
            if name == "load" and isinstance(node.func, ast.Attribute) and getattr(node.func.value, "id", "") == "np" \
                    and "allow_pickle" not in keywords:
                found.append(f"{where}: np.load without allow_pickle=False")
            if name in ("import_module", "load_module", "exec_module") and not (
                    node.args and isinstance(node.args[0], ast.Constant)) and (relative, name) not in KNOWN_DYNAMIC_IMPORTS:
                found.append(f"{where}: {name}() of a computed name")
    return found


def test_no_module_unpickles_evals_or_imports_by_a_computed_name():
    assert len(sources()) > 30
    problems = [problem for path in sources() for problem in findings(path)]
    assert problems == []


def test_the_scan_would_catch_each_pattern(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle\nfrom marshal import loads\neval('1')\nnp.load(f)\nnp.load(f, allow_pickle=True)\n"
                   "importlib.import_module(name)\n__import__(x)\nbuiltins.exec(c)\nre.compile('x')\n")
    assert len(findings(bad, root=tmp_path)) == 8


# --- requests ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def evaluate():
    running, port = create_server("127.0.0.1:0", ServerConfig(log_level="WARNING"))
    running.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel.unary_unary("/chainrule.v1.Chainrule/Evaluate",
                                  request_serializer=pb.EvaluateRequest.SerializeToString,
                                  response_deserializer=pb.EvaluateResponse.FromString)
    running.stop(None).wait()


def neg_graph(dtype: int = pb.FLOAT64) -> pb.Graph:
    graph = pb.Graph(outputs=["y"])
    graph.inputs.add(name="x", shape=[1], dtype=dtype)
    graph.nodes.add(name="y", op="neg", inputs=["x"])
    return graph


def refusal(evaluate, request: pb.EvaluateRequest):
    with pytest.raises(grpc.RpcError) as info:
        evaluate(request, timeout=10)
    return from_rpc_error(info.value)


OBJECT = np.dtype(object).num  # 17: what the code would mean in numpy's own numbering


@pytest.mark.parametrize("code", [OBJECT, 6, 99, -1, 2**31 - 1])
def test_a_dtype_code_outside_the_enum_is_invalid_argument_everywhere(evaluate, code):
    assert OBJECT == 17
    eight_bytes = b"\x00" * 8
    cases = {
        "inputs.x.dtype": pb.EvaluateRequest(graph=neg_graph(),
                                             inputs={"x": pb.Tensor(dtype=code, shape=[1], data=eight_bytes)}),
        "graph.inputs[0].dtype": pb.EvaluateRequest(graph=neg_graph(dtype=code),
                                                    inputs={"x": pb.Tensor(shape=[1], data=eight_bytes)}),
        "seed.dtype": pb.EvaluateRequest(graph=neg_graph(), inputs={"x": pb.Tensor(shape=[1], data=eight_bytes)},
                                         seed=pb.Tensor(dtype=code, shape=[1], data=eight_bytes)),
    }
    literal = pb.Graph(outputs=["c"])
    literal.nodes.add(name="c", op="const").attrs["value"].tensor.CopyFrom(pb.Tensor(dtype=code, shape=[1], data=eight_bytes))
    cases["graph.nodes[0].attrs.value.dtype"] = pb.EvaluateRequest(graph=literal)
    for field, request in cases.items():
        error = refusal(evaluate, request)
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.reason == "DTYPE_MISMATCH", (field, error)
        assert str(code) in error.message and error.field and error.field.startswith(field.rsplit(".", 1)[0]), (field, error)


def test_names_in_a_request_are_never_imported(evaluate, tmp_path, monkeypatch):
    trap = "chainrule_trap_module"
    (tmp_path / f"{trap}.py").write_text("import sys\nsys.chainrule_trap_sprung = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    as_operator = pb.Graph(outputs=["y"])
    as_operator.inputs.add(name="x")
    as_operator.nodes.add(name="y", op=trap, inputs=["x"])
    dotted = pb.Graph(outputs=["y"])
    dotted.CopyFrom(as_operator)
    dotted.nodes[0].op = f"{trap}.run"
    required = neg_graph()
    required.metadata["requires"] = f"{trap}>=0"
    as_attribute = neg_graph()
    as_attribute.nodes[0].attrs["plugin"].s = trap
    x = {"x": pb.Tensor(values=pb.DoubleList(values=[1.0]))}
    x1 = {"x": pb.Tensor(shape=[1], values=pb.DoubleList(values=[1.0]))}
    codes = [refusal(evaluate, pb.EvaluateRequest(graph=g, inputs=inputs)).code
             for g, inputs in ((as_operator, x), (dotted, x), (required, x1), (as_attribute, x1))]
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INVALID_ARGUMENT,
                     grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT]
    assert trap not in sys.modules and not hasattr(sys, "chainrule_trap_sprung")
