"""`lte.train`: the two-stage LTE driver, with an optional target sparsity.

    model = lte.prepare(model, lte.Config())
    result = lte.train(model, tokens, TrainConfig(target_sparsity=0.5, out_dir="runs/lte"))

Stage 1 (soft): model and routers train together on `task + eta * L_eff + lam * L_sep`
(`losses.py`), routers in their own AdamW group (paper: lr 1e-2, weight decay 0.1).
Stage 2 (hard): routers frozen, FFNs masked by G > tau, the model fine-tuned on the task alone.
With `target_sparsity`, a `SparsityController` steers the router bias (controller.py says why
not eta): a warm start before stage 1, a damped correction each stage-1 step, a calibration in
hard mode at the end of stage 1, and a check on held-out data at the end (recalibrated if off
by more than the tolerance). Telemetry (telemetry.py), checkpoints (checkpoint.py) and DDP
(launched by torchrun; gloo on CPU) are built in. `data` is a 1-D token tensor, a
`TokenBatches`, or a list/iterable of dict batches (causal LM or sequence classification).
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .controller import SparsityController
from .data import TokenBatches
from .errors import ConfigError, NotPreparedError
from .losses import DEFAULT_EPS, DEFAULT_LAMBDA, GateStats, gate_stats, loss_terms, token_mask
from .plan import routers
from .telemetry import Telemetry

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, dict[str, Tensor]], Tensor]
TASKS = ("auto", "causal_lm", "sequence_classification")


@dataclass
class TrainConfig:
    """Settings of `lte.train`. Defaults follow the paper where it gives one, else FACTS.md's runs."""

    stage1_steps: int = 200
    """Soft-mode steps (model + routers). FACTS.md: sparsity settles within ~50 steps."""
    stage2_steps: int = 200
    """Hard-mode fine-tuning steps (routers frozen, task loss only)."""
    eta: float = 1.0
    """Weight of L_eff. Sets the sparsity by hand when `target_sparsity` is None; with a target it
    only sets how strongly unhelpful experts are pushed off (the bias sets the level)."""
    lam: float = DEFAULT_LAMBDA
    """Weight of L_sep (paper: 0.5)."""
    sep_eps: float = DEFAULT_EPS
    """eps in L_sep = 1/((G - tau)^2 + eps): bounds it at 1/eps where G = tau (losses.py)."""
    target_sparsity: float | None = None
    """Overall hard-mode FFN sparsity (fraction of experts off) to reach on held-out data, in (0, 1);
    None: no controller, eta alone decides."""
    sparsity_tolerance: float = 0.02
    """Allowed |held-out sparsity - target| at the end."""
    controller_gain: float = 0.3
    """Fraction of the quantile correction applied per stage-1 step (controller.py)."""
    calibration_batches: int = 4
    """Training batches (not consumed) used to warm-start and calibrate the router bias."""
    model_lr: float = 2e-4
    """Model learning rate in stage 1 (FACTS.md's small-LM runs)."""
    stage2_lr: float = 1e-4
    """Model learning rate in stage 2."""
    model_weight_decay: float = 0.0
    """Model weight decay (0: fine-tuning a pretrained model for a few hundred steps)."""
    router_lr: float = 1e-2
    """Router learning rate (paper: 1e-2)."""
    router_weight_decay: float = 0.1
    """Router weight decay (paper: 0.1)."""
    warmup_steps: int = 10
    """Linear warmup per stage, then cosine decay to 10 % of the lr."""
    grad_clip: float = 1.0
    """Max global grad norm (0 = off)."""
    batch_size: int = 8
    """Sequences per batch per rank when `data` is a token tensor."""
    seq_len: int = 256
    """Tokens per sequence when `data` is a token tensor."""
    eval_batches: int = 8
    """Held-out batches for the final sparsity and loss (and stage ends)."""
    heldout_fraction: float = 0.05
    """Share of a token tensor held out when no `eval_data` is given."""
    task: str = "auto"
    """'causal_lm', 'sequence_classification', or 'auto' (labels shaped like input_ids -> LM)."""
    log_every: int = 1
    """Steps between telemetry records (every step by default; they are cheap)."""
    out_dir: str | None = None
    """Where log.jsonl, plots and checkpoints go; None writes nothing."""
    checkpoint_every: int = 0
    """Steps between checkpoints (0 = none); needs `out_dir`."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (older ones are deleted; 0 keeps all)."""
    resume: bool = True
    """Continue from the latest checkpoint in `out_dir/checkpoints` if there is one."""
    seed: int = 0
    """Seeds torch/numpy/python RNGs at a fresh start and the order of token batches."""
    progress: bool = True
    """tqdm bars with live loss and sparsity (rank 0)."""
    plots: bool = True
    """Write sparsity.png and losses.png into `out_dir` at the end."""
    distributed: str = "auto"
    """'auto' or 'ddp' (DDP when torch.distributed has > 1 rank), 'fsdp' (FSDP2 `fully_shard` per
    transformer block and the root; needs `lte.Config(kernel_layout=False)` as FSDP2 shards only
    contiguous parameters, and no checkpoints yet), 'none'."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form metadata, saved with every checkpoint's config."""

    def __post_init__(self) -> None:
        for name in ("stage1_steps", "stage2_steps", "checkpoint_every", "warmup_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(name, getattr(self, name), "an integer >= 0")
        for name in ("batch_size", "eval_batches", "log_every", "calibration_batches"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(name, getattr(self, name), "an integer >= 1")
        if self.seq_len < 2:
            raise ConfigError("seq_len", self.seq_len, "an integer >= 2")
        if self.target_sparsity is not None and not (0.0 < self.target_sparsity < 1.0):
            raise ConfigError("target_sparsity", self.target_sparsity, "None or a float in (0, 1) (fraction of experts off)",
                              "0.5 switches off half of the FFN experts")
        for name in ("eta", "lam", "model_lr", "stage2_lr", "router_lr", "router_weight_decay",
                     "model_weight_decay", "grad_clip"):
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) >= 0):
                raise ConfigError(name, getattr(self, name), "a float >= 0")
        if self.sep_eps <= 0:
            raise ConfigError("sep_eps", self.sep_eps, "a float > 0", "L_sep diverges at G = tau without it")
        if not (0.0 < self.sparsity_tolerance < 0.5):
            raise ConfigError("sparsity_tolerance", self.sparsity_tolerance, "a float in (0, 0.5)")
        if not (0.0 < self.heldout_fraction < 0.5):
            raise ConfigError("heldout_fraction", self.heldout_fraction, "a float in (0, 0.5)")
        if self.task not in TASKS:
            raise ConfigError("task", self.task, f"one of {TASKS}")
        if self.distributed not in ("auto", "ddp", "fsdp", "none"):
            raise ConfigError("distributed", self.distributed, "'auto', 'ddp', 'fsdp' or 'none'")
        if self.distributed == "fsdp" and self.checkpoint_every:
            raise ConfigError("checkpoint_every", self.checkpoint_every, "0 with distributed='fsdp'",
                              "checkpoints of sharded models are not written yet; use 'ddp' to checkpoint")
        if self.checkpoint_every and self.out_dir is None:
            raise ConfigError("out_dir", None, "a directory when checkpoint_every > 0", "checkpoints need a place")
        if self.target_sparsity is not None and self.stage1_steps == 0:
            logger.warning("target_sparsity with stage1_steps=0: only the bias calibration steers sparsity")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    """What `train` measured on held-out data at the end (hard mode)."""

    sparsity: float
    sparsity_per_layer: dict[str, float]
    active_per_token: dict[str, float]
    eval_loss: float
    bias_shift: float
    target_sparsity: float | None
    history: list[dict[str, Any]]
    out_dir: str | None = None

    @property
    def eval_ppl(self) -> float:
        return math.exp(min(self.eval_loss, 50.0))


