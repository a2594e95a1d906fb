"""The Optimize RPC through a real server: optimizers, reports, limits, errors, cancellation.

Optimizer arithmetic is checked against formulas written out here; runs
through the server are compared bit for bit with the same runs through
LocalClient; a cancelled or expired run must leave the server idle (its only
admission slot free again, and no more steps logged).
"""
from __future__ import annotations

import logging
import time

import grpc
import numpy as np
import pytest

from chainrule.client import (

    Client, DeadlineExceeded, GraphBuilder, InvalidArgument, Progress, ResourceExhausted, ops,

)

from chainrule.server import LocalClient, ServerConfig
from chainrule.core import compile_graph
from chainrule.core.optim import SGD, Adam, make_optimizer
from chainrule.core.training import train, training
import chainrule.core.training as core_training
from chainrule.plugins.manager import load_plugins
from chainrule.client.training import optimize_request
from chainrule.wire.convert import graph_from_proto
from chainrule.v1.chainrule_pb2_grpc import ChainruleStub
from helpers import start_server

C = np.array([1.0, -2.0, 3.0])
A = np.array([1.0, 4.0, 10.0])


def quadratic():
    """L(w) = ½ Σ a_i (w_i − c_i)²: minimum at w = c, curvatures a."""
    g = GraphBuilder()
    w, c, a = g.input("w", (3,)), g.input("c", (3,)), g.input("a", (3,))
    d = (w - c).named("d")
    return (0.5 * (a * d * d).sum()).named("L")


def linear():
    """L(w; x) = Σ w·x: the gradient is x, so each step's batch is visible in the result."""
    g = GraphBuilder()
    w, x = g.input("w", (2,)), g.input("x", (2,))
    return (w * x).sum(name="L")


def start(**settings):
    return start_server(ServerConfig(**settings))


# --- optimizers ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_sgd_reaches_the_minimum_of_a_quadratic(client, momentum):
    result = client.optimize(quadratic(), {"w": np.zeros(3)}, {"c": C, "a": A}, optimizer="sgd", lr=0.09,
                             momentum=momentum, steps=400, progress=False)
    assert np.max(np.abs(result.params["w"] - C)) < 1e-8
    assert result.loss < 1e-16 and result.steps == 400 and not result.target_reached


def test_adam_first_steps_follow_the_formula(client):
    lr, b1, b2, eps = 0.1, 0.8, 0.99, 1e-3
    w = np.array([0.5, -1.0, 2.0])
    result = client.optimize(quadratic(), {"w": w}, {"c": C, "a": A}, optimizer="adam", lr=lr, beta1=b1, beta2=b2,
                             eps=eps, steps=3, progress=False)
    m = v = np.zeros(3)
    for t in (1, 2, 3):
        g = A * (w - C)  # dL/dw by hand
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g ** 2
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        w = w - lr * m_hat / (np.sqrt(v_hat) + eps)
    np.testing.assert_allclose(result.params["w"], w, rtol=1e-14, atol=0)


def test_adam_first_step_moves_each_parameter_by_about_lr():
    # At t = 1 bias correction gives m̂ = g, v̂ = g²: the step is lr·g/(|g| + eps), whatever g's scale.
    g = np.array([1e-3, -5.0, 300.0])
    new = Adam(lr=0.01, eps=1e-8).step({"p": np.zeros(3)}, {"p": g})["p"]
    np.testing.assert_allclose(new, -0.01 * g / (np.abs(g) + 1e-8), rtol=1e-15)


def test_optimizers_leave_their_inputs_alone_and_keep_float32():
    p, g = np.ones(2, np.float32), np.full(2, 0.5, np.float32)
    for optimizer in (SGD(0.1, momentum=0.9), Adam(0.1)):
        out = optimizer.step({"p": p}, {"p": g})["p"]
        assert out.dtype == np.float32 and out is not p
        assert np.all(p == 1) and np.all(g == 0.5)


# --- reports, batches, early stop ---------------------------------------------------------------------

def test_reports_every_k_steps_carry_the_whole_history(client):
    seen: list[Progress] = []
    result = client.optimize(quadratic(), {"w": np.zeros(3)}, {"c": C, "a": A}, lr=0.05, steps=25, report_every=10,
                             progress=False, callback=seen.append)
    assert [p.step for p in seen] == [10, 20, 25] and [p.done for p in seen] == [False, False, True]
    assert seen == result.history
    assert len(result.losses) == 25 and np.all(np.diff(result.losses) < 0)
    assert set(seen[0].grad_norms) == {"w"} and seen[0].grad_norms["w"] > seen[1].grad_norms["w"] > 0
    assert result.losses[0] == pytest.approx(0.5 * np.sum(A * C ** 2))
    assert result.loss < result.losses[-1]  # the final loss is at the trained parameters, after the last update
    assert all(p.elapsed >= 0 for p in seen)


