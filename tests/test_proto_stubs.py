"""The wire contract: committed stubs match chainrule.proto, import where
packaging installs them, round-trip through JSON, and every element of the
.proto is documented."""
from __future__ import annotations

import importlib.util
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, json_format

ROOT = Path(__file__).resolve().parent.parent
GENERATE = ROOT / "proto" / "generate.py"


def run_generate(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=120
    )


# --- stubs are in sync with the .proto --------------------------------------


def test_committed_stubs_match_proto():
    result = run_generate(GENERATE, "--check")
    assert result.returncode == 0, result.stderr


def test_check_names_the_stale_stub(tmp_path):
    # A copy of proto/ whose .proto gained a message the stubs do not know.
    shutil.copytree(ROOT / "proto", tmp_path / "proto", ignore=shutil.ignore_patterns("__pycache__"))
    proto = tmp_path / "proto" / "chainrule" / "v1" / "chainrule.proto"
    proto.write_text(proto.read_text() + "\n// Drift.\nmessage Drift {}\n")

    result = run_generate(tmp_path / "proto" / "generate.py", "--check")

    assert result.returncode == 1
    assert "chainrule_pb2.py" in result.stderr


# --- the generated modules ---------------------------------------------------


def test_stubs_import_from_the_chainrule_v1_package():
    from chainrule.v1 import chainrule_pb2, chainrule_pb2_grpc

    assert chainrule_pb2.DESCRIPTOR.package == "chainrule.v1"
    assert chainrule_pb2.Tensor.DESCRIPTOR.full_name == "chainrule.v1.Tensor"
    assert chainrule_pb2_grpc.chainrule_dot_v1_dot_chainrule__pb2 is chainrule_pb2
    for name in ("ChainruleStub", "ChainruleServicer", "add_ChainruleServicer_to_server"):
        assert hasattr(chainrule_pb2_grpc, name)


def test_tensor_with_bytes_round_trips_through_json():
    from chainrule.v1 import chainrule_pb2 as pb

    data = struct.pack("<6f", 0.5, -1.0, 2.0, 3.25, 0.0, -7.5)  # little-endian float32, C order
    tensor = pb.Tensor(dtype=pb.FLOAT32, shape=[2, 3], data=data)

    parsed = json_format.Parse(json_format.MessageToJson(tensor), pb.Tensor())

    assert parsed == tensor
    assert parsed.WhichOneof("payload") == "data"
    assert parsed.data == data


def test_hand_written_json_tensor():
    from chainrule.v1 import chainrule_pb2 as pb

    text = '{"dtype": "INT64", "shape": [3], "values": {"values": [0, 2, 1]}}'

    tensor = json_format.Parse(text, pb.Tensor())

    assert tensor.dtype == pb.INT64
    assert list(tensor.shape) == [3]
    assert tensor.WhichOneof("payload") == "values"
    assert list(tensor.values.values) == [0.0, 2.0, 1.0]
    assert json_format.Parse(json_format.MessageToJson(tensor), pb.Tensor()) == tensor


# --- every element of the .proto carries a comment ---------------------------


def _load_generate_module():
    spec = importlib.util.spec_from_file_location("chainrule_proto_generate", GENERATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _undocumented(file: descriptor_pb2.FileDescriptorProto) -> list[str]:
    """Elements without a leading or trailing comment, as dotted names."""
    commented = {
        tuple(loc.path)
        for loc in file.source_code_info.location
        if loc.leading_comments.strip() or loc.trailing_comments.strip()
    }
    missing: list[str] = []

    def need(path: tuple[int, ...], name: str) -> None:
        if path not in commented:
            missing.append(name)

    def enum(path: tuple[int, ...], desc: descriptor_pb2.EnumDescriptorProto, prefix: str) -> None:
        need(path, prefix + desc.name)
        for i, value in enumerate(desc.value):
            need(path + (2, i), f"{prefix}{desc.name}.{value.name}")

    def message(path: tuple[int, ...], desc: descriptor_pb2.DescriptorProto, prefix: str) -> None:
        if desc.options.map_entry:  # synthesized for map<,> fields
            return
        name = prefix + desc.name
        need(path, name)
        for i, field in enumerate(desc.field):
            need(path + (2, i), f"{name}.{field.name}")
        for i, oneof in enumerate(desc.oneof_decl):
            synthetic = all(
                f.proto3_optional for f in desc.field if f.HasField("oneof_index") and f.oneof_index == i
            )
            if not synthetic:  # proto3 `optional` makes a hidden oneof
                need(path + (8, i), f"{name}.{oneof.name}")
        for i, nested in enumerate(desc.nested_type):
            message(path + (3, i), nested, name + ".")
        for i, nested_enum in enumerate(desc.enum_type):
            enum(path + (4, i), nested_enum, name + ".")

    # FileDescriptorProto field numbers: message_type 4, enum_type 5, service 6.
    for i, desc in enumerate(file.message_type):
        message((4, i), desc, "")
    for i, desc in enumerate(file.enum_type):
        enum((5, i), desc, "")
    for i, service in enumerate(file.service):
        need((6, i), service.name)
        for j, method in enumerate(service.method):
            need((6, i, 2, j), f"{service.name}.{method.name}")
    return missing


def test_every_proto_element_is_documented(tmp_path):
    generate = _load_generate_module()
    descriptor_set = tmp_path / "chainrule.pb"
    command = [sys.executable, "-m", "grpc_tools.protoc"]
    command += [f"-I{path}" for path in generate.include_paths()]
    command += [
        "--include_source_info",
        f"--descriptor_set_out={descriptor_set}",
        str(ROOT / "proto" / generate.PROTO),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes())
    (contract,) = [f for f in files.file if f.name == generate.PROTO]

    assert _undocumented(contract) == []


@pytest.mark.parametrize("message", ["Node", "Tensor"])
def test_documentation_check_notices_a_missing_comment(message):
    # Guard against the walk above silently checking nothing.
    file = descriptor_pb2.FileDescriptorProto(name="x.proto")
    file.message_type.add(name=message).field.add(name="f", number=1)

    assert _undocumented(file) == [message, f"{message}.f"]
