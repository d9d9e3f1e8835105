"""The rewrite pass seen through a recording backend (as vLLM's TestBackend): what it does to a
Dynamo graph, op by op, and that it is idempotent and compiles once per shape."""
from __future__ import annotations

import copy

import torch

import lte_compile as lte
from lte_compile import backend as lte_backend_mod
from lte_compile.passes import find_ffns
from lte_compile.passes.rewrite import lte_ffn_region, lte_routed_ffn_region, rewrite_ffns
from tests.api.conftest import build, ids, run

APPLY_GATES = "lte.apply_gates"
REGION = lte_ffn_region.__name__
ROUTED = lte_routed_ffn_region.__name__


def _count(gm: torch.fx.GraphModule, name: str) -> int:
    """Calls of the op or function `name` (by name: a deep-copied graph holds copied op objects)."""
    names = (name, f"{name}.default")
    return sum(1 for n in gm.graph.nodes if n.op == "call_function"
               and (str(n.target) in names or getattr(n.target, "__name__", None) == name))


class RecordingBackend:
    """Runs the `lte` backend (eager lowering) and keeps each graph before and after the rewrite."""

    def __init__(self):
        self.before: list[torch.fx.GraphModule] = []
        self.after: list[torch.fx.GraphModule] = []

    def __call__(self, gm, example_inputs):
        self.before.append(copy.deepcopy(gm))
        fn = lte_backend_mod.lte_backend(gm, example_inputs, options={"lte.inner": "eager"})
        self.after.append(gm)
        return fn


def _prepared_llama(mode="hard"):
    model = lte.prepare(build("llama"))
    with torch.no_grad():
        for r in lte.routers(model).values():
            r.linear.weight.normal_(0, 0.5)
    return lte.set_mode(model, mode)


def test_rewrite_replaces_every_marker_and_compiles_once():
    model = _prepared_llama()
    torch._dynamo.reset()
    rec = RecordingBackend()
    fast = torch.compile(model, backend=rec, fullgraph=True)
    x = ids(2, 7)
    with torch.no_grad():
        ref = run(model, x)
        out1, out2 = run(fast, x), run(fast, ids(2, 7, seed=2))
    n_ffns = len(lte.routers(model))
    assert len(rec.before) == 1, "a fixed shape compiles exactly once"
    before, after = rec.before[0], rec.after[0]
    assert _count(before, APPLY_GATES) == n_ffns and _count(before, REGION) == 0
    assert _count(after, APPLY_GATES) == 0, "no apply_gates marker survives the rewrite"
    # hard mode under no_grad: one fused op per FFN with its router inside (no sigmoid left)
    assert _count(after, ROUTED) == n_ffns and _count(after, REGION) == 0, "one fused sparse FFN per prepared FFN"
    assert _count(before, "sigmoid") == n_ffns and _count(after, "sigmoid") == 0
    after.graph.lint()
    torch.testing.assert_close(out1, ref, atol=1e-5, rtol=1e-4)
    assert out2.shape == out1.shape


def test_rewrite_keeps_the_router_outside_when_grad_is_on():
    """Grad enabled (soft mode, training): `lte_ffn_region` on the autograd op, router nodes kept."""
    model = _prepared_llama("soft")
    torch._dynamo.reset()
    rec = RecordingBackend()
    run(torch.compile(model, backend=rec, fullgraph=True), ids(1, 5))
    after = rec.after[0]
    n_ffns = len(lte.routers(model))
    regions = [n for n in after.graph.nodes if getattr(n.target, "__name__", None) == REGION]
    assert len(regions) == n_ffns and not any(n.kwargs["inference"] for n in regions)
    assert _count(after, ROUTED) == 0 and _count(after, "sigmoid") == n_ffns


def test_rewrite_is_idempotent():
    model = _prepared_llama()
    torch._dynamo.reset()
    rec = RecordingBackend()
    with torch.no_grad():
        run(torch.compile(model, backend=rec, fullgraph=True), ids(1, 5))
    gm = rec.after[0]
    code = gm.code
    again = rewrite_ffns(gm, find_ffns(gm))
    assert not again.modified and again.rewritten == [] and gm.code == code