# ----------------------------------------------------------------------------- data
class _ListBatches:
    """Cycles through a list of dict batches; `position` is the checkpointed state."""

    def __init__(self, batches: list[dict[str, Tensor]], rank: int = 0, world_size: int = 1):
        self.batches = batches[rank::world_size] if world_size > 1 else batches
        if not self.batches:
            raise ConfigError("data", f"{len(batches)} batches", f">= {world_size} batches (one per rank)")
        self.position = 0

    def batch(self, index: int) -> dict[str, Tensor]:
        return self.batches[index % len(self.batches)]

    def __next__(self) -> dict[str, Tensor]:
        out = self.batch(self.position)
        self.position += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])


def make_batches(data: Any, cfg: TrainConfig, rank: int = 0, world_size: int = 1,
                 eval_data: Any = None) -> tuple[Any, list[dict[str, Tensor]]]:
    """(training batch source with `batch(i)`/`position`, held-out batches) from user data."""
    if isinstance(data, Tensor):
        if data.dim() != 1:
            raise ConfigError("data", tuple(data.shape), "a 1-D token tensor, a TokenBatches or a list of dict batches")
        if eval_data is None:
            n_hold = int(data.numel() * cfg.heldout_fraction)
            data, eval_data = data[: data.numel() - n_hold], data[data.numel() - n_hold:]
        data = TokenBatches(data, cfg.seq_len, cfg.batch_size, seed=cfg.seed)
    if isinstance(data, TokenBatches):
        train = TokenBatches(data.tokens, data.seq_len, data.batch_size, data.seed, rank, world_size)
        if eval_data is None:
            raise ConfigError("eval_data", None, "held-out data (a token tensor or batches) with a TokenBatches")
        return train, _eval_list(eval_data, data.seq_len, data.batch_size, cfg.eval_batches, rank, world_size)
    if isinstance(data, dict):
        raise ConfigError("data", "a dict", "a list of dict batches (wrap one batch in a list)")
    batches = list(data) if not isinstance(data, list) else data
    if not batches:
        raise ConfigError("data", "0 batches", "at least one batch")
    if eval_data is None:
        n_hold = max(1, int(len(batches) * 0.1)) if len(batches) > 1 else 0
        eval_data = batches[len(batches) - n_hold:] if n_hold else batches
        batches = batches[: len(batches) - n_hold]
    held = _eval_list(eval_data, cfg.seq_len, cfg.batch_size, cfg.eval_batches, rank, world_size)
    return _ListBatches(batches, rank, world_size), held


