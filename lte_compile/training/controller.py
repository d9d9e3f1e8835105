"""Target-sparsity controller: steer the routers' bias so hard-mode FFN sparsity lands on a target.

Why the bias and not eta (measured on the small LMs, 6.3M parameters): L_sep makes the gates nearly binary
within ~25 stage-1 steps and freezes the router's initial on/off split; eta moves sparsity only
once it is large, and sparsity below the initial split is out of reach for eta >= 0. A shift
delta added to every router bias moves every gate logit by delta, so the fraction of gates at or
below tau is a monotone function of delta and can be set directly:

    delta = logit(tau) - logit(q),   q = the target-quantile of the observed gates

makes exactly a `target` fraction of the observed (token, expert) pairs fall at or below tau.
One shared delta for all layers sets the overall sparsity and leaves the per-layer differences
to the routers (LTE's point: layers need different numbers of experts).

Three uses, all through `apply_shift`:
- `warm_start`: before stage 1, on a few batches: the start is already at the target.
- `step` during stage 1: a damped quantile step (`gain` of the full step) on each batch's gates,
  so the routers' own drift (eta pulls gates down) is corrected as it happens.
- `calibrate`: on held-out data in hard mode, a few undamped quantile steps until the measured
  sparsity is within `tolerance / 2` (layers interact in hard mode, so it iterates).
Under DDP each rank computes its delta on its own shard and the mean is applied everywhere,
so the routers stay identical across ranks.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from ..errors import ConfigError

logger = logging.getLogger(__name__)

_G_CLAMP = 1e-6  # keeps logit(G) finite for saturated gates (float32 sigmoid reaches exactly 1.0)


def _logit(p: float | Tensor) -> float | Tensor:
    if isinstance(p, Tensor):
        p = p.clamp(_G_CLAMP, 1 - _G_CLAMP)
        return torch.log(p) - torch.log1p(-p)
    p = min(max(p, _G_CLAMP), 1 - _G_CLAMP)
    return math.log(p) - math.log1p(-p)


def quantile_shift(gates: list[Tensor], target: float, tau: float) -> float:
    """Bias shift that puts a `target` fraction of `gates` (each [N, E], valid tokens only) at or below tau."""
    flat = torch.cat([g.detach().float().reshape(-1) for g in gates])
    if flat.numel() == 0:
        return 0.0
    k = min(max(int(round(target * flat.numel())), 1), flat.numel())
    below = flat.kthvalue(k).values  # the k-th smallest gate becomes the last one off
    above = flat.kthvalue(min(k + 1, flat.numel())).values
    q_logit = 0.5 * (_logit(below) + _logit(above))  # tau goes between the k-th and (k+1)-th gate
    return float(_logit(tau) - q_logit)


@dataclass
class SparsityController:
    """Holds the target and the cumulative bias shift applied to the routers (checkpointed)."""

    target: float
    tolerance: float = 0.02
    gain: float = 0.3
    """Fraction of the full quantile step applied per stage-1 step: < 1 averages batch noise."""
    max_step: float = 2.0
    """Largest shift per stage-1 step, in logit units (guards against a degenerate batch)."""
    shift: float = 0.0
    """Total bias shift applied so far (telemetry and checkpoints)."""
    history: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not (0.0 < self.target < 1.0):
            raise ConfigError("target_sparsity", self.target, "a float in (0, 1) (fraction of FFN experts off)",
                              "use None to set eta by hand instead")
        if not (0.0 < self.tolerance < 0.5):
            raise ConfigError("sparsity_tolerance", self.tolerance, "a float in (0, 0.5)")
        if not (0.0 < self.gain <= 1.0):
            raise ConfigError("controller_gain", self.gain, "a float in (0, 1]")

    @torch.no_grad()
    def apply_shift(self, routers: dict[str, nn.Module], delta: float) -> None:
        """Add delta (logit units) to every router's bias, the same on every rank."""
        delta = _all_reduce_mean(delta)
        for r in routers.values():
            r.linear.bias.add_(delta)
        self.shift += delta

    def step(self, routers: dict[str, nn.Module], gates: list[Tensor], tau: float) -> float:
        """Damped correction from one batch's gates (valid tokens only); returns the shift applied."""
        delta = self.gain * quantile_shift(gates, self.target, tau)
        delta = max(-self.max_step, min(self.max_step, delta))
        self.apply_shift(routers, delta)
        return delta

    def calibrate(self, routers: dict[str, nn.Module], collect: Callable[[], tuple[list[Tensor], float]],
                  tau: float, max_iters: int = 6) -> float:
        """Shift until `collect()` -> (gates, measured sparsity) is within tolerance/2 of the target.

        `collect` runs the held-out batches in the mode being calibrated and returns their valid
        gates and their overall sparsity. Returns the final measured sparsity (after the last shift,
        measured again).
        """
        gates, measured = collect()
        for i in range(max_iters):
            if abs(measured - self.target) <= self.tolerance / 2:
                break
            delta = quantile_shift(gates, self.target, tau)
            self.apply_shift(routers, delta)
            gates, new = collect()
            logger.debug("calibrate %d: sparsity %.4f -> %.4f (shift %+.3f)", i, measured, new, delta)
            measured = new
        self.history.append(measured)
        return measured

    def state_dict(self) -> dict:
        return {"target": self.target, "tolerance": self.tolerance, "gain": self.gain, "shift": self.shift,
                "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.shift, self.history = float(state["shift"]), list(state.get("history", []))


def _all_reduce_mean(x: float) -> float:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()
