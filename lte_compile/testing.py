"""Property testing for sparse-FFN kernels: the harness lte_compile's own kernels are tested with.

Users who add a kernel reuse our harness: random problems (hypothesis), a deliberately naive
float64 reference, and per-dtype tolerances. A kernel has the signature of
`lte_compile.kernels.reference.sparse_ffn_reference`.

    from hypothesis import given, settings
    from lte_compile.testing import assert_kernel_matches_reference, examples, sparse_ffn_cases

    @settings(max_examples=examples(200), deadline=None)
    @given(case=sparse_ffn_cases(dtypes=(torch.float32, torch.bfloat16)))
    def test_my_kernel(case):
        assert_kernel_matches_reference(my_sparse_ffn, case, "my kernel")

Letters: T tokens, d model dim, d_out output dim, E experts, B expert size, N = E*B.
Needs `hypothesis` (the `test` extra: `pip install lte_compile[test]`); only this module imports it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from lte_compile.kernels import ACTIVATIONS, MODES

__all__ = ["TAU", "TOL", "MASK_KINDS", "FFNCase", "examples", "gate_mask", "sparse_ffn_cases",
           "naive_sparse_ffn", "assert_matches_naive", "assert_kernel_matches_reference"]

MASK_KINDS = ("empty", "full", "random", "ragged")
TAU = 0.5

# Tolerances against float64 (absolute part scaled by 1 + max|y|):
# fp32: fp32 accumulation over d, N <= ~200 terms of O(1/sqrt(n)) -> errors ~1e-6; 1e-4 is slack.
# fp16 / bf16: the output is rounded once (2^-11 / 2^-8 relative), and the grouped Triton path
# rounds h to the weight dtype before the down dot (same order), so a few ulps of |y|.
TOL = {torch.float32: 1e-4, torch.float64: 1e-9, torch.float16: 4e-3, torch.bfloat16: 3e-2}

# Explicit @settings(max_examples=...) override a hypothesis profile, so tests scale their CI
# count through `examples()`: LTE_HYPOTHESIS_PROFILE=long runs 10x, dev 1/20.
_PROFILE_SCALE = {"ci": 1.0, "dev": 0.05, "long": 10.0}


def examples(ci_count: int) -> int:
    """max_examples for a property test: its CI count scaled by LTE_HYPOTHESIS_PROFILE."""
    return max(1, int(ci_count * _PROFILE_SCALE.get(os.environ.get("LTE_HYPOTHESIS_PROFILE", "ci"), 1.0)))


@dataclass
class FFNCase:
    """One sparse-FFN problem, float64 tensors (`args()` casts them to the kernel's dtype)."""

    x: torch.Tensor  # [T, d]
    gates: torch.Tensor  # [T, E] float32 (router outputs), never within 0.05 of tau in hard mode
    w_up: torch.Tensor  # [N, d]
    w_gate: torch.Tensor | None  # [N, d] (GLU) or None
    w_down: torch.Tensor  # [N, d_out] = W_down^T
    b_up: torch.Tensor | None  # [N]
    b_gate: torch.Tensor | None  # [N]
    b_down: torch.Tensor | None  # [d_out]
    act: str
    expert_size: int
    mode: str
    mask_kind: str
    dtype: torch.dtype  # the dtype the kernel runs in

    @property
    def T(self) -> int:
        return self.x.shape[0]

    def args(self, dtype: torch.dtype | None = None) -> tuple:
        """Positional op arguments; tensors (not gates) cast to `dtype` (default: self.dtype)."""
        dt = dtype or self.dtype
        c = lambda t: None if t is None else t.to(dt)  # noqa: E731
        return (c(self.x), self.gates, c(self.w_up), c(self.w_gate), c(self.w_down), c(self.b_up),
                c(self.b_gate), c(self.b_down), self.act, self.expert_size, self.mode, TAU)

    def args64(self) -> tuple:
        """The same problem in float64 after rounding through the kernel dtype (exact inputs)."""
        dt = self.dtype
        r = lambda t: None if t is None else t.to(dt).double()  # noqa: E731
        return (r(self.x), self.gates.double(), r(self.w_up), r(self.w_gate), r(self.w_down),
                r(self.b_up), r(self.b_gate), r(self.b_down), self.act, self.expert_size,
                self.mode, TAU)


def gate_mask(kind: str, T: int, E: int, gen: torch.Generator) -> torch.Tensor:
    """[T, E] bool: none used, all used, independent coin flips, or a random count per token."""
    if kind == "empty":
        return torch.zeros(T, E, dtype=torch.bool)
    if kind == "full":
        return torch.ones(T, E, dtype=torch.bool)
    if kind == "random":
        return torch.rand(T, E, generator=gen) < torch.rand(1, generator=gen)
    if kind != "ragged":
        raise ValueError(f"mask kind {kind!r} is not one of {MASK_KINDS}")
    # ragged: token t uses k_t experts (0..E) at random positions
    k = torch.randint(0, E + 1, (T, 1), generator=gen)
    ranks = torch.rand(T, E, generator=gen).argsort(1).argsort(1)
    return ranks < k


@st.composite
def sparse_ffn_cases(draw, dtypes=(torch.float32,), max_T: int = 24, max_d: int = 70,
                     max_E: int = 6, expert_sizes=(1, 3, 8, 32), modes=MODES,
                     min_T: int = 1, acts=ACTIVATIONS) -> FFNCase:
    """A random sparse-FFN problem: T in [min_T, max_T] (1 is drawn often), d and d_out that are
    not block multiples, E experts of a drawn size B, GLU or not, each bias present or not, any
    activation of `acts`, a mask kind (empty/full/random/ragged) and values from a drawn seed.

    Hard-mode gates sit at least 0.05 from tau, so rounding can never flip a decision; soft-mode
    gates are 0 exactly where the mask is off (a kernel may skip them) and in [0.05, 1) elsewhere.
    Weights are scaled by 1/sqrt(fan-in) so y is O(1) and tolerances can be absolute-ish.
    """
    T = draw(st.one_of(st.just(min_T), st.integers(min_T, max_T)))
    d = draw(st.integers(1, max_d))
    d_out = draw(st.integers(1, max_d))
    E = draw(st.integers(1, max_E))
    B = draw(st.sampled_from(expert_sizes))
    glu = draw(st.booleans())
    has_bu, has_bg, has_bd = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    act = draw(st.sampled_from(acts))
    mode = draw(st.sampled_from(modes))
    kind = draw(st.sampled_from(MASK_KINDS))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    N = E * B
    f64 = dict(dtype=torch.float64, generator=gen)
    mask = gate_mask(kind, T, E, gen)
    u = torch.rand(T, E, generator=gen) * 0.45
    if mode == "hard":
        gates = torch.where(mask, TAU + 0.05 + u, TAU - 0.05 - u)
    else:
        gates = torch.where(mask, 0.05 + u * 2.1, torch.zeros(()))
    return FFNCase(
        x=torch.randn(T, d, **f64),
        gates=gates.float(),
        w_up=torch.randn(N, d, **f64) / d ** 0.5,
        w_gate=torch.randn(N, d, **f64) / d ** 0.5 if glu else None,
        w_down=torch.randn(N, d_out, **f64) / N ** 0.5,
        b_up=torch.randn(N, **f64) * 0.5 if has_bu else None,
        b_gate=torch.randn(N, **f64) * 0.5 if (glu and has_bg) else None,
        b_down=torch.randn(d_out, **f64) * 0.5 if has_bd else None,
        act=act, expert_size=B, mode=mode, mask_kind=kind, dtype=dtype)


# The naive reference's own activation table: nothing shared with the kernels or reference.py.
_ACT = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda a: F.gelu(a, approximate="tanh"),
        "silu": F.silu, "relu2": lambda a: F.relu(a) ** 2, "quick_gelu": lambda a: a * torch.sigmoid(1.702 * a)}


