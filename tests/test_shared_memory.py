"""Large inputs handed over in shared memory, through a real server on this host and the real client."""
from __future__ import annotations

import os
import re
import stat
import tempfile

import grpc
import numpy as np
import pytest

from chainrule.client import Client, GraphBuilder
from chainrule.client.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from chainrule.client.shared_memory import SharedMemoryStaging, read_outputs
from chainrule.core.errors import BadTensorError
from chainrule.server.config import ConfigError, ServerConfig
from chainrule.wire.convert import array_to_tensor
from chainrule.core.errors import SharedMemoryFull
from chainrule.wire.shared_memory import TensorFile
from chainrule.wire.status import status_for
from chainrule.v1 import chainrule_pb2 as pb

from helpers import start_server

RNG = np.random.default_rng(3)
X = RNG.normal(size=(300, 40))       # 96,000 bytes: large enough to be handed over
W = RNG.normal(size=(40, 500))


SHM_BASE = "/dev/shm" if os.path.isdir("/dev/shm") else None  # RAM-backed where there is one


@pytest.fixture(scope="module")
def shm_dir():
    with tempfile.TemporaryDirectory(prefix="chainrule-test-", dir=SHM_BASE) as directory:
        yield directory


@pytest.fixture(scope="module")
def shm_address(shm_dir):
    server, address = start_server(ServerConfig(shared_memory_dir=shm_dir))
    yield address
    server.stop(None)


@pytest.fixture(scope="module")
def plain_address():
    """A server started without shared memory (--no-shared-memory)."""
    server, address = start_server(ServerConfig(shared_memory=False))
    yield address
    server.stop(None)


def network():
    g = GraphBuilder()
    x, w = g.input("x", (300, 40)), g.input("w", (40, 500))
    return ((x @ w).tanh(name="h") * 0.5).sum(name="f")


def test_inputs_in_shared_memory_give_the_same_result_as_sent_ones(shm_address, shm_dir):
    f = network()
    with Client(shm_address, shared_memory=True) as shared, Client(shm_address, shared_memory=False) as sent:
        via_files = shared.evaluate(f, x=X, w=W, values="all")
        via_grpc = sent.evaluate(f, x=X, w=W, values="all")
        files = {n.rsplit("-", 1)[1]: n for n in os.listdir(shm_dir) if n.startswith("chainrule-")}
        assert sorted(files) == ["in", "out"] and len(set(n.split("-")[1] for n in files.values())) == 2
        assert all(re.fullmatch(r"chainrule-[0-9a-f]{32}-(in|out)", n) for n in files.values())  # unguessable
        assert all(os.stat(os.path.join(shm_dir, n)).st_mode & 0o777 == 0o600 for n in files.values())
        assert os.path.getsize(os.path.join(shm_dir, files["out"])) >= X.nbytes  # the server wrote values there
        again = shared.evaluate(f, x=2 * X, w=W, values="all")  # the file is reused with new contents
    assert via_files.value == via_grpc.value
    for name in ("x", "w", "h"):
        assert np.array_equal(via_files.grad[name], via_grpc.grad[name])
    assert np.array_equal(via_files.values["x"], X) and np.array_equal(again.values["x"], 2 * X)
    assert not os.listdir(shm_dir)  # closing the client removed its files


def test_server_info_names_the_directory(shm_address, shm_dir, plain_address):
    with Client(shm_address) as client:
        assert client.server_info().shared_memory_dir == os.path.abspath(shm_dir)
    with Client(plain_address) as client:
        assert client.server_info().shared_memory_dir == ""


def test_a_server_without_the_directory_refuses_clearly(plain_address):
    address = plain_address
    with Client(address, shared_memory=True) as client:
        with pytest.raises(FailedPrecondition, match="--no-shared-memory") as caught:
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


def name(suffix: str) -> str:
    """A file name as the rules want it (a 128-bit token), fixed per suffix across a test run."""
    return f"chainrule-{(suffix.encode().hex() * 32)[:32]}-{suffix}"


SHORT, WHOLE, LINK, FIFO, LINKED = (name(s) for s in ("short", "whole", "link", "fifo", "linked"))

