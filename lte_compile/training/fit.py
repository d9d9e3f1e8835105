"""Training-free LTE: fit the routers on the frozen model's activations, then set the sparsity.

    lte.prepare(model, lte.Config())
    report = lte.fit_routers(model, token_ids, target_sparsity=0.7)   # minutes; no model weight changes

MoEfication's recipe on LTE's experts and router: run the dense model on a few batches, label
each (token, expert) pair with the expert's share of the token's FFN activation norm
(`expert_labels`: ||h_e|| / max_e ||h_e||, in [0, 1]), train each router (linear + sigmoid, the
same module LTE trains) on those labels with a cross-entropy, then shift the router biases so
hard-mode sparsity on held-out data lands on the target (`SparsityController.calibrate`). Only
router parameters change, so the model's own quality is untouched in dense mode and the routers
can later be refined by `lte.train`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, NotPreparedError
from ..plan import config_of, get_mode, is_prepared, routers, set_mode
from ..plan.prepare import hookable
from ..plan.router import LTERouter
from .batches import TokenBatches, eval_list, prepare_batch
from .config import LossFn
from .controller import SparsityController
from .evaluate import forward_batches

logger = logging.getLogger(__name__)

FIT_STEPS = 300
"""Full-batch Adam steps per router (the label loss is flat by then on the small LMs)."""
FIT_LR = 1e-2
FIT_MAX_TOKENS = 16384
"""Activation rows kept per FFN (8 batches of 8 x 256 tokens)."""


def expert_labels(h: Tensor, expert_size: int) -> Tensor:
    """h: [..., E*B] FFN hidden activations -> [..., E] each expert's activation norm relative to
    the token's largest one (1 for the strongest expert, 0 for an all-zero one)."""
    norms = h.unflatten(-1, (h.shape[-1] // expert_size, expert_size)).float().norm(dim=-1)
    return norms / norms.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


@dataclass
class FitReport:
    """What `fit_routers` did: held-out hard-mode sparsity overall and per FFN, label fit loss."""

    sparsity: float
    sparsity_per_layer: dict[str, float]
    fit_loss: dict[str, float]
    bias_shift: float
    tokens: int


class _Collector:
    """Forward hooks (dense mode) recording each router's input x and its FFN's hidden labels."""

    def __init__(self, model: nn.Module, max_tokens: int):
        self.max_tokens = max_tokens
        self.xs: dict[str, list[Tensor]] = {}
        self.ys: dict[str, list[Tensor]] = {}
        self.handles = []
        self.observed: list[LTERouter] = []
        for name, r in routers(model).items():
            spec = r.spec
            if not hookable(model, spec):  # a functional FFN: its rewritten forward reports x and h
                r.observer = self._observer(name, r)
                self.observed.append(r)
                continue
            self.handles.append(model.get_submodule(spec.up.module).register_forward_hook(self._x_hook(name)))
            self.handles.append(model.get_submodule(spec.down.module).register_forward_pre_hook(self._h_hook(name, r)))

    def _observer(self, name: str, r: LTERouter):
        x_hook, h_hook = self._x_hook(name), self._h_hook(name, r)

        def observe(kind: str, t: Tensor) -> None:
            x_hook(None, (t,), None) if kind == "x" else h_hook(None, (t,))
        return observe

    def _x_hook(self, name: str):
        def hook(module, args, output):
            self._keep(self.xs, name, args[0].detach().reshape(-1, args[0].shape[-1]).float())
        return hook

    def _h_hook(self, name: str, r: LTERouter):
        def hook(module, args):
            h = args[0].detach()
            self._keep(self.ys, name, expert_labels(h, r.expert_size).reshape(-1, r.num_experts))
        return hook

    def _keep(self, store: dict[str, list[Tensor]], name: str, rows: Tensor) -> None:
        have = sum(t.shape[0] for t in store.get(name, []))
        if have < self.max_tokens:
            store.setdefault(name, []).append(rows[: self.max_tokens - have].cpu())

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for r in self.observed:
            r.observer = None


def fit_scorer(scorer: nn.Module, x: Tensor, y: Tensor, steps: int, lr: float) -> float:
    """Full-batch Adam on the soft labels: BCE(sigmoid(scorer(x)), y). Returns the final loss.

    `scorer` is whatever produces a router's logits (`router.linear`: the linear router, or a
    baseline's predictor, training/baselines.py); its parameters' requires_grad flags are restored."""
    dev, dt = scorer.weight.device, scorer.weight.dtype
    x, y = x.to(dev, dt), y.to(dev, dt)
    frozen = [p for p in scorer.parameters() if not p.requires_grad]  # e.g. after stage 2
    scorer.requires_grad_(True)
    opt = torch.optim.Adam(scorer.parameters(), lr=lr)
    loss = torch.tensor(float("nan"))
    try:
        with torch.enable_grad():
            for _ in range(steps):
                loss = F.binary_cross_entropy_with_logits(scorer(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        for p in frozen:
            p.requires_grad_(False)
        scorer.zero_grad(set_to_none=True)
    return float(loss.detach())


def split_fit_data(data: Any, eval_data: Any, *, batches: int, seq_len: int, batch_size: int
                   ) -> tuple[list[dict[str, Tensor]], list[dict[str, Tensor]]]:
    """(batches to fit on, held-out batches to calibrate on); a token tensor without `eval_data`
    gives its last 10 % (at least one batch) as the held-out part."""
    if isinstance(data, Tensor) and eval_data is None:
        n_hold = max(seq_len * batch_size, data.numel() // 10)
        data, eval_data = data[: data.numel() - n_hold], data[data.numel() - n_hold:]
    if eval_data is None:
        raise ConfigError("eval_data", None, "held-out data to calibrate the sparsity on")
    train = eval_list(data, seq_len, batch_size, batches, 0, 1) if isinstance(data, (Tensor, TokenBatches)) \
        else list(data)[:batches]
    held = eval_list(eval_data, seq_len, batch_size, batches, 0, 1) \
        if isinstance(eval_data, (Tensor, TokenBatches)) else list(eval_data)[:batches]
    return train, held


def collect_labels(model: nn.Module, batches: list[dict[str, Tensor]], max_tokens: int,
                   loss_fn: LossFn | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Run the model dense (eval mode) on `batches`: per router, its inputs x [N, d] and the
    expert labels [N, E] (`expert_labels`), at most `max_tokens` rows each. `loss_fn(model, batch)`
    runs models without a transformers signature (as in `lte.train`). Mode and every module's
    train flag are restored."""
    old_mode, flags = get_mode(model), [(m, m.training) for m in model.modules()]
    collector = _Collector(model, max_tokens)
    device = next(model.parameters()).device
    try:
        set_mode(model, "dense")
        model.eval()
        with torch.no_grad():
            for raw in batches:
                batch = prepare_batch(raw, "auto", device)
                if loss_fn is not None:
                    loss_fn(model, batch)
                else:
                    model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        collector.remove()
        for m, training in flags:
            m.training = training
        set_mode(model, old_mode if old_mode in ("dense", "soft", "hard") else "dense")
    return ({k: torch.cat(v) for k, v in collector.xs.items()}, {k: torch.cat(v) for k, v in collector.ys.items()})


def fit_router_weights(model: nn.Module, batches: list[dict[str, Tensor]], *, steps: int, lr: float = FIT_LR,
                       max_tokens: int = FIT_MAX_TOKENS, loss_fn: LossFn | None = None
                       ) -> tuple[dict[str, float], int]:
    """Fit every router's linear layer to the dense model's expert labels on `batches` (the bias
    is left where the fit puts it: calibrating the sparsity is the caller's). Returns (each
    router's final label loss, the fewest activation rows any router was fitted on). `lte.fit_routers` and `lte.train(router_init="fit")` use it."""
    rs = routers(model)
    xs, ys = collect_labels(model, batches, max_tokens, loss_fn)
    losses = {name: fit_scorer(r.linear, xs[name], ys[name], steps, lr) for name, r in rs.items()}
    return losses, min(v.shape[0] for v in xs.values())


def calibrate_heldout(model: nn.Module, held: list[dict[str, Tensor]], controller: SparsityController) -> float:
    """Hard mode; shift the router biases until held-out sparsity is within tolerance/2 of the
    controller's target (when reachable). Returns the measured sparsity."""
    set_mode(model, "hard")

    def collect():
        gates, stats, _ = forward_batches(model, held)
        return list(gates.values()), stats.overall()

    return controller.calibrate(routers(model), collect, config_of(model).tau)


def check_fit_args(model: nn.Module, target_sparsity: float, tolerance: float, steps: int) -> SparsityController:
    """Checks shared by the fitting functions (before anything changes); returns the controller."""
    if not is_prepared(model):
        raise NotPreparedError(f"{type(model).__name__} is not prepared: call lte.prepare(model) before fitting routers")
    controller = SparsityController(target_sparsity, tolerance)  # validates the target
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ConfigError("steps", steps, "an integer >= 1")
    return controller


def fit_routers(model: nn.Module, data: Any, *, target_sparsity: float, eval_data: Any = None,
                batches: int = 8, seq_len: int = 256, batch_size: int = 8, max_tokens: int = FIT_MAX_TOKENS,
                steps: int = FIT_STEPS, lr: float = FIT_LR, tolerance: float = 0.02, seed: int = 0) -> FitReport:
    """Fit a prepared model's routers without changing its weights; leaves it in hard mode.

    data / eval_data: 1-D token tensors (or lists of dict batches). `batches` of `data` give the
    activations (at most `max_tokens` tokens per FFN); `eval_data` (default: the last 10 % of a
    token tensor) sets the bias so held-out hard-mode sparsity is `target_sparsity` (± tolerance/2
    when reachable).
    """
    controller = check_fit_args(model, target_sparsity, tolerance, steps)
    train, held = split_fit_data(data, eval_data, batches=batches, seq_len=seq_len, batch_size=batch_size)
    torch.manual_seed(seed)
    fit_loss, tokens = fit_router_weights(model, train, steps=steps, lr=lr, max_tokens=max_tokens)
    measured = calibrate_heldout(model, held, controller)
    _, stats, _ = forward_batches(model, held)
    logger.info("fit_routers: %d tokens per FFN, held-out sparsity %.4f (target %.3f), bias shift %+.3f",
                tokens, measured, target_sparsity, controller.shift)
    return FitReport(stats.overall(), stats.sparsity(), fit_loss, controller.shift, tokens)
