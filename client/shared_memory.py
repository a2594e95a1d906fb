"""Exchange large tensors with a server on the same host through shared memory.

``Client(address, shared_memory=True)`` asks the server (ServerInfo) for its
shared-memory directory, then writes each large input of a call into a file
of that directory and sends only a reference; the server reads the bytes
before it works, and writes the large tensors of its answer into a second
file, which the client reads back before the call returns (see
chainrule.wire.shared_memory for the rules both sides keep). Files are
reused from call to call, so their pages are allocated once, and removed
when the client closes. Each call in flight has files of its own, so threads
may share the client; a call that fails drops its files, since the server
may still be writing into them.
"""
from __future__ import annotations

import os
import threading
import weakref
from typing import Any

import numpy as np

from chainrule.core.errors import BadTensorError
from chainrule.wire.convert import tensor_to_array
from chainrule.wire.incoming import Incoming, RawTensor
from chainrule.wire.shared_memory import SharedMemoryDir, new_file_name
from chainrule.v1 import chainrule_pb2 as pb


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
        """Take the file back; one whose call failed is removed instead (the server may still write it)."""
        with self._lock:
            if reusable:
                self._free.append(file)
                return
            self._all.remove(file)
        file.close()

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
