"""`lte.save` / `lte.load`: the LTE state of a prepared model as safetensors + JSON.

A directory written by `save` holds
- `lte_config.json`: the Config, one FFNSpec per prepared FFN, the mode, the model class, the
  SHA-256 of `lte_state.safetensors`, a fingerprint of each FFN's permuted weights and the length
  of each layer list the FFNs live in;
- `lte_state.safetensors`: each router's weights and the neuron permutation prepare applied;
- `model.safetensors` (unless `include_model=False`): the whole model state (permuted FFN
  weights, trained weights, routers), so a trained model restores exactly.

`load` reads and checks everything (every file, key, shape, dtype, permutation, mode, d_model, and
the fingerprints) before it changes the model: on any failure it raises a `StateMismatchError`
(`StateFileError` when a file is missing, unreadable or corrupt; the message names the file) and
the model is left exactly as it was, so a retry works. Nothing is unpickled.

Wrappers: both verbs see through `torch.compile` (`OptimizedModule`) and `DataParallel`; `save`
also through `DistributedDataParallel`. `load` refuses a DDP-wrapped model (DDP does not sync
parameters added after it was built: load first, then wrap); FSDP is refused by both (save/load
the unwrapped model, e.g. on a full state dict).

Weights without `model.safetensors`: the model's own FFN weights are compared with the recorded
fingerprint; the original (unpermuted) weights get the saved permutation, weights that are already
permuted (a `save_pretrained` of the prepared model, reloaded with `from_pretrained`) are kept as
they are, anything else is refused.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file, save_model
from torch import Tensor, nn

from ..config import Config
from ..errors import NotPreparedError, StateMismatchError, UnsupportedFFNError, UnsupportedWrapperError
from . import functional
from .layout import kernel_layout_, permute_ffn_
from .prepare import ROUTER_ATTR, attach_router, get_mode, hookable, is_prepared, router_home, routers, set_mode
from .spec import FFNSpec
from .state_files import (CONFIG_FILE, FINGERPRINT_ROWS, FINGERPRINT_RTOL, FORMAT, MODEL_FILE, PERMUTATION_DTYPES, ROUTER_DTYPES, STATE_FILE, _read_meta, _read_state, _read_model_file)

logger = logging.getLogger(__name__)



# ----------------------------------------------------------------------------- wrappers
def unwrap(model: nn.Module, *, verb: str = "save") -> nn.Module:
    """The user's model inside `torch.compile` / DataParallel / DDP wrappers (refused where unsafe)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while True:
        if _is_fsdp(model):
            raise UnsupportedWrapperError(
                f"lte.{verb} cannot see through FSDP ({type(model).__name__}): its parameters are sharded; "
                f"call lte.{verb} on the unwrapped model (before wrapping, or on a model built from a full state dict)")
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        elif isinstance(model, DistributedDataParallel):
            if verb == "load":
                raise UnsupportedWrapperError(
                    "lte.load into a DistributedDataParallel model would add router parameters DDP does not "
                    "synchronise; call lte.load(model, dir) on the plain model first, then wrap it in DDP")
            model = model.module
        elif isinstance(model, DataParallel):
            model = model.module
        else:
            return model


def _is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # torch built without distributed
        return False
    return isinstance(model, (FSDPModule, FullyShardedDataParallel))


# ----------------------------------------------------------------------------- save
def save(model: nn.Module, directory: str | os.PathLike, *, include_model: bool = True) -> Path:
    """Write the model's LTE state (and, by default, its weights) into `directory`.

    `model` may be wrapped by `torch.compile`, DataParallel or DDP: the inner model is saved.
    """
    inner = unwrap(model, verb="save")
    rs = routers(inner)
    if not rs:
        raise NotPreparedError(f"{type(inner).__name__} is not prepared: nothing to save (call lte.prepare first)")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, r in rs.items():
        tensors[f"{name}.weight"] = r.linear.weight.detach().contiguous().cpu()
        tensors[f"{name}.bias"] = r.linear.bias.detach().contiguous().cpu()
        tensors[f"{name}.permutation"] = r.permutation.detach().contiguous().cpu()
    save_file(tensors, str(out / STATE_FILE))
    if include_model:
        save_model(inner, str(out / MODEL_FILE), force_contiguous=True)
    params = dict(inner.named_parameters())
    meta = {"format": FORMAT, "model_class": type(inner).__name__, "mode": get_mode(inner),
            "config": _config_of(inner).to_dict(), "ffns": [r.spec.to_dict() for r in rs.values()],
            "includes_model": include_model,
            "state_sha256": hashlib.sha256((out / STATE_FILE).read_bytes()).hexdigest(),
            "fingerprints": {n: fingerprint(params, r.spec, r.permutation.cpu()) for n, r in rs.items()},
            "layer_lists": _layer_lists(inner, [r.spec for r in rs.values()])}
    tmp = out / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(out / CONFIG_FILE)
    return out


