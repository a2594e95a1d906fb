"""Exchange large tensors with a server on the same host through shared memory.

A server advertises its shared-memory directory in ServerInfo (by default a
private one it made at start). A client that uses it writes each large input
of a call into a file of that directory and sends only a reference; the
server reads the bytes before it works, and writes the large tensors of its
answer into a second file, which the client reads back before the call
returns (see chainrule.wire.shared_memory for the rules both sides keep).
Files are reused from call to call, so their pages are allocated once, and
removed when the client closes. Each call in flight has files of its own, so
threads may share the client; a call that fails drops its files, since the
server may still be writing into them.

When a client uses it is :class:`SameHost`'s decision: ``shared_memory="auto"``
(the default) for calls whose input arrays add up to
:data:`AUTO_MIN_INPUT_BYTES`, to a server at a loopback address (or a Unix
socket) whose directory is usable from here;
``True`` for every call, failing loudly when it cannot; ``False`` never.
"""
from __future__ import annotations

import os
import threading
import time
import weakref
from typing import Any, Callable, Mapping

import grpc
import numpy as np

from chainrule.core.errors import BadTensorError
from chainrule.wire.convert import tensor_to_array
from chainrule.wire.incoming import Incoming, RawTensor
from chainrule.wire.outgoing import LARGE_TENSOR_BYTES
from chainrule.wire.shared_memory import SharedMemoryDir, directory_problem, new_file_name
from chainrule.v1 import chainrule_pb2 as pb

from .channel import address_ip
from .errors import ChainruleRpcError, FailedPrecondition

#: In auto mode, a call hands its inputs over in shared memory once the arrays the files would
#: take (those over LARGE_TENSOR_BYTES) add up to this many bytes. Measured against a server in
#: its own process (2 cores): gRPC and shared memory cost the same near 100 KiB; at 256 KiB shared
#: memory takes 0.82-0.89x gRPC's time, at 1 MiB 0.48-0.69x, at 16 MiB 0.26-0.29x.
AUTO_MIN_INPUT_BYTES = 256 << 10
#: Longest wait for the one ServerInfo lookup of auto mode (a call's own timeout when shorter).
LOOKUP_SECONDS = 5.0
#: Auto mode asks again this long after a lookup that got no answer (an answer is kept for good).
LOOKUP_RETRY_SECONDS = 30.0
#: Errors of a call in shared memory after which auto mode sends it again through the messages.
_FALLBACK_REASONS = frozenset({"SHARED_MEMORY_DISABLED", "SHARED_MEMORY_FULL"})


class StagingFile:
    """A call's two files in the shared-memory directory: one for its inputs, one the server
    writes the large tensors of its response into."""

    def __init__(self, directory: SharedMemoryDir) -> None:
        self.directory = directory
        self.inputs = directory.create(new_file_name("in"))
        self.outputs = directory.create(new_file_name("out"))

    def put(self, array: np.ndarray) -> pb.SharedMemoryRef:
        """Write one input; the request refers to it with the returned reference."""
        return self.inputs.put(array)

    def reset(self) -> None:
        self.inputs.used = 0

    def close(self, remove: bool = True) -> None:
        for file in (self.inputs, self.outputs):
            file.close()
            if remove:
                self.directory.remove(file.name)


class SharedMemoryStaging:
    """The files one client writes its large tensors into, in the server's directory.

    Only the process that created the files removes them: a forked child that
    exits must not take its parent's files along.
    """

    def __init__(self, directory: str) -> None:
        self.directory = SharedMemoryDir(directory)  # ValueError when it is not ours alone
        self._free: list[StagingFile] = []
        self._all: list[StagingFile] = []
        self._retired = False
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _close_all, self._all, self.directory, os.getpid())

    def acquire(self) -> StagingFile:
        """A file for one call, empty; give it back with :meth:`release` once the call has ended."""
        with self._lock:
            if self._free:
                file = self._free.pop()
            else:
                file = StagingFile(self.directory)
                self._all.append(file)
        file.reset()
        return file

    def release(self, file: StagingFile, *, reusable: bool = True) -> None:
        """Take the file back; one whose call failed is removed instead (the server may still write
        it), and so is every file once this staging is retired."""
        with self._lock:
            if reusable and not self._retired:
                self._free.append(file)
                return
            self._all.remove(file)
        file.close()

    def retire(self) -> bool:
        """Hand out no more files (their directory is gone): close those no call holds now; the
        others are closed as their calls give them back, never under a call that writes them.
        Whether any is still held."""
        with self._lock:
            self._retired = True
            idle, self._free = self._free, []
            for file in idle:
                self._all.remove(file)
            held = bool(self._all)
        for file in idle:
            file.close()
        return held

    def holds(self, file: StagingFile) -> bool:
        """Whether ``file`` is one of this staging's."""
        return file.directory is self.directory

    def close(self) -> None:
        """Remove every file (calls still in flight may fail)."""
        self._finalizer()