BAD_REFERENCES = [
    ("../etc/passwd", 0, X.nbytes, "not a shared-memory file name", "inputs.x.shared_memory.file"),
    ("app-state.bin", 0, X.nbytes, "not a shared-memory file name", "inputs.x.shared_memory.file"),  # guessable
    ("chainrule-0123-in", 0, X.nbytes, "not a shared-memory file name", "inputs.x.shared_memory.file"),
    (name("missing"), 0, X.nbytes, "cannot open", "inputs.x.shared_memory.file"),
    (SHORT, 0, X.nbytes, "lie beyond the end of", "inputs.x.shared_memory.offset"),
    (WHOLE, 8, X.nbytes, "lie beyond the end of", "inputs.x.shared_memory.offset"),
    (WHOLE, 0, X.nbytes - 8, "byte_length is 95992", "inputs.x.shared_memory.byte_length"),
    (LINK, 0, X.nbytes, "cannot open", "inputs.x.shared_memory.file"),  # symlinks are not followed
    (FIFO, 0, X.nbytes, "is not a regular file", "inputs.x.shared_memory.file"),  # and no thread waits on it
    (LINKED, 0, X.nbytes, "has other links", "inputs.x.shared_memory.file"),  # a hard link to a file elsewhere
]


@pytest.fixture(scope="module")
def planted(shm_dir):
    """Files in the directory for the bad references to point at."""
    write_file(shm_dir, SHORT, X.tobytes()[:1000])
    write_file(shm_dir, WHOLE, X.tobytes())
    os.symlink(os.path.join(shm_dir, WHOLE), os.path.join(shm_dir, LINK))
    os.mkfifo(os.path.join(shm_dir, FIFO))
    fd, elsewhere = tempfile.mkstemp(dir=os.path.dirname(shm_dir))  # a hard link needs the same filesystem
    os.write(fd, X.tobytes())
    os.close(fd)
    os.link(elsewhere, os.path.join(shm_dir, LINKED))
    yield
    for planted_name in (SHORT, WHOLE, LINK, FIFO, LINKED):
        os.unlink(os.path.join(shm_dir, planted_name))
    os.unlink(elsewhere)


@pytest.mark.parametrize("name, offset, length, message, field", BAD_REFERENCES,
                         ids=[f"{b[0].split('-')[-1]}-{b[1]}-{b[2]}" for b in BAD_REFERENCES])
def test_bad_references_are_invalid_arguments_naming_the_field(shm_address, planted, name, offset, length,
                                                               message, field):
    x = pb.Tensor(dtype=pb.FLOAT64, shape=X.shape,
                  shared_memory=pb.SharedMemoryRef(file=name, offset=offset, byte_length=length))
    with Client(shm_address, timeout=10) as client:
        with pytest.raises(InvalidArgument, match=message) as caught:
            client.evaluate(network(), {"x": x, "w": W})
        assert caught.value.field == field
        assert client.evaluate(network(), x=X, w=W).value.shape == ()  # still serving


def test_a_reference_in_a_well_formed_file_reads_exactly_those_bytes(shm_address, shm_dir):
    offset = name("offset")
    write_file(shm_dir, offset, b"\xff" * 24 + X.tobytes() + b"\xff" * 5)
    x = pb.Tensor(dtype=pb.FLOAT64, shape=X.shape,
                  shared_memory=pb.SharedMemoryRef(file=offset, offset=24, byte_length=X.nbytes))
    with Client(shm_address) as client:
        result = client.evaluate(network(), {"x": x, "w": W}, values="all")
    assert np.array_equal(result.values["x"], X)
    os.unlink(os.path.join(shm_dir, offset))


