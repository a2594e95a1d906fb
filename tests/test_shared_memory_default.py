"""Shared memory by default: a server makes a private directory and removes it when it stops, and a
Client on its host uses it for calls with large inputs only, quietly taking the messages whenever it
cannot (a server without it, a directory gone, a restarted server). Real servers on loopback ports."""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import stat
import time

import numpy as np
import pytest

from chainrule.client import Client, GraphBuilder
from chainrule.client.errors import InvalidArgument
from chainrule.client.shared_memory import AUTO_MIN_INPUT_BYTES
from chainrule.server import LocalClient, ServerConfig, create_server
from chainrule.server import grpc_server
from chainrule.server.config import ConfigError, add_arguments, from_sources
from chainrule.server.grpc_server import PrivateDirectory, SharedMemoryDirError

from serving import ServerProcess, free_port, scrape

RNG = np.random.default_rng(7)
LARGE = RNG.normal(size=(4096, 64))   # 2 MiB: handed over in shared memory by default
SMALL = RNG.normal(size=(8, 64))      # 4 KiB: always inside the message
W = RNG.normal(size=(64, 64))
assert LARGE.nbytes >= AUTO_MIN_INPUT_BYTES > SMALL.nbytes + W.nbytes

EVALUATE = 'method="chainrule.v1.Chainrule/Evaluate"'
SERVER_INFO = 'method="chainrule.v1.Chainrule/ServerInfo"'


def network(rows: int):
    g = GraphBuilder()
    x, w = g.input("x", (rows, 64)), g.input("w", (64, 64))
    return ((x @ w).tanh(name="h") * 0.5).sum(name="f")


class Served:
    """A server started in this process on a free loopback port, with metrics to count its calls."""

    def __init__(self, port: int = 0, **settings) -> None:
        self.metrics_port = free_port()
        config = ServerConfig(log_level="WARNING", metrics_port=self.metrics_port, **settings)
        self.server, self.port = create_server(f"127.0.0.1:{port}", config)
        self.server.start()
        self.address = f"127.0.0.1:{self.port}"
        self.directory = self.server.service.shared_memory.path if self.server.service.shared_memory else ""

    def count(self, method: str, metric: str = "chainrule_requests_total") -> float:
        return sum(v for k, v in scrape(self.metrics_port).items() if k.startswith(metric) and method in k)

    def files(self) -> list[str]:
        return sorted(os.listdir(self.directory))

    def stop(self) -> None:
        self.server.stop(None)


@pytest.fixture()
def served():
    server = Served()
    yield server
    server.stop()


def same_as_local(result, rows_input: np.ndarray) -> None:
    """The result is LocalClient's, bit for bit."""
    with LocalClient() as local:
        expected = local.evaluate(network(len(rows_input)), x=rows_input, w=W)
    assert result.value == expected.value
    for name in ("x", "w"):
        assert np.array_equal(result.grad[name], expected.grad[name])


# --- the server's directory -----------------------------------------------------------------------

def test_a_default_server_serves_from_a_private_directory_that_goes_when_it_stops(served):
    with Client(served.address) as client:
        directory = client.server_info().shared_memory_dir
        client.evaluate(network(len(LARGE)), x=LARGE, w=W)  # its files are there until it closes
        assert len(os.listdir(directory)) == 2
    info = os.lstat(directory)
    assert directory == served.directory and os.path.basename(directory).startswith("chainrule-shm-")
    assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.geteuid()
    if os.access("/dev/shm", os.W_OK):
        assert os.path.dirname(directory) == "/dev/shm"
    planted = os.path.join(directory, "chainrule-" + "0" * 32 + "-left")  # a file left by a client
    open(planted, "wb").close()
    served.stop()
    assert not os.path.exists(directory)


def test_a_drained_server_removes_its_directory_once_its_calls_are_done():
    server, _ = create_server("127.0.0.1:0", ServerConfig(log_level="WARNING"))
    server.start()
    directory = server.service.shared_memory.path
    server.drain(5.0).wait()
    ends = time.monotonic() + 5
    while os.path.exists(directory) and time.monotonic() < ends:  # removed right after the stop event
        time.sleep(0.01)
    assert not os.path.exists(directory)


def test_two_servers_get_two_directories():
    first, second = Served(), Served()
    try:
        assert first.directory != second.directory and os.path.isdir(first.directory)
    finally:
        first.stop()
        second.stop()


def test_shared_memory_can_be_turned_off():
    off = Served(shared_memory=False)
    try:
        with Client(off.address) as client:
            assert client.server_info().shared_memory_dir == ""
    finally:
        off.stop()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert from_sources(parser.parse_args(["--no-shared-memory"]), env={}).shared_memory is False
    assert from_sources(parser.parse_args([]), env={"CHAINRULE_SHARED_MEMORY": "off"}).shared_memory is False
    assert from_sources(parser.parse_args([]), env={}).shared_memory is True
    with pytest.raises(ConfigError, match="--no-shared-memory alone turns shared memory off"):
        ServerConfig(shared_memory=False, shared_memory_dir="/dev/shm/x").validate()


