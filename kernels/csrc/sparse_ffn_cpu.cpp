// Gathered sparse FFN for the CPU: reads only the active experts' weight blocks.
//
// Letters: T tokens, d model dim, d_out output dim, E experts, B expert size (neurons per
// expert), N = E*B neurons, s sparsity (fraction of inactive experts).
//
// Contract: kernels/reference.py (sparse_ffn_reference). Python side: kernels/cpu.py (build,
// launcher, fallback). Benchmark: benchmarks/bench_kernels.py.
//
// Layout: w_up, w_gate [N, d] and w_down [N, d_out] (= W_down^T) with unit stride along the last
// dim, so an expert is B contiguous rows of each: reading it is one sequential stream, which is
// what lets batch-1 decode approach (1 - s) x dense time (memory-bound).
//
// Index building (build_pair_index), then two phases (up_phase, down_phase), each one
// at::parallel_for. kernels/cpu.py compiles with -fopenmp (at::parallel_for is header-inline and
// serial unless _OPENMP is defined) but links no OpenMP runtime of its own: the GOMP_* symbols
// resolve to the libgomp torch already loaded, so there is one thread pool (a second runtime
// beside torch's would oversubscribe the cores and stall torch ops).
//   1. up:   parallel over active experts. For every (token, expert) pair, h[p, 0..B) =
//            act(x W_gate[e]^T + b_gate) * (x W_up[e]^T + b_up) * scale. d is tiled so the
//            expert's weight tile stays in L2 while chunks of kUpToks tokens reuse it (grouped by
//            expert: at batch > 1 each weight block is read from memory once, however many tokens
//            need it). Micro-kernel dot_block: R rows x NT tokens of vector accumulators, with
//            the rows read next prefetched a line per line read.
//   2. down: parallel over column tiles of d_out (no reduction buffers, deterministic). For each
//            active expert, y[t, tile] += h[p, :] @ W_down^T[e, tile] over its pairs: one token
//            streams 8 rows at a time (axpy_rows); several are register-blocked (down_block:
//            kDownToks tokens x kDownCols vectors of y kept in registers over all B rows).
// The vector width (LTE_LANES) and the blocks follow the build ISA (kernels/cpu.py isa()): 8 fp32
// lanes and 12 accumulators for AVX2's 16 registers, 16 lanes and 16-24 for AVX-512's 32.
//
// Dense-then-mask (dense_masked_ffn, dispatch kernel "dense"): MKL/oneDNN GEMMs for every expert
// and one fused act*up*mask pass; what measured dispatch (kernels/autotune.py) falls back to.
// Accumulation is fp32 for every weight dtype (fp32, bf16, fp16); y is rounded once at the end.
//
// bf16 x and weights on a CPU with AVX512-BF16: both phases run as register-blocked `vdpbf16ps`
// micro-kernels on the raw bf16 rows for every expert (see "AVX512-BF16 grouped path" below;
// batch 1: down_phase_t1); without __AVX512BF16__ at build time only the fp32 path is compiled.
// at::vec::Vectorized (the dense path's fused epilogue) at the build ISA's width: ATen selects the
// vector implementation by these macros, which torch's own build sets per kernel file. The
// Sleef functions behind exp/erf/tanh are exported by libtorch_cpu.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define CPU_CAPABILITY_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2 1
#endif
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

// The AVX512-BF16 grouped path is compiled where the build ISA (kernels/cpu.py isa()) has it;
// elsewhere the fp32-FMA path below is the only one.
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512F__)
#include <immintrin.h>
#define LTE_BF16_DP 1
#else
#define LTE_BF16_DP 0
#endif

namespace {

// Register blocks of the fp32-accumulating micro-kernels, sized to the build ISA's register file
// (AVX2: 16 ymm; AVX-512: 32 zmm) so the accumulators never spill:
//   up   (dot_block): R weight rows x NT tokens, one vector accumulator each, R*NT <= 12 / 16;
//   down (down_block): kDownToks tokens x kDownCols vectors of y columns, 12 / 24 accumulators.
#if defined(__AVX512F__)
#define LTE_LANES 16
constexpr int kUpToks = 8;
constexpr int kDownToks = 6;
#else
#define LTE_LANES 8
constexpr int kUpToks = 6;
constexpr int kDownToks = 3;
#endif
constexpr int kDownCols = 4;     // vectors of y columns per down micro-kernel
constexpr int kRowGroup = 8;     // W_down rows combined per pass over y (batch-1 streaming path)
constexpr int64_t kDTile = 1024; // d tile of phase 1 (expert tile = 2*B*kDTile*4 B = 256 KB at B=32)

// Codes follow kernels/reference.py ACTIVATIONS order (act_code maps the names).
enum Act { kRelu = 0, kGelu = 1, kGeluTanh = 2, kSilu = 3, kRelu2 = 4, kQuickGelu = 5 };

inline float to_f(float v) { return v; }
// bf16 -> fp32 is a 16-bit shift; written on the bits so the compiler vectorizes it.
inline float to_f(c10::BFloat16 v) {
  uint32_t u = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float to_f(c10::Half v) { return static_cast<float>(v); }

inline float activation(int act, float a) {
  switch (act) {
    case kRelu: return a > 0.f ? a : 0.f;
    case kGelu: return 0.5f * a * (1.f + std::erf(a * 0.70710678118654752f));
    case kGeluTanh: {
      const float k = 0.7978845608028654f;  // sqrt(2 / pi)
      return 0.5f * a * (1.f + std::tanh(k * (a + 0.044715f * a * a * a)));
    }
    case kRelu2: {  // squared ReLU
      const float r = a > 0.f ? a : 0.f;
      return r * r;
    }
    case kQuickGelu: return a / (1.f + std::exp(-1.702f * a));  // a * sigmoid(1.702 a)
    default: return a / (1.f + std::exp(-a));
  }
}

// 16 fp32 lanes (one AVX-512 register, two AVX2 ones) as a GCC vector type: accumulators of
// this type stay in registers, which plain float arrays did not reliably do.
typedef float vf16 __attribute__((vector_size(64)));
typedef uint32_t vu32 __attribute__((vector_size(64)));

typedef float vf16_u __attribute__((vector_size(64), aligned(4), may_alias));
typedef uint16_t vu16_u __attribute__((vector_size(32), aligned(2), may_alias));
inline vf16 load16(const float* p) { return *reinterpret_cast<const vf16_u*>(p); }
inline vf16 load16(const c10::BFloat16* p) {
  const vu32 u = __builtin_convertvector(*reinterpret_cast<const vu16_u*>(p), vu32) << 16;
  return __builtin_bit_cast(vf16, u);  // bf16 -> fp32 is a 16-bit shift
}
inline vf16 load16(const c10::Half* p) {
  vf16 v;
  for (int l = 0; l < 16; ++l) v[l] = static_cast<float>(p[l]);
  return v;
}
inline void store16(float* p, vf16 v) { *reinterpret_cast<vf16_u*>(p) = v; }
inline float hsum(vf16 v) {
  float s = 0.f;
  for (int l = 0; l < 16; ++l) s += v[l];
  return s;
}

// One vector of the build's width (LTE_LANES fp32 lanes): the register-blocked kernels' unit.
// Loads and stores go through the unaligned, may_alias twins (one vmovups each): a memcpy into
// the vector compiled to two 128-bit stores and a 256-bit reload on AVX2 (a store-forwarding
// stall per load).
typedef float vfl __attribute__((vector_size(LTE_LANES * 4)));
typedef float vfl_u __attribute__((vector_size(LTE_LANES * 4), aligned(4), may_alias));
typedef uint16_t vul16_u __attribute__((vector_size(LTE_LANES * 2), aligned(2), may_alias));
typedef uint32_t vul32 __attribute__((vector_size(LTE_LANES * 4)));

inline vfl loadv(const float* p) { return *reinterpret_cast<const vfl_u*>(p); }
inline vfl loadv(const c10::BFloat16* p) {
  const vul32 u = __builtin_convertvector(*reinterpret_cast<const vul16_u*>(p), vul32) << 16;
  return __builtin_bit_cast(vfl, u);  // bf16 -> fp32 is a 16-bit shift
}
inline vfl loadv(const c10::Half* p) {
  vfl v;
  for (int l = 0; l < LTE_LANES; ++l) v[l] = static_cast<float>(p[l]);
  return v;
}
inline void storev(float* p, vfl v) { *reinterpret_cast<vfl_u*>(p) = v; }
inline float hsumv(vfl v) {
  float s = 0.f;
  for (int l = 0; l < LTE_LANES; ++l) s += v[l];
  return s;
}

// out[r * NT + t] = <w[r][0:n], xs[t][0:n]> for R weight rows x NT tokens: R*NT accumulators,
// and per step R weight vectors and NT x vectors loaded once each (R + NT loads for R*NT FMAs).
// pf (or null): R rows read next from memory, one line of each prefetched per line of w read (see
// up_block).
template <typename W, int R, int NT>
inline void dot_block(const W* const* w, const float* const* xs, int64_t n, float* out,
                      const W* const* pf = nullptr) {
  constexpr int64_t kStepBytes = LTE_LANES * sizeof(W);  // a line every 64 / kStepBytes steps
  const W* wr[R];
  const float* xr[NT];
  for (int r = 0; r < R; ++r) wr[r] = w[r];
  for (int t = 0; t < NT; ++t) xr[t] = xs[t];
  vfl acc[R][NT];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t) acc[r][t] = vfl{};
  int64_t k = 0;
  for (; k + LTE_LANES <= n; k += LTE_LANES) {
    vfl wv[R];
    if (pf && (kStepBytes >= 64 || (k * int64_t(sizeof(W))) % 64 == 0))
      for (int r = 0; r < R; ++r) __builtin_prefetch(pf[r] + k, 0, 2);  // to L2 (_MM_HINT_T1), any ISA
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) wv[r] = loadv(wr[r] + k);
#pragma GCC unroll 16
    for (int t = 0; t < NT; ++t) {
      const vfl xv = loadv(xr[t] + k);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r][t] += wv[r] * xv;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t) {
      float sum = hsumv(acc[r][t]);
      for (int64_t kk = k; kk < n; ++kk) sum += to_f(wr[r][kk]) * xr[t][kk];
      out[r * NT + t] = sum;
    }
}

