"""Gradient-descent optimizers over dicts of numpy arrays: SGD with momentum, and Adam.

Each ``step(params, grads)`` returns new arrays and never writes into the
ones it was given, so a caller's initial values stay as they were and a step
stopped half-way leaves nothing half-updated. The arithmetic is plain numpy in
a fixed order, so the same run gives bitwise-identical parameters wherever it
runs (server or in-process). Values keep their dtype (float32 stays float32).
"""
from __future__ import annotations

import math
from typing import Mapping, Protocol

import numpy as np

from .errors import GraphError

Arrays = Mapping[str, np.ndarray]


class Optimizer(Protocol):
    """Turns the current parameters and their gradients into the next parameters."""

    def step(self, params: Arrays, grads: Arrays) -> dict[str, np.ndarray]: ...


def _invalid(field: str, message: str) -> GraphError:
    return GraphError(f"optimizer.{field}: {message}", field=f"optimizer.{field}", reason="BAD_OPTIMIZER")


def _check_rate(lr: float) -> float:
    if not lr > 0 or not np.isfinite(lr):
        raise _invalid("learning_rate", f"must be a finite number > 0, got {lr}")
    return float(lr)


def _check_unit(field: str, value: float) -> float:
    if not 0 <= value < 1:
        raise _invalid(field, f"must be in [0, 1), got {value}")
    return float(value)


class SGD:
    """Gradient descent, optionally with momentum (PyTorch's convention):

    ``v ← μ·v + g;  p ← p − lr·v``; with μ = 0 this is ``p ← p − lr·g``.
    """

    def __init__(self, lr: float, momentum: float = 0.0) -> None:
        self.lr = _check_rate(lr)
        self.momentum = _check_unit("momentum", momentum)
        self.velocity: dict[str, np.ndarray] = {}

    def step(self, params: Arrays, grads: Arrays) -> dict[str, np.ndarray]:
        updated = {}
        for name, p in params.items():
            g = grads[name]
            if self.momentum:
                g = self.velocity[name] = self.momentum * self.velocity.get(name, 0.0) + g
            updated[name] = p - self.lr * g
        return updated


class Adam:
    """Adam (Kingma & Ba, 2015) with bias correction, at step t = 1, 2, ...:

    ``m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²;
    m̂ = m / (1−β1^t);  v̂ = v / (1−β2^t);  p ← p − lr·m̂ / (√v̂ + ε)``.
    """

    def __init__(self, lr: float = 0.001, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> None:
        self.lr = _check_rate(lr)
        self.beta1 = _check_unit("beta1", beta1)
        self.beta2 = _check_unit("beta2", beta2)
        if not 0 < eps < math.inf:
            raise _invalid("epsilon", f"must be > 0 and finite, got {eps}")
        self.eps = float(eps)
        self.t = 0
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def step(self, params: Arrays, grads: Arrays) -> dict[str, np.ndarray]:
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        correct1, correct2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        updated = {}
        for name, p in params.items():
            g = grads[name]
            m = self.m[name] = b1 * self.m.get(name, 0.0) + (1 - b1) * g
            v = self.v[name] = b2 * self.v.get(name, 0.0) + (1 - b2) * (g * g)
            updated[name] = p - self.lr * (m / correct1) / (np.sqrt(v / correct2) + self.eps)
        return updated


def make_optimizer(kind: str, *, lr: float, momentum: float = 0.0, beta1: float | None = None,
                   beta2: float | None = None, eps: float | None = None) -> Optimizer:
    """An optimizer by name ("sgd" or "adam"); unset Adam settings take their usual defaults."""
    if kind == "sgd":
        for field, value in (("beta1", beta1), ("beta2", beta2), ("epsilon", eps)):
            if value is not None:
                raise _invalid(field, "is an Adam setting; kind is 'sgd'")
        return SGD(lr, momentum)
    if kind == "adam":
        if momentum:
            raise _invalid("momentum", "is an SGD setting; kind is 'adam' (use beta1)")
        return Adam(lr, 0.9 if beta1 is None else beta1, 0.999 if beta2 is None else beta2,
                    1e-8 if eps is None else eps)
    raise _invalid("kind", f"expected 'sgd' or 'adam', got {kind!r}")
