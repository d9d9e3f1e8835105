"""LTE training: the two-stage driver and what it is built from.

- `driver.py`: `train` (stage 1 soft, stage 2 hard, target-sparsity control, checkpoints);
- `fit.py`: `fit_routers`, the training-free mode (routers fitted on the frozen model's activations);
- `baselines.py`: `select_experts`, other selection rules on the same routers (Deja Vu, oracles, random);
- `compare.py`: `lte compare`, every method at equal budget: sparsity, perplexity, FLOPs, decode speed;
- `config.py`: `TrainConfig`, `TrainResult`;   `evaluate.py`: `evaluate`, held-out statistics;
- `batches.py`: token windows and dict batches;   `losses.py`: L_eff, L_sep, gate statistics;
- `controller.py`: the router-bias controller;   `optim.py`: optimizer groups (routers apart);
- `distributed.py`: DDP / FSDP2;   `checkpoint.py`, `telemetry.py`: resumable runs, logs, plots;
- `trainer.py`: `LTETrainer` for transformers' `Trainer` (imported on demand: it imports accelerate).
"""
from .baselines import SelectionReport, select_experts
from .batches import TokenBatches
from .config import TrainConfig, TrainResult
from .controller import SparsityController
from .driver import NonFiniteLossError, train
from .evaluate import evaluate
from .fit import FitReport, fit_routers
from .losses import GateStats, LossTerms, gate_stats, kd_loss, loss_terms
from .optim import adamw_groups

__all__ = ["train", "NonFiniteLossError", "evaluate", "TrainConfig", "TrainResult", "TokenBatches", "SparsityController",
           "GateStats", "LossTerms", "gate_stats", "loss_terms", "kd_loss", "adamw_groups", "fit_routers", "FitReport",
           "select_experts", "SelectionReport"]
