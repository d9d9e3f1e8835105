"""Checkpoints: safetensors + JSON only, and a killed run resumes with the same losses."""
from __future__ import annotations

import json

import pytest
import torch

from lte_compile.training import TrainConfig, train

from .helpers import FAST, tiny_llama, token_stream


class Killed(Exception):
    """Stands in for SIGKILL: the run stops right after a step, with nothing else saved."""


def _losses(records):
    return [(r["stage"], r["step"], r["loss"], r["sparsity"]) for r in records if r.get("kind") == "step"]


@pytest.mark.parametrize("kill_at", [("stage1", 5), ("stage2", 3)])
def test_kill_and_resume_gives_the_same_losses(tmp_path, kill_at):
    ids = token_stream()
    cfg = dict(stage1_steps=6, stage2_steps=4, target_sparsity=0.5, checkpoint_every=2, **FAST)
    full = train(tiny_llama(), ids, TrainConfig(out_dir=str(tmp_path / "full"), **cfg))

    def kill(rec):
        if (rec["stage"], rec["step"]) == kill_at:
            raise Killed

    with pytest.raises(Killed):
        train(tiny_llama(), ids, TrainConfig(out_dir=str(tmp_path / "cut"), **cfg), callback=kill)
    torch.manual_seed(12345)  # the resumed process starts with other RNG state; the checkpoint restores it
    resumed = train(tiny_llama(seed=7), ids, TrainConfig(out_dir=str(tmp_path / "cut"), **cfg))
    assert _losses(resumed.history) == _losses(full.history)
    assert resumed.sparsity == full.sparsity and resumed.eval_loss == pytest.approx(full.eval_loss, abs=0)


def test_checkpoint_files_are_safetensors_and_json(tmp_path):
    train(tiny_llama(), token_stream(), TrainConfig(stage1_steps=2, stage2_steps=0, checkpoint_every=2,
                                                     out_dir=str(tmp_path), keep_checkpoints=1, **FAST))
    (ckpt,) = (tmp_path / "checkpoints").iterdir()
    names = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()}
    assert {"model.safetensors", "optimizer.safetensors", "rng_rank0.safetensors", "meta.json"} <= names
    assert all(n.endswith((".safetensors", ".json")) for n in names), names
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["stage"] == "stage1" and meta["step"] == 2 and meta["data"]["position"] == 2
    assert meta["config"]["checkpoint_every"] == 2 and "param_groups" in meta["optimizer"]
