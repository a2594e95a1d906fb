"""The google protos a client needs ship in proto/third_party/, unchanged from
googleapis-common-protos; the contract imports error_details.proto so that its
descriptor (and reflection) carries ErrorInfo and BadRequest; the generated
stubs import google.rpc from the installed package instead of shipping copies."""
from __future__ import annotations

import importlib
import re
from importlib import metadata
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from test_proto_stubs import _load_generate_module

ROOT = Path(__file__).resolve().parent.parent
THIRD_PARTY = ROOT / "proto" / "third_party"
SHIPPED = ["google/rpc/status.proto", "google/rpc/error_details.proto"]


def compile_set(out: Path, *files: str) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """Descriptors of ``files`` as protoc compiles them with generate.py's include paths."""
    generate = _load_generate_module()
    command = [sys.executable, "-m", "grpc_tools.protoc", *(f"-I{p}" for p in generate.include_paths()),
               f"--descriptor_set_out={out}", *files]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return {f.name: f for f in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file}


def test_the_contract_imports_only_what_is_shipped_or_well_known():
    contract = (ROOT / "proto" / "chainrule" / "v1" / "chainrule.proto").read_text()
    imports = re.findall(r'^import "([^"]+)";', contract, re.MULTILINE)

    assert "google/rpc/error_details.proto" in imports
    for name in imports:
        # google/protobuf/* come with protoc and buf; everything else is in proto/third_party.
        assert name.startswith("google/protobuf/") or (THIRD_PARTY / name).is_file(), name
    for name in SHIPPED:  # and what those import
        for imported in re.findall(r'^import "([^"]+)";', (THIRD_PARTY / name).read_text(), re.MULTILINE):
            assert imported.startswith("google/protobuf/"), imported


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_copies_are_the_official_files(name):
    text = (THIRD_PARTY / name).read_text()

    assert text.startswith("// Copyright") and "Licensed under the Apache License, Version 2.0" in text
    assert re.search(r"^package google\.rpc;$", text, re.MULTILINE)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_copies_agree_with_the_installed_package(name, tmp_path):
    # The server's reflection serves the installed package's descriptors, a client compiles the copy:
    # every message and field of the copy must be in the installed one with the same number and type.
    shipped = compile_set(tmp_path / "set.binpb", name)[name]  # found on the include path, proto/third_party
    installed = descriptor_pb2.FileDescriptorProto()
    module = importlib.import_module("google.rpc." + Path(name).stem + "_pb2")
    module.DESCRIPTOR.CopyToProto(installed)

    def fields(file):
        found, todo = {}, [(m, file.package + "." + m.name) for m in file.message_type]
        while todo:
            message, full = todo.pop()
            todo += [(n, f"{full}.{n.name}") for n in message.nested_type]
            found[full] = {f.name: (f.number, f.type, f.label, f.type_name) for f in message.field}
        return found

    theirs, ours = fields(installed), fields(shipped)
    assert ours
    for message, own in ours.items():
        assert message in theirs, f"{message}: refresh proto/third_party from googleapis-common-protos"
        for field, shape in own.items():
            assert theirs[message].get(field) == shape, f"{message}.{field} differs from the installed package"


def test_stubs_import_google_rpc_from_googleapis_common_protos():
    from google.rpc import error_details_pb2, status_pb2

    from chainrule.v1 import chainrule_pb2

    stub = (ROOT / "proto" / "chainrule" / "v1" / "chainrule_pb2.py").read_text()
    assert "from google.rpc import error_details_pb2" in stub
    assert "from google.rpc import status_pb2" in stub
    package = metadata.distribution("googleapis-common-protos")
    for module in (error_details_pb2, status_pb2):  # the package's modules, not copies of ours
        relative = Path(*module.__name__.split(".")).with_suffix(".py")
        assert Path(module.__file__).resolve() == Path(package.locate_file(relative)).resolve()
    assert not any("google" in p.parts for p in (ROOT / "proto" / "chainrule").rglob("*.py"))
    # The contract's descriptor depends on error_details, so the pool (and reflection) has it.
    assert "google/rpc/error_details.proto" in [d.name for d in chainrule_pb2.DESCRIPTOR.dependencies]