def test_nothing_is_read_for_an_undeclared_input_nor_beyond_the_memory_budget(shm_dir):
    """A reference costs a few bytes and its read the whole length: names and the total are checked first."""
    big = name("big")
    with open(os.path.join(shm_dir, big), "wb") as f:
        f.truncate(64 << 20)  # sparse: costs nothing until read
    server, address = start_server(ServerConfig(shared_memory_dir=shm_dir, max_memory_bytes=32 << 20))
    try:
        with Client(address) as client:
            undeclared = pb.Tensor(dtype=pb.FLOAT64, shape=[1 << 20],
                                   shared_memory=pb.SharedMemoryRef(file=name("absent"), byte_length=8 << 20))
            with pytest.raises(InvalidArgument) as caught:  # not "cannot open": the name failed first
                client.evaluate(network(), {"x": X, "w": W, "junk": undeclared})
            assert caught.value.reason == "UNEXPECTED_INPUT" and caught.value.field == "inputs.junk"
            too_much = pb.Tensor(dtype=pb.FLOAT64, shape=[300, 40 * 700],
                                 shared_memory=pb.SharedMemoryRef(file=big, byte_length=300 * 40 * 700 * 8))
            with pytest.raises(ResourceExhausted, match="add up to 67200000 bytes") as exhausted:
                client.evaluate(network(), {"x": too_much, "w": W})
            assert exhausted.value.metadata["limit"] == "max_memory_bytes"
            assert client.evaluate(network(), x=X, w=W).value.shape == ()
    finally:
        server.stop(None)
        os.unlink(os.path.join(shm_dir, big))


def test_the_directory_is_created_private_when_missing_and_kept_at_stop(tmp_path):
    directory = tmp_path / "shm"
    server, _ = start_server(ServerConfig(shared_memory_dir=str(directory)))
    server.stop(None)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700  # a named directory outlives the server
    with pytest.raises(ConfigError, match="neither it nor its parent exists"):
        ServerConfig(shared_memory_dir=str(tmp_path / "no" / "where")).validate()


def test_a_directory_others_could_use_is_refused(tmp_path):
    """Whoever can write or list the directory could hand the server tensors or find the files' names."""
    shared = tmp_path / "open"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    with pytest.raises(ConfigError, match="chmod 700"):
        ServerConfig(shared_memory_dir=str(shared)).validate()
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(private)  # a symlink could be swapped for somebody else's directory
    with pytest.raises(ConfigError, match="symbolic link"):
        ServerConfig(shared_memory_dir=str(tmp_path / "link")).validate()


def test_a_client_refuses_a_directory_opened_to_others_after_the_server_started(tmp_path):
    directory = tmp_path / "shm"
    server, address = start_server(ServerConfig(shared_memory_dir=str(directory)))
    try:
        directory.chmod(0o777)
        with Client(address, shared_memory=True) as client:
            with pytest.raises(FailedPrecondition, match="open to other users") as caught:
                client.evaluate(network(), x=X, w=W)
        assert caught.value.reason == "SHARED_MEMORY_FORBIDDEN" and not os.listdir(directory)
    finally:
        server.stop(None)


def test_shared_memory_needs_a_single_server():
    with pytest.raises(ValueError, match="single server"):
        Client(["127.0.0.1:1", "127.0.0.1:2"], shared_memory=True)
    with pytest.raises(ValueError, match="True, False or \"auto\""):
        Client("127.0.0.1:1", shared_memory="yes")


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
    answers = name("answers")
    write_file(shm_dir, answers, b"")
    request = pb.EvaluateRequest(graph=network().graph.message, shared_memory_output=answers)
    request.inputs["x"].CopyFrom(array_to_tensor(X))
    request.inputs["w"].CopyFrom(array_to_tensor(W))
    with grpc.insecure_channel(shm_address) as channel:
        data = channel.unary_unary("/chainrule.v1.Chainrule/Evaluate")(request.SerializeToString())
    response = pb.EvaluateResponse.FromString(data)
    h = response.values["h"]
    assert h.WhichOneof("payload") == "shared_memory" and h.shared_memory.file == answers
    assert response.values["f"].WhichOneof("payload") == "data"  # small tensors stay in the message
    with open(os.path.join(shm_dir, answers), "rb") as f:
        f.seek(h.shared_memory.offset)
        written = np.frombuffer(f.read(h.shared_memory.byte_length)).reshape(tuple(h.shape))
    assert np.allclose(written, np.tanh(X @ W))
    os.unlink(os.path.join(shm_dir, answers))


@pytest.mark.parametrize("file, message", [(name("nothere"), "cannot open"), ("../x", "not a shared-memory file name"),
                                           (FIFO, "cannot open"),  # at once: a FIFO without a reader, not a wait
                                           (LINKED, "has other links")], ids=["missing", "path", "fifo", "linked"])