def test_a_forked_worker_leaves_its_parents_directory_alone():
    private = PrivateDirectory()
    pid = os.fork()
    if pid == 0:  # a worker: inherits the directory, closes it as at its exit, and leaves
        try:
            private.close()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert os.path.isdir(private.path)
    private.close()
    assert not os.path.exists(private.path)


def test_a_directory_left_by_a_killed_server_is_removed_by_the_next_one(tmp_path):
    left = tmp_path / "chainrule-shm-killed"
    left.mkdir(mode=0o700)
    (left / "chainrule-file").write_bytes(b"x")
    live = PrivateDirectory(str(tmp_path))  # a live server's: locked, never removed
    fresh = tmp_path / "chainrule-shm-fresh"  # changed a moment ago: perhaps a server starting now
    fresh.mkdir(mode=0o700)
    old = time.time() - 2 * grpc_server.ABANDONED_SECONDS
    for path in (left, live.path):
        os.utime(path, (old, old))
    other = PrivateDirectory(str(tmp_path))
    try:
        assert not left.exists() and os.path.isdir(live.path) and fresh.exists()
    finally:
        other.close()
        live.close()


def test_a_directory_that_cannot_be_made_names_the_ways_out(tmp_path):
    with pytest.raises(SharedMemoryDirError, match="--shared-memory-dir .*--no-shared-memory"):
        PrivateDirectory(str(tmp_path / "missing"))


# --- chainrule serve ------------------------------------------------------------------------------

def test_chainrule_serve_removes_its_directory_on_sigterm():
    with ServerProcess("--log-level", "WARNING") as server:
        with Client(server.address, timeout=10) as client:
            directory = client.server_info().shared_memory_dir
            assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
            result = client.evaluate(network(len(LARGE)), x=LARGE, w=W)
        server.send(signal.SIGTERM)
        assert server.wait() == 0, server.log()
    assert not os.path.exists(directory)
    same_as_local(result, LARGE)


def test_workers_share_one_directory_which_the_parent_removes():
    with ServerProcess("--workers", "2", "--log-level", "WARNING") as server:
        seen: dict[int, str] = {}
        ends = time.monotonic() + 20
        while len(seen) < 2 and time.monotonic() < ends:
            with Client(server.address, timeout=10, options=[("grpc.use_local_subchannel_pool", 1)]) as client:
                info = client.server_info()
                result = client.evaluate(network(len(LARGE)), x=LARGE, w=W)  # through the shared files
            seen[info.pid] = info.shared_memory_dir
        assert len(seen) == 2 and len(set(seen.values())) == 1, seen
        directory = next(iter(seen.values()))
        assert os.path.isdir(directory) and not os.listdir(directory)  # each client removed its files
        server.send(signal.SIGTERM)
        assert server.wait() == 0, server.log()
    assert not os.path.exists(directory)
    same_as_local(result, LARGE)


def test_no_shared_memory_serves_none():
    with ServerProcess("--no-shared-memory", "--log-level", "WARNING") as server:
        with Client(server.address, timeout=10) as client:
            assert client.server_info().shared_memory_dir == ""
            same_as_local(client.evaluate(network(len(LARGE)), x=LARGE, w=W), LARGE)


# --- the client's auto mode -----------------------------------------------------------------------

def test_auto_hands_a_large_call_over_in_shared_memory(served):
    with Client(served.address) as client:
        result = client.evaluate(network(len(LARGE)), x=LARGE, w=W)
        sizes = {name.rsplit("-", 1)[1]: os.path.getsize(os.path.join(served.directory, name))
                 for name in served.files()}
        again = client.evaluate(network(len(LARGE)), x=LARGE, w=W)
    assert sorted(sizes) == ["in", "out"]
    assert sizes["in"] >= LARGE.nbytes and sizes["out"] >= LARGE.nbytes  # x in, its gradient out
    assert served.count(SERVER_INFO) == 1  # asked once, then remembered
    assert served.count(EVALUATE, "chainrule_received_bytes_total") < 2 * 65536  # 2 calls, not 2 x 2 MiB
    assert not served.files()  # closing the client removed its files
    same_as_local(result, LARGE)
    same_as_local(again, LARGE)


def test_auto_leaves_small_calls_alone(served):
    with Client(served.address) as client:
        result = client.evaluate(network(len(SMALL)), x=SMALL, w=W)
        assert not served.files()
    assert served.count(SERVER_INFO) == 0  # not even the lookup
    assert served.count(EVALUATE, "chainrule_received_bytes_total") > SMALL.nbytes + W.nbytes
    same_as_local(result, SMALL)


