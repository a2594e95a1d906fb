"""The operator registry: name -> OpDef, filled by the plugin manager."""
from __future__ import annotations

from typing import Iterable, Iterator

from .errors import DuplicateOperatorError
from .operator import OpDef, validate_opdef


class Registry:
    """Operators by name. A name registered twice is an error naming both providers."""

    def __init__(self, ops: Iterable[OpDef] = ()) -> None:
        self._ops: dict[str, OpDef] = {}
        for op in ops:
            self.add(op)

    def add(self, op: OpDef, *, replace: bool = False) -> None:
        validate_opdef(op, plugin=getattr(op, "plugin", None) or None)
        previous = self._ops.get(op.name)
        if previous is not None and not replace:
            raise DuplicateOperatorError(
                f"operator '{op.name}' is registered twice: by {_provider(previous)} and by {_provider(op)}",
                op=op.name, plugin=op.plugin,
            )
        self._ops[op.name] = op

    def find(self, name: str) -> OpDef | None:
        return self._ops.get(name)

    def __getitem__(self, name: str) -> OpDef:
        return self._ops[name]

    def __contains__(self, name: object) -> bool:
        return name in self._ops

    def __iter__(self) -> Iterator[OpDef]:
        return iter(sorted(self._ops.values(), key=lambda op: op.name))

    def __len__(self) -> int:
        return len(self._ops)

    def names(self) -> list[str]:
        return sorted(self._ops)


def _provider(op: OpDef) -> str:
    name = f"plugin '{op.plugin}'" if op.plugin else "an unnamed plugin"
    if op.distribution:
        name += f" (distribution {op.distribution} {op.version})".rstrip()
    return name
