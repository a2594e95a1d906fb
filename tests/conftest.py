"""Shared fixtures: the registry of built-in operators, and a real server with a client."""
from __future__ import annotations

import pytest

from chainrule.client import Client
from chainrule.plugins.manager import load_plugins
from chainrule.server import create_server


@pytest.fixture(scope="session")
def registry():
    """Every built-in operator, loaded through the plugin manager like in production."""
    return load_plugins(entry_points=False, only=["builtin"]).registry



@pytest.fixture(scope="module")
def address():
    """A real server with the default settings on a free loopback port (one per test module)."""
    server, port = create_server("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None).wait()


@pytest.fixture(scope="module")
def client(address):
    """The real gRPC client, connected to ``address``."""
    with Client(address, timeout=60) as c:
        yield c