def test_auto_takes_the_messages_quietly_from_a_server_without_shared_memory():
    off = Served(shared_memory=False)
    try:
        with Client(off.address) as client:
            first = client.evaluate(network(len(LARGE)), x=LARGE, w=W)
            second = client.evaluate(network(len(LARGE)), x=LARGE, w=W)
        assert off.count(SERVER_INFO) == 1  # the answer "none" is remembered too
        assert off.count(EVALUATE, "chainrule_received_bytes_total") > 2 * LARGE.nbytes
    finally:
        off.stop()
    same_as_local(first, LARGE)
    same_as_local(second, LARGE)


def test_auto_with_several_addresses_never_asks(served):
    with Client([served.address, served.address]) as client:
        result = client.evaluate(network(len(LARGE)), x=LARGE, w=W)
    assert served.count(SERVER_INFO) == 0 and not served.files()
    same_as_local(result, LARGE)


def test_auto_is_for_loopback_addresses_only(served):
    """A client calling the server through a non-loopback address of this host does not use shared
    memory unless told to (a server elsewhere could name a directory of ours that happens to exist)."""
    from chainrule.client.shared_memory import is_loopback
    port = served.address.rsplit(":", 1)[1]
    assert all(is_loopback(t) for t in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}",
                                        f"dns:///localhost:{port}", f"ipv4:127.0.0.1:{port}", "unix:/tmp/x.sock"))
    assert not any(is_loopback(t) for t in (f"10.1.2.3:{port}", f"example.com:{port}",
                                            f"ipv4:127.0.0.1:{port},127.0.0.1:{port}"))
    with Client(f"localhost:{port}") as client:  # (a name, not a number: still this host's loopback)
        result = client.evaluate(network(len(LARGE)), x=LARGE, w=W)
    assert served.count(SERVER_INFO) == 1
    same_as_local(result, LARGE)


@pytest.mark.parametrize("mode", ["auto", True])
def test_a_restarted_server_is_asked_again_for_its_new_directory(mode):
    first = Served()
    with Client(first.address, shared_memory=mode, timeout=30) as client:
        client.evaluate(network(len(LARGE)), x=LARGE, w=W)
        first.stop()  # its directory goes with it, our files included
        assert not os.path.exists(first.directory)
        second = Served(port=first.port)
        try:
            result = client.evaluate(network(len(LARGE)), x=LARGE, w=W)
            assert len(second.files()) == 2  # learned the new directory: our files are there
            assert second.count(SERVER_INFO) == 1
        finally:
            second.stop()
    same_as_local(result, LARGE)


def test_auto_takes_the_messages_after_a_restart_without_shared_memory():
    first = Served()
    with Client(first.address, timeout=30) as client:
        client.evaluate(network(len(LARGE)), x=LARGE, w=W)
        first.stop()
        second = Served(port=first.port, shared_memory=False)
        try:
            result = client.evaluate(network(len(LARGE)), x=LARGE, w=W)
            assert second.count(EVALUATE, "chainrule_received_bytes_total") > LARGE.nbytes
        finally:
            second.stop()
    same_as_local(result, LARGE)


def test_auto_takes_the_messages_when_the_directory_is_removed_under_a_running_server(served):
    with Client(served.address) as client:
        client.evaluate(network(len(LARGE)), x=LARGE, w=W)
        shutil.rmtree(served.directory)  # by hand: the server still advertises it
        result = client.evaluate(network(len(LARGE)), x=LARGE, w=W)
        again = client.evaluate(network(len(LARGE)), x=LARGE, w=W)
    assert served.count(SERVER_INFO) == 2  # asked again once, and told a directory that is not there
    same_as_local(result, LARGE)
    same_as_local(again, LARGE)


def test_auto_sends_again_through_the_messages_when_the_server_cannot_open_our_files(served):
    with Client(served.address) as client:
        client.evaluate(network(len(LARGE)), x=LARGE, w=W)
        for name in served.files():  # the directory stays; our (reused) files lose their names
            os.unlink(os.path.join(served.directory, name))
        result = client.evaluate(network(len(LARGE)), x=LARGE, w=W)  # refused ("cannot open"), then sent
        later = client.evaluate(network(len(LARGE)), x=LARGE, w=W)
        assert not served.files()  # messages from then on
    assert served.count(EVALUATE, "chainrule_received_bytes_total") > 2 * LARGE.nbytes
    same_as_local(result, LARGE)
    same_as_local(later, LARGE)
    with Client(served.address, shared_memory=True) as strict:  # True keeps failing loudly
        strict.evaluate(network(len(LARGE)), x=LARGE, w=W)
        for name in served.files():
            os.unlink(os.path.join(served.directory, name))
        with pytest.raises(InvalidArgument, match="cannot open"):
            strict.evaluate(network(len(LARGE)), x=LARGE, w=W)


def test_evaluate_many_of_a_default_client_gives_the_same_answers(served):
    with Client(served.address) as client:
        results = client.evaluate_many(network(len(LARGE)), [{"x": LARGE, "w": W}, {"x": 2 * LARGE, "w": W}])
    same_as_local(results[0], LARGE)
    same_as_local(results[1], 2 * LARGE)
