"""Tensors handed over in shared memory by clients on the server's own host.

Moving a tensor through gRPC costs about 1 ms per MiB on this kind of machine
(both processes copy it several times and frame it into HTTP/2), against
about 0.15 ms per MiB to write it into a file in ``/dev/shm`` and read it
back. A client on the same host (``Client(..., shared_memory=True)``) writes
its large tensors into files of the directory this server was started with
(``--shared-memory-dir``) and sends only a reference (``Tensor.shared_memory``).

The server reads the bytes with ``preadv`` into memory of its own, before
any work, rather than mapping the file: a client that shrinks or rewrites its
file meanwhile can then only get a clear error, never crash the server
(SIGBUS) or change the numbers under a running computation. Names are plain
file names in the one configured directory and are opened without following
symlinks, so a reference cannot reach any other file. Off by default: the
files are readable by whoever may write them, so use it on a host whose
users you trust with each other's tensors.
"""
from __future__ import annotations

import os
import re
import stat

import numpy as np

from chainrule.core.errors import BadTensorError, ChainruleError
from chainrule.v1 import chainrule_pb2 as pb

#: Each tensor written into a file starts at a multiple of this many bytes.
ALIGNMENT = 64

_FILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}")


class SharedMemoryUnavailable(ChainruleError):
    """A tensor came in shared memory, but this server does not accept it (FAILED_PRECONDITION)."""

    reason = "SHARED_MEMORY_DISABLED"


class SharedMemoryDir:
    """Reads tensors from the files of one directory."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)

    def open_output(self, name: str, *, field: str) -> "TensorFile":
        """The existing file ``name``, for writing a response's tensors into (checked before any work)."""
        if not _FILE_NAME.fullmatch(name):
            raise BadTensorError(f"{field}: file {name!r} is not a plain file name (letters, digits, '.', '_', '-')",
                                 field=field)
        try:
            fd = os.open(os.path.join(self.path, name), os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise BadTensorError(f"{field}: cannot open {name!r} in the shared-memory directory: {exc.strerror}",
                                 field=field) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise BadTensorError(f"{field}: {name!r} is not a regular file", field=field)
        return TensorFile(fd, name)

    def read(self, ref: object, dtype: np.dtype, shape: tuple[int, ...], *, field: str) -> np.ndarray:
        """The array of ``shape`` and ``dtype`` whose bytes ``ref`` (a SharedMemoryRef) points to."""
        name, offset, length = ref.file, ref.offset, ref.byte_length  # type: ignore[attr-defined]
        where = f"{field}.shared_memory"
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if length != expected:
            raise BadTensorError(f"{where}: byte_length is {length}; shape {list(shape)} of {dtype.name} needs "
                                 f"{expected}", field=f"{where}.byte_length")
        if not _FILE_NAME.fullmatch(name):
            raise BadTensorError(f"{where}: file {name!r} is not a plain file name (letters, digits, '.', '_', '-')",
                                 field=f"{where}.file")
        array = np.empty(shape, dtype)
        if not length:
            return array
        try:
            fd = os.open(os.path.join(self.path, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise BadTensorError(f"{where}: cannot open {name!r} in the shared-memory directory: {exc.strerror}",
                                 field=f"{where}.file") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise BadTensorError(f"{where}: {name!r} is not a regular file", field=f"{where}.file")
            if offset + length > info.st_size:
                raise BadTensorError(f"{where}: bytes {offset} to {offset + length} lie beyond the end of {name!r} "
                                     f"({info.st_size} bytes)", field=f"{where}.offset")
            _read_exactly(fd, memoryview(array.reshape(-1)).cast("B"), offset, name, where)
        finally:
            os.close(fd)
        return array


def _read_exactly(fd: int, buffer: memoryview, offset: int, name: str, where: str) -> None:
    done = 0
    while done < len(buffer):
        try:
            got = os.preadv(fd, [buffer[done:]], offset + done)
        except OSError as exc:
            raise BadTensorError(f"{where}: reading {name!r} failed: {exc.strerror}", field=f"{where}.file") from None
        if got == 0:  # the file shrank since it was checked
            raise BadTensorError(f"{where}: {name!r} ended after {offset + done} bytes", field=f"{where}.offset")
        done += got


class TensorFile:
    """An open file that tensors are written into one after another, each aligned."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name
        self.size = os.fstat(fd).st_size
        self.used = 0

    def put(self, array: np.ndarray) -> pb.SharedMemoryRef:
        """Write ``array`` (little-endian, C order) after the tensors written so far."""
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
