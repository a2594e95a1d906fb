"""The README's quick start runs against a real server and prints what its comments say."""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from chainrule.server import create_server

README = Path(__file__).resolve().parent.parent / "README.md"


def quick_start() -> str:
    text = README.read_text()
    section = text[text.index("## Quick start"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def address():
    server, port = create_server("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None).wait()


def test_the_quick_start_prints_what_it_promises(address):
    code = quick_start()
    assert "127.0.0.1:50051" in code
    expected = [line.split("#", 1)[1].split() for line in code.splitlines() if line.startswith("print(") and "#" in line]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code.replace("127.0.0.1:50051", address), str(README), "exec"), {})
    got = [line.split() for line in printed.getvalue().splitlines()]
    assert expected and got == expected
