"""The command line as a first-class client (issue 16, item 6): one meaning per flag name across
commands, `serve --help` describing and grouping every setting, and tqdm as the progress bar."""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from chainrule.server.cli import build_parser, main
from chainrule.server.config import SETTINGS_HELP, ServerConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "graphs"
CLIENT_COMMANDS = ("eval", "render", "train", "ops", "plugins", "check")


def subparsers() -> dict[str, argparse.ArgumentParser]:
    _, commands = build_parser()
    return dict(commands.choices)


def test_each_flag_name_means_one_thing_in_every_client_command():
    """The same option string always sets the same setting (its dest), and a short flag always
    stands for the same long one: -o is --out (the file a command writes) in eval, render and
    train; --output is the output node to differentiate wherever it exists."""
    dests: dict[str, set[str]] = {}
    longs: dict[str, set[str]] = {}
    for name in CLIENT_COMMANDS:
        for action in subparsers()[name]._actions:
            for flag in action.option_strings:
                dests.setdefault(flag, set()).add(action.dest)
            shorts = [f for f in action.option_strings if not f.startswith("--")]
            for short in shorts:
                longs.setdefault(short, set()).update(f for f in action.option_strings if f.startswith("--"))
    assert {flag: d for flag, d in dests.items() if len(d) > 1} == {}
    assert {short: sorted(f) for short, f in longs.items() if len(f) > 1} == {}
    assert longs["-o"] == {"--out"} and dests["--output"] == {"output"}
    outs = {name for name in CLIENT_COMMANDS if "--out" in subparsers()[name]._option_string_actions}
    assert outs == {"eval", "render", "train"}


def test_train_writes_its_parameters_with_out_and_points_output_users_to_it(tmp_path, capsys):
    trained = tmp_path / "trained.npz"
    argv = ["train", str(EXAMPLES / "fit.json"), "--data", str(EXAMPLES / "fit-data.npz"), "-p", "w,b",
            "--steps", "5", "--no-progress", "--local"]
    assert main([*argv, "--out", str(trained)]) == 0
    with np.load(trained) as saved:
        assert sorted(saved.files) == ["b", "w"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main([*argv, "--output", str(trained)])
    assert info.value.code == 2
    assert "did you mean --out?" in capsys.readouterr().err


def test_every_serve_flag_is_described_and_grouped_with_a_pointer_to_the_deploy_guide(capsys):
    assert set(SETTINGS_HELP) == {f.name for f in fields(ServerConfig)}
    serve = subparsers()["serve"]
    groups = {group.title: group for group in serve._action_groups}
    assert {"listening and processes", "limits (per request unless said)", "plugins and gradient checks",
            "transport security and authentication", "operations"} <= set(groups)
    for action in serve._actions:
        if action.dest == "help":
            continue
        description = action.help.split("(env ", 1)[0].strip()
        assert len(description) > 15, f"{action.option_strings[0]} has no description: {action.help!r}"
        assert f"CHAINRULE_{action.dest.upper()}" in action.help
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    shown = capsys.readouterr().out
    assert "docs/deploy.md" in shown and "transport security and authentication:" in shown
    assert "--tls-client-ca PATH" in shown and "--port PORT" in shown


def test_tqdm_is_a_dependency_and_draws_the_training_bar(tmp_path, capsys):
    """No hand-written fallback: tqdm is installed with chainrule and draws `train --progress`."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(dep.replace(" ", "").startswith("tqdm") for dep in project["dependencies"])
    argv = ["train", str(EXAMPLES / "fit.json"), "--data", str(EXAMPLES / "fit-data.npz"), "-p", "w,b",
            "--steps", "20", "--progress", "--local", "-o", str(tmp_path / "t.npz")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "20/20 [" in err and "step/s" in err and "loss=" in err  # tqdm's format, with the loss postfix


def test_a_non_scalar_output_without_a_seed_names_the_seed_flag(tmp_path, capsys):
    from chainrule.client import GraphBuilder

    g = GraphBuilder()
    x = g.input("x", (3,))
    (x * x).named("sq").graph.save(tmp_path / "vec.json")
    for seed in ([], ["--seed", "1"]):
        capsys.readouterr()
        assert main(["eval", str(tmp_path / "vec.json"), "-i", "x=[1, 2, 3]", "--local", *seed]) == 1
        err = capsys.readouterr().err
        assert err.startswith("chainrule: error: ") and "--seed VALUE" in err and len(err.splitlines()) == 1
    assert main(["eval", str(tmp_path / "vec.json"), "-i", "x=[1, 2, 3]", "--local", "--seed", "[1, 0, 0]"]) == 0


def test_no_server_names_the_command_lines_ways_out(capsys):
    assert main(["eval", str(EXAMPLES / "circuit.json"), "-i", "x=1", "-i", "y=1", "-i", "z=1",
                 "--server", "127.0.0.1:1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("chainrule: error: cannot reach a chainrule server at 127.0.0.1:1")
    assert "--local" in err and "LocalClient" not in err and len(err.splitlines()) == 1
