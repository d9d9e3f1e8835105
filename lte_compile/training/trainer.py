"""LTE inside transformers' `Trainer`: `LTETrainer` (compute-loss hook + router optimizer group) and
`LTETrainerCallback` (stage switch, target-sparsity controller, sparsity in the logs).

    model = lte.prepare(model, lte.Config())
    trainer = LTETrainer(model=model, args=TrainingArguments(max_steps=400, ...), train_dataset=ds,
                         lte_train_config=TrainConfig(stage1_steps=200, target_sparsity=0.5))
    trainer.train()

Steps 1..stage1_steps are stage 1 (soft, loss = task + eta*L_eff + lam*L_sep, routers trained in
their own AdamW group at `router_lr`/`router_weight_decay`; router_lr None is the paper's 1e-2,
as the Trainer starts from the routers as they are: after `lte.fit_routers` pass 1e-3); later
steps are stage 2 (hard mode, routers frozen, task loss only). The total is the Trainer's `max_steps`/epochs; `stage2_steps` of
the TrainConfig is not used here. With a target, the bias is corrected every stage-1 step and
calibrated in hard mode (on the latest stage-1 batches) when stage 2 starts.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback

from ..errors import NotPreparedError
from ..plan import config_of, is_prepared, routers, set_mode
from .config import TrainConfig
from .controller import SparsityController
from .losses import gate_stats, loss_terms, valid_gates
from .optim import adamw_groups, unwrap

logger = logging.getLogger(__name__)


class LTETrainerCallback(TrainerCallback):
    """Switches stages at `stage1_steps` and runs the target-sparsity controller."""

    def __init__(self, config: TrainConfig, trainer: "LTETrainer"):
        self.config, self.trainer = config, trainer
        self.controller = (SparsityController(config.target_sparsity, config.sparsity_tolerance, config.controller_gain)
                           if config.target_sparsity is not None else None)
        self.recent: list[dict[str, Tensor]] = []

    def _routers(self):
        return routers(unwrap(self.trainer.model))

    def on_train_begin(self, args, state, control, **kwargs):
        set_mode(unwrap(self.trainer.model), "soft" if state.global_step < self.config.stage1_steps else "hard")
        if state.global_step >= self.config.stage1_steps:
            self._freeze()

    def on_step_end(self, args, state, control, **kwargs):
        model = unwrap(self.trainer.model)
        rs = self._routers()
        tau = config_of(model).tau
        stage1 = state.global_step <= self.config.stage1_steps
        if stage1 and self.controller is not None:
            self.controller.step(rs, list(valid_gates(model, self.trainer.last_mask).values()), tau)
        if state.global_step == self.config.stage1_steps:
            self._start_stage2(model, rs, tau)

    def _start_stage2(self, model: nn.Module, rs: dict, tau: float) -> None:
        set_mode(model, "hard")
        self._freeze()
        if self.controller is not None and self.trainer.recent_batches:
            def collect():
                gates, off, total = [], 0.0, 0.0
                with torch.no_grad():
                    for b in self.trainer.recent_batches:
                        model(**b)
                        stats = gate_stats({k: r.last_gates for k, r in rs.items()}, tau, b.get("attention_mask"))
                        gates += list(valid_gates(model, b.get("attention_mask")).values())
                        off, total = off + sum(stats.off.values()), total + sum(stats.total.values())
                return gates, off / max(total, 1.0)

            measured = self.controller.calibrate(rs, collect, tau)
            logger.info("LTETrainer: stage 2 starts at hard sparsity %.4f (target %.3f)", measured, self.controller.target)

    def _freeze(self) -> None:
        for r in self._routers().values():
            r.requires_grad_(False)
        self.trainer.lte_stage = "stage2"


class LTETrainer(Trainer):
    """A `transformers.Trainer` that trains an LTE-prepared model through both stages."""

    def __init__(self, *args: Any, lte_train_config: TrainConfig | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not is_prepared(self.model):
            raise NotPreparedError(f"{type(self.model).__name__} is not prepared: call lte.prepare before LTETrainer")
        self.lte_train_config = lte_train_config or TrainConfig()
        self.lte_stage = "stage1"
        self.last_stats, self.last_terms, self.last_mask = None, {}, None
        self.recent_batches: list[dict[str, Tensor]] = []
        self.lte_callback = LTETrainerCallback(self.lte_train_config, self)
        self.add_callback(self.lte_callback)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """AdamW with the routers in their own group (router_lr, router_weight_decay)."""
        if self.optimizer is None:
            opt_model = model if model is not None else self.model
            decay = set(self.get_decay_parameter_names(opt_model))
            no_decay = {n for n, _ in opt_model.named_parameters()} - decay
            groups = adamw_groups(opt_model, weight_decay=self.args.weight_decay, no_decay=no_decay,
                                  router_lr=self.lte_train_config.stage1_router_lr(fitted=False),
                                  router_weight_decay=self.lte_train_config.router_weight_decay)
            cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = cls(groups, **kwargs)
        return self.optimizer

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add LTE sparsity (overall and per layer), loss terms and bias shift to training logs."""
        if self.last_stats is not None and "loss" in logs:
            s = self.last_stats
            logs["lte_sparsity"] = round(s.overall(), 4)
            logs.update({f"lte_sparsity/{k}": round(v, 4) for k, v in s.sparsity().items()})
            logs.update({k: round(v, 4) for k, v in self.last_terms.items()})
            if self.lte_callback.controller is not None:
                logs["lte_bias_shift"] = round(self.lte_callback.controller.shift, 4)
        super().log(logs, *args, **kwargs)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        mask = inputs.get("attention_mask")
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if not model.training:
            return (loss, outputs) if return_outputs else loss
        inner = unwrap(model)
        rs = [r for r in self.lte_callback._routers().values() if r.last_gates is not None]
        tau = config_of(inner).tau
        self.last_mask = mask
        self.last_stats = gate_stats({r.spec.name: r.last_gates for r in rs}, tau, mask)
        if self.lte_stage == "stage1":
            cfg = self.lte_train_config
            terms = loss_terms(inner, loss, eta=cfg.eta, lam=cfg.lam, eps=cfg.sep_eps, attention_mask=mask)
            loss = terms.total
            self.last_terms = {"lte_task": float(terms.task), "lte_eff": float(terms.eff), "lte_sep": float(terms.sep)}
            self.recent_batches = (self.recent_batches + [{k: v.detach() for k, v in inputs.items()
                                                           if isinstance(v, Tensor)}])[-cfg.calibration_batches:]
        else:
            self.last_terms = {"lte_task": float(loss.detach())}
        return (loss, outputs) if return_outputs else loss