def test_a_bad_output_file_is_refused_before_any_work(shm_address, planted, file, message):
    request = pb.EvaluateRequest(graph=network().graph.message, shared_memory_output=file)
    with Client(shm_address) as client, grpc.insecure_channel(shm_address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary("/chainrule.v1.Chainrule/Evaluate")(request.SerializeToString())
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in caught.value.details() and "shared_memory_output" in caught.value.details()
        assert client.evaluate(network(), x=X, w=W).value.shape == ()


def test_an_output_file_on_a_server_without_the_directory_is_a_failed_precondition(plain_address):
    request = pb.EvaluateRequest(graph=network().graph.message, shared_memory_output=name("answers"))
    with grpc.insecure_channel(plain_address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary("/chainrule.v1.Chainrule/Evaluate")(request.SerializeToString())
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_threads_share_a_shared_memory_client(shm_address):
    from concurrent.futures import ThreadPoolExecutor

    f = network()
    expected = {k: float(np.tanh(k * X @ W).sum() * 0.5) for k in range(1, 9)}
    with Client(shm_address, shared_memory=True) as client:
        def call(k: int) -> tuple[int, float, bool]:
            result = client.evaluate(f, x=k * X, w=W, values="all")
            return k, float(result.value), np.array_equal(result.values["x"], k * X)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(call, [k for k in range(1, 9) for _ in range(5)]))
    assert all(same and np.isclose(value, expected[k]) for k, value, same in answers)


def test_a_failed_call_drops_its_files_which_the_server_may_still_be_writing(shm_address, shm_dir):
    others = set(os.listdir(shm_dir))
    with Client(shm_address, shared_memory=True) as client:
        client.evaluate(network(), x=X, w=W)
        mine = set(os.listdir(shm_dir)) - others
        with pytest.raises(InvalidArgument):
            client.evaluate(network(), x=X, w=W, junk=X)
        assert len(mine) == 2 and not mine & set(os.listdir(shm_dir))  # gone, not handed to the next call
        again = client.evaluate(network(), x=2 * X, w=W, values="all")
        assert np.array_equal(again.values["x"], 2 * X) and len(set(os.listdir(shm_dir)) - others) == 2


@pytest.fixture
def own_dir():
    """A directory of the test's own (mode 0700, as mkdtemp makes it)."""
    with tempfile.TemporaryDirectory(prefix="chainrule-test-", dir=SHM_BASE) as directory:
        yield directory


def test_a_response_may_only_point_into_the_calls_own_output_file(own_dir):
    staging = SharedMemoryStaging(own_dir)
    try:
        mine, other = staging.acquire(), staging.acquire()
        ref = other.outputs.put(X)
        response = pb.EvaluateResponse()
        response.values["x"].CopyFrom(pb.Tensor(dtype=pb.FLOAT64, shape=X.shape, shared_memory=ref))
        with pytest.raises(BadTensorError, match="not to this call's output file"):
            read_outputs(response, mine)
        assert bytes(read_outputs(response, other).tensor_map("values")["x"].data) == X.tobytes()
    finally:
        staging.close()
    assert not os.listdir(own_dir)


def test_a_forked_child_leaves_its_parents_files_alone(own_dir):
    staging = SharedMemoryStaging(own_dir)
    staging.acquire()
    files = set(os.listdir(own_dir))
    pid = os.fork()
    if pid == 0:  # the child closes what it inherited, as at its exit, and leaves
        try:
            staging.close()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert set(os.listdir(own_dir)) == files and len(files) == 2
    staging.close()
    assert not os.listdir(own_dir)


def test_a_full_filesystem_is_resource_exhausted_naming_the_field():
    fd = os.open("/dev/full", os.O_WRONLY)  # every write: ENOSPC
    file = TensorFile(fd, "chainrule-out", "shared_memory_output")
    file.size = 1 << 30  # no need to grow it
    try:
        with pytest.raises(SharedMemoryFull, match="No space left on device") as caught:
            file.put(X)
    finally:
        file.close()
    assert caught.value.field == "shared_memory_output"
    assert status_for(caught.value).code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
