"""buf checks the contract (proto/buf.yaml): `buf lint`, and `buf breaking`
against the newest release's proto kept in proto/releases/, as `make buf`
runs them; and both fail when they should.

buf comes from the npm registry (@bufbuild/buf, pinned in
tools/buf/package.json), installed with ``npm ci`` into tools/buf/node_modules
(gitignored) when it is missing or another version. Skipped only where node or
npm is not installed.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "buf"
BUF = TOOL / "node_modules" / ".bin" / "buf"
CONTRACT = Path("chainrule") / "v1" / "chainrule.proto"
NODE, NPM = shutil.which("node"), shutil.which("npm")

pytestmark = pytest.mark.skipif(
    NODE is None or NPM is None,
    reason="node and npm are not installed (Debian: apt-get install nodejs npm); buf comes from npm",
)


def pinned_version() -> str:
    return json.loads((TOOL / "package.json").read_text())["devDependencies"]["@bufbuild/buf"]


def installed_version() -> str | None:
    if not BUF.exists():
        return None
    done = subprocess.run([str(BUF), "--version"], capture_output=True, text=True, timeout=60)
    return done.stdout.strip() if done.returncode == 0 else None


@pytest.fixture(scope="session")
def buf() -> Path:
    """The pinned buf, installed by ``npm ci`` (as ``make buf`` does) unless it already is."""
    if installed_version() != pinned_version():
        # --ignore-scripts: @bufbuild/buf's install script only swaps its node shim for the binary.
        done = subprocess.run([NPM, "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=TOOL,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"npm ci failed in {TOOL}:\n{done.stdout}\n{done.stderr}"
    assert installed_version() == pinned_version()
    return BUF


def newest_release(proto_root: Path) -> Path:
    releases = [p for p in (proto_root / "releases").iterdir() if re.fullmatch(r"v\d+\.\d+\.\d+", p.name)]
    return max(releases, key=lambda p: tuple(int(n) for n in p.name[1:].split(".")))


def run(buf: Path, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(buf), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def lint(buf: Path, root: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return run(buf, "lint", "proto", cwd=root)


def breaking(buf: Path, root: Path = ROOT) -> subprocess.CompletedProcess[str]:
    against = newest_release(root / "proto").relative_to(root)
    return run(buf, "breaking", "proto", "--against", str(against), cwd=root)


@pytest.fixture
def copy(tmp_path) -> Path:
    """A copy of proto/ (its buf.yaml, third_party/ and releases/ included) to break."""
    shutil.copytree(ROOT / "proto", tmp_path / "proto", ignore=shutil.ignore_patterns("__pycache__", "*.py*"))
    return tmp_path


def edit(root: Path, old: str, new: str) -> None:
    path = root / "proto" / CONTRACT
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} should occur once in {CONTRACT}"
    path.write_text(text.replace(old, new))


def test_the_contract_passes_buf_lint(buf):
    done = lint(buf)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_contract_has_no_breaking_change_since_the_last_release(buf):
    done = breaking(buf)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_release_baseline_is_the_contract_as_released():
    baseline = newest_release(ROOT / "proto")
    assert (baseline / CONTRACT).is_file()
    # Everything it imports is in the snapshot too, so buf builds it on its own.
    for imported in re.findall(r'^import "([^"]+)";', (baseline / CONTRACT).read_text(), re.MULTILINE):
        assert imported.startswith("google/protobuf/") or (baseline / imported).is_file(), imported


@pytest.mark.parametrize("old, new, complaint", [
    # A field's number: every released client reads the bytes as another field.
    ("  bytes data = 3;", "  bytes data = 30;", 'field "3" with name "data" on message "Tensor" was deleted'),
    # An enum value's name: proto JSON ("dtype": "FLOAT32") carries it.
    ("  FLOAT32 = 2;", "  F32 = 2;", 'changed name from "FLOAT32" to "F32"'),
    # A field's type.
    ("  int32 node_count = 2;", "  int64 node_count = 2;", 'changed type from "int32" to "int64"'),
])
def test_buf_breaking_fails_on_an_incompatible_change(buf, copy, old, new, complaint):
    edit(copy, old, new)

    done = breaking(buf, copy)

    assert done.returncode != 0, f"buf breaking accepted {old.strip()!r} -> {new.strip()!r}"
    assert complaint in done.stdout, done.stdout + done.stderr


def test_buf_breaking_accepts_a_new_field(buf, copy):
    edit(copy, "  int32 node_count = 2;", "  int32 node_count = 2;\n  // Added.\n  string added = 99;")

    done = breaking(buf, copy)

    assert done.returncode == 0, done.stdout + done.stderr


def test_lint_exceptions_cover_the_released_file_only(buf, copy):
    # A new file gets every STANDARD rule: this enum's zero value and prefixes are refused.
    new = copy / "proto" / "chainrule" / "v2" / "extra.proto"
    new.parent.mkdir()
    new.write_text('syntax = "proto3";\n\npackage chainrule.v2;\n\n'
                   "// A mode.\nenum Mode {\n  // First.\n  ALL = 0;\n}\n")

    done = lint(buf, copy)

    assert done.returncode != 0
    assert "chainrule/v2/extra.proto" in done.stdout
    assert "chainrule/v1/chainrule.proto" not in done.stdout
