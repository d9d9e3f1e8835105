"""plan stage of trace -> match -> plan -> rewrite -> lower: what `lte.prepare` decides and stores.

- `prepare.py`: the verbs (`prepare`, `set_mode`, `routers`, `gates`, `apply_kernel_layout`) and
  the checks that run before any change to the model;
- `spec.py`: `FFNSpec`, one prepared FFN's weights by path;
- `cluster.py`: balanced k-means of the neurons into experts;
- `layout.py`: the expert permutation and the kernels' weight layout;
- `router.py`: `LTERouter` and the two forward hooks that make an FFN an LTE FFN;
- `state.py`: `save` / `load` (safetensors + JSON).
"""
from .prepare import (ROUTER_ATTR, apply_kernel_layout, config_of, gates, get_mode, is_prepared, prepare, routers,
                      set_mode)
from .router import LTERouter
from .spec import FFNSpec
from .state import load, save

__all__ = ["prepare", "config_of", "set_mode", "get_mode", "routers", "gates", "is_prepared", "apply_kernel_layout",
           "LTERouter", "FFNSpec", "save", "load", "ROUTER_ATTR"]
