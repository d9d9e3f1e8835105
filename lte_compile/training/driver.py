"""`lte.train`: the two-stage LTE driver, with an optional target sparsity.

    model = lte.prepare(model, lte.Config())
    result = lte.train(model, tokens, TrainConfig(target_sparsity=0.5, out_dir="runs/lte"))

Stage 1 (soft): model and routers train together on `task + eta * L_eff + lam * L_sep`
(`losses.py`), routers in their own AdamW group (weight decay 0.1 as in the paper; lr 1e-3 from
fitted routers, the paper's 1e-2 from others: `TrainConfig.router_lr`).
Stage 2 (hard): routers frozen, FFNs masked by G > tau, the model fine-tuned on the task alone.
Stage 1 starts from routers fitted to the dense model's expert labels (`router_init='fit'`,
fit.py; 'keep' starts from the routers as they are). With `target_sparsity`, a
`SparsityController` steers the router bias (controller.py says why
not eta): a warm start before stage 1, a damped correction each stage-1 step, a calibration in
hard mode at the end of stage 1, and a check on held-out data at the end (recalibrated if off
by more than the tolerance). With `kd_weight > 0` the objective gains logit distillation from
a frozen dense teacher (losses.kd_loss), in stage 1 and/or 2. `stage1_steps=0` is stage 2 alone
under the routers as they are (after the held-out calibration when there is a target): the "+S2"
adaptation of any selection rule (baselines.py). Telemetry (telemetry.py), checkpoints (checkpoint.py) and DDP
(launched by torchrun; gloo on CPU) are built in. `data` is a 1-D token tensor, a
`TokenBatches`, or a list/iterable of dict batches (causal LM or sequence classification).
"""
from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..errors import ConfigError, LTEError, NotPreparedError
from ..plan import config_of, is_prepared, routers, set_mode
from .batches import make_batches, prepare_batch, task_loss
from .checkpoint import (check_fingerprint, clear_checkpoints, latest_checkpoint, load_checkpoint, run_fingerprint,
                         save_checkpoint)
from .config import LossFn, TrainConfig, TrainResult
from .controller import SparsityController
from .distributed import broadcast_from_rank0, fsdp_shard, rank_and_world, reduce_mean, reduce_stats, wrap_model
from .evaluate import forward_batches
from .losses import GateStats, gate_stats, kd_loss, loss_terms, valid_gates
from .optim import adamw_groups
from .telemetry import Telemetry

logger = logging.getLogger(__name__)


class NonFiniteLossError(LTEError):
    """A training step produced a NaN/Inf loss (or gradient norm); training stopped before the
    optimizer step, so the model and the checkpoints on disk are those of the last good step."""


