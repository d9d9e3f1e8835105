"""`lte.prepare`: find a model's FFNs, group their neurons into experts, attach routers.

plan stage of trace -> match -> plan -> rewrite -> lower. Everything prepare creates lives on the
model as ordinary parameters/buffers (routers exist before compile: Dynamo cannot add parameters
inside a backend). FFNs with projection modules get forward hooks (router.py); FFNs computed with
F.linear/@/matmul/einsum on parameters get their module's forward rewritten (functional.py).
Validation of every FFN happens before the first change, so a failing prepare leaves the model as
it was.
"""
from __future__ import annotations

import functools
import logging
import zlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..config import MODES, Config
from ..errors import ConfigError, NotPreparedError, UnsupportedFFNError
from ..passes.ffn import FFNMatch, FFNReport
from . import functional
from .cluster import balanced_kmeans, expert_permutation
from .layout import kernel_layout_, permute_ffn_
from .probe import run_example
from .router import GateHook, LTERouter, RouteHook
from .spec import FFNSpec

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
    args, kwargs = example_args(model, example_inputs)
    report = _find(model, args, kwargs)
    specs = _check_functional(model, plan_ffns(model, report, config, filter_fn), config, args, kwargs)
    specs = _check_hooks_fire(model, specs, config, args, kwargs)
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


def config_of(model: nn.Module) -> Config:
    """The `Config` the model was prepared (or loaded) with: the one owner of tau and expert size."""
    cfg = getattr(model, "lte_config", None)
    if not isinstance(cfg, Config):
        _require_routers(model)  # a clear NotPreparedError for an unprepared model
        raise NotPreparedError(f"{type(model).__name__} has routers but no lte_config: prepare it with lte.prepare")
    return cfg


def is_prepared(model: nn.Module) -> bool:
    return any(isinstance(m, LTERouter) for m in model.modules())


# ----------------------------------------------------------------------------- planning
def _find(model: nn.Module, args: tuple, kwargs: dict) -> FFNReport:
    from ..passes import find_ffns_in_model

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
    specs, homes = [], {}
    for match in report.matches:
        if filter_fn is not None and not filter_fn(_owner(model, match.module), match.module):
            continue
        try:
            spec = spec_from_match(model, match, config)
            home = router_home(model, spec)
            if id(home) in homes:
                raise UnsupportedFFNError(
                    f"{spec.name or '<root>'}: its router would live in the same module as "
                    f"{homes[id(home)] or '<root>'}'s (one {ROUTER_ATTR} per module); give each FFN a module of its own")
            homes[id(home)] = spec.name
            specs.append(spec)
        except UnsupportedFFNError as e:
            if config.on_unsupported == "error":
                raise
            logger.warning("%s; left dense", e)
    if not specs:
        raise UnsupportedFFNError(f"{type(model).__name__}: {len(report.matches)} FFN(s) found but none can be "
                                  "prepared (see the warnings above, or filter_fn)")
    return specs


def spec_from_match(model: nn.Module, m: FFNMatch, config: Config) -> FFNSpec:
    """FFNSpec of a match, or UnsupportedFFNError saying why LTE cannot run it eagerly.

    Projections that are modules get the two hooks; an FFN computed on parameters (F.linear, @,
    matmul, einsum) needs the forward computing it to be traceable (plan/functional.py)."""
    where = m.module or "<root>"
    if m.d_ff % config.expert_size:
        raise UnsupportedFFNError(
            f"{where}: d_ff={m.d_ff} is not divisible by expert_size={config.expert_size}; "
            f"choose an expert_size dividing {m.d_ff} (e.g. {_divisor_near(m.d_ff, config.expert_size)})")
    for role, ref in (("up", m.up), ("down", m.down), ("gate", m.gate)):
        if ref is not None and ref.weight_path is None:
            raise UnsupportedFFNError(f"{where}: the {role} projection's weight is not a parameter of the model")
    spec = FFNSpec(name=m.module, up=m.up.projection(), down=m.down.projection(down=True),
                   gate=m.gate.projection() if m.gate is not None else None, activation=m.activation,
                   glu=m.glu, d_model=m.d_model, d_ff=m.d_ff, d_out=m.d_out, form=m.form)
    if not hookable(model, spec):
        functional.locate(model, spec)  # raises, naming why, if its forward cannot be rewritten
    return spec


def hookable(model: nn.Module, spec: FFNSpec) -> bool:
    """True if every projection of the FFN is a projection module (the hooks' case); else the FFN
    is functional and its module's forward is rewritten (plan/functional.py)."""
    return all(_is_projection(model.get_submodule(p.module)) for p in spec.projections().values())


