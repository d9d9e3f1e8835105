"""The `lte` custom ops: the only place ops are registered.

- `lte::sparse_ffn(x, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, act, expert_size, mode, tau)`
  the whole LTE FFN (contract in `reference.py`); what the backend rewrites FFN regions into.
- `lte::sparse_ffn_inference(...)`: the same op for graphs that need no gradient, which is what
  the backend lowers to when the model is compiled under `torch.no_grad()` / `inference_mode()`
  (Dynamo guards on grad mode, so a grad-enabled call recompiles with `lte::sparse_ffn`). It is a
  plain `torch.library` op (define + one kernel + fake), without custom_op's layers (a Python
  autograd kernel, a dynamo-disable wrapper, an output-alias check), which cost 20-80 us per call
  on the machines measured (benchmarks/RESULTS.md): at batch 1 on a 512-wide model, a large share
  of what the sparsity saves.
- `lte::routed_sparse_ffn_inference(x, w_r, b_r, w_up, ..., act, expert_size, tau) -> (y, gates)`:
  the router G = sigmoid(x w_r^T + b_r) and the hard-mode FFN on G in one op (grad-free graphs
  too), returning G as well (the graph stores it as the router's `last_gates`). At batch-1 decode
  on the CPU both run in one C++ call (`dispatch.routed_sparse_ffn_forward`).
- `lte::apply_gates(h, gates, expert_size, mode, tau)`: scales the intermediate activations
  per expert. `lte.prepare` puts it in the eager forward, so every Dynamo/export graph of a
  prepared model carries an unambiguous marker between the activation and the down projection.

NaN policy: the op gives what the eager FFN gives. Eager hard mode multiplies h by the 0/1 mask,
so a non-finite value in a token's x makes its whole output row NaN (NaN * 0 = NaN), even with every
expert off; kernels skip off experts and would return b_down there. Every sparse FFN op therefore
sets the rows whose x has a NaN/Inf to NaN after the kernel (one pass over x;
`reference.nan_rows_like_eager`, applied by `dispatch.sparse_ffn_forward` unless the kernel does it
itself: in C++ for the fused router path, inside the Triton decode kernels).

`sparse_ffn` and `apply_gates` are `custom_op`s with a fake (shapes static: no data-dependent size
reaches Dynamo) and an autograd formula for soft and hard mode; the two inference ops share the
fakes and refuse to run where a gradient could be asked for. In hard mode the 0/1 mask has no gradient w.r.t. the gates
(stage 2 freezes the routers); in soft mode the gates get d(loss)/d(G).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import dispatch
from .reference import ACTIVATIONS, MODES, activation, activation_backward, apply_gates_reference

__all__ = ["ACTIVATIONS", "MODES", "ApplyGatesArgs", "apply_gates", "routed_sparse_ffn_inference", "sparse_ffn",
           "sparse_ffn_inference"]


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


def _args_ok(x, gates_shape, w_up, w_gate, w_down, act, expert_size, mode) -> bool:
    """`_check_sparse_ffn_args`'s conditions as one expression on concrete shapes: the eager hot
    path (a tenth of the torch._check calls' cost); the full check runs only to name a failure."""
    xs, gs, us = x.shape, gates_shape, w_up.shape
    return (len(xs) == 2 and len(gs) == 2 and len(us) == 2 and xs[1] == us[1] and gs[0] == xs[0]
            and expert_size > 0 and gs[1] * expert_size == us[0] and w_down.shape[0] == us[0]
            and (w_gate is None or w_gate.shape == us) and act in ACTIVATIONS and mode in MODES)


def _sparse_ffn_kernel(x: Tensor, gates: Tensor, w_up: Tensor, w_gate: Tensor | None, w_down: Tensor,
                       b_up: Tensor | None, b_gate: Tensor | None, b_down: Tensor | None,
                       act: str, expert_size: int, mode: str, tau: float) -> Tensor:
    """LTE FFN over the experts selected by `gates` (see kernels/reference.py for the contract)."""
    if not _args_ok(x, gates.shape, w_up, w_gate, w_down, act, expert_size, mode):
        _check_sparse_ffn_args(x, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, act, expert_size, mode)
    return dispatch.sparse_ffn_forward(x, gates, w_up, w_gate, w_down, b_up, b_gate, b_down,
                                       act, expert_size, mode, tau)  # NaN policy applied there


sparse_ffn = torch.library.custom_op("lte::sparse_ffn", _sparse_ffn_kernel, mutates_args=())


@sparse_ffn.register_fake
def _sparse_ffn_fake(x, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, act, expert_size, mode, tau):
    _check_sparse_ffn_args(x, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, act, expert_size, mode)
    return x.new_empty(x.shape[0], w_down.shape[1])


def _refuse_grad(op: str, tensors: tuple) -> None:
    # The inference ops register no autograd kernel, and torch's fallback only warns on a backward
    # through such an op (then gives wrong gradients): refuse to build that graph instead.
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(f"{op} has no gradient; call lte::sparse_ffn when a backward is needed "
                           "(torch.compile(backend='lte') picks it when grad is enabled)")


def _sparse_ffn_inference_kernel(x, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, act, expert_size, mode, tau):
    _refuse_grad("lte::sparse_ffn_inference", (x, gates, w_up, w_gate, w_down, b_up, b_gate, b_down))
    return _sparse_ffn_kernel(x, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, act, expert_size, mode, tau)


# lte::sparse_ffn_inference: the schema custom_op inferred for lte::sparse_ffn, one kernel for every
# device (the dispatch picks the device's kernel), the same fake, no autograd: only grad-free graphs
# call it (the backend, under no_grad / inference_mode).
_INFERENCE_LIB = torch.library.Library("lte", "FRAGMENT")


def _define_inference_op(schema: str, kernel, fake) -> torch._ops.OpOverload:
    """`lte::<schema>` with `kernel` for every device and `fake` for tracing; no autograd."""
    name = schema.split("(", 1)[0]
    _INFERENCE_LIB.define(schema)
    _INFERENCE_LIB.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"lte::{name}", fake, lib=_INFERENCE_LIB)
    return getattr(torch.ops.lte, name).default


