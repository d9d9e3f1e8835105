"""torch.compile(model, backend="lte"): rewrites prepared FFNs into lte::sparse_ffn, matches eager.

Inductor compiles cost 5-15 s each on 2 cores: one prepared Llama is shared by the tests of this
module, and each test compiles at most once.
"""
import logging
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch

import lte_compile as lte
from lte_compile import backend as lte_backend_mod
from tests.api.conftest import build, ids, run


@pytest.fixture(scope="module")
def prepared_llama():
    model = lte.prepare(build("llama"))
    with torch.no_grad():  # a random router with a spread of gates: some experts on, some off
        for r in lte.routers(model).values():
            r.linear.weight.normal_(0, 0.5)
    return model


def compile_lte(model, **kw):
    torch._dynamo.reset()
    lte_backend_mod.history.clear()
    return torch.compile(model, backend="lte", **kw)


def test_entry_point_is_registered():
    names = {ep.name: ep.value for ep in entry_points(group="torch_dynamo_backends")}
    assert names.get("lte") == "lte_compile.backend:lte_backend"


def test_backend_found_without_importing_lte_compile():
    """A fresh interpreter resolves backend='lte' through the entry point alone."""
    code = ("import torch, sys\n"
            "m = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))\n"
            "f = torch.compile(m, backend='lte', options={'lte.inner': 'eager'})\n"
            "x = torch.randn(2, 8)\n"
            "assert torch.allclose(f(x), m(x))\n"
            "assert 'lte_compile.backend' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_compiled_matches_eager_with_inductor(prepared_llama, mode):
    lte.set_mode(prepared_llama, mode)
    x = ids(2, 9)
    with torch.no_grad():
        ref = run(prepared_llama, x)
        fast = compile_lte(prepared_llama, fullgraph=True)
        out = run(fast, x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    rec = lte_backend_mod.history[-1]
    assert rec.rewritten == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert rec.inner == "inductor"
    assert rec.inference, "compiled under no_grad: the FFNs call the ops without autograd"
    assert rec.fused_routers == (rec.rewritten if mode == "hard" else []), "hard mode: routers in the op"
    if mode == "hard":  # the fused op hands back the gates the router stores, as eager does
        compiled_gates = {k: v.clone() for k, v in lte.gates(prepared_llama).items()}
        run(prepared_llama, x)
        for k, v in lte.gates(prepared_llama).items():
            torch.testing.assert_close(compiled_gates[k], v, atol=1e-6, rtol=1e-5)
    gates = lte.gates(prepared_llama)["model.layers.0.mlp"]
    on = (gates > 0.5).float().mean().item()
    assert 0.0 < on < 1.0, f"the test needs a ragged mask, got {on:.2f} experts on"


def test_compiled_dynamic_shapes_match_eager(prepared_llama):
    lte.set_mode(prepared_llama, "hard")
    fast = compile_lte(prepared_llama, dynamic=True, options={"lte.inner": "aot_eager"})
    with torch.no_grad():
        for seq in (5, 11):
            x = ids(1, seq, seed=seq)
            torch.testing.assert_close(run(fast, x), run(prepared_llama, x), atol=1e-5, rtol=1e-4)
    assert all(r.rewritten for r in lte_backend_mod.history)


def test_backward_through_compiled_soft_mode(prepared_llama):
    """Soft mode trains through the compiled graph: gradients of routers and FFN weights match eager."""
    lte.set_mode(prepared_llama, "soft")
    x = ids(2, 6)
    params = [r.linear.weight for r in lte.routers(prepared_llama).values()]
    params += [prepared_llama.model.layers[0].mlp.down_proj.weight, prepared_llama.model.layers[1].mlp.gate_proj.weight]

    def grads(model):
        loss = run(model, x).square().mean()
        return torch.autograd.grad(loss, params)

    ref = grads(prepared_llama)
    got = grads(compile_lte(prepared_llama, fullgraph=True, options={"lte.inner": "aot_eager"}))
    assert lte_backend_mod.history[-1].rewritten
    assert not lte_backend_mod.history[-1].inference  # grad enabled: the op with autograd
    for i, (a, b) in enumerate(zip(got, ref)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=f"grad {i}")


def test_dense_mode_compiles_like_inductor(prepared_llama):
    lte.set_mode(prepared_llama, "dense")
    x = ids(2, 5)
    with torch.no_grad():
        fast = compile_lte(prepared_llama, options={"lte.inner": "aot_eager"})
        torch.testing.assert_close(run(fast, x), run(prepared_llama, x))
    assert lte_backend_mod.history[-1].rewritten == []


def test_unprepared_model_logs_that_no_ffn_has_a_router(caplog):
    model, x = build("gpt2"), ids(1, 5)
    with caplog.at_level(logging.INFO, logger="lte_compile.backend"), torch.no_grad():
        out = run(compile_lte(model, options={"lte.inner": "aot_eager"}), x)
        torch.testing.assert_close(out, run(model, x))
    assert "found 2 FFN(s), none has a router" in caplog.text


def test_unknown_lte_option_is_rejected():
    from lte_compile.backend import BackendOptions
    with pytest.raises(lte.ConfigError, match="lte.bogus"):
        BackendOptions.split({"lte.bogus": 1})
    ours, inductor = BackendOptions.split({"lte.inner": "eager", "max_autotune": False})
    assert ours.inner == "eager" and inductor == {"max_autotune": False}


def test_generate_with_compiled_forward_gives_eager_tokens(prepared_llama):
    """generate() calls the compiled forward for prefill and decode shapes: same greedy tokens."""
    lte.set_mode(prepared_llama, "hard")
    prompt = ids(1, 4)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    ref = prepared_llama.generate(prompt, **kw)
    torch._dynamo.reset()
    lte_backend_mod.history.clear()
    eager_forward = prepared_llama.forward
    prepared_llama.forward = torch.compile(eager_forward, backend="lte", options={"lte.inner": "aot_eager"})
    try:
        out = prepared_llama.generate(prompt, **kw)
    finally:
        prepared_llama.forward = eager_forward
    assert torch.equal(out, ref)
    assert lte_backend_mod.history and all(len(r.rewritten) == 2 for r in lte_backend_mod.history)


def test_static_cache_decode_keeps_the_cache_writes(prepared_llama):
    """Regression: the rewrite ran graph-wide dead-code elimination, which dropped the user-less
    in-place `index_copy_` writes into a StaticCache, so compiled decoding repeated one token."""
    from transformers import StaticCache

    lte.set_mode(prepared_llama, "hard")

    def decode(fn, n=6):
        cache = StaticCache(config=prepared_llama.config, max_cache_len=16)
        with torch.no_grad():
            out = prepared_llama(input_ids=torch.tensor([[5, 6, 7, 8]]), past_key_values=cache,
                                 cache_position=torch.arange(4), use_cache=True)
            tokens = [out.logits[:, -1:].argmax(-1)]
            for i in range(n):
                out = fn(input_ids=tokens[-1], past_key_values=cache, cache_position=torch.tensor([4 + i]),
                         use_cache=True)
                tokens.append(out.logits[:, -1:].argmax(-1))
        return [int(t) for t in tokens]

    ref = decode(prepared_llama.forward)
    torch._dynamo.reset()
    got = decode(torch.compile(prepared_llama.forward, backend="lte", options={"lte.inner": "aot_eager"}))
    assert got == ref
    assert len(set(ref)) > 1, "the check needs a decode that does not repeat one token"


@pytest.mark.parametrize("arch", ["gpt2", "phi3", "bert", "opt", "t5_gated", "gemma"])
def test_rewrite_handles_every_ffn_form(arch):
    """Conv1D (transposed weights), fused gate_up rows, split FFN, biases, GeGLU: the rewritten graph
    (lowered with aot_eager to keep it cheap) equals eager hard mode on a ragged mask."""
    model = lte.prepare(build(arch))
    with torch.no_grad():
        for r in lte.routers(model).values():
            r.linear.weight.normal_(0, 0.5)
    lte.set_mode(model, "hard")
    x = ids(2, 6)
    with torch.no_grad():
        ref = run(model, x)
        out = run(compile_lte(model, options={"lte.inner": "aot_eager"}), x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    rewritten = {m for r in lte_backend_mod.history for m in r.rewritten}
    assert rewritten == set(lte.routers(model)), "every prepared FFN must be rewritten"
