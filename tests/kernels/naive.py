"""The deliberately naive float64 sparse FFN every kernel is compared with (scattermoe `dumb_forward`).

A Python loop over tokens and, per token, over its active experts: nothing shared with the
kernels or with `reference.py` except the activation functions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

TAU = 0.5
_ACT = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda a: F.gelu(a, approximate="tanh"),
        "silu": F.silu}

# Tolerances against float64 (absolute part scaled by 1 + max|y|):
# fp32: fp32 accumulation over d, N <= ~200 terms of O(1/sqrt(n)) -> errors ~1e-6; 1e-4 is slack.
# fp16 / bf16: the output is rounded once (2^-11 / 2^-8 relative), and the grouped Triton path
# rounds h to the weight dtype before the down dot (same order), so a few ulps of |y|.
TOL = {torch.float32: 1e-4, torch.float64: 1e-9, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def dumb_forward(x, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, act, expert_size, mode, tau):
    """y[t] = b_down + sum over experts e (active in hard mode, all in soft) of scale * FFN_e(x[t])."""
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


def assert_matches_naive(out: torch.Tensor, case, what: str) -> None:
    """out (any dtype) vs dumb_forward on the case's exactly-rounded float64 inputs."""
    ref = dumb_forward(*case.args64())
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == case.dtype, f"{what}: dtype {out.dtype} != {case.dtype}"
    tol = TOL[case.dtype]
    atol = tol * (1.0 + (ref.abs().max().item() if ref.numel() else 0.0))
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=tol, equal_nan=False,
                               msg=lambda m: f"{what} ({case.mode}, {case.mask_kind}, T={case.T}, "
                               f"B={case.expert_size}, act={case.act}, glu={case.w_gate is not None}, "
                               f"{case.dtype}): {m}")
