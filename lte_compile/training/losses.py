"""LTE loss terms and gate statistics, for any training loop.

Stage 1 trains the model and the routers on `task + eta * L_eff + lam * L_sep`:

- `L_eff` = mean over layers of (mean over valid tokens and experts of G^2): pushes gates down,
  so experts that do not help the task switch off (the paper's efficiency loss).
- `L_sep` = mean over layers of (mean over valid tokens and experts of 1 / ((G - tau)^2 + eps)):
  pushes gates away from tau, so the soft model of stage 1 behaves like the 0/1 mask of stage 2.
  The paper writes it without `eps`; it diverges at G = tau. `eps` (default 1e-2) bounds it at
  1/eps = 100 there and bounds its gradient (largest, about 650, at |G - tau| = sqrt(eps/3));
  at saturated gates (G near 0 or 1, tau 0.5) it is about 1/(0.25 + eps) = 3.85, its minimum.

Optional, both stages: `kd_loss`, logit distillation from a frozen dense teacher
(`TrainConfig.kd_weight`), added to the objective as `kd_weight * KD`.

Padding tokens get gates too (routers run on every token); `attention_mask` ([b, s], 1 = real token)
removes them from every mean and count. Plain PyTorch loop::

    lte.set_mode(model, "soft")
    out = model(**batch)
    terms = lte_compile.training.losses.loss_terms(model, out.loss, eta=1.0, attention_mask=batch["attention_mask"])
    terms.total.backward()          # task + eta * eff + lam * sep
    stats = gate_stats(lte.gates(model), tau=0.5, attention_mask=batch["attention_mask"])
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import NotPreparedError
from ..plan import config_of, routers

DEFAULT_LAMBDA = 0.5
DEFAULT_EPS = 1e-2


@dataclass
class LossTerms:
    """The stage-1 objective and its parts (scalar tensors; `total` is differentiable)."""

    total: Tensor
    task: Tensor
    eff: Tensor
    """L_eff, unweighted."""
    sep: Tensor
    """L_sep, unweighted."""
    eta: float
    lam: float

    def as_floats(self) -> dict[str, float]:
        return {"loss": float(self.total.detach()), "task": float(self.task), "eff": float(self.eff), "sep": float(self.sep),
                "eta": self.eta, "lam": self.lam}


def token_mask(gates: Tensor, attention_mask: Tensor | None) -> Tensor | None:
    """attention_mask reshaped to the gates' token dims ([...] of G: [..., E]), as bool; None if absent."""
    if attention_mask is None:
        return None
    tokens = gates.shape[:-1]
    if attention_mask.numel() != tokens.numel():
        raise ValueError(f"attention_mask has {attention_mask.numel()} entries but the gates have {tokens.numel()} "
                         f"tokens (gates {tuple(gates.shape)}); pass the mask of the batch that produced the gates")
    return attention_mask.reshape(tokens).to(device=gates.device, dtype=torch.bool)


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of values [..., E] over valid tokens and all experts."""
    if mask is None:
        return values.mean()
    w = mask.unsqueeze(-1).to(values.dtype)
    return (values * w).sum() / (w.sum() * values.shape[-1]).clamp_min(1.0)


def efficiency_loss(gates: dict[str, Tensor], attention_mask: Tensor | None = None) -> Tensor:
    """L_eff = mean over layers of mean(G^2) over valid tokens and experts."""
    _check_gates(gates)
    return torch.stack([_masked_mean(g.float() ** 2, token_mask(g, attention_mask)) for g in gates.values()]).mean()


def separability_loss(gates: dict[str, Tensor], tau: float = 0.5, eps: float = DEFAULT_EPS,
                      attention_mask: Tensor | None = None) -> Tensor:
    """L_sep = mean over layers of mean(1 / ((G - tau)^2 + eps)) over valid tokens and experts."""
    _check_gates(gates)
    terms = [_masked_mean(1.0 / ((g.float() - tau) ** 2 + eps), token_mask(g, attention_mask)) for g in gates.values()]
    return torch.stack(terms).mean()


def loss_terms(model: nn.Module, task_loss: Tensor, *, eta: float, lam: float = DEFAULT_LAMBDA,
               eps: float = DEFAULT_EPS, attention_mask: Tensor | None = None) -> LossTerms:
    """Stage-1 LTE objective from the gates of the model's latest forward (soft mode).

    `task_loss` is the forward's task loss (LM or classification). Returns `LossTerms` whose
    `total = task + eta * L_eff + lam * L_sep`. Raises NotPreparedError if `model` has no routers,
    or if no router ran in the last forward (model in dense mode).
    """
    rs = routers(model)
    if not rs:
        raise NotPreparedError(f"{type(model).__name__} has no LTE routers: call lte.prepare(model, lte.Config()) first")
    gates = {k: r.last_gates for k, r in rs.items() if r.last_gates is not None}
    if not gates:
        raise NotPreparedError("no router produced gates in the last forward: call lte.set_mode(model, 'soft') "
                               "before the forward (dense mode skips the routers)")
    tau = config_of(model).tau
    eff = efficiency_loss(gates, attention_mask)
    sep = separability_loss(gates, tau, eps, attention_mask)
    total = task_loss + eta * eff + lam * sep
    return LossTerms(total=total, task=task_loss.detach(), eff=eff.detach(), sep=sep.detach(), eta=eta, lam=lam)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
            attention_mask: Tensor | None = None) -> Tensor:
    """Logit distillation: T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over
    positions (valid tokens when `attention_mask` [b, s] is given; rows of [b, C] classification
    logits otherwise). T^2 keeps the gradient's scale independent of T (Hinton et al.). Zero when
    the student's logits equal the teacher's; the teacher gets no gradient."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: distil from a model with the same outputs")
    log_p_s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = torch.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    per_position = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)  # [...]
    mask = None
    if attention_mask is not None and attention_mask.numel() == per_position.numel():
        mask = attention_mask.reshape(per_position.shape).to(per_position.device, torch.bool)
    mean = per_position.mean() if mask is None else \
        (per_position * mask).sum() / mask.sum().clamp_min(1)
    return temperature ** 2 * mean