template <typename W, int R>
inline void dot_block_nt(int nt, const W* const* w, const float* const* xs, int64_t n, float* out,
                         const W* const* pf) {
  switch (nt) {
    case 1: dot_block<W, R, 1>(w, xs, n, out, pf); break;
    case 2: dot_block<W, R, 2>(w, xs, n, out, pf); break;
    case 3: dot_block<W, R, 3>(w, xs, n, out, pf); break;
    case 4: dot_block<W, R, 4>(w, xs, n, out, pf); break;
    case 5: dot_block<W, R, 5>(w, xs, n, out, pf); break;
#if LTE_LANES == 16
    case 6: dot_block<W, R, 6>(w, xs, n, out, pf); break;
    case 7: dot_block<W, R, 7>(w, xs, n, out, pf); break;
    default: dot_block<W, R, 8>(w, xs, n, out, pf); break;
#else
    default: dot_block<W, R, 6>(w, xs, n, out, pf); break;
#endif
  }
}

// Rows per up block for nt tokens: 4 while 4*nt accumulators fit, else 2 (see kUpToks).
inline int up_rows(int nt) { return nt <= kUpToks / 2 ? 4 : 2; }

template <typename W>
inline void dot_block_any(int r, int nt, const W* const* w, const float* const* xs, int64_t n, float* out,
                          const W* const* pf = nullptr) {
  if (r == 4) dot_block_nt<W, 4>(nt, w, xs, n, out, pf);
  else if (r == 2) dot_block_nt<W, 2>(nt, w, xs, n, out, pf);
  else dot_block_nt<W, 1>(nt, w, xs, n, out, pf);
}

// y[t][c : c + CB*LTE_LANES] += sum_j h[t][j] * w[j][c : ...] over all B rows, NT tokens: the y
// block stays in registers across the B rows (one load and one store of y per expert), and each
// weight vector is used by NT tokens. w: fp32 rows with stride ws.
template <int NT, int CB>
inline void down_block(const float* w, int64_t ws, int64_t B, const float* const* h, float* const* y,
                       int64_t c) {
  vfl acc[NT][CB];
  for (int t = 0; t < NT; ++t)
    for (int b = 0; b < CB; ++b) acc[t][b] = loadv(y[t] + c + b * LTE_LANES);
  const float* hr[NT];
  for (int t = 0; t < NT; ++t) hr[t] = h[t];
  for (int64_t j = 0; j < B; ++j) {
    vfl wv[CB];
    const float* wj = w + j * ws + c;
#pragma GCC unroll 8
    for (int b = 0; b < CB; ++b) wv[b] = loadv(wj + b * LTE_LANES);
#pragma GCC unroll 16
    for (int t = 0; t < NT; ++t) {
      const float hv = hr[t][j];
#pragma GCC unroll 8
      for (int b = 0; b < CB; ++b) acc[t][b] += hv * wv[b];
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int b = 0; b < CB; ++b) storev(y[t] + c + b * LTE_LANES, acc[t][b]);
}

// Columns [0, n) for NT tokens: kDownCols-vector blocks, single vectors, then a scalar tail.
template <int NT>
inline void down_cols_fp32(const float* w, int64_t ws, int64_t B, const float* const* h,
                           float* const* y, int64_t n) {
  int64_t c = 0;
  for (; c + kDownCols * LTE_LANES <= n; c += kDownCols * LTE_LANES) down_block<NT, kDownCols>(w, ws, B, h, y, c);
  for (; c + LTE_LANES <= n; c += LTE_LANES) down_block<NT, 1>(w, ws, B, h, y, c);
  for (; c < n; ++c)
    for (int t = 0; t < NT; ++t) {
      float acc = y[t][c];
      for (int64_t j = 0; j < B; ++j) acc += h[t][j] * w[j * ws + c];
      y[t][c] = acc;
    }
}

inline void down_cols_fp32_any(int nt, const float* w, int64_t ws, int64_t B, const float* const* h,
                               float* const* y, int64_t n) {
  switch (nt) {
    case 1: down_cols_fp32<1>(w, ws, B, h, y, n); break;
    case 2: down_cols_fp32<2>(w, ws, B, h, y, n); break;
#if LTE_LANES == 16
    case 3: down_cols_fp32<3>(w, ws, B, h, y, n); break;
    case 4: down_cols_fp32<4>(w, ws, B, h, y, n); break;
    case 5: down_cols_fp32<5>(w, ws, B, h, y, n); break;
    default: down_cols_fp32<6>(w, ws, B, h, y, n); break;
#else
    default: down_cols_fp32<3>(w, ws, B, h, y, n); break;
#endif
  }
}

// y[0:n] += sum_r h[r] * w_r[0:n] over R rows (R <= kRowGroup), 4 rows per pass over y.
template <typename W>
inline void axpy_rows(float* __restrict y, const W* const* w, const float* h, int R, int64_t n,
                      const W* const* pf = nullptr) {
  int r = 0;
  for (; r < R; r += 4) {
    const int m = std::min(4, R - r);
    const W* w0 = w[r];
    const W* w1 = w[r + (m > 1)];  // unused rows alias row r with a zero weight
    const W* w2 = w[r + (m > 2 ? 2 : 0)];
    const W* w3 = w[r + (m > 3 ? 3 : 0)];
    const float h0 = h[r], h1 = m > 1 ? h[r + 1] : 0.f, h2 = m > 2 ? h[r + 2] : 0.f,
                h3 = m > 3 ? h[r + 3] : 0.f;
    int64_t c = 0;
    for (; c + 16 <= n; c += 16) {
      // pf: the next group's rows, this pass's share of them (rows r..r+m), a line per line read
      if (pf && (16 * sizeof(W) >= 64 || (c * int64_t(sizeof(W))) % 64 == 0))
        for (int q = r; q < r + m; ++q) __builtin_prefetch(pf[q] + c, 0, 2);
      vf16 acc = load16(y + c);
      acc += h0 * load16(w0 + c) + h1 * load16(w1 + c);
      acc += h2 * load16(w2 + c) + h3 * load16(w3 + c);
      store16(y + c, acc);
    }
    for (; c < n; ++c)
      y[c] += h0 * to_f(w0[c]) + h1 * to_f(w1[c]) + h2 * to_f(w2[c]) + h3 * to_f(w3[c]);
  }
}

#if LTE_BF16_DP
// ---- AVX512-BF16 grouped path (bf16 weights and activations) -------------------------------
// `vdpbf16ps` (_mm512_dpbf16_ps) multiplies 32 bf16 pairs and adds each pair's sum into one of 16
// fp32 lanes: twice the fp32 FMA rate and no bf16 -> fp32 conversion. Accumulation stays fp32.
//   up:   h[t, j] = <W[j, :], x[t, :]>, both bf16 along d: the pairs are consecutive d elements,
//         so rows are used as stored (no repacking); one 16-lane sum per (row, token) per d tile.
//         Blocked 4 rows x 6 tokens (24 accumulators).
//   down: y[t, c] += sum_j h[t, j] W_down^T[j, c]: the pairs run along j, and h is rounded to
//         bf16 once (as the grouped Triton path does). Up to kUnpackedMaxT tokens (decode batches;
//         batch 1: down_phase_t1) two rows are interleaved in registers by unpacklo/hi, y kept
//         permuted per thread tile; larger batches interleave them once per 256-column sub-tile
//         ([B/2, 256] uint32) that many token chunks reuse. Blocked 6 tokens x 64 columns.
// Both phases prefetch the weight rows they read next a line at a time inside the dot products.

constexpr int kDpRows = 4;       // weight rows per up micro-kernel
constexpr int kDpToks = 6;       // tokens per micro-kernel (both phases)
constexpr int kDpCols = 4;       // 16-column vectors per down micro-kernel
constexpr int64_t kDpDTile = 2048;  // d tile of the up phase: 2B rows x 4 KB = 256 KB at B = 32
constexpr int64_t kDpSub = 256;  // columns of W_down^T interleaved at a time (B/2 x 1 KB = 16 KB)
// Every expert takes this path, one token or many (batch 1: up_block with one token and
// down_phase_t1): the fp32 path's conversion of each weight made even batch 1 compute-bound, and
// single-token experts of small batches ran 0-15 % slower on it (T = 2-16, RESULTS.md session 7).

inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }
inline __mmask32 mask32(int64_t n) { return n >= 32 ? ~__mmask32(0) : ((__mmask32(1) << n) - 1); }

