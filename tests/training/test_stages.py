"""Stage semantics: stage 2 trains the model with routers frozen; eta by hand; telemetry files."""
from __future__ import annotations

import json

import torch

import lte_compile as lte
from lte_compile.training import TrainConfig, train

from .helpers import FAST, tiny_llama, token_stream


def _router_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "lte_router" in k}


def test_stage2_leaves_routers_untouched_and_trains_the_model():
    model = tiny_llama()
    routers_before = _router_state(model)
    weight_before = model.model.layers[0].mlp.up_proj.weight.clone()
    train(model, token_stream(), TrainConfig(stage1_steps=0, stage2_steps=3, eta=1.0, **FAST))
    for k, v in _router_state(model).items():
        assert torch.equal(v, routers_before[k]), f"{k} changed in stage 2"
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, weight_before), "stage 2 did not train the model"
    assert lte.get_mode(model) == "hard"
    assert all(not p.requires_grad for r in lte.routers(model).values() for p in r.parameters())


def test_stage1_trains_routers_with_eta_by_hand_and_writes_telemetry(tmp_path):
    model = tiny_llama()
    routers_before = _router_state(model)
    cfg = TrainConfig(stage1_steps=4, stage2_steps=2, eta=4.0, out_dir=str(tmp_path), **{**FAST, "plots": True})
    result = train(model, token_stream(), cfg)
    changed = [k for k, v in _router_state(model).items() if k.endswith("linear.weight")
               and not torch.equal(v, routers_before[k])]
    assert changed, "stage 1 did not train the routers"
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert [(r["stage"], r["step"]) for r in steps] == [("stage1", i) for i in range(1, 5)] + [("stage2", 1), ("stage2", 2)]
    s1 = steps[0]
    for key in ("loss", "task", "eff", "sep", "eta", "sparsity", "sparsity_per_layer", "active_per_token", "lr"):
        assert key in s1, key
    assert s1["loss"] > s1["task"]  # eta*L_eff + lam*L_sep > 0 in stage 1
    assert steps[-1]["loss"] == steps[-1]["task"]  # stage 2: task loss alone
    assert records[-1]["kind"] == "eval" and records[-1]["sparsity"] == result.sparsity
    for png in ("sparsity.png", "losses.png"):
        assert (tmp_path / png).stat().st_size > 5000
    assert result.target_sparsity is None and result.bias_shift == 0.0


def test_a_fresh_run_replaces_the_log_of_an_earlier_one(tmp_path):
    cfg = TrainConfig(stage1_steps=2, stage2_steps=1, eta=1.0, out_dir=str(tmp_path), resume=False, **FAST)
    train(tiny_llama(), token_stream(), cfg)
    train(tiny_llama(), token_stream(), cfg)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in records]  # the router fit, 3 steps, stage 2's held-out sparsity, the final eval
    assert kinds == ["router_init", "step", "step", "step", "heldout", "eval"]
