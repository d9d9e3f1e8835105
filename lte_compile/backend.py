"""The `lte` torch.compile backend: trace -> match -> rewrite -> lower (Inductor).

    torch.compile(model, backend="lte", options={"lte.inner": "inductor", ...})

Dynamo hands us one graph per compiled region (and per recompile: the pass is idempotent).
`find_ffns` locates the FFNs; those prepared by `lte.prepare` (an `lte.apply_gates` marker in the
graph) become one `lte::sparse_ffn` call each; the graph then goes to Inductor's `compile_fx`,
which runs AOTAutograd itself, so training through the compiled model uses the op's autograd.
A graph traced with grad disabled (`torch.no_grad()` / `inference_mode()`: Dynamo guards on the grad
mode, so enabling it recompiles) calls the ops without autograd layers instead, and in hard mode
with the router fused in (`lte::routed_sparse_ffn_inference`: one C++ call per FFN at decode).
Rewriting before AOTAutograd (not in a post-grad hook) is what makes backward work and keeps the
rewritten graph in Inductor's cache key without uuid bookkeeping
(a post-grad pass would run after the backward graph exists, too late for `register_autograd`).

Options (`lte.*` keys; every other key goes to Inductor as a config patch):
- `lte.rewrite` (bool, True): False compiles exactly like Inductor (FFNs still reported).
- `lte.inner` ("inductor" | "aot_eager" | "eager", "inductor"): what lowers the rewritten graph;
  "aot_eager"/"eager" skip Inductor codegen (debugging, fast tests).
- `lte.dump_graph` (bool, False): log the graph before and after the rewrite at INFO level.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from .errors import ConfigError
from .kernels import ops as _ops  # noqa: F401  (registers torch.ops.lte.*)
from .passes.rewrite import rewrite_ffns

logger = logging.getLogger(__name__)

INNER = ("inductor", "aot_eager", "eager")


@dataclass(frozen=True)
class BackendOptions:
    """The `lte.*` options of `torch.compile(..., backend="lte", options={...})`."""

    rewrite: bool = True
    """Rewrite prepared FFNs into `lte::sparse_ffn` (False: plain Inductor)."""
    inner: str = "inductor"
    """Compiler for the rewritten graph: 'inductor', 'aot_eager' or 'eager'."""
    dump_graph: bool = False
    """Log the graph before/after the rewrite (INFO)."""

    def __post_init__(self):
        if self.inner not in INNER:
            raise ConfigError("lte.inner", self.inner, f"one of {INNER}")

    @classmethod
    def split(cls, options: dict[str, Any] | None) -> tuple["BackendOptions", dict[str, Any]]:
        """(our options, Inductor config patches) from a torch.compile options dict."""
        ours, inductor = {}, {}
        known = {f.name for f in dataclasses.fields(cls)}
        for key, value in (options or {}).items():
            if key.startswith("lte."):
                name = key[4:]
                if name not in known:
                    raise ConfigError(key, value, f"a known option: {sorted('lte.' + k for k in known)}")
                ours[name] = value
            else:
                inductor[key] = value
        return cls(**ours), inductor


@dataclass
class CompileRecord:
    """One backend call: what was found and rewritten (tests and `lte inspect` read these)."""

    ffns_found: int
    prepared: int
    rewritten: list[str]
    skipped: list[str]
    near_misses: list[str]
    rewrite_seconds: float
    inner: str
    inference: bool = False
    """The graph was traced with grad disabled: its FFNs call the ops without autograd."""
    fused_routers: list[str] = dataclasses.field(default_factory=list)
    """FFNs whose router runs inside the op (`lte::routed_sparse_ffn_inference`)."""


history: deque[CompileRecord] = deque(maxlen=64)
"""The latest backend calls, newest last."""


def lte_backend(gm: fx.GraphModule, example_inputs: list, *, options: dict[str, Any] | None = None,
                mode: str | None = None):
    """torch.compile backend: rewrite prepared FFNs into lte ops, then lower with Inductor."""
    opts, patches = BackendOptions.split(options)
    if opts.dump_graph:
        logger.info("lte backend: graph before rewrite:\n%s", gm.graph)
    from .passes import find_ffns

    start = time.perf_counter()
    report = find_ffns(gm, example_inputs)
    prepared = [m for m in report.matches if m.prepared]
    rewritten, skipped, fused = [], [], []
    inference = not torch.is_grad_enabled()  # Dynamo guards on the grad mode it traced under
    if opts.rewrite and prepared:
        res = rewrite_ffns(gm, report, inference=inference)
        rewritten, skipped, fused = res.rewritten, res.skipped, res.fused_routers
    record = CompileRecord(len(report.matches), len(prepared), rewritten, skipped,
                           [str(n) for n in report.near_misses], time.perf_counter() - start, opts.inner,
                           inference, fused)
    history.append(record)
    _log_summary(record)
    if opts.dump_graph:
        logger.info("lte backend: graph after rewrite:\n%s", gm.graph)
    return _lower(gm, example_inputs, opts.inner, patches, mode)


def _log_summary(r: CompileRecord) -> None:
    if r.ffns_found and not r.prepared:
        logger.info("lte backend: found %d FFN(s), none has a router (call lte.prepare to make them sparse); "
                    "compiling like Inductor", r.ffns_found)
    else:
        logger.info("lte backend: %d FFN(s) found, %d prepared, %d rewritten to lte::sparse_ffn, %d skipped",
                    r.ffns_found, r.prepared, len(r.rewritten), len(r.skipped))


def _lower(gm: fx.GraphModule, example_inputs: list, inner: str, patches: dict, mode: str | None):
    if inner == "eager":
        return gm.forward
    if inner == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend
        return lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx
    config = {**(list_mode_options(mode) if mode else {}), **patches}
    return compile_fx(gm, example_inputs, config_patches=config or None)
