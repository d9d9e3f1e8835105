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


def _final_records(out):
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in lines if r.get("stage") == "final"], lines


def test_resume_refuses_another_runs_checkpoints_and_resumes_its_own(tmp_path):
    """Issue 11 defect 1: a different model or config into an existing out_dir is refused (the
    model untouched); the same run resumes; a re-run of a finished run logs one final record."""
    from lte_compile.errors import LTEError

    ids = token_stream()
    cfg = dict(stage1_steps=2, stage2_steps=1, checkpoint_every=1, out_dir=str(tmp_path), **FAST)
    first = train(tiny_llama(), ids, TrainConfig(**cfg))
    finals, lines = _final_records(tmp_path)
    assert len(finals) == 1

    # the same run again: resumes at its last checkpoint, runs 0 steps, no duplicate final record
    again = train(tiny_llama(seed=3), ids, TrainConfig(**cfg))
    finals2, lines2 = _final_records(tmp_path)
    assert len(finals2) == 1 and len(lines2) == len(lines)
    assert again.sparsity == first.sparsity

    # another model layout (expert size) or another config: refused, weights untouched
    other = tiny_llama(seed=5, expert_size=32)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(LTEError, match="another run") as e:
        train(other, ids, TrainConfig(**cfg))
    assert str(tmp_path) in str(e.value) and "resume=False" in str(e.value) and "out_dir" in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    with pytest.raises(LTEError, match="eta"):
        train(tiny_llama(), ids, TrainConfig(**{**cfg, "eta": 0.5}))
    with pytest.raises(LTEError, match="another run"):
        train(_other_arch(), ids, TrainConfig(**cfg))

    # resume=False starts over in the same directory: the old checkpoints are replaced
    train(other, ids, TrainConfig(**{**cfg, "resume": False}))
    assert len(_final_records(tmp_path)[0]) == 1
    train(tiny_llama(seed=9, expert_size=32), ids, TrainConfig(**cfg))  # now the new run resumes


def _other_arch():
    """Same FFN layout as tiny_llama, but another state (an extra layer)."""
    import lte_compile as lte
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, pad_token_id=0, bos_token_id=0, eos_token_id=0))
    return lte.prepare(model, lte.Config(expert_size=16))
