"""Chooses the kernel behind `lte::sparse_ffn` for a device, dtype, mode and token count.

The op in `ops.py` calls `sparse_ffn_forward`; kernels plug in here, never in ops.py. Two parts:
`choose_kernel` (the decision: a kernel name) and a name -> kernel table that kernel modules fill
with `register_kernel` when imported. A kernel has the signature of `sparse_ffn_reference`.
`cpu.py` registers "cpu", "dense" and "torch", `sparse_ffn_triton.py` "triton" and "dense_triton";
they are imported on first lookup only (`_PROVIDERS`), so CPU-only use never imports triton.

    device  mode  dtype             kernel
    cuda    hard  fp32/fp16/bf16    T = 1: Triton (sparse_ffn_triton's decode path); larger T:
                                    "reference" (cuBLAS for every expert, then the mask), by
                                    `cuda_rule`, measured on an H200 ("dense_triton", the mask
                                    fused into the act * up pass, awaits its GPU measurement)
    cpu     hard  fp32/fp16/bf16    T <= 4: C++ (cpu.sparse_ffn_cpu; pure-torch fallback without a
                                    compiler). Larger T: C++ or "dense" (cpu.dense_masked_ffn: dense
                                    MKL/oneDNN GEMMs, one fused act*up*mask pass), whichever was
                                    faster when both were timed on this machine for this shape
                                    bucket (`autotune.py`: measured once, cached per machine and
                                    torch/kernel version). With autotuning off (LTE_AUTOTUNE=0) or
                                    for tiny problems, the constant rule: "dense" for batches
                                    (T >= CPU_BATCH_T) whose density of used (token, expert) pairs
                                    is above CPU_DENSE_ABOVE
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

from . import autotune
from .reference import nan_rows_like_eager, sparse_ffn_reference

Kernel = Callable[..., Tensor]  # the signature of reference.sparse_ffn_reference

_FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The constant CPU rule (autotuning off, or problems too small to time): batch thresholds measured with benchmarks/bench_kernels.py (figures and
# machines in benchmarks/RESULTS.md): per used (token, expert) pair the C++ kernel's fp32-FMA path
# costs more than a dense MKL (fp32) or oneDNN (bf16, AVX512-BF16 dot products) GEMM, so from
# CPU_BATCH_T tokens on it wins only below these pair densities.
CPU_BATCH_T = 32
CPU_DENSE_ABOVE = {torch.float32: 0.5, torch.bfloat16: 0.15, torch.float16: 0.15}
# bf16 where the kernel has its own AVX512-BF16 path (cpu.bf16_dot_available()): closer to
# oneDNN's dense bf16 GEMM per used pair (benchmarks/RESULTS.md), so dense wins only above this.
CPU_DENSE_ABOVE_BF16_DOT = 0.6
# Batches up to this many tokens run the router in C++ (kernels/cpu.py route_cpu): there it is a
# few GEMVs over the router's E x d weights, where the torch router's calls and passes cost more
# than its math (TinyLlama bf16 at T = 16: see benchmarks/RESULTS.md session 10). Larger batches
# are GEMMs, MKL's to run.
ROUTER_CPP_MAX_T = 64

# name -> kernel; filled by register_kernel (the reference here, the others by their modules).
_KERNELS: dict[str, Kernel] = {"reference": sparse_ffn_reference}
# name -> the module (relative to this package) whose import registers it: imported on first use.
_PROVIDERS = {"cpu": ".cpu", "dense": ".cpu", "torch": ".cpu", "triton": ".sparse_ffn_triton",
              "dense_triton": ".sparse_ffn_triton"}
_forced: str | None = None
# Kernels registered with nan_policy=True. The reference computes the eager masked FFN's own math
# (h * mask, then h @ W_down^T), whose rows are non-finite wherever x's are: the policy holds by
# construction (three kernels fewer per call on a GPU).
_APPLIES_NAN_POLICY: set[str] = {"reference"}


def register_kernel(name: str, fn: Kernel | None = None, *, nan_policy: bool = False):
    """Adds kernel `fn` under `name` (replacing any previous one); usable as a decorator.
    nan_policy=True: the kernel itself makes the rows of y whose x has a NaN/Inf NaN (the ops' NaN
    policy, `nan_rows_like_eager`), so `sparse_ffn_forward` does not pass over x and y again."""
    if fn is None:
        return lambda f: register_kernel(name, f, nan_policy=nan_policy)
    _KERNELS[name] = fn
    (_APPLIES_NAN_POLICY.add if nan_policy else _APPLIES_NAN_POLICY.discard)(name)
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


def constant_rule(dtype: torch.dtype, T: int, density: float) -> str:
    """The CPU choice without measurements (thresholds measured on one AVX-512 machine)."""
    if T >= CPU_BATCH_T and density > _cpu_dense_above(dtype):
        return "dense"
    return "cpu"


def _density(gates: Tensor, tau: float) -> float:
    return (gates > tau).float().mean().item()  # CPU: no device sync to worry about


def choose_kernel(x: Tensor, w_up: Tensor, mode: str, gates: Tensor | None = None,
                  tau: float = 0.5, *, w_gate: Tensor | None = None, w_down: Tensor | None = None,
                  run: Callable[[str], Tensor] | None = None) -> str:
    """Name of the kernel `sparse_ffn_forward` runs for these inputs.

    CPU hard mode with gates and T > autotune.SMALL_T: the measured decision of this shape bucket
    (w_gate / w_down complete the bucket; without w_down, d_out = d is assumed). If the bucket
    has none yet, `run(name)` (the call itself, by kernel name) is timed to make one; without
    `run`, the constant rule answers (`sparse_ffn_forward` passes `run` and reuses the output of
    the timed winner, so the call that measures is not computed once more).
    """
    return _choose(x, w_up, mode, gates, tau, w_gate, w_down, run)[0]


def _choose(x, w_up, mode, gates, tau, w_gate, w_down, run, density=None) -> tuple[str, Tensor | None]:
    if _forced is not None:
        return _forced, None
    if mode != "hard" or x.dtype not in _FAST_DTYPES or w_up.dtype != x.dtype:
        return "reference", None
    if x.is_cuda:
        return cuda_rule(x.shape[0]), None
    if x.device.type != "cpu":
        return "reference", None
    T = x.shape[0]
    if gates is None or T <= autotune.SMALL_T:
        return "cpu", None  # memory-bound decode: the gathered kernel reads a subset of the bytes
    density = _density(gates, tau) if density is None else density
    n, d = w_up.shape
    if not autotune.enabled() or T * n * d < autotune.MIN_WORK or gates.shape[1] == 0 or n % gates.shape[1]:
        return constant_rule(x.dtype, T, density), None
    d_out = d if w_down is None else w_down.shape[1]
    key = autotune.bucket(x.dtype, d, d_out, n, n // gates.shape[1], w_gate is not None, T, density)
    tuner = autotune.tuner()
    hit = tuner.lookup(key)
    if hit is not None:
        return hit, None
    if run is None:
        return constant_rule(x.dtype, T, density), None
    return tuner.measure(key, run)


def cuda_rule(T: int) -> str:
    """The CUDA choice: the Triton kernel for a single token, every expert through cuBLAS then the
    mask (`reference`) otherwise. Its separate act, multiply and mask passes cost 5-7 % over dense
    at T = 4-2048 (benchmarks/RESULTS.md); `dense_triton` fuses them into one pass (tested in the
    interpreter, not yet on a GPU: bench_kernels' "dense + fused mask" column is the measurement
    that should move batches to it). Measured on an H200 (benchmarks/RESULTS.md, GPU section) in GPU
    time (CUDA graphs): at T = 1 the decode kernels beat cuBLAS from s = 0.5 on; from T = 4 on
    the decode path, and the grouped path's first design at every T, lost to cuBLAS at every s.
    Its current design (up tiles into h, one dense down GEMM) loses below T = 2048 at
    every s (0.46-0.53x at T = 16 / 128) and wins only at T = 2048 with s >= 0.75 (1.02x / 1.22x at
    s = 0.75 / 0.9, 0.58x / 0.79x at s = 0 / 0.5): a density this rule cannot see. Not timed per
    machine as on the CPU: the density cannot be read without a host sync in every call (CUDA
    graphs forbid it), and host-timed trials measure launch overhead, which graphs remove (tried:
    they picked cuBLAS at T = 1, 0.096 ms in graph replay against the kernels' 0.075 at s = 0.5)."""
    return "triton" if T == 1 else "reference"


def sparse_ffn_forward(x: Tensor, gates: Tensor, w_up: Tensor, w_gate: Tensor | None,
                       w_down: Tensor, b_up: Tensor | None, b_gate: Tensor | None,
                       b_down: Tensor | None, act: str, expert_size: int, mode: str,
                       tau: float, *, density: float | None = None, finite: bool | None = None) -> Tensor:
    """Forward of the sparse FFN op on real tensors (same contract as the reference), under the
    ops' NaN policy (rows of y whose x has a NaN/Inf are NaN, as in the eager masked FFN).
    `density` (of the pairs above tau) and `finite` (x has no NaN/Inf): where the caller already
    knows them (the C++ router counts both), the choice and the NaN policy skip their passes."""
    args = (x, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, act, expert_size, mode, tau)
    name, out = _choose(x, w_up, mode, gates, tau, w_gate, w_down, lambda k: get_kernel(k)(*args), density)
    y = out if out is not None else get_kernel(name)(*args)
    if name in _APPLIES_NAN_POLICY or finite:
        return y
    return nan_rows_like_eager(x, y)


def routed_sparse_ffn_forward(x: Tensor, w_r: Tensor, b_r: Tensor | None, w_up: Tensor,
                              w_gate: Tensor | None, w_down: Tensor, b_up: Tensor | None,
                              b_gate: Tensor | None, b_down: Tensor | None, act: str,
                              expert_size: int, tau: float) -> tuple[Tensor, Tensor]:
    """The router G = sigmoid(x w_r^T + b_r) and the hard-mode FFN on G: (y, G), y under the ops'
    NaN policy (`nan_rows_like_eager`).

    Where `_choose` would pick the C++ kernel without looking at the gates (CPU decode, T <=
    autotune.SMALL_T), one C++ call computes both. For small batches (T <= ROUTER_CPP_MAX_T) the
    C++ router computes the gates, their density and x's finiteness in one call, then
    `sparse_ffn_forward`'s choice runs on them; elsewhere the router runs as torch ops."""
    T = x.shape[0]
    if (_forced is None and x.device.type == "cpu" and T <= ROUTER_CPP_MAX_T
            and x.dtype in _FAST_DTYPES and w_up.dtype == x.dtype and w_r.dtype == torch.float32):
        from .cpu import route_cpu, routed_sparse_ffn_cpu
        if T <= autotune.SMALL_T:
            out = routed_sparse_ffn_cpu(x, w_r, b_r, w_up, w_gate, w_down, b_up, b_gate, b_down, act,
                                        expert_size, tau)
            if out is not None:
                return out
        else:
            routed = route_cpu(x, w_r, b_r, tau)
            if routed is not None:
                gates, density, finite = routed
                return sparse_ffn_forward(x, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, act, expert_size,
                                          "hard", tau, density=density, finite=finite), gates
    gates = torch.sigmoid(torch.nn.functional.linear(x.to(w_r.dtype), w_r, b_r))
    y = sparse_ffn_forward(x, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, act, expert_size, "hard", tau)
    return y, gates
