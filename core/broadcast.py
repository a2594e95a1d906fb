"""Broadcasting helpers shared by the engine and the operator families."""
from __future__ import annotations

import numpy as np

from .errors import OpError


def broadcast_shapes(*shapes: tuple[int, ...]) -> tuple[int, ...]:
    """numpy's broadcast of ``shapes``, or OpError naming the shapes that clash."""
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        listed = " and ".join(str(tuple(s)) for s in shapes)
        raise OpError(f"shapes {listed} cannot be broadcast together", reason="SHAPE_MISMATCH") from None


def unbroadcast(grad: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum ``grad`` over the axes that broadcasting added or stretched to reach ``shape``.

    This undoes broadcasting in the backward pass: an input of shape (3, 1)
    used as (2, 3, 4) receives the sum of its gradient over axes 0 and 2.
    Raises ValueError when ``grad`` cannot have come from ``shape`` by broadcasting.
    """
    grad = np.asarray(grad)
    extra = grad.ndim - len(shape)
    if extra < 0:
        raise ValueError(f"gradient of shape {grad.shape} has fewer axes than its input {shape}")
    if extra:
        grad = grad.sum(axis=tuple(range(extra)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    if grad.shape != tuple(shape):
        raise ValueError(f"gradient of shape {grad.shape} does not fit its input {tuple(shape)}")
    return grad
