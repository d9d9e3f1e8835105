"""lte_compile: LTE ("Learn To be Efficient") structured activation sparsity as a compiler.

    import lte_compile as lte
    model = lte.prepare(model, lte.Config())     # find FFNs, cluster neurons, attach routers
    lte.set_mode(model, "hard")                  # 'dense' | 'soft' (stage 1) | 'hard' (stage 2)
    lte.save(model, "out/"); lte.load(fresh_model, "out/")
    fast = torch.compile(model, backend="lte")   # router + gathered sparse FFN kernels

Importing registers the `lte::` custom ops and nothing else (no prints, no global settings).
"""
from .config import Config
from .errors import ConfigError, LTEError, NotPreparedError, StateMismatchError, UnsupportedFFNError
from .plan import gates, get_mode, is_prepared, prepare, routers, set_mode
from .router import LTERouter
from .state import load, save

__version__ = "0.1.0"

__all__ = [
    "Config", "prepare", "set_mode", "get_mode", "routers", "gates", "is_prepared", "save", "load",
    "LTERouter", "LTEError", "ConfigError", "UnsupportedFFNError", "StateMismatchError", "NotPreparedError",
]