def _check_functional(model: nn.Module, specs: list[FFNSpec], config: Config, args: tuple,
                      kwargs: dict) -> list[FFNSpec]:
    """Drop (or refuse, on_unsupported='error') functional FFNs whose module's traced forward does
    not reproduce the real one on the example input. Runs the model once; changes nothing."""
    places = {s.name: functional.locate(model, s) for s in specs if not hookable(model, s)}
    if not places:
        return specs
    problems = functional.check_traced(model, sorted(set(places.values())), args, kwargs)
    errors = {s.name: UnsupportedFFNError(f"{s.name or '<root>'}: LTE rewrites the forward of {places[s.name] or '<root>'} "
                                          f"to make this FFN sparse, but {problems[places[s.name]]}")
              for s in specs if places.get(s.name) in problems}
    return _drop_or_refuse(model, specs, errors, config)


def _check_hooks_fire(model: nn.Module, specs: list[FFNSpec], config: Config, args: tuple,
                      kwargs: dict) -> list[FFNSpec]:
    """Drop (or refuse) hooked FFNs whose projection modules the forward never calls: a forward that
    reads `self.down.weight` into F.linear itself would bypass the gate hook and run dense in every
    mode, silently. Runs the model once with counting hooks; changes nothing."""
    hooked = [s for s in specs if hookable(model, s)]
    modules = {p.module for s in hooked for p in s.projections().values()}
    if not modules:
        return specs
    calls = dict.fromkeys(modules, 0)
    run_example(model, args, kwargs, [model.get_submodule(m).register_forward_pre_hook(functools.partial(_count, calls, m))
                                      for m in modules])
    errors = {}
    for spec in hooked:
        unused = [p.module for p in spec.projections().values() if not calls[p.module]]
        if unused:
            errors[spec.name] = UnsupportedFFNError(
                f"{spec.name or '<root>'}: the forward never calls projection module(s) {unused} (their weights "
                "are used directly, e.g. F.linear(h, self.down.weight)), so LTE's hooks would not fire; call the "
                "modules, or on_unsupported='skip' keeps this FFN dense")
    return _drop_or_refuse(model, specs, errors, config)


def _drop_or_refuse(model: nn.Module, specs: list[FFNSpec], errors: dict[str, UnsupportedFFNError],
                    config: Config) -> list[FFNSpec]:
    """The specs without an error; each error raised (on_unsupported='error') or warned about."""
    for spec in specs:
        if spec.name in errors:
            if config.on_unsupported == "error":
                raise errors[spec.name]
            logger.warning("%s; left dense", errors[spec.name])
    kept = [s for s in specs if s.name not in errors]
    if not kept:
        raise UnsupportedFFNError(f"{type(model).__name__}: no FFN can be prepared (see the warnings above)")
    return kept


def _count(calls: dict[str, int], name: str, module: nn.Module, inputs: Any) -> None:
    calls[name] += 1


def _is_projection(module: nn.Module) -> bool:
    """A leaf module whose parameters are `weight` (+ `bias`) and whose first input is x."""
    names = {n for n, _ in module.named_parameters(recurse=False)}
    return not list(module.children()) and "weight" in names and names <= {"weight", "bias"}


def _owner(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def _divisor_near(n: int, b: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - b))


def _cluster(model: nn.Module, spec: FFNSpec, config: Config) -> Tensor:
    """Expert permutation from balanced k-means on W_gate rows (GLU) or W_up rows."""
    proj = spec.gate if spec.glu else spec.up
    rows = proj.neuron_rows(model.get_parameter(proj.weight).detach())
    labels = balanced_kmeans(rows, spec.d_ff // config.expert_size, config.kmeans_iters, config.seed)
    return expert_permutation(labels)


def apply_kernel_layout(model: nn.Module) -> nn.Module:
    """Give a prepared model the sparse kernels' weight layout (after training with
    `Config(kernel_layout=False)`, e.g. under FSDP, which shards only contiguous parameters)."""
    for r in _require_routers(model).values():
        kernel_layout_(model, r.spec)
    return model


def attach_router(model: nn.Module, spec: FFNSpec, config: Config, *, permutation: Tensor | None = None) -> LTERouter:
    """Create the FFN's router under its owner module and register the two forward hooks (module
    projections), or rewrite the forward that computes the FFN (functional FFNs)."""
    place = None if hookable(model, spec) else functional.locate(model, spec)  # raises before any change
    ref = model.get_parameter(spec.up.weight)
    router = LTERouter(spec, config.expert_size, config.tau, device=ref.device, dtype=ref.dtype)
    _init_router(router, config)
    if permutation is not None:
        router.permutation.copy_(permutation)
    router_home(model, spec).add_module(ROUTER_ATTR, router)
    if place is not None:
        functional.rewrite(model, place, [router])
        return router
    model.get_submodule(spec.up.module).register_forward_hook(RouteHook(router))
    model.get_submodule(spec.down.module).register_forward_pre_hook(GateHook(router))
    return router


def router_home(model: nn.Module, spec: FFNSpec) -> nn.Module:
    """Where the router lives: the FFN's owner module, unless that is a container whose forward
    iterates its children (nn.Sequential would call the router as a layer): then the up projection."""
    owner = _owner(model, spec.name)
    if isinstance(owner, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return model.get_submodule(spec.up.module)
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
