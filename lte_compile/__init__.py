"""lte_compile: LTE ("Learn To be Efficient") structured activation sparsity as a compiler.

    import lte_compile as lte
    model = lte.prepare(model, lte.Config())     # find FFNs, cluster neurons, attach routers
    lte.set_mode(model, "hard")                  # 'dense' | 'soft' (stage 1) | 'hard' (stage 2)
    lte.save(model, "out/"); lte.load(fresh_model, "out/")
    lte.train(model, token_ids, lte.TrainConfig(target_sparsity=0.5))   # stage 1 + stage 2
    fast = torch.compile(model, backend="lte")   # router + gathered sparse FFN kernels

Importing registers the `lte::` custom ops and nothing else (no prints, no global settings).
"""
from .config import Config
from .controller import SparsityController
from .data import TokenBatches
from .errors import ConfigError, LTEError, NotPreparedError, StateMismatchError, UnsupportedFFNError
from .lm import load_small_lm
from .losses import GateStats, LossTerms, gate_stats, loss_terms
from .plan import apply_kernel_layout, gates, get_mode, is_prepared, prepare, routers, set_mode
from .router import LTERouter
from .state import load, save
from .train import TrainConfig, TrainResult, evaluate, train

__version__ = "0.1.0"

__all__ = [
    "Config", "prepare", "set_mode", "get_mode", "routers", "gates", "is_prepared", "save", "load",
    "apply_kernel_layout",
    "LTERouter", "LTEError", "ConfigError", "UnsupportedFFNError", "StateMismatchError", "NotPreparedError",
    "train", "TrainConfig", "TrainResult", "evaluate", "loss_terms", "LossTerms", "gate_stats", "GateStats",
    "SparsityController", "TokenBatches", "load_small_lm", "LTETrainer", "LTETrainerCallback",
]


def __getattr__(name: str):
    # The Trainer integration imports transformers.Trainer and accelerate: only on first use.
    if name in ("LTETrainer", "LTETrainerCallback"):
        from . import trainer
        return getattr(trainer, name)
    raise AttributeError(f"module 'lte_compile' has no attribute {name!r}")
