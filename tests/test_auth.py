"""Transport security and bearer tokens, with certificates made at test time (openssl CLI).

TLS: a client that trusts the test CA connects; a plaintext client or one
trusting another CA does not. Mutual TLS: only a client showing a certificate
the configured CA signed gets in. Tokens: without a valid bearer token every
chainrule call (streaming ones too) is UNAUTHENTICATED before any work is done;
health and reflection stay open, or not, by ``open_health_and_reflection``.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from chainrule.client import TLS, Client, GraphBuilder, Unauthenticated, Unavailable
from chainrule.client.channel import BearerToken
from chainrule.server import ServerConfig, create_server
from chainrule.server.auth import accepted, bearer_token, read_tokens
from chainrule.server.service import graph_id
from chainrule.v1 import chainrule_pb2 as pb

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")

TOKENS = ("s3cret-token-one", "another-token-2")


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(directory: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign", cwd=directory)


def make_leaf(directory: Path, name: str, ca: str, extensions: str) -> None:
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=directory)
    (directory / f"{name}.ext").write_text(extensions)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-set_serial", "1",
            "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext", cwd=directory)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate, and a second unrelated CA."""
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "other-ca")
    make_leaf(d, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    make_leaf(d, "client", "ca", "extendedKeyUsage=clientAuth\n")
    (d / "tokens.txt").write_text(f"# accepted tokens\n{TOKENS[0]}\n\n{TOKENS[1]}\n")
    return d


def serve(**settings):
    running, port = create_server("127.0.0.1:0", ServerConfig(log_level="WARNING", **settings))
    running.start()
    return running, f"127.0.0.1:{port}"


@pytest.fixture()
def server(request, pki):
    """A server with the settings given by indirect parametrization (file names relative to pki)."""
    settings = {k: str(pki / v) if k in ("tls_cert", "tls_key", "tls_client_ca", "token_file") else v
                for k, v in request.param.items()}
    running, address = serve(**settings)
    yield address
    running.stop(None).wait()


def double(client: Client) -> float:
    g = GraphBuilder()
    return client.evaluate(g.input("x") * 2.0, x=21.0).value


# --- TLS -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("server", [dict(tls_cert="server.pem", tls_key="server.key")], indirect=True)
def test_tls_serves_clients_that_trust_the_ca_only(server, pki):
    with Client(server, timeout=10, tls=TLS(ca=str(pki / "ca.pem"))) as client:
        assert double(client) == 42.0
    with Client(server, timeout=3) as plaintext, pytest.raises(Unavailable):
        plaintext.server_info()
    with Client(server, timeout=3, tls=TLS(ca=(pki / "other-ca.pem").read_bytes())) as wrong, pytest.raises(Unavailable):
        wrong.server_info()


@pytest.mark.parametrize("server", [dict(tls_cert="server.pem", tls_key="server.key", tls_client_ca="ca.pem")], indirect=True)
def test_mutual_tls_requires_a_client_certificate_signed_by_the_ca(server, pki):
    ca = str(pki / "ca.pem")
    with Client(server, timeout=10, tls=TLS(ca=ca, cert=str(pki / "client.pem"), key=str(pki / "client.key"))) as client:
        assert double(client) == 42.0
    with Client(server, timeout=3, tls=TLS(ca=ca)) as anonymous, pytest.raises(Unavailable):
        anonymous.server_info()
    # A certificate the CA did not sign (the server's own key pair is signed by it, so use the other CA's).
    with Client(server, timeout=3, tls=TLS(ca=ca, cert=str(pki / "other-ca.pem"), key=str(pki / "other-ca.key"))) as forged:
        with pytest.raises(Unavailable):
            forged.server_info()


def test_incomplete_tls_settings_are_refused_at_start_up(pki):
    with pytest.raises(ValueError, match="both"):
        serve(tls_cert=str(pki / "server.pem"))
    with pytest.raises(ValueError, match="tls_client_ca needs"):
        serve(tls_client_ca=str(pki / "ca.pem"))
    with pytest.raises(ValueError, match="cannot read"):
        serve(tls_cert=str(pki / "missing.pem"), tls_key=str(pki / "server.key"))


# --- tokens --------------------------------------------------------------------------------------

@pytest.mark.parametrize("server", [dict(token_file="tokens.txt")], indirect=True)
def test_calls_without_a_valid_token_are_unauthenticated_and_do_no_work(server):
    g = GraphBuilder()
    graph = (g.input("x") + 1.0).graph
    for token in (None, "wrong", TOKENS[0] + "x", TOKENS[0][:-1]):
        with Client(server, timeout=10, token=token) as client:
            with pytest.raises(Unauthenticated):
                client.register(graph)
            with pytest.raises(Unauthenticated):
                client.operators()
    with grpc.insecure_channel(server) as channel:
        evaluate = channel.unary_unary("/chainrule.v1.Chainrule/Evaluate",
                                       request_serializer=pb.EvaluateRequest.SerializeToString,
                                       response_deserializer=pb.EvaluateResponse.FromString)
        by_id = pb.EvaluateRequest(graph_id=graph_id(graph.message),
                                   inputs={"x": pb.Tensor(values=pb.DoubleList(values=[1.0]))})
        with pytest.raises(grpc.RpcError) as info:
            evaluate(by_id, metadata=[("authorization", f"Bearer {TOKENS[1]}")], timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND  # the refused RegisterGraph calls registered nothing


@pytest.mark.parametrize("server", [dict(token_file="tokens.txt")], indirect=True)
def test_every_accepted_token_works_and_streams_are_guarded_too(server):
    for token in TOKENS:
        with Client(server, timeout=10, token=token) as client:
            assert double(client) == 42.0
    with grpc.insecure_channel(server) as channel:
        stream = channel.stream_stream("/chainrule.v1.Chainrule/EvaluateStream",
                                       request_serializer=pb.EvaluateRequest.SerializeToString,
                                       response_deserializer=pb.EvaluateStreamResponse.FromString)
        with pytest.raises(grpc.RpcError) as info:
            list(stream(iter([pb.EvaluateRequest()]), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        lowercase = [("authorization", f"bearer {TOKENS[0]}")]
        info_call = channel.unary_unary("/chainrule.v1.Chainrule/ServerInfo",
                                        request_serializer=pb.ServerInfoRequest.SerializeToString,
                                        response_deserializer=pb.ServerInfoResponse.FromString)
        assert info_call(pb.ServerInfoRequest(), metadata=lowercase, timeout=10).pid > 0


def health_and_reflection(address: str, token: str | None = None) -> tuple[int, list[str]]:
    """Health status and the services reflection lists, asked with or without a token."""
    with grpc.insecure_channel(address) as plain:
        channel = grpc.intercept_channel(plain, BearerToken(token)) if token else plain
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    return status.status, services


@pytest.mark.parametrize("server", [dict(token_file="tokens.txt")], indirect=True)
def test_health_and_reflection_stay_open_by_default(server):
    status, services = health_and_reflection(server)
    assert status == health_pb2.HealthCheckResponse.SERVING and "chainrule.v1.Chainrule" in services


@pytest.mark.parametrize("server", [dict(token_file="tokens.txt", open_health_and_reflection=False)], indirect=True)
def test_health_and_reflection_can_be_guarded_too(server):
    with pytest.raises(grpc.RpcError) as info:
        health_and_reflection(server)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    status, services = health_and_reflection(server, token=TOKENS[0])
    assert status == health_pb2.HealthCheckResponse.SERVING and "chainrule.v1.Chainrule" in services


@pytest.mark.parametrize("server", [dict(tls_cert="server.pem", tls_key="server.key", token_file="tokens.txt")],
                         indirect=True)
def test_tls_and_token_together(server, pki):
    with Client(server, timeout=10, tls=TLS(ca=str(pki / "ca.pem")), token=TOKENS[0]) as client:
        assert double(client) == 42.0
    with Client(server, timeout=10, tls=TLS(ca=str(pki / "ca.pem"))) as client, pytest.raises(Unauthenticated):
        client.server_info()


def test_token_parsing_and_comparison(tmp_path):
    assert bearer_token([("x-other", "1"), ("authorization", "Bearer  abc ")]) == b"abc"
    assert bearer_token([("authorization", "Basic abc")]) is None
    assert bearer_token([("authorization", "Bearer")]) is None and bearer_token(None) is None
    assert accepted(b"abc", [b"zzz", b"abc"]) and not accepted(b"ab", [b"abc"]) and not accepted(None, [b"abc"])
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n")
    with pytest.raises(ValueError, match="no tokens"):
        read_tokens(empty)
