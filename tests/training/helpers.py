"""Tiny models and token data shared by the training tests (hidden 64, 2 layers, vocab 256)."""
from __future__ import annotations

import copy

import torch

import lte_compile as lte


_PREPARED: dict = {}
"""(seed, expert_size, lte kwargs) -> (prepared model, torch RNG state right after building it)."""


def tiny_llama(seed: int = 0, *, prepare: bool = True, expert_size: int = 16, **lte_kw):
    """LlamaForCausalLM, d 64, d_ff 256 (16 experts of 16 per layer), 2 layers, vocab 256.

    A prepared model is built once per arguments and deep-copied after that: `lte.prepare` traces
    the model with Dynamo (~2 s; this helper is called ~40 times), a copy takes milliseconds and is
    a supported way to duplicate a prepared model (tests/api/test_prepare.py). torch's RNG is left
    as a fresh build leaves it, so the tests draw the same numbers either way."""
    key = (seed, expert_size, tuple(sorted(lte_kw.items())))
    if prepare and key in _PREPARED:
        model, rng = _PREPARED[key]
        torch.set_rng_state(rng)
        return copy.deepcopy(model)
    model = _build_tiny_llama(seed)
    if prepare:
        lte.prepare(model, lte.Config(expert_size=expert_size, **lte_kw))
        _PREPARED[key] = (copy.deepcopy(model), torch.get_rng_state())
    return model


def _build_tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, pad_token_id=0, bos_token_id=0, eos_token_id=0))


def token_stream(n: int = 6000, seed: int = 0) -> torch.Tensor:
    """A learnable token stream: a noisy repeating pattern over 256 ids (not uniform noise)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.arange(n) * 7 % 251
    noise = torch.randint(0, 256, (n,), generator=g)
    keep = torch.rand(n, generator=g) < 0.8
    return torch.where(keep, base, noise)


FAST = dict(seq_len=32, batch_size=4, eval_batches=2, calibration_batches=2, progress=False, plots=False,
            warmup_steps=2)
"""TrainConfig overrides that keep every test run to a second or two."""
