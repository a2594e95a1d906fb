"""Tensors handed over in shared memory by clients on the server's own host.

Moving a tensor through gRPC costs about 1 ms per MiB on this kind of machine
(both processes copy it several times and frame it into HTTP/2), against
about 0.15 ms per MiB to write it into a file in ``/dev/shm`` and read it
back. A client on the same host (``Client``'s default ``shared_memory="auto"``
for calls with large inputs, or ``shared_memory=True``) writes its large
tensors into files of the directory the server advertises in ServerInfo (a
private one it made at start, or ``--shared-memory-dir``) and sends only a
reference (``Tensor.shared_memory``).

The server reads the bytes with ``preadv`` into memory of its own, before
any work, rather than mapping the file: a client that shrinks or rewrites its
file meanwhile can then only get a clear error, never crash the server
(SIGBUS) or change the numbers under a running computation.

Any caller of the gRPC port may name a file, so the server must never act as
a deputy for somebody who could not touch the file themselves:

- the directory must be the server user's own and closed to everyone else
  (mode 0700; it is created so when missing), opened once without following
  a symlink, and every file is opened relative to it, without following one;
- a file must be a regular file owned by the server's user, with no other
  link (no FIFO to block a thread, no hard link to a file elsewhere);
- a name is "chainrule-", a random token of 32 hex digits (128 bits) and an
  optional suffix: a caller who may not list the directory cannot guess one,
  and no other file in the directory is ever opened.

So only processes of the server's own user can hand tensors over, and a
remote caller cannot read or overwrite their files. On by default
(``chainrule serve --no-shared-memory`` turns it off).
"""
from __future__ import annotations

import os
import re
import stat
from typing import Any, Iterable

import numpy as np

from chainrule.core.errors import BadTensorError, LimitExceeded, SharedMemoryFull
from chainrule.v1 import chainrule_pb2 as pb

#: Each tensor written into a file starts at a multiple of this many bytes.
ALIGNMENT = 64

#: "chainrule-", 128 random bits in hex, and an optional suffix ("-in", "-out").
_FILE_NAME = re.compile(r"chainrule-[0-9a-f]{32}(-[A-Za-z0-9._]{1,64})?")
_NAME_RULE = "'chainrule-', 32 lowercase hex digits of a random token, and optionally '-' and a suffix"


def new_file_name(suffix: str) -> str:
    """A name no other caller can guess: "chainrule-<32 hex digits>-<suffix>"."""
    return f"chainrule-{os.urandom(16).hex()}-{suffix}"  # what secrets.token_hex does, without its imports


