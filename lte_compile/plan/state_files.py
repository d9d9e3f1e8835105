"""Reading a saved LTE state directory (`lte.load`'s first half): every file, key, field and type
checked, nothing unpickled; errors are `StateFileError`s naming the file. The layout of the
directory and its format versions are defined here; `state.py` writes and applies it."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file
from torch import Tensor

from ..config import MODES, Config
from ..errors import StateFileError
from .prepare import _init_router
from .router import LTERouter
from .spec import FFNSpec

CONFIG_FILE, STATE_FILE, MODEL_FILE = "lte_config.json", "lte_state.safetensors", "model.safetensors"
FORMAT = 3  # 2: FFN projections as nested records (passes.ffn.ProjectionSpec); 3: + checksum, fingerprints, layer lists
READS = (2, 3)
FINGERPRINT_ROWS = 8  # neurons per projection whose (sum, norm) the fingerprint records
FINGERPRINT_RTOL = 2e-2  # of the row norm: survives a bf16/fp16 round trip, tells different rows apart
PERMUTATION_DTYPES = (torch.int64, torch.int32)
ROUTER_DTYPES = (torch.float32, torch.float64)


def _bad(path: Path, what: str) -> StateFileError:
    return StateFileError(f"{path}: {what}; write the directory again with lte.save(model, dir)")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _read_meta(src: Path) -> dict:
    """The JSON, fully type-checked: {config, specs, mode, includes_model, fingerprints, layer_lists, ...}."""
    path = src / CONFIG_FILE
    if not src.is_dir():
        raise StateFileError(f"{src} is not a directory of LTE state; write one with lte.save(model, dir)")
    for f in (CONFIG_FILE, STATE_FILE):
        if not (src / f).is_file():
            raise StateFileError(f"{src / f} is missing: {src} holds no complete LTE state ({CONFIG_FILE} and "
                                 f"{STATE_FILE} expected); write one with lte.save(model, dir)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(path, f"not readable JSON ({e})") from e
    if not isinstance(meta, dict):
        raise _bad(path, f"expected a JSON object, found {type(meta).__name__}")
    fmt = meta.get("format")
    if not _is_int(fmt) or fmt not in READS:
        raise _bad(path, f"format {fmt!r}, this lte_compile reads formats {READS}")
    required = {"model_class": str, "mode": str, "config": dict, "ffns": list, "includes_model": bool}
    if fmt >= 3:
        required.update(state_sha256=str, fingerprints=dict, layer_lists=dict)
    for key, typ in required.items():
        if not isinstance(meta.get(key), typ):
            raise _bad(path, f"field {key!r} is {meta.get(key)!r}, expected a {typ.__name__}")
    if meta["mode"] not in (*MODES, "mixed"):
        raise _bad(path, f"mode {meta['mode']!r} is not one of {MODES}")
    try:
        config = Config.from_dict(meta["config"])
    except Exception as e:  # ConfigError, or a TypeError/ValueError from a wrong type
        raise _bad(path, f"invalid config ({e})") from e
    if not meta["ffns"]:
        raise _bad(path, "the FFN list is empty")
    specs = [_parse_spec(path, i, d, config) for i, d in enumerate(meta["ffns"])]
    try:  # the Config fields attach_router uses (seed, init std, tau) work: no error after the first change
        _init_router(LTERouter(specs[0], config.expert_size, config.tau), config)
    except Exception as e:
        raise _bad(path, f"invalid config ({type(e).__name__}: {e})") from e
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise _bad(path, f"FFN names repeat: {names}")
    per_ffn = [{p.weight for p in s.projections().values()} for s in specs]
    if len(set().union(*per_ffn)) != sum(map(len, per_ffn)):
        raise _bad(path, "two FFNs share a weight")
    fps = meta.get("fingerprints")
    if fmt >= 3:
        if set(fps) != set(names):
            raise _bad(path, f"fingerprints cover {sorted(fps)}, the FFNs are {names}")
        for s in specs:
            _check_fingerprint(path, s, fps[s.name])
        if not all(isinstance(k, str) and _is_int(v) and v >= 0 for k, v in meta["layer_lists"].items()):
            raise _bad(path, f"layer_lists {meta['layer_lists']!r}: expected {{path: length >= 0}}")
        if not (len(meta["state_sha256"]) == 64 and all(c in "0123456789abcdef" for c in meta["state_sha256"])):
            raise _bad(path, f"state_sha256 {meta['state_sha256']!r} is not a SHA-256 hex digest")
    return {"format": fmt, "model_class": meta["model_class"], "mode": meta["mode"], "config": config,
            "specs": specs, "includes_model": meta["includes_model"], "fingerprints": fps if fmt >= 3 else None,
            "layer_lists": meta.get("layer_lists", {}) if fmt >= 3 else {},
            "state_sha256": meta.get("state_sha256")}


_SPEC_KEYS = {"name", "up", "gate", "down", "activation", "glu", "d_model", "d_ff", "d_out", "form"}
_PROJ_KEYS = {"weight", "bias", "transposed", "rows", "down"}


def _parse_spec(path: Path, i: int, d: Any, config: Config) -> FFNSpec:
    where = f"FFN #{i}"
    if not isinstance(d, dict) or set(d) != _SPEC_KEYS:
        raise _bad(path, f"{where}: expected an object with keys {sorted(_SPEC_KEYS)}, found {d!r:.200}")
    where = f"FFN {d['name']!r}"
    checks = [(isinstance(d["name"], str), "name is not a string"),
              (isinstance(d["activation"], str), "activation is not a string"),
              (isinstance(d["form"], str), "form is not a string"),
              (isinstance(d["glu"], bool), "glu is not a bool"),
              (all(_is_int(d[k]) and d[k] > 0 for k in ("d_model", "d_ff", "d_out")),
               "d_model, d_ff, d_out must be integers > 0"),
              (d["up"] is not None and d["down"] is not None, "up or down projection missing"),
              (d["glu"] == (d["gate"] is not None), "glu and gate projection disagree")]
    for ok, msg in checks:
        if not ok:
            raise _bad(path, f"{where}: {msg}")
    for role in ("up", "gate", "down"):
        p = d[role]
        if p is None:
            continue
        if not (isinstance(p, dict) and set(p) == _PROJ_KEYS and isinstance(p["weight"], str)
                and (p["bias"] is None or isinstance(p["bias"], str)) and isinstance(p["transposed"], bool)
                and isinstance(p["down"], bool) and p["down"] == (role == "down")
                and (p["rows"] is None or (isinstance(p["rows"], list) and len(p["rows"]) == 2
                                           and all(_is_int(r) for r in p["rows"])
                                           and 0 <= p["rows"][0] < p["rows"][1]
                                           and p["rows"][1] - p["rows"][0] == d["d_ff"]))):
            raise _bad(path, f"{where}: malformed {role} projection {p!r:.200}")
    if d["d_ff"] % config.expert_size:
        raise _bad(path, f"{where}: d_ff={d['d_ff']} is not a multiple of expert_size={config.expert_size}")
    return FFNSpec.from_dict(d)


def _check_fingerprint(path: Path, spec: FFNSpec, fp: Any) -> None:
    roles = set(spec.projections())
    ok = isinstance(fp, dict) and set(fp) == {"rows", *roles} and isinstance(fp["rows"], list) \
        and len(fp["rows"]) <= FINGERPRINT_ROWS and all(_is_int(r) and 0 <= r < spec.d_ff for r in fp["rows"])
    if ok:
        for role in roles:
            rec = fp[role]
            ok = ok and isinstance(rec, dict) and set(rec) == {"sum", "norm"} and all(
                isinstance(rec[k], list) and len(rec[k]) == len(fp["rows"])
                and all(isinstance(v, float) and math.isfinite(v) for v in rec[k]) for k in ("sum", "norm"))
    if not ok:
        raise _bad(path, f"FFN {spec.name!r}: malformed fingerprint {fp!r:.200}")


def _read_state(src: Path, meta: dict) -> dict[str, Tensor]:
    path = src / STATE_FILE
    try:
        data = path.read_bytes()
        state = load_bytes(data)
    except Exception as e:  # OSError, SafetensorError, ...: never a raw library error
        raise _bad(path, f"not a readable safetensors file ({type(e).__name__}: {e})") from e
    expected = {f"{s.name}.{k}" for s in meta["specs"] for k in ("weight", "bias", "permutation")}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise _bad(path, f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    digest = meta["state_sha256"]
    if digest is not None and hashlib.sha256(data).hexdigest() != digest:
        raise _bad(path, f"its SHA-256 differs from the one recorded in {src / CONFIG_FILE} (changed after lte.save, "
                         "or the files come from different saves)")
    return state


def _read_model_file(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise StateFileError(f"{path} is missing, but {path.parent / CONFIG_FILE} says the model weights were saved "
                             "with the state (includes_model); copy the whole directory, or save again")
    try:
        return load_file(str(path))
    except Exception as e:
        raise _bad(path, f"not a readable safetensors file ({type(e).__name__}: {e})") from e


