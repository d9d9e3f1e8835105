"""The rewrite as an Inductor custom pass (passes/inductor_pass.py): `backend="inductor"` with
`options={"pre_grad_custom_pass": LTERewritePass()}` runs lte::sparse_ffn and matches eager."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lte_compile.passes import LTERewritePass
from tests import models


def test_hard_mode_inference_runs_sparse_ffn(op_calls):
    """Two stacked SwiGLU FFNs (FFN 1 reads FFN 0's output): both become lte::sparse_ffn."""
    torch._dynamo.reset()
    stack, x = models.prepared_glu_stack(expert_size=32, mode="hard"), models.tokens()
    with torch.no_grad():
        eager = stack(x)
        lte_pass = LTERewritePass(strict=True)
        compiled = torch.compile(stack, backend="inductor", options={"pre_grad_custom_pass": lte_pass})
        y = compiled(x)
    assert op_calls == ["silu", "silu"]
    (record,) = lte_pass.records
    assert (record.ffns_found, record.prepared, record.rewritten, record.skipped) == (2, 2, ["0", "1"], [])
    torch.testing.assert_close(y, eager, atol=1e-5, rtol=1e-5)


def test_soft_mode_training_uses_the_ops_backward(op_calls):
    """The pre-grad hook runs before AOTAutograd: the backward is lte::sparse_ffn's own formula,
    and every gradient (weights, router) equals eager's."""
    torch._dynamo.reset()
    stack, x = models.prepared_glu_stack(expert_size=16, mode="soft"), models.tokens(seq=3)
    params = dict(stack.named_parameters())
    eager_loss = stack(x).square().sum()
    eager_grads = torch.autograd.grad(eager_loss, list(params.values()))
    lte_pass = LTERewritePass(strict=True)
    compiled = torch.compile(stack, backend="inductor", options={"pre_grad_custom_pass": lte_pass})
    loss = compiled(x).square().sum()
    grads = torch.autograd.grad(loss, list(params.values()))
    assert len(op_calls) == 2 and lte_pass.records[-1].rewritten == ["0", "1"]
    torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)
    for name, g, ref in zip(params, grads, eager_grads):
        torch.testing.assert_close(g, ref, atol=1e-5, rtol=1e-4, msg=lambda m: f"d{name}: {m}")


def test_uuid_is_stable_and_keyed_by_options():
    """Inductor's cache key: same source + options -> same uuid (also in a fresh process)."""
    a, b = LTERewritePass(), LTERewritePass()
    assert a.uuid() == b.uuid() and isinstance(a.uuid(), bytes)
    assert LTERewritePass(strict=True).uuid() != a.uuid()
    assert LTERewritePass(rewrite=False).uuid() != a.uuid()
    code = "from lte_compile.passes import LTERewritePass; print(LTERewritePass().uuid().hex())"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == a.uuid().hex()


def test_pass_on_a_graph_without_owner_is_refused():
    with pytest.raises(TypeError, match="GraphModule"):
        LTERewritePass()(torch.fx.Graph())