def _eval_list(eval_data: Any, seq_len: int, batch_size: int, limit: int, rank: int, world: int) -> list[dict[str, Tensor]]:
    if isinstance(eval_data, Tensor):
        try:
            eval_data = TokenBatches(eval_data, seq_len, batch_size)
        except ConfigError as e:
            raise ConfigError("eval_data", f"{eval_data.numel()} tokens", f">= {seq_len * batch_size} tokens "
                              "(one batch of seq_len x batch_size)", "give more held-out text") from e
    if isinstance(eval_data, TokenBatches):
        out = eval_data.eval_batches(limit * world)
    else:
        out = list(eval_data)[: limit * world]
    out = out[rank::world] if world > 1 and len(out) >= world else out
    if not out:
        raise ConfigError("eval_data", "0 batches", "at least one held-out batch")
    return out


def prepare_batch(batch: dict[str, Tensor], task: str, device: torch.device) -> dict[str, Tensor]:
    """Move to device; for causal LMs add labels (input_ids, padding -> -100) when missing."""
    if not isinstance(batch, dict) or "input_ids" not in batch and "inputs_embeds" not in batch:
        raise ConfigError("batch", type(batch).__name__, "a dict with 'input_ids' (and optionally "
                          "'attention_mask', 'labels')")
    b = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    kind = _task_of(b, task)
    if kind == "causal_lm":
        labels = b.get("labels", b["input_ids"]).clone()
        if "attention_mask" in b:
            labels = labels.masked_fill(b["attention_mask"] == 0, -100)
        b["labels"] = labels
    elif "labels" not in b:
        raise ConfigError("labels", None, "a 'labels' entry in every batch for sequence classification")
    return b


def _task_of(batch: dict[str, Tensor], task: str) -> str:
    if task != "auto":
        return task
    labels = batch.get("labels")
    if labels is None or ("input_ids" in batch and labels.shape == batch["input_ids"].shape):
        return "causal_lm"
    return "sequence_classification"


# ----------------------------------------------------------------------------- one step
def task_loss(model: nn.Module, batch: dict[str, Tensor], loss_fn: LossFn | None = None) -> Tensor:
    """The task loss of one forward: `loss_fn(model, batch)` or the model's own `.loss` (transformers)."""
    if loss_fn is not None:
        return loss_fn(model, batch)
    out = model(**batch)
    loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
    if loss is None:
        raise ConfigError("loss_fn", None, "a loss function (model, batch) -> Tensor for models without a .loss output")
    return loss


def _valid_gates(model: nn.Module, attention_mask: Tensor | None) -> dict[str, Tensor]:
    """Each router's last gates as [N valid tokens, E] (detached)."""
    out = {}
    for k, r in routers(model).items():
        g = r.last_gates
        if g is None:
            continue
        mask = token_mask(g, attention_mask)
        g = g.detach().reshape(-1, g.shape[-1])
        out[k] = g[mask.reshape(-1)] if mask is not None else g
    return out


