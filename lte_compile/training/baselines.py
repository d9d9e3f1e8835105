"""Selection rules other than LTE's, on the same experts, routers and kernels (issue 9's baselines).

    lte.prepare(model, lte.Config())
    report = select_experts(model, "dejavu", train_ids, eval_data=val_ids, target_sparsity=0.7)

Every rule keeps the `LTERouter` that `lte.prepare` attached and replaces only the module that
produces its logits, `router.linear` (a *scorer*): G = sigmoid(scorer(x.detach())) and hard mode's
G > tau, the gate statistics, the sparsity controller (it shifts `scorer.bias`), `lte.train`'s
stage 2 and the `lte` backend's rewrite all work unchanged, so two rules differ only in which
experts they keep. A scorer has `weight` (the router casts x to its dtype) and `bias` ([E], the
logit offset the controller moves).

- `moefication`: `lte.fit_routers` (fit.py): a linear router trained on each expert's activation-norm
  share (MoEfication's labels), bias calibrated to the target on held-out data.
- `dejavu`: a low-rank MLP predictor d -> r -> E (Deja Vu's sparsity predictor, ReLU between) trained
  on the same labels, then calibrated the same way (`LowRankScorer`).
- `oracle_topk`: per token, the k = round((1 - target) E) experts with the largest true output norm
  ||h_e W_down,e|| (every expert's hidden activations computed first): exact sparsity, no training.
- `oracle_threshold`: the same norms against one threshold calibrated to the target: a variable
  number of experts per token, like LTE (`OracleScorer`). Both oracles bound what any training-free
  selector can keep; they compute the whole FFN to choose, so they have no speed.
- `random`: a random linear router (seeded), bias calibrated to the target.

Stage-2 adaptation of any rule ("+S2") is `lte.train(model, ids, TrainConfig(stage1_steps=0, ...))`:
the routers are calibrated to the target on held-out data (top-k: `target_sparsity=None`, nothing to
calibrate), frozen, and the model is fine-tuned under that rule's masks (`stage2_config`).
Scorers other than the linear one are for measurement in-process: `lte.save` stores linear routers only.
"""
from __future__ import annotations

import copy
import logging
import zlib
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..kernels.reference import ffn_hidden
from ..plan import routers, set_mode
from ..plan.router import LTERouter
from .config import TrainConfig
from .controller import SparsityController
from .evaluate import forward_batches
from .fit import calibrate_heldout, check_fit_args, fit_router_weights, fit_routers, split_fit_data

logger = logging.getLogger(__name__)

RULES = ("moefication", "dejavu", "oracle_topk", "oracle_threshold", "random")
"""Selection rules `select_experts` applies (LTE itself is `lte.train`)."""
SATURATED = 30.0
"""|logit| of a top-k decision: sigmoid(30) rounds to 1.0 in float32, sigmoid(-30) is ~1e-13,
so any tau in (0, 1) separates kept from dropped experts."""


# ----------------------------------------------------------------------------- pure selection rules
def expert_output_norms(h: Tensor, w_down_rows: Tensor, expert_size: int) -> Tensor:
    """h: [T, E*B] hidden activations, w_down_rows: [E*B, d_out] -> [T, E] = ||h_e W_down,e|| per
    expert: what each expert adds to the FFN output (the quantity dropping an expert loses)."""
    n_exp = h.shape[-1] // expert_size
    per_expert = torch.einsum("teb,ebo->teo", h.unflatten(-1, (n_exp, expert_size)).float(),
                              w_down_rows.float().unflatten(0, (n_exp, expert_size)))
    return per_expert.norm(dim=-1)


def topk_logits(scores: Tensor, k: int) -> Tensor:
    """[..., E] -> logits +SATURATED on the k largest scores of each row, -SATURATED elsewhere."""
    if not 0 <= k <= scores.shape[-1]:
        raise ConfigError("k", k, f"an integer in [0, {scores.shape[-1]}] (experts per FFN)")
    out = torch.full_like(scores, -SATURATED, dtype=torch.float32)
    if k == 0:
        return out
    return out.scatter(-1, scores.topk(k, dim=-1).indices, SATURATED)


def topk_for(target_sparsity: float, num_experts: int) -> int:
    """Experts kept per token for a target sparsity: round((1 - target) E)."""
    return int(round((1.0 - target_sparsity) * num_experts))


def threshold_logits(norms: Tensor, bias: Tensor) -> Tensor:
    """log(norm) + bias: one bias for all tokens is one threshold on the norm (calibrated to the
    target by the controller; a zero norm gives -inf, always off)."""
    return torch.log(norms.float()) + bias


