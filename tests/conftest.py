"""Shared fixtures: the registry of built-in operators."""
from __future__ import annotations

import pytest

from chainrule.plugins.manager import load_plugins


@pytest.fixture(scope="session")
def registry():
    """Every built-in operator, loaded through the plugin manager like in production."""
    return load_plugins(entry_points=False, only=["builtin"]).registry

