"""TensorSpec: the static shape and dtype of a value, as shape inference sees it."""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np


class TensorSpec(NamedTuple):
    """Shape and dtype of a tensor, known before anything is allocated."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @classmethod
    def of(cls, array: np.ndarray) -> "TensorSpec":
        return cls(tuple(array.shape), array.dtype)

    def __str__(self) -> str:
        return f"{self.dtype.name}{list(self.shape)}"
