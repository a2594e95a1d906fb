"""Resource limits for one request, with safe defaults."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """What one graph evaluation may use. Checked from shape inference, before allocation."""

    #: Operator nodes in a graph (declared inputs not counted).
    max_nodes: int = 1_000_000
    #: Elements in any one tensor (inputs, values, gradients).
    max_tensor_elements: int = 1 << 28
    #: Bytes of all values and gradients of one evaluation together.
    max_memory_bytes: int = 4 << 30
