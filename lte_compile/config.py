"""`Config`: how `lte.prepare` turns a model's FFNs into LTE experts and routers."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

MODES = ("dense", "soft", "hard")


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
        if not isinstance(self.expert_size, int) or self.expert_size <= 0:
            raise ConfigError("expert_size", self.expert_size, "an integer > 0", "32 is the paper's default")
        if not (0.0 < float(self.tau) < 1.0):
            raise ConfigError("tau", self.tau, "a float in (0, 1) (a sigmoid output threshold)", "0.5 is the paper's default")
        if self.kmeans_iters < 0:
            raise ConfigError("kmeans_iters", self.kmeans_iters, "an integer >= 0")
        if self.router_init_std is not None and self.router_init_std < 0:
            raise ConfigError("router_init_std", self.router_init_std, "None or a float >= 0")
        if self.on_unsupported not in ("skip", "error"):
            raise ConfigError("on_unsupported", self.on_unsupported, "'skip' or 'error'")
        if self.mode not in MODES:
            raise ConfigError("mode", self.mode, f"one of {MODES}")

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