# ----------------------------------------------------------------------------- distributed
def _dist() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _reduce_stats(stats: GateStats, world: int) -> GateStats:
    if world == 1:
        return stats
    import torch.distributed as dist

    t = stats.to_tensor()
    dist.all_reduce(t)
    return GateStats.from_tensor(list(stats.off), t)


def _reduce_mean(values: dict[str, float], world: int) -> dict[str, float]:
    if world == 1:
        return values
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t)}


def _fsdp_shard(model: nn.Module) -> None:
    """FSDP2: shard every block of the model's largest ModuleList (the transformer layers), then the root."""
    from torch.distributed.fsdp import fully_shard

    bad = [n for n, p in model.named_parameters() if not p.is_contiguous()]
    if bad:
        raise ConfigError("distributed", "fsdp", "contiguous parameters", f"{bad[0]} is not contiguous: prepare with "
                          "lte.Config(kernel_layout=False) to train with FSDP, then lte.apply_kernel_layout(model) for inference")
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    for block in max(lists, key=len, default=[]):
        fully_shard(block)
    fully_shard(model)


def _wrap(model: nn.Module, cfg: TrainConfig, world: int) -> nn.Module:
    if world == 1 or cfg.distributed in ("none", "fsdp"):  # FSDP shards in place once, before stage 1
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=None, broadcast_buffers=False)


