"""Issue 11 defect 2 (NaN policy): compiled and eager agree on non-finite inputs; statistics never
count NaN as a number. Rows of the FFN are independent here (an MLP), so the test can check the
rows concerned exactly: eager hard mode multiplies h by the 0/1 mask (NaN * 0 = NaN), and the
fused op must give NaN in the same rows even where it skips every expert."""
import pytest
import torch

import lte_compile as lte
from lte_compile import backend as lte_backend_mod
from lte_compile.training.losses import gate_stats
from tests.models import MLP

NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    m = MLP(16, 64).eval()
    lte.prepare(m, lte.Config(expert_size=16), example_inputs=(torch.randn(4, 16),))
    with torch.no_grad():  # most experts off in hard mode: the kernel skips them
        for r in lte.routers(m).values():
            r.linear.weight.normal_(0, 0.5)
            r.linear.bias.fill_(-2.0)
    return m


def _inputs():
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(3))
    x[1, 3], x[4, 0], x[5, 2], x[6] = NAN, INF, -INF, NAN
    return x


@pytest.mark.parametrize("mode", ["dense", "soft", "hard"])
def test_nan_and_inf_inputs_give_the_same_non_finite_positions_eager_and_compiled(mlp, mode):
    lte.set_mode(mlp, mode)
    x = _inputs()
    with torch.no_grad():
        eager = mlp(x)
        torch._dynamo.reset()
        lte_backend_mod.history.clear()
        compiled = torch.compile(mlp, backend="lte", options={"lte.inner": "aot_eager"}, fullgraph=True)(x)
    if mode != "dense":
        assert lte_backend_mod.history[-1].rewritten, "the FFN must go through lte::sparse_ffn"
    bad = ~torch.isfinite(eager)
    assert bad.any(-1).tolist() == [False, True, False, False, True, True, True]
    assert torch.equal(bad, ~torch.isfinite(compiled))
    torch.testing.assert_close(compiled[~bad], eager[~bad], rtol=1e-5, atol=1e-5)


def test_op_gives_nan_rows_even_with_every_expert_off():
    T, d, E, B = 3, 8, 2, 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, d, generator=g)
    x[1, 0] = NAN
    w_up, w_down = torch.randn(E * B, d, generator=g), torch.randn(E * B, d, generator=g)
    b_down = torch.randn(d, generator=g)
    gates = torch.zeros(T, E)  # every expert off
    y = torch.ops.lte.sparse_ffn(x, gates, w_up, None, w_down, None, None, b_down, "relu", B, "hard", 0.5)
    assert torch.isnan(y[1]).all() and torch.equal(y[0], b_down) and torch.equal(y[2], b_down)


def test_gate_stats_leave_nan_gates_out_of_every_count():
    g = torch.tensor([[[0.9, 0.1], [NAN, NAN], [0.2, 0.3]]])  # [b=1, s=3, E=2]
    stats = gate_stats({"ffn": g}, 0.5)
    assert stats.off == {"ffn": 3.0} and stats.total == {"ffn": 4.0} and stats.tokens == {"ffn": 2.0}
    assert stats.overall() == 0.75 and stats.active_per_token() == {"ffn": 0.5}
    masked = gate_stats({"ffn": g}, 0.5, attention_mask=torch.tensor([[1, 1, 0]]))
    assert masked.off == {"ffn": 1.0} and masked.tokens == {"ffn": 1.0}
