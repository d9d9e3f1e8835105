"""Get graphs to match on: Dynamo graphs (what the `lte` backend sees) and torch.export graphs.

`capture_graphs` is how `lte.prepare` and `lte inspect` see a model the way the backend will:
it runs the model once through `torch.compile` with a recording backend. HF models do not
`symbolic_trace` in transformers v5; Dynamo and export do (`transformers.utils.fx` is gone; symbolic_trace fails on HF decoder layers).
"""
from __future__ import annotations

import logging
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn
from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list, reset_code

logger = logging.getLogger(__name__)


class _Recorder:
    """A Dynamo backend that keeps each graph with its example inputs and runs it unchanged."""

    def __init__(self) -> None:
        self.graphs: list[tuple[fx.GraphModule, list]] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: list) -> Any:
        self.graphs.append((gm, list(example_inputs)))
        return gm.forward


def capture_graphs(model: nn.Module, *args: Any, **kwargs: Any) -> list[tuple[fx.GraphModule, list]]:
    """Run `model(*args, **kwargs)` once under Dynamo (no_grad) and return every graph it traced.

    Each entry is `(gm, example_inputs)`, exactly what a backend receives: placeholders carry
    their Dynamo source and `example_inputs[i]` is the real tensor (Parameter) of placeholder i.
    Graph breaks give several graphs. The user's model is not changed; the Dynamo cache entries
    this run created are dropped afterwards so a later `torch.compile(model, backend="lte")`
    starts clean. (After a graph break Dynamo also compiles frames of the model's own code; those
    entries are dropped when no other backend shares the code object, else left to their guards.)
    """
    model = getattr(model, "_orig_mod", model)  # an OptimizedModule: trace what it wraps
    recorder = _Recorder()
    entry = _fresh_entry()
    try:
        with torch.no_grad():
            torch.compile(entry, backend=recorder, fullgraph=False, dynamic=False)(model, args, kwargs)
    finally:
        reset_code(entry.__code__)
        _drop_cache_entries(recorder)
    logger.debug("capture_graphs: %d graph(s) from %s", len(recorder.graphs), type(model).__name__)
    return recorder.graphs


def _call(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    return model(*args, **kwargs)


def _fresh_entry() -> Callable:
    """`_call` with a code object of its own: Dynamo keys its cache on code objects, and
    `nn.Module.__call__`'s (what `torch.compile(model)` enters) is shared by every compiled module.
    A private code object keeps this capture's cache entries apart and easy to drop."""
    return types.FunctionType(_call.__code__.replace(), _call.__globals__, "_lte_capture")


def _drop_cache_entries(recorder: _Recorder) -> None:
    """Reset the code objects whose every Dynamo cache entry was compiled by `recorder`.

    `torch._dynamo.reset()` would also throw away the user's other compiled models; entries are
    per code object, so only codes compiled by us alone can be reset without side effects.
    """
    from torch._dynamo import convert_frame

    for ref in [*convert_frame.input_codes.seen, *convert_frame.output_codes.seen]:
        code = ref()
        entries = _debug_get_cache_entry_list(code) if code is not None else []
        if entries and all(getattr(e.backend, "compiler_fn", e.backend) is recorder for e in entries):
            reset_code(code)


def export_graph(model: nn.Module, args: tuple = (), kwargs: dict[str, Any] | None = None,
                 *, strict: bool = False) -> torch.export.ExportedProgram:
    """`torch.export.export` the model (training IR: `aten.linear` stays, dropout stays).

    HF causal LMs need `use_cache=False` in `kwargs` (a cache object is not an exportable output).
    Pass the result straight to `find_ffns`: its graph signature names the parameters.
    """
    model = getattr(model, "_orig_mod", model)
    with torch.no_grad():
        return torch.export.export(model, tuple(args), kwargs or {}, strict=strict)
