"""Optimizer parameter groups for LTE: the model's trainable weights, and the routers in their own
group (weight decay 0.1 as in the paper; lr: TrainConfig.stage1_router_lr). One definition for
`lte.train`, `LTETrainer` and plain loops (examples/train_lte_plain_loop.py)."""
from __future__ import annotations

from collections.abc import Collection
from typing import Any

from torch import nn

from ..plan import routers


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a DDP/`torch.compile` wrapper (or the model itself)."""
    for attr in ("module", "_orig_mod"):
        while hasattr(model, attr) and isinstance(getattr(model, attr), nn.Module):
            model = getattr(model, attr)
    return model


def adamw_groups(model: nn.Module, *, lr: float | None = None, weight_decay: float = 0.0,
                 no_decay: Collection[str] = (), router_lr: float | None = None,
                 router_weight_decay: float = 0.1) -> list[dict[str, Any]]:
    """Parameter groups: model weights (names in `no_decay` without weight decay), then the routers
    when `router_lr` is given (stage 1); without it (stage 2) the routers are in no group: frozen."""
    router_ids = {id(p) for r in routers(unwrap(model)).values() for p in r.parameters()}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in router_ids]
    no_decay = set(no_decay)
    groups = [{"params": [p for n, p in named if n not in no_decay], "weight_decay": weight_decay},
              {"params": [p for n, p in named if n in no_decay], "weight_decay": 0.0}]
    groups = [g | ({"lr": lr} if lr is not None else {}) for g in groups if g["params"]]
    if router_lr is not None:
        groups.append({"params": [p for p in model.parameters() if id(p) in router_ids],
                       "weight_decay": router_weight_decay, "lr": router_lr})
    return groups
