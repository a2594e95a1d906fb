"""SIGTERM to ``chainrule serve`` loses nothing trained, and drains the rest.

A training run in progress ends at its next step with the parameters and
losses of the steps taken, marked stopped_early with the shutdown as its
stop_reason (the same parameters a run of that many steps gives); an
Evaluate in flight finishes with its answer; new calls are refused with
UNAVAILABLE; the process exits 0 within its grace period.
"""
from __future__ import annotations

import signal
import threading
import time

import grpc
import numpy as np
import pytest

from chainrule.client import Client, GraphBuilder, Unavailable
from chainrule.server import LocalClient

from serving import ServerProcess, slow_graph
from test_lifecycle import server_info

C = np.array([1.0, -2.0, 3.0])
A = np.array([1.0, 4.0, 10.0])
STEPS = 10 ** 7  # minutes of training: only the shutdown ends this run
GRACE = 20.0
RUN = dict(optimizer="sgd", lr=1e-4, steps=STEPS, progress=False)


def quadratic():
    g = GraphBuilder()
    w, c, a = g.input("w", (3,)), g.input("c", (3,)), g.input("a", (3,))
    d = (w - c).named("d")
    return (0.5 * (a * d * d).sum()).named("L")


def test_sigterm_ends_training_with_what_it_trained_finishes_evaluate_and_refuses_new_calls():
    slow = slow_graph(steps=3000)  # a second or more of work
    expected = LocalClient().evaluate(slow, x=0.5, values="none", grads="none").value
    outcome: dict[str, object] = {}
    training = threading.Event()

    with ServerProcess("--grace-seconds", str(GRACE), "--log-level", "INFO") as server:
        def train() -> None:
            with Client(server.address) as client:
                outcome["train"] = client.optimize(quadratic(), {"w": np.zeros(3)}, {"c": C, "a": A},
                                                   callback=lambda report: training.set(), **RUN)

        def evaluate() -> None:
            with Client(server.address, timeout=60) as client:
                outcome["evaluate"] = client.evaluate(slow, x=0.5, values="none", grads="none").value

        trainer = threading.Thread(target=train)
        trainer.start()
        assert training.wait(30)
        evaluator = threading.Thread(target=evaluate)
        evaluator.start()
        time.sleep(0.3)  # the Evaluate is computing
        assert evaluator.is_alive() and trainer.is_alive()

        server.send(signal.SIGTERM)
        signalled = time.monotonic()
        refused = grpc.StatusCode.OK
        for _ in range(100):  # new calls are refused once the listener closes, right after the signal
            refused = server_info(server.address)
            if refused == grpc.StatusCode.UNAVAILABLE:
                break
            assert refused in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED), refused  # see test_lifecycle
            time.sleep(0.02)
        assert refused == grpc.StatusCode.UNAVAILABLE
        with Client(server.address, timeout=5) as late, pytest.raises(Unavailable):
            late.server_info()

        trainer.join(GRACE)
        evaluator.join(GRACE)
        assert server.wait(GRACE) == 0, server.log()
        assert time.monotonic() - signalled < GRACE
        log = server.log()

    assert outcome["evaluate"] == expected  # the Evaluate in flight finished
    result = outcome["train"]
    assert result.stopped_early and not result.target_reached
    assert result.stop_reason == "the server's shutdown (SIGTERM)"
    assert 0 < result.steps < STEPS and len(result.losses) == result.steps
    assert result.history[-1].done and result.history[-1].step == result.steps
    # What it trained is a run of that many steps, bitwise.
    again = LocalClient().optimize(quadratic(), {"w": np.zeros(3)}, {"c": C, "a": A},
                                   **{**RUN, "steps": result.steps})
    np.testing.assert_array_equal(result.params["w"], again.params["w"])
    np.testing.assert_array_equal(result.losses, again.losses)
    assert result.loss == again.loss
    assert "1 training run told to stop early (the server's shutdown (SIGTERM))" in log
