"""CPU sparse FFN: the C++ gathered kernel (built once per machine) and a pure-torch fallback.

Letters: T tokens, d model dim, d_out output dim, E experts, B expert size, N = E*B, s sparsity.

Contract: `reference.sparse_ffn_reference` (same signature). Kernel: `csrc/sparse_ffn_cpu.cpp`.
Benchmark: `python benchmarks/bench_kernels.py`.

The extension is compiled with `torch.utils.cpp_extension.load` on first use (~20-40 s cold) into
torch's default extensions dir (`~/.cache/torch_extensions/<py>_<cpu>/lte_sparse_ffn_cpu_<isa>`,
or `$TORCH_EXTENSIONS_DIR`). torch keys the build on the name, source and flags, so later processes
load the cached `.so` in ~10 ms, and concurrent processes wait on torch's file lock instead of
building twice. The ISA (`isa()`: avx512bf16 | avx512 | avx2 | x86-64, from the CPU's flags) is in
the name and picks explicit `-march` levels, so a cache shared between machines never loads a
build for another CPU. `-fopenmp` at compile time only, so `at::parallel_for` runs in parallel;
nothing links a second libgomp (a second OpenMP runtime stalls torch ops), the OpenMP calls bind
to the one torch loaded.

bf16 x and weights (any T) use AVX512-BF16 dot-product micro-kernels where the CPU and compiler
have them (`bf16_dot_available()`), fp32 FMAs otherwise.

When no compiler is available (or the build fails), `sparse_ffn_torch` is used with a warning:
it is grouped by expert too, but pays one torch call per active expert.

Importing this module registers the dispatch kernels "cpu" (`sparse_ffn_cpu`), "dense"
(`dense_masked_ffn`: dense GEMMs + one fused epilogue, measured dispatch's safe path) and "torch"
(`sparse_ffn_torch`); `dispatch` imports it on first lookup of any.
"""
from __future__ import annotations

import functools
import os
import platform
import shutil
import warnings

import torch
import torch.nn.functional as F
import torch.utils.weak
from torch import Tensor

from .dispatch import register_kernel
from .reference import activation, expert_scale, sparse_ffn_reference

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "sparse_ffn_cpu.cpp")
_EXT_NAME = "lte_sparse_ffn_cpu"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _cpuinfo(key: str) -> str | None:
    """The first `key : value` line of Linux's /proc/cpuinfo (None elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (`/proc/cpuinfo`), empty elsewhere."""
    return frozenset((_cpuinfo("flags") or "").split())


