"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

`<dir>/step_<stage>_<step>/` holds
- `model.safetensors`: the whole model state (weights, routers, permutations; tied weights once);
- `lte/`: `lte.save(model, ..., include_model=False)` (LTE config, FFN specs, routers);
- `optimizer.safetensors` + `meta.json["optimizer"]`: optimizer tensors flattened as
  `<param index>.<key>`, its param groups and scalar state in JSON;
- `rng_rank<r>.safetensors` + `meta.json["rng"]`: torch (and CUDA), numpy and Python RNG states
  of each rank;
- `meta.json`: stage, step, scheduler state, data position, controller state, driver settings and
  the run's `fingerprint` (`run_fingerprint`: the TrainConfig fields that shape the run, the model
  class, every state tensor's name/shape/dtype, the LTE layout). Resuming compares it with the
  run at hand (`check_fingerprint`) and refuses another run's checkpoints.
A checkpoint is written into a temporary directory and renamed, so a kill mid-write leaves the
previous checkpoint intact. Only rank 0 writes the shared files; every rank writes its RNG file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import Tensor, nn

from ..errors import StateMismatchError

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(stage[12])_(\d+)$")
_STAGE_ORDER = {"stage1": 1, "stage2": 2}


def checkpoint_name(stage: str, step: int) -> str:
    return f"step_{stage}_{step:07d}"


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The most advanced complete checkpoint under `directory` (stage, then step), or None."""
    d = Path(directory)
    if not d.is_dir():
        return None
    found = [(_STAGE_ORDER[m.group(1)], int(m.group(2)), p) for p in d.iterdir()
             if (m := _NAME.match(p.name)) and (p / "meta.json").exists()]
    return max(found)[2] if found else None


# ----------------------------------------------------------------------------- run fingerprint
TRAIN_FIELDS = ("stage1_steps", "stage2_steps", "eta", "lam", "sep_eps", "target_sparsity", "sparsity_tolerance",
                "controller_gain", "calibration_batches", "model_lr", "stage2_lr", "router_lr",
                "router_weight_decay", "model_weight_decay", "warmup_steps", "grad_clip", "batch_size", "seq_len",
                "heldout_fraction", "task", "seed")
"""TrainConfig fields that shape a run's trajectory; the others (logging, out_dir, checkpoint
cadence, progress, plots, resume) may differ between a run and its resume."""


def run_fingerprint(model: nn.Module, config: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint must share with the run resuming it: the TrainConfig fields in
    `TRAIN_FIELDS`, the model class, a digest of every state tensor's (name, shape, dtype) and
    the LTE layout (config, and per FFN its name, d_model, d_ff, experts x expert size).
    Weights are not part of it: a resumed process starts from a fresh model by design."""
    from ..plan import config_of, routers

    lte_cfg = config_of(model)
    layout = [{"ffn": name, "d_model": r.spec.d_model, "d_ff": r.spec.d_ff, "experts": r.num_experts,
               "expert_size": r.expert_size} for name, r in routers(model).items()]
    tensors = [f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in model.state_dict().items()]
    digest = hashlib.sha256("\n".join(tensors).encode()).hexdigest()[:16]
    return {"train": {k: config.get(k) for k in TRAIN_FIELDS},
            "model": {"class": type(model).__name__, "tensors": digest,
                      "lte": {"expert_size": lte_cfg.expert_size, "tau": lte_cfg.tau}, "ffns": layout}}


