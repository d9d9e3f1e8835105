"""CPU kernels (kernels/cpu.py): the C++ gathered kernel and the pure-torch fallback vs the naive loop."""
from __future__ import annotations

import contextlib
import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lte_compile.kernels import ACTIVATIONS, cpu, dispatch, ops, sparse_ffn_reference
from lte_compile.testing import TAU, FFNCase, assert_matches_naive, examples, gate_mask, sparse_ffn_cases

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

needs_ext = pytest.mark.skipif(not cpu.extension_available(), reason="no C++ compiler: CPU kernel not built")


@needs_ext
@settings(max_examples=examples(400))
@given(case=sparse_ffn_cases(dtypes=DTYPES))
def test_cpp_kernel_matches_naive(case):
    assert_matches_naive(cpu.sparse_ffn_cpu(*case.args()), case, "C++ kernel")


@needs_ext
@settings(max_examples=examples(100))
@given(case=sparse_ffn_cases(dtypes=(torch.float32, torch.bfloat16), min_T=16, max_T=80, max_E=5,
                             expert_sizes=(3, 8, 32)))
def test_cpp_kernel_matches_naive_many_tokens(case):
    """The register-blocked batch path: token chunks (kUpToks / kDownToks, partial last ones),
    4- and 2-row up blocks with a one-row ragged end (odd B), d and column tails, several column
    tiles of the down phase."""
    assert_matches_naive(cpu.sparse_ffn_cpu(*case.args()), case, "C++ kernel, many tokens")


