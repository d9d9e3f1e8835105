"""Held-out measurement: forward batches in a mode, collect valid gates, sparsity and task loss."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import NotPreparedError
from ..plan import config_of, get_mode, routers, set_mode
from .batches import TokenBatches, eval_list, prepare_batch, task_loss
from .config import LossFn
from .losses import GateStats, gate_stats, valid_gates


@torch.no_grad()
def forward_batches(model: nn.Module, batches: list[dict[str, Tensor]], task: str = "auto",
                    loss_fn: LossFn | None = None) -> tuple[dict[str, Tensor], GateStats | None, float]:
    """Forward `batches` in eval mode, in the model's current LTE mode (this rank only).

    Returns (valid gates per layer [N, E], summed gate statistics or None in dense mode, mean task loss).
    """
    rs = routers(model)
    tau = config_of(model).tau if rs else None
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    gates: dict[str, list[Tensor]] = {}
    stats, loss_sum = None, 0.0
    try:
        for raw in batches:
            b = prepare_batch(raw, task, device)
            loss_sum += float(task_loss(model, b, loss_fn))
            mask = b.get("attention_mask")
            last = {k: r.last_gates for k, r in rs.items() if r.last_gates is not None}
            if last:
                for k, g in valid_gates(model, mask).items():
                    gates.setdefault(k, []).append(g)
                s = gate_stats(last, tau, mask)
                stats = s if stats is None else stats.merge(s)
    finally:
        model.train(was)
    return {k: torch.cat(v) for k, v in gates.items()}, stats, loss_sum / max(len(batches), 1)


@torch.no_grad()
def evaluate(model: nn.Module, data: Any, *, mode: str = "hard", task: str = "auto", max_batches: int = 8,
             seq_len: int = 256, batch_size: int = 8, loss_fn: LossFn | None = None) -> dict[str, Any]:
    """Held-out task loss, perplexity and (for LTE modes) sparsity of a prepared model in `mode`."""
    rs = routers(model)
    if not rs and mode != "dense":
        raise NotPreparedError(f"{type(model).__name__} is not prepared: mode {mode!r} needs lte.prepare first")
    batches = eval_list(data, seq_len, batch_size, max_batches, 0, 1) if isinstance(data, (Tensor, TokenBatches)) \
        else list(data)[:max_batches]
    old = get_mode(model) if rs else None
    if rs:
        set_mode(model, mode)
    try:
        _, stats, loss = forward_batches(model, batches, task, loss_fn)
    finally:
        if rs and old in ("dense", "soft", "hard"):
            set_mode(model, old)
    out: dict[str, Any] = {"mode": mode, "loss": loss, "ppl": math.exp(min(loss, 50.0))}
    if stats is not None:
        out |= {"sparsity": stats.overall(), "sparsity_per_layer": stats.sparsity(),
                "active_per_token": stats.active_per_token()}
    return out