def _close_all(files: list[StagingFile], directory: SharedMemoryDir, creator: int) -> None:
    for file in files:
        file.close(remove=os.getpid() == creator)
    files.clear()
    directory.close()


def read_outputs(response: Any, staging: StagingFile) -> Incoming:
    """The response with every tensor the server wrote into ``staging``'s output file read back
    into memory of our own (the file is reused by the next call)."""
    incoming = response if isinstance(response, Incoming) else Incoming(response)
    message = incoming.message
    for field in ("values", "gradients"):
        for key, tensor in getattr(message, field).items():
            if tensor.WhichOneof("payload") == "shared_memory":
                incoming.raw_maps.setdefault(field, {})[key] = _read(tensor, staging, f"{field}.{key}")
    if message.output_value.WhichOneof("payload") == "shared_memory":
        incoming.raw_singles["output_value"] = _read(message.output_value, staging, "output_value")
    return incoming


def _read(tensor: pb.Tensor, staging: StagingFile, field: str) -> RawTensor:
    if tensor.shared_memory.file != staging.outputs.name:  # a response may only point into our own output file
        raise BadTensorError(f"{field}: the response refers to {tensor.shared_memory.file!r}, not to this call's "
                             f"output file", field=f"{field}.shared_memory.file")
    array = tensor_to_array(tensor, field=field, shared_memory=staging.directory)
    return RawTensor(tensor.dtype, tuple(tensor.shape), memoryview(array.reshape(-1)).cast("B"))


def staged_input_bytes(feeds: Mapping[str, Any]) -> int:
    """Bytes of a call's inputs that would go into the staging file: the numpy arrays large enough
    for the carrier to take (other values travel in the message either way)."""
    total = 0
    for value in feeds.values():
        if type(value) is np.ndarray and value.nbytes > LARGE_TENSOR_BYTES:
            total += value.nbytes
    return total