def test_default_reporting_is_throttled_but_the_history_is_whole(client):
    result = client.optimize(quadratic(), {"w": np.zeros(3)}, {"c": C, "a": A}, lr=0.05, steps=300, progress=False)
    assert len(result.losses) == 300 and np.all(np.diff(result.losses) < 0)
    assert result.history[-1].done and len(result.history) < 300  # at most 10 reports a second


def test_reports_within_the_interval_are_skipped():
    plan = compile_graph(graph_from_proto(quadratic().graph.message), load_plugins().registry)
    reports = list(training(plan, {"w": np.zeros(3)}, fixed={"c": C, "a": A}, optimizer=SGD(0.05), steps=50,
                            report_every=1, report_seconds=3600))
    assert len(reports) == 1 and reports[0].done and len(reports[0].losses) == 50


def test_progress_bar_only_when_asked_or_on_a_terminal(client, capsys):
    client.optimize(quadratic(), {"w": np.zeros(3)}, {"c": C, "a": A}, steps=30)  # stderr is no terminal here
    assert capsys.readouterr().err == ""
    client.optimize(quadratic(), {"w": np.zeros(3)}, {"c": C, "a": A}, steps=30, progress=True)
    assert "30/30" in capsys.readouterr().err


def test_batches_are_cycled_step_by_step(client):
    xs = [np.array([1.0, 0.0]), np.array([0.0, 2.0]), np.array([3.0, 3.0])]
    result = client.optimize(linear(), {"w": np.zeros(2)}, batches=[{"x": x} for x in xs], lr=1.0, steps=7,
                             progress=False)
    expected = -sum(xs[k % 3] for k in range(7))  # plain SGD with lr 1: w -= x_k
    assert np.array_equal(result.params["w"], expected)


def test_target_loss_stops_early_with_the_parameters_that_reached_it(client):
    result = client.optimize(quadratic(), {"w": np.zeros(3)}, {"c": C, "a": A}, lr=0.09, steps=1000,
                             target_loss=1e-6, progress=False)
    assert result.target_reached and result.steps < 1000 and result.loss <= 1e-6
    # one loss per update applied (each before it, all above the target); the reached loss is `loss` alone
    assert len(result.losses) == result.steps and np.all(result.losses > 1e-6)


def test_same_run_bitwise_identical_through_local_client(client):
    run = dict(optimizer="adam", lr=0.05, steps=40, progress=False)
    remote = client.optimize(quadratic(), {"w": np.zeros(3)}, {"c": C, "a": A}, **run)
    local = LocalClient().optimize(quadratic(), {"w": np.zeros(3)}, {"c": C, "a": A}, **run)
    assert remote.params["w"].tobytes() == local.params["w"].tobytes()
    assert remote.losses.tobytes() == local.losses.tobytes()


# --- errors: before the first step, with the field named, and the server keeps serving ---------------

@pytest.mark.parametrize("change, field, text", [
    (dict(params={"nope": np.zeros(3)}), "parameters", "nope"),
    (dict(params={"w": np.zeros(3), "c": C}), "fixed_inputs.c", "is a parameter"),
    (dict(optimizer="rmsprop"), "optimizer.kind", "rmsprop"),
    (dict(lr=0.0), "optimizer.learning_rate", "> 0"),
    (dict(momentum=1.5), "optimizer.momentum", "[0, 1)"),
    (dict(steps=0), "steps", "> 0"),
    (dict(data={"c": C}), "fixed_inputs.a", "'a'"),
    (dict(data={"c": C, "a": A[:2]}), "fixed_inputs.a", "shape"),
    (dict(data={"c": C}, batches=[{"a": A}, {"a": np.zeros(4)}]), "batches[1].inputs.a", "shape"),
    (dict(loss="d"), "loss", "scalar"),
    (dict(target_loss=float("nan")), "target_loss", "NaN can never be reached"),
    (dict(optimizer="adam", eps=float("inf")), "optimizer.epsilon", "finite"),
])
def test_bad_requests_fail_before_any_step(client, change, field, text):
    run = dict(params={"w": np.zeros(3)}, data={"c": C, "a": A}, steps=5, progress=False)
    run.update(change)
    seen = []
    with pytest.raises(InvalidArgument) as info:
        client.optimize(quadratic().graph, run.pop("params"), run.pop("data"), callback=seen.append, **run)
    assert info.value.field == field and text in info.value.message
    assert seen == []
    assert client.optimize(linear(), {"w": np.zeros(2)}, {"x": np.ones(2)}, steps=1, progress=False).steps == 1


