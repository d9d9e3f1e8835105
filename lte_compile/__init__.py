"""lte_compile: LTE ("Learn To be Efficient") structured activation sparsity as a compiler.

    import lte_compile as lte
    model = lte.prepare(model, lte.Config())     # find FFNs, cluster neurons, attach routers
    lte.set_mode(model, "hard")                  # 'dense' | 'soft' (stage 1) | 'hard' (stage 2)
    lte.save(model, "out/"); lte.load(fresh_model, "out/")
    lte.train(model, token_ids, lte.TrainConfig(target_sparsity=0.5))   # stage 1 + stage 2
    ep = lte.export(model, example_inputs=(ids,))  # torch.export; lte.package: AOTInductor .pt2
    fast = torch.compile(model, backend="lte")   # router + gathered sparse FFN kernels

The pipeline's stages are sub-packages: `passes` (trace, match, rewrite, cost), `plan` (prepare,
routers, save/load), `kernels` (the lte ops and their kernels), `training` (the two-stage driver);
`small_lm` is the project's own Shakespeare LM (imported only on demand). Importing registers the
`lte::` custom ops and nothing else (no prints, no global settings); the training names load on
first use, so `torch.compile(backend="lte")` never imports the training stack.
"""
from .config import Config
from .errors import ConfigError, LTEError, NotPreparedError, StateMismatchError, UnsupportedFFNError
from .plan import apply_kernel_layout, gates, get_mode, is_prepared, load, prepare, routers, save, set_mode

__version__ = "0.1.0"

# name -> module that defines it, imported on first access (PEP 562)
_LAZY = {"train": "training", "evaluate": "training", "fit_routers": "training", "TrainConfig": "training", "TrainResult": "training",
         "LTETrainer": "training.trainer", "LTETrainerCallback": "training.trainer",
         "export": "deploy", "package": "deploy"}

__all__ = ["Config", "prepare", "set_mode", "get_mode", "routers", "gates", "is_prepared", "save", "load",
           "apply_kernel_layout", "LTEError", "ConfigError", "UnsupportedFFNError", "StateMismatchError",
           "NotPreparedError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'lte_compile' has no attribute {name!r}")
