"""Bad inputs give clear errors naming what is wrong and what to do."""
from __future__ import annotations

import pytest
import torch

from lte_compile.errors import ConfigError, LTEError, NotPreparedError
from lte_compile.training import TrainConfig, evaluate, train

from .helpers import FAST, tiny_llama, token_stream


def test_unprepared_model_is_refused():
    with pytest.raises(NotPreparedError, match=r"lte\.prepare"):
        train(tiny_llama(prepare=False), token_stream(), TrainConfig(**FAST))
    with pytest.raises(NotPreparedError):
        evaluate(tiny_llama(prepare=False), token_stream(), mode="hard")


def test_data_too_short_for_one_batch():
    with pytest.raises(ConfigError, match="seq_len") as e:
        train(tiny_llama(), torch.arange(100), TrainConfig(stage1_steps=1, stage2_steps=0, **FAST))
    assert isinstance(e.value, LTEError) and isinstance(e.value, ValueError)
    with pytest.raises(ConfigError, match="held-out"):  # enough to train on, too little held out
        train(tiny_llama(), token_stream(), TrainConfig(**FAST), eval_data=torch.arange(50))
    with pytest.raises(ConfigError, match="at least one batch"):
        train(tiny_llama(), [], TrainConfig(**FAST))


@pytest.mark.parametrize("field,value", [
    ("stage1_steps", -1), ("eta", -0.5), ("sep_eps", 0.0), ("task", "translation"), ("batch_size", 0),
    ("sparsity_tolerance", 0.7), ("distributed", "horovod"),
])
def test_config_fields_are_checked(field, value):
    with pytest.raises(ConfigError) as e:
        TrainConfig(**{field: value})
    assert e.value.field == field and e.value.value == value and field in str(e.value)


def test_checkpoints_need_an_out_dir_and_unknown_overrides_are_named():
    with pytest.raises(ConfigError, match="out_dir"):
        TrainConfig(checkpoint_every=5)
    with pytest.raises(ConfigError, match="stage_1_steps"):
        train(tiny_llama(), token_stream(), stage_1_steps=3)


def test_a_batch_without_input_ids_is_refused():
    with pytest.raises(ConfigError, match="input_ids"):
        train(tiny_llama(), [{"x": torch.zeros(2, 4)}] * 3, TrainConfig(**FAST))


_NAN, _INF = float("nan"), float("inf")


@pytest.mark.parametrize("field,value", [
    ("target_sparsity", "0.5"), ("target_sparsity", _NAN), ("target_sparsity", True),
    ("seq_len", 2.5), ("seq_len", True), ("seq_len", "256"), ("batch_size", True), ("batch_size", 4.0),
    ("stage1_steps", 1.5), ("stage2_steps", None), ("checkpoint_every", False), ("warmup_steps", 2.0),
    ("eval_batches", "2"), ("log_every", 0.5), ("calibration_batches", True), ("keep_checkpoints", -1),
    ("seed", 0.5), ("eta", _NAN), ("eta", _INF), ("eta", "1"), ("lam", _NAN), ("lam", True),
    ("model_lr", _INF), ("stage2_lr", "1e-4"), ("router_lr", _NAN), ("router_weight_decay", None),
    ("model_weight_decay", _NAN), ("grad_clip", _INF), ("sep_eps", _NAN), ("sep_eps", "0.01"),
    ("sparsity_tolerance", _NAN), ("controller_gain", 0.0), ("controller_gain", _NAN),
    ("heldout_fraction", "0.1"), ("task", 1), ("distributed", None), ("resume", "yes"), ("progress", 1),
    ("plots", None), ("out_dir", 3), ("extra", "x"),
])
def test_train_config_types_and_finiteness_are_checked_up_front(field, value):
    """Issue 11 defect 8: each bad value raises ConfigError naming the field (no later TypeError)."""
    with pytest.raises(ConfigError) as e:
        TrainConfig(**{field: value})
    assert e.value.field == field and field in str(e.value)


