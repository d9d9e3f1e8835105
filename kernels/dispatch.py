"""Chooses the kernel behind `lte::sparse_ffn` for a device, dtype and mode.

The op in `ops.py` calls `sparse_ffn_forward`; kernels plug in here, never in ops.py.
"""
from __future__ import annotations

from torch import Tensor

from .reference import sparse_ffn_reference


def sparse_ffn_forward(x: Tensor, gates: Tensor, w_up: Tensor, w_gate: Tensor | None,
                       w_down: Tensor, b_up: Tensor | None, b_gate: Tensor | None,
                       b_down: Tensor | None, act: str, expert_size: int, mode: str,
                       tau: float) -> Tensor:
    """Forward of the sparse FFN op on real tensors (same contract as the reference)."""
    return sparse_ffn_reference(x, gates, w_up, w_gate, w_down, b_up, b_gate, b_down,
                                act, expert_size, mode, tau)
