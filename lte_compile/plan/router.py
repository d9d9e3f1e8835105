"""`LTERouter`: the per-FFN router module, and the two forward hooks that make an FFN an LTE FFN.

`lte.prepare` attaches one router per FFN as `<ffn owner>.lte_router` (ordinary parameters, so
state_dict, `.to()`, DDP/FSDP and checkpoints just work) and registers:
- on the up projection module, a forward hook computing G = sigmoid(router(x)) from its input x;
- on the down projection module, a forward pre-hook scaling its input h by `lte::apply_gates`.
The hooks keep the user's modules and their code unchanged, work for FFNs split across modules
(BERT) or with no FFN module at all (OPT), and leave an `lte.apply_gates` marker in every traced
graph that the backend's rewrite turns into one `lte::sparse_ffn` op.
An FFN computed on parameters (F.linear, @, einsum: no projection modules to hook) gets the same two
steps as calls, `route_ffn_input` and `gate_ffn_hidden`, inside its module's rewritten forward
(plan/functional.py).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..kernels import ops as _ops  # noqa: F401  (registers torch.ops.lte.*)
from .spec import FFNSpec


def _router_dtype(dtype: torch.dtype | None) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class LTERouter(nn.Module):
    """Router of one FFN: G(x) = sigmoid(linear(x)) in (0, 1)^E; expert e active iff G_e > tau.

    `last_gates` holds G of the latest forward ([..., E]; differentiable in soft mode) for the
    training losses; `mode` is 'dense' (router unused), 'soft' (scale by G) or 'hard' (mask G > tau).
    `permutation[i]` is the original index of neuron i (prepare made experts contiguous).

    The router's weights stay float32 in a bf16/fp16 model (`.to(torch.bfloat16)` leaves them):
    the threshold decision G > tau is precision-sensitive, the weights are small (d x E), and a
    bf16 GEMV of this shape is slow on CPUs (16 % of a 7B FFN layer, benchmarks/RESULTS.md).
    """

    def __init__(self, spec: FFNSpec, expert_size: int, tau: float, *, device=None, dtype=None):
        super().__init__()
        self.spec = spec
        self.expert_size = expert_size
        self.num_experts = spec.d_ff // expert_size
        self._tau = float(tau)
        self._tau_literal = repr(self._tau)  # what compiled graphs read (`_threshold`)
        self.mode = "dense"
        self.observer: Callable[[str, Tensor], None] | None = None
        """Called with ('x', FFN input) and ('h', hidden activations) by a functional FFN's rewritten
        forward in every mode (what hooks on projection modules give `lte.fit_routers`); eager only."""
        self.linear = nn.Linear(spec.d_model, self.num_experts, device=device, dtype=_router_dtype(dtype))
        self.register_buffer("permutation", torch.arange(spec.d_ff, device=device), persistent=True)
        self.last_gates: Tensor | None = None

    @property
    def tau(self) -> float:
        """The threshold, fixed at prepare time (`lte.Config(tau=...)`, owned by `lte.config_of(model)`)."""
        return self._tau

    @tau.setter
    def tau(self, value: float) -> None:
        # Policy (issue 11): refuse, not recompile. Compiled graphs hold tau as a literal inside
        # lte::sparse_ffn (`_threshold`, unguarded), the training losses and statistics read
        # config_of(model).tau, and saved state stores the Config: a change here would be ignored
        # by compiled models and disagree with the rest. A new threshold is a new prepare.
        raise ConfigError("router.tau", value, f"{self._tau} (fixed when the model was prepared)",
                          "tau is part of lte.Config: prepare a fresh model with lte.Config(tau=...) "
                          "(compiled graphs bake the threshold in)")

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., d] -> G: [..., E] (float32, or float64 in a float64 model).

        x is detached: the gate losses train the router, never the model through x. Without it,
        L_eff trains the hidden states to close the gates (W.x far negative, offset by a router-bias
        shift of +68 after the demo's stage 1); stage 2's task loss then undoes that distortion
        while the routers are frozen, and hard-mode sparsity drifted (target 0.75: 0.75 -> 0.02).
        The model still gets the soft-mode task gradient through G * FFN_e(x).
        """
        return torch.sigmoid(self.linear(x.detach().to(self.linear.weight.dtype)))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for p in self.linear.parameters():  # keep the router out of half precision
            if p.dtype != _router_dtype(p.dtype):
                p.data = p.data.to(_router_dtype(p.dtype))
        return self

    def extra_repr(self) -> str:
        return (f"ffn={self.spec.name!r}, experts={self.num_experts}x{self.expert_size}, "
                f"tau={self.tau}, act={self.spec.activation}, glu={self.spec.glu}, mode={self.mode!r}")


class RouteHook:
    """Forward hook on the up projection: its input is the FFN input x; store G(x) on the router.

    A callable object, not a closure, so `copy.deepcopy(model)` rebinds it to the copied router.
    """

    def __init__(self, router: LTERouter):
        self.router = router

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if self.router.mode != "dense":
            self.router.last_gates = self.router(args[0])


def _threshold(router: LTERouter) -> float:
    """tau as a graph constant: under dynamic=True Dynamo would turn a float attribute into a graph
    input, and the fused op needs the threshold as a literal. A string attribute is always a
    constant to Dynamo (guarded by value), and float() of a constant folds; this works on every
    torch >= 2.11 (`assume_constant_result` on a module argument fails to trace on 2.11)."""
    return float(router._tau_literal)


class GateHook:
    """Forward pre-hook on the down projection: scale its input h ([..., E*B]) per expert."""

    def __init__(self, router: LTERouter):
        self.router = router

    def __call__(self, module: nn.Module, args: tuple):
        r = self.router
        if r.mode == "dense":
            return None
        h = torch.ops.lte.apply_gates(args[0], r.last_gates, r.expert_size, r.mode, _threshold(r))
        return (h, *args[1:])


# ----------------------------------------------------------------------------- functional FFNs
# What the hooks do, as functions: the forward lte.prepare generates for a module that computes its
# FFN with F.linear/@/einsum on parameters (plan/functional.py) calls them at the same two points.
def route_ffn_input(router: LTERouter, x: Tensor) -> Tensor | None:
    """G = router(x) stored as `last_gates` (for lte.gates and the losses); None in dense mode."""
    if router.observer is not None:
        router.observer("x", x)
    if router.mode == "dense":
        return None
    router.last_gates = router(x)
    return router.last_gates


def gate_ffn_hidden(router: LTERouter, h: Tensor, gates: Tensor | None) -> Tensor:
    """h scaled per expert by `lte::apply_gates` (the backend's marker); h itself in dense mode.

    Gates follow x's leading dims; an FFN that flattened its tokens (`x.view(-1, d) @ w.t()`) has h
    with the same tokens in another shape, so the gates take h's leading dims."""
    if router.observer is not None:
        router.observer("h", h)
    if router.mode == "dense" or gates is None:
        return h
    if gates.shape[:-1] != h.shape[:-1]:
        gates = gates.reshape(*h.shape[:-1], gates.shape[-1])
    return torch.ops.lte.apply_gates(h, gates, router.expert_size, router.mode, _threshold(router))