def cpu_name() -> str:
    """The CPU's model name (benchmark headers, the dispatch cache's machine key)."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def machine_summary() -> str:
    """'CPU: <name>; kernel ISA <tag>; vector flags: ...; N threads; torch <version>' (benchmark headers)."""
    vec = " ".join(sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c"))))
    return (f"CPU: {cpu_name()}; kernel ISA {isa()[0]}; vector flags: {vec}; {torch.get_num_threads()} "
            f"threads; torch {torch.__version__}{isa_limits()}")


def isa_limits() -> str:
    """'; ISA limited by K=V ...' for the ISA-lowering variables set in this process, else ''
    (benchmark headers: the vector flags then say more than what ran)."""
    limits = " ".join(f"{k}={os.environ[k]}" for k in (ENV_ISA, *TORCH_ISA_ENVS) if os.environ.get(k))
    return f"; ISA limited by {limits}" if limits else ""


_AVX512 = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"})
_AVX2 = frozenset({"avx2", "fma", "f16c", "bmi1", "bmi2", "movbe"})
# x86-64 kernel ISAs, lowest first, with their compiler flags. GCC's AMD/Intel tunings prefer
# 256-bit vectors; the kernel's vector types are 512-bit, and splitting them doubles the bf16
# conversion work, hence -mprefer-vector-width=512.
_X86_ISAS = {
    "x86-64": ("-march=x86-64",),
    "avx2": ("-march=x86-64-v3",),
    "avx512": ("-march=x86-64-v4", "-mprefer-vector-width=512"),
    "avx512bf16": ("-march=x86-64-v4", "-mavx512bf16", "-mprefer-vector-width=512"),
}
ENV_ISA = "LTE_CPU_ISA"
# What restricts torch's own kernels the same way (benchmark headers print them when set).
TORCH_ISA_ENVS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def _detected_isa(flags: frozenset[str]) -> str:
    if _AVX512 <= flags and "avx512_bf16" in flags:
        return "avx512bf16"
    if _AVX512 <= flags:
        return "avx512"
    return "avx2" if _AVX2 <= flags else "x86-64"


@functools.lru_cache(maxsize=1)
def isa() -> tuple[str, tuple[str, ...]]:
    """(tag, -march flags) of the vector ISA this CPU runs the kernel with.

    The tag is part of the extension's name, so torch's build cache (keyed on the name, sources
    and flags, not on the CPU) never hands a .so built for one ISA to a CPU of another: a build
    for AVX-512 loaded on an AVX2-only CPU is undefined behaviour. Explicit ISA levels instead of
    -march=native keep the flags, and so the cache key, a function of the ISA alone.

    LTE_CPU_ISA=<tag> lowers it (x86-64 | avx2 | avx512 | avx512bf16, at most what the CPU has;
    x86 only): an AVX-512 machine builds and tests the AVX2 kernel
    (tests/kernels/test_cpu_lower_isa.py), and with ONEDNN_MAX_CPU_ISA / MKL_ENABLE_INSTRUCTIONS
    benchmarks it against AVX2 GEMMs (ATEN_CPU_CAPABILITY=avx2 also limits Inductor's code, whose
    8-layer fp32 prefill then gave NaN on torch 2.13: benchmarks/RESULTS.md, session 9).
    """
    if platform.machine() not in ("x86_64", "AMD64"):
        return "native", ("-march=native",)
    tag = _detected_isa(cpu_flags())
    wanted = os.environ.get(ENV_ISA, "").strip().lower()
    if wanted:
        order = list(_X86_ISAS)
        if wanted not in _X86_ISAS:
            raise ValueError(f"{ENV_ISA}={wanted!r} is not one of {'|'.join(order)}; unset it to use "
                             f"what this CPU has ({tag})")
        if order.index(wanted) > order.index(tag):
            raise ValueError(f"{ENV_ISA}={wanted!r} asks for more than this CPU has ({tag}): a kernel "
                             f"built for it would crash here; use {tag} or lower, or unset it")
        tag = wanted
    return tag, _X86_ISAS[tag]


def _cflags() -> list[str]:
    # -fopenmp at compile time only: ATen's at::parallel_for is header-inline and is serial unless
    # _OPENMP is defined (ParallelOpenMP.h). Nothing links libgomp: the GOMP_* symbols resolve to
    # the libgomp torch already loaded, so there is one OpenMP pool (a second runtime beside
    # torch's oversubscribes the cores and stalls torch ops).
    return ["-O3", *isa()[1], "-fopenmp"]


@functools.lru_cache(maxsize=1)
def load_extension():
    """The compiled C++ module, or None (with one warning) if it cannot be built here."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        warnings.warn(f"lte_compile: no C++ compiler ({cxx!r} not on PATH); the CPU sparse FFN "
                      "uses the slower pure-torch path. Install g++ to get the fast kernel.",
                      RuntimeWarning, stacklevel=2)
        return None
    tag = isa()[0]  # outside the try: a bad LTE_CPU_ISA is the user's error to see, not a fallback
    try:
        from torch.utils.cpp_extension import load
        return load(name=f"{_EXT_NAME}_{tag.replace('-', '_')}", sources=[_SOURCE], extra_cflags=_cflags(),
                    verbose=False)
    except Exception as e:  # a broken toolchain must not break the op: fall back, loudly
        warnings.warn(f"lte_compile: building the CPU sparse FFN kernel failed ({type(e).__name__}: "
                      f"{e}); using the slower pure-torch path.", RuntimeWarning, stacklevel=2)
        return None


def extension_available() -> bool:
    """True if the C++ kernel is built (builds it on first call)."""
    return load_extension() is not None


def bf16_dot_available() -> bool:
    """True if bf16 batches run on the kernel's AVX512-BF16 (`vdpbf16ps`) micro-kernels: the
    extension is built for the avx512bf16 ISA (`isa()`) and the CPU has it."""
    ext = load_extension()
    return ext is not None and bool(getattr(ext, "bf16_dot_kernel", lambda: False)())


@register_kernel("cpu")
def sparse_ffn_cpu(x: Tensor, gates: Tensor, w_up: Tensor, w_gate: Tensor | None, w_down: Tensor,
                   b_up: Tensor | None, b_gate: Tensor | None, b_down: Tensor | None, act: str,
                   expert_size: int, mode: str, tau: float) -> Tensor:
    """C++ launcher. x: [T, d], gates: [T, E], w_up/w_gate: [N, d], w_down: [N, d_out] -> [T, d_out].

    Weights with a non-unit last stride (e.g. `w_down = linear.weight.t()`) are copied by the
    kernel on every call (a full weight read+write): store them in kernel layout instead.
    """
    ext = load_extension()
    if ext is None:
        return sparse_ffn_torch(x, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, act,
                                expert_size, mode, tau)
    return ext.sparse_ffn_cpu(x, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, act,
                              expert_size, mode, float(tau))


def routed_sparse_ffn_cpu(x: Tensor, w_r: Tensor, b_r: Tensor | None, w_up: Tensor, w_gate: Tensor | None,
                          w_down: Tensor, b_up: Tensor | None, b_gate: Tensor | None, b_down: Tensor | None,
                          act: str, expert_size: int, tau: float) -> tuple[Tensor, Tensor] | None:
    """Router and FFN in one C++ call (hard mode): (y [T, d_out], gates = sigmoid(x w_r^T + b_r)
    [T, E] fp32); None without the extension (the caller computes the gates itself then)."""
    ext = load_extension()
    if ext is None:
        return None
    return ext.routed_sparse_ffn_cpu(x, w_r, b_r, w_up, w_gate, w_down, b_up, b_gate, b_down, act,
                                     expert_size, float(tau))


