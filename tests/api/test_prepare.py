"""lte.prepare keeps the model's function, makes equal experts, and refuses bad input cleanly."""
import copy

import pytest
import torch
from torch import nn

import lte_compile as lte
from tests import models
from tests.api.conftest import build, ids, run

from tests.models import HF_SPECS

ARCHS = sorted(HF_SPECS)
EXPECTED_FFNS = {name: 4 if name.startswith("t5") else 2 for name in ARCHS}  # t5: 2 encoder + 2 decoder


def force_gates(model, logit: float) -> None:
    """Every router outputs sigmoid(logit) for every token: +20 -> all experts on, -20 -> all off."""
    with torch.no_grad():
        for r in lte.routers(model).values():
            r.linear.weight.zero_()
            r.linear.bias.fill_(logit)


snapshot, assert_same_state = models.snapshot, models.assert_state_unchanged


@pytest.mark.parametrize("arch", ARCHS)
def test_prepare_preserves_function(arch):
    """Dense mode (permutation only) and hard/soft mode with every expert on equal the original (fp32, 1e-5)."""
    model, x = build(arch), ids()
    with torch.no_grad():
        ref = run(model, x)
        lte.prepare(model, lte.Config())
        assert len(lte.routers(model)) == EXPECTED_FFNS[arch]
        torch.testing.assert_close(run(model, x), ref, atol=1e-5, rtol=1e-5, msg="dense mode after permuting")
        force_gates(model, 20.0)
        lte.set_mode(model, "hard")
        torch.testing.assert_close(run(model, x), ref, atol=1e-5, rtol=1e-5, msg="hard mode, all experts on")
        lte.set_mode(model, "soft")  # sigmoid(20) = 1 - 2e-9: soft equals dense to fp32 precision
        torch.testing.assert_close(run(model, x), ref, atol=1e-5, rtol=1e-5, msg="soft mode, gates ~ 1")
        force_gates(model, -20.0)
        lte.set_mode(model, "hard")
        assert (run(model, x) - ref).abs().max() > 1e-3, "all experts off must change the output"


def test_experts_are_equal_size_and_permutation_is_valid():
    model = lte.prepare(build("llama"), lte.Config(expert_size=16))
    for r in lte.routers(model).values():
        assert r.num_experts * r.expert_size == r.spec.d_ff == 128
        assert r.num_experts == 8
        assert torch.equal(torch.sort(r.permutation).values, torch.arange(128))


def test_permutation_moves_neurons_consistently():
    """The up rows and the down columns move together: neuron i now holds original neuron perm[i]."""
    model = build("llama")
    up0 = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    down0 = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    lte.prepare(model)
    perm = lte.routers(model)["model.layers.0.mlp"].permutation
    assert not torch.equal(perm, torch.arange(128)), "k-means on random weights should reorder neurons"
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, up0[perm])
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, down0[:, perm])


def test_token_with_no_active_expert_gets_only_down_bias():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))
    x = torch.randn(3, 16)
    lte.prepare(mlp, lte.Config(), example_inputs=(x,))
    force_gates(mlp, -20.0)
    lte.set_mode(mlp, "hard")
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), mlp[2].bias.expand(3, 16))


def test_gates_are_exposed_per_ffn():
    model, x = lte.prepare(build("llama")), ids(2, 5)
    assert lte.gates(model) == {}, "dense mode computes no gates"
    lte.set_mode(model, "soft")
    model(input_ids=x)
    g = lte.gates(model)
    assert set(g) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    assert g["model.layers.0.mlp"].shape == (2, 5, 4)
    assert g["model.layers.0.mlp"].requires_grad, "soft-mode gates must carry gradients for the losses"
    assert lte.get_mode(model) == "soft"


def test_generate_on_prepared_model():
    """generate() runs through the hooks; with every expert on, hard mode decodes the dense tokens."""
    model = lte.prepare(build("llama"))
    dense = model.generate(ids(1, 4), max_new_tokens=6, do_sample=False, pad_token_id=0)
    force_gates(model, 20.0)
    lte.set_mode(model, "hard")
    out = model.generate(ids(1, 4), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 10) and torch.equal(out, dense)


def test_deepcopy_rebinds_hooks_to_the_copy():
    model = lte.prepare(build("llama"))
    twin = copy.deepcopy(model)
    force_gates(twin, -20.0)  # only the copy's routers change
    lte.set_mode(model, "hard")
    lte.set_mode(twin, "hard")
    force_gates(model, 20.0)
    x = ids()
    with torch.no_grad():
        assert not torch.allclose(run(model, x), run(twin, x))
    assert lte.get_mode(model) == "hard"


