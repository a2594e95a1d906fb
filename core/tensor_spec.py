"""TensorSpec: the static shape and dtype of a value, as shape inference sees it."""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np


#: Most dimensions a tensor may have: numpy 1's limit, kept though numpy 2 allows 64.
MAX_RANK = 32
_MAX_BYTES = int(np.iinfo(np.intp).max)


def shape_text(shape: tuple[int, ...] | list[int]) -> str:
    """A shape for an error message: whole up to MAX_RANK dimensions, else its start and its rank,
    since a request may carry millions and the message must fit in gRPC's 8 KiB of trailers."""
    shape = list(shape)
    if len(shape) <= MAX_RANK:
        return str(shape)
    return f"[{', '.join(map(str, shape[:4]))}, ... ({len(shape)} dimensions)]"


def unrepresentable(shape: tuple[int, ...], itemsize: int) -> str | None:
    """Why numpy could not create an array of ``shape`` (even an empty one), or None.

    numpy refuses more than its maximum number of dimensions, and sizes whose
    nonzero dimensions multiply past its address range even when another
    dimension is 0; both must be refused as bad requests before numpy sees them.
    """
    if len(shape) > MAX_RANK:
        return f"{len(shape)} dimensions; at most {MAX_RANK} are supported"
    if math.prod(max(n, 1) for n in shape) * itemsize > _MAX_BYTES:
        return "dimensions too large to address, even with a zero-sized dimension"
    return None


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
