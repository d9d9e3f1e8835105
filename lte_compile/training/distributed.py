"""DDP and FSDP2 plumbing for `lte.train`: rank/world, reductions of statistics, model wrapping.

The library never starts a process group itself: launch with `torchrun` and call
`torch.distributed.init_process_group(...)` before `lte.train` (as every torchrun script does).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import ConfigError
from .config import TrainConfig
from .losses import GateStats


def rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("torch.distributed", "not initialized", "an initialized process group under torchrun "
                          f"(WORLD_SIZE={os.environ['WORLD_SIZE']})",
                          "call torch.distributed.init_process_group('gloo' or 'nccl') before lte.train")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def reduce_stats(stats: GateStats, world: int) -> GateStats:
    if world == 1:
        return stats
    import torch.distributed as dist

    t = stats.to_tensor()
    dist.all_reduce(t)
    return GateStats.from_tensor(list(stats.off), t)


def reduce_mean(values: dict[str, float], world: int) -> dict[str, float]:
    if world == 1:
        return values
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t)}


def broadcast_from_rank0(params: list[torch.Tensor], world: int) -> None:
    """Every rank takes rank 0's values of `params` (in place)."""
    if world == 1:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def fsdp_shard(model: nn.Module) -> None:
    """FSDP2: shard every block of the model's largest ModuleList (the transformer layers), then the root."""
    from torch.distributed.fsdp import fully_shard

    bad = [n for n, p in model.named_parameters() if not p.is_contiguous()]
    if bad:
        raise ConfigError("distributed", "fsdp", "contiguous parameters", f"{bad[0]} is not contiguous: prepare with "
                          "lte.Config(kernel_layout=False) to train with FSDP, then lte.apply_kernel_layout(model) for inference")
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    for block in max(lists, key=len, default=[]):
        fully_shard(block)
    fully_shard(model)


def wrap_model(model: nn.Module, cfg: TrainConfig, world: int) -> nn.Module:
    if world == 1 or cfg.distributed in ("none", "fsdp"):  # FSDP shards in place once, before stage 1
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=None, broadcast_buffers=False)
