"""FFN bandwidth with cold weights: the gathered C++ kernel (direct call and through
`torch.ops.lte.sparse_ffn`, and at the lowest density through our dispatch alone) against dense `F.linear` x 3, TinyLlama FFN shape (d 2048, N 5632,
B 32), 8 layers' weights rotated (far larger than any cache), at expert densities
1.0 / 0.5 / 0.25 / 0.1; medians of 15 interleaved rounds. GB/s = weight bytes the call needs / time.

    python benchmarks/cold_kernel.py [--threads 2] [--tokens 1] [--dtype float32]

Why: bench_decode's per-FFN breakdown reuses one layer's weights (cache-warm); this is what the
kernel and the op cost inside a model, where every layer's weights come from DRAM.

`--tokens T` > 1: per-token masks (each token draws its own experts at the density), so the bytes
a call needs are those of the union of the tokens' experts (about 1 - (1-p)^T of the FFN: every
expert at T = 16 and p >= 0.25).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

D, N, B, LAYERS = 2048, 5632, 32, 8
DENSITIES = (1.0, 0.5, 0.25, 0.1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--tokens", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    import lte_compile  # noqa: F401  (registers torch.ops.lte)
    from lte_compile.kernels import dispatch
    from lte_compile.kernels.cpu import machine_summary, sparse_ffn_cpu

    print(machine_summary())
    E = N // B
    g = torch.Generator().manual_seed(0)
    layers = [[(torch.randn(N, D, generator=g) / D ** 0.5).to(dtype) for _ in range(3)] for _ in range(LAYERS)]
    dense_down = [w[2].t().contiguous() for w in layers]  # nn.Linear layout for the dense FFN
    T = args.tokens
    x = torch.randn(T, D, generator=g).to(dtype)

    def gates(density: float) -> torch.Tensor:
        out = torch.zeros(T, E)
        for t in range(T):
            out[t, torch.randperm(E, generator=g)[:max(1, round(density * E))]] = 1.0
        return out

    masks = {p: [gates(p) for _ in range(LAYERS)] for p in DENSITIES}

    # the op's layers, outermost last: C++ kernel, our dispatch (choice + NaN rows excluded), the op
    callers = {"kernel": sparse_ffn_cpu, "dispatch": dispatch.sparse_ffn_forward, "op": torch.ops.lte.sparse_ffn.default}

    def sparse(density: float, via: str) -> float:
        fn = callers[via]
        t0 = time.perf_counter()
        for layer, w in enumerate(layers):
            fn(x, masks[density][layer], w[0], w[1], w[2], None, None, None, "silu", B, "hard", 0.5)
        return (time.perf_counter() - t0) / LAYERS

    def dense() -> float:
        t0 = time.perf_counter()
        for layer, w in enumerate(layers):
            F.linear(F.silu(F.linear(x, w[1])) * F.linear(x, w[0]), dense_down[layer])
        return (time.perf_counter() - t0) / LAYERS

    variants = {f"dense F.linear x3, T = {T}": (1.0, dense)}
    for p in DENSITIES:
        variants[f"kernel, density {p}"] = (p, lambda p=p: sparse(p, "kernel"))
        if p == min(DENSITIES):  # where the per-call cost shows most
            variants[f"dispatch, density {p}"] = (p, lambda p=p: sparse(p, "dispatch"))
        variants[f"op, density {p}"] = (p, lambda p=p: sparse(p, "op"))
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(3):
        for _, fn in variants.values():
            fn()
    for _ in range(args.rounds):
        for k, (_, fn) in variants.items():
            times[k].append(fn())
    mb = 3 * N * D * x.element_size() / 1e6
    union = {p: float((torch.stack(masks[p]).sum(1) > 0).float().mean()) for p in DENSITIES}
    union[1.0] = 1.0
    ms = {k: statistics.median(t) * 1e3 for k, t in times.items()}
    print(f"{args.dtype}, T = {T}; experts in the union: "
          + ", ".join(f"{union[p]:.2f} at density {p}" for p in DENSITIES) + "\n\n| variant | ms per FFN | GB/s of the bytes needed |\n|---|---|---|")
    for k, (p, _) in variants.items():
        print(f"| {k} | {ms[k]:.3f} | {mb * union[p] / ms[k]:.2f} |")


if __name__ == "__main__":
    main()