def fingerprint_differences(saved: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """Human-readable differences between a checkpoint's fingerprint and the current run's."""
    if not saved:
        return ["the checkpoint has no run fingerprint (written by an older lte_compile)"]
    out = []
    for k in TRAIN_FIELDS:
        a, b = saved.get("train", {}).get(k), current["train"].get(k)
        if a != b:
            out.append(f"TrainConfig.{k}: checkpoint {a!r}, this run {b!r}")
    sm, cm = saved.get("model", {}), current["model"]
    if sm.get("class") != cm["class"]:
        out.append(f"model class: checkpoint {sm.get('class')!r}, this run {cm['class']!r}")
    if sm.get("lte") != cm["lte"]:
        out.append(f"LTE config: checkpoint {sm.get('lte')}, this run {cm['lte']}")
    if sm.get("ffns") != cm["ffns"]:
        s_ffns = {f["ffn"]: f for f in sm.get("ffns", [])}
        c_ffns = {f["ffn"]: f for f in cm["ffns"]}
        diff = [n for n in sorted(set(s_ffns) | set(c_ffns)) if s_ffns.get(n) != c_ffns.get(n)]
        out.append(f"LTE FFN layout differs at {diff[:4]}{' ...' if len(diff) > 4 else ''}")
    if sm.get("tensors") != cm["tensors"]:
        out.append("model state (tensor names, shapes or dtypes) differs")
    return out


def check_fingerprint(ckpt: Path, current: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's meta, if it belongs to the run `current` describes; else StateMismatchError
    naming the directory, what differs and the fix."""
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise StateMismatchError(f"{ckpt / 'meta.json'}: unreadable checkpoint metadata ({e}); use a new out_dir "
                                 "or resume=False to start over") from e
    diffs = fingerprint_differences(meta.get("fingerprint"), current)
    if diffs:
        raise StateMismatchError(
            f"{ckpt.parent.parent}: holds checkpoints of another run ({'; '.join(diffs)}); resuming would replace "
            "this model with that run's weights. Use a new out_dir, or pass resume=False to start over in this "
            "directory (its checkpoints and log are then replaced)")
    return meta


def clear_checkpoints(directory: str | Path) -> int:
    """Delete every checkpoint (and unfinished .tmp) under `directory`; returns how many."""
    d = Path(directory)
    if not d.is_dir():
        return 0
    gone = [p for p in d.iterdir() if p.is_dir() and (_NAME.match(p.name) or
                                                      (p.name.endswith(".tmp") and _NAME.match(p.name[:-4])))]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return len(gone)


# ----------------------------------------------------------------------------- optimizer / rng
def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"{idx}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    np_state = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    py = random.getstate()
    meta = {"python": [py[0], list(py[1]), py[2]], "numpy": [np_state[0], int(np_state[2]), int(np_state[3]),
                                                                float(np_state[4])]}
    return tensors, meta


def set_rng_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    v, keys, g = meta["python"]
    random.setstate((v, tuple(keys), g))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))


# ----------------------------------------------------------------------------- save / load
def save_checkpoint(directory: str | Path, *, stage: str, step: int, model: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, meta: dict[str, Any],
                    rank: int = 0, world_size: int = 1, keep: int = 2) -> Path:
    """Write a checkpoint of (stage, step); `meta` holds the driver's JSON state. Returns its path."""
    from ..plan.state import save as lte_save

    root = Path(directory)
    final = root / checkpoint_name(stage, step)
    tmp = root / (final.name + ".tmp")
    rng_t, rng_m = rng_state()
    _barrier(world_size)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(world_size)
    save_file(rng_t, str(tmp / f"rng_rank{rank}.safetensors"))
    rng_metas = _gather_json(rng_m, world_size)
    if rank == 0:
        save_model(model, str(tmp / "model.safetensors"), force_contiguous=True)
        lte_save(model, tmp / "lte", include_model=False)
        opt_t, opt_m = optimizer_to_flat(optimizer)
        save_file(opt_t, str(tmp / "optimizer.safetensors"))
        full = {**meta, "stage": stage, "step": step, "world_size": world_size, "optimizer": opt_m,
                "scheduler": scheduler.state_dict() if scheduler is not None else None, "rng": rng_metas}
        (tmp / "meta.json").write_text(json.dumps(full, indent=1, default=_json_default))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _prune(root, keep)
        logger.info("checkpoint %s", final)
    _barrier(world_size)
    return final


def load_checkpoint(path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    scheduler: Any, rank: int = 0) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and this rank's RNG; return the JSON meta."""
    src = Path(path)
    meta = json.loads((src / "meta.json").read_text())
    missing, unexpected = load_model(model, str(src / "model.safetensors"), strict=False)
    if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
        raise StateMismatchError(f"{src}: checkpoint does not fit the model (missing {missing}, unexpected "
                                 f"{unexpected}); use a new out_dir or resume=False")
    if optimizer is not None:
        optimizer_from_flat(optimizer, load_file(str(src / "optimizer.safetensors")), meta["optimizer"])
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(meta["scheduler"])
    rng_file = src / f"rng_rank{rank}.safetensors"
    if rng_file.exists():
        set_rng_state(load_file(str(rng_file)), meta["rng"][rank])
    return meta


def _prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    found = sorted((_STAGE_ORDER[m.group(1)], int(m.group(2)), p) for p in root.iterdir() if (m := _NAME.match(p.name)))
    for *_, p in found[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def _json_default(o: Any) -> Any:
    if isinstance(o, Tensor):
        return o.item() if o.numel() == 1 else o.tolist()
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"cannot store {type(o).__name__} in checkpoint JSON")


def _barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def _gather_json(obj: Any, world_size: int) -> list[Any]:
    if world_size == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, json.loads(json.dumps(obj)))
    return out
