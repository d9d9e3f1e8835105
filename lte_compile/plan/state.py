"""`lte.save` / `lte.load`: the LTE state of a prepared model as safetensors + JSON.

A directory written by `save` holds
- `lte_config.json`: the Config, one FFNSpec per prepared FFN, the mode and the model class;
- `lte_state.safetensors`: each router's weights and the neuron permutation prepare applied;
- `model.safetensors` (unless `include_model=False`): the whole model state (permuted FFN
  weights, trained weights, routers), so a trained model restores exactly.
`load` checks everything against the target model before changing it: a mismatched model gets a
`StateMismatchError` listing the differences and is left as it was. Nothing is unpickled.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file, save_model
from torch import nn

from ..config import Config
from ..errors import NotPreparedError, StateMismatchError
from .layout import kernel_layout_, permute_ffn_
from .prepare import ROUTER_ATTR, attach_router, get_mode, is_prepared, routers, set_mode
from .spec import FFNSpec

CONFIG_FILE, STATE_FILE, MODEL_FILE = "lte_config.json", "lte_state.safetensors", "model.safetensors"
FORMAT = 2  # 2: FFN projections as nested records (passes.ffn.Projection)


def save(model: nn.Module, directory: str | os.PathLike, *, include_model: bool = True) -> Path:
    """Write the model's LTE state (and, by default, its weights) into `directory`."""
    rs = routers(model)
    if not rs:
        raise NotPreparedError(f"{type(model).__name__} is not prepared: nothing to save (call lte.prepare first)")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, r in rs.items():
        tensors[f"{name}.weight"] = r.linear.weight.detach().contiguous().cpu()
        tensors[f"{name}.bias"] = r.linear.bias.detach().contiguous().cpu()
        tensors[f"{name}.permutation"] = r.permutation.detach().contiguous().cpu()
    save_file(tensors, str(out / STATE_FILE))
    if include_model:
        save_model(model, str(out / MODEL_FILE), force_contiguous=True)
    meta = {"format": FORMAT, "model_class": type(model).__name__, "mode": get_mode(model),
            "config": _config_of(model).to_dict(), "ffns": [r.spec.to_dict() for r in rs.values()],
            "includes_model": include_model}
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return out


def load(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Restore LTE state saved by `save` into `model` (an unprepared model of the same architecture).

    With a saved `model.safetensors` the weights are restored too; otherwise the model keeps its
    own weights (the original, unpermuted ones) and the saved permutation is applied to them.
    """
    src = Path(directory)
    meta = _read_meta(src)
    config = Config.from_dict(meta["config"])
    specs = [FFNSpec.from_dict(d) for d in meta["ffns"]]
    if is_prepared(model):
        raise StateMismatchError(f"{type(model).__name__} is already prepared; load LTE state into a fresh "
                                 "(unprepared) model of the same architecture")
    problems = _check_specs(model, specs)
    full = meta.get("includes_model") and (src / MODEL_FILE).exists()
    state = load_file(str(src / STATE_FILE))
    problems += _check_router_state(specs, state, config)
    if full:
        problems += _check_model_file(model, src / MODEL_FILE, specs)
    if problems:
        raise StateMismatchError(f"LTE state in {src} does not fit {type(model).__name__}:\n  - "
                                 + "\n  - ".join(problems))
    for spec in specs:  # all checks passed: change the model
        perm = state[f"{spec.name}.permutation"]
        if not full:
            permute_ffn_(model, spec, perm)
        r = attach_router(model, spec, config, permutation=perm)
        with torch.no_grad():
            r.linear.weight.copy_(state[f"{spec.name}.weight"])
            r.linear.bias.copy_(state[f"{spec.name}.bias"])
    if full:
        _load_model_file(model, src / MODEL_FILE)
    if config.kernel_layout:
        for spec in specs:
            kernel_layout_(model, spec)
    model.lte_config = config
    set_mode(model, meta.get("mode", "dense") if meta.get("mode") != "mixed" else "dense")
    return model


def _config_of(model: nn.Module) -> Config:
    cfg = getattr(model, "lte_config", None)
    return cfg if isinstance(cfg, Config) else Config()


def _read_meta(src: Path) -> dict:
    path = src / CONFIG_FILE
    if not path.exists() or not (src / STATE_FILE).exists():
        raise StateMismatchError(f"{src} holds no LTE state ({CONFIG_FILE} and {STATE_FILE} expected); "
                                 "write one with lte.save(model, dir)")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise StateMismatchError(f"{path}: format {meta.get('format')!r}, this lte_compile reads format {FORMAT}")
    return meta


def _shape(model: nn.Module, path: str | None) -> tuple[int, ...] | None:
    if path is None:
        return None
    try:
        return tuple(model.get_parameter(path).shape)
    except AttributeError:
        return None


def _check_specs(model: nn.Module, specs: list[FFNSpec]) -> list[str]:
    """Every saved FFN must exist in `model` with the same weight shapes along its d_ff axis."""
    problems = []
    for s in specs:
        for role, proj in s.projections().items():
            shape = _shape(model, proj.weight)
            if shape is None:
                problems.append(f"{s.name}: {role} weight {proj.weight} is not a parameter of the model")
                continue
            n = shape[proj.neuron_axis]
            if (n < proj.rows[1]) if proj.rows else (n != s.d_ff):
                problems.append(f"{s.name}: {role} weight {proj.weight} has shape {shape}, saved d_ff={s.d_ff}")
    return problems


def _check_router_state(specs: list[FFNSpec], state: dict, config: Config) -> list[str]:
    problems = []
    for s in specs:
        e = s.d_ff // config.expert_size
        w = state.get(f"{s.name}.weight")
        if w is None or tuple(w.shape) != (e, s.d_model):
            problems.append(f"{s.name}: router weight missing or not [{e}, {s.d_model}] in {STATE_FILE}")
    return problems


def _check_model_file(model: nn.Module, path: Path, specs: list[FFNSpec]) -> list[str]:
    """Shapes in model.safetensors must match the model's (routers are added by load itself)."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = []
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            if f".{ROUTER_ATTR}." in f".{key}":
                continue
            shape = tuple(f.get_slice(key).get_shape())
            if key in own and own[key] != shape:
                problems.append(f"{key}: saved shape {shape}, model has {own[key]}")
    return problems


def _load_model_file(model: nn.Module, path: Path) -> None:
    state = load_file(str(path))
    with torch.no_grad():
        missing, unexpected = model.load_state_dict(state, strict=False, assign=False)
    # Tied weights (lm_head = embeddings) are saved once: a missing key sharing storage with a
    # loaded one is fine.
    own = model.state_dict()
    loaded_ptrs = {own[k].data_ptr() for k in state if k in own}
    missing = [k for k in missing if own[k].data_ptr() not in loaded_ptrs]
    if missing or unexpected:
        raise StateMismatchError(f"{path}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