def directory_problem(path: str) -> str | None:
    """Why ``path`` may not serve as the shared-memory directory, or None. A missing directory
    is fine when its parent exists (it is then created, mode 0700)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        parent = os.path.dirname(os.path.abspath(path))
        return None if os.path.isdir(parent) else f"shared_memory_dir {path!r}: neither it nor its parent exists"
    except OSError as exc:
        return f"shared_memory_dir {path!r}: {exc.strerror}"
    if stat.S_ISLNK(info.st_mode):
        return f"shared_memory_dir {path!r} is a symbolic link; give the directory itself"
    if not stat.S_ISDIR(info.st_mode):
        return f"shared_memory_dir {path!r} is not a directory"
    if info.st_uid != os.geteuid():
        return f"shared_memory_dir {path!r} belongs to another user; it must be this user's own"
    if info.st_mode & 0o077:
        return (f"shared_memory_dir {path!r} is open to other users (mode {stat.S_IMODE(info.st_mode):04o}); "
                f"chmod 700 it, since whoever can use it can hand this server tensors")
    return None


class SharedMemoryDir:
    """Reads and writes tensors in the files of one directory (see the module docstring).

    Raises ValueError when the directory is not safe to use; with ``create``, makes it
    (mode 0700) if it is missing.
    """

    def __init__(self, path: str, *, create: bool = False) -> None:
        self.path = os.path.abspath(path)
        if create:
            try:
                os.mkdir(self.path, 0o700)
            except FileExistsError:
                pass
        problem = directory_problem(self.path)
        if problem:
            raise ValueError(problem)
        # Held open: files are opened relative to this very directory, whatever the path comes to name.
        self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)

    def close(self) -> None:
        os.close(self._fd)

    def gone(self) -> bool:
        """Whether the path no longer names the directory opened here (removed, or replaced by
        another): a server that made it has stopped, and a restarted one advertises a new one."""
        try:
            now, opened = os.stat(self.path), os.fstat(self._fd)
        except OSError:
            return True
        return (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino) or opened.st_nlink == 0

    def create(self, name: str) -> "TensorFile":
        """A new, empty file ``name`` readable by this user only (for a client's tensors)."""
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        return TensorFile(os.open(name, flags, 0o600, dir_fd=self._fd), name)

    def remove(self, name: str) -> None:
        try:
            os.unlink(name, dir_fd=self._fd)
        except FileNotFoundError:
            pass

    def _open(self, name: str, flags: int, field: str) -> int:
        """A file descriptor of the regular file ``name`` of the directory, checked (see the module docstring)."""
        if not _FILE_NAME.fullmatch(name):
            raise BadTensorError(f"{field}: {name!r} is not a shared-memory file name ({_NAME_RULE})", field=field)
        try:
            fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=self._fd)
        except OSError as exc:
            raise BadTensorError(f"{field}: cannot open {name!r} in the shared-memory directory: {exc.strerror}",
                                 field=field) from None
        info = os.fstat(fd)
        problem = ("is not a regular file" if not stat.S_ISREG(info.st_mode) else
                   "belongs to another user" if info.st_uid != os.geteuid() else
                   "has other links" if info.st_nlink != 1 else None)
        if problem:
            os.close(fd)
            raise BadTensorError(f"{field}: {name!r} {problem}", field=field)
        return fd

    def open_output(self, name: str, *, field: str) -> "TensorFile":
        """The existing file ``name``, for writing a response's tensors into (checked before any work)."""
        return TensorFile(self._open(name, os.O_WRONLY, field), name, field)

    def read(self, ref: object, dtype: np.dtype, shape: tuple[int, ...], *, field: str) -> np.ndarray:
        """The array of ``shape`` and ``dtype`` whose bytes ``ref`` (a SharedMemoryRef) points to."""
        name, offset, length = ref.file, ref.offset, ref.byte_length  # type: ignore[attr-defined]
        where = f"{field}.shared_memory"
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if length != expected:
            raise BadTensorError(f"{where}: byte_length is {length}; shape {list(shape)} of {dtype.name} needs "
                                 f"{expected}", field=f"{where}.byte_length")
        fd = self._open(name, os.O_RDONLY, f"{where}.file")
        try:
            size = os.fstat(fd).st_size
            if offset + length > size:
                raise BadTensorError(f"{where}: bytes {offset} to {offset + length} lie beyond the end of {name!r} "
                                     f"({size} bytes)", field=f"{where}.offset")
            array = np.empty(shape, dtype)
            if length:
                _read_exactly(fd, memoryview(array.reshape(-1)).cast("B"), offset, name, where)
        finally:
            os.close(fd)
        return array


def check_total(tensors: Iterable[Any], allowed: int, field: str) -> None:
    """Refuse, before reading any, tensors in shared memory that add up to more than ``allowed`` bytes:
    a reference costs the caller a few bytes, the read costs the server the whole length."""
    total = sum(t.shared_memory.byte_length for t in tensors
                if hasattr(t, "WhichOneof") and t.WhichOneof("payload") == "shared_memory")
    if total > allowed:
        raise LimitExceeded(f"{field}: the tensors in shared memory add up to {total} bytes; the memory budget "
                            f"per request is {allowed} (max_memory_bytes)", limit="max_memory_bytes",
                            requested=total, allowed=allowed, field=field)


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

    def __init__(self, fd: int, name: str, field: str = "") -> None:
        self.fd = fd
        self.name = name
        self.field = field or name  # named in errors
        self.size = os.fstat(fd).st_size
        self.used = 0

    def put(self, array: np.ndarray) -> pb.SharedMemoryRef:
        """Write ``array`` (little-endian, C order) after the tensors written so far."""
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        data = memoryview(array.reshape(-1)).cast("B")
        offset = -(-self.used // ALIGNMENT) * ALIGNMENT
        end = offset + len(data)
        try:
            if end > self.size:  # grow; pages written once stay allocated for the next calls
                os.ftruncate(self.fd, end)
                self.size = end
            done = 0
            while done < len(data):
                done += os.pwrite(self.fd, data[done:], offset + done)
        except OSError as exc:  # ENOSPC above all: /dev/shm is 64 MiB in a default Docker container
            raise SharedMemoryFull(f"{self.field}: writing {len(data)} bytes into {self.name!r} failed: "
                                   f"{exc.strerror}", field=self.field) from None
        self.used = end
        return pb.SharedMemoryRef(file=self.name, offset=offset, byte_length=len(data))

    def close(self) -> None:
        os.close(self.fd)
