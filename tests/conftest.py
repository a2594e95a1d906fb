"""Shared fixtures: the registry of built-in operators, and a real server with a client."""
from __future__ import annotations

import os
import tempfile

import pytest

from chainrule.client import Client
from chainrule.plugins.manager import load_plugins
from chainrule.server import create_server


# Servers the tests start check third-party operators at start and cache the verdicts: keep that
# cache out of the user's own cache directory, for servers built in this process (whose default
# follows XDG_CACHE_HOME) and in subprocesses (which also read CHAINRULE_CHECK_CACHE_FILE). pip keeps
# its own cache where it was (tests/test_plugin_package.py installs packages).
_TEST_CACHE = tempfile.mkdtemp(prefix="chainrule-test-cache-")
os.environ.setdefault("PIP_CACHE_DIR", os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pip"))
os.environ["XDG_CACHE_HOME"] = _TEST_CACHE
os.environ["CHAINRULE_CHECK_CACHE_FILE"] = os.path.join(_TEST_CACHE, "chainrule", "checks.json")


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
