"""`lte.prepare`: find a model's FFNs, group their neurons into experts, attach routers.

plan stage of trace -> match -> plan -> rewrite -> lower. Everything prepare creates lives on the
model as ordinary parameters/buffers (routers exist before compile: Dynamo cannot add parameters
inside a backend). Validation of every FFN happens before the first change, so a failing prepare
leaves the model as it was.
"""
from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .cluster import balanced_kmeans, expert_permutation
from .config import MODES, Config
from .errors import ConfigError, NotPreparedError, UnsupportedFFNError
from .passes.ffn import FFNMatch, FFNReport
from .router import FFNSpec, GateHook, LTERouter, RouteHook

logger = logging.getLogger(__name__)

ROUTER_ATTR = "lte_router"
FilterFn = Callable[[nn.Module, str], bool]


# ----------------------------------------------------------------------------- public verbs
def prepare(model: nn.Module, config: Config | None = None, *, example_inputs: Any = None,
            filter_fn: FilterFn | None = None) -> nn.Module:
    """Make `model`'s FFNs LTE FFNs, in place; returns the model.

    Finds the FFNs by tracing one forward (`example_inputs`: a tuple of args or a dict of kwargs;
    transformers models get a dummy batch when None), clusters each FFN's neurons into
    E = d_ff / expert_size experts (balanced k-means), permutes the neurons so experts are
    contiguous (outputs unchanged), and attaches one `LTERouter` per FFN. The model starts in
    `config.mode` ('dense' by default: the original function); switch with `set_mode`.
    `filter_fn(module, path)` picks which FFN owners to prepare (default: all).
    """
    config = config or Config()
    if is_prepared(model):
        raise UnsupportedFFNError(f"{type(model).__name__} is already prepared by lte.prepare; "
                                  "prepare a fresh model, or use lte.load to restore saved LTE state")
    report = _find(model, example_inputs)
    specs = plan_ffns(model, report, config, filter_fn)
    # From here on the model changes; every check has passed. The bar shows on terminals only.
    for spec in tqdm(specs, desc="lte.prepare: clustering experts", unit="ffn", disable=None, leave=False):
        perm = _cluster(model, spec, config)
        permute_ffn_(model, spec, perm)
        if config.kernel_layout:
            kernel_layout_(model, spec)
        attach_router(model, spec, config, permutation=perm)
    set_mode(model, config.mode)
    model.lte_config = config
    logger.info("lte.prepare: %d FFN(s) prepared, %d left dense", len(specs), len(report.matches) - len(specs))
    return model


def set_mode(model: nn.Module, mode: str) -> nn.Module:
    """Switch every LTE FFN of the model: 'dense' (original FFN), 'soft' (stage 1), 'hard' (stage 2)."""
    if mode not in MODES:
        raise ConfigError("mode", mode, f"one of {MODES}")
    for r in _require_routers(model).values():
        r.mode = mode
        if mode == "dense":
            r.last_gates = None
    return model


def get_mode(model: nn.Module) -> str:
    """The model's LTE mode (all routers share one mode)."""
    modes = {r.mode for r in _require_routers(model).values()}
    return modes.pop() if len(modes) == 1 else "mixed"


def routers(model: nn.Module) -> dict[str, LTERouter]:
    """The model's routers keyed by FFN owner path (e.g. 'model.layers.0.mlp'), in model order."""
    return {r.spec.name: r for r in model.modules() if isinstance(r, LTERouter)}


def gates(model: nn.Module) -> dict[str, Tensor]:
    """G = sigmoid(router(x)) of the latest forward per FFN ([..., E]); FFNs not yet run are absent."""
    return {k: r.last_gates for k, r in routers(model).items() if r.last_gates is not None}


def is_prepared(model: nn.Module) -> bool:
    return any(isinstance(m, LTERouter) for m in model.modules())


# ----------------------------------------------------------------------------- planning
def _find(model: nn.Module, example_inputs: Any) -> FFNReport:
    from .passes import find_ffns_in_model

    args, kwargs = example_args(model, example_inputs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return find_ffns_in_model(model, *args, **kwargs)
    finally:
        model.train(was_training)


def example_args(model: nn.Module, example_inputs: Any) -> tuple[tuple, dict]:
    """(args, kwargs) to trace `model` with: the user's, or a dummy batch for transformers models."""
    if example_inputs is None:
        cfg = getattr(model, "config", None)
        vocab = getattr(cfg, "vocab_size", None)
        if vocab is None:
            raise UnsupportedFFNError(
                f"{type(model).__name__}: cannot build an example input to trace it; "
                "pass example_inputs=(tensor, ...) or a dict of keyword arguments to lte.prepare")
        device = next(model.parameters()).device
        ids = torch.arange(8, device=device).remainder(vocab).unsqueeze(0)
        kwargs = {"input_ids": ids}
        if getattr(cfg, "is_encoder_decoder", False):
            kwargs["decoder_input_ids"] = ids
        return (), kwargs
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, Tensor):
        return (example_inputs,), {}
    return tuple(example_inputs), {}


