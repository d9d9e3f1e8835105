"""Two-process DDP and FSDP2 (gloo, CPU): ranks agree and sparsity statistics are reduced across them."""
from __future__ import annotations

import json
import os
import socket

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    import lte_compile as lte
    from lte_compile.training import TrainConfig, train

    from .helpers import FAST, tiny_llama, token_stream

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = tiny_llama()
        result = train(model, token_stream(), TrainConfig(stage1_steps=4, stage2_steps=2, target_sparsity=0.5,
                                                           **FAST))
        router = next(iter(lte.routers(model).values()))
        record = {
            "steps": [(r["stage"], r["step"], r["sparsity"], r["loss"]) for r in result.history if r.get("kind") == "step"],
            "final": result.sparsity, "bias": router.linear.bias.tolist(),
            "weight_sum": float(sum(p.double().sum() for p in model.parameters())),
        }
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(record, f)
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_keeps_ranks_identical(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["weight_sum"] == r1["weight_sum"], "DDP ranks diverged"
    assert r0["bias"] == r1["bias"], "controller shifted the ranks' router biases differently"
    # Each rank trains on its own windows; sparsity and loss logged per step are all-reduced, so equal.
    assert r0["steps"] == r1["steps"] and len(r0["steps"]) == 6
    assert r0["final"] == r1["final"] and abs(r0["final"] - 0.5) <= 0.02


def _fsdp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    import lte_compile as lte
    from lte_compile.training import TrainConfig, train

    from .helpers import FAST, tiny_llama, token_stream

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = tiny_llama(kernel_layout=False)
        result = train(model, token_stream(), TrainConfig(stage1_steps=3, stage2_steps=2, target_sparsity=0.5,
                                                           distributed="fsdp", **FAST))
        bias = next(iter(lte.routers(model).values())).linear.bias
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"steps": [(r["stage"], r["step"], r["loss"]) for r in result.history if r.get("kind") == "step"],
                       "final": result.sparsity, "bias_type": type(bias).__name__}, f)
    finally:
        dist.destroy_process_group()


def test_two_process_fsdp_trains_with_sharded_routers(tmp_path):
    mp.spawn(_fsdp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["bias_type"] == "DTensor"  # the routers really were sharded
    assert r0["steps"] == r1["steps"] and len(r0["steps"]) == 5
    assert r0["final"] == r1["final"] and abs(r0["final"] - 0.5) <= 0.02
