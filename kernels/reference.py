"""Plain-torch reference of the LTE sparse FFN: the semantics every kernel is tested against.

Letters: T tokens, d model dim, d_out output dim (= d for an FFN), E experts, B expert size,
N = E*B FFN neurons (expert-contiguous after `lte.prepare` permuted them).

    y[t] = sum over experts e with scale[t, e] != 0 of scale[t, e] * FFN_e(x[t])  + b_down
    FFN_e(x) = act(x W_gate[e]^T + b_gate[e]) * (x W_up[e]^T + b_up[e]) @ W_down^T[e]   (GLU)
    FFN_e(x) = act(x W_up[e]^T + b_up[e]) @ W_down^T[e]                                  (plain)
    scale = gates (mode "soft")  |  (gates > tau) as 0/1 (mode "hard")

It computes every expert (reads all weights): clear, not fast.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# The op contract's names, defined once here (the module that gives each its meaning; ops.py
# imports this module, so defining them there would be an import cycle). Everything else imports
# them from `lte_compile.kernels` (ops re-exports them); the C++ `act_code` is checked against
# ACTIVATIONS by tests/kernels/test_cpu.py.
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "relu2", "quick_gelu")  # FFN activation names accepted by lte::sparse_ffn
MODES = ("soft", "hard")  # gate modes of lte::sparse_ffn / lte::apply_gates
QUICK_GELU_ALPHA = 1.702  # quick_gelu(a) = a * sigmoid(1.702 a) (CLIP, HF QuickGELUActivation)


def activation(name: str, a: Tensor) -> Tensor:
    """The FFN activation by name (relu | gelu | gelu_tanh | silu | relu2 | quick_gelu).

    relu2 is squared ReLU, relu(a)**2; quick_gelu is a * sigmoid(1.702 a)."""
    if name == "relu":
        return F.relu(a)
    if name == "gelu":
        return F.gelu(a)
    if name == "gelu_tanh":
        return F.gelu(a, approximate="tanh")
    if name == "silu":
        return F.silu(a)
    if name == "relu2":
        return F.relu(a).square()
    if name == "quick_gelu":
        return a * torch.sigmoid(QUICK_GELU_ALPHA * a)
    raise ValueError(f"activation {name!r} is not one of {ACTIVATIONS}")


def activation_backward(name: str, grad: Tensor, a: Tensor) -> Tensor:
    """d act(a) / da * grad, with ATen's own backward formulas (exactly what autograd uses) where
    ATen has one; relu2: 2 relu(a) grad; quick_gelu: (s + 1.702 a s (1 - s)) grad, s = sigmoid(1.702 a)."""
    if name == "relu":
        return torch.ops.aten.threshold_backward(grad, F.relu(a), 0)
    if name == "gelu":
        return torch.ops.aten.gelu_backward(grad, a, approximate="none")
    if name == "gelu_tanh":
        return torch.ops.aten.gelu_backward(grad, a, approximate="tanh")
    if name == "silu":
        return torch.ops.aten.silu_backward(grad, a)
    if name == "relu2":
        return 2.0 * F.relu(a) * grad
    if name == "quick_gelu":
        s = torch.sigmoid(QUICK_GELU_ALPHA * a)
        return grad * (s + QUICK_GELU_ALPHA * a * s * (1.0 - s))
    raise ValueError(f"activation {name!r} is not one of {ACTIVATIONS}")


def expert_scale(gates: Tensor, mode: str, tau: float, dtype: torch.dtype) -> Tensor:
    """Per-(token, expert) scale: the gate itself (soft) or the 0/1 mask gates > tau (hard)."""
    if mode == "soft":
        return gates.to(dtype)
    if mode == "hard":
        return (gates > tau).to(dtype)
    raise ValueError(f"mode {mode!r} is not one of {MODES}")


def apply_gates_reference(h: Tensor, gates: Tensor, expert_size: int, mode: str, tau: float) -> Tensor:
    """h: [..., E*B] intermediate activations, gates: [..., E] -> h scaled per expert.

    A broadcast over an [..., E, B] view: no [..., E*B] copy of the scale is materialised.
    """
    scale = expert_scale(gates, mode, tau, h.dtype).unsqueeze(-1)  # [..., E, 1]
    return (h.unflatten(-1, (gates.shape[-1], expert_size)) * scale).flatten(-2)


def ffn_hidden(x: Tensor, w_up: Tensor, w_gate: Tensor | None, b_up: Tensor | None,
               b_gate: Tensor | None, act: str) -> Tensor:
    """x: [T, d] -> act(up) or act(gate) * up: [T, N]. Reads all N rows of W_up (and W_gate)."""
    up = F.linear(x, w_up, b_up)  # [T, N]
    if w_gate is None:
        return activation(act, up)
    return activation(act, F.linear(x, w_gate, b_gate)) * up


def sparse_ffn_reference(x: Tensor, gates: Tensor, w_up: Tensor, w_gate: Tensor | None,
                         w_down: Tensor, b_up: Tensor | None, b_gate: Tensor | None,
                         b_down: Tensor | None, act: str, expert_size: int, mode: str,
                         tau: float) -> Tensor:
    """The op contract (DESIGN.md "The sparse FFN op").

    x: [T, d], gates: [T, E], w_up / w_gate: [N, d], w_down: [N, d_out] (W_down transposed),
    b_up / b_gate: [N], b_down: [d_out]  ->  y: [T, d_out].
    """
    h = ffn_hidden(x, w_up, w_gate, b_up, b_gate, act)  # [T, N]
    h = apply_gates_reference(h, gates, expert_size, mode, tau)
    y = h @ w_down  # reads all N rows of W_down^T: [T, d_out]
    return y if b_down is None else y + b_down


def nan_rows_like_eager(x: Tensor, y: Tensor) -> Tensor:
    """The ops' NaN policy: rows of y whose x has a NaN/Inf become NaN, as in the eager masked FFN
    (h * mask, NaN * 0 = NaN) where a kernel skipping off experts would give b_down."""
    if x.device.type == "cpu" and math.isfinite(x.sum().item()):
        # The common case on the hot path: one reduction and no copy of y (reading the flag costs
        # no device sync on the CPU). A finite x whose sum overflows takes the exact path below.
        return y
    bad = ~torch.isfinite(x).all(dim=-1, keepdim=True)  # [T, 1]
    return y.masked_fill(bad, float("nan"))
