"""examples/node: the Node.js client, written from the .proto alone, against a real server.

It evaluates the staged circuit (ARCHITECTURE section 7, example 4) and must
print the reference numbers bit for bit, then decode a rich error (ErrorInfo
and BadRequest from the ``grpc-status-details-bin`` trailer). Its packages come
from the npm registry with ``npm ci`` into examples/node/node_modules
(gitignored); a stamp there holding the lock file's hash skips the install on
later runs. Skipped only where node or npm is not installed.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from chainrule.client import Client

from test_client_local import staged

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "node"
NODE, NPM = shutil.which("node"), shutil.which("npm")

pytestmark = pytest.mark.skipif(
    NODE is None or NPM is None,
    reason="node and npm are not installed (Debian: apt-get install nodejs npm); examples/node needs them",
)

#: ARCHITECTURE section 7, example 4, at x=3, y=-4.
REFERENCE_VALUES = {"f": 1.5456448841066441, "sigy": 0.01798620996209156, "num": 3.0179862099620918,
                    "sigx": 0.9525741268224334, "den": 1.9525741268224333, "invden": 0.5121444488396316}
REFERENCE_GRADS = {"x": 2.0595697955721652, "y": 1.5922327514838093, "num": 0.5121444488396316,
                   "invden": 3.0179862099620918, "den": -0.7915934472725935, "xpy": 1.583186894545187}


def bits(number: float) -> bytes:
    return struct.pack("<d", number)


@pytest.fixture(scope="module")
def installed():
    """examples/node with its node_modules, installed by ``npm ci`` unless the stamp says they are current."""
    lock = (EXAMPLE / "package-lock.json").read_bytes()
    stamp = EXAMPLE / "node_modules" / ".chainrule-lock-sha256"
    digest = hashlib.sha256(lock).hexdigest()
    if not stamp.exists() or stamp.read_text() != digest:
        # --ignore-scripts: no dependency needs an install script (grpc-js is pure JavaScript).
        done = subprocess.run([NPM, "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=EXAMPLE,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"npm ci failed in {EXAMPLE}:\n{done.stdout}\n{done.stderr}"
        stamp.write_text(digest)
    return EXAMPLE


def run_client(address: str, *args: str) -> str:
    done = subprocess.run([NODE, "client.js", *args, address], cwd=EXAMPLE, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"node client.js failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def report(installed, address):
    return json.loads(run_client(address, "--json"))


def test_the_staged_circuit_matches_the_reference_bit_for_bit(report):
    result = report["evaluate"]
    assert result["output"] == "f"
    assert bits(result["value"]) == bits(REFERENCE_VALUES["f"])
    for name, expected in REFERENCE_VALUES.items():
        assert bits(result["values"][name]) == bits(expected), name
    for name, expected in REFERENCE_GRADS.items():
        assert bits(result["gradients"][name]) == bits(expected), name


def test_every_value_and_gradient_equals_the_python_clients(report, address):
    """The Node client's numbers (every node of its graph) are the Python client's, bit for bit.

    Its graph names the two literals "two" and "one" where the builder says const_3 and const_6.
    """
    with Client(address, timeout=60) as client:
        mine = client.evaluate(staged(), x=3.0, y=-4.0, values="all")
    rename = {"two": "const_3", "one": "const_6"}
    result = report["evaluate"]
    assert {rename.get(k, k) for k in result["values"]} == set(mine.values)
    assert {rename.get(k, k) for k in result["gradients"]} == set(mine.grad)
    for name, value in result["values"].items():
        assert bits(value) == mine.values[rename.get(name, name)].tobytes(), name
    for name, grad in result["gradients"].items():
        assert bits(grad) == mine.grad[rename.get(name, name)].tobytes(), name


def test_the_rich_error_is_decoded_from_the_details_trailer(report):
    error = report["error"]
    assert (error["code"], error["code_name"]) == (3, "INVALID_ARGUMENT")
    assert "sigmod" in error["message"]
    info = error["error_info"]
    assert info["reason"] == "UNKNOWN_OPERATOR" and info["domain"] == "chainrule.dev"
    assert info["metadata"]["node"] == "sigy" and info["metadata"]["op"] == "sigmod"
    assert info["metadata"]["field"] == "graph.nodes[0].op" and info["metadata"]["request_id"]
    assert [v["field"] for v in error["field_violations"]] == ["graph.nodes[0].op"]


def test_the_text_output(installed, address):
    lines = run_client(address).splitlines()
    assert "output f = 1.5456448841066441" in lines
    assert "gradient df/dx = 2.0595697955721652" in lines and "value sigy = 0.01798620996209156" in lines
    assert "  reason UNKNOWN_OPERATOR (domain chainrule.dev)" in lines
    assert any(line.startswith("  field graph.nodes[0].op: ") for line in lines)


def test_nothing_generated_is_committed():
    """The example loads the .proto at run time: no generated stubs beside it, node_modules ignored."""
    tracked = subprocess.run(["git", "ls-files", "examples/node"], cwd=EXAMPLE.parent.parent,
                             capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    files = set(tracked.stdout.split())
    assert not any("node_modules" in f or f.endswith(("_pb.js", "_grpc_pb.js", ".d.ts")) for f in files), files
    ignored = subprocess.run(["git", "check-ignore", "-q", "examples/node/node_modules/x"], cwd=EXAMPLE.parent.parent)
    assert ignored.returncode == 0


def test_the_quick_start_shows_what_the_client_prints(installed, address):
    """docs/quickstart-other-languages.md's Node.js output: each line shown (but "..." and the request id) is printed, in order."""
    page = (EXAMPLE.parent.parent / "docs" / "quickstart-other-languages.md").read_text()
    section = page[page.index("## Node.js"):]
    command, shown = re.search(r"```sh\n(.*?)```\s*```text\n(.*?)```", section, re.S).groups()
    assert command.split() == ["cd", "examples/node", "npm", "ci", "node", "client.js", "127.0.0.1:50051"]
    printed = run_client(address).splitlines()
    expected = [line for line in shown.splitlines() if line != "..." and "request_id" not in line]
    positions = [printed.index(line) for line in expected]
    assert positions == sorted(positions)
    assert any(line.startswith("  metadata request_id = ") for line in printed)