class _Run:
    """State of one `train` call: model, data, controller, telemetry; runs both stages."""

    def __init__(self, model: nn.Module, data: Any, cfg: TrainConfig, eval_data: Any, loss_fn: LossFn | None,
                 callback: Callable[[dict[str, Any]], None] | None, teacher: nn.Module | None = None):
        self.model, self.cfg, self.loss_fn, self.callback = model, cfg, loss_fn, callback
        self.rank, self.world = rank_and_world()
        self.device = next(model.parameters()).device
        self.train_data, self.heldout = make_batches(data, cfg, self.rank, self.world, eval_data)
        self.routers = routers(model)
        self.tau = config_of(model).tau
        changed = sorted(k for k, r in self.routers.items() if r.tau != self.tau)
        if changed:  # lte_config.tau edited after prepare: losses and the masks would disagree
            raise ConfigError("lte_config.tau", self.tau, f"{self.routers[changed[0]].tau} (the routers' threshold, "
                              "fixed at prepare time)", "prepare a fresh model with lte.Config(tau=...)")
        self.controller = (SparsityController(cfg.target_sparsity, cfg.sparsity_tolerance, cfg.controller_gain)
                           if cfg.target_sparsity is not None else None)
        out = Path(cfg.out_dir) if cfg.out_dir else None
        self.ckpt_dir = out / "checkpoints" if out else None
        self.telemetry = Telemetry(out, enabled=self.rank == 0, progress=cfg.progress)
        self.fingerprint = run_fingerprint(model, cfg.to_dict())
        self.teacher = _frozen_teacher(model, teacher) if cfg.kd_weight > 0 else None
        self._step = 0

    # -- optimizers
    def _optimizer(self, stage: str) -> tuple[torch.optim.Optimizer, Any]:
        cfg = self.cfg
        stage1 = stage == "stage1"
        groups = adamw_groups(self.model, lr=cfg.model_lr if stage1 else cfg.stage2_lr,
                              weight_decay=cfg.model_weight_decay,
                              router_lr=cfg.stage1_router_lr() if stage1 else None,
                              router_weight_decay=cfg.router_weight_decay)
        opt = torch.optim.AdamW(groups, betas=(0.9, 0.95))
        steps = cfg.stage1_steps if stage == "stage1" else cfg.stage2_steps
        warm = max(cfg.warmup_steps, 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
            0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / max(steps, 1))))))
        return opt, sched

    def _set_stage(self, stage: str) -> None:
        set_mode(self.model, "soft" if stage == "stage1" else "hard")
        for r in self.routers.values():
            r.requires_grad_(stage == "stage1")
        self.model.train()

    # -- measuring
    def collect(self, batches: list[dict[str, Tensor]]) -> tuple[list[Tensor], GateStats, float]:
        """Forward `batches` in the current mode: (valid gates per layer, reduced stats, mean task loss)."""
        gates, stats, loss = forward_batches(self.model, batches, self.cfg.task, self.loss_fn)
        return list(gates.values()), reduce_stats(stats, self.world), reduce_mean({"loss": loss}, self.world)["loss"]

    def calibrate(self, batches: list[dict[str, Tensor]], what: str, at: tuple[str, int]) -> float:
        """Calibrate the bias; `at` = (stage, step) the record is filed under, so a resume from a
        checkpoint taken before it drops it from log.jsonl (it runs again)."""
        def collect():
            gates, stats, _ = self.collect(batches)
            return gates, stats.overall()

        measured = self.controller.calibrate(self.routers, collect, self.tau)
        logger.info("%s: sparsity %.4f (target %.3f), bias shift %+.3f", what, measured, self.controller.target,
                    self.controller.shift)
        self.telemetry.log({"kind": "calibration", "stage": at[0], "step": at[1], "what": what, "sparsity": measured,
                            "target": self.controller.target, "bias_shift": self.controller.shift})
        return measured

    def init_routers(self) -> None:
        """router_init='fit': fit the routers to the dense model's expert labels (fit.py) before
        stage 1. From prepare's routers, the soft stage spent its steps moving the model to fit
        routers that knew nothing (shipped Llama, s = 0.8: dense ppl of the stage-1 weights 75.9 ->
        111, hard 97.4); from fitted ones it ends at hard 85.2. Every rank fits on its own batches,
        then takes rank 0's routers, so the ranks start identical."""
        from .fit import fit_router_weights

        batches = [self.train_data.batch(i) for i in range(self.cfg.router_fit_batches)]
        losses, tokens = fit_router_weights(self.model, batches, steps=self.cfg.router_fit_steps,
                                            loss_fn=self.loss_fn)
        broadcast_from_rank0([p for r in self.routers.values() for p in r.parameters()], self.world)
        self.telemetry.log({"kind": "router_init", "stage": "stage1", "step": 0, "tokens": tokens,
                            "fit_loss": sum(losses.values()) / max(len(losses), 1)})

    def _calibration_batches(self) -> list[dict[str, Tensor]]:
        return [self.train_data.batch(i) for i in range(self.cfg.calibration_batches)]

    # -- steps
    def step(self, wrapped: nn.Module, stage: str, opt, sched) -> dict[str, Any]:
        cfg = self.cfg
        batch = prepare_batch(next(self.train_data), cfg.task, self.device)
        kd_on = cfg.kd_in(stage)
        loss, kd = self._losses(wrapped, batch) if kd_on else (task_loss(wrapped, batch, self.loss_fn), None)
        mask = batch.get("attention_mask")
        if stage == "stage1":
            terms = loss_terms(self.model, loss, eta=cfg.eta, lam=cfg.lam, eps=cfg.sep_eps, attention_mask=mask)
            total, rec = terms.total, terms.as_floats()
        else:
            total, rec = loss, {"loss": float(loss.detach()), "task": float(loss.detach())}
        if kd is not None:
            total = total + cfg.kd_weight * kd
            rec |= {"loss": float(total.detach()), "kd": float(kd.detach())}
        self._check_finite(stage, {"loss": float(total.detach())}, opt)
        total.backward()
        if cfg.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                                  cfg.grad_clip)
            self._check_finite(stage, {"gradient norm": float(norm)}, opt)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        gates = {k: r.last_gates for k, r in self.routers.items() if r.last_gates is not None}
        stats = reduce_stats(gate_stats(gates, self.tau, mask), self.world)
        if stage == "stage1" and self.controller is not None:
            self.controller.step(self.routers, list(valid_gates(self.model, mask).values()), self.tau)
        rec = reduce_mean({k: v for k, v in rec.items() if k not in ("eta", "lam")}, self.world) | {
            "eta": cfg.eta, "lam": cfg.lam if stage == "stage1" else 0.0}
        return {**rec, "sparsity": stats.overall(), "sparsity_per_layer": stats.sparsity(),
                "active_per_token": stats.active_per_token(), "lr": sched.get_last_lr()[0],
                "bias_shift": self.controller.shift if self.controller else 0.0,
                "target": self.controller.target if self.controller else None}

    def _losses(self, wrapped: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(task loss, distillation loss) of one forward: the student's logits against the frozen
        dense teacher's on the same inputs."""
        out = wrapped(**batch)
        with torch.no_grad():
            teacher_logits = self.teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits
        return out.loss, kd_loss(out.logits, teacher_logits, self.cfg.kd_temperature, batch.get("attention_mask"))

    def _check_finite(self, stage: str, values: dict[str, float], opt) -> None:
        """Stop at the first non-finite loss (every rank agrees: one bad rank stops them all)."""
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        flags = reduce_mean({"bad": float(bool(bad))}, self.world)
        if not bad and flags["bad"] == 0.0:
            return
        opt.zero_grad(set_to_none=True)
        what = ", ".join(f"{k} is {v}" for k, v in bad.items()) or "another rank's loss is not finite"
        last = latest_checkpoint(self.ckpt_dir) if self.ckpt_dir else None
        raise NonFiniteLossError(
            f"{stage} step {self._step}: {what}; training stopped before the optimizer step (the model keeps "
            f"the weights of the step before; last checkpoint: {last or 'none'}, left intact). Check the data "
            "and inputs for NaN/Inf, or lower the learning rates (model_lr, router_lr, stage2_lr)")

    def run_stage(self, stage: str, start: int, opt, sched) -> None:
        cfg = self.cfg
        steps = cfg.stage1_steps if stage == "stage1" else cfg.stage2_steps
        wrapped = wrap_model(self.model, cfg, self.world)
        self.telemetry.bar(steps, start, f"LTE {stage} ({'soft' if stage == 'stage1' else 'hard'})")
        for step in range(start + 1, steps + 1):
            self._step = step
            rec = {"kind": "step", "stage": stage, "step": step, **self.step(wrapped, stage, opt, sched)}
            if step % cfg.log_every == 0 or step == steps:
                self.telemetry.log(rec)
            if stage == "stage2" and cfg.heldout_every and (step % cfg.heldout_every == 0 or step == steps):
                self.log_heldout_sparsity(stage, step)
            if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == steps):
                self.save(stage, step, opt, sched)
            if self.callback is not None:
                self.callback(rec)
        self.telemetry.close_bar()

    def log_heldout_sparsity(self, stage: str, step: int) -> None:
        """Held-out hard-mode sparsity on two batches, logged: a drift under frozen routers shows here."""
        _, stats, loss = self.collect(self.heldout[:2])
        self.telemetry.log({"kind": "heldout", "stage": stage, "step": step, "sparsity": stats.overall(),
                            "eval_loss": loss, "target": self.cfg.target_sparsity})

    def save(self, stage: str, step: int, opt, sched) -> None:
        meta = {"data": self.train_data.state_dict(), "config": self.cfg.to_dict(), "fingerprint": self.fingerprint,
                "controller": self.controller.state_dict() if self.controller else None}
        save_checkpoint(self.ckpt_dir, stage=stage, step=step, model=self.model, optimizer=opt, scheduler=sched,
                        meta=meta, rank=self.rank, world_size=self.world, keep=self.cfg.keep_checkpoints)

    def resume_point(self) -> tuple[str, int, Path | None]:
        if self.ckpt_dir is None:
            return "stage1", 0, None
        if not self.cfg.resume:
            if self.rank == 0 and (n := clear_checkpoints(self.ckpt_dir)):
                logger.warning("resume=False: deleted %d checkpoint(s) of an earlier run in %s", n, self.ckpt_dir)
            return "stage1", 0, None
        ckpt = latest_checkpoint(self.ckpt_dir)
        if ckpt is None:
            return "stage1", 0, None
        check_fingerprint(ckpt, self.fingerprint)  # another run's checkpoints: refuse, never overwrite the model
        stage, step = ckpt.name.split("_")[1], int(ckpt.name.split("_")[2])
        return stage, step, ckpt

    def restore(self, ckpt: Path, opt, sched) -> None:
        meta = load_checkpoint(ckpt, model=self.model, optimizer=opt, scheduler=sched, rank=self.rank)
        self.train_data.load_state_dict(meta["data"])
        if self.controller is not None and meta.get("controller"):
            self.controller.load_state_dict(meta["controller"])
        self.telemetry.load()
        self.telemetry.truncate_after(meta["stage"], meta["step"])
        logger.info("resumed from %s (%s step %d)", ckpt, meta["stage"], meta["step"])

    def run(self) -> TrainResult:
        stage, step, ckpt = self.resume_point()
        if ckpt is None:
            _seed_all(self.cfg.seed)
            self.telemetry.start_fresh()
            if stage == "stage1" and self.cfg.stage1_steps > 0 and self.cfg.router_init == "fit":
                self.init_routers()
        if self.cfg.distributed == "fsdp" and self.world > 1:
            fsdp_shard(self.model)
        if stage == "stage1":
            self._set_stage("stage1")
            opt, sched = self._optimizer("stage1")
            if ckpt is not None:
                self.restore(ckpt, opt, sched)
            elif self.controller is not None and self.cfg.stage1_steps > 0:  # no stage 1: nothing to warm up
                self.calibrate(self._calibration_batches(), "warm start (soft)", ("stage1", 0))
            self.run_stage("stage1", step, opt, sched)
            self._set_stage("stage2")
            if self.controller is not None:
                # On the held-out batches: the target is defined there, and a bias set on training
                # batches landed ~0.01 (tiny models: ~0.03) off it. Only one scalar is fitted.
                self.calibrate(self.heldout, "end of stage 1 (hard, held-out)", ("stage2", 0))
            step, ckpt = 0, None
        self._set_stage("stage2")
        opt, sched = self._optimizer("stage2")
        if ckpt is not None:
            self.restore(ckpt, opt, sched)
        self.run_stage("stage2", step, opt, sched)
        return self.finish()

    def finish(self) -> TrainResult:
        _, stats, loss = self.collect(self.heldout)
        if self.controller is not None and abs(stats.overall() - self.controller.target) > self.cfg.sparsity_tolerance:
            logger.warning("held-out sparsity %.4f is off target %.3f by more than %.3f%s", stats.overall(),
                           self.controller.target, self.cfg.sparsity_tolerance,
                           ": recalibrating the bias" if self.cfg.recalibrate_final else
                           " (recalibrate_final=True shifts the bias to it, on masks stage 2 did not adapt to)")
            if self.cfg.recalibrate_final:
                self.calibrate(self.heldout, "held-out recalibration (hard)", ("final", 0))
                _, stats, loss = self.collect(self.heldout)
        rec = {"kind": "eval", "stage": "final", "eval_loss": loss, "sparsity": stats.overall(),
               "sparsity_per_layer": stats.sparsity(), "active_per_token": stats.active_per_token(),
               "target": self.cfg.target_sparsity}
        self.telemetry.log(rec)
        if self.cfg.plots:
            self.telemetry.plot()
        return TrainResult(stats.overall(), stats.sparsity(), stats.active_per_token(), loss,
                           self.controller.shift if self.controller else 0.0, self.cfg.target_sparsity,
                           self.telemetry.records, self.cfg.out_dir)