def test_only_float_inputs_can_be_trained(client):
    g = GraphBuilder()
    w, k = g.input("w"), g.input("k", dtype="int64")
    loss = (w * w * k).named("L")
    with pytest.raises(InvalidArgument) as info:
        client.optimize(loss, {"w": 1.0, "k": np.array(2)}, steps=1, progress=False)
    assert info.value.field == "initial.k" and "int64" in info.value.message


def test_a_diverging_run_names_the_loss_and_the_step(client):
    with pytest.raises(InvalidArgument) as info:
        client.optimize(quadratic(), {"w": np.zeros(3)}, {"c": C, "a": A}, lr=10.0, steps=2000, progress=False)
    assert info.value.reason == "NONFINITE_LOSS" and info.value.node == "L"
    assert "lower the learning rate" in info.value.message


def test_tensor_limits_apply():
    server, addr = start(max_tensor_elements=2)
    try:
        with Client(addr, timeout=30) as c, pytest.raises(ResourceExhausted) as info:
            c.optimize(quadratic(), {"w": np.zeros(3)}, {"c": C, "a": A}, steps=1, progress=False)
        assert info.value.metadata["limit"] == "max_tensor_elements"
    finally:
        server.stop(grace=None).wait()


def test_a_long_history_comes_in_reports_of_bounded_size(monkeypatch):
    """Millions of steps between reports would pile up their losses into one final message too big
    to send: a report comes early instead, and the history stays whole across reports."""
    import chainrule.core.training as core_training

    monkeypatch.setattr(core_training, "MAX_LOSSES_PER_REPORT", 16)
    plan = compile_graph(graph_from_proto(quadratic().graph.message), load_plugins().registry)
    reports = list(training(plan, {"w": np.zeros(3)}, fixed={"c": C, "a": A}, optimizer=SGD(0.05), steps=50,
                            report_every=1000, report_seconds=3600))
    assert [r.step for r in reports] == [16, 32, 48, 50] and all(len(r.losses) <= 16 for r in reports)
    assert sum(len(r.losses) for r in reports) == 50 and reports[-1].done


def test_batches_are_refused_before_decoding_when_they_would_not_fit_the_budget():
    """A scalar batch is a few bytes on the wire and a kilobyte decoded: counted before any is."""
    server, addr = start(max_memory_bytes=1 << 20)
    try:
        g = GraphBuilder()
        w, x = g.input("w"), g.input("x")
        loss = ((w * x) ** 2).named("loss")
        with Client(addr, timeout=30) as c:
            with pytest.raises(ResourceExhausted, match="would take about .* once decoded") as info:
                c.optimize(loss, {"w": 1.0}, batches=[{"x": float(k)} for k in range(4000)], steps=1,
                           progress=False)
            assert info.value.metadata["limit"] == "max_memory_bytes" and info.value.field == "batches"
            assert c.optimize(loss, {"w": 1.0}, batches=[{"x": 1.0}] * 10, steps=3, progress=False).loss >= 0
    finally:
        server.stop(grace=None).wait()


# --- cancellation and deadlines stop the server's work ---------------------------------------------------

class Stop(Exception):
    pass


