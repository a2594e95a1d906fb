"""docs/writing-plugins.md runs as written, so it cannot rot.

How the guide's fenced blocks are read:

* a ``toml`` or ``python`` block whose first line is ``# path/file.py`` (or ``.toml``)
  is a file of the example package, written to a scratch folder; the package is
  then "installed" the way ``pip install -e .`` would, by a ``.dist-info`` built
  from the guide's own pyproject.toml (name, version, entry points);
* every other ``python`` block runs, in order, in one namespace (the guide reads
  as one session); the server address ``127.0.0.1:50051`` becomes the test
  server's;
* in a ``sh`` block, ``chainrule ...`` commands run (``serve`` as a subprocess on a
  free port, the others in-process), ``pytest`` runs the guide's tests, and the
  set-up commands (mkdir, cd, python -m venv, pip) are skipped: installing is
  test_plugin_package.py's job;
* a ``text`` block right after a code block is that block's output: compared
  exactly for Python, with numbers masked for commands (timings, last digits);
* the ``text`` blocks of section 6 are failure messages, each produced here for
  real, in order;
* section 7 (operators from JAX) runs when JAX is installed (the jax extra, which
  ``make test`` installs), and always in CI.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import logging
import os
import re
import shlex
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from chainrule.client import ChainruleRpcError, GraphBuilder
from chainrule.server import LocalClient
from chainrule.core import Attr, OpDef
from chainrule.core.errors import PluginError
from chainrule.plugins import OperatorSet, float_like_input, hookimpl, same_as_input
from chainrule.plugins.checking import check_and_refuse, check_op
from chainrule.plugins.jax_bridge import jax_available
from chainrule.plugins.manager import load_plugins
from chainrule.server.cli import main

from test_check import Site

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "writing-plugins.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\s*$", re.M | re.S)
FILE = re.compile(r"^# (\S+\.(?:py|toml))\n")
SKIPPED = {"mkdir", "cd", "python", "pip", "."}
DOC_ADDRESS = "127.0.0.1:50051"


@dataclasses.dataclass
class Block:
    lang: str
    body: str
    section: int
    #: True when only blank space separates it from the previous block (then it is that block's output).
    follows: bool


def read_blocks() -> list[Block]:
    text = GUIDE.read_text()
    blocks, end = [], 0
    for match in FENCE.finditer(text):
        before = text[:match.start()]
        sections = re.findall(r"^## (\d+)\.", before, re.M)
        blocks.append(Block(match[1], match[2], int(sections[-1]) if sections else 0,
                            bool(blocks) and not text[end:match.start()].strip()))
        end = match.end()
    return blocks


def masked(text: str) -> list[str]:
    """Lines with numbers replaced and spaces collapsed: the shape of a command's output."""
    lines = (re.sub(r"\s+", " ", re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "#", line)).strip() for line in text.splitlines())
    return [line for line in lines if line]


def exact(text: str) -> list[str]:
    return [line.rstrip() for line in text.strip().splitlines()]