// out[r][t * ostride] += <w[r][0:n], xs[t][0:n]> (bf16 bits), R rows x NT tokens. pf (or null):
// R rows read next from memory, one line of each prefetched (to L2) per 32-element step, so their
// DRAM reads overlap this block's dot products: the hardware prefetcher restarts at every 4 KB row
// (bf16 d = 2048) and left the first lines of each to wait on DRAM (8-24 % of the kernel at T = 1
// and 16; RESULTS.md session 10).
template <int R, int NT>
inline void up_block(const uint16_t* const* w, const uint16_t* const* xs, int64_t n,
                     float* const* out, int64_t ostride, const uint16_t* const* pf) {
  __m512 acc[R][NT];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= n; k += 32) {
    __m512i wv[R];
    if (pf)
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(pf[r] + k), _MM_HINT_T1);
    for (int r = 0; r < R; ++r) wv[r] = _mm512_loadu_si512(w[r] + k);
    for (int t = 0; t < NT; ++t) {
      const __m512i xv = _mm512_loadu_si512(xs[t] + k);
      for (int r = 0; r < R; ++r) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], as_bh(wv[r]), as_bh(xv));
    }
  }
  if (k < n) {  // masked tail: zero lanes add nothing
    const __mmask32 m = mask32(n - k);
    __m512i wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm512_maskz_loadu_epi16(m, w[r] + k);
    for (int t = 0; t < NT; ++t) {
      const __m512i xv = _mm512_maskz_loadu_epi16(m, xs[t] + k);
      for (int r = 0; r < R; ++r) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], as_bh(wv[r]), as_bh(xv));
    }
  }
  if (R == 4) {
    // Four rows at once: a transposing reduction (9 shuffles/adds for 4 sums instead of ~24),
    // then one 4-float update where the rows' outputs are adjacent (rows of the same half).
    const bool adjacent = out[1] == out[0] + 1 && out[2] == out[0] + 2 && out[3] == out[0] + 3;
    __m128 qs[NT];
    for (int t = 0; t < NT; ++t) {
      const __m512 a0 = acc[0][t], a1 = acc[1 % R][t], a2 = acc[2 % R][t], a3 = acc[3 % R][t];
      const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
      const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
      const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(s01), _mm512_castps_pd(s23));
      const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(s01), _mm512_castps_pd(s23));
      const __m512 s = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));  // [r0 r1 r2 r3] x 4
      const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1));
      qs[t] = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    }
    if (adjacent) {
      float* o = out[0];
      for (int t = 0; t < NT; ++t)
        _mm_storeu_ps(o + t * ostride, _mm_add_ps(_mm_loadu_ps(o + t * ostride), qs[t]));
    } else {
      float* o0 = out[0]; float* o1 = out[1]; float* o2 = out[2]; float* o3 = out[3];
      for (int t = 0; t < NT; ++t) {
        alignas(16) float v[4];
        _mm_store_ps(v, qs[t]);
        o0[t * ostride] += v[0]; o1[t * ostride] += v[1]; o2[t * ostride] += v[2]; o3[t * ostride] += v[3];
      }
    }
    return;
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t) out[r][t * ostride] += _mm512_reduce_add_ps(acc[r][t]);
}

template <int R>
inline void up_block_nt(int nt, const uint16_t* const* w, const uint16_t* const* xs, int64_t n,
                        float* const* out, int64_t ostride, const uint16_t* const* pf) {
  switch (nt) {
    case 1: up_block<R, 1>(w, xs, n, out, ostride, pf); break;
    case 2: up_block<R, 2>(w, xs, n, out, ostride, pf); break;
    case 3: up_block<R, 3>(w, xs, n, out, ostride, pf); break;
    case 4: up_block<R, 4>(w, xs, n, out, ostride, pf); break;
    case 5: up_block<R, 5>(w, xs, n, out, ostride, pf); break;
    default: up_block<R, 6>(w, xs, n, out, ostride, pf); break;
  }
}

inline void up_block_any(int r, int nt, const uint16_t* const* w, const uint16_t* const* xs,
                         int64_t n, float* const* out, int64_t ostride, const uint16_t* const* pf) {
  switch (r) {
    case 1: up_block_nt<1>(nt, w, xs, n, out, ostride, pf); break;
    case 2: up_block_nt<2>(nt, w, xs, n, out, ostride, pf); break;
    case 3: up_block_nt<3>(nt, w, xs, n, out, ostride, pf); break;
    default: up_block_nt<4>(nt, w, xs, n, out, ostride, pf); break;
  }
}

// Software prefetch (to L2) of rows r0..r0+B of W_down^T, columns [ss, ss + m): (a share of) the
// sub-tile the down phase packs next. Its rows are B streams a row stride apart, more than the
// hardware prefetcher follows: without this the pack loop's loads waited on DRAM (a third of the
// bf16 down phase's time at T = 16, perf samples; RESULTS.md session 7).
inline void prefetch_rows(const uint16_t* wd, int64_t s_down, int64_t r0, int64_t B, int64_t ss, int64_t m) {
  for (int64_t j = 0; j < B; ++j) {
    const char* p = reinterpret_cast<const char*>(wd + (r0 + j) * s_down + ss);
    for (int64_t off = 0; off < m * 2; off += 64) _mm_prefetch(p + off, _MM_HINT_T1);
  }
}

// y[t][c + 0 : 16*CB] += sum_i hp[t][i] . pk[i][c + ...] (bf16 pairs along j), NT tokens.
// tail: lanes of the last vector that exist (CB == 1 only; 16 = all).
template <int NT, int CB>
inline void down_block(const uint32_t* pk, int64_t ld, int64_t Bh, const uint32_t* const* hp,
                       float* const* y, int64_t c, int tail) {
  const __mmask16 m = tail >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << tail) - 1);
  // Local copies of the pointers: the intrinsics' stores may alias anything, and reloading the
  // pointer arrays after each one made GCC spill all accumulators.
  float* yp[NT];
  const uint32_t* hq[NT];
  for (int t = 0; t < NT; ++t) {
    yp[t] = y[t] + c;
    hq[t] = hp[t];
  }
  __m512 acc[NT][CB];
  for (int t = 0; t < NT; ++t)
    for (int b = 0; b < CB; ++b)
      acc[t][b] = CB == 1 ? _mm512_maskz_loadu_ps(m, yp[t]) : _mm512_loadu_ps(yp[t] + 16 * b);
  for (int64_t i = 0; i < Bh; ++i) {
    __m512i wv[CB];
    for (int b = 0; b < CB; ++b) wv[b] = _mm512_loadu_si512(pk + i * ld + c + 16 * b);
    for (int t = 0; t < NT; ++t) {
      const __m512i hv = _mm512_set1_epi32(static_cast<int>(hq[t][i]));
      for (int b = 0; b < CB; ++b) acc[t][b] = _mm512_dpbf16_ps(acc[t][b], as_bh(hv), as_bh(wv[b]));
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int b = 0; b < CB; ++b) {
      if (CB == 1) _mm512_mask_storeu_ps(yp[t], m, acc[t][b]);
      else _mm512_storeu_ps(yp[t] + 16 * b, acc[t][b]);
    }
}

// All of columns [0, n) for NT tokens: 64-column blocks, then 16-column ones, then a masked tail.
template <int NT>
inline void down_cols(const uint32_t* pk, int64_t ld, int64_t Bh, const uint32_t* const* hp,
                      float* const* y, int64_t n) {
  int64_t c = 0;
  for (; c + 16 * kDpCols <= n; c += 16 * kDpCols) down_block<NT, kDpCols>(pk, ld, Bh, hp, y, c, 16);
  for (; c < n; c += 16) down_block<NT, 1>(pk, ld, Bh, hp, y, c, static_cast<int>(std::min<int64_t>(16, n - c)));
}

inline void down_cols_any(int nt, const uint32_t* pk, int64_t ld, int64_t Bh,
                          const uint32_t* const* hp, float* const* y, int64_t n) {
  switch (nt) {
    case 1: down_cols<1>(pk, ld, Bh, hp, y, n); break;
    case 2: down_cols<2>(pk, ld, Bh, hp, y, n); break;
    case 3: down_cols<3>(pk, ld, Bh, hp, y, n); break;
    case 4: down_cols<4>(pk, ld, Bh, hp, y, n); break;
    case 5: down_cols<5>(pk, ld, Bh, hp, y, n); break;
    default: down_cols<6>(pk, ld, Bh, hp, y, n); break;
  }
}
#endif  // LTE_BF16_DP

// (token, expert) pairs with a nonzero scale, grouped by expert, tokens ascending within one.
struct PairIndex {
  std::vector<int64_t> count;   // [E] pairs of expert e
  std::vector<int64_t> start;   // [E + 1] first pair of expert e (prefix sums of count)
  std::vector<int32_t> tok;     // [P] token of pair p
  std::vector<float> scl;       // [P] scale of pair p: 1 (hard) or the gate (soft)
  std::vector<int64_t> active;  // experts with at least one pair, ascending
  int64_t P = 0;                // pairs in all
};

// bf16 pairs of an h row of B values (dp path; an odd B's last pair is zero-padded).
inline int64_t bf16_pairs(int64_t B) { return (B + 1) / 2; }

// Index building: which (token, expert) pairs are active (hard: gate > tau; soft: gate != 0).
PairIndex build_pair_index(const float* gates_f, int64_t T, int64_t E, bool hard, float tau) {
  PairIndex ix;
  ix.count.assign(E, 0);
  ix.start.assign(E + 1, 0);
  std::vector<int64_t>& count = ix.count;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t e = 0; e < E; ++e) {
      const float g = gates_f[t * E + e];
      count[e] += hard ? (g > tau) : (g != 0.f);
    }
  std::vector<int64_t>& start = ix.start;
  for (int64_t e = 0; e < E; ++e) start[e + 1] = start[e] + count[e];
  const int64_t P = ix.P = start[E];
  if (P == 0) return ix;  // no pair: every token keeps the down bias (already in y)
  std::vector<int32_t>& tok = ix.tok;
  tok.resize(P);
  std::vector<float>& scl = ix.scl;
  scl.resize(P);
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t e = 0; e < E; ++e) {
        const float g = gates_f[t * E + e];
        if (hard ? (g > tau) : (g != 0.f)) {
          tok[fill[e]] = static_cast<int32_t>(t);
          scl[fill[e]] = hard ? 1.f : g;
          ++fill[e];
        }
      }
  }
  std::vector<int64_t>& active = ix.active;
  for (int64_t e = 0; e < E; ++e)
    if (count[e]) active.push_back(e);
  return ix;
}