def test_train_config_accepts_a_path_out_dir_and_int_floats(tmp_path):
    cfg = TrainConfig(out_dir=tmp_path, eta=1, target_sparsity=None)
    assert cfg.out_dir == str(tmp_path) and isinstance(cfg.eta, float)


def test_training_stops_at_the_first_non_finite_loss_and_keeps_the_last_checkpoint(tmp_path):
    """Issue 11 defect 2: NaN loss at stage1 step 3 -> NonFiniteLossError naming the step; the
    checkpoint of step 2 stays intact and finite; the model's mode and train/eval are restored
    (defect 10)."""
    import json

    from safetensors.torch import load_file

    from lte_compile.plan import get_mode, set_mode
    from lte_compile.training import NonFiniteLossError

    model = tiny_llama()
    set_mode(model, "dense")
    model.eval()

    def poison(rec):
        if rec["stage"] == "stage1" and rec["step"] == 2:
            with torch.no_grad():
                model.lm_head.weight[0, 0] = float("nan")

    cfg = TrainConfig(stage1_steps=4, stage2_steps=1, checkpoint_every=1, keep_checkpoints=0,
                      out_dir=str(tmp_path), **FAST)
    with pytest.raises(NonFiniteLossError, match="stage1 step 3") as e:
        train(model, token_stream(), cfg, callback=poison)
    assert isinstance(e.value, LTEError) and "step_stage1_0000002" in str(e.value)
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step_stage1_0000001", "step_stage1_0000002"]
    saved = load_file(str(tmp_path / "checkpoints" / "step_stage1_0000002" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values() if t.is_floating_point())
    assert json.loads((tmp_path / "checkpoints" / "step_stage1_0000002" / "meta.json").read_text())["step"] == 2
    assert get_mode(model) == "dense" and not model.training and not any(m.training for m in model.modules())
    assert all(p.requires_grad for r in __import__("lte_compile").routers(model).values() for p in r.parameters())


def test_data_too_short_quotes_the_tokens_the_user_passed():
    """Issue 11 defect 10: the count in the error is the user's, not the one after the hold-out."""
    cfg = TrainConfig(stage1_steps=1, stage2_steps=0, **FAST)  # one batch: 32 * 4 = 128 tokens
    with pytest.raises(ConfigError, match="seq_len") as e:
        train(tiny_llama(), torch.arange(130), cfg)
    msg = str(e.value)
    assert "data='130 tokens'" in msg and "held out" in msg
    needed = int(msg.split(">= ")[1].split(" tokens")[0])
    with pytest.raises(ConfigError):
        train(tiny_llama(), torch.arange(needed - 1), cfg)
    train(tiny_llama(), torch.arange(needed) % 256, cfg)  # exactly enough: trains


def test_one_dict_batch_for_training_and_evaluation_warns(caplog):
    batch = {"input_ids": torch.arange(64).reshape(2, 32) % 256}
    with caplog.at_level("WARNING", logger="lte_compile.training.batches"):
        train(tiny_llama(), [batch], TrainConfig(stage1_steps=1, stage2_steps=0, **FAST))
    assert any("single batch" in r.getMessage() and "eval_data" in r.getMessage() for r in caplog.records)


def test_router_tau_cannot_change_after_prepare():
    """Issue 11 defect 10, policy: refuse (compiled graphs bake tau in; config_of(model).tau owns it)."""
    import lte_compile as lte

    model = tiny_llama()
    router = next(iter(lte.routers(model).values()))
    with pytest.raises(ConfigError, match="router.tau") as e:
        router.tau = 0.3
    assert "lte.Config(tau=" in str(e.value) and router.tau == 0.5
    from lte_compile.plan import config_of

    config_of(model).tau = 0.3  # the config edited behind the routers' back: train refuses
    with pytest.raises(ConfigError, match="lte_config.tau"):
        train(model, token_stream(), TrainConfig(stage1_steps=1, stage2_steps=0, **FAST))
