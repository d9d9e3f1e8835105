"""The `lte::` ops (kernels/ops.py): opcheck, autograd vs the naive loop, dispatch, torch.compile."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings

from lte_compile.kernels import dispatch, ops
from lte_compile.testing import TAU, examples, naive_sparse_ffn, sparse_ffn_cases

GRAD_NAMES = ("x", "gates", "w_up", "w_gate", "w_down", "b_up", "b_gate", "b_down")
TENSOR_SLOTS = (0, 1, 2, 3, 4, 5, 6, 7)


def _grads(fn, args, want):
    """torch.autograd.grad of fn(*args) w.r.t. args[i] for i in want, with seeded grad_outputs."""
    args = list(args)
    leaves = []
    for i in want:
        args[i] = args[i].detach().requires_grad_(True)
        leaves.append(args[i])
    y = fn(*args)
    g = torch.Generator().manual_seed(123)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    if not y.requires_grad:  # the naive loop with no active expert and no b_down: y is constant
        return y, [None] * len(leaves)
    return y, torch.autograd.grad(y, leaves, dy, allow_unused=True)


def _check_grads(case, dtype, atol, rtol, what):
    args = list(case.args(dtype))
    args[1] = case.gates.to(dtype)  # grads w.r.t. gates in the same dtype
    want = [i for i in TENSOR_SLOTS if args[i] is not None and (i != 1 or case.mode == "soft")]
    y, grads = _grads(ops.sparse_ffn, args, want)
    args64 = list(case.args64())
    args64[1] = args[1].double()
    y_ref, grads_ref = _grads(naive_sparse_ffn, args64, want)
    torch.testing.assert_close(y.double(), y_ref, atol=atol, rtol=rtol, msg=lambda m: f"{what} y: {m}")
    for i, g, r in zip(want, grads, grads_ref):
        name = GRAD_NAMES[i]
        if r is None:
            r = torch.zeros_like(args64[i])
        if g is None:
            g = torch.zeros_like(args[i])
        torch.testing.assert_close(g.double(), r, atol=atol, rtol=rtol,
                                   msg=lambda m: f"{what}: d{name} ({case.mode}, {case.mask_kind}, "
                                   f"T={case.T}, B={case.expert_size}, act={case.act}): {m}")


@settings(max_examples=examples(150))
@given(case=sparse_ffn_cases(dtypes=(torch.float64,), max_T=8, max_d=24, max_E=4, expert_sizes=(1, 3, 8)))
def test_autograd_float64_matches_naive(case):
    """Soft and hard mode, every gradient; float64 so only the backward formula is under test."""
    _check_grads(case, torch.float64, 1e-9, 1e-7, "float64")  # float64 round-off only


@settings(max_examples=examples(100))
@given(case=sparse_ffn_cases(dtypes=(torch.float32,), max_T=12, max_d=24, max_E=4, modes=("hard",)))
def test_autograd_fp32_hard_uses_fast_forward(case):
    """fp32 hard mode: forward through the C++ kernel (or fallback), backward through ops.py."""
    assert dispatch.choose_kernel(case.x.float(), case.w_up.float(), "hard") == "cpu"
    _check_grads(case, torch.float32, 1e-4, 1e-4, "fp32 hard")  # fp32 accumulation over <= 256 terms


@pytest.mark.parametrize("act", ops.ACTIVATIONS)
@pytest.mark.parametrize("mode,glu", [("soft", True), ("hard", False)])
def test_autograd_every_activation_matches_naive(act, mode, glu):
    """Each activation's forward and backward formula (reference.activation_backward) against
    autograd through the naive loop, float64, every gradient; the property tests above draw
    activations at random, this pins every one of them (relu2, quick_gelu included)."""
    from lte_compile.testing import FFNCase

    g = torch.Generator().manual_seed(11)
    T, d, E, B = 4, 10, 3, 4
    f64 = dict(dtype=torch.float64, generator=g)
    mask = torch.rand(T, E, generator=g) > 0.4
    u = torch.rand(T, E, generator=g) * 0.4
    gates = torch.where(mask, TAU + 0.05 + u, TAU - 0.05 - u) if mode == "hard" else torch.where(mask, 0.05 + u, 0.0)
    case = FFNCase(x=torch.randn(T, d, **f64), gates=gates.float(), w_up=torch.randn(E * B, d, **f64),
                   w_gate=torch.randn(E * B, d, **f64) if glu else None, w_down=torch.randn(E * B, d, **f64),
                   b_up=torch.randn(E * B, **f64), b_gate=torch.randn(E * B, **f64) if glu else None,
                   b_down=torch.randn(d, **f64), act=act, expert_size=B, mode=mode, mask_kind="random",
                   dtype=torch.float64)
    _check_grads(case, torch.float64, 1e-9, 1e-7, f"float64 {act}")


def _sample(mode, glu=True, bias=True, dtype=torch.float32, T=3):
    g = torch.Generator().manual_seed(7)
    d, E, B = 12, 3, 4
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return (r(T, d), torch.rand(T, E, generator=g).to(dtype), r(E * B, d), r(E * B, d) if glu else None,
            r(E * B, d), r(E * B) if bias else None, r(E * B) if bias and glu else None,
            r(d) if bias else None, "silu", B, mode, TAU)


@pytest.mark.parametrize("mode", ["soft", "hard"])
@pytest.mark.parametrize("glu,bias", [(True, True), (False, False)])
def test_opcheck_sparse_ffn(mode, glu, bias):
    args = _sample(mode, glu, bias)
    args = tuple(a.requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)
    torch.library.opcheck(ops.sparse_ffn, args)


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_inference_op_equals_the_autograd_op_and_passes_opcheck(mode):
    """lte::sparse_ffn_inference: the same forward and fake, no autograd (opcheck's autograd test
    skipped: a backward through it must fail, below)."""
    args = _sample(mode, True, True)
    torch.testing.assert_close(ops.sparse_ffn_inference(*args), ops.sparse_ffn(*args), atol=0, rtol=0)
    torch.library.opcheck(ops.sparse_ffn_inference, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_inference_op_refuses_a_backward():
    args = list(_sample("soft", True, True))
    args[2] = args[2].requires_grad_(True)
    with pytest.raises(RuntimeError, match="has no gradient"):
        ops.sparse_ffn_inference(*args)
    with torch.no_grad():  # the same inputs without grad mode: allowed
        torch.testing.assert_close(ops.sparse_ffn_inference(*args), ops.sparse_ffn(*args))


# the router inside the C++ kernel (T <= 4), the C++ router for batches, the torch one (large T)
@pytest.mark.parametrize("T", [3, 6, dispatch.ROUTER_CPP_MAX_T + 1])
def test_routed_op_nan_rows_and_opcheck(T):
    """lte::routed_sparse_ffn_inference: a NaN in a token's x makes its y row (and gates) NaN, as
    the eager masked FFN does even with every expert off; other rows stay finite; fake and schema
    pass opcheck."""
    x, _, w_up, w_gate, w_down, b_up, b_gate, b_down, act, B, _, tau = _sample("hard", T=T)
    g = torch.Generator().manual_seed(11)
    w_r, b_r = torch.randn(w_up.shape[0] // B, x.shape[1], generator=g), torch.full((w_up.shape[0] // B,), -40.0)
    x = x.clone()
    x[1, 2] = float("nan")
    with torch.no_grad():
        y, gates = ops.routed_sparse_ffn_inference(x, w_r, b_r, w_up, w_gate, w_down, b_up, b_gate, b_down, act, B, tau)
    assert torch.isnan(y[1]).all() and torch.isnan(gates[1]).all()
    keep = [i for i in range(T) if i != 1]
    assert torch.isfinite(y[keep]).all() and torch.equal(y[keep], b_down.expand(T - 1, -1))  # every expert off
    torch.library.opcheck(ops.routed_sparse_ffn_inference, (x.nan_to_num(), w_r, None, w_up, w_gate, w_down,
                                                            b_up, b_gate, b_down, act, B, tau),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_opcheck_apply_gates(mode):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 3, 8, generator=g, requires_grad=True)
    gates = torch.rand(2, 3, 2, generator=g, requires_grad=True)
    torch.library.opcheck(ops.apply_gates, (h, gates, 4, mode, TAU))


def test_dispatch_choices():
    x32, x64 = torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.float64)
    assert dispatch.choose_kernel(x32, x32, "hard") == "cpu"
    assert dispatch.choose_kernel(x32, x32, "soft") == "reference"
    assert dispatch.choose_kernel(x64, x64, "hard") == "reference"
    with dispatch.set_kernel("torch"):
        assert dispatch.choose_kernel(x32, x32, "hard") == "torch"
    assert dispatch.choose_kernel(x32.bfloat16(), x32.bfloat16(), "hard") == "cpu"
    xb = torch.zeros(64, 2)
    assert dispatch.choose_kernel(xb, xb, "hard", torch.ones(64, 3), 0.5) == "dense"  # dense batch
    assert dispatch.choose_kernel(xb, xb, "hard", torch.zeros(64, 3), 0.5) == "cpu"


def test_op_under_torch_compile():
    """The custom_op + fake keep working under torch.compile (fullgraph, aot_eager: no C++ codegen)."""
    args = _sample("hard", T=5)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(x, gates, *rest):
        return torch.ops.lte.sparse_ffn(x * 2, gates, *rest) + 1

    torch.testing.assert_close(f(*args), torch.ops.lte.sparse_ffn(args[0] * 2, *args[1:]) + 1)


def test_apply_gates_args_decode_fx_node():
    """ApplyGatesArgs reads the marker's arguments by name, however the graph passed them."""
    def f(h, gates):
        a = torch.ops.lte.apply_gates(h, gates, 4, "hard", 0.25)
        return torch.ops.lte.apply_gates(a, gates, 4, mode="soft", tau=TAU)

    gm = torch.fx.symbolic_trace(f)
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert len(nodes) == 2
    first, second = (ops.ApplyGatesArgs.from_node(n) for n in nodes)
    assert (first.expert_size, first.mode, first.tau) == (4, "hard", 0.25)
    assert first.h.name == "h" and first.gates.name == "gates"
    assert (second.h, second.mode, second.tau) == (nodes[0], "soft", TAU)
    with pytest.raises(TypeError, match="missing"):
        ops.ApplyGatesArgs.from_node_args((1, 2, 4))
    with pytest.raises(TypeError, match="no argument"):
        ops.ApplyGatesArgs.from_node_args((1, 2, 4, "hard"), {"temperature": 0.5})


