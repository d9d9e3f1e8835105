"""Issue 11 defect 7: lte::sparse_ffn follows autocast like the linear ops it replaces, so an
lte-compiled model returns the dtype eager returns (and close values) inside torch.autocast."""
import pytest
import torch

import lte_compile as lte
from lte_compile import backend as lte_backend_mod
from tests.models import MLP


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    m = MLP(16, 64).eval()
    lte.prepare(m, lte.Config(expert_size=16), example_inputs=(torch.randn(4, 16),))
    with torch.no_grad():
        for r in lte.routers(m).values():
            r.linear.weight.normal_(0, 0.5)
    return m


@pytest.mark.parametrize("mode", ["soft", "hard"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_output_dtype_and_values_follow_autocast_like_eager(mlp, mode, dtype):
    lte.set_mode(mlp, mode)
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    lte_backend_mod.history.clear()
    compiled = torch.compile(mlp, backend="lte", options={"lte.inner": "aot_eager"}, fullgraph=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        eager, got = mlp(x), compiled(x)
    assert lte_backend_mod.history[-1].rewritten
    assert eager.dtype == got.dtype == dtype
    torch.testing.assert_close(got.float(), eager.float(), rtol=2e-2, atol=2e-2)
    with torch.no_grad():  # outside autocast: fp32 again
        assert compiled(x).dtype == torch.float32


def test_op_casts_to_the_autocast_dtype_and_backward_runs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, generator=g, requires_grad=True)
    gates = torch.rand(3, 2, generator=g, requires_grad=True)
    w_up, w_down = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.ops.lte.sparse_ffn(x, gates, w_up, None, w_down, None, None, None, "relu", 4, "soft", 0.5)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and gates.grad is not None
