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