#if LTE_BF16_DP
// ---- Batch 1 (decode) on the same instructions ----------------------------------------------
// The fp32 path converts every bf16 weight before its FMA (a zero-extend and a shift per 16), which
// made batch-1 bf16 compute-bound at ~2/3 of the memory bandwidth. Up uses up_block with one token.
// Down needs no repacking: unpacklo/hi_epi16 of two W_down^T rows interleave them within each
// 128-bit lane, so the lo vector holds the pairs of columns 8*(i/4) + i%4 and the hi vector those
// of 8*(i/4) + 4 + i%4 (i = 0..15) of a 32-column chunk. Each thread keeps its y range in that order
// for the whole phase (permuted in and out once), and the rows are used as loaded.
inline int64_t t1_column(int64_t k) {  // the column (in the thread's range) held by permuted slot k
  const int64_t i = k % 16;
  return k / 32 * 32 + 8 * (i / 4) + 4 * (k % 32 / 16) + i % 4;
}

constexpr int kPairsT1 = 4;  // row pairs per pass of the batch-1 bf16 down phase

// yp[0:n) (permuted chunks) += sum_p h pair p . (rows w[2p], w[2p+1]) over NP row pairs; pf (or
// null): the next pass's 2 * kPairsT1 rows to prefetch.
template <int NP>
inline void down_pairs_t1(float* yp, const uint16_t* const* w, const uint32_t* hp, int64_t n,
                          const uint16_t* const* pf) {
  __m512i hv[NP];
  const uint16_t* wr[2 * NP];
  for (int p = 0; p < NP; ++p) hv[p] = _mm512_set1_epi32(static_cast<int>(hp[p]));
  for (int r = 0; r < 2 * NP; ++r) wr[r] = w[r];
  for (int64_t c = 0; c < n; c += 32) {
    if (pf)  // the next pass's rows, a line each per line read here (see up_block)
      for (int r = 0; r < 2 * kPairsT1; ++r) _mm_prefetch(reinterpret_cast<const char*>(pf[r] + c), _MM_HINT_T1);
    const __mmask32 m = mask32(n - c);  // masked tail: zero columns add nothing
    __m512 lo = _mm512_loadu_ps(yp + c), hi = _mm512_loadu_ps(yp + c + 16);
#pragma GCC unroll 8
    for (int p = 0; p < NP; ++p) {
      const __m512i a = _mm512_maskz_loadu_epi16(m, wr[2 * p] + c);
      const __m512i b = _mm512_maskz_loadu_epi16(m, wr[2 * p + 1] + c);
      lo = _mm512_dpbf16_ps(lo, as_bh(_mm512_unpacklo_epi16(a, b)), as_bh(hv[p]));
      hi = _mm512_dpbf16_ps(hi, as_bh(_mm512_unpackhi_epi16(a, b)), as_bh(hv[p]));
    }
    _mm512_storeu_ps(yp + c, lo);
    _mm512_storeu_ps(yp + c + 16, hi);
  }
}

// Calls fn(nt, hp, yr) for an expert's pairs p0..p0+np in chunks of up to kDpToks tokens: hp their
// h rows as bf16 pairs, yr their rows of y (row stride ys) from column yoff (both dp down paths).
template <typename F>
inline void dp_token_chunks(const std::vector<int32_t>& tok, int64_t p0, int64_t np, const uint32_t* hb,
                            int64_t Bh, float* ybase, int64_t ys, int64_t yoff, F&& fn) {
  for (int64_t c = 0; c < np; c += kDpToks) {
    const int nt = static_cast<int>(std::min<int64_t>(kDpToks, np - c));
    const uint32_t* hp[kDpToks];
    float* yr[kDpToks];
    for (int i = 0; i < nt; ++i) {
      hp[i] = hb + (p0 + c + i) * Bh;
      yr[i] = ybase + tok[p0 + c + i] * ys + yoff;
    }
    fn(nt, hp, yr);
  }
}

// Small batches' down phase without a packed copy of W_down^T (down_phase_unpacked): as in
// down_pairs_t1, two rows are interleaved in registers by unpacklo/hi_epi16, so y is kept permuted
// per 32-column chunk. NT tokens x one 64-column block (two chunks): y[t] += h pairs . (rows w[2i],
// w[2i+1]) over Bh pairs, 4 x NT accumulators; n: the block's columns that exist (masked loads).
template <int NT>
inline void down_unpacked_block(const uint16_t* const* w, int64_t Bh, const uint32_t* const* hp,
                                float* const* yp, int64_t n) {
  const __mmask32 m0 = mask32(n), m1 = mask32(n > 32 ? n - 32 : 0);
  __m512 acc[NT][4];
  for (int t = 0; t < NT; ++t)
    for (int b = 0; b < 4; ++b) acc[t][b] = _mm512_loadu_ps(yp[t] + 16 * b);
  for (int64_t i = 0; i < Bh; ++i) {
    const __m512i a0 = _mm512_maskz_loadu_epi16(m0, w[2 * i]), b0 = _mm512_maskz_loadu_epi16(m0, w[2 * i + 1]);
    const __m512i a1 = _mm512_maskz_loadu_epi16(m1, w[2 * i] + 32);
    const __m512i b1 = _mm512_maskz_loadu_epi16(m1, w[2 * i + 1] + 32);
    const __m512i v[4] = {_mm512_unpacklo_epi16(a0, b0), _mm512_unpackhi_epi16(a0, b0),
                          _mm512_unpacklo_epi16(a1, b1), _mm512_unpackhi_epi16(a1, b1)};
    for (int t = 0; t < NT; ++t) {
      const __m512i hv = _mm512_set1_epi32(static_cast<int>(hp[t][i]));
      for (int b = 0; b < 4; ++b) acc[t][b] = _mm512_dpbf16_ps(acc[t][b], as_bh(v[b]), as_bh(hv));
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int b = 0; b < 4; ++b) _mm512_storeu_ps(yp[t] + 16 * b, acc[t][b]);
}

inline void down_unpacked_any(int nt, const uint16_t* const* w, int64_t Bh, const uint32_t* const* hp,
                              float* const* yp, int64_t n) {
  switch (nt) {
    case 1: down_unpacked_block<1>(w, Bh, hp, yp, n); break;
    case 2: down_unpacked_block<2>(w, Bh, hp, yp, n); break;
    case 3: down_unpacked_block<3>(w, Bh, hp, yp, n); break;
    case 4: down_unpacked_block<4>(w, Bh, hp, yp, n); break;
    case 5: down_unpacked_block<5>(w, Bh, hp, yp, n); break;
    default: down_unpacked_block<6>(w, Bh, hp, yp, n); break;
  }
}

// The down phase of one thread for small batches (T <= kUnpackedMaxT): y[:, c0:c0+n) += h @
// W_down^T[:, c0:c0+n) over every active expert's tokens, the rows used as loaded (no pack loop:
// at T = 5-64 it cost more than the dot products, 1.08-1.17x at density 0.5-1; RESULTS.md session
// 10). The thread's columns of all T rows of y are kept permuted (t1_column) for the phase; the
// next expert's rows are prefetched a 64-column block at a time. Larger batches reuse a packed
// sub-tile across many token chunks instead (down_phase's packed path).
constexpr int64_t kUnpackedMaxT = 64;
constexpr int64_t kUnpackedMaxB = 128;  // row pointers per block on the stack
inline void down_phase_unpacked(const PairIndex& ix, int64_t T, int64_t B, const uint32_t* hb,
                                const uint16_t* wd, int64_t s_down, int64_t d_out, int64_t c0,
                                int64_t n, float* y) {
  const int64_t Bh = bf16_pairs(B), npad = (n + 63) / 64 * 64;
  std::vector<float> yp(T * npad, 0.f);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < npad; ++k)
      if (t1_column(k) < n) yp[t * npad + k] = y[t * d_out + c0 + t1_column(k)];
  std::vector<uint16_t> zero_row(B & 1 ? npad : 0, 0);  // the partner of an odd B's last row
  const int64_t A = static_cast<int64_t>(ix.active.size());
  for (int64_t a = 0; a < A; ++a) {
    const int64_t e = ix.active[a], p0 = ix.start[e], np = ix.count[e];
    for (int64_t q0 = 0; q0 < npad; q0 += 64) {
      const int64_t qn = std::min<int64_t>(64, n - q0);
      if (a + 1 < A) prefetch_rows(wd, s_down, ix.active[a + 1] * B, B, c0 + q0, qn);
      const uint16_t* w[2 * kUnpackedMaxB];
      for (int64_t j = 0; j < 2 * Bh; ++j) w[j] = j < B ? wd + (e * B + j) * s_down + c0 + q0 : zero_row.data();
      dp_token_chunks(ix.tok, p0, np, hb, Bh, yp.data(), npad, q0,
                      [&](int nt, const uint32_t* const* hp, float* const* yr) {
                        down_unpacked_any(nt, w, Bh, hp, yr, qn);
                      });
    }
  }
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < npad; ++k)
      if (t1_column(k) < n) y[t * d_out + c0 + t1_column(k)] = yp[t * npad + k];
}

