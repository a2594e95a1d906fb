"""Large inputs handed over in shared memory, through a real server on this host and the real client."""
from __future__ import annotations

import os
import tempfile

import grpc
import numpy as np
import pytest

from chainrule.client import Client, GraphBuilder
from chainrule.client.errors import FailedPrecondition, InvalidArgument
from chainrule.server.config import ConfigError, ServerConfig
from chainrule.server.convert import array_to_tensor
from chainrule.v1 import chainrule_pb2 as pb

from helpers import start_server

RNG = np.random.default_rng(3)
X = RNG.normal(size=(300, 40))       # 96,000 bytes: large enough to be handed over
W = RNG.normal(size=(40, 500))


@pytest.fixture(scope="module")
def shm_dir():
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None  # RAM-backed where there is one
    with tempfile.TemporaryDirectory(prefix="chainrule-test-", dir=base) as directory:
        yield directory


@pytest.fixture(scope="module")
def shm_address(shm_dir):
    server, address = start_server(ServerConfig(shared_memory_dir=shm_dir))
    yield address
    server.stop(None)


def network():
    g = GraphBuilder()
    x, w = g.input("x", (300, 40)), g.input("w", (40, 500))
    return ((x @ w).tanh(name="h") * 0.5).sum(name="f")


def test_inputs_in_shared_memory_give_the_same_result_as_sent_ones(shm_address, shm_dir):
    f = network()
    with Client(shm_address, shared_memory=True) as shared, Client(shm_address) as sent:
        via_files = shared.evaluate(f, x=X, w=W)
        via_grpc = sent.evaluate(f, x=X, w=W)
        files = sorted(n for n in os.listdir(shm_dir) if n.startswith("chainrule-client-"))
        assert len(files) == 2 and files[0].endswith("-in") and files[1].endswith("-out")
        assert os.path.getsize(os.path.join(shm_dir, files[1])) >= X.nbytes  # the server wrote values there
        again = shared.evaluate(f, x=2 * X, w=W)  # the file is reused with new contents
    assert via_files.value == via_grpc.value
    for name in ("x", "w", "h"):
        assert np.array_equal(via_files.grad[name], via_grpc.grad[name])
    assert np.array_equal(via_files.values["x"], X) and np.array_equal(again.values["x"], 2 * X)
    assert not os.listdir(shm_dir)  # closing the client removed its files


def test_server_info_names_the_directory(shm_address, shm_dir, address):
    with Client(shm_address) as client:
        assert client.server_info().shared_memory_dir == os.path.abspath(shm_dir)
    with Client(address) as client:
        assert client.server_info().shared_memory_dir == ""


def test_a_server_without_the_directory_refuses_clearly(address):
    with Client(address, shared_memory=True) as client:
        with pytest.raises(FailedPrecondition, match="--shared-memory-dir") as caught:
            client.evaluate(network(), x=X, w=W)
    assert caught.value.reason == "SHARED_MEMORY_DISABLED"

    request = pb.EvaluateRequest(graph=network().graph.message)
    request.inputs["w"].CopyFrom(array_to_tensor(W))
    x = request.inputs["x"]
    x.dtype, x.shared_memory.file, x.shared_memory.byte_length = pb.FLOAT64, "any", X.nbytes
    x.shape[:] = X.shape
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as caught_raw:
            channel.unary_unary("/chainrule.v1.Chainrule/Evaluate")(request.SerializeToString())
    assert caught_raw.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "inputs.x" in caught_raw.value.details()


def write_file(directory: str, name: str, data: bytes) -> None:
    with open(os.path.join(directory, name), "wb") as f:
        f.write(data)


BAD_REFERENCES = [
    ("../etc/passwd", 0, X.nbytes, "not a plain file name", "inputs.x.shared_memory.file"),
    (".hidden", 0, X.nbytes, "not a plain file name", "inputs.x.shared_memory.file"),
    ("missing", 0, X.nbytes, "cannot open 'missing'", "inputs.x.shared_memory.file"),
    ("short", 0, X.nbytes, "lie beyond the end of 'short'", "inputs.x.shared_memory.offset"),
    ("whole", 8, X.nbytes, "lie beyond the end of 'whole'", "inputs.x.shared_memory.offset"),
    ("whole", 0, X.nbytes - 8, "byte_length is 95992", "inputs.x.shared_memory.byte_length"),
    ("link", 0, X.nbytes, "cannot open 'link'", "inputs.x.shared_memory.file"),  # symlinks are not followed
]


