"""The `lte` custom ops: the only place ops are registered.

- `lte::sparse_ffn(x, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, act, expert_size, mode, tau)`
  the whole LTE FFN (contract in `reference.py`); what the backend rewrites FFN regions into.
- `lte::apply_gates(h, gates, expert_size, mode, tau)`: scales the intermediate activations
  per expert. `lte.prepare` puts it in the eager forward, so every Dynamo/export graph of a
  prepared model carries an unambiguous marker between the activation and the down projection.

NaN policy: the op gives what the eager FFN gives. Eager hard mode multiplies h by the 0/1 mask,
so a non-finite value in a token's x makes its whole output row NaN (NaN * 0 = NaN), even with every
expert off; kernels skip off experts and would return b_down there. `sparse_ffn` therefore sets the
rows whose x has a NaN/Inf to NaN after the kernel (one pass over x; `_nan_rows_like_eager`).

Both are `custom_op`s with a fake (shapes static: no data-dependent size reaches Dynamo) and an
autograd formula for soft and hard mode. In hard mode the 0/1 mask has no gradient w.r.t. the gates
(stage 2 freezes the routers); in soft mode the gates get d(loss)/d(G).
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import dispatch
from .reference import ACTIVATIONS, MODES, activation, activation_backward, apply_gates_reference

__all__ = ["ACTIVATIONS", "MODES", "ApplyGatesArgs", "apply_gates", "sparse_ffn"]


def _check_sparse_ffn_args(x, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, act, expert_size, mode):
    torch._check(x.dim() == 2, lambda: f"lte::sparse_ffn: x must be [T, d], got {tuple(x.shape)}")
    torch._check(gates.dim() == 2, lambda: f"lte::sparse_ffn: gates must be [T, E], got {tuple(gates.shape)}")
    n, d = w_up.shape
    torch._check(x.shape[1] == d, lambda: f"lte::sparse_ffn: x has d={x.shape[1]} but w_up is {tuple(w_up.shape)}")
    torch._check(gates.shape[0] == x.shape[0], lambda: "lte::sparse_ffn: gates and x differ in T")
    torch._check(expert_size > 0, lambda: f"lte::sparse_ffn: expert_size must be > 0, got {expert_size}")
    torch._check(gates.shape[1] * expert_size == n,
                 lambda: f"lte::sparse_ffn: E*B = {gates.shape[1]}*{expert_size} != N = {n} rows of w_up")
    torch._check(w_down.shape[0] == n, lambda: f"lte::sparse_ffn: w_down must be [N={n}, d_out], got {tuple(w_down.shape)}")
    if w_gate is not None:
        torch._check(w_gate.shape == w_up.shape, lambda: "lte::sparse_ffn: w_gate and w_up differ in shape")
    torch._check(act in ACTIVATIONS, lambda: f"lte::sparse_ffn: unknown act {act!r}, not one of {ACTIVATIONS}")
    torch._check(mode in MODES, lambda: f"lte::sparse_ffn: mode must be one of {MODES}, got {mode!r}")


def _args_ok(x, gates, w_up, w_gate, w_down, act, expert_size, mode) -> bool:
    """`_check_sparse_ffn_args`'s conditions as one expression on concrete shapes: the eager hot
    path (a tenth of the torch._check calls' cost); the full check runs only to name a failure."""
    xs, gs, us = x.shape, gates.shape, w_up.shape
    return (len(xs) == 2 and len(gs) == 2 and len(us) == 2 and xs[1] == us[1] and gs[0] == xs[0]
            and expert_size > 0 and gs[1] * expert_size == us[0] and w_down.shape[0] == us[0]
            and (w_gate is None or w_gate.shape == us) and act in ACTIVATIONS and mode in MODES)


@torch.library.custom_op("lte::sparse_ffn", mutates_args=())
def sparse_ffn(x: Tensor, gates: Tensor, w_up: Tensor, w_gate: Tensor | None, w_down: Tensor,
               b_up: Tensor | None, b_gate: Tensor | None, b_down: Tensor | None,
               act: str, expert_size: int, mode: str, tau: float) -> Tensor:
    """LTE FFN over the experts selected by `gates` (see kernels/reference.py for the contract)."""
    if not _args_ok(x, gates, w_up, w_gate, w_down, act, expert_size, mode):
        _check_sparse_ffn_args(x, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, act, expert_size, mode)
    y = dispatch.sparse_ffn_forward(x, gates, w_up, w_gate, w_down, b_up, b_gate, b_down,
                                    act, expert_size, mode, tau)
    return _nan_rows_like_eager(x, y)


def _nan_rows_like_eager(x: Tensor, y: Tensor) -> Tensor:
    """Rows of y whose x has a NaN/Inf become NaN, as in eager (h * mask, NaN * 0 = NaN)."""
    if x.device.type == "cpu" and math.isfinite(x.sum().item()):
        # The common case on the hot path: one reduction and no copy of y (reading the flag costs
        # no device sync on the CPU). A finite x whose sum overflows takes the exact path below.
        return y
    bad = ~torch.isfinite(x).all(dim=-1, keepdim=True)  # [T, 1]
    return y.masked_fill(bad, float("nan"))


@sparse_ffn.register_fake
def _(x, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, act, expert_size, mode, tau):
    _check_sparse_ffn_args(x, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, act, expert_size, mode)
    return x.new_empty(x.shape[0], w_down.shape[1])


def _sparse_ffn_setup(ctx, inputs, output):
    x, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, act, expert_size, mode, tau = inputs
    ctx.save_for_backward(x, gates, w_up, w_gate, w_down, b_up, b_gate)
    ctx.act, ctx.expert_size, ctx.mode, ctx.tau = act, expert_size, mode, tau
    ctx.has_b_down = b_down is not None


def _sparse_ffn_backward(ctx, dy):
    """Recomputes the hidden activations (cheap next to storing [T, N]) and applies the chain rule."""
    x, gates, w_up, w_gate, w_down, b_up, b_gate = ctx.saved_tensors
    act, B = ctx.act, ctx.expert_size
    T, E = gates.shape
    a_up = torch.nn.functional.linear(x, w_up, b_up)  # [T, N]
    a_gate = None if w_gate is None else torch.nn.functional.linear(x, w_gate, b_gate)
    h = activation(act, a_up) if a_gate is None else activation(act, a_gate) * a_up
    gated = lambda t: apply_gates_reference(t, gates, B, ctx.mode, ctx.tau)  # noqa: E731  [T, N] scaled per expert
    d_hs = dy @ w_down.t()  # [T, N]
    dw_down = gated(h).t() @ dy  # [N, d_out]
    db_down = dy.sum(0) if ctx.has_b_down else None
    d_gates = None
    if ctx.mode == "soft":
        d_gates = (d_hs * h).reshape(T, E, B).sum(-1).to(gates.dtype)
    dh = gated(d_hs)
    if a_gate is None:
        d_up, d_gate = activation_backward(act, dh, a_up), None
    else:
        d_up = dh * activation(act, a_gate)
        d_gate = activation_backward(act, dh * a_up, a_gate)
    dx = d_up @ w_up
    dw_up, db_up = d_up.t() @ x, (d_up.sum(0) if b_up is not None else None)
    dw_gate = db_gate = None
    if d_gate is not None:
        dx = dx + d_gate @ w_gate
        dw_gate = d_gate.t() @ x
        db_gate = d_gate.sum(0) if b_gate is not None else None
    return dx, d_gates, dw_up, dw_gate, dw_down, db_up, db_gate, db_down, None, None, None, None


sparse_ffn.register_autograd(_sparse_ffn_backward, setup_context=_sparse_ffn_setup)


class ApplyGatesArgs(NamedTuple):
    """The argument layout of `lte::apply_gates(h, gates, expert_size, mode, tau)`, by name.

    Passes that find the marker in an FX graph decode its arguments here instead of by position:
    `ApplyGatesArgs.from_node(node)` (or `.from_node_args(node.args, node.kwargs)`). `h` and
    `gates` are whatever the node carries (fx Nodes in a graph, tensors in a call).
    """

    h: Any
    gates: Any
    expert_size: int
    mode: str
    tau: float

    @classmethod
    def from_node_args(cls, args: tuple, kwargs: dict | None = None) -> "ApplyGatesArgs":
        """Positional `args` then keyword `kwargs` (an fx node's `.args` / `.kwargs`) -> fields."""
        kwargs = dict(kwargs or {})
        if len(args) > len(cls._fields):
            raise TypeError(f"lte::apply_gates takes {len(cls._fields)} arguments, got {len(args)}")
        values = dict(zip(cls._fields, args))
        for name, value in kwargs.items():
            if name not in cls._fields:
                raise TypeError(f"lte::apply_gates has no argument {name!r} (arguments: {cls._fields})")
            if name in values:
                raise TypeError(f"lte::apply_gates: argument {name!r} given twice")
            values[name] = value
        missing = [f for f in cls._fields if f not in values]
        if missing:
            raise TypeError(f"lte::apply_gates: missing arguments {missing}")
        return cls(**values)

    @classmethod
    def from_node(cls, node) -> "ApplyGatesArgs":
        """The arguments of an fx node calling `torch.ops.lte.apply_gates` (any overload)."""
        return cls.from_node_args(tuple(node.args), dict(node.kwargs))


@torch.library.custom_op("lte::apply_gates", mutates_args=())
def apply_gates(h: Tensor, gates: Tensor, expert_size: int, mode: str, tau: float) -> Tensor:
    """h: [..., E*B], gates: [..., E] -> h scaled by the gate (soft) or the mask gates > tau (hard)."""
    return apply_gates_reference(h, gates, expert_size, mode, tau)


@apply_gates.register_fake
def _(h, gates, expert_size, mode, tau):
    torch._check(h.shape[-1] == gates.shape[-1] * expert_size,
                 lambda: f"lte::apply_gates: h has {h.shape[-1]} neurons, gates {gates.shape[-1]} experts of {expert_size}")
    torch._check(mode in MODES, lambda: f"lte::apply_gates: mode must be one of {MODES}, got {mode!r}")
    return torch.empty_like(h)


def _apply_gates_setup(ctx, inputs, output):
    h, gates, expert_size, mode, tau = inputs
    ctx.save_for_backward(h, gates)
    ctx.expert_size, ctx.mode, ctx.tau = expert_size, mode, tau


def _apply_gates_backward(ctx, dy):
    h, gates = ctx.saved_tensors
    B = ctx.expert_size
    dh = apply_gates_reference(dy, gates, B, ctx.mode, ctx.tau)
    d_gates = None
    if ctx.mode == "soft":
        d_gates = (dy * h).unflatten(-1, (gates.shape[-1], B)).sum(-1).to(gates.dtype)
    return dh, d_gates, None, None, None


apply_gates.register_autograd(_apply_gates_backward, setup_context=_apply_gates_setup)


# ----------------------------------------------------------------------------- autocast
def _register_autocast(device_type: str) -> None:
    """Autocast for `lte::sparse_ffn` like the linear ops it replaces: inside
    `torch.autocast(device_type, dtype=D)` its floating inputs are cast to D (the region's dtype,
    read at call time, as `F.linear` does) and it runs with autocast off; the output is D.

    The same mechanism as `torch.library.register_autocast` (a Python kernel for the Python
    dispatcher used while tracing, plus a dispatcher registration for eager calls), which only
    takes one fixed dtype; where the private pieces are missing (another torch version) it
    falls back to that public call with the device's default autocast dtype."""
    if not torch.amp.is_autocast_available(device_type):
        return
    try:
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        key = getattr(torch._C.DispatchKey, key_name)
        overload = torch.ops.lte.sparse_ffn.default
        exclude = torch._C.DispatchKeySet(key)
    except (AttributeError, RuntimeError):
        default = torch.bfloat16 if device_type == "cpu" else torch.float16
        torch.library.register_autocast("lte::sparse_ffn", device_type, default)
        return

    def cast_and_call(*args):
        dtype = torch.get_autocast_dtype(device_type)
        cast = [a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() and a.device.type == device_type
                else a for a in args]
        with torch._C._ExcludeDispatchKeyGuard(exclude):
            return overload(*cast)

    if overload.has_kernel_for_dispatch_key(key):
        overload.py_kernels.pop(key, None)
    overload.py_impl(key)(cast_and_call)
    _AUTOCAST_LIB.impl("sparse_ffn", lambda _keyset, *args: cast_and_call(*args), key_name, with_keyset=True)


_AUTOCAST_LIB = torch.library.Library("lte", "IMPL")
for _device_type in ("cpu", "cuda"):
    _register_autocast(_device_type)