// The batch-1 down phase of one thread: y[0:n) += h @ W_down^T[:, c0:c0+n) over the active experts,
// 4 row pairs per pass over the thread's (L1-resident) y range. hb: h as bf16 pairs, one row per
// expert (T = 1: one pair each).
inline void down_phase_t1(const PairIndex& ix, int64_t B, const uint32_t* hb, const uint16_t* wd,
                          int64_t s_down, int64_t c0, int64_t n, float* y) {
  constexpr int kPairs = kPairsT1;
  const int64_t Bh = bf16_pairs(B), npad = (n + 31) / 32 * 32;
  std::vector<float> yp(npad, 0.f);
  for (int64_t k = 0; k < npad; ++k)
    if (t1_column(k) < n) yp[k] = y[t1_column(k)];
  std::vector<uint16_t> zero_row(B & 1 ? npad : 0, 0);  // the partner of an odd B's last row
  const int64_t A = static_cast<int64_t>(ix.active.size());
  for (int64_t a = 0; a < A; ++a) {
    const int64_t e = ix.active[a];
    const uint32_t* hp = hb + ix.start[e] * Bh;
    for (int64_t i0 = 0; i0 < Bh; i0 += kPairs) {
      const int np = static_cast<int>(std::min<int64_t>(kPairs, Bh - i0));
      const uint16_t* w[2 * kPairs];
      for (int r = 0; r < 2 * np; ++r) {
        const int64_t j = 2 * i0 + r;
        w[r] = j < B ? wd + (e * B + j) * s_down + c0 : zero_row.data();
      }
      // The rows of the next pass (this expert's next pairs, or the next expert's first ones);
      // a pass short of rows prefetches none (tails).
      const int64_t next_e = i0 + 2 * kPairs <= Bh ? e : (i0 + kPairs >= Bh && a + 1 < A ? ix.active[a + 1] : -1);
      const int64_t next_j0 = next_e == e ? 2 * (i0 + kPairs) : 0;
      const uint16_t* pf[2 * kPairs];
      const bool prefetch = next_e >= 0 && next_j0 + 2 * kPairs <= B;
      if (prefetch)
        for (int r = 0; r < 2 * kPairs; ++r) pf[r] = wd + (next_e * B + next_j0 + r) * s_down + c0;
      const uint16_t* const* pfp = prefetch ? pf : nullptr;
      switch (np) {
        case 1: down_pairs_t1<1>(yp.data(), w, hp + i0, n, pfp); break;
        case 2: down_pairs_t1<2>(yp.data(), w, hp + i0, n, pfp); break;
        case 3: down_pairs_t1<3>(yp.data(), w, hp + i0, n, pfp); break;
        default: down_pairs_t1<4>(yp.data(), w, hp + i0, n, pfp); break;
      }
    }
  }
  for (int64_t k = 0; k < npad; ++k)
    if (t1_column(k) < n) y[t1_column(k)] = yp[k];
}
#endif  // LTE_BF16_DP

// Phase 1 (up): h[p, j] = act(x W_gate[e]^T + b_gate) * (x W_up[e]^T + b_up) * scale for every
// pair p and neuron j of its expert e, parallel over active experts. h: [P, B] fp32; hb: h as
// bf16 pairs [P, bf16_pairs(B)] when dp (empty otherwise).
template <typename W>
void up_phase(const PairIndex& ix, const float* x, const uint16_t* xb, bool dp, int64_t T,
              int64_t d, const W* w_up, int64_t s_up, const W* w_gate, int64_t s_gate,
              const W* b_up, const W* b_gate, int act, int64_t B, float* h, uint32_t* hb) {
  const std::vector<int64_t>& count = ix.count;
  const std::vector<int64_t>& start = ix.start;
  const std::vector<int32_t>& tok = ix.tok;
  const std::vector<int64_t>& active = ix.active;
  const int64_t A = static_cast<int64_t>(active.size());
  const int64_t Bh = bf16_pairs(B);
  const std::vector<float>& scl = ix.scl;
  const bool glu = w_gate != nullptr;
  (void)xb;  // the dp path only (LTE_BF16_DP builds)
  at::parallel_for(0, A, 1, [&](int64_t a0, int64_t a1) {
    std::vector<float> acc_g(glu ? T * B : 0);
    std::vector<float> stage;  // fp32 copy of a reduced-precision weight tile, see below
    for (int64_t a = a0; a < a1; ++a) {
      const int64_t e = active[a], p0 = start[e], np = count[e];
      float* hu = h + p0 * B;  // [np, B], holds the up projection until finalized
      float* hg = glu ? acc_g.data() : nullptr;
      std::fill(hu, hu + np * B, 0.f);
      if (glu) std::fill(hg, hg + np * B, 0.f);
#if LTE_BF16_DP
      if (dp) {
        const int64_t nrows = glu ? 2 * B : B;  // up rows, then gate rows
        // rows r0.. r0+R of expert e's up-then-gate rows, from column k0, as bf16 bits
        auto expert_rows = [&](int64_t ex, int64_t r0, int R, int64_t k0, const uint16_t** rows) {
          for (int r = 0; r < R; ++r) {
            const int64_t j = r0 + r;
            const W* src = j < B ? w_up + (ex * B + j) * s_up : w_gate + (ex * B + j - B) * s_gate;
            rows[r] = reinterpret_cast<const uint16_t*>(src) + k0;
          }
        };
        const int64_t dtile = np <= kDpToks ? d : kDpDTile;
        for (int64_t k0 = 0; k0 < d; k0 += dtile) {
          const int64_t kn = std::min(dtile, d - k0);
          for (int64_t c = 0; c < np; c += kDpToks) {
            const int nt = static_cast<int>(std::min<int64_t>(kDpToks, np - c));
            const uint16_t* xs[kDpToks];
            for (int i = 0; i < nt; ++i) xs[i] = xb + tok[p0 + c + i] * d + k0;
            for (int64_t r0 = 0; r0 < nrows; r0 += kDpRows) {
              const int R = static_cast<int>(std::min<int64_t>(kDpRows, nrows - r0));
              const uint16_t* wr[kDpRows];
              float* out[kDpRows];
              expert_rows(e, r0, R, k0, wr);
              for (int r = 0; r < R; ++r) {
                const int64_t j = r0 + r;
                out[r] = (j < B ? hu + j : hg + (j - B)) + c * B;
              }
              // The rows this thread reads from memory next: the expert's next block (first
              // chunk; later chunks find the expert in L2), or after its last block the next
              // expert's first one.
              const uint16_t* pf[kDpRows];
              const bool next_block = c == 0 && r0 + kDpRows + R <= nrows;
              const bool next_expert = c + kDpToks >= np && r0 + kDpRows >= nrows && a + 1 < a1 && k0 == 0 &&
                                       R <= nrows;
              if (next_block) expert_rows(e, r0 + kDpRows, R, k0, pf);
              else if (next_expert) expert_rows(active[a + 1], 0, R, k0, pf);
              up_block_any(R, nt, wr, xs, kn, out, B, next_block || next_expert ? pf : nullptr);
            }
          }
        }
      } else
#endif
      {
      // One token chunk: stream each row whole (sequential reads); several: tile d so the
      // expert's tile stays in L2 across chunks.
      const int64_t dtile = np <= kUpToks ? d : kDTile;
      // bf16/fp16 tiles reused by several chunks are converted to fp32 once, not per chunk.
      const bool staged = !std::is_same<W, float>::value && np > kUpToks;
      const int64_t nrows = glu ? 2 * B : B;  // up rows, then gate rows
      if (staged) stage.resize(nrows * dtile);
      for (int64_t k0 = 0; k0 < d; k0 += dtile) {
        const int64_t kn = std::min(dtile, d - k0);
        if (staged) {
          for (int64_t j = 0; j < nrows; ++j) {
            const W* src = j < B ? w_up + (e * B + j) * s_up + k0 : w_gate + (e * B + j - B) * s_gate + k0;
            float* dst = stage.data() + j * dtile;
            for (int64_t k = 0; k < kn; ++k) dst[k] = to_f(src[k]);
          }
        }
        for (int64_t c = 0; c < np; c += kUpToks) {
          const int nt = static_cast<int>(std::min<int64_t>(kUpToks, np - c));
          const float* xs[kUpToks];
          for (int i = 0; i < nt; ++i) xs[i] = x + tok[p0 + c + i] * d + k0;
          const int R = up_rows(nt);
          // rows r0.. r0+rr of expert ex's up-then-gate rows, from column k0
          auto expert_rows = [&](int64_t ex, int64_t r0, int rr, const W** rows) {
            for (int r = 0; r < rr; ++r) {
              const int64_t j = r0 + r;
              rows[r] = (j < B ? w_up + (ex * B + j) * s_up : w_gate + (ex * B + j - B) * s_gate) + k0;
            }
          };
          for (int64_t r0 = 0; r0 < nrows;) {
            const int rr = nrows - r0 >= R ? R : 1;  // a ragged end: one row at a time
            float res[4 * kUpToks];
            float* outs[4];
            const float* ws[4];
            const W* wr[4];
            for (int r = 0; r < rr; ++r) {
              const int64_t j = r0 + r;
              outs[r] = (j < B ? hu : hg) + (j < B ? j : j - B);
              if (staged) ws[r] = stage.data() + j * dtile;
            }
            if (!staged) expert_rows(e, r0, rr, wr);
            // The rows read next from memory (as in the bf16 path): the expert's next block in the
            // first chunk, or after its last block the next expert's first one (whole rows only).
            const W* pf[4];
            const bool next_block = !staged && c == 0 && r0 + 2 * rr <= nrows;
            const bool next_expert = !staged && c + kUpToks >= np && r0 + rr >= nrows && a + 1 < a1 &&
                                     dtile == d;
            if (next_block) expert_rows(e, r0 + rr, rr, pf);
            else if (next_expert) expert_rows(active[a + 1], 0, rr, pf);
            if (staged) dot_block_any<float>(rr, nt, ws, xs, kn, res);
            else dot_block_any<W>(rr, nt, wr, xs, kn, res, next_block || next_expert ? pf : nullptr);
            for (int r = 0; r < rr; ++r)
              for (int i = 0; i < nt; ++i) outs[r][(c + i) * B] += res[r * nt + i];
            r0 += rr;
          }
        }
      }
      }
      for (int64_t i = 0; i < np; ++i)
        for (int64_t j = 0; j < B; ++j) {
          const int64_t row = e * B + j;
          float u = hu[i * B + j] + (b_up ? to_f(b_up[row]) : 0.f);
          float v;
          if (glu) {
            const float g = hg[i * B + j] + (b_gate ? to_f(b_gate[row]) : 0.f);
            v = activation(act, g) * u;
          } else {
            v = activation(act, u);
          }
          hu[i * B + j] = v * scl[p0 + i];
        }
      if (dp) {  // h rounded to bf16 once, as pairs along j (an odd B's last pair is zero-padded)
        for (int64_t i = 0; i < np; ++i) {
          uint16_t* dst = reinterpret_cast<uint16_t*>(hb + (p0 + i) * Bh);
          for (int64_t j = 0; j < B; ++j) dst[j] = c10::BFloat16(hu[i * B + j]).x;
          if (B & 1) dst[B] = 0;
        }
      }
    }
  });
}

