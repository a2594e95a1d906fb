"""The README's quick start runs against a real server and prints what its comments say."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from chainrule.client import Graph
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


# --- "From the shell": the commands as written, from a folder that holds .venv and examples/ -----------

ROOT = README.parent


def shell_commands() -> list[str]:
    text = README.read_text()
    section = text[text.index("## From the shell"):]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def ran(tmp_path_factory) -> dict[str, list[tuple[subprocess.CompletedProcess, Path]]]:
    """Each command of the section, run by the shell in a fresh folder beside links to the repository's
    .venv and examples/ (what "from the repository's folder" gives), without touching the repository."""
    results = {}
    for command in shell_commands():
        folder = tmp_path_factory.mktemp("shell")
        for name in (".venv", "examples"):
            (folder / name).symlink_to(ROOT / name)
        subcommand = command.split()[1]
        if subcommand == "render" and shutil.which("dot") is None:
            continue
        done = subprocess.run(["bash", "-c", command], cwd=folder, capture_output=True, text=True, timeout=120)
        results.setdefault(subcommand, [])
        results[subcommand].append((done, folder))
    return results


def test_the_shell_section_names_each_command_and_uses_the_venvs_chainrule():
    commands = shell_commands()
    assert {c.split()[1] for c in commands} == {"ops", "eval", "render", "train"}
    assert all(c.startswith(".venv/bin/chainrule ") for c in commands)
    assert all(("--local" in c) for c in commands if c.split()[1] != "ops")  # runnable without a server


def test_every_command_of_the_shell_section_succeeds_without_a_traceback(ran):
    for runs in ran.values():
        for done, _ in runs:
            assert done.returncode == 0 and "Traceback" not in done.stderr, (done.args, done.stderr)


def test_ops_shows_cross_entropys_input_dtypes(ran):
    (done, _), = ran["ops"]
    assert "logits, labels:int64|int32" in done.stdout


def test_eval_prints_what_the_readme_says_and_writes_json_and_npz(ran):
    (plain, _), (as_json, folder) = ran["eval"]
    assert "f = -12.0" in plain.stdout and "df/dx = -4.0" in plain.stdout
    document = json.loads(as_json.stdout)
    assert document["value"] == -12.0 and document["gradients"]["z"] == 3.0
    with np.load(folder / "grads.npz") as saved:
        assert float(saved["value"]) == -12.0 and float(saved["grad/q"]) == -4.0


def test_render_draws_the_circuit(ran):
    if "render" not in ran:
        pytest.skip("Graphviz's dot is not installed: render draws .svg with it")
    (done, folder), = ran["render"]
    assert (folder / "circuit.svg").read_text().lstrip().startswith(("<?xml", "<svg"))


def test_train_prints_the_losses_the_readme_quotes_and_fits_the_line(ran):
    (done, folder), = ran["train"]
    quoted = re.search(r"`(loss [\d.]+ -> [\d.]+ after \d+\s+steps)`", README.read_text()).group(1).split()
    printed = done.stdout.split()
    assert printed[:5:2] == quoted[:5:2] and printed[5] == quoted[5]  # "loss", "->", "after", the steps
    for got, said in ((printed[1], quoted[1]), (printed[3], quoted[3])):
        assert f"{float(got):.3g}" == said
    with np.load(folder / "trained.npz") as trained:
        assert abs(float(trained["w"]) - 3) < 0.05 and abs(float(trained["b"]) + 1) < 0.05


def test_the_example_graphs_are_what_make_graphs_writes():
    """examples/graphs/ matches its script: the JSON byte for byte, the data array for array."""
    spec = importlib.util.spec_from_file_location("make_graphs", ROOT / "examples/graphs/make_graphs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, graph in (("circuit.json", module.circuit()), ("fit.json", module.fit())):
        path = ROOT / "examples/graphs" / name
        assert path.read_text() == graph.to_json() + "\n"
        assert Graph.load(path).message == graph.message
    with np.load(ROOT / "examples/graphs/fit-data.npz") as saved:
        expected = module.fit_data()
        assert sorted(saved.files) == sorted(expected)
        assert all(np.array_equal(saved[k], v) for k, v in expected.items())


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("argv, env, port", [
    (["PORT=50052"], {}, "50052"),
    ([], {"CHAINRULE_PORT": "50053"}, "50053"),
    ([], {}, "50051"),
])
def test_make_run_honours_port_and_chainrule_port(argv, env, port):
    """`make run PORT=50052` and `CHAINRULE_PORT=50052 make run`, as the README says (dry run)."""
    clean = {k: v for k, v in os.environ.items() if k not in ("PORT", "CHAINRULE_PORT")}
    done = subprocess.run(["make", "-n", "run", *argv], cwd=ROOT, capture_output=True, text=True,
                          env={**clean, **env}, timeout=60)
    serve = [line for line in done.stdout.splitlines() if "chainrule serve" in line]
    assert done.returncode == 0 and serve == [f".venv/bin/chainrule serve --port {port}"]
    assert "make run PORT=50052" in README.read_text() and "CHAINRULE_PORT=50052 make run" in README.read_text()
