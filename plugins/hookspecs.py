"""The pluggy hooks chainrule calls. Plugins implement them with ``@hookimpl``."""
from __future__ import annotations

from typing import Callable

import pluggy

from chainrule.core import OpDef

PROJECT = "chainrule"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_operators(register: Callable[[OpDef], None]) -> None:
    """Provide operators: call ``register(op)`` once for each ``OpDef``.

    ``register`` validates the operator at once (name, arity, attribute schema,
    callable rules) and raises naming this plugin when it breaks the contract.
    """
