"""The `chainrule` command as a client: connection flags (token, TLS, mutual TLS) on eval, render,
train and ops --server; eval's --seed, --json and -o; --version; one-line errors and exit codes.

Every test runs main() in-process against a real server on a loopback port; the broken-pipe tests
run the installed console script.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from chainrule.client import GraphBuilder
from chainrule.server import ServerConfig
from chainrule.server.cli import main
from helpers import start_server
from test_auth import TOKENS, make_ca, make_leaf

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def usage_error(capsys, *argv: str) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    assert info.value.code == 2
    return capsys.readouterr().err


def one_line_error(err: str) -> str:
    assert err.startswith("chainrule: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def address():
    server, address = start_server(ServerConfig(log_level="WARNING"))
    yield address
    server.stop(None).wait()


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate, a token file."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_leaf(d, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    make_leaf(d, "client", "ca", "extendedKeyUsage=clientAuth\n")
    (d / "tokens.txt").write_text(f"{TOKENS[0]}\n")
    (d / "token").write_text(f"{TOKENS[0]}\n")
    (d / "wrong-token").write_text("not-the-token\n")
    return d


@pytest.fixture(scope="module")
def secure(pki):
    """A server with TLS, mutual TLS and a bearer token, and the flags that reach it."""
    server, address = start_server(ServerConfig(
        log_level="WARNING", tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"),
        tls_client_ca=str(pki / "ca.pem"), token_file=str(pki / "tokens.txt")))
    flags = ["--server", address, "--tls-ca", pki / "ca.pem", "--tls-cert", pki / "client.pem",
             "--tls-key", pki / "client.key", "--token-file", pki / "token"]
    yield address, [str(f) for f in flags]
    server.stop(None).wait()


@pytest.fixture
def square(tmp_path) -> Path:
    """f = x * x, saved as a graph file."""
    g = GraphBuilder()
    x = g.input("x")
    path = tmp_path / "square.json"
    (x * x).named("f").graph.save(path)
    return path


@pytest.fixture
def doubled(tmp_path) -> Path:
    """y = 2 * v for a vector v of 3: a non-scalar output."""
    g = GraphBuilder()
    v = g.input("v", shape=(3,))
    path = tmp_path / "doubled.json"
    (v * 2.0).named("y").graph.save(path)
    return path


# --- connection flags ---------------------------------------------------------------------------

@needs_openssl
def test_eval_with_token_and_mutual_tls(secure, square, capsys):
    _, flags = secure
    code, out, _ = run(capsys, "eval", square, "-i", "x=3", *flags)
    assert code == 0 and "f = 9.0" in out and "df/dx = 6.0" in out


@needs_openssl
def test_tls_server_name_is_checked(secure, square, pki, capsys):
    address, flags = secure
    code, out, _ = run(capsys, "eval", square, "-i", "x=3", *flags, "--tls-server-name", "localhost")
    assert code == 0 and "f = 9.0" in out
    code, _, err = run(capsys, "eval", square, "-i", "x=3", *flags, "--tls-server-name", "elsewhere.example")
    assert code == 1 and address in one_line_error(err) and "--tls-server-name" in err


@needs_openssl
def test_a_missing_or_wrong_token_is_refused_with_the_flag_to_use(secure, square, pki, capsys):
    _, flags = secure
    without = flags[:-2]
    code, _, err = run(capsys, "eval", square, "-i", "x=3", *without)
    assert code == 1 and "--token-file" in one_line_error(err)
    code, _, err = run(capsys, "eval", square, "-i", "x=3", *without, "--token-file", pki / "wrong-token")
    assert code == 1 and "--token-file" in one_line_error(err)


@needs_openssl
def test_without_tls_or_client_certificate_the_error_names_the_flags(secure, square, pki, capsys):
    address, flags = secure
    code, _, err = run(capsys, "eval", square, "-i", "x=3", "--server", address, "--token-file", pki / "token")
    assert code == 1 and address in one_line_error(err) and "--tls" in err
    code, _, err = run(capsys, "eval", square, "-i", "x=3", "--server", address, "--tls-ca", pki / "ca.pem",
                       "--token-file", pki / "token")
    assert code == 1 and address in one_line_error(err) and "--tls-cert" in err


@needs_openssl
def test_render_and_train_take_the_same_flags(secure, square, tmp_path, capsys):
    _, flags = secure
    out = tmp_path / "square.dot"
    code, printed, _ = run(capsys, "render", square, "-i", "x=3", "-o", out, *flags)
    assert code == 0 and f"wrote {out}" in printed and out.read_text().startswith("digraph")

    g = GraphBuilder()
    w, x, t = g.input("w"), g.input("x"), g.input("t")
    error = w * x - t
    graph = tmp_path / "fit.json"
    (error * error).named("loss").graph.save(graph)
    data = tmp_path / "data.npz"
    np.savez(data, w=np.float64(0.0), x=np.float64(2.0), t=np.float64(6.0))
    trained = tmp_path / "trained.npz"
    code, printed, _ = run(capsys, "train", graph, "--data", data, "-p", "w", "--lr", "0.05", "--steps", "50",
                           "--no-progress", "-o", trained, *flags)
    assert code == 0 and "after" in printed
    with np.load(trained) as saved:
        assert abs(float(saved["w"]) - 3.0) < 1e-3


def test_ops_from_a_server_match_the_local_listing(address, capsys):
    code, local_json, _ = run(capsys, "ops", "--json")
    assert code == 0
    code, remote_json, _ = run(capsys, "ops", "--json", "--server", address)
    assert code == 0 and json.loads(remote_json) == json.loads(local_json)
    _, local_table, _ = run(capsys, "ops")
    code, remote_table, _ = run(capsys, "ops", "--server", address)
    assert code == 0 and remote_table == local_table and "matmul" in remote_table


@needs_openssl
def test_ops_over_mutual_tls_with_a_token(secure, capsys):
    _, flags = secure
    code, out, _ = run(capsys, "ops", "--json", *flags)
    assert code == 0 and "matmul" in {row["name"] for row in json.loads(out)}


def test_connection_flags_that_do_not_go_together_are_usage_errors(square, capsys):
    err = usage_error(capsys, "eval", str(square), "-i", "x=1", "--tls-cert", "c.pem")
    assert "usage: chainrule eval" in err and "--tls-key" in err
    err = usage_error(capsys, "eval", str(square), "-i", "x=1", "--local", "--tls")
    assert "usage: chainrule eval" in err and "--local" in err
    err = usage_error(capsys, "ops", "--local")
    assert "usage: chainrule ops" in err
    err = usage_error(capsys, "ops", "--tls")
    assert "usage: chainrule ops" in err and "--server ADDR" in err


# --- eval: --seed, --json, -o -------------------------------------------------------------------------

def test_seed_for_a_non_scalar_output(address, doubled, tmp_path, capsys):
    code, _, err = run(capsys, "eval", doubled, "-i", "v=[1,2,3]", "--server", address)
    assert code == 1 and "seed" in one_line_error(err).lower()
    code, out, _ = run(capsys, "eval", doubled, "-i", "v=[1,2,3]", "--seed", "[1,0,2]", "--server", address, "--json")
    assert code == 0 and json.loads(out)["gradients"]["v"] == [2.0, 0.0, 4.0]
    np.save(tmp_path / "seed.npy", np.array([0.5, 1.0, -1.0]))
    code, out, _ = run(capsys, "eval", doubled, "-i", "v=[1,2,3]", "--seed", f"@{tmp_path / 'seed.npy'}",
                       "--server", address, "--json")
    assert code == 0 and json.loads(out)["gradients"]["v"] == [1.0, 2.0, -2.0]


def test_json_output_follows_the_schema(address, tmp_path, capsys):
    g = GraphBuilder()
    m, x = g.input("m", shape=(2, 2)), g.input("x")
    path = tmp_path / "graph.json"
    ((m * x).sum() + x.log()).named("f").graph.save(path)
    code, out, _ = run(capsys, "eval", path, "-i", "m=[[1,2],[3,4]]", "-i", "x=-1", "--server", address, "--json")
    assert code == 0 and out.count("\n") == 1
    result = json.loads(out)
    assert set(result) == {"output", "value", "gradients", "diagnostics"} and result["output"] == "f"
    assert result["value"] == "nan"  # log(-1): non-finite numbers are strings
    assert result["gradients"]["m"] == [[-1.0, -1.0], [-1.0, -1.0]]  # nested lists
    assert list(result["gradients"])[:2] == ["m", "x"]  # the file's order
    diagnostics = result["diagnostics"]
    assert set(diagnostics) == {"finite", "first_nonfinite_value", "first_nonfinite_gradient", "flags"}
    assert diagnostics["finite"] is False
    assert set(diagnostics["first_nonfinite_value"]) == {"node", "op", "count"}
    assert diagnostics["first_nonfinite_value"]["op"] == "log" and isinstance(diagnostics["flags"], list)
    code, out, _ = run(capsys, "eval", path, "-i", "m=[[1,2],[3,4]]", "-i", "x=2", "--server", address, "--json",
                       "--no-diagnostics")
    result = json.loads(out)
    assert code == 0 and result["diagnostics"] is None and result["value"] == pytest.approx(20 + np.log(2))


def test_out_npz_holds_the_value_and_every_gradient(address, square, tmp_path, capsys):
    out = tmp_path / "out.npz"
    code, printed, _ = run(capsys, "eval", square, "-i", "x=3", "--server", address, "-o", out)
    assert code == 0 and f"to {out}" in printed
    with np.load(out) as saved:
        assert sorted(saved.files) == ["grad/f", "grad/x", "value"]
        assert saved["value"] == 9.0 and saved["grad/x"] == 6.0 and saved["grad/f"] == 1.0


# --- --version ----------------------------------------------------------------------------------------

def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"chainrule {metadata.version('chainrule')}"


# --- one-line errors, exit codes ----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_file_errors_are_one_line_with_the_next_step(address, square, tmp_path, capsys):
    code, _, err = run(capsys, "eval", tmp_path / "missing.json", "-i", "x=1", "--server", address)
    assert code == 1 and "missing.json: cannot read the graph file" in one_line_error(err) and "graph.save" in err

    typo = tmp_path / "typo.json"
    typo.write_text(square.read_text().replace('"nodes"', '"nodez"'))
    code, _, err = run(capsys, "eval", typo, "-i", "x=1", "--server", address)
    assert code == 1 and "not a chainrule graph" in one_line_error(err) and "nodez" in err

    code, _, err = run(capsys, "eval", square, "-i", f"x=@{tmp_path / 'none.npy'}", "--server", address)
    assert code == 1 and "--input x: cannot read" in one_line_error(err) and "numpy.save" in err

    code, _, err = run(capsys, "eval", square, "-i", "x=1", "--server", address, "--token-file", tmp_path / "nope")
    assert code == 1 and "--token-file" in one_line_error(err) and "cannot read" in err
    (tmp_path / "empty").write_text("\n")
    code, _, err = run(capsys, "ops", "--server", address, "--token-file", tmp_path / "empty")
    assert code == 1 and "empty" in one_line_error(err)


def test_client_errors_name_the_address(square, capsys):
    nowhere = f"127.0.0.1:{free_port()}"
    for argv in (["eval", square, "-i", "x=1"], ["ops"]):
        code, out, err = run(capsys, *argv, "--server", nowhere)
        assert code == 1 and out == ""
        assert f"cannot reach a chainrule server at {nowhere}" in one_line_error(err)


def test_a_typo_or_a_missing_argument_shows_the_subcommands_usage(square, capsys):
    err = usage_error(capsys, "eval", "--inptu", "x=1", str(square))
    assert err.startswith("usage: chainrule eval") and "unrecognized arguments: --inptu" in err
    assert "did you mean --input?" in err
    err = usage_error(capsys, "eval")
    assert err.startswith("usage: chainrule eval") and "required: graph" in err
    err = usage_error(capsys, "ops", "--jsn")
    assert err.startswith("usage: chainrule ops") and "did you mean --json?" in err


def console_script() -> str:
    script = Path(sys.executable).with_name("chainrule")
    return str(script) if script.exists() else shutil.which("chainrule") or pytest.skip("no chainrule script")


def test_a_closed_stdout_ends_quietly_with_141():
    process = subprocess.Popen([console_script(), "ops", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the reader is gone before anything is written: every write fails
    _, err = process.communicate(timeout=60)
    assert process.returncode == 141 and err == b""


def test_ops_json_into_head():
    done = subprocess.run(["bash", "-c", f"'{console_script()}' ops --json | head -1; exit ${{PIPESTATUS[0]}}"],
                          capture_output=True, text=True, timeout=60)
    assert done.stdout == "[\n" and done.stderr == "" and done.returncode in (0, 141)