@contextlib.contextmanager
def torch_threads(n: int):
    """torch.set_num_threads(n) within the block (the kernel splits its work by torch's count)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@needs_ext
@settings(max_examples=examples(60))
@given(case=sparse_ffn_cases(dtypes=DTYPES, max_T=1, max_d=1100, max_E=4), threads=st.sampled_from([2, 3]))
def test_cpp_kernel_batch1_column_split_matches_naive(case, threads):
    """Batch 1 splits the down phase's columns into one range per thread (>= 256 columns each):
    wide outputs, several threads, ranges that do not divide d_out. On an AVX512-BF16 CPU, bf16
    draws run the batch-1 bf16 pairs path (down_phase_t1: permuted y range, masked 32-column
    tails, an odd B's zero partner row)."""
    with torch_threads(threads):
        assert_matches_naive(cpu.sparse_ffn_cpu(*case.args()), case, f"C++ kernel, T=1, {threads} threads")


@needs_ext
@settings(max_examples=examples(25))
@given(case=sparse_ffn_cases(dtypes=(torch.bfloat16, torch.float32), min_T=2, max_T=64, max_d=400, max_E=4,
                             expert_sizes=(3, 8, 32)), threads=st.sampled_from([2, 3]))
def test_cpp_kernel_small_batches_on_threads_match_naive(case, threads):
    """Small batches on several threads: each thread's column tiles of y (tails that are no
    multiple of 64, an odd B's zero partner row); on an AVX512-BF16 CPU, bf16 draws run the down
    phase without the packed copy (down_phase_unpacked: rows interleaved in registers, y permuted
    per tile), fp32 draws the register-blocked fp32 path."""
    with torch_threads(threads):
        assert_matches_naive(cpu.sparse_ffn_cpu(*case.args()), case, f"C++ kernel, T={case.x.shape[0]}, {threads} threads")


@needs_ext
@settings(max_examples=examples(150))
@given(case=sparse_ffn_cases(dtypes=DTYPES, max_T=7, max_E=9, modes=("hard",)),
       router=st.sampled_from(["drawn", "all off", "all on"]), cpp_router=st.booleans())
def test_routed_op_matches_float64_router_and_naive(case, router, cpp_router):
    """lte::routed_sparse_ffn_inference: T <= 4 runs the router inside the C++ kernel; larger T
    the C++ router (route_cpu) then the dispatch's choice, or (cpp_router False: T above
    dispatch.ROUTER_CPP_MAX_T) torch ops. Its gates equal the float64 sigmoid(x w_r^T + b_r); its
    mask agrees wherever the float64 gate is clear of tau; y equals the naive loop on that mask
    (empty / full via b_r)."""
    T, d = case.x.shape
    E = case.gates.shape[1]
    g = torch.Generator().manual_seed(97 * T + d)
    w_r = torch.randn(E, d, generator=g) / d ** 0.5
    b_r = {"drawn": torch.randn(E, generator=g), "all off": torch.full((E,), -40.0),
           "all on": torch.full((E,), 40.0)}[router]
    args = case.args()
    with torch.no_grad(), router_cpp_max_t(dispatch.ROUTER_CPP_MAX_T if cpp_router else 4):
        y, gates = ops.routed_sparse_ffn_inference(args[0], w_r, b_r, *args[2:10], TAU)
    g64 = torch.sigmoid(F.linear(args[0].double(), w_r.double(), b_r.double()))
    assert gates.dtype == torch.float32
    torch.testing.assert_close(gates.double(), g64, atol=1e-6, rtol=0)
    clear = (g64 - TAU).abs() > 1e-5
    assert torch.equal((gates > TAU)[clear], (g64 > TAU)[clear])
    assert_matches_naive(y, dataclasses.replace(case, gates=gates), f"routed op ({router})")


@contextlib.contextmanager
def router_cpp_max_t(t: int):
    """dispatch.ROUTER_CPP_MAX_T = t within the block (4: batches take the torch router)."""
    old, dispatch.ROUTER_CPP_MAX_T = dispatch.ROUTER_CPP_MAX_T, t
    try:
        yield
    finally:
        dispatch.ROUTER_CPP_MAX_T = old


@needs_ext
@settings(max_examples=examples(60))
@given(T=st.integers(1, 70), d=st.integers(1, 70), E=st.integers(1, 9), dtype=st.sampled_from(DTYPES),
       bias=st.sampled_from([None, "drawn", "all off", "all on"]), bad=st.sampled_from([None, "nan", "inf", "-inf"]))
def test_route_cpu_gates_density_and_finite_flag(T, d, E, dtype, bias, bad):
    """cpu.route_cpu (the batches' C++ router): gates equal the float64 sigmoid(x w_r^T + b_r),
    the density is the share of its own gates above tau, and the flag says whether x is finite
    (a NaN or an Inf anywhere makes it False)."""
    g = torch.Generator().manual_seed(T * 131 + d * 7 + E)
    x = torch.randn(T, d, generator=g).to(dtype)
    if bad is not None:
        x[T // 2, d // 2] = float(bad)
    w_r = torch.randn(E, d, generator=g) / d ** 0.5
    b_r = {None: None, "drawn": torch.randn(E, generator=g), "all off": torch.full((E,), -40.0),
           "all on": torch.full((E,), 40.0)}[bias]
    gates, density, finite = cpu.route_cpu(x, w_r, b_r, TAU)
    g64 = torch.sigmoid(F.linear(x.double(), w_r.double(), None if b_r is None else b_r.double()))
    assert gates.dtype == torch.float32 and gates.shape == (T, E)
    torch.testing.assert_close(gates.double(), g64, atol=1e-6, rtol=0, equal_nan=True)
    assert round(density * T * E) == int((gates > TAU).sum()) and 0.0 <= density <= 1.0
    assert finite == (bad is None)


@needs_ext
@settings(max_examples=examples(150))
@given(case=sparse_ffn_cases(dtypes=DTYPES))
def test_dense_path_matches_naive(case):
    """The dense-then-mask path (dispatch "dense": GEMMs + the fused C++ act*up*mask pass):
    empty, full and ragged masks, both modes, every activation, with and without biases; with
    grad enabled and without (16-bit inference: the transposed copy of W_down)."""
    assert_matches_naive(cpu.dense_masked_ffn(*case.args()), case, "dense-then-mask path")
    with torch.no_grad():
        assert_matches_naive(cpu.dense_masked_ffn(*case.args()), case, "dense-then-mask path, no grad")


@needs_ext
def test_dense_fallback_transposed_down_copy(monkeypatch):
    """bf16 inference: the dense fallback multiplies by a [d_out, N] copy of W_down^T (an NT GEMM),
    made once per weight, reused by every view of it, rebuilt after an in-place update; never in
    fp32, with grad enabled or with LTE_DENSE_NT_COPY=0. The results equal the plain path's."""
    monkeypatch.delenv(cpu.ENV_NT_COPY, raising=False)
    g = torch.Generator().manual_seed(0)
    param = torch.randn(24, 64, generator=g).to(torch.bfloat16)  # nn.Linear [d_out, N]
    param = param.t().contiguous().t()  # kernel layout: param.t() is [N, d_out] row-major
    with torch.no_grad():
        a = cpu._down_for_gemm(param.t())
        assert a.shape == (64, 24) and a.stride() == (1, 64) and torch.equal(a, param.t())
        assert cpu._down_for_gemm(param.t()).data_ptr() == a.data_ptr(), "a fresh view reuses the copy"
        param.mul_(2)
        b = cpu._down_for_gemm(param.t())
        assert torch.equal(b, param.t()), "an in-place update rebuilds the copy"
        assert cpu._down_for_gemm(param.t().float()).stride() == (24, 1), "fp32: no copy"
        monkeypatch.setenv(cpu.ENV_NT_COPY, "0")
        assert cpu._down_for_gemm(param.t()).data_ptr() == param.data_ptr()
        monkeypatch.delenv(cpu.ENV_NT_COPY)
        x, gates = torch.randn(5, 16, generator=g).to(torch.bfloat16), torch.rand(5, 8, generator=g)
        w_up = torch.randn(64, 16, generator=g).to(torch.bfloat16)
        args = (x, gates, w_up, w_up, param.t(), None, None, None, "silu", 8, "hard", TAU)
        with_copy = cpu.dense_masked_ffn(*args)
        monkeypatch.setenv(cpu.ENV_NT_COPY, "0")
        torch.testing.assert_close(with_copy, cpu.dense_masked_ffn(*args), atol=2e-2, rtol=2e-2)
    assert cpu._down_for_gemm(param.t()).data_ptr() == param.data_ptr(), "grad enabled: no copy"


def test_dense_path_keeps_nan_of_off_experts():
    """Like the reference (h * 0 mask), an overflowing h of an OFF expert still makes y NaN:
    the mask is a multiply, never a skip, so non-finite values are not hidden."""
    T, d, E, B = 2, 8, 2, 8
    x = torch.ones(T, d)
    w_up = torch.full((E * B, d), 1e38)  # x W_up^T overflows to inf for every neuron
    gates = torch.tensor([[0.9, 0.1], [0.9, 0.9]])
    args = (x, gates, w_up, None, torch.ones(E * B, d), None, None, None, "relu", B, "hard", TAU)
    ref = sparse_ffn_reference(*args)
    assert ref[0].isnan().all() and ref[1].isinf().all()  # token 0 has an off expert, token 1 none
    torch.testing.assert_close(cpu.dense_masked_ffn(*args), ref, equal_nan=True)


@settings(max_examples=examples(500))
@given(case=sparse_ffn_cases(dtypes=DTYPES))
def test_torch_fallback_matches_naive(case):
    assert_matches_naive(cpu.sparse_ffn_torch(*case.args()), case, "pure-torch fallback")


@needs_ext
@pytest.mark.parametrize("kernel", [cpu.sparse_ffn_cpu, cpu.sparse_ffn_torch])
def test_strided_weights(kernel):
    """w_down = linear.weight.t() (non-unit last stride) and row-strided w_up views are correct."""
    g = torch.Generator().manual_seed(0)
    T, d, d_out, E, B = 3, 40, 24, 4, 8
    x = torch.randn(T, d, generator=g)
    w_up = torch.randn(2 * E * B, d, generator=g)[::2]  # row stride 2d
    w_gate = torch.randn(E * B, d + 5, generator=g)[:, :d]  # row stride d + 5
    w_down = torch.randn(d_out, E * B, generator=g).t()  # [N, d_out], strides (1, N)
    gates = torch.rand(T, E, generator=g)
    y = kernel(x, gates, w_up, w_gate, w_down, None, None, None, "silu", B, "hard", TAU)
    ref = cpu.sparse_ffn_torch(x, gates, w_up.contiguous(), w_gate.contiguous(),
                               w_down.contiguous(), None, None, None, "silu", B, "hard", TAU)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)  # same math, fp32 summation order


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_active_equals_dense(dtype):
    """Hard mode with every expert on is the dense FFN (megablocks glu_test)."""
    g = torch.Generator().manual_seed(1)
    T, d, N, B = 5, 64, 96, 32
    x, wu, wg, wd = (torch.randn(*s, generator=g).to(dtype) / 8 for s in ((T, d), (N, d), (N, d), (N, d)))
    bd = torch.randn(d, generator=g).to(dtype)
    y = cpu.sparse_ffn_cpu(x, torch.ones(T, N // B), wu, wg, wd, None, None, bd, "silu", B, "hard", TAU)
    dense = (F.silu(x.float() @ wg.float().t()) * (x.float() @ wu.float().t())) @ wd.float() + bd.float()
    # bf16: dense in fp32 from the same bf16 inputs; only the final rounding differs.
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y.float(), dense, atol=tol, rtol=tol)


@needs_ext
@pytest.mark.parametrize("kernel", [cpu.sparse_ffn_cpu, cpu.sparse_ffn_torch])
def test_token_without_experts_gets_down_bias(kernel):
    g = torch.Generator().manual_seed(2)
    T, d, E, B = 4, 16, 3, 8
    gates = torch.rand(T, E, generator=g) * 0.4 + 0.55
    gates[2] = 0.1  # token 2 uses no expert
    bd = torch.randn(d, generator=g)
    args = [torch.randn(T, d, generator=g), gates] + [torch.randn(E * B, d, generator=g) for _ in range(3)]
    y = kernel(*args, None, None, bd, "gelu", B, "hard", TAU)
    assert torch.equal(y[2], bd), "a token with no active expert must get exactly b_down"


def test_no_compiler_falls_back_with_warning(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.warns(RuntimeWarning, match="no C.. compiler"):
        assert cpu.load_extension.__wrapped__() is None


@needs_ext
def test_extension_is_cached():
    """The build happens once per machine: a second load in this process is the same module."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu.load_extension() is cpu.load_extension()


@needs_ext
@settings(max_examples=examples(60))
@given(case=sparse_ffn_cases(dtypes=(torch.bfloat16,), min_T=16, max_T=200, max_d=140, max_E=5,
                             modes=("hard",)))
def test_cpp_kernel_bf16_batch_matches_naive(case):
    """bf16 batches: the AVX512-BF16 grouped path (where the CPU has it): 6-token blocks, 4-row
    blocks, masked d tails, odd expert sizes (zero-padded bf16 pairs of h), 64/16/masked columns."""
    assert_matches_naive(cpu.sparse_ffn_cpu(*case.args()), case, "C++ kernel, bf16 batch")


@needs_ext
@pytest.mark.parametrize("T,d,d_out,B,glu", [(16, 2100, 300, 32, True), (77, 2100, 530, 3, False),
                                             (200, 130, 300, 8, True), (40, 4099, 70, 1, True)])
def test_cpp_kernel_bf16_batch_ragged_large(T, d, d_out, B, glu):
    """Ragged masks on shapes past the bf16 path's tiles: two d tiles (2048) plus a tail, several
    256-column sub-tiles of the down phase, one token with no expert, experts with 1 token."""
    g = torch.Generator().manual_seed(T + d)
    E = 6
    mask = gate_mask("ragged", T, E, g)
    mask[3] = False
    mask[:, 0] = False
    mask[5, 0] = True  # expert 0 has exactly one token (a one-token block of the bf16 path)
    u = torch.rand(T, E, generator=g) * 0.45
    f64 = dict(dtype=torch.float64, generator=g)
    N = E * B
    case = FFNCase(x=torch.randn(T, d, **f64), gates=torch.where(mask, TAU + 0.05 + u, TAU - 0.05 - u).float(),
                   w_up=torch.randn(N, d, **f64) / d ** 0.5,
                   w_gate=torch.randn(N, d, **f64) / d ** 0.5 if glu else None,
                   w_down=torch.randn(N, d_out, **f64) / N ** 0.5, b_up=torch.randn(N, **f64) * 0.5,
                   b_gate=torch.randn(N, **f64) * 0.5 if glu else None, b_down=torch.randn(d_out, **f64),
                   act="silu" if glu else "gelu", expert_size=B, mode="hard", mask_kind="ragged",
                   dtype=torch.bfloat16)
    y = cpu.sparse_ffn_cpu(*case.args())
    assert_matches_naive(y, case, "C++ kernel, bf16 batch, ragged")
    assert torch.equal(y[3], case.b_down.to(torch.bfloat16)), "a token with no active expert gets b_down"


@pytest.mark.parametrize("flags,tag", [
    ({"avx2", "fma", "f16c", "bmi1", "bmi2", "movbe"}, "avx2"),
    ({"avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}, "avx512"),
    ({"avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd",
      "avx512_bf16"}, "avx512bf16"),
    ({"sse4_2"}, "x86-64"),
])
def test_build_is_keyed_by_the_cpus_isa(monkeypatch, flags, tag):
    """Issue 7: the build cache is shared between machines, so the extension's name carries the
    ISA it was compiled for and its flags name that ISA, never -march=native."""
    monkeypatch.setattr(cpu.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.delenv(cpu.ENV_ISA, raising=False)
    cpu.isa.cache_clear()
    try:
        got, march = cpu.isa()
        assert got == tag
        assert "-march=native" not in march and all(f.startswith("-m") for f in march)
    finally:
        cpu.isa.cache_clear()


_AVX512BF16_FLAGS = {"avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "avx512f", "avx512bw", "avx512vl",
                     "avx512dq", "avx512cd", "avx512_bf16"}


@pytest.mark.parametrize("wanted,ok", [("avx2", True), ("AVX512", True), ("x86-64", True), ("avx512bf16", True),
                                       ("sse9", False)])
def test_isa_can_be_lowered_by_env(monkeypatch, wanted, ok):
    """LTE_CPU_ISA lowers the kernel's ISA (an AVX-512 machine runs the AVX2 build: how the
    AVX2-only CPU's figures are reproduced); an unknown name is refused, naming the choices."""
    monkeypatch.setattr(cpu.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(_AVX512BF16_FLAGS))
    monkeypatch.setenv(cpu.ENV_ISA, wanted)
    cpu.isa.cache_clear()
    try:
        if ok:
            tag, march = cpu.isa()
            assert tag == wanted.lower() and march == cpu._X86_ISAS[tag]
            assert f"{cpu.ENV_ISA}={wanted}" in cpu.machine_summary()
        else:
            with pytest.raises(ValueError, match="x86-64|avx2|avx512|avx512bf16"):
                cpu.isa()
    finally:
        cpu.isa.cache_clear()


def test_bad_isa_env_is_an_error_not_a_silent_fallback(monkeypatch):
    """load_extension turns build failures into a warning and the slow path; a wrong LTE_CPU_ISA
    must instead reach the user as the ValueError naming the choices."""
    monkeypatch.setenv(cpu.ENV_ISA, "sse9")
    cpu.isa.cache_clear()
    cpu.load_extension.cache_clear()
    try:
        with pytest.raises(ValueError, match=cpu.ENV_ISA):
            cpu.load_extension()
    finally:
        monkeypatch.delenv(cpu.ENV_ISA)
        cpu.isa.cache_clear()
        cpu.load_extension.cache_clear()


def test_isa_cannot_be_raised_by_env(monkeypatch):
    """Asking for more than the CPU has would build a kernel that crashes on it: refused."""
    monkeypatch.setattr(cpu.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c", "bmi1", "bmi2", "movbe"}))
    monkeypatch.setenv(cpu.ENV_ISA, "avx512")
    cpu.isa.cache_clear()
    try:
        with pytest.raises(ValueError, match="more than this CPU has"):
            cpu.isa()
    finally:
        cpu.isa.cache_clear()


@needs_ext
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("glu", [False, True])
def test_cpp_kernel_accepts_every_activation(act, glu):
    """The C++ `act_code` cannot import ACTIVATIONS (kernels/reference.py): every name the op
    accepts must reach the right C++ branch (the reference's result), and no other name."""
    g = torch.Generator().manual_seed(7)
    T, d, d_out, E, B = 5, 33, 17, 3, 8
    N = E * B
    x = torch.randn(T, d, generator=g)
    w_up, w_down = torch.randn(N, d, generator=g) / d ** 0.5, torch.randn(N, d_out, generator=g) / N ** 0.5
    w_gate = torch.randn(N, d, generator=g) / d ** 0.5 if glu else None
    gates = torch.rand(T, E, generator=g)
    args = (x, gates, w_up, w_gate, w_down, None, None, None, act, B, "hard", TAU)
    torch.testing.assert_close(cpu.sparse_ffn_cpu(*args), sparse_ffn_reference(*args), atol=1e-5, rtol=1e-5)


@needs_ext
def test_cpp_kernel_rejects_unknown_activation():
    x, gates = torch.randn(2, 4), torch.rand(2, 2)
    w = torch.randn(4, 4)
    assert "tanh" not in ACTIVATIONS
    with pytest.raises(RuntimeError, match="unknown activation"):
        cpu.sparse_ffn_cpu(x, gates, w, None, w, None, None, None, "tanh", 2, "hard", TAU)
