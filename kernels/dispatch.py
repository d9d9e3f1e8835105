"""Chooses the kernel behind `lte::sparse_ffn` for a device, dtype, mode and token count.

The op in `ops.py` calls `sparse_ffn_forward`; kernels plug in here, never in ops.py. Two parts:
`choose_kernel` (the decision: a kernel name) and a name -> kernel table that kernel modules fill
with `register_kernel` when imported. A kernel has the signature of `sparse_ffn_reference`.
`cpu.py` registers "cpu" and "torch", `sparse_ffn_triton.py` "triton"; they are imported on first
lookup only (`_PROVIDERS`), so CPU-only use never imports triton.

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

`set_kernel("reference")` forces the reference everywhere (debugging, A/B checks); any registered
name can be forced the same way (a new kernel under test).
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Callable

import torch
from torch import Tensor

from .reference import sparse_ffn_reference

Kernel = Callable[..., Tensor]  # the signature of reference.sparse_ffn_reference

_FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Batch thresholds of the CPU rule, measured with benchmarks/bench_kernels.py (figures and
# machines in benchmarks/RESULTS.md): per used (token, expert) pair the C++ kernel's fp32-FMA path
# costs more than a dense MKL (fp32) or oneDNN (bf16, AVX512-BF16 dot products) GEMM, so from
# CPU_BATCH_T tokens on it wins only below these pair densities.
CPU_BATCH_T = 32
CPU_DENSE_ABOVE = {torch.float32: 0.5, torch.bfloat16: 0.15, torch.float16: 0.15}
# bf16 where the kernel has its own AVX512-BF16 path (cpu.bf16_dot_available()): closer to
# oneDNN's dense bf16 GEMM per used pair (benchmarks/RESULTS.md), so dense wins only above this.
CPU_DENSE_ABOVE_BF16_DOT = 0.6

# name -> kernel; filled by register_kernel (the reference here, the others by their modules).
_KERNELS: dict[str, Kernel] = {"reference": sparse_ffn_reference}
# name -> the module (relative to this package) whose import registers it: imported on first use.
_PROVIDERS = {"cpu": ".cpu", "torch": ".cpu", "triton": ".sparse_ffn_triton"}
_forced: str | None = None


def register_kernel(name: str, fn: Kernel | None = None):
    """Adds kernel `fn` under `name` (replacing any previous one); usable as a decorator."""
    if fn is None:
        return lambda f: register_kernel(name, f)
    _KERNELS[name] = fn
    return fn


def kernel_names() -> tuple[str, ...]:
    """Every kernel name `set_kernel` accepts (registered, or registered by a module on import)."""
    return tuple(sorted({*_KERNELS, *_PROVIDERS}))


def get_kernel(name: str) -> Kernel:
    """The kernel registered as `name`, importing the module that provides it on first use."""
    if name not in _KERNELS and name in _PROVIDERS:
        importlib.import_module(_PROVIDERS[name], __package__)
    try:
        return _KERNELS[name]
    except KeyError:
        raise ValueError(f"kernel {name!r} is not one of {'|'.join(kernel_names())}") from None


@contextlib.contextmanager
def set_kernel(name: str | None):
    """Within the block, use kernel `name` (one of `kernel_names()`; None: choose) for every call."""
    global _forced
    if name is not None and name not in kernel_names():
        raise ValueError(f"kernel {name!r} is not {'|'.join(kernel_names())}")
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
    kernel = get_kernel(choose_kernel(x, w_up, mode, gates, tau))
    return kernel(x, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, act, expert_size, mode, tau)