@pytest.mark.parametrize("name, offset, length, message, field", BAD_REFERENCES, ids=[b[0] + str(b[2]) for b in BAD_REFERENCES])
def test_bad_references_are_invalid_arguments_naming_the_field(shm_address, shm_dir, name, offset, length,
                                                               message, field):
    write_file(shm_dir, "short", X.tobytes()[:1000])
    write_file(shm_dir, "whole", X.tobytes())
    if not os.path.lexists(os.path.join(shm_dir, "link")):
        os.symlink(os.path.join(shm_dir, "whole"), os.path.join(shm_dir, "link"))
    request = pb.EvaluateRequest(graph=network().graph.message)
    request.inputs["w"].CopyFrom(array_to_tensor(W))
    x = request.inputs["x"]
    x.dtype = pb.FLOAT64
    x.shape[:] = X.shape
    x.shared_memory.CopyFrom(pb.SharedMemoryRef(file=name, offset=offset, byte_length=length))
    with Client(shm_address) as client:
        with pytest.raises(InvalidArgument, match=message) as caught:
            client.evaluate(network(), {"x": x, "w": W})
        assert caught.value.field == field
        assert client.evaluate(network(), x=X, w=W).value.shape == ()  # still serving


def test_a_reference_in_a_well_formed_file_reads_exactly_those_bytes(shm_address, shm_dir):
    write_file(shm_dir, "offset", b"\xff" * 24 + X.tobytes() + b"\xff" * 5)
    x = pb.Tensor(dtype=pb.FLOAT64, shape=X.shape,
                  shared_memory=pb.SharedMemoryRef(file="offset", offset=24, byte_length=X.nbytes))
    with Client(shm_address) as client:
        result = client.evaluate(network(), {"x": x, "w": W})
    assert np.array_equal(result.values["x"], X)


def test_the_directory_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="shared_memory_dir"):
        ServerConfig(shared_memory_dir=str(tmp_path / "nowhere")).validate()


def test_a_directory_missing_on_the_clients_host_is_named():
    with tempfile.TemporaryDirectory() as directory:
        server, address = start_server(ServerConfig(shared_memory_dir=directory))
    try:  # the directory is gone: as seen from a client on another host
        with Client(address, shared_memory=True) as client:
            with pytest.raises(FailedPrecondition, match="same machine") as caught:
                client.evaluate(network(), x=X, w=W)
        assert caught.value.reason == "SHARED_MEMORY_UNREACHABLE"
    finally:
        server.stop(None)


def test_the_server_writes_large_outputs_into_the_named_file(shm_address, shm_dir):
    write_file(shm_dir, "answers", b"")
    request = pb.EvaluateRequest(graph=network().graph.message, shared_memory_output="answers")
    request.inputs["x"].CopyFrom(array_to_tensor(X))
    request.inputs["w"].CopyFrom(array_to_tensor(W))
    with grpc.insecure_channel(shm_address) as channel:
        data = channel.unary_unary("/chainrule.v1.Chainrule/Evaluate")(request.SerializeToString())
    response = pb.EvaluateResponse.FromString(data)
    h = response.values["h"]
    assert h.WhichOneof("payload") == "shared_memory" and h.shared_memory.file == "answers"
    assert response.values["f"].WhichOneof("payload") == "data"  # small tensors stay in the message
    with open(os.path.join(shm_dir, "answers"), "rb") as f:
        f.seek(h.shared_memory.offset)
        written = np.frombuffer(f.read(h.shared_memory.byte_length)).reshape(tuple(h.shape))
    assert np.allclose(written, np.tanh(X @ W))


@pytest.mark.parametrize("name, message", [("nothere", "cannot open 'nothere'"), ("../x", "not a plain file name")])
def test_a_bad_output_file_is_refused_before_any_work(shm_address, name, message):
    request = pb.EvaluateRequest(graph=network().graph.message, shared_memory_output=name)
    with Client(shm_address) as client, grpc.insecure_channel(shm_address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary("/chainrule.v1.Chainrule/Evaluate")(request.SerializeToString())
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in caught.value.details() and "shared_memory_output" in caught.value.details()
        assert client.evaluate(network(), x=X, w=W).value.shape == ()


def test_an_output_file_on_a_server_without_the_directory_is_a_failed_precondition(address):
    request = pb.EvaluateRequest(graph=network().graph.message, shared_memory_output="answers")
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary("/chainrule.v1.Chainrule/Evaluate")(request.SerializeToString())
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_threads_share_a_shared_memory_client(shm_address):
    from concurrent.futures import ThreadPoolExecutor

    f = network()
    expected = {k: float(np.tanh(k * X @ W).sum() * 0.5) for k in range(1, 9)}
    with Client(shm_address, shared_memory=True) as client:
        def call(k: int) -> tuple[int, float, bool]:
            result = client.evaluate(f, x=k * X, w=W)
            return k, float(result.value), np.array_equal(result.values["x"], k * X)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(call, [k for k in range(1, 9) for _ in range(5)]))
    assert all(same and np.isclose(value, expected[k]) for k, value, same in answers)