# ----------------------------------------------------------------------------- driver
class _Run:
    """State of one `train` call: model, data, controller, telemetry; runs both stages."""

    def __init__(self, model: nn.Module, data: Any, cfg: TrainConfig, eval_data: Any, loss_fn: LossFn | None,
                 callback: Callable[[dict[str, Any]], None] | None):
        self.model, self.cfg, self.loss_fn, self.callback = model, cfg, loss_fn, callback
        self.rank, self.world = _dist()
        self.device = next(model.parameters()).device
        self.train_data, self.heldout = make_batches(data, cfg, self.rank, self.world, eval_data)
        self.routers = routers(model)
        self.tau = next(iter(self.routers.values())).tau
        self.controller = (SparsityController(cfg.target_sparsity, cfg.sparsity_tolerance, cfg.controller_gain)
                           if cfg.target_sparsity is not None else None)
        out = Path(cfg.out_dir) if cfg.out_dir else None
        self.ckpt_dir = out / "checkpoints" if out else None
        self.telemetry = Telemetry(out, enabled=self.rank == 0, progress=cfg.progress)

    # -- optimizers
    def _optimizer(self, stage: str) -> tuple[torch.optim.Optimizer, Any]:
        cfg = self.cfg
        router_ids = {id(p) for r in self.routers.values() for p in r.parameters()}
        model_params = [p for p in self.model.parameters() if id(p) not in router_ids and p.requires_grad]
        groups = [{"params": model_params, "weight_decay": cfg.model_weight_decay,
                   "lr": cfg.model_lr if stage == "stage1" else cfg.stage2_lr}]
        if stage == "stage1":
            groups.append({"params": [p for r in self.routers.values() for p in r.parameters()],
                           "weight_decay": cfg.router_weight_decay, "lr": cfg.router_lr})
        opt = torch.optim.AdamW(groups, betas=(0.9, 0.95))
        steps = cfg.stage1_steps if stage == "stage1" else cfg.stage2_steps
        warm = max(cfg.warmup_steps, 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
            0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / max(steps, 1))))))
        return opt, sched

    def _set_stage(self, stage: str) -> None:
        from .plan import set_mode

        set_mode(self.model, "soft" if stage == "stage1" else "hard")
        for r in self.routers.values():
            r.requires_grad_(stage == "stage1")
        self.model.train()

    # -- measuring
    def collect(self, batches: list[dict[str, Tensor]]) -> tuple[list[Tensor], GateStats, float]:
        """Forward `batches` in the current mode: (valid gates per layer, reduced stats, mean task loss)."""
        gates, stats, loss = forward_batches(self.model, batches, self.cfg.task, self.loss_fn)
        return list(gates.values()), _reduce_stats(stats, self.world), _reduce_mean({"loss": loss}, self.world)["loss"]

    def calibrate(self, batches: list[dict[str, Tensor]], what: str) -> float:
        def collect():
            gates, stats, _ = self.collect(batches)
            return gates, stats.overall()

        measured = self.controller.calibrate(self.routers, collect, self.tau)
        logger.info("%s: sparsity %.4f (target %.3f), bias shift %+.3f", what, measured, self.controller.target,
                    self.controller.shift)
        self.telemetry.log({"kind": "calibration", "what": what, "sparsity": measured,
                            "target": self.controller.target, "bias_shift": self.controller.shift})
        return measured

    def _calibration_batches(self) -> list[dict[str, Tensor]]:
        return [self.train_data.batch(i) for i in range(self.cfg.calibration_batches)]

    # -- steps
    def step(self, wrapped: nn.Module, stage: str, opt, sched) -> dict[str, Any]:
        cfg = self.cfg
        batch = prepare_batch(next(self.train_data), cfg.task, self.device)
        loss = task_loss(wrapped, batch, self.loss_fn)
        mask = batch.get("attention_mask")
        if stage == "stage1":
            terms = loss_terms(self.model, loss, eta=cfg.eta, lam=cfg.lam, eps=cfg.sep_eps, attention_mask=mask)
            total, rec = terms.total, terms.as_floats()
        else:
            total, rec = loss, {"loss": float(loss.detach()), "task": float(loss.detach())}
        total.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], cfg.grad_clip)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        gates = {k: r.last_gates for k, r in self.routers.items() if r.last_gates is not None}
        stats = _reduce_stats(gate_stats(gates, self.tau, mask), self.world)
        if stage == "stage1" and self.controller is not None:
            self.controller.step(self.routers, list(_valid_gates(self.model, mask).values()), self.tau)
        rec = _reduce_mean({k: v for k, v in rec.items() if k not in ("eta", "lam")}, self.world) | {
            "eta": cfg.eta, "lam": cfg.lam if stage == "stage1" else 0.0}
        return {**rec, "sparsity": stats.overall(), "sparsity_per_layer": stats.sparsity(),
                "active_per_token": stats.active_per_token(), "lr": sched.get_last_lr()[0],
                "bias_shift": self.controller.shift if self.controller else 0.0,
                "target": self.controller.target if self.controller else None}

    def run_stage(self, stage: str, start: int, opt, sched) -> None:
        cfg = self.cfg
        steps = cfg.stage1_steps if stage == "stage1" else cfg.stage2_steps
        wrapped = _wrap(self.model, cfg, self.world)
        self.telemetry.bar(steps, start, f"LTE {stage} ({'soft' if stage == 'stage1' else 'hard'})")
        for step in range(start + 1, steps + 1):
            rec = {"kind": "step", "stage": stage, "step": step, **self.step(wrapped, stage, opt, sched)}
            if step % cfg.log_every == 0 or step == steps:
                self.telemetry.log(rec)
            if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == steps):
                self.save(stage, step, opt, sched)
            if self.callback is not None:
                self.callback(rec)
        self.telemetry.close_bar()

    def save(self, stage: str, step: int, opt, sched) -> None:
        meta = {"data": self.train_data.state_dict(), "config": self.cfg.to_dict(),
                "controller": self.controller.state_dict() if self.controller else None}
        save_checkpoint(self.ckpt_dir, stage=stage, step=step, model=self.model, optimizer=opt, scheduler=sched,
                        meta=meta, rank=self.rank, world_size=self.world, keep=self.cfg.keep_checkpoints)

    def resume_point(self) -> tuple[str, int, Path | None]:
        ckpt = latest_checkpoint(self.ckpt_dir) if (self.cfg.resume and self.ckpt_dir) else None
        if ckpt is None:
            return "stage1", 0, None
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
        if self.cfg.distributed == "fsdp" and self.world > 1:
            _fsdp_shard(self.model)
        if stage == "stage1":
            self._set_stage("stage1")
            opt, sched = self._optimizer("stage1")
            if ckpt is not None:
                self.restore(ckpt, opt, sched)
            elif self.controller is not None:
                self.calibrate(self._calibration_batches(), "warm start (soft)")
            self.run_stage("stage1", step, opt, sched)
            self._set_stage("stage2")
            if self.controller is not None:
                self.calibrate(self._calibration_batches(), "end of stage 1 (hard)")
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
            logger.warning("held-out sparsity %.4f is off target %.3f by more than %.3f: recalibrating the bias",
                           stats.overall(), self.controller.target, self.cfg.sparsity_tolerance)
            self.calibrate(self.heldout, "held-out recalibration (hard)")
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