def naive_sparse_ffn(x, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, act, expert_size, mode, tau):
    """The deliberately naive sparse FFN every kernel is compared with (scattermoe `dumb_forward`):
    a Python loop over tokens and, per token, over its experts.

    y[t] = b_down + sum over experts e (active in hard mode, all in soft) of scale * FFN_e(x[t]).
    Run it in float64 (`case.args64()`); same signature as the op.
    """
    T, E, B = x.shape[0], gates.shape[1], expert_size
    d_out = w_down.shape[1]
    rows = []
    for t in range(T):
        y_t = torch.zeros(d_out, dtype=x.dtype) if b_down is None else b_down
        for e in range(E):
            if mode == "hard":
                if not bool(gates[t, e] > tau):
                    continue
                s = 1.0
            else:
                s = gates[t, e].to(x.dtype)
            sl = slice(e * B, (e + 1) * B)
            up = w_up[sl] @ x[t] + (0 if b_up is None else b_up[sl])
            if w_gate is None:
                h = _ACT[act](up)
            else:
                h = _ACT[act](w_gate[sl] @ x[t] + (0 if b_gate is None else b_gate[sl])) * up
            y_t = y_t + s * (h @ w_down[sl])
        rows.append(y_t)
    return torch.stack(rows) if rows else torch.zeros(0, d_out, dtype=x.dtype)


def assert_matches_naive(out: torch.Tensor, case: FFNCase, what: str) -> None:
    """out (the kernel's output, in case.dtype) vs `naive_sparse_ffn` on the case's exactly-rounded
    float64 inputs, within TOL[case.dtype]."""
    ref = naive_sparse_ffn(*case.args64())
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == case.dtype, f"{what}: dtype {out.dtype} != {case.dtype}"
    tol = TOL[case.dtype]
    atol = tol * (1.0 + (ref.abs().max().item() if ref.numel() else 0.0))
    torch.testing.assert_close(out.double().cpu(), ref, atol=atol, rtol=tol, equal_nan=False,
                               msg=lambda m: f"{what} ({case.mode}, {case.mask_kind}, T={case.T}, "
                               f"B={case.expert_size}, act={case.act}, glu={case.w_gate is not None}, "
                               f"{case.dtype}): {m}")


def assert_kernel_matches_reference(kernel: Callable[..., torch.Tensor], case: FFNCase,
                                    what: str = "kernel", device: str | torch.device = "cpu") -> torch.Tensor:
    """Runs `kernel(*case.args())` (tensors moved to `device`) and checks it against the naive
    float64 reference. Returns the kernel's output."""
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in case.args())
    out = kernel(*args)
    assert_matches_naive(out, case, what)
    return out
