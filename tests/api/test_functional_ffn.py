"""Functional FFNs (F.linear / @ / torch.matmul / einsum on the owner's own parameters) become sparse:
`lte.prepare` rewrites the owner's forward from its torch.fx trace (lte_compile/plan/functional.py).

Each case is a 2-block residual model whose blocks own a hand-written FFN; one prepared model per
case is shared by the tests (module-scoped fixture), each test sets the routers it needs.
"""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lte_compile as lte
from lte_compile import backend as lte_backend_mod
from lte_compile.errors import UnsupportedFFNError
from lte_compile.plan import functional
from tests.models import assert_state_unchanged, snapshot, tokens

D, D_FF, EXPERT = 16, 64, 16
ACTS = {"silu": F.silu, "gelu": F.gelu, "relu2": lambda a: F.relu(a) ** 2,
        "quick_gelu": lambda a: a * torch.sigmoid(1.702 * a)}


def _project(spelling: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x @ w.T (+ b), w stored [out, in], in one of the spellings users write."""
    if spelling == "linear":
        return F.linear(x, w, b)
    y = x @ w.t() if spelling == "matmul" else torch.einsum("...d,fd->...f", x, w)
    return y if b is None else y + b


class FunctionalFFN(nn.Module):
    """`down(act(gate(x)) * up(x))` (glu) or `down(act(up(x)))` on parameters, no nn.Linear."""

    def __init__(self, spelling: str, act: str, glu: bool, bias: bool):
        super().__init__()
        self.spelling, self.act, self.glu = spelling, ACTS[act], glu
        self.w_up = nn.Parameter(torch.randn(D_FF, D) / D ** 0.5)
        self.w_gate = nn.Parameter(torch.randn(D_FF, D) / D ** 0.5) if glu else None
        self.w_down = nn.Parameter(torch.randn(D, D_FF) / D_FF ** 0.5)
        self.b_up = nn.Parameter(torch.randn(D_FF) * 0.1) if bias else None
        self.b_gate = nn.Parameter(torch.randn(D_FF) * 0.1) if bias and glu else None
        self.b_down = nn.Parameter(torch.randn(D) * 0.1) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = _project(self.spelling, x, self.w_up, self.b_up)
        h = self.act(_project(self.spelling, x, self.w_gate, self.b_gate)) * up if self.glu else self.act(up)
        if self.spelling == "matmul":  # the down projection as torch.matmul
            y = torch.matmul(h, self.w_down.t())
            return y if self.b_down is None else y + self.b_down
        return _project(self.spelling, h, self.w_down, self.b_down)


class Block(nn.Module):
    def __init__(self, ffn: nn.Module):
        super().__init__()
        self.ffn = ffn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(x)


class Net(nn.Module):
    def __init__(self, make_ffn, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList([Block(make_ffn()), Block(make_ffn())])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


# (spelling, activation, glu, bias): every spelling, activation, form and bias setting at least once.
CASES = [("linear", "silu", True, False), ("matmul", "gelu", False, True), ("einsum", "relu2", True, True),
         ("matmul", "quick_gelu", False, False)]
FFNS = ["blocks.0.ffn", "blocks.1.ffn"]


def build(case) -> Net:
    return Net(lambda: FunctionalFFN(*case)).eval()


@pytest.fixture(scope="module", params=CASES, ids=lambda c: "-".join(str(v) for v in c))
def case(request):
    """(case, unprepared model, prepared model, input): prepare once per case."""
    x = tokens(D)
    model = lte.prepare(build(request.param), lte.Config(expert_size=EXPERT), example_inputs=(x,))
    return request.param, build(request.param), model, x


def set_routers(model: nn.Module, bias: float, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in lte.routers(model).values():
            r.linear.weight.copy_(torch.randn(r.linear.weight.shape, generator=gen) * 2 / D ** 0.5)
            r.linear.bias.fill_(bias)


def run(model: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    lte.set_mode(model, mode)
    with torch.no_grad():
        return model(x)


def reference_f64(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The hard-mode output by hand in float64 from the (permuted) weights and each FFN's mask
    G > tau of the latest forward: expert e is neurons [e*B, (e+1)*B)."""
    params = {k: v.detach().double() for k, v in model.named_parameters()}
    gates, y = lte.gates(model), x.double()
    for name in FFNS:
        p = lambda n: params.get(f"{name}.{n}")  # noqa: E731
        affine = lambda w, b: y @ w.t() + (0 if b is None else b)  # noqa: E731
        spec = lte.routers(model)[name].spec
        act = ACTS[spec.activation]
        h = act(affine(p("w_gate"), p("b_gate"))) * affine(p("w_up"), p("b_up")) if spec.glu else act(affine(p("w_up"), p("b_up")))
        mask = (gates[name] > 0.5).double().repeat_interleave(EXPERT, dim=-1)
        y = y + (h * mask) @ p("w_down").t() + (0 if p("b_down") is None else p("b_down"))
    return y


def test_structure_kept(case):
    """isinstance, class name, state_dict keys (+ routers only), the user's hooks, deepcopy."""
    (spelling, *_), orig, model, x = case
    want = set(orig.state_dict()) | {f"{n}.lte_router.{k}" for n in FFNS
                                     for k in ("linear.weight", "linear.bias", "permutation")}
    assert set(model.state_dict()) == want
    owner = model.blocks[0].ffn
    assert isinstance(owner, FunctionalFFN) and type(owner).__name__ == "FunctionalFFN"
    assert functional.is_rewritten(owner) and not functional.is_rewritten(model.blocks[0])
    assert set(lte.routers(model)) == set(FFNS) and lte.is_prepared(model)
    seen = []
    handle = owner.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    try:
        run(model, x, "hard")
    finally:
        handle.remove()
    assert seen == [x.shape], "a hook registered on the rewritten module must still fire"
    twin = copy.deepcopy(model)
    assert twin.blocks[0].ffn.lte_router is not owner.lte_router
    torch.testing.assert_close(run(twin, x, "hard"), run(model, x, "hard"), rtol=0, atol=0)


def test_dense_mode_is_the_original_function(case):
    """Dense mode runs the user's own code: bit-identical to the original forward on the same
    (neuron-permuted) weights, and equal to the unprepared model up to summation order."""
    _, orig, model, x = case
    dense = run(model, x, "dense")
    with torch.no_grad():
        own_code = x
        for block in model.blocks:
            own_code = own_code + FunctionalFFN.forward(block.ffn, own_code)
        assert torch.equal(dense, own_code)
        torch.testing.assert_close(dense, orig(x), atol=1e-5, rtol=1e-5)
    assert lte.gates(model) == {}


def test_hard_mode_with_every_expert_on_equals_dense(case):
    _, _, model, x = case
    set_routers(model, bias=30.0)
    torch.testing.assert_close(run(model, x, "hard"), run(model, x, "dense"), atol=1e-5, rtol=1e-5)


def test_soft_mode_gives_gates_and_gradients(case):
    _, _, model, x = case
    set_routers(model, bias=0.0)
    lte.set_mode(model, "soft")
    y = model(x)
    gates = lte.gates(model)
    assert set(gates) == set(FFNS)
    for g in gates.values():
        assert g.shape == (*x.shape[:-1], D_FF // EXPERT) and bool(((g >= 0) & (g <= 1)).all())
    y.square().mean().backward()  # the soft-mode task gradient reaches the routers through G
    router = lte.routers(model)[FFNS[0]]
    assert router.linear.weight.grad is not None and bool(router.linear.weight.grad.abs().sum() > 0)
    model.zero_grad(set_to_none=True)


def test_hard_mode_matches_float64_reference(case):
    _, _, model, x = case
    set_routers(model, bias=0.0, seed=1)
    y = run(model, x, "hard")
    on = torch.cat([(g > 0.5).float().flatten() for g in lte.gates(model).values()]).mean().item()
    assert 0.0 < on < 1.0, f"the test needs some experts off and some on, got {on:.2f} on"
    torch.testing.assert_close(y.double(), reference_f64(model, x), atol=1e-5, rtol=1e-5)
    twin = copy.deepcopy(model).double()  # .to() keeps the rewritten forward working
    y64 = run(twin, x.double(), "hard")
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64, reference_f64(twin, x.double()), atol=1e-10, rtol=1e-10)


def test_compiled_hard_mode_runs_sparse_ffn(case, op_calls):
    (_, act, _, _), _, model, x = case
    set_routers(model, bias=0.0, seed=1)
    eager = run(model, x, "hard")
    torch._dynamo.reset()
    lte_backend_mod.history.clear()
    compiled = torch.compile(model, backend="lte", fullgraph=True, options={"lte.inner": "eager"})
    with torch.no_grad():
        y = compiled(x)
    record = lte_backend_mod.history[-1]
    assert (record.prepared, record.rewritten, record.skipped) == (2, FFNS, [])
    assert op_calls == [act, act], "each FFN must run as one lte::sparse_ffn"
    torch.testing.assert_close(y, eager, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


def test_save_load_round_trip(case, tmp_path):
    c, _, model, x = case
    set_routers(model, bias=0.0, seed=2)
    y = run(model, x, "hard")
    lte.save(model, tmp_path / "full")
    lte.save(model, tmp_path / "state", include_model=False)
    for sub in ("full", "state"):  # the state alone: the fresh model's original weights get the permutation
        fresh = build(c)
        lte.load(fresh, tmp_path / sub)
        assert functional.is_rewritten(fresh.blocks[1].ffn) and lte.get_mode(fresh) == "hard"
        with torch.no_grad():
            torch.testing.assert_close(fresh(x), y, rtol=0, atol=0)


# ----------------------------------------------------------------------------- what stays dense
class BranchyFFN(FunctionalFFN):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def forward(self, x):
        return super().forward(x) if x.sum() > 0 else -super().forward(x)


class OptionalScaleFFN(FunctionalFFN):
    """`scale is None` is fixed while tracing (a Proxy is never None): the traced code differs."""

    def forward(self, x, scale=None):
        if scale is not None:
            x = x * scale
        return super().forward(x)


@pytest.mark.parametrize("cls, why", [(BranchyFFN, "cannot be traced"), (OptionalScaleFFN, "traced forward fails")])
def test_untraceable_owner_stays_dense_naming_why(cls, why, caplog):
    """Block 1's FFN cannot be rewritten: it stays dense with a warning, block 0's is prepared;
    with on_unsupported='error' prepare raises and leaves the model as it was."""
    make = iter([FunctionalFFN("linear", "silu", True, False), cls("linear", "silu", True, False)])
    model, x = Net(lambda: next(make)).eval(), tokens(D)
    fresh = copy.deepcopy(model)
    with caplog.at_level(logging.WARNING, logger="lte_compile.plan.prepare"):
        lte.prepare(model, lte.Config(expert_size=EXPERT), example_inputs=(x,))
    assert set(lte.routers(model)) == {"blocks.0.ffn"} and type(model.blocks[1].ffn) is cls
    assert "blocks.1.ffn" in caplog.text and why in caplog.text and "left dense" in caplog.text
    before = snapshot(fresh)
    with pytest.raises(UnsupportedFFNError, match=why):
        lte.prepare(fresh, lte.Config(expert_size=EXPERT, on_unsupported="error"), example_inputs=(x,))
    assert_state_unchanged(fresh, before)
    assert not lte.is_prepared(fresh) and not functional.is_rewritten(fresh.blocks[0].ffn)


class TrainBranchFFN(FunctionalFFN):
    def forward(self, x):
        y = super().forward(x)
        return y * 2 if self.training else y


def test_training_flag_is_read_at_call_time():
    """`self.training` is traced both ways: the rewritten forward follows .train()/.eval()."""
    x = tokens(D)
    model = lte.prepare(Net(lambda: TrainBranchFFN("linear", "gelu", False, True)).eval(),
                        lte.Config(expert_size=EXPERT), example_inputs=(x,))
    owner = model.blocks[0].ffn
    with torch.no_grad():
        evaluated = owner(x)
        owner.train()
        trained = owner(x)
    torch.testing.assert_close(trained, 2 * evaluated, rtol=0, atol=0)
    assert torch.equal(trained, TrainBranchFFN.forward(owner, x))


class ParamHolder(nn.Module):
    """Parameters only: the FFN using them is computed by the parent's forward."""

    def __init__(self):
        super().__init__()
        self.w_in, self.w_out = nn.Parameter(torch.randn(D_FF, D) / D ** 0.5), nn.Parameter(torch.randn(D, D_FF) / D_FF ** 0.5)


class TwoFFNsInOneForward(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = ParamHolder(), ParamHolder()

    def forward(self, x):
        x = x + F.linear(F.gelu(F.linear(x, self.a.w_in)), self.a.w_out)
        return x + torch.relu(x @ self.b.w_in.t()) @ self.b.w_out.t()


def test_ffns_computed_in_an_ancestor_forward(tmp_path):
    """Routers live at each FFN's owner (a, b); the forward rewritten is the root's, which computes both."""
    x = tokens(D)
    model = lte.prepare(TwoFFNsInOneForward().eval(), lte.Config(expert_size=EXPERT), example_inputs=(x,))
    assert set(lte.routers(model)) == {"a", "b"} and functional.is_rewritten(model)
    assert not functional.is_rewritten(model.a) and type(model).__name__ == "TwoFFNsInOneForward"
    assert torch.equal(run(model, x, "dense"), TwoFFNsInOneForward.forward(model, x))
    set_routers(model, bias=30.0)
    torch.testing.assert_close(run(model, x, "hard"), run(model, x, "dense"), atol=1e-5, rtol=1e-5)
    set_routers(model, bias=0.0, seed=1)
    y = run(model, x, "hard")
    assert set(lte.gates(model)) == {"a", "b"}
    lte.save(model, tmp_path)
    fresh = lte.load(TwoFFNsInOneForward().eval(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), y, rtol=0, atol=0)


class WeightReadingMLP(nn.Module):
    """Projection modules whose down weight the forward reads itself: the gate hook would never fire."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(D, D_FF), nn.Linear(D_FF, D)

    def forward(self, x):
        return F.linear(F.gelu(self.up(x)), self.down.weight, self.down.bias)


def test_projection_modules_the_forward_never_calls_are_not_hooked(caplog):
    """Before: hooks were attached and hard mode silently ran dense. Now such an FFN is left dense with
    a warning naming the module that is never called, or refused with on_unsupported='error'."""
    model, x = Net(lambda: FunctionalFFN("linear", "silu", True, False)).eval(), tokens(D)
    model.blocks[1].ffn = WeightReadingMLP()
    fresh = copy.deepcopy(model)
    with caplog.at_level(logging.WARNING, logger="lte_compile.plan.prepare"):
        lte.prepare(model, lte.Config(expert_size=EXPERT), example_inputs=(x,))
    assert set(lte.routers(model)) == {"blocks.0.ffn"}
    assert "blocks.1.ffn.down" in caplog.text and "never calls" in caplog.text
    before = snapshot(fresh)
    with pytest.raises(UnsupportedFFNError, match="never calls"):
        lte.prepare(fresh, lte.Config(expert_size=EXPERT, on_unsupported="error"), example_inputs=(x,))
    assert_state_unchanged(fresh, before)