def test_op_rejects_unknown_activation_and_mode():
    args = list(_sample("hard", T=2))
    assert "tanh" not in ops.ACTIVATIONS and "dense" not in ops.MODES
    with pytest.raises(RuntimeError, match="unknown act"):
        torch.ops.lte.sparse_ffn(*args[:8], "tanh", *args[9:])
    with pytest.raises(RuntimeError, match="mode must be"):
        torch.ops.lte.sparse_ffn(*args[:10], "dense", *args[11:])


def test_dispatch_by_registration():
    """Kernels are looked up by name in dispatch's table; a registered kernel can be forced."""
    assert {"reference", "cpu", "dense", "torch", "triton", "dense_triton"} <= set(dispatch.kernel_names())
    assert dispatch.get_kernel("torch") is __import__("lte_compile.kernels.cpu", fromlist=["x"]).sparse_ffn_torch
    with pytest.raises(ValueError, match="not"):
        with dispatch.set_kernel("no-such-kernel"):
            pass
    calls = []

    def spy(*args):
        calls.append(args[8])
        return dispatch.get_kernel("reference")(*args)

    dispatch.register_kernel("test-spy", spy)
    try:
        args = _sample("hard", T=2)
        with dispatch.set_kernel("test-spy"):
            y = torch.ops.lte.sparse_ffn(*args)
        assert calls == ["silu"]
        torch.testing.assert_close(y, dispatch.get_kernel("reference")(*args))
    finally:
        dispatch._KERNELS.pop("test-spy")


def test_cpu_use_does_not_import_the_triton_kernel():
    """The Triton kernel module registers itself on first lookup of "triton" only."""
    code = ("import sys, torch, lte_compile.kernels as k\n"
            "x, g, w = torch.randn(2, 8), torch.rand(2, 2), torch.randn(8, 8)\n"
            "torch.ops.lte.sparse_ffn(x, g, w, None, w, None, None, None, 'relu', 4, 'hard', 0.5)\n"
            "assert 'lte_compile.kernels.sparse_ffn_triton' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
