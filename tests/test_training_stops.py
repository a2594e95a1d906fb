"""Honest budgets: a training run that a time limit would cut short stops in time and keeps what it trained.

The client's deadline (a timeout) and the server's max_training_seconds both
end an Optimize run with a final report marked stopped_early, naming the
limit, before the deadline passes: the parameters and losses of the steps
taken arrive, through the real server and through LocalClient alike. The
margins are generous (a loaded 2-core machine): the runs would last minutes
unless stopped, and only "before the deadline" and "well short of the steps"
are asserted.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from chainrule.client import Client, GraphBuilder
from chainrule.client.training import optimize_request
from chainrule.core import StopToken, compile_graph
from chainrule.core.optim import make_optimizer
from chainrule.core.training import SEND_SECONDS, STEP_SAFETY_FACTOR, time_needed, train
from chainrule.plugins.manager import load_plugins
from chainrule.server import LocalClient, ServerConfig
from chainrule.v1.chainrule_pb2_grpc import ChainruleStub
from chainrule.wire.convert import graph_from_proto
from helpers import start_server

C = np.array([1.0, -2.0, 3.0])
A = np.array([1.0, 4.0, 10.0])
STEPS = 10 ** 7  # minutes of training: only a time limit ends these runs
#: Seconds the runs get: long enough for thousands of steps even on a loaded machine.
TIMEOUT = 2.0


def quadratic():
    g = GraphBuilder()
    w, c, a = g.input("w", (3,)), g.input("c", (3,)), g.input("a", (3,))
    d = (w - c).named("d")
    return (0.5 * (a * d * d).sum()).named("L")


def loss_at(w: np.ndarray) -> float:
    return float(0.5 * np.sum(A * (w - C) ** 2))


RUN = dict(optimizer="sgd", lr=1e-4, steps=STEPS, progress=False)


def assert_stopped_early(result, started: float, deadline_seconds: float, reason: str) -> None:
    assert time.monotonic() - started < deadline_seconds  # returned before the deadline
    assert result.stopped_early and not result.target_reached
    assert reason in result.stop_reason
    assert 0 < result.steps < STEPS
    assert len(result.losses) == result.steps  # one loss per update applied: the whole history
    assert not np.array_equal(result.params["w"], np.zeros(3))  # the steps taken are kept
    assert result.loss == pytest.approx(loss_at(result.params["w"]), rel=1e-12)  # the loss at those params
    assert result.losses[-1] > result.loss  # it was still improving
    final = result.history[-1]
    assert final.done and final.step == result.steps


@pytest.fixture(scope="module")
def server():
    server, addr = start_server()
    yield addr
    server.stop(grace=None).wait()


def test_the_clients_deadline_ends_a_run_in_time_with_what_it_trained(server):
    with Client(server) as c:
        started = time.monotonic()
        result = c.optimize(quadratic(), {"w": np.zeros(3)}, {"c": C, "a": A}, timeout=TIMEOUT, **RUN)
    assert_stopped_early(result, started, TIMEOUT, "the client's deadline")
    assert result.stop_reason == "the client's deadline"


def test_the_clients_deadline_ends_a_local_run_in_time_too():
    started = time.monotonic()
    result = LocalClient().optimize(quadratic(), {"w": np.zeros(3)}, {"c": C, "a": A}, timeout=TIMEOUT, **RUN)
    assert_stopped_early(result, started, TIMEOUT, "the client's deadline")


def test_the_servers_time_limit_ends_a_run_with_what_it_trained():
    server, addr = start_server(ServerConfig(max_training_seconds=1.5))
    try:
        with Client(addr) as c:  # no timeout: the server's limit is the only one
            started = time.monotonic()
            result = c.optimize(quadratic(), {"w": np.zeros(3)}, {"c": C, "a": A}, **RUN)
    finally:
        server.stop(grace=None).wait()
    assert_stopped_early(result, started, 60, "max_training_seconds")
    assert result.stop_reason == "the server's time limit of 1.5 s per training run (max_training_seconds)"


def test_a_client_deadline_sooner_than_the_servers_limit_is_the_one_named():
    server, addr = start_server(ServerConfig(max_training_seconds=600))
    try:
        with Client(addr) as c:
            started = time.monotonic()
            result = c.optimize(quadratic(), {"w": np.zeros(3)}, {"c": C, "a": A}, timeout=TIMEOUT, **RUN)
    finally:
        server.stop(grace=None).wait()
    assert_stopped_early(result, started, TIMEOUT, "the client's deadline")


def test_the_final_message_on_the_wire_is_done_and_stopped_early(server):
    request = optimize_request(quadratic().graph, "", {"w": np.zeros(3)}, data={"c": C, "a": A}, batches=(),
                               optimizer="sgd", lr=1e-4, momentum=0.0, beta1=None, beta2=None, eps=None,
                               steps=STEPS, target_loss=None, report_every=STEPS)
    with Client(server) as c:
        messages = list(ChainruleStub(c.channel).Optimize(request, timeout=TIMEOUT))
    final = messages[-1]
    assert final.done and final.stopped_early and final.stop_reason == "the client's deadline"
    assert 0 < final.step < STEPS and "w" in final.parameters
    assert sum(len(m.losses) for m in messages) == final.step
    assert all(not m.done and not m.stopped_early and not m.stop_reason for m in messages[:-1])


@pytest.mark.parametrize("via", ["grpc", "local"])
def test_a_run_that_finishes_in_time_is_not_stopped_early(server, via):
    with (Client(server) if via == "grpc" else LocalClient()) as c:
        result = c.optimize(quadratic(), {"w": np.zeros(3)}, {"c": C, "a": A}, timeout=60,
                            optimizer="sgd", lr=0.09, steps=200, progress=False)
    assert result.steps == 200 and len(result.losses) == 200
    assert not result.stopped_early and result.stop_reason == ""


def test_the_core_loop_stops_before_the_tokens_deadline():
    plan = compile_graph(graph_from_proto(quadratic().graph.message), load_plugins().registry)
    token = StopToken.after(1.0, what="the test's deadline")
    final = train(plan, {"w": np.zeros(3)}, fixed={"c": C, "a": A}, optimizer=make_optimizer("sgd", lr=1e-4),
                  steps=STEPS, token=token, report_every=STEPS)
    assert time.monotonic() < token.deadline - SEND_SECONDS / 2  # the send allowance is left
    assert final.done and final.stopped_early and final.stop_reason == "the test's deadline"
    assert 0 < final.step < STEPS and len(final.losses) == final.step


def test_the_core_loop_without_a_deadline_runs_every_step():
    plan = compile_graph(graph_from_proto(quadratic().graph.message), load_plugins().registry)
    final = train(plan, {"w": np.zeros(3)}, fixed={"c": C, "a": A}, optimizer=make_optimizer("sgd", lr=0.09),
                  steps=50, token=StopToken(what="unused"))
    assert final.step == 50 and not final.stopped_early and final.stop_reason == ""


def test_the_estimate_budgets_the_step_the_final_loss_and_the_report():
    assert time_needed(0.0, 0) == SEND_SECONDS
    assert time_needed(1.0, 0) == pytest.approx(STEP_SAFETY_FACTOR + 1 + SEND_SECONDS)
    assert time_needed(0.0, 25_000_000) > time_needed(0.0, 0)


def test_chainrule_train_says_it_stopped_early_and_why(tmp_path, capsys):
    """The command line keeps what a run cut short trained, and says so (issue 14)."""
    from chainrule.server.cli import main as chainrule

    graph, data, out = tmp_path / "q.json", tmp_path / "d.npz", tmp_path / "w.npz"
    quadratic().graph.save(graph)
    np.savez(data, w=np.zeros(3), c=C, a=A)
    code = chainrule(["train", str(graph), "--data", str(data), "--param", "w", "--optimizer", "sgd", "--lr", "1e-4",
                      "--steps", str(STEPS), "--timeout", "1.5", "--local", "--no-progress", "-o", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "(stopped early: the client's deadline)" in printed
    with np.load(out) as saved:
        assert not np.array_equal(saved["w"], np.zeros(3))  # the steps taken are kept