// Phase 2 (down): y[t, tile] += h[p, :] @ W_down^T[e, tile] over each active expert's pairs,
// parallel over column tiles of d_out (no reduction buffers: deterministic).
template <typename W>
void down_phase(const PairIndex& ix, bool dp, int64_t T, int64_t B, const float* h,
                const uint32_t* hb, const W* w_down, int64_t s_down, int64_t d_out, float* y) {
  const std::vector<int64_t>& count = ix.count;
  const std::vector<int64_t>& start = ix.start;
  const std::vector<int32_t>& tok = ix.tok;
  const std::vector<int64_t>& active = ix.active;
  const int64_t A = static_cast<int64_t>(active.size());
  const int64_t Bh = bf16_pairs(B);
  (void)hb; (void)Bh;  // the dp path only (LTE_BF16_DP builds)
  // Column tile: the y tiles of all T tokens should stay in L2 (256 KB); at batch 1 each thread
  // streams its own column range of every row (row segments >= 256 floats): one tile per thread,
  // or the whole down phase (a third of the FFN's bytes) would run on one core.
  const int64_t nth = std::max<int64_t>(1, at::get_num_threads());
  int64_t ct = std::max<int64_t>(256, ((d_out + nth - 1) / nth + 63) / 64 * 64);
  if (T > 1) {
    // Batches: the y tile may shrink to 64 columns (T = 2048: 512 KB, in L2; 256 columns = 2 MB
    // spilled to L3 and halved the down phase's rate), and every thread gets a tile (at T = 16 a
    // single 4096-column tile would run on one core).
    ct = std::max<int64_t>(64, ((int64_t{1} << 16) / T) / 64 * 64);
    ct = std::min(ct, std::max<int64_t>(64, ((d_out + nth - 1) / nth + 63) / 64 * 64));
  }
  const int64_t ntiles = (d_out + ct - 1) / ct;
  at::parallel_for(0, ntiles, 1, [&](int64_t i0, int64_t i1) {
    const int64_t c0 = i0 * ct, c1 = std::min(d_out, i1 * ct);
    // At batch 1 the thread's whole range is one tile; otherwise ct columns at a time.
    const int64_t step = (T == 1) ? (c1 - c0) : ct;
#if LTE_BF16_DP
    if (dp && T == 1) {
      down_phase_t1(ix, B, hb, reinterpret_cast<const uint16_t*>(w_down), s_down, c0, c1 - c0, y + c0);
      return;
    }
    if (dp && T <= kUnpackedMaxT && B <= kUnpackedMaxB) {
      for (int64_t cs = c0; cs < c1; cs += ct)  // a y tile of T x ct floats at a time (in L2)
        down_phase_unpacked(ix, T, B, hb, reinterpret_cast<const uint16_t*>(w_down), s_down, d_out, cs,
                            std::min(ct, c1 - cs), y);
      return;
    }
#endif
    std::vector<float> stage;  // fp32 copy of a reduced-precision W_down tile (batches)
#if LTE_BF16_DP
    std::vector<uint32_t> pk(dp ? Bh * kDpSub : 0);
#endif
    for (int64_t cs = c0; cs < c1; cs += step) {
      const int64_t n = std::min(step, c1 - cs);
      for (int64_t a = 0; a < A; ++a) {
        const int64_t e = active[a], p0 = start[e], np = count[e];
#if LTE_BF16_DP
        if (dp) {
          const uint16_t* wd = reinterpret_cast<const uint16_t*>(w_down);
          for (int64_t ss = cs; ss < cs + n; ss += kDpSub) {
            const int64_t m = std::min(kDpSub, cs + n - ss);
            const int64_t mpad = (m + 15) / 16 * 16;
            // The sub-tile packed next (this expert's, or the next one's): rows next_r0.., columns
            // [next_ss, next_ss + next_m), prefetched in shares below.
            int64_t next_r0 = -1, next_ss = 0, next_m = 0;
            if (ss + kDpSub < cs + n) {
              next_r0 = e * B, next_ss = ss + kDpSub, next_m = std::min(kDpSub, cs + n - ss - kDpSub);
            } else if (a + 1 < A) {
              next_r0 = active[a + 1] * B, next_ss = cs, next_m = std::min(kDpSub, n);
            }
            for (int64_t i = 0; i < Bh; ++i) {  // interleave rows 2i, 2i+1 of this sub-tile
              const uint16_t* r0 = wd + (e * B + 2 * i) * s_down + ss;
              const uint16_t* r1 = 2 * i + 1 < B ? wd + (e * B + 2 * i + 1) * s_down + ss : nullptr;
              uint32_t* dst = pk.data() + i * kDpSub;
              if (r1) for (int64_t c = 0; c < m; ++c) dst[c] = uint32_t(r0[c]) | (uint32_t(r1[c]) << 16);
              else for (int64_t c = 0; c < m; ++c) dst[c] = r0[c];
              for (int64_t c = m; c < mpad; ++c) dst[c] = 0;
            }
            // Slices of one micro-kernel width (16 * kDpCols columns), each after a share of the
            // next sub-tile's prefetches: its DRAM reads then overlap these dot products (issued
            // at once, the sub-tile's ~256 line prefetches stalled the core until they drained:
            // the down phase 16-37 % slower at T = 16, RESULTS.md session 10).
            constexpr int64_t kSlice = 16 * kDpCols;
            const int64_t slices = (m + kSlice - 1) / kSlice;
            for (int64_t q = 0; q < slices; ++q) {
              if (next_r0 >= 0) {
                const int64_t j0 = q * B / slices, j1 = (q + 1) * B / slices;
                prefetch_rows(wd, s_down, next_r0 + j0, j1 - j0, next_ss, next_m);
              }
              const int64_t q0 = q * kSlice;
              dp_token_chunks(tok, p0, np, hb, Bh, y, d_out, ss + q0,
                              [&](int nt, const uint32_t* const* hp, float* const* yr) {
                                down_cols_any(nt, pk.data() + q0, kDpSub, Bh, hp, yr, std::min(kSlice, m - q0));
                              });
            }
          }
          continue;
        }
#endif
        if (np == 1) {  // one token (decode): stream kRowGroup rows at a time through y
          for (int64_t r0 = 0; r0 < B; r0 += kRowGroup) {
            const int R = static_cast<int>(std::min<int64_t>(kRowGroup, B - r0));
            const W* wr[kRowGroup];
            for (int r = 0; r < R; ++r) wr[r] = w_down + (e * B + r0 + r) * s_down + cs;
            // the next group's rows (this expert's, or the next expert's first), when it is as
            // tall as this one
            const int64_t next_e = r0 + 2 * R <= B ? e : (r0 + R >= B && a + 1 < A ? active[a + 1] : -1);
            const int64_t next_r0 = next_e == e ? r0 + R : 0;
            const W* pf[kRowGroup];
            const bool prefetch = next_e >= 0 && next_r0 + R <= B;
            if (prefetch)
              for (int r = 0; r < R; ++r) pf[r] = w_down + (next_e * B + next_r0 + r) * s_down + cs;
            axpy_rows<W>(y + tok[p0] * d_out + cs, wr, h + p0 * B + r0, R, n, prefetch ? pf : nullptr);
          }
          continue;
        }
        // Several tokens share the expert's [B, n] tile: register-blocked over tokens and columns
        // (down_block), reduced-precision weights converted to fp32 once.
        const float* wt;
        int64_t wst;
        if constexpr (std::is_same<W, float>::value) {
          wt = w_down + e * B * s_down + cs;
          wst = s_down;
        } else {
          stage.resize(B * n);
          for (int64_t j = 0; j < B; ++j) {
            const W* src = w_down + (e * B + j) * s_down + cs;
            for (int64_t c = 0; c < n; ++c) stage[j * n + c] = to_f(src[c]);
          }
          wt = stage.data();
          wst = n;
        }
        for (int64_t c = 0; c < np; c += kDownToks) {
          const int nt = static_cast<int>(std::min<int64_t>(kDownToks, np - c));
          const float* hr[kDownToks];
          float* yr[kDownToks];
          for (int i = 0; i < nt; ++i) {
            hr[i] = h + (p0 + c + i) * B;
            yr[i] = y + tok[p0 + c + i] * d_out + cs;
          }
          down_cols_fp32_any(nt, wt, wst, B, hr, yr, n);
        }
      }
    }
  });
}

template <typename W>
void sparse_ffn_impl(const float* x, int64_t T, int64_t d, const float* gates_f, int64_t E,
                     const W* w_up, int64_t s_up, const W* w_gate, int64_t s_gate,
                     const W* w_down, int64_t s_down, int64_t d_out,
                     const W* b_up, const W* b_gate, int act, int64_t B, bool hard,
                     float tau, float* y, const uint16_t* xb) {
  // xb: x as bf16 bits [T, d] when x and the weights are bf16 and the CPU has AVX512-BF16 (the
  // launcher checks), else nullptr; every expert then takes the dp path.
  const bool dp = LTE_BF16_DP && xb != nullptr;
  const PairIndex ix = build_pair_index(gates_f, T, E, hard, tau);
  if (ix.P == 0) return;  // every token gets the down bias only (already in y)
  std::vector<float> h(ix.P * B);
  std::vector<uint32_t> hb(dp ? ix.P * bf16_pairs(B) : 0);
  up_phase<W>(ix, x, xb, dp, T, d, w_up, s_up, w_gate, s_gate, b_up, b_gate, act, B, h.data(),
              hb.data());
  down_phase<W>(ix, dp, T, B, h.data(), hb.data(), w_down, s_down, d_out, y);
}