def train(model: nn.Module, data: Any, config: TrainConfig | None = None, *, eval_data: Any = None,
          loss_fn: LossFn | None = None, callback: Callable[[dict[str, Any]], None] | None = None,
          **overrides: Any) -> TrainResult:
    """Run LTE stage 1 (soft) then stage 2 (hard) on a prepared model, in place.

    data: a 1-D token tensor (windows of `seq_len`; the last `heldout_fraction` held out), a
      `TokenBatches`, or a list/iterable of dict batches (`input_ids`, `attention_mask`, `labels`:
      [b, s] for causal LMs, [b] for sequence classification).
    eval_data: held-out data of the same kinds, for the final sparsity and loss.
    loss_fn: (model, batch) -> task loss, for models without a transformers `.loss`.
    callback: called with every step record (after its checkpoint, if one is due).
    overrides: TrainConfig fields, e.g. `train(model, ids, target_sparsity=0.5)`.
    Returns a TrainResult (held-out sparsity per layer, active experts per token, eval loss).
    """
    from .plan import is_prepared

    if not is_prepared(model):
        raise NotPreparedError(f"{type(model).__name__} is not prepared: call lte.prepare(model, lte.Config()) "
                               "before lte.train")
    cfg = config or TrainConfig()
    if overrides:
        unknown = set(overrides) - set(TrainConfig.__dataclass_fields__)
        if unknown:
            raise ConfigError("train() keyword", sorted(unknown), "TrainConfig field names")
        cfg = TrainConfig(**{**cfg.to_dict(), **overrides})
    return _Run(model, data, cfg, eval_data, loss_fn, callback).run()


@torch.no_grad()
def forward_batches(model: nn.Module, batches: list[dict[str, Tensor]], task: str = "auto",
                    loss_fn: LossFn | None = None) -> tuple[dict[str, Tensor], GateStats | None, float]:
    """Forward `batches` in eval mode, in the model's current LTE mode (this rank only).

    Returns (valid gates per layer [N, E], summed gate statistics or None in dense mode, mean task loss).
    """
    rs = routers(model)
    tau = next(iter(rs.values())).tau if rs else 0.5
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    gates: dict[str, list[Tensor]] = {}
    stats, loss_sum = None, 0.0
    try:
        for raw in batches:
            b = prepare_batch(raw, task, device)
            loss_sum += float(task_loss(model, b, loss_fn))
            mask = b.get("attention_mask")
            last = {k: r.last_gates for k, r in rs.items() if r.last_gates is not None}
            if last:
                for k, g in _valid_gates(model, mask).items():
                    gates.setdefault(k, []).append(g)
                s = gate_stats(last, tau, mask)
                stats = s if stats is None else stats.merge(s)
    finally:
        model.train(was)
    return {k: torch.cat(v) for k, v in gates.items()}, stats, loss_sum / max(len(batches), 1)


@torch.no_grad()
def evaluate(model: nn.Module, data: Any, *, mode: str = "hard", task: str = "auto", max_batches: int = 8,
             seq_len: int = 256, batch_size: int = 8, loss_fn: LossFn | None = None) -> dict[str, Any]:
    """Held-out task loss, perplexity and (for LTE modes) sparsity of a prepared model in `mode`."""
    from .plan import get_mode, routers, set_mode

    rs = routers(model)
    if not rs and mode != "dense":
        raise NotPreparedError(f"{type(model).__name__} is not prepared: mode {mode!r} needs lte.prepare first")
    batches = _eval_list(data, seq_len, batch_size, max_batches, 0, 1) if isinstance(data, (Tensor, TokenBatches)) \
        else list(data)[:max_batches]
    old = get_mode(model) if rs else None
    if rs:
        set_mode(model, mode)
    try:
        _, stats, loss = forward_batches(model, batches, task, loss_fn)
    finally:
        if rs and old in ("dense", "soft", "hard"):
            set_mode(model, old)
    out: dict[str, Any] = {"mode": mode, "loss": loss, "ppl": math.exp(min(loss, 50.0))}
    if stats is not None:
        out |= {"sparsity": stats.overall(), "sparsity_per_layer": stats.sparsity(),
                "active_per_token": stats.active_per_token()}
    return out