def is_loopback(target: str) -> bool:
    """Whether a gRPC target names one server through this host's loopback interface or a Unix
    socket ("127.0.0.1:50051", "localhost:50051", "[::1]:50051", "dns:///localhost:50051",
    "ipv4:127.0.0.1:50051", "unix:/run/chainrule.sock"); not a list of addresses."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    if "," in target:
        return False
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target[len(scheme):]
            break
    ip = address_ip(target)
    if ip is not None:
        return ip.is_loopback
    return target.rpartition(":")[0] in ("localhost", "ip6-localhost")


class SameHost:
    """Whether, and through which directory, one client's ``evaluate`` calls hand their large
    tensors to its server in shared memory.

    ``mode`` True: every call, and a reason it cannot (the server has no directory, it is not on
    this host, or not this user's alone) is a FailedPrecondition. "auto" (to a loopback address): calls whose input arrays
    add up to AUTO_MIN_INPUT_BYTES, when the server's directory is usable from here; otherwise,
    and after a call that shared memory failed, quietly through the messages. False: never.
    The server is asked for its directory (ServerInfo, ``lookup(timeout)``) once, when the first
    call needs it, and again only when the directory learned has disappeared (the server
    was restarted: a new server makes a new private directory), or (auto) a lookup got no answer
    LOOKUP_RETRY_SECONDS ago.
    """

    def __init__(self, mode: bool | str, address: str) -> None:
        if not (isinstance(mode, bool) or mode == "auto"):
            raise ValueError(f"shared_memory must be True, False or \"auto\" (got {mode!r})")
        if mode is True and "," in address:  # each server would need our files on its host
            raise ValueError(f"shared_memory=True needs a single server on this host, not several: {address!r}")
        self.required = mode is True
        #: False: never (also "auto" for a target that is not this host's loopback address: a server
        #: elsewhere could name a directory of ours that happens to exist, and we would write there).
        self.enabled = mode is True or (mode == "auto" and is_loopback(address))
        self.address = address
        self._staging: SharedMemoryStaging | None = None
        #: Stagings of directories that disappeared, while calls still hold some of their files.
        self._retired: list[SharedMemoryStaging] = []
        self._usable = True  # (auto) False once the server said no, or its directory is not usable here
        self._ask_after = 0.0  # (auto) monotonic time before which a lookup that got no answer is not repeated
        self._lock = threading.Lock()

    def staging(self, feeds: Mapping[str, Any], timeout: float | None,
                lookup: Callable[[float | None], str]) -> StagingFile | None:
        """Files for one call's large tensors, or None: through the messages. ``lookup(timeout)``
        gives the server's directory (ServerInfo), when it must be asked. Costs a call below the
        threshold (auto) one pass over its inputs, and nothing else."""
        if not self.enabled or (not self.required and staged_input_bytes(feeds) < AUTO_MIN_INPUT_BYTES):
            return None
        with self._lock:
            shared = self._current(timeout, lookup)
        if shared is None:
            return None
        try:
            return shared.acquire()
        except OSError as exc:  # the directory vanished just now, or /dev/shm is full
            if self.required:
                raise FailedPrecondition(grpc.StatusCode.FAILED_PRECONDITION,
                                         f"cannot create a file in the shared-memory directory "
                                         f"{shared.directory.path!r}: {exc.strerror}",
                                         reason="SHARED_MEMORY_UNREACHABLE") from None
            return None

    def release(self, file: StagingFile, *, reusable: bool) -> None:
        """The call that had ``file`` has ended (and failed, when not ``reusable``)."""
        with self._lock:
            owner = next((s for s in (self._staging, *self._retired) if s is not None and s.holds(file)), None)
        if owner is None:  # (closed with the client meanwhile)
            return
        owner.release(file, reusable=reusable)
        if owner is not self._staging and not owner.retire():  # the last file of a gone directory
            with self._lock:
                if owner in self._retired:
                    self._retired.remove(owner)
            owner.close()

    def failed(self, error: ChainruleRpcError) -> bool:
        """A call in shared memory failed with ``error``: whether to send it again through the
        messages (auto only). A refusal of the files themselves (the server has no directory, or
        cannot open or fill ours) also ends auto's use of shared memory for this client; the server
        gone (UNAVAILABLE) does not: a restarted one is asked again (see :meth:`_current`)."""
        if self.required:
            return False
        if error.code == grpc.StatusCode.UNAVAILABLE:
            return True
        if error.reason in _FALLBACK_REASONS or "shared_memory" in (error.field or ""):
            with self._lock:
                self._usable = False
                if self._staging is not None:  # its idle files go now; it stays to notice a restart
                    self._staging.retire()
            return True
        return False

    def close(self) -> None:
        """Remove every file (calls still in flight may fail)."""
        with self._lock:
            every = [s for s in (self._staging, *self._retired) if s is not None]
            self._staging, self._retired = None, []
        for staging in every:
            staging.close()

    def _current(self, timeout: float | None, lookup: Callable[[float | None], str]) -> "SharedMemoryStaging | None":
        """The staging files of the server's directory, learned when first needed (under the lock)."""
        if self._staging is not None and self._staging.directory.gone():  # the server went, and its directory
            if self._staging.retire():
                self._retired.append(self._staging)
            else:
                self._staging.close()
            self._staging, self._usable, self._ask_after = None, True, 0.0
        if self._staging is not None and self._usable:
            return self._staging
        if not self._usable or time.monotonic() < self._ask_after:
            return None
        self._staging = self._learn(timeout, lookup)
        return self._staging

    def _learn(self, timeout: float | None, lookup: Callable[[float | None], str]) -> "SharedMemoryStaging | None":
        """Ask the server for its directory; None (auto) when it has none usable from here."""
        if self.required:
            return SharedMemoryStaging(self._check(lookup(timeout)))
        try:
            directory = lookup(LOOKUP_SECONDS if timeout is None else min(timeout, LOOKUP_SECONDS))
        except ChainruleRpcError:  # no answer: not now; asked again later
            self._ask_after = time.monotonic() + LOOKUP_RETRY_SECONDS
            return None
        try:
            return SharedMemoryStaging(self._check(directory))
        except (ChainruleRpcError, ValueError, OSError):
            self._usable = False  # the answer stands: kept for this client's life
            return None

    def _check(self, directory: str) -> str:
        """``directory`` when this client can use it, else the FailedPrecondition saying why."""
        problem = directory_problem(directory) if directory and os.path.isdir(directory) else None
        if not directory:
            reason, text = "SHARED_MEMORY_DISABLED", (
                f"the server at {self.address} does not accept shared memory (started with --no-shared-memory, "
                "or a chainrule server too old to have a directory of its own: give it --shared-memory-dir), "
                "so shared_memory=True cannot be used")
        elif not os.path.isdir(directory):
            reason, text = "SHARED_MEMORY_UNREACHABLE", (
                f"the server's shared-memory directory {directory!r} is not on this host: shared memory needs "
                "the client and the server on the same machine")
        elif problem:  # another user's directory: the server could not read our files, and should not
            reason = "SHARED_MEMORY_FORBIDDEN"
            text = f"{problem}: shared memory needs the client to run as the server's user"
        else:
            return directory
        raise FailedPrecondition(grpc.StatusCode.FAILED_PRECONDITION, text, reason=reason)
