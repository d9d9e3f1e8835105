"""Chooses the kernel behind `lte::sparse_ffn` for a device, dtype, mode and token count.

The op in `ops.py` calls `sparse_ffn_forward`; kernels plug in here, never in ops.py.

    device  mode  dtype             kernel
    cuda    hard  fp32/fp16/bf16    Triton (sparse_ffn_triton: decode path T <= 8, grouped above)
    cpu     hard  fp32/fp16/bf16    C++ (cpu.sparse_ffn_cpu; pure-torch fallback without a compiler)
    any     soft  any               reference: every expert is computed (gates scale, never skip),
                                    and dense BLAS/cuBLAS is the fastest way to compute them all
    any     any   float64, other    reference

`set_kernel("reference")` forces the reference everywhere (debugging, A/B checks).
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .reference import sparse_ffn_reference

_FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_forced: str | None = None


@contextlib.contextmanager
def set_kernel(name: str | None):
    """Within the block, use kernel `name` ("reference", "cpu", "torch", "triton") for every call."""
    global _forced
    if name not in (None, "reference", "cpu", "torch", "triton"):
        raise ValueError(f"kernel {name!r} is not reference|cpu|torch|triton")
    old, _forced = _forced, name
    try:
        yield
    finally:
        _forced = old


def choose_kernel(x: Tensor, w_up: Tensor, mode: str) -> str:
    """Name of the kernel `sparse_ffn_forward` runs for these inputs."""
    if _forced is not None:
        return _forced
    if mode != "hard" or x.dtype not in _FAST_DTYPES or w_up.dtype != x.dtype:
        return "reference"
    if x.is_cuda:
        return "triton"
    if x.device.type == "cpu":
        return "cpu"
    return "reference"


def sparse_ffn_forward(x: Tensor, gates: Tensor, w_up: Tensor, w_gate: Tensor | None,
                       w_down: Tensor, b_up: Tensor | None, b_gate: Tensor | None,
                       b_down: Tensor | None, act: str, expert_size: int, mode: str,
                       tau: float) -> Tensor:
    """Forward of the sparse FFN op on real tensors (same contract as the reference)."""
    args = (x, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, act, expert_size, mode, tau)
    kernel = choose_kernel(x, w_up, mode)
    if kernel == "cpu":
        from .cpu import sparse_ffn_cpu
        return sparse_ffn_cpu(*args)
    if kernel == "torch":
        from .cpu import sparse_ffn_torch
        return sparse_ffn_torch(*args)
    if kernel == "triton":
        from .sparse_ffn_triton import sparse_ffn_triton
        return sparse_ffn_triton(*args)
    return sparse_ffn_reference(*args)