@pytest.fixture
def package(tmp_path, monkeypatch):
    """The guide's package, written out and registered as installed distribution chainrule-mine."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: the same parser, from the test extra
        import tomli as tomllib
    root = tmp_path / "chainrule-mine"
    for block in read_blocks():
        if (match := FILE.match(block.body)) is not None:
            path = root / match[1]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(block.body)
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    info = root / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    points = project["entry-points"]["chainrule"]
    (info / "entry_points.txt").write_text("[chainrule]\n" + "".join(f"{k} = {v}\n" for k, v in points.items()))
    for name in ("CHAINRULE_PLUGINS", "CHAINRULE_DISABLE_PLUGINS", "CHAINRULE_PREFER"):
        monkeypatch.delenv(name, raising=False)
    yield root
    for name in [m for m in sys.modules if m == "chainrule_mine" or m.startswith("chainrule_mine.")]:
        del sys.modules[name]


class Session:
    """Runs the guide's commands and code in order; owns the server it starts."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.monkeypatch = monkeypatch
        self.namespace: dict = {"__name__": "guide"}
        self.address: str | None = None
        self.server: subprocess.Popen | None = None
        self.ran: list[str] = []
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("CHAINRULE_")}, "PYTHONPATH": str(root)}

    def python(self, code: str) -> str:
        if DOC_ADDRESS in code:
            assert self.address is not None, "the guide uses the server before `chainrule serve`"
            code = code.replace(DOC_ADDRESS, self.address)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, str(GUIDE), "exec"), self.namespace)
        self.ran.append("python")
        return out.getvalue()

    def sh(self, script: str) -> str:
        output = []
        for line in script.splitlines():
            for command in " ".join(shlex.split(line, comments=True)).split(" && "):
                output.append(self.command(shlex.split(command)))
        return "".join(output)

    def command(self, words: list[str]) -> str:
        env = {}
        while words and re.match(r"^[A-Z_]+=", words[0]):
            key, _, value = words.pop(0).partition("=")
            env[key] = value
        if not words or words[0] in SKIPPED:
            return ""
        self.ran.append(" ".join(words[:2]))
        if words[:2] == ["chainrule", "serve"]:
            self.serve(words[2:], env)
            return ""
        if words[0] == "pytest":
            done = subprocess.run([sys.executable, "-m", "pytest", *words[1:], "-p", "no:cacheprovider"], cwd=self.root,
                                  env={**self.env, **env}, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stdout + done.stderr
            return done.stdout
        assert words[0] == "chainrule", f"the guide runs {words[0]!r}; teach this test what it means"
        with self.monkeypatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(words[1:])
        assert code == 0, f"{' '.join(words)} exited with {code}: {err.getvalue()}"
        return out.getvalue()

    def serve(self, flags: list[str], env: dict[str, str]) -> None:
        log = self.root / "serve.log"
        with log.open("w") as sink:
            self.server = subprocess.Popen(
                [sys.executable, "-m", "chainrule.server.cli", "serve", *flags, "--host", "127.0.0.1", "--port", "0",
                 "--grace-seconds", "1"], stdout=sink, stderr=subprocess.STDOUT, cwd=self.root, env={**self.env, **env},
            )
        deadline = time.monotonic() + 60
        while (match := re.search(r"chainrule listening on [\d.]+:(\d+)", log.read_text())) is None:
            assert self.server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        self.address = f"127.0.0.1:{match[1]}"

    def stop(self) -> None:
        if self.server is not None:
            self.server.terminate()
            try:
                self.server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()


def test_the_guide_runs_from_an_empty_folder_to_a_served_operator(package, monkeypatch):
    monkeypatch.syspath_prepend(str(package))
    monkeypatch.chdir(package)
    session = Session(package, monkeypatch)
    blocks = [b for b in read_blocks() if b.section != 6 and not FILE.match(b.body)]
    if not jax_available() and not os.environ.get("CI"):  # section 7 needs the jax extra (CI installs it)
        blocks = [b for b in blocks if b.section != 7]
    try:
        for i, block in enumerate(blocks):
            if block.lang not in ("python", "sh"):
                continue
            produced = session.python(block.body) if block.lang == "python" else session.sh(block.body)
            shown = blocks[i + 1] if i + 1 < len(blocks) and blocks[i + 1].lang == "text" and blocks[i + 1].follows else None
            if shown is None:
                continue
            if block.lang == "python":
                assert exact(produced) == exact(shown.body), f"python block {i} printed:\n{produced}"
            else:
                assert masked(produced) == masked(shown.body), f"commands printed:\n{produced}"
    finally:
        session.stop()
    for step in ("chainrule plugins", "chainrule check", "pytest -q", "chainrule serve"):
        assert step in session.ran, f"the guide no longer runs {step!r}"
    assert session.ran.count("python") >= 4


# --- section 6: each message shown is the one chainrule gives ---------------------------------------------

def _plugin(hook) -> types.SimpleNamespace:
    return types.SimpleNamespace(register_operators=hook)


def _load_error(**options) -> str:
    with pytest.raises(PluginError) as info:
        load_plugins(**options).raise_for_problems()
    return "\n".join(f"chainrule: error: {line}" for line in info.value.lines)


def _rpc_error(loaded, op: str, shape: tuple[int, ...], value: np.ndarray, **attrs) -> str:
    g = GraphBuilder()
    x = g.input("x", shape)
    f = g.op(op, x, name="h", **attrs).sum(name="f")
    with pytest.raises(ChainruleRpcError) as info:
        LocalClient(loaded).evaluate(f, x=value)
    return str(info.value)


SAMPLE_AS_KEYWORD = """\
import numpy as np
from chainrule.plugins import OperatorSet

ops = OperatorSet()


def _sample(rng):
    return [rng.uniform(-3, 3, size=(2, 5))], {"limit": 1.5}


@ops.operator("mine.softclip", limit=1.0, sample=_sample)
def softclip(x, *, limit):
    return limit * np.tanh(x / limit)
"""


def produce_messages(mine: types.ModuleType, site: Site) -> list[str]:
    installed = ("mine", mine, "chainrule-mine", "0.1.0")
    registry = load_plugins(entry_points=False, only=["mine"], extra=[installed]).registry
    softclip, mish = registry["mine.softclip"], registry["mine.mish"]
    messages = []

    flipped = dataclasses.replace(softclip, vjp=lambda g, out, x, *, limit: (-g * (1 - (out / limit) ** 2),))
    messages.append("FAILED " + check_op(flipped).message)
    total = dataclasses.replace(mish, name="mine.total", forward=np.sum, vjp=lambda g, out, x: (g * np.ones_like(x),),
                                infer=same_as_input)
    messages.append("FAILED " + check_op(total).message)
    widened = dataclasses.replace(mish, forward=lambda x: mish.forward(x) * np.float64(1.0))
    messages.append("FAILED " + check_op(widened).message)

    other = OperatorSet()

    @other.operator("mine.mish", infer=float_like_input)
    def _(x):
        return x

    @_.vjp
    def _(g, out, x):
        return (g,)

    messages.append(_load_error(entry_points=False, only=["mine"],
                                extra=[installed, ("mine.extra", _plugin(other.hookimpl()), "chainrule-mine-extra", "1.0.0")]))
    messages.append(_load_error(entry_points=False, only=["mine", "other"],
                                extra=[installed, ("other", _plugin(other.hookimpl()), "chainrule-other", "1.0.0")]))
    bare = OperatorSet()

    @bare.operator("mish", infer=float_like_input)
    def _(x):
        return x

    @_.vjp
    def _(g, out, x):
        return (g,)

    messages.append(_load_error(entry_points=False, only=["mine"], extra=[("mine", _plugin(bare.hookimpl()), "chainrule-mine", "0.1.0")]))
    no_keyword = OperatorSet()

    @no_keyword.operator("mine.softclip", limit=1.0)
    def _(x):
        return np.tanh(x)

    @_.vjp
    def _(g, out, x, *, limit):
        return (g * (1 - out ** 2),)

    messages.append(_load_error(entry_points=False, only=["mine"], extra=[("mine", _plugin(no_keyword.hookimpl()), "chainrule-mine", "0.1.0")]))
    bare_array = OperatorSet()

    @bare_array.operator("mine.softclip", limit=1.0)
    def clip(x, *, limit):
        return limit * np.tanh(x / limit)

    @clip.vjp
    def _(g, out, x, *, limit):
        return g * (1 - (out / limit) ** 2)

    @clip.sample
    def _(rng):
        return [rng.uniform(-3, 3, size=(2, 5))], {"limit": 1.5}

    messages.append(_load_error(entry_points=False, only=["mine"], extra=[("mine", _plugin(bare_array.hookimpl()), "chainrule-mine", "0.1.0")]))
    messages.append(_load_error(entry_points=False, only=["mine"], extra=[("mine", types.SimpleNamespace(), "chainrule-mine", "0.1.0")]))

    @hookimpl
    def register_operator(register):
        pass

    misspelt = types.SimpleNamespace(register_operator=register_operator)
    messages.append(_load_error(entry_points=False, only=["mine"], extra=[("mine", misspelt, "chainrule-mine", "0.1.0")]))
    messages.append(_load_error(entry_points=False, only=["builtin", "mien"], extra=[installed]))

    @hookimpl
    def loads_weights(register):
        np.load("weights.npy")

    messages.append(_load_error(entry_points=False, extra=[("mine", _plugin(loads_weights), "chainrule-mine", "0.1.0")]))

    site.install("chainrule-mine", "0.1.0", "mine", "import mylab_sdk\n")
    messages.append(_load_error(only=["mine"]))
    # the same installed module, now passing the sample rule as a keyword
    (site.root / f"{site.modules[-1]}.py").write_text(SAMPLE_AS_KEYWORD)
    importlib.invalidate_caches()
    messages.append(_load_error(only=["mine"]))

    @hookimpl
    def odd_schema(register):
        register(OpDef("mine.softclip", 1, np.tanh, lambda g, out, x, *, limit: (g,), attrs={"limit": Attr("double", 1.0)}))

    messages.append(_load_error(entry_points=False, only=["mine"], extra=[("mine", _plugin(odd_schema))]))
    forgot = OperatorSet()
    forgot.operator("mine.mish", infer=float_like_input)(lambda x: x)
    messages.append(_load_error(entry_points=False, only=["mine"], extra=[("mine", _plugin(forgot.hookimpl()))]))

    messages.append(_rpc_error(load_plugins(entry_points=False, only=["builtin"]), "mine.mish", (3,), np.zeros(3)))

    @hookimpl
    def flipped_hook(register):
        register(flipped)

    refused, _ = check_and_refuse(load_plugins(entry_points=False, only=["builtin", "mine"],
                                               extra=[("mine", _plugin(flipped_hook), "chainrule-mine", "0.1.0")]),
                                  logging.getLogger("guide"), builtins=False)
    pinned = GraphBuilder(metadata={"requires": "op:mine.softclip"})
    z = pinned.input("z", (3,))
    with pytest.raises(ChainruleRpcError) as info:
        LocalClient(refused).evaluate(pinned.op("neg", z).sum(), z=np.zeros(3))
    messages.append(str(info.value))
    with_mine = load_plugins(entry_points=False, only=["builtin", "mine"], extra=[installed])
    messages.append(_rpc_error(with_mine, "mine.softclip", (3,), np.zeros(3), limit=0.0))

    @hookimpl
    def cholesky(register):
        register(dataclasses.replace(mish, forward=np.linalg.cholesky))

    breaks = load_plugins(entry_points=False, only=["builtin", "mine"],
                          extra=[("mine", _plugin(cholesky), "chainrule-mine", "0.1.0")])
    messages.append(_rpc_error(breaks, "mine.mish", (2, 2), -np.eye(2)))
    return messages


def test_the_failure_messages_in_the_guide_are_the_ones_chainrule_gives(package, tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("chainrule_mine_for_messages", package / "chainrule_mine" / "__init__.py")
    mine = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mine)
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    site = Site(site_dir, monkeypatch)
    monkeypatch.chdir(tmp_path)            # where there is no weights.npy
    try:
        produced = produce_messages(mine, site)
    finally:
        for module in site.modules:
            sys.modules.pop(module, None)
    shown = [b.body.strip() for b in read_blocks() if b.section == 6 and b.lang == "text"]
    assert produced == shown

