"""Hypothesis strategies shared by the test suite (one place, as torch's hypothesis_utils does).

Letters: T tokens, d model dim, d_out output dim, E experts, B expert size, N = E*B.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

ACTS = ("relu", "gelu", "gelu_tanh", "silu")
MASK_KINDS = ("empty", "full", "random", "ragged")
TAU = 0.5

# Explicit @settings(max_examples=...) override a hypothesis profile, so tests scale their CI
# count through `examples()`: LTE_HYPOTHESIS_PROFILE=long runs 10x, dev 1/20.
_PROFILE_SCALE = {"ci": 1.0, "dev": 0.05, "long": 10.0}


def examples(ci_count: int) -> int:
    """max_examples for a property test: its CI count scaled by the active profile."""
    return max(1, int(ci_count * _PROFILE_SCALE.get(os.environ.get("LTE_HYPOTHESIS_PROFILE", "ci"), 1.0)))


@dataclass
class FFNCase:
    """One sparse-FFN problem, float64 tensors (cast them to the kernel's dtype with `.cast`)."""

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
    # ragged: token t uses k_t experts (0..E) at random positions
    k = torch.randint(0, E + 1, (T, 1), generator=gen)
    ranks = torch.rand(T, E, generator=gen).argsort(1).argsort(1)
    return ranks < k


@st.composite
def sparse_ffn_cases(draw, dtypes=(torch.float32,), max_T: int = 24, max_d: int = 70,
                     max_E: int = 6, expert_sizes=(1, 3, 8, 32), modes=("hard", "soft"),
                     min_T: int = 1) -> FFNCase:
    """A random sparse-FFN problem: T in [min_T, max_T] (1 is drawn often), d and d_out that are
    not block multiples, E experts of a drawn size B, GLU or not, each bias present or not, any
    activation, a mask kind (empty/full/random/ragged) and values from a drawn seed.

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
    act = draw(st.sampled_from(ACTS))
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