bool bf16_dp_supported() {
#if LTE_BF16_DP
  static const bool ok = __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}

int act_code(const std::string& act) {
  if (act == "relu") return kRelu;
  if (act == "gelu") return kGelu;
  if (act == "gelu_tanh") return kGeluTanh;
  if (act == "silu") return kSilu;
  if (act == "relu2") return kRelu2;
  if (act == "quick_gelu") return kQuickGelu;
  TORCH_CHECK(false, "lte sparse_ffn_cpu: unknown activation ", act);
}

// Rows must have unit stride along the feature dim; any row stride is fine. Anything else is
// copied (a full weight copy per call: the caller should store weights in kernel layout).
torch::Tensor rows_unit_stride(const torch::Tensor& w) {
  return (w.dim() == 2 && w.stride(1) == 1) ? w : w.contiguous();
}

// ---- Dense-then-mask path (dispatch kernel "dense") -----------------------------------------
// What autotune falls back to where the gathered kernel is slower: the reference's math with
// Inductor's dense cost. Up and gate are MKL/oneDNN GEMMs (at::mm / at::addmm) into fresh
// [T, N] buffers, then ONE fused pass h = act(gate) * up * scale written over `up` (the
// reference takes three: act, the product, the mask multiply, each allocating [T, N]), then
// the down GEMM with the bias folded in (addmm). The mask is a multiply, not a skip, so a
// non-finite h of an off expert stays NaN in y as in the reference (NaN * 0).

using at::vec::Vectorized;
using VecF = Vectorized<float>;

inline VecF activation_vec(int act, VecF a) {
  switch (act) {
    case kRelu: return at::vec::maximum(a, VecF(0.f));
    case kGelu: return VecF(0.5f) * a * (VecF(1.f) + (a * VecF(0.70710678118654752f)).erf());
    case kGeluTanh: {
      const VecF k(0.7978845608028654f), c(0.044715f);
      return VecF(0.5f) * a * (VecF(1.f) + (k * (a + c * a * a * a)).tanh());
    }
    case kRelu2: {
      const VecF r = at::vec::maximum(a, VecF(0.f));
      return r * r;
    }
    case kQuickGelu: return a / (VecF(1.f) + (VecF(-1.702f) * a).exp());
    default: return a / (VecF(1.f) + a.neg().exp());
  }
}

// Row t of h (in place over up): act(gate) * up (or act(up)), then each expert's B values times
// its scale; the multiply is skipped only for a scale of exactly 1 (x * 1 == x, NaN included).
template <typename T_>
void epilogue_row(T_* up, const T_* gate, const float* scale, int64_t E, int64_t B, int act) {
  const int64_t n = E * B;
  if constexpr (std::is_same<T_, float>::value) {
    const int64_t L = VecF::size();
    int64_t j = 0;
    for (; j + L <= n; j += L) {
      const VecF u = VecF::loadu(up + j);
      const VecF h = gate ? activation_vec(act, VecF::loadu(gate + j)) * u : activation_vec(act, u);
      h.store(up + j);
    }
    for (; j < n; ++j) up[j] = gate ? activation(act, gate[j]) * up[j] : activation(act, up[j]);
  } else {
    // 16-bit: widen L values to fp32 on the stack, the vector activation (exp / erf / tanh are
    // most of this pass; the scalar loop made the bf16 fallback 0.3-0.5 ms slower than Inductor's
    // silu * mul at T = 16, TinyLlama), round back once.
    const int64_t L = VecF::size();
    float ub[VecF::size()], gb[VecF::size()];
    int64_t j = 0;
    for (; j + L <= n; j += L) {
      for (int64_t i = 0; i < L; ++i) ub[i] = to_f(up[j + i]);
      if (gate) for (int64_t i = 0; i < L; ++i) gb[i] = to_f(gate[j + i]);
      const VecF u = VecF::loadu(ub);
      const VecF h = gate ? activation_vec(act, VecF::loadu(gb)) * u : activation_vec(act, u);
      h.store(ub);
      for (int64_t i = 0; i < L; ++i) up[j + i] = static_cast<T_>(ub[i]);
    }
    for (; j < n; ++j) {
      const float u = to_f(up[j]);
      up[j] = static_cast<T_>(gate ? activation(act, to_f(gate[j])) * u : activation(act, u));
    }
  }
  for (int64_t e = 0; e < E; ++e) {
    const float s = scale[e];
    if (s == 1.f) continue;
    T_* blk = up + e * B;
    for (int64_t j = 0; j < B; ++j) blk[j] = static_cast<T_>(to_f(blk[j]) * s);
  }
}

}  // namespace

torch::Tensor dense_masked_ffn(torch::Tensor x, torch::Tensor gates, torch::Tensor w_up,
                               c10::optional<torch::Tensor> w_gate, torch::Tensor w_down,
                               c10::optional<torch::Tensor> b_up, c10::optional<torch::Tensor> b_gate,
                               c10::optional<torch::Tensor> b_down, std::string act,
                               int64_t expert_size, std::string mode, double tau) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && gates.dim() == 2,
              "lte dense_masked_ffn: x [T, d] and gates [T, E] on the CPU");
  const bool hard = mode == "hard";
  TORCH_CHECK(hard || mode == "soft", "lte dense_masked_ffn: mode must be soft|hard, got ", mode);
  const int64_t T = x.size(0), E = gates.size(1), B = expert_size;
  TORCH_CHECK(w_up.size(0) == E * B, "lte dense_masked_ffn: w_up rows != E*B");
  const int code = act_code(act);
  auto linear = [&](const torch::Tensor& w, const c10::optional<torch::Tensor>& b) {
    return b ? at::addmm(*b, x, w.t()) : at::mm(x, w.t());
  };
  torch::Tensor up = linear(w_up, b_up);  // [T, N], contiguous
  torch::Tensor gate = w_gate ? linear(*w_gate, b_gate) : torch::Tensor();
  // The scale in fp32 exactly as the reference forms it: (gates > tau) in the gates' dtype (hard),
  // the gate rounded to h's dtype (soft).
  torch::Tensor scale = hard ? gates.gt(tau).to(at::kFloat)
                             : gates.to(up.scalar_type()).to(at::kFloat);
  scale = scale.contiguous();
  const float* sc = scale.data_ptr<float>();
  auto run = [&](auto tag) {
    using T_ = decltype(tag);
    T_* u = up.data_ptr<T_>();
    const T_* g = gate.defined() ? gate.data_ptr<T_>() : nullptr;
    const int64_t N = E * B;
    at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        epilogue_row<T_>(u + t * N, g ? g + t * N : nullptr, sc + t * E, E, B, code);
    });
  };
  const auto dt = up.scalar_type();
  if (dt == at::kFloat) run(float{});
  else if (dt == at::kBFloat16) run(c10::BFloat16{});
  else if (dt == at::kHalf) run(c10::Half{});
  else TORCH_CHECK(false, "lte dense_masked_ffn: dtype ", dt, " is not float32/bfloat16/float16");
  return b_down ? at::addmm(*b_down, up, w_down) : at::mm(up, w_down);
}

// The launcher: same signature as the op (see kernels/ops.py) minus nothing; returns y [T, d_out].
// sparse_ffn_cpu with x already converted: xf = x as fp32 [T, d], contiguous (the routed path
// converts once for the router and the kernel).
torch::Tensor sparse_ffn_core(const torch::Tensor& x, const torch::Tensor& xf, const torch::Tensor& gates,
                              const torch::Tensor& w_up, const c10::optional<torch::Tensor>& w_gate,
                              const torch::Tensor& w_down, const c10::optional<torch::Tensor>& b_up,
                              const c10::optional<torch::Tensor>& b_gate,
                              const c10::optional<torch::Tensor>& b_down, const std::string& act,
                              int64_t expert_size, const std::string& mode, double tau) {
  TORCH_CHECK(x.device().is_cpu(), "lte sparse_ffn_cpu: tensors must be on the CPU");
  const auto dt = w_up.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "lte sparse_ffn_cpu: dtype ", dt, " is not float32/bfloat16/float16");
  const bool hard = mode == "hard";
  TORCH_CHECK(hard || mode == "soft", "lte sparse_ffn_cpu: mode must be soft|hard, got ", mode);
  const int64_t T = x.size(0), d = x.size(1), E = gates.size(1), d_out = w_down.size(1);
  const int64_t B = expert_size;
  TORCH_CHECK(w_up.size(0) == E * B && w_down.size(0) == E * B && w_up.size(1) == d,
              "lte sparse_ffn_cpu: shapes do not match E*B neurons");

  // The threshold is compared in the gates' dtype, as (gates > tau) does in the reference.
  float tau_f = static_cast<float>(tau);
  if (gates.scalar_type() == at::kBFloat16) tau_f = static_cast<float>(c10::BFloat16(tau_f));
  if (gates.scalar_type() == at::kHalf) tau_f = static_cast<float>(c10::Half(tau_f));
  auto gf = gates.to(at::kFloat).contiguous();  // [T, E]
  auto wu = rows_unit_stride(w_up);
  auto wd = rows_unit_stride(w_down);
  torch::Tensor wg;
  if (w_gate) {
    TORCH_CHECK(w_gate->scalar_type() == dt, "lte sparse_ffn_cpu: w_gate dtype differs from w_up");
    wg = rows_unit_stride(*w_gate);
  }
  TORCH_CHECK(w_down.scalar_type() == dt, "lte sparse_ffn_cpu: w_down dtype differs from w_up");
  auto bias = [&](const c10::optional<torch::Tensor>& b) {
    return b ? b->to(dt).contiguous() : torch::Tensor();
  };
  auto bu = bias(b_up), bg = bias(b_gate);

  // fp32 accumulator that starts as the down bias (or zeros): a token with no active expert
  // keeps exactly that.
  // (A fresh tensor: the op's output must never alias an input such as b_down.)
  auto yf = torch::empty({T, d_out}, x.options().dtype(at::kFloat));
  if (b_down) yf.copy_(b_down->reshape({1, d_out}).expand({T, d_out}));
  else yf.zero_();

  const int code = act_code(act);
  // bf16 x and weights on an AVX512-BF16 CPU: the grouped path uses bf16 dot products on x itself
  // (exact: x is bf16 already); a batch of one too (down_phase_t1).
  torch::Tensor xb;
  if (LTE_BF16_DP && dt == at::kBFloat16 && x.scalar_type() == at::kBFloat16 &&
      bf16_dp_supported())
    xb = x.contiguous();
  auto run = [&](auto tag) {
    using W = decltype(tag);
    sparse_ffn_impl<W>(xf.data_ptr<float>(), T, d, gf.data_ptr<float>(), E,
                       wu.data_ptr<W>(), wu.stride(0),
                       wg.defined() ? wg.data_ptr<W>() : nullptr, wg.defined() ? wg.stride(0) : 0,
                       wd.data_ptr<W>(), wd.stride(0), d_out,
                       bu.defined() ? bu.data_ptr<W>() : nullptr,
                       bg.defined() ? bg.data_ptr<W>() : nullptr, code, B, hard, tau_f,
                       yf.data_ptr<float>(), xb.defined() ? reinterpret_cast<const uint16_t*>(xb.data_ptr()) : nullptr);
  };
  if (dt == at::kFloat) run(float{});
  else if (dt == at::kBFloat16) run(c10::BFloat16{});
  else run(c10::Half{});
  return yf.scalar_type() == x.scalar_type() ? yf : yf.to(x.scalar_type());
}

