"""The example plugin package, installed for real: a fresh virtual environment,
``pip install`` of chainrule and examples/chainrule-acme from the local folders,
``chainrule serve`` from that environment as a subprocess, a graph through the
client, a name conflict with a second installed package, and uninstalling.

The slow tests share one environment and run in file order: the last one
uninstalls the packages. pip reaches an index only for chainrule's own
dependencies (its cache makes repeated runs quick).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from chainrule.client import Client, FailedPrecondition, GraphBuilder

ROOT = Path(__file__).resolve().parents[1]
ACME = ROOT / "examples" / "chainrule-acme"
CLASH = ROOT / "examples" / "chainrule-acme-clash"
#: What a chainrule build needs from the checkout (copied, so the build leaves no files in it).
CHAINRULE_SOURCES = ("pyproject.toml", "README.md", "core", "plugins", "server", "client", "proto")
IGNORE = shutil.ignore_patterns("__pycache__", "build", "*.egg-info")


class Venv:
    """A fresh virtual environment (no system site-packages) and a scratch folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bin = root / "venv" / "bin"
        #: Where commands run: an empty folder, so no source folder shadows the installed packages.
        self.cwd = root / "work"
        self.cwd.mkdir()

    def env(self, **extra: str) -> dict[str, str]:
        """os.environ without anything that would leak the test's own chainrule or plugin choice."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHAINRULE_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        # the operator-check cache of this environment's servers: its own, not the user's
        env["CHAINRULE_CHECK_CACHE_FILE"] = str(self.cwd / "checks.json")
        return {**env, **extra}

    def run(self, *args: str, timeout: float = 120, **extra_env: str) -> subprocess.CompletedProcess:
        program = str(self.bin / args[0])
        return subprocess.run([program, *args[1:]], capture_output=True, text=True, timeout=timeout,
                              cwd=self.cwd, env=self.env(**extra_env))

    def pip(self, *args: str) -> None:
        done = self.run("python", "-m", "pip", "--disable-pip-version-check", "-q", *args, timeout=600)
        assert done.returncode == 0, f"pip {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"

    @contextmanager
    def serving(self, *flags: str, **extra_env: str) -> Iterator[str]:
        """``chainrule serve`` on a free loopback port; yields the address it reports."""
        out, err = self.root / "serve.out", self.root / "serve.err"
        with out.open("w") as stdout, err.open("w") as stderr:
            proc = subprocess.Popen(
                [str(self.bin / "chainrule"), "serve", "--host", "127.0.0.1", "--port", "0", "--grace-seconds", "1", *flags],
                stdout=stdout, stderr=stderr, cwd=self.cwd, env=self.env(**extra_env),
            )
        try:
            deadline = time.monotonic() + 60
            while (match := re.search(r"chainrule listening on [\d.]+:(\d+)", out.read_text())) is None:
                assert proc.poll() is None, f"chainrule serve exited with {proc.returncode}:\n{err.read_text()}"
                assert time.monotonic() < deadline, f"chainrule serve did not report its port:\n{err.read_text()}"
                time.sleep(0.05)
            yield f"127.0.0.1:{match[1]}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Iterator[Venv]:
    root = tmp_path_factory.mktemp("fresh")
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True, timeout=120)
    env = Venv(root)
    src = root / "src"
    (src / "chainrule").mkdir(parents=True)
    for name in CHAINRULE_SOURCES:
        source, target = ROOT / name, src / "chainrule" / name
        if source.is_dir():
            shutil.copytree(source, target, ignore=IGNORE)
        else:
            shutil.copy2(source, target)
    for folder in (ACME, CLASH):
        shutil.copytree(folder, src / folder.name, ignore=IGNORE)
    # chainrule's build backend (setuptools>=77) once, then builds without isolation: quicker, same result
    env.pip("install", "setuptools>=77")
    env.pip("install", "--no-build-isolation", *(str(src / name) for name in ("chainrule", ACME.name, CLASH.name)))
    yield env
    shutil.rmtree(root, ignore_errors=True)        # about 100 MB


@pytest.mark.slow
def test_the_fresh_environment_runs_its_own_installed_copy(venv):
    done = venv.run("python", "-c", "import chainrule.core, chainrule_acme; print(chainrule.core.__file__); "
                                    "print(chainrule_acme.__file__)")
    assert done.returncode == 0, done.stderr
    for path in done.stdout.split():
        assert Path(path).is_relative_to(venv.root / "venv"), path


@pytest.mark.slow
def test_a_plugin_using_another_plugins_prefix_stops_the_server_naming_it(venv):
    done = venv.run("chainrule", "serve", "--host", "127.0.0.1", "--port", "0", timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert ("plugin 'clash' (distribution chainrule-acme-clash 0.1.0) was not loaded: operator 'acme.swish' does not "
            "start with the plugin's prefix 'clash.'") in done.stderr
    assert "CHAINRULE_DISABLE_PLUGINS=clash" in done.stderr and "acme" not in done.stderr.replace("acme.swish", "").replace("acme-clash", "")


@pytest.mark.slow
def test_serve_finds_acme_and_evaluates_a_graph_with_it(venv):
    # leaving the broken plugin out by name lets the server start; serve honours the environment
    with venv.serving("--prefer", "acme", "--check-operators", CHAINRULE_DISABLE_PLUGINS="builtin.nn,clash") as address:
        with Client(address, timeout=30) as client:
            listed = {op.name: op for op in client.operators()}
            g = GraphBuilder(metadata={"requires": "chainrule-acme>=0.2, op:acme.swish"})
            x = g.input("x", (3,))
            f = g.op("acme.swish", x, beta=1.5, name="h").sum(name="f")
            xs = np.array([-1.0, 0.5, 2.0])
            result = client.evaluate(f, x=xs)
            pinned = GraphBuilder(metadata={"requires": "acme>=1.0"})
            y = pinned.input("y")
            with pytest.raises(FailedPrecondition) as info:
                client.evaluate(pinned.op("acme.gelu", y), y=1.0)
    swish = listed["acme.swish"]
    assert (swish.plugin, swish.distribution, swish.version, swish.check) == ("acme", "chainrule-acme", "0.2.0", "passed")
    assert swish.attrs["beta"].default == 1.0 and listed["acme.huber"].arity == 2
    assert listed["add"].distribution == "chainrule" and "softmax" not in listed
    s = 1 / (1 + np.exp(-1.5 * xs))
    np.testing.assert_allclose(result.value, np.sum(xs * s))
    np.testing.assert_allclose(result.grad[x], s + 1.5 * xs * s * (1 - s))
    assert info.value.reason == "VERSION_MISMATCH"
    assert "graph requires 'acme>=1.0' but chainrule-acme 0.2.0 is installed" in info.value.message


@pytest.mark.slow
def test_plugins_and_check_commands_in_the_installed_environment(venv):
    done = venv.run("chainrule", "plugins", "--json", CHAINRULE_PREFER="acme")
    assert done.returncode == 1, done.stderr   # the broken clash plugin is listed, with the reason
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    assert rows["acme"] == {"name": "acme", "distribution": "chainrule-acme", "version": "0.2.0", "builtin": False,
                            "operators": ["acme.swish", "acme.gelu", "acme.huber"], "broken": False, "problem": None}
    assert rows["clash"]["distribution"] == "chainrule-acme-clash" and rows["clash"]["operators"] == []
    assert rows["clash"]["broken"] and "prefix your operator names with 'clash.'" in rows["clash"]["problem"]
    done = venv.run("chainrule", "check", "--plugin", "acme", "--prefer", "acme")
    assert done.returncode == 0, done.stdout + done.stderr   # the broken clash plugin is only warned about
    assert done.stderr.startswith("chainrule: warning: plugin 'clash'")
    # columns: shapes tried, attributes tried (delta drawn by the sample), errors, result
    assert re.search(r"^acme\.huber\s+acme\s+\[3,4\],\[4\]\s+delta=\S+\s+\S+\s+\S+\s+passed$", done.stdout, re.M), done.stdout
    assert "3 operators: 3 passed, 0 failed" in done.stdout


@pytest.mark.slow
def test_uninstalling_the_package_removes_its_operators(venv):
    venv.pip("uninstall", "-y", "chainrule-acme-clash", "chainrule-acme")
    done = venv.run("chainrule", "ops", "--json")
    assert done.returncode == 0, done.stderr
    names = {row["name"] for row in json.loads(done.stdout)}
    assert "add" in names and not any(name.startswith("acme.") for name in names)
    done = venv.run("chainrule", "plugins", "--json")
    from chainrule.plugins.manager import BUILTIN_FAMILIES

    assert {row["name"] for row in json.loads(done.stdout)} == {f"builtin.{family}" for family in BUILTIN_FAMILIES}


def test_the_example_package_own_tests_pass():
    """examples/chainrule-acme/tests, run as its author would (chainrule installed, the package on the path)."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=ACME, capture_output=True, text=True,
        timeout=120, env={**os.environ, "PYTHONPATH": str(ACME)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"\b1[0-9] passed\b", done.stdout), done.stdout
