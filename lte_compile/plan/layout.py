"""Neuron layout of a prepared FFN: the expert permutation applied to its weights, and the kernels'
weight layout (every neuron's weights one contiguous row)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .spec import FFNSpec


@torch.no_grad()
def _permute_param(p: Tensor, perm: Tensor, dim: int, rows: tuple[int, int] | None = None) -> None:
    """Reorder `p` along `dim` in place (the Parameter object is kept; only values move)."""
    perm = perm.to(p.device)
    view = p if rows is None else p.narrow(dim, rows[0], rows[1] - rows[0])
    view.copy_(view.index_select(dim, perm))


def permute_ffn_(model: nn.Module, spec: FFNSpec, perm: Tensor) -> None:
    """Apply a neuron permutation to the FFN's weights: the function is unchanged."""
    for proj in spec.projections().values():
        _permute_param(model.get_parameter(proj.weight), perm, proj.neuron_axis, proj.rows)
        if proj.bias is not None and not proj.down:
            _permute_param(model.get_parameter(proj.bias), perm, 0, proj.rows)


@torch.no_grad()
def kernel_layout_(model: nn.Module, spec: FFNSpec) -> None:
    """Store W_down (and a Conv1D W_up) so that each neuron's weights are one contiguous row.

    The sparse kernels read an expert as one contiguous [B, d] block of `w_up` and of `w_down^T`.
    An nn.Linear down weight is [d_out, d_ff]: we keep its shape and values but give it column-major
    strides, so `weight.t()` (what the rewrite passes to the op) is contiguous and free. Dense
    matmuls accept either layout; `.to()` and HF save_pretrained preserve it (raw safetensors
    `save_file` needs `.contiguous()`, which lte.save does). Fused (sliced) weights keep theirs.
    """
    for proj in spec.projections().values():
        p = model.get_parameter(proj.weight)
        if proj.rows is None and p.dim() == 2 and proj.neuron_axis == 1 and not p.t().is_contiguous():
            p.data = p.data.t().contiguous().t()