def _config_of(model: nn.Module) -> Config:
    cfg = getattr(model, "lte_config", None)
    return cfg if isinstance(cfg, Config) else Config()


# ----------------------------------------------------------------------------- fingerprints
def fingerprint(params: dict[str, Tensor], spec: FFNSpec, perm: Tensor) -> dict[str, Any]:
    """(sum, norm) in float64 of a few permuted neuron rows of each projection.

    The rows are neurons the permutation moves (spread over d_ff), so the fingerprint tells the
    original weights (row `perm[i]` matches) from already permuted ones (row `i` matches).
    """
    moved = torch.nonzero(perm != torch.arange(perm.numel())).flatten()
    if moved.numel() > FINGERPRINT_ROWS:
        moved = moved[torch.linspace(0, moved.numel() - 1, FINGERPRINT_ROWS).round().long()]
    rows = moved.tolist()
    out: dict[str, Any] = {"rows": rows}
    for role, proj in spec.projections().items():
        sums, norms = _row_stats(proj.neuron_rows(params[proj.weight].detach()), rows)
        out[role] = {"sum": sums, "norm": norms}
    return out


def _row_stats(neuron_rows: Tensor, rows: list[int]) -> tuple[list[float], list[float]]:
    sel = neuron_rows[torch.tensor(rows, dtype=torch.long, device=neuron_rows.device)].double().cpu()
    return sel.sum(1).tolist(), sel.norm(dim=1).tolist()


def _matches(neuron_rows: Tensor, rows: list[int], rec: dict) -> bool:
    sums, norms = _row_stats(neuron_rows, rows)
    for s, n, rs, rn in zip(sums, norms, rec["sum"], rec["norm"]):
        tol = FINGERPRINT_RTOL * abs(rn) + 1e-12
        if not (abs(s - rs) <= tol and abs(n - rn) <= tol):  # NaN never matches
            return False
    return True


def _weights_state(params: dict[str, Tensor], spec: FFNSpec, perm: Tensor, fp: dict) -> tuple[str, str | None]:
    """('original' | 'permuted' | 'neither', the first projection that matched neither)."""
    rows = fp["rows"]
    orig_rows = perm[torch.tensor(rows, dtype=torch.long)].tolist() if rows else []
    permuted = original = True
    for role, proj in spec.projections().items():
        w = proj.neuron_rows(params[proj.weight].detach())
        p_ok, o_ok = _matches(w, rows, fp[role]), _matches(w, orig_rows, fp[role])
        permuted, original = permuted and p_ok, original and o_ok
        if not (permuted or original):
            return "neither", role
    return ("original" if original else "permuted"), None


# ----------------------------------------------------------------------------- layer lists
def _layer_lists(model: nn.Module, specs: list[FFNSpec]) -> dict[str, int]:
    """{path of a ModuleList/Sequential holding prepared FFNs: its length} (e.g. model.layers: 32)."""
    out = {}
    for s in specs:
        parts = s.name.split(".")
        for i, p in enumerate(parts):
            if p.isdigit() and i > 0:
                prefix = ".".join(parts[:i])
                try:
                    container = model.get_submodule(prefix)
                except AttributeError:
                    continue
                if isinstance(container, (nn.ModuleList, nn.Sequential)):
                    out[prefix] = len(container)
    return out


def _layers_beyond(model: nn.Module, specs: list[FFNSpec], saved: dict[str, int]) -> list[str]:
    """FFN paths of the model in layers past the saved layer lists' lengths (they stay dense)."""
    extra = []
    names = {s.name for s in specs}
    for s in specs:
        parts = s.name.split(".")
        for i, p in enumerate(parts):
            prefix = ".".join(parts[:i])
            if not (p.isdigit() and prefix in saved):
                continue
            try:
                n = len(model.get_submodule(prefix))
            except (AttributeError, TypeError):
                continue
            for j in range(saved[prefix], n):
                cand = ".".join([*parts[:i], str(j), *parts[i + 1:]])
                try:
                    model.get_submodule(cand)
                except AttributeError:
                    continue
                if cand not in names and cand not in extra:
                    extra.append(cand)
    return extra


