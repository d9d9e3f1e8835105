"""One forward on the example input with temporary hooks: how prepare checks what the trace cannot see
(a functional FFN's traced forward against its real one; whether hooked projection modules are called)."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def run_example(model: nn.Module, args: tuple, kwargs: dict, handles: Iterable[RemovableHandle]) -> None:
    """`model(*args, **kwargs)` once in eval mode without grad, then remove `handles` (the hooks that
    observed it) and restore the training flag, whatever happens."""
    handles = list(handles)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
