"""Hand large request tensors to a server on the same host through shared memory.

``Client(address, shared_memory=True)`` asks the server (ServerInfo) for its
shared-memory directory, then writes each large input of a call into a file
of that directory and sends only a reference; the server reads the bytes
before it answers (see chainrule.server.shared_memory). Files are reused from
call to call, so their pages are allocated once, and removed when the client
closes. Each call in flight has a file of its own, so threads may share the
client.
"""
from __future__ import annotations

import os
import secrets
import threading
import weakref
from typing import Any

import numpy as np

from chainrule.server.convert import dtype_code
from chainrule.v1 import chainrule_pb2 as pb

#: Each tensor starts at a multiple of this many bytes in its file.
ALIGNMENT = 64


class StagingFile:
    """One file of the shared-memory directory, written by one call at a time."""

    def __init__(self, directory: str, name: str) -> None:
        self.name = name
        self.path = os.path.join(directory, name)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.size = 0
        self.used = 0

    def put(self, array: np.ndarray) -> pb.SharedMemoryRef:
        """Write ``array`` (little-endian, C order) after what this call wrote so far."""
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        data = memoryview(array.reshape(-1)).cast("B")
        offset = -(-self.used // ALIGNMENT) * ALIGNMENT
        end = offset + len(data)
        if end > self.size:  # grow; pages written once stay allocated for the next calls
            os.ftruncate(self.fd, end)
            self.size = end
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], offset + done)
        self.used = end
        return pb.SharedMemoryRef(file=self.name, offset=offset, byte_length=len(data))

    def close(self) -> None:
        os.close(self.fd)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class SharedMemoryStaging:
    """The files one client writes its large tensors into, in the server's directory."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._prefix = f"chainrule-client-{os.getpid()}-{secrets.token_hex(4)}"
        self._free: list[StagingFile] = []
        self._all: list[StagingFile] = []
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _close_all, self._all)

    def acquire(self) -> StagingFile:
        """A file for one call, empty; give it back with :meth:`release` once the call has ended."""
        with self._lock:
            if self._free:
                file = self._free.pop()
            else:
                file = StagingFile(self.directory, f"{self._prefix}-{len(self._all)}")
                self._all.append(file)
        file.used = 0
        return file

    def release(self, file: StagingFile) -> None:
        with self._lock:
            self._free.append(file)

    def close(self) -> None:
        """Remove every file (calls still in flight may fail)."""
        self._finalizer()


def _close_all(files: list[StagingFile]) -> None:
    for file in files:
        file.close()
    files.clear()


def can_stage(array: Any, threshold: int) -> bool:
    """Whether an input is worth handing over in shared memory: large, and of a dtype the wire knows."""
    return isinstance(array, np.ndarray) and array.nbytes > threshold and dtype_code(array.dtype) is not None