# ----------------------------------------------------------------------------- scorers
class LowRankScorer(nn.Module):
    """Deja Vu's predictor: logits = W2 relu(W1 x + b1) + b2, with a rank-r bottleneck (d -> r -> E)."""

    def __init__(self, d_model: int, rank: int, num_experts: int, *, seed: int = 0, device=None):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # seeded init without moving the caller's RNG
            torch.manual_seed(seed)
            self.hidden = nn.Linear(d_model, rank, device=device, dtype=torch.float32)
            self.out = nn.Linear(rank, num_experts, device=device, dtype=torch.float32)

    @property
    def weight(self) -> Tensor:
        return self.hidden.weight

    @property
    def bias(self) -> Tensor:
        return self.out.bias

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.relu(self.hidden(x)))

    def flops_per_token(self) -> int:
        return 2 * (self.hidden.in_features * self.hidden.out_features + self.out.in_features * self.out.out_features)


class OracleScorer(nn.Module):
    """Scores each expert by its true output norm, computing the FFN's hidden activations from the
    model's own (current) weights: `k` set -> top-k logits; k None -> `threshold_logits`.

    The model is held in a tuple, so its parameters are not registered under the router (they stay
    in the model's optimizer groups in stage 2, and the oracle sees their updates)."""

    def __init__(self, model: nn.Module, router: LTERouter, k: int | None):
        super().__init__()
        self._model = (model,)
        self.spec, self.expert_size, self.k = router.spec, router.expert_size, k
        device = router.linear.weight.device
        self.bias = nn.Parameter(torch.zeros(router.num_experts, device=device), requires_grad=False)

    @property
    def weight(self) -> Tensor:  # the router casts x to its dtype (float32)
        return self.bias

    def _param(self, path: str | None) -> Tensor | None:
        return None if path is None else self._model[0].get_parameter(path)

    @torch.no_grad()
    def norms(self, x: Tensor) -> Tensor:
        """x: [..., d] -> [..., E] true expert output norms."""
        s = self.spec
        flat = x.reshape(-1, x.shape[-1])
        w_up, w_down = s.up.neuron_rows(self._param(s.up.weight)), s.down.neuron_rows(self._param(s.down.weight))
        w_gate = None if s.gate is None else s.gate.neuron_rows(self._param(s.gate.weight))
        b_up = s.up.bias_rows(self._param(s.up.bias))
        b_gate = None if s.gate is None else s.gate.bias_rows(self._param(s.gate.bias))
        h = ffn_hidden(flat.to(w_up.dtype), w_up, w_gate, b_up, b_gate, s.activation)
        return expert_output_norms(h, w_down, self.expert_size).reshape(*x.shape[:-1], -1)

    def forward(self, x: Tensor) -> Tensor:
        scores = self.norms(x)
        return topk_logits(scores, self.k) if self.k is not None else threshold_logits(scores, self.bias)


def flops_of_scorer(router: LTERouter) -> int | None:
    """Router FLOPs per token: 2 d E for a linear router, the predictor's for Deja Vu, None for an oracle."""
    scorer = router.linear
    if isinstance(scorer, nn.Linear):
        return 2 * scorer.in_features * scorer.out_features
    if isinstance(scorer, LowRankScorer):
        return scorer.flops_per_token()
    return None


# ----------------------------------------------------------------------------- applying a rule
@dataclass
class SelectionReport:
    """What `select_experts` did: the rule, held-out hard-mode sparsity (overall and per FFN), the
    label-fit loss per FFN (fitted rules) and the bias shift (calibrated rules)."""

    rule: str
    sparsity: float
    sparsity_per_layer: dict[str, float]
    fit_loss: dict[str, float]
    bias_shift: float


def _swap_scorers(model: nn.Module, make) -> dict[str, nn.Module]:
    """Replace every router's scorer by `make(router)`; returns the old ones (to restore on failure)."""
    rs = routers(model)
    new = {name: make(r) for name, r in rs.items()}  # built first: a failure here changes nothing
    old = {name: r.linear for name, r in rs.items()}
    for name, r in rs.items():
        r.linear = new[name]
    return old


def _restore_scorers(model: nn.Module, old: dict[str, nn.Module]) -> None:
    for name, r in routers(model).items():
        if name in old:
            r.linear = old[name]


def _heldout_report(rule: str, model: nn.Module, held, fit_loss=None, shift: float = 0.0) -> SelectionReport:
    set_mode(model, "hard")
    _, stats, _ = forward_batches(model, held)
    return SelectionReport(rule, stats.overall(), stats.sparsity(), fit_loss or {}, shift)