# ----------------------------------------------------------------------------- load
def load(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Restore LTE state saved by `save` into `model` (an unprepared model of the same architecture).

    With a saved `model.safetensors` the weights are restored too; otherwise the model keeps its
    own weights: original ones get the saved permutation, already permuted ones (the prepared
    model's `save_pretrained`) are kept. Everything is checked before the model changes; on an
    error the model is unchanged. Returns `model` (a `torch.compile` wrapper stays the wrapper).
    """
    src = Path(directory)
    inner = unwrap(model, verb="load")
    meta = _read_meta(src)
    cfg_path = src / CONFIG_FILE
    config, specs, mode = meta["config"], meta["specs"], meta["mode"]
    if is_prepared(inner):
        raise StateMismatchError(f"{type(inner).__name__} is already prepared; load the LTE state in {src} into a "
                                 "fresh (unprepared) model of the same architecture")
    if meta["model_class"] != type(inner).__name__:
        logger.warning("lte.load: %s was saved from a %s, loading into a %s", cfg_path, meta["model_class"],
                       type(inner).__name__)
    params = dict(inner.named_parameters())
    problems = _check_specs(inner, params, specs, config)
    state = _read_state(src, meta)
    problems += _check_router_state(specs, state, config, params, src / STATE_FILE)
    full = meta["includes_model"]
    model_state = _read_model_file(src / MODEL_FILE) if full else None
    decisions: dict[str, str] = {}
    if problems:
        raise _mismatch(src, inner, problems)
    if full:
        problems += _check_model_file(inner, model_state, specs, state, src / MODEL_FILE)
    fps = meta["fingerprints"]
    for s in specs:
        if fps is None:  # format 2: no fingerprint, the model is taken to hold the original weights
            decisions[s.name] = "original"
            continue
        perm = state[f"{s.name}.permutation"].long()
        if full and not problems:
            ws, role = _weights_state(model_state, s, perm, fps[s.name])
            if ws != "permuted":
                problems.append(f"{s.name}: the {role} weights in {src / MODEL_FILE} do not match the fingerprint "
                                f"recorded in {cfg_path}: the files do not belong together")
        elif not full:
            ws, role = _weights_state(params, s, perm, fps[s.name])
            if ws == "neither":
                problems.append(
                    f"{s.name}: the model's {role} weights ({s.projections()[role].weight}) are neither the original "
                    f"weights nor the permuted ones recorded in {cfg_path}; load into the model the state was saved "
                    "from (its original pretrained weights, or the prepared model's save_pretrained), or save with "
                    "lte.save(model, dir) (include_model=True) to restore trained weights")
            decisions[s.name] = ws
    if problems:
        raise _mismatch(src, inner, problems)
    # ---- every check passed: change the model
    for spec in specs:
        perm = state[f"{spec.name}.permutation"].long()
        if not full and decisions[spec.name] == "original":
            permute_ffn_(inner, spec, perm)
        r = attach_router(inner, spec, config, permutation=perm)
        with torch.no_grad():
            r.linear.weight.copy_(state[f"{spec.name}.weight"])
            r.linear.bias.copy_(state[f"{spec.name}.bias"])
    if full:
        with torch.no_grad():
            inner.load_state_dict(model_state, strict=False)
    if config.kernel_layout:
        for spec in specs:
            kernel_layout_(inner, spec)
    inner.lte_config = config
    if mode == "mixed":
        logger.warning("lte.load: the routers in %s were saved in different modes; all start in 'dense' "
                       "(lte.set_mode to choose)", cfg_path)
    set_mode(inner, mode if mode != "mixed" else "dense")
    skipped = [n for n, d in decisions.items() if d == "permuted"]
    if skipped:
        logger.info("lte.load: %d FFN(s) already hold permuted weights (save_pretrained of a prepared model); "
                    "permutation not applied again", len(skipped))
    beyond = _layers_beyond(inner, specs, meta["layer_lists"])
    if beyond:
        logger.warning("lte.load: %s has layers beyond the %d saved in %s; their FFNs stay dense: %s",
                       type(inner).__name__, len(specs), cfg_path, ", ".join(beyond))
    return model


def _mismatch(src: Path, model: nn.Module, problems: list[str]) -> StateMismatchError:
    return StateMismatchError(f"LTE state in {src} (FFNs as recorded in {src / CONFIG_FILE}) does not fit "
                              f"{type(model).__name__}:\n  - " + "\n  - ".join(problems))


# ----------------------------------------------------------------------------- checks
def _check_specs(model: nn.Module, params: dict[str, Tensor], specs: list[FFNSpec], config: Config) -> list[str]:
    """Every saved FFN must exist in `model` with the saved d_ff, d_model, d_out and bias shapes."""
    problems, homes = [], {}
    for s in specs:
        for role, proj in s.projections().items():
            w = params.get(proj.weight)
            if w is None:
                problems.append(f"{s.name}: {role} weight {proj.weight} is not a parameter of the model")
                continue
            n = w.shape[proj.neuron_axis] if w.dim() == 2 else -1
            if (n < proj.rows[1]) if proj.rows else (n != s.d_ff):
                problems.append(f"{s.name}: {role} weight {proj.weight} has shape {tuple(w.shape)}, "
                                f"saved d_ff={s.d_ff}")
                continue
            width, other = (s.d_out, "d_out") if proj.down else (s.d_model, "d_model")
            if proj.neuron_rows(w).shape[1] != width:
                problems.append(f"{s.name}: {role} weight {proj.weight} has shape {tuple(w.shape)}, saved "
                                f"{other}={width}")
            if proj.bias is not None:
                b = params.get(proj.bias)
                want = (s.d_out,) if proj.down else (s.d_ff,)
                if b is None:
                    problems.append(f"{s.name}: {role} bias {proj.bias} is not a parameter of the model")
                elif b.dim() != 1 or tuple(proj.bias_rows(b).shape) != want:
                    problems.append(f"{s.name}: {role} bias {proj.bias} has shape {tuple(b.shape)}, expected {want}")
        if problems:
            continue
        try:
            home = router_home(model, s)
        except AttributeError:
            problems.append(f"{s.name}: no such module in the model")
            continue
        if id(home) in homes:
            problems.append(f"{s.name}: its router would live in the same module as {homes[id(home)]}'s")
        homes[id(home)] = s.name
        if hasattr(home, ROUTER_ATTR):
            problems.append(f"{s.name}: the module already has an attribute {ROUTER_ATTR!r}")
        if not hookable(model, s):  # a functional FFN: its module's forward must trace as at prepare
            try:
                functional.locate(model, s)
            except UnsupportedFFNError as e:
                problems.append(str(e))
    return problems


def _check_router_state(specs: list[FFNSpec], state: dict[str, Tensor], config: Config,
                        params: dict[str, Tensor], path: Path) -> list[str]:
    problems = []
    for s in specs:
        e = s.d_ff // config.expert_size
        for key, shape, dtypes in (("weight", (e, s.d_model), ROUTER_DTYPES), ("bias", (e,), ROUTER_DTYPES),
                                   ("permutation", (s.d_ff,), PERMUTATION_DTYPES)):
            t = state[f"{s.name}.{key}"]
            if tuple(t.shape) != shape or t.dtype not in dtypes:
                problems.append(f"{s.name}.{key} in {path}: {t.dtype} {list(t.shape)}, expected {list(shape)} "
                                f"of {' or '.join(str(d) for d in dtypes)}")
            elif key != "permutation" and not torch.isfinite(t).all():
                problems.append(f"{s.name}.{key} in {path} holds NaN or Inf")
        perm = state[f"{s.name}.permutation"]
        if perm.dtype in PERMUTATION_DTYPES and perm.shape == (s.d_ff,) and \
                not torch.equal(torch.sort(perm.long()).values, torch.arange(s.d_ff)):
            problems.append(f"{s.name}.permutation in {path} is not a permutation of range({s.d_ff})")
    return problems


def _router_keys(model: nn.Module, specs: list[FFNSpec]) -> dict[str, tuple[str, str]]:
    """{model state key of a router tensor the load will create: (FFN name, state-file field)}."""
    out = {}
    for s in specs:
        home = router_home(model, s)
        path = next(n for n, m in model.named_modules(remove_duplicate=False) if m is home)
        base = f"{path}.{ROUTER_ATTR}" if path else ROUTER_ATTR
        out.update({f"{base}.linear.weight": (s.name, "weight"), f"{base}.linear.bias": (s.name, "bias"),
                    f"{base}.permutation": (s.name, "permutation")})
    return out


def _check_model_file(model: nn.Module, saved: dict[str, Tensor], specs: list[FFNSpec],
                      state: dict[str, Tensor], path: Path) -> list[str]:
    """model.safetensors must hold every tensor of the model (tied ones once) with the model's shape
    and dtype, plus the routers, equal to those in the state file."""
    own = model.state_dict()
    rkeys = _router_keys(model, specs)
    problems = []
    unexpected = sorted(k for k in saved if k not in own and k not in rkeys)
    loaded_ptrs = {own[k].data_ptr() for k in saved if k in own}
    missing = sorted(k for k in own if k not in saved and own[k].data_ptr() not in loaded_ptrs)
    missing += sorted(k for k in rkeys if k not in saved)
    if missing or unexpected:
        problems.append(f"{path}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    for k, t in saved.items():
        if k in own:
            if tuple(t.shape) != tuple(own[k].shape) or t.dtype != own[k].dtype:
                problems.append(f"{k} in {path}: {t.dtype} {list(t.shape)}, the model has {own[k].dtype} "
                                f"{list(own[k].shape)} (load into a model of the saved dtype, then convert)")
        elif k in rkeys:
            name, field = rkeys[k]
            ref = state[f"{name}.{field}"]
            if t.dtype != ref.dtype or t.shape != ref.shape or not torch.equal(t, ref):
                problems.append(f"{k} in {path} differs from {name}.{field} in {path.parent / STATE_FILE}")
    return problems
