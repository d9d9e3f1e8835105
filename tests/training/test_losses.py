"""LTE loss terms and gate statistics against values computed by hand on tiny tensors."""
from __future__ import annotations

import math

import pytest
import torch

import lte_compile as lte
from lte_compile.errors import NotPreparedError
from lte_compile.training.losses import efficiency_loss, gate_stats, loss_terms, separability_loss

from .helpers import tiny_llama

# Two layers, 2 tokens x 2 experts each.
G = {"a": torch.tensor([[0.0, 1.0], [0.5, 0.25]]), "b": torch.tensor([[0.75, 0.75], [1.0, 0.0]])}


def test_efficiency_loss_is_mean_of_squares_per_layer_then_over_layers():
    # a: (0 + 1 + 0.25 + 0.0625)/4 = 0.328125 ; b: (0.5625*2 + 1 + 0)/4 = 0.53125
    assert efficiency_loss(G).item() == pytest.approx((0.328125 + 0.53125) / 2)


def test_separability_loss_by_hand_with_eps():
    eps, tau = 0.01, 0.5
    f = lambda g: 1.0 / ((g - tau) ** 2 + eps)  # noqa: E731
    a = (f(0.0) + f(1.0) + f(0.5) + f(0.25)) / 4  # f(0.5) = 1/eps = 100: finite thanks to eps
    b = (f(0.75) * 2 + f(1.0) + f(0.0)) / 4
    assert separability_loss(G, tau, eps).item() == pytest.approx((a + b) / 2)
    assert f(0.5) == pytest.approx(100.0)


def test_padding_tokens_are_left_out():
    mask = torch.tensor([1, 0])  # second token of each layer is padding
    assert efficiency_loss(G, mask).item() == pytest.approx(((0 + 1) / 2 + (0.5625 * 2) / 2) / 2)
    padded = {k: torch.cat([v, torch.rand(3, 2)]) for k, v in G.items()}  # 3 more padding tokens
    full_mask = torch.tensor([1, 1, 0, 0, 0])
    assert separability_loss(padded, 0.5, 0.01, full_mask).item() == pytest.approx(separability_loss(G, 0.5, 0.01).item())


def test_gate_stats_counts_off_experts_and_active_per_token():
    s = gate_stats(G, tau=0.5)
    # off = G <= 0.5: a -> 0.0, 0.5, 0.25 (3 of 4); b -> 0.0 (1 of 4)
    assert s.sparsity() == {"a": 0.75, "b": 0.25}
    assert s.overall() == pytest.approx(0.5)
    assert s.active_per_token() == {"a": 0.5, "b": 1.5}
    masked = gate_stats(G, tau=0.5, attention_mask=torch.tensor([0, 1]))
    assert masked.sparsity() == {"a": 1.0, "b": 0.5} and masked.tokens == {"a": 1.0, "b": 1.0}


def test_loss_terms_on_a_model_combine_the_parts_and_backpropagate_to_routers():
    model = tiny_llama()
    lte.set_mode(model, "soft")
    ids = torch.randint(0, 256, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    terms = loss_terms(model, out.loss, eta=2.0, lam=0.5, attention_mask=mask)
    gates = lte.gates(model)
    eff, sep = efficiency_loss(gates, mask), separability_loss(gates, 0.5, 1e-2, mask)
    assert terms.total.item() == pytest.approx(out.loss.item() + 2.0 * eff.item() + 0.5 * sep.item(), rel=1e-6)
    terms.total.backward()
    router = next(iter(lte.routers(model).values()))
    assert router.linear.weight.grad is not None and router.linear.weight.grad.abs().sum() > 0
    assert math.isfinite(terms.as_floats()["sep"])


def test_loss_terms_need_a_prepared_model_in_soft_mode():
    with pytest.raises(NotPreparedError, match="lte.prepare"):
        loss_terms(tiny_llama(prepare=False), torch.tensor(1.0), eta=1.0)
    model = tiny_llama()  # prepared, but dense: routers do not run
    model(input_ids=torch.randint(0, 256, (1, 4)))
    with pytest.raises(NotPreparedError, match="soft"):
        loss_terms(model, torch.tensor(1.0), eta=1.0)
