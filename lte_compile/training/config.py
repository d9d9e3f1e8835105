"""`TrainConfig` (the settings of `lte.train`) and `TrainResult` (what it measured)."""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from torch import Tensor, nn

from ..config import check_bool, check_choice, check_float, check_int, check_path
from ..errors import ConfigError
from .losses import DEFAULT_EPS, DEFAULT_LAMBDA

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, dict[str, Tensor]], Tensor]
TASKS = ("auto", "causal_lm", "sequence_classification")
KD_STAGES = ("stage1", "stage2", "both")
ROUTER_INITS = ("fit", "keep")
ROUTER_LR = {"fit": 1e-3, "keep": 1e-2}
"""Stage-1 router learning rate by where the routers start (TrainConfig.router_lr)."""


@dataclass
class TrainConfig:
    """Settings of `lte.train`. Defaults follow the paper where it gives one, else the small-LM runs (README, lte_compile/small_lm)."""

    stage1_steps: int = 200
    """Soft-mode steps (model + routers). Measured on the small LMs: sparsity settles within ~50 steps."""
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
    router_init: str = "fit"
    """How stage 1 starts its routers: 'fit' fits them first to the dense model's expert labels on
    `router_fit_batches` training batches (the training-free recipe of `lte.fit_routers`, ~40 s on
    the shipped LM), 'keep' takes them as they are (prepare's initialisation, or routers you fitted
    or trained yourself). Measured on the shipped Llama at 80 + 40 steps: 'fit' ends stage 1 at
    held-out ppl 79.6 / 85.2 at s = 0.5 / 0.8 where 'keep' ends at 82.1 / 97.4 (README). `lte.train`
    only: with `LTETrainer`, call `lte.fit_routers` before `trainer.train()` for the same start."""
    router_fit_batches: int = 8
    """Training batches (not consumed) the router fit reads when `router_init='fit'`."""
    router_fit_steps: int = 300
    """Full-batch Adam steps of that fit."""
    calibration_batches: int = 4
    """Training batches (not consumed) that warm-start the router bias before stage 1 (the hard-mode
    calibration at the end of stage 1 uses the held-out batches, where the target is defined)."""
    model_lr: float = 2e-4
    """Model learning rate in stage 1 (the small-LM runs)."""
    stage2_lr: float = 1e-4
    """Model learning rate in stage 2."""
    model_weight_decay: float = 0.0
    """Model weight decay (0: fine-tuning a pretrained model for a few hundred steps)."""
    router_lr: float | None = None
    """Router learning rate in stage 1; None: `ROUTER_LR[router_init]` (`stage1_router_lr`).
    From fitted routers ('fit') 1e-3: the paper's 1e-2 undoes the fit (shipped Llama, 80 + 40
    steps, held-out ppl at s = 0.5 / 0.8: 80.3 / 83.8 at 1e-2, 79.3 / 83.3 at 3e-3, 78.9 / 82.6 at
    1e-3, 78.1 / 84.8 with frozen routers; `benchmarks/quality/stage_diagnosis.py`). From routers
    as they are ('keep', and `LTETrainer`) the paper's 1e-2."""
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
    heldout_every: int = 25
    """Stage-2 steps between held-out sparsity records in the telemetry (on 2 held-out batches;
    0 = none): a drift of the hard-mode sparsity under frozen routers shows there."""
    recalibrate_final: bool = False
    """Shift the router bias once more after stage 2 if held-out sparsity is off target by more than
    the tolerance. Off by default: the shifted masks are ones stage 2 never adapted the model to
    (a warning says how far off the target is instead)."""
    kd_weight: float = 0.0
    """Weight of logit distillation (losses.kd_loss) from a frozen dense teacher (default: a copy of
    the model taken when `train` starts, in dense mode; `train(..., teacher=)` overrides); 0 = off.
    Needs a model whose output has `.logits` (not with `loss_fn`)."""
    kd_temperature: float = 1.0
    """Softmax temperature of the distillation (> 0)."""
    kd_stages: str = "both"
    """Where distillation applies: 'stage1', 'stage2' or 'both'."""
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
        """Types first (bool is not an int; "0.5" is not a float; NaN/inf are refused), then ranges."""
        for name in ("stage1_steps", "stage2_steps", "checkpoint_every", "warmup_steps", "keep_checkpoints",
                     "heldout_every"):
            check_int(name, getattr(self, name), 0)
        for name in ("batch_size", "eval_batches", "log_every", "calibration_batches", "router_fit_batches",
                     "router_fit_steps"):
            check_int(name, getattr(self, name), 1)
        check_int("seq_len", self.seq_len, 2)
        check_int("seed", self.seed)
        self.target_sparsity = check_float(
            "target_sparsity", self.target_sparsity, low=0.0, high=1.0, low_open=True, high_open=True, optional=True,
            allowed="None or a float in (0, 1) (fraction of experts off)", hint="0.5 switches off half of the FFN experts")
        for name in ("eta", "lam", "model_lr", "stage2_lr", "router_weight_decay", "model_weight_decay",
                     "grad_clip", "kd_weight"):
            setattr(self, name, check_float(name, getattr(self, name), low=0.0, allowed="a finite float >= 0"))
        self.router_lr = check_float("router_lr", self.router_lr, low=0.0, optional=True,
                                     allowed="None or a finite float >= 0")
        self.sep_eps = check_float("sep_eps", self.sep_eps, low=0.0, low_open=True, allowed="a float > 0",
                                   hint="L_sep diverges at G = tau without it")
        self.sparsity_tolerance = check_float("sparsity_tolerance", self.sparsity_tolerance, low=0.0, high=0.5,
                                              low_open=True, high_open=True, allowed="a float in (0, 0.5)")
        self.controller_gain = check_float("controller_gain", self.controller_gain, low=0.0, high=1.0, low_open=True,
                                           allowed="a float in (0, 1]")
        self.heldout_fraction = check_float("heldout_fraction", self.heldout_fraction, low=0.0, high=0.5,
                                            low_open=True, high_open=True, allowed="a float in (0, 0.5)")
        self.kd_temperature = check_float("kd_temperature", self.kd_temperature, low=0.0, low_open=True,
                                          allowed="a float > 0")
        check_choice("kd_stages", self.kd_stages, KD_STAGES)
        check_choice("router_init", self.router_init, ROUTER_INITS)
        check_choice("task", self.task, TASKS)
        check_choice("distributed", self.distributed, ("auto", "ddp", "fsdp", "none"),
                     "'auto', 'ddp', 'fsdp' or 'none'")
        for name in ("resume", "progress", "plots", "recalibrate_final"):
            check_bool(name, getattr(self, name))
        self.out_dir = check_path("out_dir", self.out_dir)
        if not isinstance(self.extra, dict):
            raise ConfigError("extra", self.extra, "a dict")
        if self.distributed == "fsdp" and self.checkpoint_every:
            raise ConfigError("checkpoint_every", self.checkpoint_every, "0 with distributed='fsdp'",
                              "checkpoints of sharded models are not written yet; use 'ddp' to checkpoint")
        if self.checkpoint_every and self.out_dir is None:
            raise ConfigError("out_dir", None, "a directory when checkpoint_every > 0", "checkpoints need a place")
        if self.target_sparsity is not None and self.stage1_steps == 0:
            logger.info("stage1_steps=0: stage 2 only; the routers' bias is calibrated to target_sparsity on "
                        "held-out data, then the routers are frozen")

    def stage1_router_lr(self, fitted: bool | None = None) -> float:
        """`router_lr`, or its default for routers that were fitted (`fitted`; None: `router_init`)."""
        if self.router_lr is not None:
            return self.router_lr
        return ROUTER_LR["fit" if (self.router_init == "fit" if fitted is None else fitted) else "keep"]

    def kd_in(self, stage: str) -> bool:
        """Whether distillation is on in `stage` ('stage1' or 'stage2')."""
        return self.kd_weight > 0 and self.kd_stages in (stage, "both")

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
