"""Chooses the kernel behind `lte::sparse_ffn` for a device, dtype, mode and token count.

The op in `ops.py` calls `sparse_ffn_forward`; kernels plug in here, never in ops.py.

    device  mode  dtype             kernel
    cuda    hard  fp32/fp16/bf16    Triton (sparse_ffn_triton: decode path T <= 8, grouped above)
    cpu     hard  fp32/fp16/bf16    C++ (cpu.sparse_ffn_cpu; pure-torch fallback without a compiler),
                                    except compute-bound batches (T >= 32) whose density of used
                                    (token, expert) pairs is above CPU_DENSE_ABOVE: the reference
                                    (dense MKL/oneDNN, then masked) is faster there; bf16 has a
                                    higher threshold where the kernel has its AVX512-BF16 path
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
# Measured (kernels/bench.py, 2-core AMD EPYC, small and 7B shapes, T = 128 and 512): per used
# pair the C++ kernel's fp32-FMA path costs about 2x a dense fp32 MKL GEMM and 5-10x a bf16
# oneDNN GEMM (which uses AVX512-BF16 dot products), so it wins at batch only below these pair
# densities.
CPU_BATCH_T = 32
CPU_DENSE_ABOVE = {torch.float32: 0.5, torch.bfloat16: 0.15, torch.float16: 0.15}
# bf16 where the kernel has its own AVX512-BF16 path (cpu.bf16_dot_available()): per used pair it
# costs about 1.3-1.5x oneDNN's dense bf16 GEMM (benchmarks/RESULTS.md, bf16 section), so dense
# wins only above this density.
CPU_DENSE_ABOVE_BF16_DOT = 0.6
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


def _cpu_dense_above(dtype: torch.dtype) -> float:
    if dtype == torch.bfloat16:
        from .cpu import bf16_dot_available
        if bf16_dot_available():
            return CPU_DENSE_ABOVE_BF16_DOT
    return CPU_DENSE_ABOVE[dtype]


def choose_kernel(x: Tensor, w_up: Tensor, mode: str, gates: Tensor | None = None,
                  tau: float = 0.5) -> str:
    """Name of the kernel `sparse_ffn_forward` runs for these inputs (gates: for the CPU batch rule)."""
    if _forced is not None:
        return _forced
    if mode != "hard" or x.dtype not in _FAST_DTYPES or w_up.dtype != x.dtype:
        return "reference"
    if x.is_cuda:
        return "triton"
    if x.device.type == "cpu":
        if gates is not None and x.shape[0] >= CPU_BATCH_T:
            density = (gates > tau).float().mean().item()  # CPU: no device sync to worry about
            if density > _cpu_dense_above(x.dtype):
                return "reference"
        return "cpu"
    return "reference"


def sparse_ffn_forward(x: Tensor, gates: Tensor, w_up: Tensor, w_gate: Tensor | None,
                       w_down: Tensor, b_up: Tensor | None, b_gate: Tensor | None,
                       b_down: Tensor | None, act: str, expert_size: int, mode: str,
                       tau: float) -> Tensor:
    """Forward of the sparse FFN op on real tensors (same contract as the reference)."""
    args = (x, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, act, expert_size, mode, tau)
    kernel = choose_kernel(x, w_up, mode, gates, tau)
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