def plan_ffns(model: nn.Module, report: FFNReport, config: Config,
              filter_fn: FilterFn | None) -> list[FFNSpec]:
    """Check every found FFN; return the specs to prepare. Raises before any change to the model."""
    if not report.matches:
        misses = "; ".join(str(m) for m in report.near_misses) or "none"
        raise UnsupportedFFNError(f"{type(model).__name__}: no FFN found (near misses: {misses}); "
                                  "lte.prepare needs at least one up-act-down projection chain")
    specs = []
    for match in report.matches:
        if filter_fn is not None and not filter_fn(_owner(model, match.module), match.module):
            continue
        try:
            specs.append(spec_from_match(model, match, config))
        except UnsupportedFFNError as e:
            if config.on_unsupported == "error":
                raise
            logger.warning("%s; left dense", e)
    if not specs:
        raise UnsupportedFFNError(f"{type(model).__name__}: {len(report.matches)} FFN(s) found but none can be "
                                  "prepared (see the warnings above, or filter_fn)")
    return specs


def spec_from_match(model: nn.Module, m: FFNMatch, config: Config) -> FFNSpec:
    """FFNSpec of a match, or UnsupportedFFNError saying why LTE cannot run it eagerly."""
    where = m.module or "<root>"
    if m.d_ff % config.expert_size:
        raise UnsupportedFFNError(
            f"{where}: d_ff={m.d_ff} is not divisible by expert_size={config.expert_size}; "
            f"choose an expert_size dividing {m.d_ff} (e.g. {_divisor_near(m.d_ff, config.expert_size)})")
    for role, ref in (("up", m.up), ("down", m.down), ("gate", m.gate)):
        if ref is not None and ref.weight_path is None:
            raise UnsupportedFFNError(f"{where}: the {role} projection's weight is not a parameter of the model")
    up_mod, down_mod = _module_of(m.up.weight_path), _module_of(m.down.weight_path)
    gate_mod = _module_of(m.gate.weight_path) if m.gate is not None else None
    for role, path in (("up", up_mod), ("down", down_mod), ("gate", gate_mod)):
        if path is not None and not _is_projection(model.get_submodule(path)):
            raise UnsupportedFFNError(
                f"{where}: the {role} weight belongs to {path or '<root>'} "
                f"({type(model.get_submodule(path)).__name__}), not to a projection module (nn.Linear/Conv1D); "
                "LTE's eager forward hooks need projection modules; on_unsupported='skip' keeps it dense")
    return FFNSpec(
        name=m.module, up_module=up_mod, down_module=down_mod, gate_module=gate_mod,
        up_weight=m.up.weight_path, down_weight=m.down.weight_path,
        gate_weight=m.gate.weight_path if m.gate is not None else None,
        up_bias=m.up.bias_path, down_bias=m.down.bias_path,
        gate_bias=m.gate.bias_path if m.gate is not None else None,
        up_transposed=m.up.transposed, down_transposed=m.down.transposed,
        gate_transposed=m.gate.transposed if m.gate is not None else False,
        up_rows=m.up.rows, gate_rows=m.gate.rows if m.gate is not None else None,
        activation=m.activation, glu=m.glu, d_model=m.d_model, d_ff=m.d_ff, d_out=m.d_out, form=m.form)


def _is_projection(module: nn.Module) -> bool:
    """A leaf module whose parameters are `weight` (+ `bias`) and whose first input is x."""
    names = {n for n, _ in module.named_parameters(recurse=False)}
    return not list(module.children()) and "weight" in names and names <= {"weight", "bias"}


def _module_of(param_path: str) -> str:
    return param_path.rpartition(".")[0]


def _owner(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def _divisor_near(n: int, b: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - b))


# ----------------------------------------------------------------------------- clustering & permuting
def _rows(model: nn.Module, path: str, transposed: bool, rows: tuple[int, int] | None) -> Tensor:
    """The [d_ff, d] neuron rows of a projection weight (un-transposed, fused slice applied)."""
    w = model.get_parameter(path).detach()
    w = w.t() if transposed else w
    return w[rows[0]:rows[1]] if rows is not None else w


