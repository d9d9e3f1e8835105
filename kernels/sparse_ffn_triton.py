"""Triton gathered sparse FFN (GPU; runs under TRITON_INTERPRET=1 for tests).

Letters: T tokens, d model dim, d_out output dim, E experts, B expert size (neurons per expert),
N = E*B neurons, s sparsity, P (token, expert) pairs, BM rows per grouped tile.

Contract: `reference.sparse_ffn_reference` (same signature as `sparse_ffn_triton`).
Tests: tests/kernels/test_sparse_ffn_triton.py. Benchmark: `python benchmarks/bench_kernels.py`;
`python -m lte_compile.kernels.sparse_ffn_triton` runs a check and a small timing on CUDA.
Importing it registers the dispatch kernel "triton" (dispatch imports it on first lookup).

Two paths, chosen by token count (`DECODE_MAX_T`):

* decode (T <= DECODE_MAX_T): no index is built at all. `_decode_up_kernel` runs one program per
  (expert, row block); a program whose expert no token uses skips its whole body, so its weight
  rows are never read (its programs also zero the fp32 y and flag tokens whose x is non-finite).
  `_decode_down_kernel` runs one program per (group of GROUP_E experts, d_out tile): the group's
  gates in one load, its experts' W_down^T loads unrolled and predicated off for unused experts
  (no memory traffic), the sum `tl.atomic_add`ed into y; group 0 adds b_down and the NaN rows.
  Products are broadcast-multiply + `tl.sum`, not `tl.dot` (which needs >= 16 rows; ScatterMoE's
  single-token kernel does the same).
* grouped (larger T, prefill): (token, expert) pairs are sorted by expert and each expert padded
  to BM rows (vLLM's moe_align_block_size), built with static-shape torch ops on the device (no
  `nonzero`, no host sync: CUDA graphs work). `_grouped_up_kernel` runs one program per BM-row
  tile: gathers its tokens' x rows, `tl.dot` against the expert's B rows of W_up/W_gate,
  activation, GLU and gate scale, stored into a zeroed [T, N] h; the down projection is then one
  dense GEMM, h @ W_down^T. The up projections (2/3 of the FLOPs) skip unused pairs. The design
  before (each tile's rank-B down product `tl.atomic_add`ed into y: a whole d_out row of atomics
  per used pair) measured 7-14x slower than cuBLAS at T = 2048 on an H200 (benchmarks/RESULTS.md);
  this one is not measured on a GPU yet, and `dispatch.cuda_rule` sends batches to cuBLAS + mask.

Beside them, "dense_triton" (`dense_masked_ffn_triton`): every expert through cuBLAS, then act *
up * mask in one Triton pass over [T, N] (the reference runs it as five kernels). Not measured on
a GPU yet; `dispatch.cuda_rule` keeps batches on the reference until it is.

All accumulation is fp32; fp32 dots use IEEE precision (no TF32) to match the reference. Block
sizes are autotuned on CUDA (keyed by shape); in the interpreter fixed big blocks keep the
program count (~0.4 ms each) low. bf16 `tl.dot` is wrong in the interpreter (triton #11584):
`UPCAST_DOT` converts dot operands to fp32 there, and only there.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .dispatch import register_kernel
from .reference import ACTIVATIONS, nan_rows_like_eager

DECODE_MAX_T = 8
# ACT constexpr of `_act` per activation name; the names are the op's (reference.ACTIVATIONS).
_ACT_CODES = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3, "relu2": 4, "quick_gelu": 5}
if set(_ACT_CODES) != set(ACTIVATIONS):  # a new activation needs a branch in `_act` first
    raise ImportError(f"sparse_ffn_triton implements {sorted(_ACT_CODES)}, the op accepts {ACTIVATIONS}")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _activation(a, ACT: tl.constexpr):
    """a: fp32 -> act(a); ACT: 0 relu, 1 gelu (erf), 2 gelu (tanh), 3 silu, 4 relu2, 5 quick_gelu."""
    if ACT == 0:
        return tl.maximum(a, 0.0)
    elif ACT == 1:
        return 0.5 * a * (1.0 + tl.erf(a * 0.7071067811865476))
    elif ACT == 2:
        z = 0.7978845608028654 * (a + 0.044715 * a * a * a)
        return 0.5 * a * (1.0 + (2.0 * tl.sigmoid(2.0 * z) - 1.0))  # tanh(z) = 2 sigmoid(2z) - 1
    elif ACT == 4:
        r = tl.maximum(a, 0.0)
        return r * r  # squared ReLU
    elif ACT == 5:
        return a * tl.sigmoid(1.702 * a)  # quick GELU
    else:
        return a * tl.sigmoid(a)


@triton.jit
def _hidden(acc_u, acc_g, bu_ptr, bg_ptr, rows, b_mask, ACT: tl.constexpr, GLU: tl.constexpr,
            HAS_BU: tl.constexpr, HAS_BG: tl.constexpr):
    """[rows of tokens, neurons] pre-activations -> act(gate + b_gate) * (up + b_up), or act(up + b_up)."""
    if HAS_BU:
        acc_u += tl.load(bu_ptr + rows, mask=b_mask, other=0.0).to(tl.float32)[None, :]
    if GLU:
        if HAS_BG:
            acc_g += tl.load(bg_ptr + rows, mask=b_mask, other=0.0).to(tl.float32)[None, :]
        return _activation(acc_g, ACT) * acc_u
    else:
        return _activation(acc_u, ACT)


@triton.jit
def _gate_scale(g, tau, HARD: tl.constexpr):
    """Per-pair scale from a gate: 0/1 mask g > tau (hard) or the gate itself (soft), fp32."""
    if HARD:
        return tl.where(g > tau, 1.0, 0.0)
    else:
        return g.to(tl.float32)


# ---------------------------------------------------------------------------------------------
# decode: T <= DECODE_MAX_T
# ---------------------------------------------------------------------------------------------
@triton.jit
def _decode_up_kernel(
    # pointers (y: the fp32 output, zeroed here; bad: per-token "x has a NaN/Inf" flags, set here)
    x_ptr, g_ptr, wu_ptr, wg_ptr, bu_ptr, bg_ptr, h_ptr, y_ptr, bad_ptr,
    # dimensions (ZERO_CHUNK: elements of y each program zeroes)
    T, d, tau, y_numel, ZERO_CHUNK,
    # strides
    stride_xt, stride_xd, stride_gt, stride_ge, stride_wun, stride_wud, stride_wgn, stride_wgd,
    stride_ht, stride_hn,
    # meta-parameters
    EXPERT_SIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr, ACT: tl.constexpr, GLU: tl.constexpr, HAS_BU: tl.constexpr,
    HAS_BG: tl.constexpr, HARD: tl.constexpr,
):
    """h[t, rows] = act(x W_gate[rows]^T + b_gate) * (x W_up[rows]^T + b_up) * scale[t, e].

    Also, so that decode needs no other kernel before the down one: every program zeroes its
    ZERO_CHUNK of the contiguous fp32 y (the down kernel accumulates into it), and program (0, 0)
    flags the tokens whose x has a non-finite value (the ops' NaN policy, applied by the down kernel)."""
    e = tl.program_id(0)
    pid = e * tl.num_programs(1) + tl.program_id(1)
    offs_z = tl.arange(0, 256)
    for z0 in range(pid * ZERO_CHUNK, (pid + 1) * ZERO_CHUNK, 256):
        tl.store(y_ptr + z0 + offs_z, tl.zeros((256,), dtype=tl.float32),
                 mask=(z0 + offs_z < y_numel) & (z0 + offs_z < (pid + 1) * ZERO_CHUNK))
    offs_t = tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    if pid == 0:
        n_bad = tl.zeros((BLOCK_T,), dtype=tl.int32)
        for k0 in range(0, d, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xk = tl.load(x_ptr + offs_t[:, None] * stride_xt + offs_k[None, :] * stride_xd,
                         mask=t_mask[:, None] & (offs_k < d)[None, :], other=0.0).to(tl.float32)
            n_bad += tl.sum(((xk != xk) | (tl.abs(xk) == float("inf"))).to(tl.int32), axis=1)
        tl.store(bad_ptr + offs_t, n_bad)
    g = tl.load(g_ptr + offs_t * stride_gt + e * stride_ge, mask=t_mask, other=0.0)
    scale = tl.where(t_mask, _gate_scale(g, tau, HARD), 0.0)  # [BLOCK_T]
    n_used = tl.sum((scale != 0.0).to(tl.int32), axis=0)
    if n_used > 0:  # an unused expert's rows are never read
        offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
        b_mask = offs_b < EXPERT_SIZE
        rows = e * EXPERT_SIZE + offs_b  # [BLOCK_B]
        acc_u = tl.zeros((BLOCK_T, BLOCK_B), dtype=tl.float32)
        acc_g = tl.zeros((BLOCK_T, BLOCK_B), dtype=tl.float32)
        for k0 in range(0, d, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < d
            xk = tl.load(x_ptr + offs_t[:, None] * stride_xt + offs_k[None, :] * stride_xd,
                         mask=t_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            w_mask = b_mask[:, None] & k_mask[None, :]
            wu = tl.load(wu_ptr + rows[:, None] * stride_wun + offs_k[None, :] * stride_wud,
                         mask=w_mask, other=0.0).to(tl.float32)  # [BLOCK_B, BLOCK_K]
            acc_u += tl.sum(xk[:, None, :] * wu[None, :, :], axis=2)
            if GLU:
                wg = tl.load(wg_ptr + rows[:, None] * stride_wgn + offs_k[None, :] * stride_wgd,
                             mask=w_mask, other=0.0).to(tl.float32)
                acc_g += tl.sum(xk[:, None, :] * wg[None, :, :], axis=2)
        h = _hidden(acc_u, acc_g, bu_ptr, bg_ptr, rows, b_mask, ACT, GLU, HAS_BU, HAS_BG)
        h = h * scale[:, None]
        tl.store(h_ptr + offs_t[:, None] * stride_ht + rows[None, :] * stride_hn, h.to(h_ptr.dtype.element_ty),
                 mask=t_mask[:, None] & b_mask[None, :])


@triton.jit
def _decode_down_kernel(
    # pointers
    h_ptr, g_ptr, wd_ptr, bd_ptr, y_ptr, bad_ptr,
    # dimensions
    T, E, d_out, tau,
    # strides
    stride_ht, stride_hn, stride_gt, stride_ge, stride_wdn, stride_wdd, stride_yt, stride_yd,
    # meta-parameters
    EXPERT_SIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr, GROUP_E: tl.constexpr, HAS_BD: tl.constexpr, HARD: tl.constexpr,
):
    """y32[t, tile] += sum over the GROUP_E experts e of this program used by t of
    h[t, e's rows] @ W_down^T[e's rows, tile]; group 0 also adds b_down and NaN for flagged tokens.

    One program per (group of GROUP_E consecutive experts, column tile): the group's gates come in
    one load and its experts' weight loads are unrolled (independent, all in flight at once), so no
    program walks a long chain of dependent loads; a group no token uses returns at once."""
    pid_e = tl.program_id(0)
    offs_t = tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    offs_j = tl.arange(0, GROUP_E)
    experts = pid_e * GROUP_E + offs_j
    g = tl.load(g_ptr + offs_t[:, None] * stride_gt + experts[None, :] * stride_ge,
                mask=t_mask[:, None] & (experts < E)[None, :], other=0.0)
    used = (_gate_scale(g, tau, HARD) != 0.0) & t_mask[:, None] & (experts < E)[None, :]  # [BLOCK_T, GROUP_E]
    n_used = tl.sum(tl.sum(used.to(tl.int32), axis=1), axis=0)
    if (n_used > 0) | (pid_e == 0):
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_mask = offs_d < d_out
        offs_b = tl.arange(0, BLOCK_E)  # BLOCK_E = next power of 2 >= EXPERT_SIZE
        b_mask = offs_b < EXPERT_SIZE
        acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for j in tl.static_range(GROUP_E):
            used_j = tl.sum(tl.where(offs_j[None, :] == j, used.to(tl.int32), 0), axis=1) > 0  # [BLOCK_T]
            any_j = tl.max(used_j.to(tl.int32), axis=0) > 0
            rows = (pid_e * GROUP_E + j) * EXPERT_SIZE + offs_b
            # Predicated off when no token uses the expert: its tile costs no memory traffic.
            w = tl.load(wd_ptr + rows[:, None] * stride_wdn + offs_d[None, :] * stride_wdd,
                        mask=(b_mask[:, None] & d_mask[None, :]) & any_j, other=0.0).to(tl.float32)
            h = tl.load(h_ptr + offs_t[:, None] * stride_ht + rows[None, :] * stride_hn,
                        mask=used_j[:, None] & b_mask[None, :], other=0.0).to(tl.float32)  # [BLOCK_T, BLOCK_E]
            acc += tl.sum(h[:, :, None] * w[None, :, :], axis=1)
        if pid_e == 0:
            if HAS_BD:
                acc += tl.load(bd_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
            bad = tl.load(bad_ptr + offs_t, mask=t_mask, other=0)
            acc = tl.where(bad[:, None] != 0, float("nan"), acc)  # NaN + anything = NaN: the row stays NaN
        tl.atomic_add(y_ptr + offs_t[:, None] * stride_yt + offs_d[None, :] * stride_yd, acc,
                      mask=t_mask[:, None] & d_mask[None, :])


# ---------------------------------------------------------------------------------------------
# grouped: tokens sorted by expert, one program per BM-row tile of one expert
# ---------------------------------------------------------------------------------------------
@triton.jit
def _grouped_up_kernel(
    # pointers (h: [T, N] in x's dtype, zero where a pair is unused)
    x_ptr, tok_ptr, scale_ptr, tile_expert_ptr, wu_ptr, wg_ptr, bu_ptr, bg_ptr, h_ptr,
    # dimensions (T_BUCKET: next power of 2 >= T, only an autotune key)
    E, d, T_BUCKET,
    # strides
    stride_xt, stride_xd, stride_wun, stride_wud, stride_wgn, stride_wgd, stride_ht, stride_hn,
    # meta-parameters
    EXPERT_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr, ACT: tl.constexpr, GLU: tl.constexpr,
    HAS_BU: tl.constexpr, HAS_BG: tl.constexpr, UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """h[tok[m], e's rows] = act(x[tok] W_gate[e]^T + b_gate) * (x[tok] W_up[e]^T + b_up) * scale
    for one BM-row tile of expert e's tokens (the down projection is one dense GEMM over h)."""
    pid = tl.program_id(0)
    e = tl.load(tile_expert_ptr + pid)
    if e < E:  # tiles past the last expert's padding do nothing
        offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        tok = tl.load(tok_ptr + offs_m)  # [BLOCK_M], -1 = padding
        valid = tok >= 0
        tok = tl.where(valid, tok, 0)
        scale = tl.load(scale_ptr + offs_m, mask=valid, other=0.0)
        offs_b = tl.arange(0, BLOCK_E)
        b_mask = offs_b < EXPERT_SIZE
        rows = e * EXPERT_SIZE + offs_b
        acc_u = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
        acc_g = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
        for k0 in range(0, d, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < d
            xk = tl.load(x_ptr + tok[:, None] * stride_xt + offs_k[None, :] * stride_xd,
                         mask=valid[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
            w_mask = b_mask[:, None] & k_mask[None, :]
            wu = tl.load(wu_ptr + rows[:, None] * stride_wun + offs_k[None, :] * stride_wud,
                         mask=w_mask, other=0.0)  # [BLOCK_E, BLOCK_K]
            if UPCAST_DOT:
                xk = xk.to(tl.float32)
                wu = wu.to(tl.float32)
            acc_u += tl.dot(xk, tl.trans(wu), input_precision=DOT_PRECISION)
            if GLU:
                wg = tl.load(wg_ptr + rows[:, None] * stride_wgn + offs_k[None, :] * stride_wgd,
                             mask=w_mask, other=0.0)
                if UPCAST_DOT:
                    wg = wg.to(tl.float32)
                acc_g += tl.dot(xk, tl.trans(wg), input_precision=DOT_PRECISION)
        h = _hidden(acc_u, acc_g, bu_ptr, bg_ptr, rows, b_mask, ACT, GLU, HAS_BU, HAS_BG)
        h = h * scale[:, None]
        tl.store(h_ptr + tok[:, None] * stride_ht + rows[None, :] * stride_hn, h.to(h_ptr.dtype.element_ty),
                 mask=valid[:, None] & b_mask[None, :])


# ---------------------------------------------------------------------------------------------
# autotune configs (CUDA) and fixed interpreter blocks
# ---------------------------------------------------------------------------------------------
# Few configs each (every one costs a compile per specialization on first use): decode is
# memory-bound, so what varies is how many bytes are in flight (rows x columns per program, and
# for down how many programs split the experts); grouped tiles vary their K/N blocks and warps.
def _cuda_decode_up_configs() -> list[triton.Config]:
    return [triton.Config({"BLOCK_B": bb, "BLOCK_K": bk}, num_warps=4) for bb in (4, 8, 16) for bk in (256, 512)]


def _cuda_decode_down_configs() -> list[triton.Config]:
    return [triton.Config({"BLOCK_D": bd, "GROUP_E": ge}, num_warps=4) for bd in (64, 128, 256) for ge in (1, 4, 8)]


def _cuda_grouped_configs() -> list[triton.Config]:
    return [triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=st)
            for bk in (64, 128) for w in (4, 8) for st in (3, 4)]


_KERNEL_BY_NAME = {"up": _decode_up_kernel, "down": _decode_down_kernel, "grouped": _grouped_up_kernel}
CUDA_CONFIGS = {"up": _cuda_decode_up_configs, "down": _cuda_decode_down_configs, "grouped": _cuda_grouped_configs}
# The config each kernel runs with when autotuning is off (LTE_TRITON_AUTOTUNE=0: property tests
# over hundreds of shapes, each a new autotune key): a middle one of each list.
_UNTUNED = {"up": dict(BLOCK_B=8, BLOCK_K=256, num_warps=4), "down": dict(BLOCK_D=128, GROUP_E=4, num_warps=4),
            "grouped": dict(BLOCK_K=64, num_warps=4, num_stages=3)}
_KEYS = {"up": ["T", "d", "EXPERT_SIZE"], "down": ["T", "E", "d_out"], "grouped": ["E", "d", "T_BUCKET"]}
_forced_configs: dict[str, triton.Config] = {}


def _autotune_on() -> bool:
    return os.environ.get("LTE_TRITON_AUTOTUNE", "1") != "0"


@contextlib.contextmanager
def forced_config(kernel_name: str, config: triton.Config):
    """Within the block, CUDA launches of kernel `kernel_name` ("up" | "down" | "grouped") use
    `config` instead of the autotuner's choice (tests run every config against the reference)."""
    if kernel_name not in CUDA_CONFIGS:
        raise ValueError(f"kernel {kernel_name!r} is not one of {sorted(CUDA_CONFIGS)}")
    old = _forced_configs.get(kernel_name)
    _forced_configs[kernel_name] = config
    try:
        yield
    finally:
        if old is None:
            _forced_configs.pop(kernel_name)
        else:
            _forced_configs[kernel_name] = old


@functools.lru_cache(maxsize=None)
def _tuned(kernel_name: str):
    """The autotuned wrapper of a kernel (built lazily: autotuning is for CUDA only). Zeroing the
    atomically accumulated outputs before each timed config keeps the tuning runs' sums exact."""
    kernel = _KERNEL_BY_NAME[kernel_name]
    reset = ["y_ptr"] if kernel_name == "down" else []
    return triton.autotune(CUDA_CONFIGS[kernel_name](), key=_KEYS[kernel_name], reset_to_zero=reset)(kernel)


def _launch_cuda(kernel_name: str, grid, args, meta) -> None:
    """Launch on CUDA with the forced config, the untuned default, or the autotuner's choice."""
    cfg = _forced_configs.get(kernel_name)
    if cfg is not None:
        kw = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    elif not _autotune_on():
        kw = dict(_UNTUNED[kernel_name])
    else:
        _tuned(kernel_name)[grid](*args, **meta)
        return
    kernel = _KERNEL_BY_NAME[kernel_name]
    kernel[grid](*args, **meta, **kw)


# The interpreter runs each program in numpy: big blocks mean few programs.
_INTERP_BLOCKS = {"BLOCK_K": 128, "BLOCK_D": 128, "BLOCK_M": 16, "GROUP_E": 2}


@functools.lru_cache(maxsize=None)
def _tau_in(dtype: torch.dtype, tau: float) -> float:
    """tau rounded to the gates' dtype: (gates > tau) compares in that dtype in the reference."""
    return float(torch.tensor(tau, dtype=dtype)) if dtype.is_floating_point else tau


def group_by_expert(scale: Tensor, block_m: int) -> tuple[Tensor, Tensor, Tensor]:
    """Sort (token, expert) pairs by expert, each expert padded to block_m rows; static shapes.

    scale: [T, E] fp32 (0 = pair unused). Returns tok [M] int32 (-1 = padding), pair_scale [M]
    fp32, tile_expert [M / block_m] int32 (E = tile past the end), M = (ceil(T*E/block_m) + E)
    * block_m. Pure device ops (no nonzero/item): no host sync, CUDA-graph safe.
    """
    T, E = scale.shape
    dev = scale.device
    used = (scale != 0).t()  # [E, T]
    counts = used.sum(1)  # [E]
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    starts = ends - padded
    n_tiles = triton.cdiv(T * E, block_m) + E
    M = n_tiles * block_m
    dest = starts[:, None] + used.cumsum(1) - 1  # [E, T] slot of each used pair
    dest = torch.where(used, dest, M)  # unused pairs go to a trash slot past the end
    tok = torch.full((M + 1,), -1, dtype=torch.int32, device=dev)
    tok.scatter_(0, dest.flatten(), torch.arange(T, dtype=torch.int32, device=dev).repeat(E))
    pair_scale = torch.zeros(M + 1, dtype=torch.float32, device=dev)
    pair_scale.scatter_(0, dest.flatten(), scale.t().flatten())
    tok[M:].fill_(-1)  # the trash slot received unused pairs (a slice fill: no host scalar copy, capturable)
    tile_start = torch.arange(n_tiles, device=dev) * block_m
    tile_expert = torch.searchsorted(ends, tile_start, right=True).to(torch.int32)  # E past the end
    return tok[:M], pair_scale[:M], tile_expert


@register_kernel("triton", nan_policy=True)
def sparse_ffn_triton(x: Tensor, gates: Tensor, w_up: Tensor, w_gate: Tensor | None,
                      w_down: Tensor, b_up: Tensor | None, b_gate: Tensor | None,
                      b_down: Tensor | None, act: str, expert_size: int, mode: str,
                      tau: float) -> Tensor:
    """Launcher. x: [T, d], gates: [T, E], w_up/w_gate: [N, d], w_down: [N, d_out] -> y [T, d_out].

    Any strides work (they are kernel arguments); dtypes fp32/fp16/bf16, accumulation in fp32.
    """
    T, d = x.shape
    N, d_out = w_down.shape
    assert N == gates.shape[1] * expert_size and w_up.shape == (N, d), "lte sparse_ffn_triton: shapes do not match"
    launch = _launch_decode if T <= DECODE_MAX_T else _launch_grouped
    return launch(x, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, _ACT_CODES[act], expert_size,
                  mode, tau, interp=_interpreting())


def _launch_decode(x, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, act_code, B, mode, tau, *, interp):
    """Few tokens: one program per (expert, row block) computes h for the tokens using it
    (multiply + sum: no `tl.dot`, whose minimum size is 16), then (expert group, column tile)
    programs add the used experts' rows of W_down^T into an fp32 y. Two kernels and, for 16-bit
    outputs, a cast: the up kernel also zeroes y and flags non-finite tokens, the down kernel
    adds b_down and applies the NaN policy."""
    T, d = x.shape
    E = gates.shape[1]
    N, d_out = w_down.shape
    glu, hard, tau_g = w_gate is not None, mode == "hard", _tau_in(gates.dtype, tau)
    wg = w_gate if glu else w_up  # placeholder pointer when there is no gate (never loaded)
    dummy = w_up  # stands in for absent biases (never loaded: HAS_* flags are False)
    block_t = max(2, triton.next_power_of_2(T))
    # h in x's dtype, as the eager FFN (and Inductor's dense one) rounds it before the down GEMM;
    # only used pairs are written.
    h = torch.empty(T, N, dtype=x.dtype, device=x.device)
    y32 = torch.empty(T, d_out, dtype=torch.float32, device=x.device)  # zeroed by the up kernel
    bad = torch.empty(block_t, dtype=torch.int32, device=x.device)  # written by the up kernel

    def up_args(n_programs):
        return (x, gates, w_up, wg, b_up if b_up is not None else dummy,
                b_gate if b_gate is not None else dummy, h, y32, bad, T, d, tau_g, y32.numel(),
                triton.cdiv(y32.numel(), n_programs), x.stride(0), x.stride(1), gates.stride(0), gates.stride(1),
                w_up.stride(0), w_up.stride(1), wg.stride(0), wg.stride(1), h.stride(0), h.stride(1))
    up_meta = dict(EXPERT_SIZE=B, BLOCK_T=block_t, ACT=act_code, GLU=glu,
                   HAS_BU=b_up is not None, HAS_BG=b_gate is not None, HARD=hard)
    down_args = (h, gates, w_down, b_down if b_down is not None else dummy, y32, bad, T, E, d_out,
                 tau_g, h.stride(0), h.stride(1), gates.stride(0), gates.stride(1),
                 w_down.stride(0), w_down.stride(1), y32.stride(0), y32.stride(1))
    down_meta = dict(EXPERT_SIZE=B, BLOCK_T=block_t, BLOCK_E=triton.next_power_of_2(B),
                     HAS_BD=b_down is not None, HARD=hard)
    if interp or not x.is_cuda:
        ge = _INTERP_BLOCKS["GROUP_E"]
        _decode_up_kernel[(E, 1)](*up_args(E), BLOCK_B=triton.next_power_of_2(B),
                                  BLOCK_K=_INTERP_BLOCKS["BLOCK_K"], **up_meta)
        _decode_down_kernel[(triton.cdiv(E, ge), triton.cdiv(d_out, _INTERP_BLOCKS["BLOCK_D"]))](
            *down_args, BLOCK_D=_INTERP_BLOCKS["BLOCK_D"], GROUP_E=ge, **down_meta)
    else:
        # The zeroing share depends on the grid, which depends on the config's BLOCK_B: sized for
        # the smallest grid any config has (the largest BLOCK_B), so every config zeroes all of y.
        min_programs = E * triton.cdiv(B, max(c.kwargs["BLOCK_B"] for c in _cuda_decode_up_configs()))
        _launch_cuda("up", lambda meta: (E, triton.cdiv(B, meta["BLOCK_B"])), up_args(min_programs), up_meta)
        _launch_cuda("down", lambda meta: (triton.cdiv(E, meta["GROUP_E"]), triton.cdiv(d_out, meta["BLOCK_D"])),
                     down_args, down_meta)
    return y32 if x.dtype == torch.float32 else y32.to(x.dtype)


def grouped_block_m(T: int, interp: bool = False) -> int:
    """Rows per grouped tile: about the tokens an expert gets at half density (T / 2), a power of
    2 in [16, 128] (`tl.dot`'s minimum is 16; past 128 a tile's accumulators spill)."""
    if interp:
        return _INTERP_BLOCKS["BLOCK_M"]
    return min(128, max(16, triton.next_power_of_2(T) // 2))


def _launch_grouped(x, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, act_code, B, mode, tau, *, interp):
    """Batches: (token, expert) pairs sorted by expert into BLOCK_M tiles; one `tl.dot` GEMM tile
    per program computes the expert's h for its tokens (gathering x rows, as MoE kernels do) into
    a zeroed [T, N] h; then y = h @ W_down^T, one dense GEMM. The up projections (2/3 of the FLOPs)
    skip unused pairs; the down third stays dense: with 32-neuron experts, summing each pair's
    rank-32 product into y costs a whole d_out row of atomic adds per pair (the design before
    this one: 7-14x slower than cuBLAS at T = 2048 on an H200, benchmarks/RESULTS.md)."""
    from .reference import expert_scale

    T, d = x.shape
    E = gates.shape[1]
    N = w_up.shape[0]
    glu = w_gate is not None
    wg = w_gate if glu else w_up  # placeholder pointer when there is no gate (never loaded)
    dummy = w_up  # stands in for absent biases (never loaded: HAS_* flags are False)
    block_m = grouped_block_m(T, interp)
    scale = expert_scale(gates, mode, tau, torch.float32)  # [T, E]
    tok, pair_scale, tile_expert = group_by_expert(scale, block_m)
    h = torch.zeros(T, N, dtype=x.dtype, device=x.device)  # rounded to x's dtype, as the eager FFN's h
    args = (x, tok, pair_scale, tile_expert, w_up, wg, b_up if b_up is not None else dummy,
            b_gate if b_gate is not None else dummy, h, E, d, triton.next_power_of_2(T),
            x.stride(0), x.stride(1), w_up.stride(0), w_up.stride(1), wg.stride(0), wg.stride(1),
            h.stride(0), h.stride(1))
    meta = dict(EXPERT_SIZE=B, BLOCK_M=block_m, BLOCK_E=max(16, triton.next_power_of_2(B)), ACT=act_code,
                GLU=glu, HAS_BU=b_up is not None, HAS_BG=b_gate is not None,
                UPCAST_DOT=interp and x.dtype == torch.bfloat16,
                DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32")
    grid = (tile_expert.shape[0],)
    if interp or not x.is_cuda:
        _grouped_up_kernel[grid](*args, BLOCK_K=_INTERP_BLOCKS["BLOCK_K"], **meta)
    else:
        _launch_cuda("grouped", grid, args, meta)
    y = torch.mm(h, w_down) if b_down is None else torch.addmm(b_down, h, w_down)
    return nan_rows_like_eager(x, y)


# ---------------------------------------------------------------------------------------------
# dense GEMMs + one masked epilogue ("dense_triton"): the candidate for CUDA batches
# ---------------------------------------------------------------------------------------------
@triton.jit
def _masked_hidden_kernel(u_ptr, g_ptr, gates_ptr, N, tau, s_u, s_g, s_gt_t, s_gt_e,
                          EXPERT_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, ACT: tl.constexpr,
                          GLU: tl.constexpr, HARD: tl.constexpr):
    """u[t, n] <- act(g[t, n]) * u[t, n] * scale(gates[t, n // B]) (GLU) or act(u) * scale, in place,
    one program per (token, BLOCK_N columns): the eager masked FFN's act, multiply and mask passes
    over [T, N] in one. A multiply by the 0/1 scale, not a select: NaN * 0 = NaN keeps the NaN policy."""
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = cols < N
    u = tl.load(u_ptr + t * s_u + cols, mask=m, other=0.0)
    if GLU:
        v = _activation(tl.load(g_ptr + t * s_g + cols, mask=m, other=0.0).to(tl.float32), ACT) * u.to(tl.float32)
    else:
        v = _activation(u.to(tl.float32), ACT)
    gate = tl.load(gates_ptr + t * s_gt_t + (cols // EXPERT_SIZE) * s_gt_e, mask=m, other=0.0)
    tl.store(u_ptr + t * s_u + cols, (v * _gate_scale(gate, tau, HARD)).to(u.dtype), mask=m)


_INTERP_BLOCK_N = 1024  # the interpreter: few programs
_BLOCK_N = 1024


@register_kernel("dense_triton", nan_policy=True)
def dense_masked_ffn_triton(x: Tensor, gates: Tensor, w_up: Tensor, w_gate: Tensor | None,
                            w_down: Tensor, b_up: Tensor | None, b_gate: Tensor | None,
                            b_down: Tensor | None, act: str, expert_size: int, mode: str,
                            tau: float) -> Tensor:
    """Every expert through dense GEMMs (cuBLAS), act * up * mask in one Triton pass, then the
    down GEMM: the reference's math with two passes over [T, N] (and the mask's cast and compare
    kernels) fewer. The reference's rounding: up / gate / h in x's dtype. NaN policy by
    construction (h * 0 keeps a NaN)."""
    T, N = x.shape[0], w_up.shape[0]
    assert N == gates.shape[1] * expert_size, "lte dense_masked_ffn_triton: shapes do not match"
    h = torch.nn.functional.linear(x, w_up, b_up)  # [T, N], contiguous: the epilogue writes into it
    g = torch.nn.functional.linear(x, w_gate, b_gate) if w_gate is not None else h
    block_n = _INTERP_BLOCK_N if _interpreting() else _BLOCK_N
    _masked_hidden_kernel[(T, triton.cdiv(N, block_n))](
        h, g, gates, N, _tau_in(gates.dtype, tau), h.stride(0), g.stride(0), gates.stride(0), gates.stride(1),
        EXPERT_SIZE=expert_size, BLOCK_N=block_n, ACT=_ACT_CODES[act], GLU=w_gate is not None, HARD=mode == "hard")
    return torch.mm(h, w_down) if b_down is None else torch.addmm(b_down, h, w_down)


if __name__ == "__main__":  # check against the reference and time against cuBLAS (CUDA only)
    from .reference import sparse_ffn_reference
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA (tests run this kernel in the interpreter: pytest tests/kernels)")
    torch.manual_seed(0)
    d, N, B = 4096, 11008, 32
    for T in (1, 4, 16, 128):
        for dt in (torch.float16, torch.bfloat16):
            x = torch.randn(T, d, device="cuda", dtype=dt)
            ws = [torch.randn(N, d, device="cuda", dtype=dt) / d ** 0.5 for _ in range(3)]
            g = torch.rand(T, N // B, device="cuda")
            y = sparse_ffn_triton(x, g, ws[0], ws[1], ws[2], None, None, None, "silu", B, "hard", 0.5)
            r = sparse_ffn_reference(x.float(), g, *(w.float() for w in ws[:2]), ws[2].float(),
                                     None, None, None, "silu", B, "hard", 0.5)
            ms = triton.testing.do_bench(lambda: sparse_ffn_triton(
                x, g, ws[0], ws[1], ws[2], None, None, None, "silu", B, "hard", 0.5))
            print(f"T={T} {dt}: max err {(y.float() - r).abs().max().item():.3e}, {ms:.3f} ms")
