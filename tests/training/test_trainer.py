"""transformers Trainer integration (LTETrainer) and sequence classification, on tiny models."""
from __future__ import annotations

import pytest
import torch

import lte_compile as lte
from lte_compile.training import TrainConfig, train
from lte_compile.training.losses import gate_stats
from lte_compile.training.trainer import LTETrainer

from .helpers import FAST, tiny_llama, token_stream


def _dataset(n: int = 48, seq: int = 32):
    ids = token_stream(n * seq).view(n, seq)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()} for row in ids]


def test_lte_trainer_runs_both_stages_with_router_group_and_logs(tmp_path):
    from transformers import TrainingArguments

    model = tiny_llama()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-3,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = LTETrainer(model=model, args=args, train_dataset=_dataset(),
                         lte_train_config=TrainConfig(stage1_steps=3, target_sparsity=0.5, calibration_batches=2))
    trainer.train()
    opt = trainer.optimizer
    router_params = {id(p) for r in lte.routers(model).values() for p in r.parameters()}
    (group,) = [g for g in opt.param_groups if {id(p) for p in g["params"]} == router_params]
    assert group["weight_decay"] == 0.1
    logs = [h for h in trainer.state.log_history if "lte_sparsity" in h]
    assert len(logs) == 6 and all(0.0 <= h["lte_sparsity"] <= 1.0 for h in logs)
    assert "lte_sep" in logs[0] and "lte_sparsity/model.layers.0.mlp" in logs[0]
    assert lte.get_mode(model) == "hard"
    assert all(not p.requires_grad for r in lte.routers(model).values() for p in r.parameters())
    assert abs(logs[-1]["lte_sparsity"] - 0.5) < 0.15  # one 4-sequence batch: coarse


def test_lte_trainer_stage2_keeps_routers_fixed(tmp_path):
    from transformers import TrainerCallback, TrainingArguments

    model = tiny_llama()
    snapshots = {}

    class Snap(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            snapshots[state.global_step] = {k: v.clone() for k, v in model.state_dict().items() if "lte_router" in k}

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=4, learning_rate=1e-3,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = LTETrainer(model=model, args=args, train_dataset=_dataset(), callbacks=[Snap()],
                         lte_train_config=TrainConfig(stage1_steps=2, eta=1.0))
    trainer.train()
    assert any(not torch.equal(snapshots[1][k], snapshots[2][k]) for k in snapshots[1])  # stage 1 trains them
    for k in snapshots[2]:
        assert torch.equal(snapshots[2][k], snapshots[5][k]), k


def test_sequence_classification_trains_and_masks_padding():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_labels=3, pad_token_id=0))
    lte.prepare(model, lte.Config(expert_size=16))
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(8):
        ids = torch.randint(1, 256, (4, 16), generator=g)
        mask = torch.ones_like(ids)
        mask[:, 12:] = 0  # right padding
        ids = ids.masked_fill(mask == 0, 0)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": ids[:, 0] % 3})
    result = train(model, batches, TrainConfig(stage1_steps=4, stage2_steps=2, target_sparsity=0.4,
                                               **{**FAST, "task": "sequence_classification"}))
    steps = [r for r in result.history if r.get("kind") == "step"]
    assert len(steps) == 6 and all(r["task"] > 0 for r in steps)
    assert result.eval_loss > 0
    # 12 real tokens of 16 per row: padding is left out of the statistics, so each layer counts
    # exactly 4 x 12 tokens and 4 x 12 x E (token, expert) pairs.
    b = batches[0]
    with torch.no_grad():
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    stats = gate_stats(lte.gates(model), 0.5, b["attention_mask"])
    experts = 256 // 16
    assert set(stats.tokens.values()) == {4 * 12} and set(stats.total.values()) == {4 * 12 * experts}
    with pytest.raises(lte.ConfigError, match="labels"):
        train(model, [{"input_ids": b["input_ids"]} for b in batches], TrainConfig(**{**FAST, "task": "sequence_classification"}))