def _cluster(model: nn.Module, spec: FFNSpec, config: Config) -> Tensor:
    """Expert permutation from balanced k-means on W_gate rows (GLU) or W_up rows."""
    if spec.glu:
        rows = _rows(model, spec.gate_weight, spec.gate_transposed, spec.gate_rows)
    else:
        rows = _rows(model, spec.up_weight, spec.up_transposed, spec.up_rows)
    labels = balanced_kmeans(rows, spec.d_ff // config.expert_size, config.kmeans_iters, config.seed)
    return expert_permutation(labels)


@torch.no_grad()
def _permute_param(p: Tensor, perm: Tensor, dim: int, rows: tuple[int, int] | None = None) -> None:
    """Reorder `p` along `dim` in place (the Parameter object is kept; only values move)."""
    perm = perm.to(p.device)
    view = p if rows is None else p.narrow(dim, rows[0], rows[1] - rows[0])
    view.copy_(view.index_select(dim, perm))


def permute_ffn_(model: nn.Module, spec: FFNSpec, perm: Tensor) -> None:
    """Apply a neuron permutation to the FFN's weights: the function is unchanged."""
    for w, b, rows, transposed in ((spec.up_weight, spec.up_bias, spec.up_rows, spec.up_transposed),
                                   (spec.gate_weight, spec.gate_bias, spec.gate_rows, spec.gate_transposed)):
        if w is None:
            continue
        _permute_param(model.get_parameter(w), perm, 1 if transposed else 0, rows)
        if b is not None:
            _permute_param(model.get_parameter(b), perm, 0, rows)
    down_dim = 0 if spec.down_transposed else 1
    _permute_param(model.get_parameter(spec.down_weight), perm, down_dim)


@torch.no_grad()
def kernel_layout_(model: nn.Module, spec: FFNSpec) -> None:
    """Store W_down (and a Conv1D W_up) so that each neuron's weights are one contiguous row.

    The sparse kernels read an expert as one contiguous [B, d] block of `w_up` and of `w_down^T`.
    An nn.Linear down weight is [d_out, d_ff]: we keep its shape and values but give it column-major
    strides, so `weight.t()` (what the rewrite passes to the op) is contiguous and free. Dense
    matmuls accept either layout; `.to()` and HF save_pretrained preserve it (raw safetensors
    `save_file` needs `.contiguous()`, which lte.save does).
    """
    for path, neuron_dim in ((spec.down_weight, 0 if spec.down_transposed else 1),
                             (spec.up_weight if spec.up_rows is None else None, 1 if spec.up_transposed else 0),
                             (spec.gate_weight if spec.gate_rows is None else None, 1 if spec.gate_transposed else 0)):
        if path is None:
            continue
        p = model.get_parameter(path)
        if p.dim() == 2 and neuron_dim == 1 and not p.t().is_contiguous():
            p.data = p.data.t().contiguous().t()


def apply_kernel_layout(model: nn.Module) -> nn.Module:
    """Give a prepared model the sparse kernels' weight layout (after training with
    `Config(kernel_layout=False)`, e.g. under FSDP, which shards only contiguous parameters)."""
    for r in _require_routers(model).values():
        kernel_layout_(model, r.spec)
    return model


def attach_router(model: nn.Module, spec: FFNSpec, config: Config, *, permutation: Tensor | None = None) -> LTERouter:
    """Create the FFN's router under its owner module and register the two forward hooks."""
    ref = model.get_parameter(spec.up_weight)
    router = LTERouter(spec, config.expert_size, config.tau, device=ref.device, dtype=ref.dtype)
    _init_router(router, config)
    if permutation is not None:
        router.permutation.copy_(permutation)
    router_home(model, spec).add_module(ROUTER_ATTR, router)
    handles = [model.get_submodule(spec.up_module).register_forward_hook(RouteHook(router)),
               model.get_submodule(spec.down_module).register_forward_pre_hook(GateHook(router))]
    router._lte_hook_handles = handles
    return router


def router_home(model: nn.Module, spec: FFNSpec) -> nn.Module:
    """Where the router lives: the FFN's owner module, unless that is a container whose forward
    iterates its children (nn.Sequential would call the router as a layer): then the up projection."""
    owner = _owner(model, spec.name)
    if isinstance(owner, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return model.get_submodule(spec.up_module)
    return owner


@torch.no_grad()
def _init_router(router: LTERouter, config: Config) -> None:
    # crc32, not hash(): str hashes change per process, prepare must be reproducible.
    gen = torch.Generator().manual_seed(config.seed + zlib.crc32(router.spec.name.encode()))
    std = config.router_init_std if config.router_init_std is not None else router.spec.d_model ** -0.5
    w = torch.randn(router.linear.weight.shape, generator=gen) * std
    router.linear.weight.copy_(w)
    router.linear.bias.fill_(config.router_bias_init)


def _require_routers(model: nn.Module) -> dict[str, LTERouter]:
    rs = routers(model)
    if not rs:
        raise NotPreparedError(f"{type(model).__name__} has no LTE routers: call lte.prepare(model, lte.Config()) first")
    return rs


def unprepare_hooks(model: nn.Module) -> None:
    """Remove the LTE hooks (used when loading state replaces routers)."""
    for r in routers(model).values():
        for h in getattr(r, "_lte_hook_handles", []):
            h.remove()


__all__: Sequence[str] = ["prepare", "set_mode", "get_mode", "routers", "gates", "is_prepared"]