def test_save_load_round_trip(tmp_path):
    model, x = lte.prepare(build("gpt2")), ids()
    with torch.no_grad():
        for r in lte.routers(model).values():
            r.linear.bias.normal_()
    lte.set_mode(model, "hard")
    with torch.no_grad():
        ref = run(model, x)
    lte.save(model, tmp_path / "full")
    lte.save(model, tmp_path / "state_only", include_model=False)
    restored = lte.load(build("gpt2", seed=5), tmp_path / "full")  # other weights: restored from file
    assert lte.get_mode(restored) == "hard"
    same_init = lte.load(build("gpt2"), tmp_path / "state_only")  # original weights + saved permutation
    with torch.no_grad():
        torch.testing.assert_close(run(restored, x), ref)
        torch.testing.assert_close(run(same_init, x), ref)
    assert (tmp_path / "full" / "lte_config.json").exists()


# ----------------------------------------------------------------------------- bad input
def test_model_without_ffn_is_refused():
    model = nn.Sequential(nn.Linear(8, 8))
    before = snapshot(model)
    with pytest.raises(lte.UnsupportedFFNError, match="no FFN found"):
        lte.prepare(model, example_inputs=(torch.randn(2, 8),))
    assert_same_state(model, before)
    assert not lte.is_prepared(model)


def test_d_ff_not_divisible_is_refused_and_model_unchanged():
    model = build("llama")
    before = snapshot(model)
    with pytest.raises(lte.UnsupportedFFNError, match=r"d_ff=128 is not divisible by expert_size=48"):
        lte.prepare(model, lte.Config(expert_size=48, on_unsupported="error"))
    assert_same_state(model, before)
    with pytest.raises(lte.UnsupportedFFNError, match="none can be prepared"):
        lte.prepare(model, lte.Config(expert_size=48))  # skip mode: nothing left to prepare
    assert_same_state(model, before)


@pytest.mark.parametrize("kwargs", [{"tau": 1.0}, {"tau": -0.1}, {"expert_size": 0}, {"expert_size": -4}])
def test_bad_config_is_refused_before_touching_the_model(kwargs):
    with pytest.raises(lte.ConfigError):
        lte.prepare(build("llama"), lte.Config(**kwargs))


def test_loading_into_a_different_model_is_refused(tmp_path):
    model = lte.prepare(build("llama"))
    lte.save(model, tmp_path)
    import transformers as tf
    other = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=192,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    before = snapshot(other)
    with pytest.raises(lte.StateMismatchError, match="saved d_ff=128"):
        lte.load(other, tmp_path)
    assert_same_state(other, before)
    assert not lte.is_prepared(other)


def test_mode_switch_needs_a_prepared_model():
    with pytest.raises(lte.NotPreparedError, match="lte.prepare"):
        lte.set_mode(build("llama"), "hard")


class TwoFFNs(nn.Module):
    """One ordinary FFN, and one whose hidden activation is also returned (so it cannot be skipped)."""

    def __init__(self):
        super().__init__()
        self.ok = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 16))
        self.up, self.down = nn.Linear(16, 64), nn.Linear(64, 16)

    def forward(self, x):
        h = torch.relu(self.up(x))
        return self.ok(x) + self.down(h), h.sum()


def test_ffn_whose_intermediate_is_used_elsewhere_is_left_dense():
    model = TwoFFNs()
    lte.prepare(model, example_inputs=(torch.randn(2, 16),))
    assert list(lte.routers(model)) == ["ok"], "only the clean FFN gets a router"


def test_router_stays_float32_in_a_bf16_model():
    model = lte.prepare(build("llama")).to(torch.bfloat16)
    r = lte.routers(model)["model.layers.0.mlp"]
    assert r.linear.weight.dtype == torch.float32 and model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    lte.set_mode(model, "hard")
    with torch.no_grad():
        model(input_ids=ids())
    assert lte.gates(model)["model.layers.0.mlp"].dtype == torch.float32


def test_kernel_layout_can_be_applied_after_preparing_without_it():
    model = lte.prepare(build("llama"), lte.Config(kernel_layout=False))
    down = model.model.layers[0].mlp.down_proj.weight
    assert down.is_contiguous() and not down.t().is_contiguous()
    x = ids()
    with torch.no_grad():
        ref = run(model, x)
        lte.apply_kernel_layout(model)
        assert down.t().is_contiguous(), "W_down^T rows must be contiguous for the sparse kernels"
        torch.testing.assert_close(run(model, x), ref)
