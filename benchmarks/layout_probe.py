"""Which W_down layout should the CPU kernel use? A batch-1 probe of the down phase on both.

    python benchmarks/layout_probe.py [--threads 2] [--rounds 15]

The kernel stores W_down as [N, d_out] (an expert = B contiguous rows, streamed whole). nn.Linear's
own layout [d_out, N] would make the dense fallback the NT GEMM Inductor runs (in bf16 the NN one on
our layout is 1.5x slower at T = 16, benchmarks/RESULTS.md session 6) and give bf16 dot products
their pairs along the reduction dim for free; but an expert is then a B-element segment of every
row (64 B in bf16, 128 B in fp32), read between the inactive experts' segments. This measures that
trade at batch 1, where the down phase is memory-bound: the kernel's down phase (the full C++
kernel with a 32-wide up phase, ReLU, no gate) against a probe kernel on [d_out, N] (8 rows x every
active expert's segment per block, one dot product each, optional software prefetch `pf` experts
ahead), TinyLlama's down shape (N 5632, d_out 2048, B 32), expert densities 1.0 / 0.5 / 0.1, enough
layers' weights rotated that every call reads DRAM (>= 64 MB of active bytes). The probe is a
measurement, not a product kernel: AVX512-BF16 / AVX-512 only.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

N, D_OUT, B = 5632, 2048, 32
SPARSITIES = (0.0, 0.5, 0.9)
PREFETCH = (0, 4, 8)

_PROBE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

// y[o0 + r] = sum over active experts e of <W[o0 + r, 32e : 32e + 32], h_e>, R rows at a time.
template <int R, bool BF16>
static void rows_block(const void* wv, int64_t ldw, const int64_t* act, int64_t A, const void* hv,
                       float* y, int64_t o0, int pf) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t a = 0; a < A; ++a) {
    const int64_t e = act[a];
    if (pf && a + pf < A)
      for (int r = 0; r < R; ++r) {
        const char* p = BF16 ? (const char*)((const uint16_t*)wv + (o0 + r) * ldw + act[a + pf] * 32)
                             : (const char*)((const float*)wv + (o0 + r) * ldw + act[a + pf] * 32);
        _mm_prefetch(p, _MM_HINT_T0);
        if (!BF16) _mm_prefetch(p + 64, _MM_HINT_T0);
      }
    if (BF16) {
      const __m512bh h = (__m512bh)_mm512_loadu_si512((const uint16_t*)hv + a * 32);
      for (int r = 0; r < R; ++r)
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512((const uint16_t*)wv + (o0 + r) * ldw + e * 32), h);
    } else {
      const __m512 h0 = _mm512_loadu_ps((const float*)hv + a * 32), h1 = _mm512_loadu_ps((const float*)hv + a * 32 + 16);
      for (int r = 0; r < R; ++r) {
        const float* w = (const float*)wv + (o0 + r) * ldw + e * 32;
        acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(w), h0, acc[r]);
        acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(w + 16), h1, acc[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) y[o0 + r] = _mm512_reduce_add_ps(acc[r]);
}

// W [d_out, N] (fp32 or bf16, d_out % 8 == 0), h [A, 32] in W's dtype, act [A] int64 expert ids.
torch::Tensor down_segments(torch::Tensor W, torch::Tensor h, torch::Tensor act, int64_t pf) {
  const int64_t d_out = W.size(0), ldw = W.stride(0), A = act.size(0);
  auto y = torch::empty({d_out}, W.options().dtype(at::kFloat));
  const bool bf = W.scalar_type() == at::kBFloat16;
  const int64_t* ap = act.data_ptr<int64_t>();
  at::parallel_for(0, d_out / 8, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      if (bf) rows_block<8, true>(W.data_ptr(), ldw, ap, A, h.data_ptr(), y.data_ptr<float>(), b * 8, (int)pf);
      else rows_block<8, false>(W.data_ptr(), ldw, ap, A, h.data_ptr(), y.data_ptr<float>(), b * 8, (int)pf);
    }
  });
  return y;
}
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from torch.utils.cpp_extension import load_inline

    from lte_compile.kernels.cpu import _cflags, isa, load_extension, machine_summary

    print(machine_summary())
    if not isa()[0].startswith("avx512bf16"):
        raise SystemExit("layout_probe: the probe kernel needs AVX-512 with AVX512-BF16")
    ext = load_extension()
    probe = load_inline(f"lte_layout_probe_{isa()[0]}", cpp_sources=_PROBE, functions=["down_segments"],
                        extra_cflags=_cflags(), verbose=False)
    E = N // B
    print("| dtype | s | kernel, [N, d_out] | " + " | ".join(f"probe [d_out, N], pf {pf}" for pf in PREFETCH)
          + " |  (ms per call, GB/s of active weight bytes)")
    print("|---|---|---|" + "---|" * len(PREFETCH))
    for dtype in (torch.float32, torch.bfloat16):
        for s in SPARSITIES:
            g = torch.Generator().manual_seed(1)
            on = torch.rand(E, generator=g) >= s
            act = torch.nonzero(on).flatten()
            active_mb = len(act) * B * D_OUT * dtype.itemsize / 1e6
            layers = max(2, math.ceil(64 / active_mb))
            ours = [(torch.randn(N, D_OUT, generator=g) * 0.02).to(dtype) for _ in range(layers)]
            linear = [w.t().contiguous() for w in ours]
            w_up = [(torch.randn(N, 32, generator=g) * 0.02).to(dtype) for _ in range(layers)]
            x = torch.randn(1, 32, generator=g).to(dtype)
            h = torch.randn(len(act), B, generator=g).to(dtype)
            gates = on.float()[None]
            turn = [0]

            def nxt() -> int:
                turn[0] += 1
                return turn[0] % layers

            def kernel():
                k = nxt()
                return ext.sparse_ffn_cpu(x, gates, w_up[k], None, ours[k], None, None, None, "relu", B, "hard", 0.5)

            variants = {"kernel": kernel}
            for pf in PREFETCH:
                variants[pf] = (lambda pf=pf: probe.down_segments(linear[nxt()], h, act, pf))
            times = {k: [] for k in variants}
            for f in variants.values():
                for _ in range(3):
                    f()
            for _ in range(args.rounds):  # interleaved rounds, medians
                for k, f in variants.items():
                    t0 = time.perf_counter()
                    for _ in range(3):
                        f()
                    times[k].append((time.perf_counter() - t0) / 3 * 1e3)
            cells = [f"{statistics.median(v):.3f} ({active_mb / statistics.median(v):.1f})" for v in times.values()]
            print(f"| {str(dtype).removeprefix('torch.')} | {s} | " + " | ".join(cells) + " |", flush=True)
            del ours, linear, w_up


if __name__ == "__main__":
    main()