@dataclass
class GateStats:
    """Counts behind the sparsity telemetry, per layer: summable across batches and ranks."""

    off: dict[str, float]
    """(token, expert) pairs with G <= tau (expert off), valid tokens only."""
    total: dict[str, float]
    """(token, expert) pairs counted: valid tokens x E."""
    tokens: dict[str, float]
    """valid tokens."""

    def sparsity(self) -> dict[str, float]:
        """Per layer: fraction of experts off."""
        return {k: self.off[k] / max(self.total[k], 1.0) for k in self.off}

    def overall(self) -> float:
        """Fraction of all (token, expert) pairs off, all layers together (FFN sparsity)."""
        return sum(self.off.values()) / max(sum(self.total.values()), 1.0)

    def active_per_token(self) -> dict[str, float]:
        """Per layer: mean number of active experts per token."""
        return {k: (self.total[k] - self.off[k]) / max(self.tokens[k], 1.0) for k in self.off}

    def merge(self, other: "GateStats") -> "GateStats":
        keys = set(self.off) | set(other.off)
        add = lambda a, b: {k: a.get(k, 0.0) + b.get(k, 0.0) for k in sorted(keys)}  # noqa: E731
        return GateStats(add(self.off, other.off), add(self.total, other.total), add(self.tokens, other.tokens))

    def to_tensor(self) -> Tensor:
        keys = sorted(self.off)
        return torch.tensor([[self.off[k], self.total[k], self.tokens[k]] for k in keys], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, keys: list[str], t: Tensor) -> "GateStats":
        keys = sorted(keys)
        return cls(*({k: float(t[i, j]) for i, k in enumerate(keys)} for j in range(3)))


@torch.no_grad()
def gate_stats(gates: dict[str, Tensor], tau: float, attention_mask: Tensor | None = None) -> GateStats:
    """Per-layer counts of off experts (G <= tau), pairs and tokens, padding excluded.

    NaN policy: a token with a non-finite gate (NaN: its input had a NaN) is neither on nor off;
    it is left out of every count, like padding, so statistics never count NaN as a number (the
    hard mask `G > tau` would call it off; the FFN output of such a token is NaN anyway).
    """
    off, total, tokens = {}, {}, {}
    for k, g in gates.items():
        mask = token_mask(g, attention_mask)
        valid = torch.isfinite(g).all(dim=-1)
        valid = valid if mask is None else valid & mask
        n_tok = float(valid.sum())
        is_off = (g <= tau) & valid.unsqueeze(-1)
        off[k], total[k], tokens[k] = float(is_off.sum()), n_tok * g.shape[-1], n_tok
    return GateStats(off, total, tokens)


def _check_gates(gates: dict[str, Tensor]) -> None:
    if not gates:
        raise NotPreparedError("no gates: the model has no LTE routers, or ran in dense mode")


def valid_gates(model: nn.Module, attention_mask: Tensor | None) -> dict[str, Tensor]:
    """Each router's last gates as [N valid tokens, E] (detached): padding and tokens with a
    non-finite gate (see `gate_stats`) left out."""
    out = {}
    for k, r in routers(model).items():
        g = r.last_gates
        if g is None:
            continue
        mask = token_mask(g, attention_mask)
        g = g.detach().reshape(-1, g.shape[-1])
        keep = torch.isfinite(g).all(dim=-1)
        if mask is not None:
            keep &= mask.reshape(-1)
        out[k] = g[keep]
    return out