class StepLog(logging.Handler):
    """Counts the server's per-report debug lines: the server-side trace of steps run."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


@pytest.fixture
def one_slot():
    """A server admitting one call at a time, and a log of the optimization steps it runs."""
    server, addr = start(max_concurrent=1)
    logger = logging.getLogger("chainrule.server.service.optimize")
    steps, level = StepLog(), logger.level
    logger.addHandler(steps)
    logger.setLevel(logging.DEBUG)
    try:
        with Client(addr, timeout=30) as c:
            yield c, steps
    finally:
        logger.removeHandler(steps)
        logger.setLevel(level)
        server.stop(grace=None).wait()


def assert_idle(client: Client, steps: StepLog | None = None) -> None:
    """The only slot frees up (the run ended, not just the call) and no further steps are logged."""
    give_up = time.monotonic() + 10
    while True:
        try:
            result = client.evaluate(linear(), w=np.ones(2), x=np.ones(2))
            break
        except ResourceExhausted:
            assert time.monotonic() < give_up, "the server kept working after the call ended"
            time.sleep(0.01)
    assert result.value == 2.0
    if steps is not None:
        count = steps.count
        time.sleep(0.2)
        assert steps.count == count


#: Runs for minutes unless stopped; no report before the end, so only the server's stop token can stop it.
LONG = dict(optimizer="sgd", lr=1e-9, steps=10 ** 7, report_every=10 ** 7, progress=False)


def long_request():
    return optimize_request(quadratic().graph, "", {"w": np.zeros(3)}, data={"c": C, "a": A}, batches=(),
                            optimizer="sgd", lr=1e-9, momentum=0.0, beta1=None, beta2=None, eps=None,
                            steps=10 ** 7, target_loss=None, report_every=10 ** 7)


def assert_busy(client: Client) -> None:
    """The only slot is taken: the run is going on."""
    give_up = time.monotonic() + 10
    while True:
        try:
            client.evaluate(linear(), w=np.ones(2), x=np.ones(2))
        except ResourceExhausted:
            return
        assert time.monotonic() < give_up, "the run never started"
        time.sleep(0.01)


def start_long_run(client: Client):
    """An Optimize call that holds the only slot. Nothing competes for the slot until the call
    is seen running: a probe sent too early could take the slot and get the run refused."""
    give_up = time.monotonic() + 10
    while time.monotonic() < give_up:
        call = ChainruleStub(client.channel).Optimize(long_request())
        call.initial_metadata()  # the server has the call
        time.sleep(0.2)
        if not call.done():  # a refusal ends the call at once; a running call goes on
            return call
    raise AssertionError("the run never started")


def test_cancelling_an_optimize_stops_the_server(one_slot):
    client, _ = one_slot
    call = start_long_run(client)
    assert_busy(client)
    call.cancel()
    assert_idle(client)
    with pytest.raises(grpc.RpcError) as info:
        next(call)
    assert info.value.code() == grpc.StatusCode.CANCELLED


def test_a_callback_that_raises_ends_the_run(one_slot):
    client, steps = one_slot

    def stop_after_five(report: Progress) -> None:
        if report.step >= 5:
            raise Stop  # like Ctrl-C in a notebook: the client closes the stream

    with pytest.raises(Stop):
        client.optimize(quadratic(), {"w": np.zeros(3)}, {"c": C, "a": A}, callback=stop_after_five,
                        **{**LONG, "report_every": 1})
    assert_idle(client, steps)
    assert 5 <= steps.count < 10 ** 7


@pytest.fixture
def overrunning_steps(monkeypatch):
    """Every step looks free to the deadline rule, so the run never stops early: the deadline
    passes mid-run, as when a step overruns it (see tests/test_training_stops.py for early stops)."""
    monkeypatch.setattr(core_training, "time_needed", lambda slowest_step, report_bytes: 0.0)


def test_an_expired_deadline_stops_the_server(one_slot, overrunning_steps):
    client, steps = one_slot
    with pytest.raises(DeadlineExceeded):
        client.optimize(quadratic(), {"w": np.zeros(3)}, {"c": C, "a": A}, timeout=0.5, **LONG)
    assert_idle(client, steps)
    assert steps.count == 0  # stopped before its first report


def test_a_deadline_stops_the_local_client_too(overrunning_steps):
    with pytest.raises(DeadlineExceeded):
        LocalClient().optimize(quadratic(), {"w": np.zeros(3)}, {"c": C, "a": A}, timeout=0.2, **LONG)


def test_mse_network_with_batches_matches_core_training_loop(client):
    """The server's run equals chainrule.core.training.train on the same plan and data."""
    g = GraphBuilder()
    x, t, w = g.input("x", (-1, 2)), g.input("t", (-1, 1)), g.input("w", (2, 1))
    loss = ops.mse((x @ w).tanh(), t, name="loss")
    rng = np.random.default_rng(3)
    batches = [{"x": rng.normal(size=(5, 2)), "t": rng.normal(size=(5, 1))} for _ in range(3)]
    w0 = rng.normal(size=(2, 1))
    remote = client.optimize(loss, {"w": w0}, batches=batches, optimizer="adam", lr=0.1, steps=10, progress=False)
    plan = compile_graph(graph_from_proto(loss.graph.message), load_plugins().registry)
    here = train(plan, {"w": w0}, optimizer=make_optimizer("adam", lr=0.1), steps=10, batches=batches)
    assert remote.params["w"].tobytes() == here.params["w"].tobytes()
    assert remote.loss == here.loss


def test_the_server_caps_a_training_run_without_a_client_deadline(overrunning_steps):
    server, addr = start(max_training_seconds=0.3)
    try:
        with Client(addr) as c:  # no timeout: only the server's cap can stop the run
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded,
                               match=r"time limit of 0.3 s per training run \(max_training_seconds\)"):
                c.optimize(quadratic(), {"w": np.zeros(3)}, {"c": C, "a": A}, **LONG)
            assert time.monotonic() - started < 5
    finally:
        server.stop(grace=None).wait()
