"""Training-free mode: `lte.fit_routers` (issue 9 part 2)."""
from __future__ import annotations

import pytest
import torch

import lte_compile as lte
from lte_compile.errors import ConfigError
from lte_compile.training.fit import expert_labels

from .helpers import tiny_llama, token_stream


def test_expert_labels_are_norm_shares_of_the_strongest_expert():
    h = torch.tensor([[3.0, 4.0, 0.0, 0.0, 1.0, 0.0],   # experts of 2: norms 5, 0, 1
                      [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])  # a silent token: all zeros, no NaN
    torch.testing.assert_close(expert_labels(h, 2), torch.tensor([[1.0, 0.0, 0.2], [0.0, 0.0, 0.0]]))


@pytest.mark.parametrize("target", [0.5, 0.8])
def test_fit_routers_reaches_the_target_and_changes_only_routers(target):
    model = tiny_llama()
    router_ids = {id(p) for r in lte.routers(model).values() for p in r.parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in router_ids}
    ids, held = token_stream(6000), token_stream(2000, seed=1)
    report = lte.fit_routers(model, ids, eval_data=held, target_sparsity=target, batches=4, seq_len=32,
                             batch_size=4, steps=50)
    assert abs(report.sparsity - target) <= 0.02, report
    assert lte.get_mode(model) == "hard"
    check = lte.evaluate(model, held, mode="hard", seq_len=32, batch_size=4, max_batches=4)
    assert check["sparsity"] == pytest.approx(report.sparsity)
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before), "a model weight changed"
    assert all(loss < 0.7 for loss in report.fit_loss.values()), report.fit_loss  # below BCE of a constant guess


def test_fit_routers_beats_random_routers_at_equal_sparsity():
    """The fitted selection keeps more of the dense model than random routers calibrated to the
    same sparsity: held-out loss closer to dense."""
    ids, held = token_stream(6000), token_stream(2000, seed=1)
    ev = dict(seq_len=32, batch_size=4, max_batches=4)
    fitted = tiny_llama()
    lte.fit_routers(fitted, ids, eval_data=held, target_sparsity=0.6, batches=4, seq_len=32, batch_size=4, steps=100)
    rand = tiny_llama()
    lte.fit_routers(rand, ids, eval_data=held, target_sparsity=0.6, batches=4, seq_len=32, batch_size=4, steps=1,
                    lr=0.0)  # steps=1 with lr 0: the random init, only the bias calibrated
    dense = lte.evaluate(fitted, held, mode="dense", **ev)["loss"]
    got = lte.evaluate(fitted, held, mode="hard", **ev)["loss"]
    base = lte.evaluate(rand, held, mode="hard", **ev)["loss"]
    assert abs(got - dense) < abs(base - dense), (dense, got, base)


def test_fit_routers_checks_its_input():
    with pytest.raises(lte.NotPreparedError):
        lte.fit_routers(tiny_llama(prepare=False), token_stream(), target_sparsity=0.5)
    with pytest.raises(ConfigError, match="target_sparsity"):
        lte.fit_routers(tiny_llama(), token_stream(), target_sparsity=1.5)


class _FunctionalMLP(torch.nn.Module):
    """A Llama MLP written with F.linear on its own parameters (the same weights as `mlp`)."""

    def __init__(self, mlp):
        super().__init__()
        self.w1 = torch.nn.Parameter(mlp.gate_proj.weight.detach().clone())
        self.w3 = torch.nn.Parameter(mlp.up_proj.weight.detach().clone())
        self.w2 = torch.nn.Parameter(mlp.down_proj.weight.detach().clone())

    def forward(self, x):
        F = torch.nn.functional
        return F.linear(F.silu(F.linear(x, self.w1)) * F.linear(x, self.w3), self.w2)


def test_fit_routers_on_functional_ffns_learns_what_it_learns_on_module_ffns():
    """A functional FFN's rewritten forward reports x and h to the fit (no projection modules to hook):
    the same weights written with F.linear fit the same routers as with nn.Linear modules."""
    modular = tiny_llama(prepare=False)
    functional = tiny_llama(prepare=False)
    for layer in functional.model.layers:
        layer.mlp = _FunctionalMLP(layer.mlp)
    ids, held = token_stream(6000), token_stream(2000, seed=1)
    fitted = {}
    for name, model in (("modular", modular), ("functional", functional)):
        lte.prepare(model, lte.Config(expert_size=16))
        report = lte.fit_routers(model, ids, eval_data=held, target_sparsity=0.5, batches=2, seq_len=32,
                                 batch_size=4, steps=30)
        assert abs(report.sparsity - 0.5) <= 0.02, (name, report)
        fitted[name] = {k: r.linear.weight.detach().clone() for k, r in lte.routers(model).items()}
    assert fitted["modular"].keys() == fitted["functional"].keys()
    for k, w in fitted["modular"].items():
        torch.testing.assert_close(fitted["functional"][k], w, rtol=1e-4, atol=1e-5)
    assert all(r.observer is None for r in lte.routers(functional).values())


