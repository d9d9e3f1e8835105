"""The target-sparsity controller: exact quantile steps, and convergence on a tiny model."""
from __future__ import annotations

import pytest
import torch

import lte_compile as lte
from lte_compile.training.controller import SparsityController, quantile_shift
from lte_compile.errors import ConfigError
from lte_compile.training import TrainConfig, evaluate, train

from .helpers import FAST, tiny_llama, token_stream


def test_quantile_shift_puts_exactly_the_target_fraction_below_tau():
    g = torch.sigmoid(torch.randn(1000, 8) * 3)
    for target in (0.1, 0.5, 0.83):
        delta = quantile_shift([g], target, tau=0.5)
        shifted = torch.sigmoid(torch.logit(g.clamp(1e-6, 1 - 1e-6)) + delta)
        assert (shifted <= 0.5).float().mean().item() == pytest.approx(target, abs=1.0 / g.numel())


def test_apply_shift_moves_every_router_bias_and_is_recorded():
    model = tiny_llama()
    rs = lte.routers(model)
    before = {k: r.linear.bias.clone() for k, r in rs.items()}
    c = SparsityController(target=0.5)
    c.apply_shift(rs, 0.75)
    c.apply_shift(rs, -0.25)
    assert c.shift == pytest.approx(0.5)
    for k, r in rs.items():
        torch.testing.assert_close(r.linear.bias, before[k] + 0.5)


@pytest.mark.parametrize("target", [0.3, 0.7])
def test_controller_reaches_target_on_held_out_data(target):
    """Hard-mode sparsity measured on held-out tokens ends within the 0.02 tolerance."""
    model = tiny_llama()
    ids = token_stream(8000)
    held = token_stream(2000, seed=1)
    result = train(model, ids, TrainConfig(stage1_steps=12, stage2_steps=4, target_sparsity=target, **FAST),
                   eval_data=held)
    assert abs(result.sparsity - target) <= 0.02, result.sparsity
    check = evaluate(model, held, mode="hard", seq_len=32, batch_size=4, max_batches=2)
    assert check["sparsity"] == pytest.approx(result.sparsity)
    assert set(result.sparsity_per_layer) == set(lte.routers(model))
    e = 16  # experts per layer
    for k, s in result.sparsity_per_layer.items():
        assert result.active_per_token[k] == pytest.approx(e * (1 - s))


def test_bad_targets_are_config_errors():
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="target_sparsity") as e:
            TrainConfig(target_sparsity=bad)
        assert e.value.field == "target_sparsity" and e.value.value == bad
    with pytest.raises(ConfigError, match="target_sparsity"):
        SparsityController(target=1.0)