def _seed_all(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)


def _frozen_teacher(model: nn.Module, teacher: nn.Module | None) -> nn.Module:
    """The distillation teacher: `teacher` as given, or a copy of `model` as it is now in dense mode
    (its weights before training); eval mode, no gradients either way."""
    if teacher is None:
        teacher = copy.deepcopy(model).requires_grad_(False)
        set_mode(teacher, "dense")
    if any(r.mode != "dense" for r in routers(teacher).values()):
        raise ConfigError("teacher", "a prepared model in soft/hard mode", "a dense model",
                          "lte.set_mode(teacher, 'dense'), or pass the model before lte.prepare")
    return teacher.eval()  # its forward runs under no_grad


def train(model: nn.Module, data: Any, config: TrainConfig | None = None, *, eval_data: Any = None,
          loss_fn: LossFn | None = None, callback: Callable[[dict[str, Any]], None] | None = None,
          teacher: nn.Module | None = None, **overrides: Any) -> TrainResult:
    """Run LTE stage 1 (soft) then stage 2 (hard) on a prepared model, in place.

    data: a 1-D token tensor (windows of `seq_len`; the last `heldout_fraction` held out), a
      `TokenBatches`, or a list/iterable of dict batches (`input_ids`, `attention_mask`, `labels`:
      [b, s] for causal LMs, [b] for sequence classification).
    eval_data: held-out data of the same kinds, for the final sparsity and loss.
    loss_fn: (model, batch) -> task loss, for models without a transformers `.loss`.
    callback: called with every step record (after its checkpoint, if one is due).
    teacher: the dense model to distil from when `kd_weight > 0` (default: a frozen copy of `model`
      taken now, in dense mode); it is put in eval mode and runs without gradients.
    overrides: TrainConfig fields, e.g. `train(model, ids, target_sparsity=0.5)`.
    Returns a TrainResult (held-out sparsity per layer, active experts per token, eval loss).
    """
    if not is_prepared(model):
        raise NotPreparedError(f"{type(model).__name__} is not prepared: call lte.prepare(model, lte.Config()) "
                               "before lte.train")
    cfg = config or TrainConfig()
    if overrides:
        unknown = set(overrides) - set(TrainConfig.__dataclass_fields__)
        if unknown:
            raise ConfigError("train() keyword", sorted(unknown), "TrainConfig field names")
        cfg = TrainConfig(**{**cfg.to_dict(), **overrides})
    if cfg.kd_weight > 0 and loss_fn is not None:
        raise ConfigError("kd_weight", cfg.kd_weight, "0 with a custom loss_fn",
                          "distillation reads the model's .logits output; drop loss_fn or set kd_weight=0")
    saved = _ModelState(model)
    try:
        return _Run(model, data, cfg, eval_data, loss_fn, callback, teacher).run()
    except BaseException:
        saved.restore()  # a failed run leaves the model's LTE mode, train/eval and router grads as they were
        raise


class _ModelState:
    """The model's train/eval flags, each router's mode and its parameters' requires_grad."""

    def __init__(self, model: nn.Module):
        self.training = [(m, m.training) for m in model.modules()]
        self.routers = [(r, r.mode, [p.requires_grad for p in r.parameters()]) for r in routers(model).values()]

    def restore(self) -> None:
        for m, training in self.training:
            m.training = training
        for r, mode, grads in self.routers:
            r.mode = mode
            if mode == "dense":
                r.last_gates = None
            for p, g in zip(r.parameters(), grads):
                p.requires_grad_(g)
