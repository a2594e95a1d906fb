"""The training examples and ``chainrule train``, run for real.

- examples/train_four_layer.py: the lecture's 4-layer sigmoid network trained
  through a real server; the loss falls at least 10x in a fixed number of
  steps, and the parameters equal those of the same run in-process, bit for bit.
- examples/rnn_bptt.py: backpropagation through time; gradients match finite
  differences, and the weight shared across steps gets the sum of its
  per-step contributions.
- ``chainrule train`` writes trained parameters to .npz, against a server and locally.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from chainrule.server import LocalClient
from chainrule.server.cli import main as chainrule

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


four_layer = load_example("train_four_layer")
rnn = load_example("rnn_bptt")


# --- the 4-layer network -----------------------------------------------------------------------------

STEPS = 300


@pytest.fixture(scope="module")
def trained(client):
    return four_layer.train(client, steps=STEPS, report_every=50)


def test_four_layer_loss_falls_tenfold_through_the_server(trained):
    assert trained.steps == STEPS and len(trained.losses) == STEPS
    assert trained.losses[0] / trained.loss >= 10
    assert set(trained.params) == {"W1", "b1", "W2", "b2", "W3", "b3"}
    assert trained.params["W2"].shape == (16, 16)
    assert [p.step for p in trained.history] == [50, 100, 150, 200, 250, 300]


def test_four_layer_parameters_equal_the_local_run_bit_for_bit(trained):
    local = four_layer.train(LocalClient(), steps=STEPS, report_every=50)
    for name, value in trained.params.items():
        assert value.tobytes() == local.params[name].tobytes(), name
    assert trained.losses.tobytes() == local.losses.tobytes() and trained.loss == local.loss


def test_four_layer_trained_parameters_give_the_reported_loss(client, trained):
    result = client.evaluate(four_layer.four_layer_network(), {**four_layer.make_data(), **trained.params},
                             grads="none")
    assert float(result.value) == trained.loss


def test_four_layer_example_prints_the_loss_falling(capsys):
    assert four_layer.main(["--steps", "300"]) == 0
    lines = capsys.readouterr().out.splitlines()
    losses = [float(line.split("loss")[1].split()[0]) for line in lines if line.startswith("step")]
    assert len(losses) == 20 and losses[-1] < losses[0] / 5
    assert "lower" in lines[-1]


# --- the RNN: backpropagation through time ---------------------------------------------------------------

@pytest.fixture(scope="module")
def rnn_result(client):
    inputs = rnn.example_inputs()
    return inputs, client.evaluate(rnn.rnn(), inputs, contributions=True)


def test_rnn_gradients_match_finite_differences(client, rnn_result):
    inputs, result = rnn_result
    names = ["W", "U", "b", "v", "h0", "X"]
    numeric = rnn.finite_differences(client, rnn.rnn(), inputs, names)
    for name in names:
        np.testing.assert_allclose(result.grad[name], numeric[name], rtol=1e-6, atol=1e-8, err_msg=name)
    assert np.abs(result.grad["W"]).max() > 1e-3  # a real signal, not zeros agreeing with zeros


def test_rnn_shared_weight_gets_the_sum_of_its_per_step_contributions(client, rnn_result):
    inputs, result = rnn_result
    shares = rnn.shares_of_w(result)
    assert sorted(shares) == [f"Wh{t}" for t in range(1, rnn.STEPS + 1)]
    np.testing.assert_allclose(sum(shares.values()), result.grad["W"], rtol=1e-14, atol=1e-15)
    for t, untied in enumerate(rnn.untied_gradients(client, inputs), start=1):
        np.testing.assert_allclose(shares[f"Wh{t}"], untied, rtol=1e-14, atol=1e-15, err_msg=f"step {t}")
        assert np.abs(untied).max() > 1e-6


def test_rnn_example_runs_locally(capsys):
    assert rnn.main(["--local"]) == 0
    out = capsys.readouterr().out
    assert out.count("equals dC/dW") == rnn.STEPS and "False" not in out
    assert "scan: 7 nodes instead of 34" in out


def test_rnn_scan_version_gives_the_unrolled_gradients_over_grpc(client, rnn_result):
    inputs, unrolled = rnn_result
    looped = client.evaluate(rnn.rnn_scan(), inputs)
    assert float(looped.value) == pytest.approx(float(unrolled.value), rel=1e-14)
    for name in inputs:
        np.testing.assert_allclose(looped.grad[name], unrolled.grad[name], rtol=1e-12, atol=1e-14, err_msg=name)
    assert len(rnn.rnn_scan(steps=1000).graph) == len(rnn.rnn_scan().graph)  # the graph does not grow with T


# --- chainrule train -----------------------------------------------------------------------------------

@pytest.fixture
def files(tmp_path):
    graph = tmp_path / "net.json"
    four_layer.four_layer_network().graph.save(graph)
    data = tmp_path / "data.npz"
    np.savez(data, **four_layer.make_data(), **four_layer.init_params(1))
    return tmp_path, graph, data


PARAMS = ["--param", "W1,b1,W2,b2", "-p", "W3", "-p", "b3"]


def test_cli_train_against_a_server_writes_the_trained_parameters(files, address, trained, capsys):
    tmp, graph, data = files
    out = tmp / "trained.npz"
    code = chainrule(["train", str(graph), "--data", str(data), *PARAMS, "--optimizer", "adam", "--lr", "0.02",
                      "--steps", str(STEPS), "--server", address, "-o", str(out), "--no-progress"])
    assert code == 0
    with np.load(out) as saved:
        assert sorted(saved.files) == sorted(trained.params)
        for name in saved.files:  # the same run as the example's, so the same bits
            assert saved[name].tobytes() == trained.params[name].tobytes()
    assert f"after {STEPS} steps" in capsys.readouterr().out


def test_cli_train_resumes_from_init_locally(files, capsys):
    tmp, graph, data = files
    first, second = tmp / "first.npz", tmp / "second.npz"
    common = ["train", str(graph), "--data", str(data), *PARAMS, "--optimizer", "sgd", "--lr", "0.5",
              "--momentum", "0.9", "--steps", "20", "--local", "--no-progress"]
    assert chainrule([*common, "-o", str(first)]) == 0
    assert chainrule([*common, "--init", str(first), "-o", str(second)]) == 0
    lines = capsys.readouterr().out.splitlines()
    start1, end1 = (float(v) for v in lines[0].split()[1:4:2])
    start2, end2 = (float(v) for v in lines[1].split()[1:4:2])
    assert end1 < start1 and start2 < start1 and end2 < start2


def test_cli_train_reports_a_bad_request_without_a_traceback(files, capsys):
    tmp, graph, data = files
    code = chainrule(["train", str(graph), "--data", str(data), "--param", "W1", "--optimizer", "adam",
                      "--lr", "0", "--local", "-o", str(tmp / "x.npz")])
    assert code == 1
    err = capsys.readouterr().err
    assert "optimizer.learning_rate" in err and "Traceback" not in err
    assert not (tmp / "x.npz").exists()


def test_cli_train_names_a_missing_parameter(files, capsys):
    tmp, graph, data = files
    assert chainrule(["train", str(graph), "--data", str(data), "--param", "W9", "--local"]) == 1
    assert "chainrule: error: --param W9: no array of that name" in capsys.readouterr().err
