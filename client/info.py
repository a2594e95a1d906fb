"""Plain Python views of ListOperators and ServerInfo answers."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from chainrule.wire.convert import DTYPE_NAMES, attr_to_python
from chainrule.v1 import chainrule_pb2 as pb

_CHECK = {pb.CHECK_NOT_RUN: "not run", pb.CHECK_PASSED: "passed", pb.CHECK_FAILED: "failed"}


@dataclass(frozen=True)
class AttrInfo:
    """One attribute of an operator: its type, default (None when unset) and whether it is required."""

    name: str
    type: str
    default: Any
    required: bool
    doc: str


@dataclass(frozen=True)
class InputInfo:
    """One input of an operator: its name, the dtypes it accepts ("float64", ..., "bool"), and
    whether it stands for every input of a variadic operator."""

    name: str
    dtypes: tuple[str, ...]
    variadic: bool = False


@dataclass(frozen=True)
class OperatorInfo:
    """An operator the server can run: schema and provenance. ``arity`` -1 = variadic; ``inputs``
    in Node.inputs' order (one variadic entry for a variadic operator)."""

    name: str
    arity: int
    attrs: dict[str, AttrInfo] = field(default_factory=dict)
    doc: str = ""
    plugin: str = ""
    distribution: str = ""
    version: str = ""
    check: str = "not run"
    inputs: tuple[InputInfo, ...] = ()

    @classmethod
    def from_proto(cls, info: pb.OperatorInfo) -> "OperatorInfo":
        attrs = {}
        for a in info.attrs:
            default = (attr_to_python(a.default_value, field=f"{info.name}.attrs.{a.name}")
                       if a.HasField("default_value") else None)
            attrs[a.name] = AttrInfo(a.name, a.type, default, a.required, a.doc)
        inputs = tuple(InputInfo(i.name, tuple(DTYPE_NAMES.get(d, f"dtype {d}") for d in i.dtypes), i.variadic)
                       for i in info.inputs)
        return cls(info.name, info.arity, attrs, info.doc, info.plugin, info.distribution, info.version,
                   _CHECK.get(info.check, "not run"), inputs)


@dataclass(frozen=True)
class ServerInfo:
    """Which server answered: chainrule's version, the process id and the worker index, and the
    directory it reads shared-memory tensors from ("" when it does not)."""

    version: str
    pid: int
    worker: int
    shared_memory_dir: str = ""

    @classmethod
    def from_proto(cls, info: pb.ServerInfoResponse) -> "ServerInfo":
        return cls(info.version, info.pid, info.worker, info.shared_memory_dir)
