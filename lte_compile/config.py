"""`Config`: how `lte.prepare` turns a model's FFNs into LTE experts and routers."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

MODES = ("dense", "soft", "hard")


# ----------------------------------------------------------------------------- field checks
# Shared by Config and training.TrainConfig: types first (a bool is not an int or a float here, a
# string is not a number), then finiteness, then the range. Each failure is a ConfigError naming
# the field.
def check_int(name: str, value: Any, minimum: int | None = None, *, hint: str = "") -> int:
    """`value` must be an int (not a bool) >= `minimum`."""
    allowed = "an integer" + (f" >= {minimum}" if minimum is not None else "")
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        raise ConfigError(name, value, allowed, hint)
    return value


def check_float(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False, optional: bool = False, allowed: str = "",
                hint: str = "") -> float | None:
    """`value` must be a finite real number (int or float, not a bool or a string) in the range;
    None passes when `optional`."""
    if value is None and optional:
        return None
    if not allowed:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low}"
        hi = "" if high is None else f"{high}" + (")" if high_open else "]")
        rng = f" in {lo}, {hi}" if lo and hi else (f" {'>' if low_open else '>='} {low}" if lo else
                                                   (f" {'<' if high_open else '<='} {high}" if hi else ""))
        allowed = ("None or " if optional else "") + "a finite float" + rng
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ConfigError(name, value, allowed, hint)
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(name, value, "True or False")
    return value


def check_choice(name: str, value: Any, choices: tuple, allowed: str = "") -> Any:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(name, value, allowed or f"one of {choices}")
    return value


def check_path(name: str, value: Any, *, optional: bool = True) -> str | None:
    """A directory name as str (a str or os.PathLike), or None when `optional`."""
    if value is None and optional:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise ConfigError(name, value, ("None or " if optional else "") + "a directory path (str or pathlib.Path)")
    return value


@dataclass
class Config:
    """Options of `lte.prepare`. Saved with the LTE state (`VERSION` guards the format)."""

    VERSION = 1

    expert_size: int = 32
    """Neurons per expert (B). 32 is the paper's choice: a 32-row block of a bf16 4096-wide
    weight is 256 KiB, large enough for full-bandwidth reads, small enough for fine sparsity."""

    tau: float = 0.5
    """Router threshold: expert e is active for token x iff sigmoid(router(x))_e > tau."""

    kmeans_iters: int = 20
    """Balanced k-means iterations used to group neurons into experts."""

    seed: int = 0
    """Seed for k-means initialisation and router initialisation (prepare is deterministic)."""

    router_init_std: float | None = None
    """Std of the router weight init; None means 1/sqrt(d_model) (PyTorch's Linear scale)."""

    router_bias_init: float = 0.0
    """Initial router bias: sigmoid(bias) is the initial gate level. >0 starts with most experts
    on, <0 with most off (the training driver's target-sparsity controller may steer it)."""

    on_unsupported: str = "skip"
    """'skip': leave an FFN that cannot be made sparse dense, with a warning naming the reason.
    'error': raise UnsupportedFFNError instead."""

    kernel_layout: bool = True
    """Store each FFN's W_down (and Conv1D W_up) column-major so every neuron's weights are one
    contiguous row for the sparse kernels (shapes and values unchanged; see plan.kernel_layout_)."""

    mode: str = "dense"
    """Mode right after prepare: 'dense' (the original FFN), 'soft' (stage 1) or 'hard' (stage 2)."""

    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form metadata saved with the state (e.g. training settings)."""

    def __post_init__(self) -> None:
        """Types first (bool is not an int; "0.5" is not a float), then finiteness and ranges."""
        if isinstance(self.expert_size, bool) or not isinstance(self.expert_size, int) or self.expert_size <= 0:
            raise ConfigError("expert_size", self.expert_size, "an integer > 0", "32 is the paper's default")
        self.tau = check_float("tau", self.tau, low=0.0, high=1.0, low_open=True, high_open=True,
                               allowed="a float in (0, 1) (a sigmoid output threshold)", hint="0.5 is the paper's default")
        check_int("kmeans_iters", self.kmeans_iters, 0)
        check_int("seed", self.seed)
        self.router_init_std = check_float("router_init_std", self.router_init_std, low=0.0, optional=True)
        self.router_bias_init = check_float("router_bias_init", self.router_bias_init,
                                            hint="sigmoid(bias) is the initial gate level; 0.0 starts at 0.5")
        check_choice("on_unsupported", self.on_unsupported, ("skip", "error"), "'skip' or 'error'")
        check_bool("kernel_layout", self.kernel_layout)
        check_choice("mode", self.mode, MODES)
        if not isinstance(self.extra, dict):
            raise ConfigError("extra", self.extra, "a dict")

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        data = dict(data)
        version = data.pop("version", None)
        if version != cls.VERSION:
            raise ConfigError("version", version, f"{cls.VERSION}", "the state was saved by another lte_compile version")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError("config keys", sorted(unknown), f"a subset of {sorted(known)}")
        return cls(**data)

