"""Benchmark: dense FFN vs the LTE sparse FFN op, side by side, with the ideal 1/(1-s) speedup.

    python benchmarks/bench_kernels.py [--quick] [--out benchmarks/RESULTS.md]
    lte bench ...                      (the CLI calls `main(argv)`)

Letters: T tokens, d model dim, d_ff = N = E*B neurons, E experts, B expert size, s sparsity.

For each FFN shape (Llama-2-7B SwiGLU 4096/11008 and a small 1024/2816 one), dtype and T, every
repetition times, interleaved and each on the next of `--layers` weight sets (so no cache holds
them): the dense FFN (`silu(x Wg^T) * (x Wu^T) @ Wd^T`, torch/MKL on CPU, cuBLAS on GPU), the
`lte::sparse_ffn` op in hard mode at each s, the router (linear + sigmoid) and the op with no
active expert (the index building + launch overhead). Each token uses exactly round((1-s) E)
random experts. Reported: medians (20/80 % quantiles in the markdown), speedup = dense / sparse,
and fraction of ideal = speedup / (1/(1-s)). At T > 1 a block is read if any token uses it, so
the memory-bound ideal is lower than 1/(1-s); the FLOP ideal stays 1/(1-s). GB/s = weight bytes
actually read (dense: all 3 matrices; sparse: the blocks of every expert some token uses) / time.

Allocation: glibc returns > 32 MB buffers to the OS and page-faults them back on every call
; `mallopt` raises the mmap/trim thresholds for this process, as
MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ would.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import platform
import statistics
import sys
import time
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lte_compile.kernels import dispatch
from lte_compile.kernels.reference import sparse_ffn_reference

SHAPES = {"llama2-7b": (4096, 11008), "small": (1024, 2816)}
SPARSITIES = (0.0, 0.5, 0.75, 0.9)
TOKENS = (1, 4, 16, 128, 2048)
B = 32
TAU = 0.5
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")  # beside this script
# CPU features worth naming next to the numbers (the kernel's build ISA follows them: cpu.isa()).
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


def _raise_malloc_thresholds() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 2 << 30)  # M_TRIM_THRESHOLD
    except OSError:  # not glibc: the numbers for > 32 MB outputs include page faults
        pass


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    from lte_compile.kernels.cpu import cpu_name
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def cpu_features() -> str:
    """The CPU kernel's build ISA and the CPU's vector features (x86 flags from /proc/cpuinfo)."""
    from lte_compile.kernels.cpu import cpu_flags, isa, isa_limits
    flags = cpu_flags()
    vec = [f for f in VECTOR_FLAGS if f in flags]
    return f"kernel ISA {isa()[0]} ({' '.join(isa()[1])}); vector features: {' '.join(vec) or '-'}{isa_limits()}"


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _gates(T: int, E: int, s: float, gen: torch.Generator, dev) -> torch.Tensor:
    """[T, E] gates with exactly round((1-s) E) experts above tau per token, random positions."""
    k = round((1 - s) * E)
    ranks = torch.rand(T, E, generator=gen).argsort(1).argsort(1)
    return torch.where(ranks < k, 0.9, 0.1).to(dev)


@dataclass
class Row:
    shape: str
    dtype: str
    T: int
    dense_ms: float
    router_ms: float
    index_ms: float
    sparse: dict  # s -> (median ms, q20, q80)
    dense_bytes: int = 0  # weight bytes the dense FFN reads
    sparse_bytes: dict | None = None  # s -> weight bytes the sparse op reads (experts any token uses)
    kernels: dict | None = None  # s -> kernel dispatch chose
    masked_ms: float | None = None  # every expert through the dense GEMMs, then the mask (CUDA)
    fused_ms: float | None = None  # the same with the mask fused into the act * up pass (dense_triton)
    triton_ms: dict | None = None  # s -> ms of the Triton kernel forced (CUDA, where dispatch picks another)

    def speedup(self, s: float) -> float:
        return self.dense_ms / self.sparse[s][0]

    def dense_gbs(self) -> float:
        return self.dense_bytes / self.dense_ms / 1e6

    def sparse_gbs(self, s: float) -> float:
        return self.sparse_bytes[s] / self.sparse[s][0] / 1e6


def bench_case(shape: str, dtype: torch.dtype, T: int, sparsities, layers: int, reps: int,
               dev: torch.device, weights) -> Row:
    d, N = SHAPES[shape]
    E = N // B
    gen = torch.Generator().manual_seed(T)
    x = torch.randn(T, d, generator=gen).to(dev, dtype)
    w_r = (torch.randn(E, d, generator=gen) / d ** 0.5).to(dev, dtype)  # router
    gates = {s: _gates(T, E, s, gen, dev) for s in sparsities}
    off = torch.zeros(T, E, device=dev)

    def dense(l):
        wu, wg, wd = weights[l]
        return (F.silu(x @ wg.t()) * (x @ wu.t())) @ wd  # wd = W_down^T [N, d]

    def sparse(l, g):
        wu, wg, wd = weights[l]
        return torch.ops.lte.sparse_ffn(x, g, wu, wg, wd, None, None, None, "silu", B, "hard", TAU)

    # The sparsities first, the one nearest 0.5 leading: the Triton autotuner times its configs on
    # the first call of a shape (its key has no density), so a typical mask should make it.
    variants = {"dense": dense}
    for s in sorted(sparsities, key=lambda s: abs(s - 0.5)):
        variants[s] = (lambda g: lambda l: sparse(l, g))(gates[s])
    variants.update(router=lambda l: torch.sigmoid(F.linear(x, w_r)), index=lambda l: sparse(l, off))
    if dev.type == "cuda":  # the dispatch's alternative there: every expert through cuBLAS, then the mask
        variants["masked"] = lambda l: sparse_ffn_reference(x, gates[sparsities[-1]], *weights[l][:2],
                                                            weights[l][2], None, None, None, "silu", B, "hard", TAU)
        variants["fused"] = lambda l: _with_kernel("dense_triton", sparse, l, gates[sparsities[-1]])
        if dispatch.cuda_rule(T) != "triton":  # the Triton kernel anyway, to see whether the rule still holds
            for s in sparsities:
                variants[("triton", s)] = (lambda g: lambda l: _with_kernel("triton", sparse, l, g))(gates[s])
    times = _time_cuda(variants, layers, reps) if dev.type == "cuda" else _time_host(variants, layers, reps, T, dev)

    def q(v):
        v = sorted(v)
        return (statistics.median(v), v[int(0.2 * (len(v) - 1))], v[int(0.8 * (len(v) - 1))])

    block = 3 * B * d * x.element_size()  # one expert's rows of W_up, W_gate and W_down^T
    used = {s: int((gates[s] > TAU).any(0).sum()) for s in sparsities}  # experts some token uses
    return Row(shape, str(dtype).replace("torch.", ""), T, q(times["dense"])[0], q(times["router"])[0],
               q(times["index"])[0], {s: q(times[s]) for s in sparsities},
               dense_bytes=E * block, sparse_bytes={s: used[s] * block for s in sparsities},
               masked_ms=q(times["masked"])[0] if "masked" in times else None,
               fused_ms=q(times["fused"])[0] if "fused" in times else None,
               triton_ms={s: q(times[("triton", s)])[0] for s in sparsities} if ("triton", sparsities[0]) in times
               else None)


def _time_host(variants: dict, layers: int, reps: int, T: int, dev: torch.device) -> dict:
    """Per variant, ms of each timed call: interleaved, each call on the next weight set."""
    times = {k: [] for k in variants}
    warm = 1 if T >= 2048 else 5
    for r in range(warm + reps):
        for k, fn in variants.items():
            l = (r + zlib.crc32(str(k).encode())) % layers  # stable across processes, unlike hash()
            _sync(dev)
            t0 = time.perf_counter()
            fn(l)
            _sync(dev)
            if r >= warm:
                times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def _time_cuda(variants: dict, layers: int, reps: int) -> dict:
    """GPU time per call, without the host: each variant's calls on every weight set (cold: the
    sets together outgrow the L2) captured in one CUDA graph, replays timed with CUDA events,
    interleaved across variants. Decode replays a graph too (torch.compile mode="reduce-overhead"),
    so host launch overhead is not what a user waits for."""
    graphs = {}
    with torch.no_grad():
        for k, fn in variants.items():
            for l in range(layers):  # warm-up outside capture: autotuning, allocator
                fn(l)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for l in range(layers):
                    fn(l)
            graphs[k] = graph
    times = {k: [] for k in variants}
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in variants]
    for r in range(2 + reps):
        for (k, graph), (start, end) in zip(graphs.items(), events):
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize()
        if r >= 2:
            for k, (start, end) in zip(graphs, events):
                times[k].append(start.elapsed_time(end) / layers)
    return times


def _with_kernel(name: str, fn, *args):
    """fn(*args) with the dispatch forced to kernel `name` (lte_compile.kernels.dispatch.set_kernel)."""
    with dispatch.set_kernel(name):
        return fn(*args)


def _fmt_forced(row: "Row") -> str:
    return ", ".join(f"s={s}: {ms:.3f} (x{row.dense_ms / ms:.2f})" for s, ms in row.triton_ms.items()) \
        if row.triton_ms else ""


def _reps(T: int, quick: bool) -> int:
    if T >= 2048:
        return 3
    if T >= 128:
        return 5 if quick else 8
    return 15 if quick else 40


def run(args) -> list[Row]:
    import lte_compile.kernels  # noqa: F401  registers torch.ops.lte

    dev = torch.device(args.device)
    rows = []
    for shape in args.shapes:
        d, N = SHAPES[shape]
        for dt_name in args.dtypes:
            dtype = getattr(torch, dt_name)
            gen = torch.Generator().manual_seed(0)
            weights = [tuple((torch.randn(N, d, generator=gen) / d ** 0.5).to(dev, dtype) for _ in range(3))
                       for _ in range(args.layers)]
            for T in args.tokens:
                row = bench_case(shape, dtype, T, args.sparsity, args.layers, _reps(T, args.quick), dev, weights)
                # What the dispatch ran (after the run: a measured decision is cached by then).
                kernels = {s: dispatch.choose_kernel(torch.empty(T, d, device=dev, dtype=dtype), weights[0][0],
                                                     "hard", _gates(T, N // B, s, torch.Generator(), dev), TAU,
                                                     w_gate=weights[0][1], w_down=weights[0][2])
                           for s in args.sparsity}
                row.kernels = kernels
                rows.append(row)
                print(f"{shape:9s} {row.dtype:8s} T={T:<5d} dense {row.dense_ms:8.3f} ms {row.dense_gbs():6.1f} GB/s  "
                      + "  ".join(f"s={s}: {row.sparse[s][0]:8.3f} ms {row.sparse_gbs(s):6.1f} GB/s x{row.speedup(s):.2f}"
                                  f" ({row.speedup(s) * (1 - s):.2f} of ideal, {kernels[s]})" for s in args.sparsity)
                      + f"  router {100 * row.router_ms / row.dense_ms:.1f}%"
                      + f" index {100 * row.index_ms / row.dense_ms:.1f}%"
                      + (f"  dense+mask {row.masked_ms:.3f} ms, fused {row.fused_ms:.3f} ms"
                         if row.masked_ms is not None else "")
                      + (f"  triton forced: {_fmt_forced(row)}" if row.triton_ms else ""), flush=True)
            del weights
    return rows


def header(dev: torch.device) -> list[str]:
    """Device lines: the GPU, or the CPU with its kernel ISA and vector features."""
    lines = [f"- device: {device_name(dev)}"]
    if dev.type == "cpu":
        lines.append(f"- CPU: {cpu_features()}")
    return lines


def markdown(rows: list[Row], args, dev: torch.device, argv: list[str]) -> str:
    triton_version = "-"
    if dev.type == "cuda":  # the Triton kernel only runs there; CPU-only installs may lack triton
        import triton
        triton_version = triton.__version__
    sp = args.sparsity
    out = ["# Sparse FFN benchmark", "",
           *header(dev),
           f"- torch {torch.__version__}, triton {triton_version}, "
           f"Python {platform.python_version()}",
           f"- command: `{' '.join(['python benchmarks/bench_kernels.py'] + argv)}`",
           f"- weights rotated over {args.layers or '3 (7B) / 6 (small)'} layers per shape; variants interleaved; medians "
           f"[20%, 80%] in ms; expert size B={B}; hard mode; each token uses exactly (1-s)E experts.",
           "- speedup = dense / sparse; `of ideal` = speedup x (1 - s) (1.00 = the 1/(1-s) ideal). "
           "a kernel name after the ratios = dispatch chose it instead of the C++/Triton kernel (`reference` = dense, then masked). router = linear+sigmoid; index = the op with no active expert (index building + launch),"
           " both as % of dense. GB/s = weight bytes read (dense: all; sparse: every expert some token uses) / median time.",
           ""]
    head = "| shape | dtype | T | dense ms (GB/s) | " + " | ".join(f"s={s}: ms (GB/s; speedup, of ideal)" for s in sp) \
        + " | router % | index % |" + (" dense+mask ms | dense + fused mask ms | Triton forced ms |"
                                        if rows and rows[0].masked_ms is not None else "")
    out += [head, "|" + "---|" * (6 + len(sp) + 3 * (rows and rows[0].masked_ms is not None))]
    for r in rows:
        cells = [f"{r.sparse[s][0]:.3f} [{r.sparse[s][1]:.3f}, {r.sparse[s][2]:.3f}] ({r.sparse_gbs(s):.1f} GB/s; "
                 f"x{r.speedup(s):.2f}, {r.speedup(s) * (1 - s):.2f}"
                 f"{'' if r.kernels[s] in ('cpu', 'triton') else ', ' + r.kernels[s]})"
                 for s in sp]
        out.append(f"| {r.shape} | {r.dtype} | {r.T} | {r.dense_ms:.3f} ({r.dense_gbs():.1f}) | " + " | ".join(cells)
                   + f" | {100 * r.router_ms / r.dense_ms:.1f} | {100 * r.index_ms / r.dense_ms:.1f} |"
                   + (f" {r.masked_ms:.3f} | {r.fused_ms:.3f} (x{r.dense_ms / r.fused_ms:.2f}) | {_fmt_forced(r) or '—'} |"
                      if r.masked_ms is not None else ""))
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """CLI entry (also `lte bench`). Returns a process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="lte bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small shape, T in {1, 16, 128}, fewer reps")
    p.add_argument("--shapes", nargs="+", default=None, choices=list(SHAPES))
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--tokens", nargs="+", type=int, default=None)
    p.add_argument("--sparsity", nargs="+", type=float, default=list(SPARSITIES))
    p.add_argument("--layers", type=int, default=None, help="weight sets rotated (default 3 for 7B, 6 small)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=DEFAULT_OUT, help="markdown file to write ('' to skip)")
    args = p.parse_args(argv)
    args.shapes = args.shapes or (["small"] if args.quick else list(SHAPES))
    args.tokens = args.tokens or ([1, 16, 128] if args.quick else list(TOKENS))
    _raise_malloc_thresholds()
    dev = torch.device(args.device)
    print("\n".join(line[2:] for line in header(dev)), flush=True)
    rows = []
    for shape in args.shapes:
        a = argparse.Namespace(**vars(args))
        a.shapes = [shape]
        a.layers = args.layers or (3 if shape == "llama2-7b" else 6)
        rows += run(a)
    if args.out:
        md = markdown(rows, args, torch.device(args.device), argv)
        with open(args.out, "w") as f:
            f.write(md)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