torch::Tensor sparse_ffn_cpu(torch::Tensor x, torch::Tensor gates, torch::Tensor w_up,
                             c10::optional<torch::Tensor> w_gate, torch::Tensor w_down,
                             c10::optional<torch::Tensor> b_up, c10::optional<torch::Tensor> b_gate,
                             c10::optional<torch::Tensor> b_down, std::string act,
                             int64_t expert_size, std::string mode, double tau) {
  auto xf = x.to(at::kFloat).contiguous();  // [T, d]: tiny next to the weights
  return sparse_ffn_core(x, xf, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, act, expert_size, mode, tau);
}

// The ops' NaN policy (kernels/reference.py nan_rows_like_eager): rows whose x has a NaN/Inf are
// NaN, as in the eager masked FFN (NaN * 0 = NaN); the kernel skips off experts and would return
// b_down there.
torch::Tensor nan_rows_like_eager(const torch::Tensor& x, torch::Tensor y) {
  // One reduction and a scalar read (at::isfinite on the sum would add four more ATen ops per call).
  if (std::isfinite(x.sum(at::kFloat).item<float>())) return y;
  auto bad = at::logical_not(at::isfinite(x).all(-1, /*keepdim=*/true));
  return y.masked_fill(bad, std::numeric_limits<double>::quiet_NaN());
}

// True if every element of xf is finite: one vector sum (a NaN or Inf makes it non-finite; a
// finite x whose sum overflows is sent to the exact check, nan_rows_like_eager, too).
bool all_finite(const torch::Tensor& xf) {
  const float* xp = xf.data_ptr<float>();
  const int64_t n = xf.numel();
  vfl acc{};
  int64_t i = 0;
  for (; i + LTE_LANES <= n; i += LTE_LANES) acc += loadv(xp + i);
  float sum = hsumv(acc);
  for (; i < n; ++i) sum += xp[i];
  return std::isfinite(sum);
}

// gates[t, e] = sigmoid(<x[t], w_r[e]> + b_r[e]) in fp32 (LTERouter keeps its weights fp32): the
// router GEMV, parallel over blocks of kRows expert rows (>= 64 KB of weights per task) with phase
// 1's dot micro-kernel, kUpToks tokens at a time. xf: fp32 [T, d] contiguous; w_r: fp32 [E, d].
torch::Tensor router_gates(const torch::Tensor& xf, const torch::Tensor& w_r, const c10::optional<torch::Tensor>& b_r) {
  constexpr int64_t kRows = 4;
  const int64_t T = xf.size(0), d = xf.size(1), E = w_r.size(0);
  auto wr = w_r.contiguous();
  torch::Tensor br;
  if (b_r) br = b_r->to(at::kFloat).contiguous();
  auto gates = torch::empty({T, E}, xf.options());
  const float* xp = xf.data_ptr<float>();
  const float* wp = wr.data_ptr<float>();
  const float* bp = br.defined() ? br.data_ptr<float>() : nullptr;
  float* gp = gates.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / (kRows * d * 4));
  at::parallel_for(0, (E + kRows - 1) / kRows, grain, [&](int64_t b0, int64_t b1) {
    float out[kRows * kUpToks];
    const int64_t end = std::min(E, b1 * kRows);
    for (int64_t e = b0 * kRows; e < end;) {
      const int r = end - e >= kRows ? kRows : (end - e >= 2 ? 2 : 1);  // dot_block_any: 4, 2 or 1 rows
      const float* w[kRows];
      for (int i = 0; i < r; ++i) w[i] = wp + (e + i) * d;
      for (int64_t t0 = 0; t0 < T; t0 += kUpToks) {
        const int nt = static_cast<int>(std::min<int64_t>(kUpToks, T - t0));
        const float* xs[kUpToks];
        for (int t = 0; t < nt; ++t) xs[t] = xp + (t0 + t) * d;
        dot_block_any<float>(r, nt, w, xs, d, out);
        for (int i = 0; i < r; ++i)
          for (int t = 0; t < nt; ++t)
            gp[(t0 + t) * E + e + i] = 1.f / (1.f + std::exp(-(out[i * nt + t] + (bp ? bp[e + i] : 0.f))));
      }
      e += r;
    }
  });
  return gates;
}

// The router fused into the op (kernels/ops.py lte::routed_sparse_ffn_inference, batch-1 decode):
// `router_gates`, then the FFN on the mask gates > tau. Why here: at batch 1 the router is a GEMV
// over E x d weights that a separate addmm call reads at a fraction of the bandwidth the kernel
// streams at, plus a call and a sigmoid kernel per layer. Returns (y [T, d_out], gates [T, E] fp32);
// the gates are what the router would have stored (`last_gates`). y follows the ops' NaN policy.
std::tuple<torch::Tensor, torch::Tensor> routed_sparse_ffn_cpu(
    torch::Tensor x, torch::Tensor w_r, c10::optional<torch::Tensor> b_r, torch::Tensor w_up,
    c10::optional<torch::Tensor> w_gate, torch::Tensor w_down, c10::optional<torch::Tensor> b_up,
    c10::optional<torch::Tensor> b_gate, c10::optional<torch::Tensor> b_down, std::string act,
    int64_t expert_size, double tau) {
  TORCH_CHECK(x.device().is_cpu() && w_r.device().is_cpu(), "lte routed_sparse_ffn_cpu: tensors must be on the CPU");
  TORCH_CHECK(w_r.scalar_type() == at::kFloat && w_r.dim() == 2 && x.dim() == 2 && w_r.size(1) == x.size(1),
              "lte routed_sparse_ffn_cpu: w_r must be float32 [E, d] with x [T, d]");
  auto xf = x.to(at::kFloat).contiguous();  // once, for the router and the kernel
  auto gates = router_gates(xf, w_r, b_r);
  auto y = sparse_ffn_core(x, xf, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, act, expert_size, "hard", tau);
  return {all_finite(xf) ? y : nan_rows_like_eager(x, y), gates};
}

// The router alone, for batches (kernels/dispatch.py routed_sparse_ffn_forward, 4 < T <= its
// ROUTER_CPP_MAX_T): (gates [T, E] fp32, number of pairs with gate > tau, whether x is finite).
// The count is the density the dispatch's choice needs and the flag decides the NaN policy:
// what the torch router cost in ATen calls (addmm, sigmoid, a cast, a compare, a mean, a sum and
// their reads) is one pass here.
std::tuple<torch::Tensor, int64_t, bool> route_cpu(torch::Tensor x, torch::Tensor w_r,
                                                    c10::optional<torch::Tensor> b_r, double tau) {
  TORCH_CHECK(x.device().is_cpu() && w_r.device().is_cpu(), "lte route_cpu: tensors must be on the CPU");
  TORCH_CHECK(w_r.scalar_type() == at::kFloat && w_r.dim() == 2 && x.dim() == 2 && w_r.size(1) == x.size(1),
              "lte route_cpu: w_r must be float32 [E, d] with x [T, d]");
  auto xf = x.to(at::kFloat).contiguous();
  auto gates = router_gates(xf, w_r, b_r);
  const float* gp = gates.data_ptr<float>();
  const float t = static_cast<float>(tau);
  int64_t used = 0;
  for (int64_t i = 0, n = gates.numel(); i < n; ++i) used += gp[i] > t;
  return {gates, used, all_finite(xf)};
}

// True if bf16 batches run on the AVX512-BF16 micro-kernels here (built with them, CPU has them).
bool bf16_dot_kernel() { return bf16_dp_supported(); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_ffn_cpu", &sparse_ffn_cpu, "LTE gathered sparse FFN (CPU)");
  m.def("dense_masked_ffn", &dense_masked_ffn, "LTE FFN: dense GEMMs, fused act*up*mask (CPU)");
  m.def("routed_sparse_ffn_cpu", &routed_sparse_ffn_cpu, "LTE router + gathered sparse FFN (CPU, hard mode)");
  m.def("route_cpu", &route_cpu, "LTE router: gates, pairs above tau, x finite (CPU)");
  m.def("bf16_dot_kernel", &bf16_dot_kernel, "bf16 batches use the AVX512-BF16 path");
}