@pytest.mark.parametrize("init", ["fit", "keep"])
def test_train_starts_stage1_from_fitted_routers_or_keeps_them(init):
    """router_init='fit' (the default): stage 1 starts from the routers fit_router_weights makes on
    the first router_fit_batches training batches; 'keep': from the routers as they were. router_lr=0
    and no target (no bias controller) keep stage 1 from moving them, so they can be compared."""
    import copy

    from lte_compile.training import TrainConfig, train
    from lte_compile.training.batches import make_batches
    from lte_compile.training.fit import fit_router_weights

    from .helpers import FAST

    cfg = TrainConfig(stage1_steps=1, stage2_steps=0, router_lr=0.0, router_init=init, router_fit_batches=3,
                      router_fit_steps=40, **FAST)
    model, data = tiny_llama(), token_stream()
    expected = copy.deepcopy(model)
    if init == "fit":
        batches, _ = make_batches(data, cfg)
        losses, tokens = fit_router_weights(expected, [batches.batch(i) for i in range(3)], steps=40)
        assert tokens == 3 * FAST["batch_size"] * FAST["seq_len"] and all(v < 0.69 for v in losses.values())
    train(model, data, cfg)
    got, want = lte.routers(model), lte.routers(expected)
    for name in want:
        torch.testing.assert_close(got[name].linear.weight, want[name].linear.weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(got[name].linear.bias, want[name].linear.bias, rtol=0, atol=1e-6)
    moved = any(not torch.equal(got[n].linear.weight, lte.routers(tiny_llama())[n].linear.weight) for n in got)
    assert moved == (init == "fit")


def test_fitting_runs_the_model_in_eval_mode_and_restores_every_train_flag():
    """Labels come from the model without dropout; afterwards each module's flag is as it was."""
    from lte_compile.training.fit import collect_labels

    model = tiny_llama().train()
    model.model.layers[0].eval()  # a mixed state, as a user with a frozen block has
    seen = []
    hook = model.model.layers[1].register_forward_pre_hook(lambda m, a: seen.append(m.training))
    flags = {name: m.training for name, m in model.named_modules()}
    collect_labels(model, [{"input_ids": token_stream(64).reshape(2, 32)}], max_tokens=64)
    hook.remove()
    assert seen == [False]
    assert {name: m.training for name, m in model.named_modules()} == flags


@pytest.mark.parametrize("init, router_lr, expected", [("fit", None, 1e-3), ("keep", None, 1e-2), ("fit", 5e-3, 5e-3)])
def test_stage1_router_lr_follows_where_the_routers_start(init, router_lr, expected):
    """Fitted routers train at 1e-3 (the paper's 1e-2 undoes the fit), others at 1e-2; an explicit
    router_lr wins. The driver's stage-1 optimizer gives the routers' group exactly that lr."""
    from lte_compile.training import TrainConfig
    from lte_compile.training.driver import _Run

    from .helpers import FAST

    cfg = TrainConfig(stage1_steps=1, stage2_steps=1, router_init=init, router_lr=router_lr, **FAST)
    assert cfg.stage1_router_lr() == expected
    run = _Run(tiny_llama(), token_stream(), cfg, None, None, None)
    opt, _ = run._optimizer("stage1")
    router_params = {id(p) for r in lte.routers(run.model).values() for p in r.parameters()}
    lrs = {g["initial_lr"] for g in opt.param_groups if {id(p) for p in g["params"]} <= router_params}
    assert lrs == {expected}
    assert TrainConfig(router_lr=None, router_init="fit").stage1_router_lr(fitted=False) == 1e-2


def test_router_lr_must_be_none_or_a_finite_non_negative_float():
    from lte_compile.training import TrainConfig

    for bad in (-1e-3, float("nan"), "1e-3"):
        with pytest.raises(ConfigError, match="router_lr"):
            TrainConfig(router_lr=bad)