def select_experts(model: nn.Module, rule: str, data: Any, *, target_sparsity: float, eval_data: Any = None,
                   batches: int = 8, seq_len: int = 256, batch_size: int = 8, max_tokens: int = 16384,
                   steps: int = 300, lr: float = 1e-2, rank: int = 64, tolerance: float = 0.02,
                   seed: int = 0) -> SelectionReport:
    """Apply selection `rule` (one of `RULES`) to a prepared model's routers; no model weight
    changes. Leaves the model in hard mode at `target_sparsity` on held-out data (±tolerance/2 for
    the calibrated rules; top-k keeps round((1 - target) E) experts per token). The data arguments
    are `lte.fit_routers`'s; `rank` is the Deja Vu predictor's bottleneck. On an error the routers
    are left as they were."""
    if rule not in RULES:
        raise ConfigError("rule", rule, f"one of {RULES}", "LTE itself is lte.train")
    controller = check_fit_args(model, target_sparsity, tolerance, steps)
    if rule == "dejavu" and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError("rank", rank, "an integer >= 1 (the Deja Vu predictor's bottleneck)")
    train, held = split_fit_data(data, eval_data, batches=batches, seq_len=seq_len, batch_size=batch_size)
    device = next(model.parameters()).device
    make = _scorer_factory(model, rule, target_sparsity, rank, seed, device)
    if rule == "moefication" and all(isinstance(r.linear, nn.Linear) for r in routers(model).values()):
        # fit the linear routers in place (another rule's scorer is replaced by a fresh one); keep copies
        old = {name: copy.deepcopy(r.linear) for name, r in routers(model).items()}
    else:
        old = _swap_scorers(model, make)
    try:
        if rule == "moefication":
            r = fit_routers(model, data, target_sparsity=target_sparsity, eval_data=eval_data, batches=batches,
                            seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens, steps=steps, lr=lr,
                            tolerance=tolerance, seed=seed)
            return SelectionReport(rule, r.sparsity, r.sparsity_per_layer, r.fit_loss, r.bias_shift)
        return _apply_rule(model, rule, train, held, controller, max_tokens, steps, lr)
    except BaseException:
        _restore_scorers(model, old)
        raise


def retarget(model: nn.Module, rule: str, eval_data: Any, *, target_sparsity: float, batches: int = 8,
             seq_len: int = 256, batch_size: int = 8, tolerance: float = 0.02) -> SelectionReport:
    """Move a model already selected with `rule` to another target without refitting: the
    predictor is target-independent, so only the bias is recalibrated (top-k: k is reset)."""
    controller = SparsityController(target_sparsity, tolerance)
    held = split_fit_data(eval_data, eval_data, batches=batches, seq_len=seq_len, batch_size=batch_size)[1]
    if rule == "oracle_topk":
        for r in routers(model).values():
            r.linear.k = topk_for(target_sparsity, r.num_experts)
        return _heldout_report(rule, model, held)
    calibrate_heldout(model, held, controller)
    return _heldout_report(rule, model, held, shift=controller.shift)


def _scorer_factory(model: nn.Module, rule: str, target: float, rank: int, seed: int, device):
    if rule == "dejavu":
        return lambda r: LowRankScorer(r.spec.d_model, rank, r.num_experts, seed=seed, device=device)
    if rule == "oracle_topk":
        return lambda r: OracleScorer(model, r, topk_for(target, r.num_experts))
    if rule == "oracle_threshold":
        return lambda r: OracleScorer(model, r, None)
    return lambda r: _random_linear(r, seed, device)  # random; moefication's fresh linear router


def _random_linear(router: LTERouter, seed: int, device) -> nn.Linear:
    """A fresh linear router, N(0, 1/d) weights, zero bias (seeded per FFN name)."""
    lin = nn.Linear(router.spec.d_model, router.num_experts, device=device, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + zlib.crc32(router.spec.name.encode()))
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * router.spec.d_model ** -0.5)
        lin.bias.zero_()
    return lin


def _apply_rule(model, rule, train, held, controller: SparsityController, max_tokens, steps, lr) -> SelectionReport:
    fit_loss = {}
    if rule == "dejavu":
        fit_loss, _ = fit_router_weights(model, train, steps=steps, lr=lr, max_tokens=max_tokens)
    if rule == "oracle_topk":
        return _heldout_report(rule, model, held)
    measured = calibrate_heldout(model, held, controller)
    logger.info("%s: held-out sparsity %.4f (target %.3f), bias shift %+.3f", rule, measured, controller.target,
                controller.shift)
    return _heldout_report(rule, model, held, fit_loss, controller.shift)


def stage2_config(base: TrainConfig, rule: str, target_sparsity: float) -> TrainConfig:
    """`base` turned into the "+S2" run of `rule`: no stage 1, the same stage 2 as LTE's (steps,
    lr, batches); calibrated rules keep their target (the driver recalibrates on held-out data
    before freezing the routers), top-k has no threshold to calibrate."""
    target = None if rule == "oracle_topk" else target_sparsity
    return replace(base, stage1_steps=0, target_sparsity=target)