sparse_ffn_inference = _define_inference_op(
    "sparse_ffn_inference(Tensor x, Tensor gates, Tensor w_up, Tensor? w_gate, Tensor w_down, Tensor? b_up, "
    "Tensor? b_gate, Tensor? b_down, str act, SymInt expert_size, str mode, float tau) -> Tensor",
    _sparse_ffn_inference_kernel, _sparse_ffn_fake)


def _check_router_args(x, w_r, b_r, w_up, expert_size):
    torch._check(w_r.dim() == 2 and x.dim() == 2 and w_r.shape[1] == x.shape[1],
                 lambda: f"lte::routed_sparse_ffn_inference: w_r must be [E, d={x.shape[-1]}], got {tuple(w_r.shape)}")
    torch._check(w_r.shape[0] * expert_size == w_up.shape[0],
                 lambda: f"lte::routed_sparse_ffn_inference: E*B = {w_r.shape[0]}*{expert_size} != N = {w_up.shape[0]}")
    torch._check(b_r is None or tuple(b_r.shape) == (w_r.shape[0],),
                 lambda: "lte::routed_sparse_ffn_inference: b_r must be [E]")


def _routed_kernel(x, w_r, b_r, w_up, w_gate, w_down, b_up, b_gate, b_down, act, expert_size, tau):
    _refuse_grad("lte::routed_sparse_ffn_inference", (x, w_r, b_r, w_up, w_gate, w_down, b_up, b_gate, b_down))
    rs = w_r.shape
    if not (len(rs) == 2 and x.dim() == 2 and rs[1] == x.shape[1] and (b_r is None or b_r.shape == rs[:1])
            and _args_ok(x, (x.shape[0], rs[0]), w_up, w_gate, w_down, act, expert_size, "hard")):
        _routed_fake(x, w_r, b_r, w_up, w_gate, w_down, b_up, b_gate, b_down, act, expert_size, tau)  # names it
    return dispatch.routed_sparse_ffn_forward(x, w_r, b_r, w_up, w_gate, w_down, b_up, b_gate, b_down,
                                              act, expert_size, tau)  # NaN policy applied there


def _routed_fake(x, w_r, b_r, w_up, w_gate, w_down, b_up, b_gate, b_down, act, expert_size, tau):
    _check_router_args(x, w_r, b_r, w_up, expert_size)
    gates = x.new_empty(x.shape[0], w_r.shape[0], dtype=w_r.dtype)
    _check_sparse_ffn_args(x, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, act, expert_size, "hard")
    return x.new_empty(x.shape[0], w_down.shape[1]), gates


routed_sparse_ffn_inference = _define_inference_op(
    "routed_sparse_ffn_inference(Tensor x, Tensor w_r, Tensor? b_r, Tensor w_up, Tensor? w_gate, Tensor w_down, "
    "Tensor? b_up, Tensor? b_gate, Tensor? b_down, str act, SymInt expert_size, float tau) -> (Tensor, Tensor)",
    _routed_kernel, _routed_fake)


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
def _register_autocast(name: str, device_type: str) -> None:
    """Autocast for `lte::<name>` (a sparse FFN op) like the linear ops it replaces: inside
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
        overload = getattr(torch.ops.lte, name).default
        exclude = torch._C.DispatchKeySet(key)
    except (AttributeError, RuntimeError):
        default = torch.bfloat16 if device_type == "cpu" else torch.float16
        torch.library.register_autocast(f"lte::{name}", device_type, default)
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
    _AUTOCAST_LIB.impl(name, lambda _keyset, *args: cast_and_call(*args), key_name, with_keyset=True)


_AUTOCAST_LIB = torch.library.Library("lte", "IMPL")
for _name in ("sparse_ffn", "sparse_ffn_inference"):
    for _device_type in ("cpu", "cuda"):
        _register_autocast(_name, _device_type)