def route_cpu(x: Tensor, w_r: Tensor, b_r: Tensor | None, tau: float) -> tuple[Tensor, float, bool] | None:
    """The router in one C++ call: (gates = sigmoid(x w_r^T + b_r) [T, E] fp32, density of the
    pairs with gate > tau, whether x is finite); None without the extension."""
    ext = load_extension()
    if ext is None:
        return None
    gates, used, finite = ext.route_cpu(x, w_r, b_r, float(tau))
    return gates, used / max(1, gates.numel()), finite


@register_kernel("dense")
def dense_masked_ffn(x: Tensor, gates: Tensor, w_up: Tensor, w_gate: Tensor | None, w_down: Tensor,
                     b_up: Tensor | None, b_gate: Tensor | None, b_down: Tensor | None, act: str,
                     expert_size: int, mode: str, tau: float) -> Tensor:
    """Every expert through dense MKL/oneDNN GEMMs, then the mask: the reference's math at
    Inductor's dense cost (one fused act * up * mask pass in C++ instead of three [T, N] ones).
    What measured dispatch falls back to where the gathered kernel is slower; the reference
    itself without the extension."""
    ext = load_extension()
    if ext is None:
        return sparse_ffn_reference(x, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, act,
                                    expert_size, mode, tau)
    return ext.dense_masked_ffn(x, gates, w_up, w_gate, _down_for_gemm(w_down), b_up, b_gate, b_down, act,
                                expert_size, mode, float(tau))


# 16-bit W_down^T [N, d_out] row-major (the kernels' layout) -> a [d_out, N] row-major copy, per
# weight storage (rebuilt when the weight's version counter, pointer, shape or strides change).
_DOWN_NT: "torch.utils.weak.WeakIdKeyDictionary" = torch.utils.weak.WeakIdKeyDictionary()
ENV_NT_COPY = "LTE_DENSE_NT_COPY"


def _down_for_gemm(w_down: Tensor) -> Tensor:
    """W_down^T for the dense fallback's down GEMM: in bf16/fp16 (inference only), a view of a
    transposed copy, so oneDNN runs h @ W_down^T as an NT GEMM, Inductor's own layout (NN on the
    kernels' layout is 1.4x slower at T = 16, benchmarks/RESULTS.md). Costs a third of the FFN's
    weight bytes, for the layers whose calls take this path; LTE_DENSE_NT_COPY=0 turns it off."""
    if (w_down.dtype not in (torch.bfloat16, torch.float16) or torch.is_grad_enabled()
            or w_down.stride(1) != 1 or os.environ.get(ENV_NT_COPY, "1") == "0"):
        return w_down
    # Keyed by the storage: compiled graphs pass a new view object of the weight in every call,
    # while torch keeps one Python object per live storage.
    owner = w_down.untyped_storage()
    hit = _DOWN_NT.get(owner)
    key = (w_down._version, w_down.data_ptr(), tuple(w_down.shape), tuple(w_down.stride()))
    if hit is None or hit[0] != key:
        hit = (key, w_down.t().contiguous())
        _DOWN_NT[owner] = hit
    return hit[1].t()


@register_kernel("torch")
def sparse_ffn_torch(x: Tensor, gates: Tensor, w_up: Tensor, w_gate: Tensor | None, w_down: Tensor,
                     b_up: Tensor | None, b_gate: Tensor | None, b_down: Tensor | None, act: str,
                     expert_size: int, mode: str, tau: float) -> Tensor:
    """Pure-torch gathered sparse FFN grouped by expert (the no-compiler fallback; any device).

    For each expert used by any token: gather its tokens, run its B neurons as a small dense FFN,
    scatter-add the result. Reads only used experts' weights, at one torch call per step. Syncs
    with the host (`nonzero`): not for CUDA graphs.
    """
    T, E = gates.shape
    B = expert_size
    scale = expert_scale(gates, mode, tau, torch.float32)  # [T, E]
    y = x.new_zeros(T, w_down.shape[1], dtype=torch.float32)
    pairs = scale.t().nonzero()  # [P, 2] of (expert, token), grouped by expert, tokens ascending
    if pairs.numel():
        counts = torch.bincount(pairs[:, 0], minlength=E).tolist()
        toks_by_e = pairs[:, 1].split(counts)
        xf = x.float()
        for e, toks in enumerate(toks_by_e):
            if toks.numel() == 0:
                continue
            rows = slice(e * B, (e + 1) * B)
            xe = xf.index_select(0, toks)  # [n_e, d]
            a = F.linear(xe, w_up[rows].float(), None if b_up is None else b_up[rows].float())
            if w_gate is None:
                h = activation(act, a)
            else:
                g = F.linear(xe, w_gate[rows].float(), None if b_gate is None else b_gate[rows].float())
                h = activation(act, g) * a  # [n_e, B]
            h = h * scale[toks, e].unsqueeze(1)
            y.index_add_(0, toks, h @ w_down[rows].float())  # [n_e, d_out]
    if b_down is not None:
        y += b_down.float()
    return y.to(x.dtype)
