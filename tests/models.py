"""Tiny models shared by the tests: transformers configs with random weights, hand-written FFNs.

Every HF model has vocab 256, hidden 64, FFN width 128 (GPT-2: 4 x 64 = 256), 2 layers, 4 heads,
and is built in eval mode from a fixed seed; nothing is downloaded (HF_HUB_OFFLINE=1).
`hf_model(name)` builds one, `hf_inputs(name)` gives the keyword inputs of its forward
(`use_cache=False` where a cache exists, which torch.export needs).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB, HIDDEN, FFN, LAYERS, HEADS, SEQ = 256, 64, 128, 2, 4, 8

_DECODER = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, max_position_embeddings=64)
_IDS = dict(pad_token_id=0, bos_token_id=0, eos_token_id=0)

# name -> (config class, model class, config kwargs); classes named as strings so that importing
# this module does not import transformers.
HF_SPECS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_DECODER, num_key_value_heads=2)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_DECODER, num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_DECODER, num_key_value_heads=2)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_DECODER, num_key_value_heads=2, head_dim=16)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_DECODER, num_key_value_heads=2, **_IDS)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS,
                                                   n_head=HEADS, n_positions=64, bos_token_id=0, eos_token_id=0)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(_DECODER)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(_DECODER, ffn_dim=FFN, word_embed_proj_dim=HIDDEN, **_IDS)),
    "bert": ("BertConfig", "BertModel", dict(_DECODER)),
    "roberta": ("RobertaConfig", "RobertaModel", dict(_DECODER)),
    "t5": ("T5Config", "T5ForConditionalGeneration",
           dict(vocab_size=VOCAB, d_model=HIDDEN, d_ff=FFN, num_layers=LAYERS, num_heads=HEADS, d_kv=16,
                decoder_start_token_id=0, pad_token_id=0)),
    "t5_gated": ("T5Config", "T5ForConditionalGeneration",
                 dict(vocab_size=VOCAB, d_model=HIDDEN, d_ff=FFN, num_layers=LAYERS, num_heads=HEADS, d_kv=16,
                      decoder_start_token_id=0, pad_token_id=0, feed_forward_proj="gated-gelu")),
}


def hf_model(name: str, seed: int = 0) -> nn.Module:
    """A tiny randomly initialised transformers model (eval mode) of architecture `name`."""
    import transformers

    config_cls, model_cls, kwargs = HF_SPECS[name]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**kwargs)
    return getattr(transformers, model_cls)(config).eval()


def hf_inputs(name: str, batch: int = 1, seq: int = SEQ, seed: int = 0) -> dict[str, Any]:
    """Keyword inputs for `hf_model(name)`: token ids (+ decoder ids for T5), no KV cache."""
    ids = torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
    inputs: dict[str, Any] = {"input_ids": ids}
    if name.startswith("t5"):
        inputs["decoder_input_ids"] = ids
    if name not in ("bert", "roberta"):
        inputs["use_cache"] = False
    return inputs


# ---------------------------------------------------------------------------------------------
# Hand-written FFNs (d = 16, d_ff = 64 unless said otherwise)


def sequential_mlp(d: int = 16, d_ff: int = 64) -> nn.Sequential:
    """`nn.Sequential(Linear, GELU, Linear)`: the FFN has no module of its own."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, d_ff), nn.GELU(), nn.Linear(d_ff, d)).eval()


def _weight(rows: int, cols: int, fan_in: int | None = None) -> nn.Parameter:
    """A random [rows, cols] weight scaled by 1/sqrt(fan_in) (default: cols, the [out, in] layout)."""
    return nn.Parameter(torch.randn(rows, cols) / (fan_in or cols) ** 0.5)


class FunctionalGLU(nn.Module):
    """SwiGLU written with `F.linear` on parameters the module owns (no nn.Linear)."""

    def __init__(self, d: int = 16, d_ff: int = 64):
        super().__init__()
        torch.manual_seed(0)
        self.w_gate, self.w_up, self.w_down = _weight(d_ff, d), _weight(d_ff, d), _weight(d, d_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.w_up) * F.silu(F.linear(x, self.w_gate)), self.w_down)


class MatmulFFN(nn.Module):
    """`x @ W_in.T + b`, tanh-GELU, then `h @ W_out` with W_out stored [d_ff, d] (transposed)."""

    def __init__(self, d: int = 16, d_ff: int = 64):
        super().__init__()
        torch.manual_seed(0)
        self.w_in, self.w_out = _weight(d_ff, d), _weight(d_ff, d, fan_in=d_ff)
        self.b_in = nn.Parameter(torch.randn(d_ff) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x @ self.w_in.T + self.b_in, approximate="tanh") @ self.w_out


class EinsumFFN(nn.Module):
    """An FFN written with `torch.einsum` ('btd,fd->btf', relu, 'btf,df->btd')."""

    def __init__(self, d: int = 16, d_ff: int = 64):
        super().__init__()
        torch.manual_seed(0)
        self.w_in, self.w_out = _weight(d_ff, d), _weight(d, d_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("btf,df->btd", torch.relu(torch.einsum("btd,fd->btf", x, self.w_in)), self.w_out)


class MLP(nn.Module):
    """A two-layer MLP with dropout (symbolic_trace keeps the Linear/Dropout leaves).

    Modules start in training mode: call `.eval()` before comparing outputs."""

    def __init__(self, d: int = 16, d_ff: int = 64, act: nn.Module | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.act, self.down = nn.Linear(d, d_ff), act or nn.ReLU(), nn.Linear(d_ff, d)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.dropout(self.act(self.up(x))))


class SigmoidSiLU(nn.Module):
    """SiLU written out as `x * sigmoid(x)`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class FusedGLU(nn.Module):
    """Phi-3-style fused `gate_up` projection (with bias) split into gate and up in one of
    several spellings; the first half is the gate."""

    SPLITS: dict[str, Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]] = {
        "chunk": lambda h, n: h.chunk(2, dim=-1),
        "split": lambda h, n: torch.split(h, [n, n], dim=-1),
        "slice": lambda h, n: (h[..., :n], h[..., n:]),
        "narrow": lambda h, n: (h.narrow(-1, 0, n), h.narrow(-1, n, n)),
    }

    def __init__(self, split: str = "chunk", d: int = 16, d_ff: int = 64):
        super().__init__()
        torch.manual_seed(0)
        self.split, self.d_ff = self.SPLITS[split], d_ff
        self.gate_up, self.down = nn.Linear(d, 2 * d_ff), nn.Linear(d_ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.split(self.gate_up(x), self.d_ff)
        return self.down(up * F.silu(gate))


class LeakyMLP(MLP):
    """Near miss: the hidden activation is also returned, so the FFN cannot become one op."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.act(self.up(x))
        return self.down(h), h


class TwoInputGLU(nn.Module):
    """Near miss: gate and up read different tensors."""

    def __init__(self, d: int = 16, d_ff: int = 64):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(d, d_ff), nn.Linear(d, d_ff), nn.Linear(d_ff, d)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(z))


class BroadcastGLU(TwoInputGLU):
    """Near miss: a one-feature gate broadcast over the up projection (gate 1, up 64 wide)."""

    def __init__(self, d: int = 16, d_ff: int = 64):
        super().__init__(d, d_ff)
        self.gate = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class _Router(nn.Module):
    def __init__(self, d: int, experts: int, mode: str):
        super().__init__()
        self.lin, self.mode, self.gates = nn.Linear(d, experts), mode, None


class _SwiGLU(nn.Module):
    def __init__(self, d: int, d_ff: int):
        super().__init__()
        self.gate, self.up, self.down = (nn.Linear(d, d_ff, bias=False), nn.Linear(d, d_ff, bias=False),
                                         nn.Linear(d_ff, d, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def prepared_glu_stack(d: int = 16, d_ff: int = 64, expert_size: int = 32, mode: str = "hard",
                       tau: float = 0.5) -> nn.Sequential:
    """Two SwiGLU FFNs with `lte.prepare`-style hooks: a router `sigmoid(linear(x))` computed when
    `up` runs, and `lte.apply_gates(h, G, B, mode, tau)` inserted before `down`."""
    import lte_compile.kernels  # noqa: F401  (registers torch.ops.lte)

    torch.manual_seed(0)
    stack = nn.Sequential(_SwiGLU(d, d_ff), _SwiGLU(d, d_ff)).eval()
    for mlp in stack:
        router = mlp.lte_router = _Router(d, d_ff // expert_size, mode)

        def route(mod, args, out, router=router):
            router.gates = torch.sigmoid(router.lin(args[0]))

        def gate(mod, args, router=router):
            return (torch.ops.lte.apply_gates(args[0], router.gates, expert_size, router.mode, tau),)

        mlp.up.register_forward_hook(route)
        mlp.down.register_forward_pre_hook(gate)
    return stack


def tokens(d: int = 16, batch: int = 2, seq: int = 5, seed: int = 0) -> torch.Tensor:
    """A [batch, seq, d] activation input for the hand-written modules."""
    return torch.randn(batch, seq, d, generator=torch.Generator().manual_seed(seed))


HANDWRITTEN: dict[str, Callable[[], nn.Module]] = {
    "sequential": sequential_mlp, "functional_glu": FunctionalGLU, "matmul": MatmulFFN,
    "einsum": EinsumFFN, "mlp": lambda: MLP().eval(),
}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's state_dict, to check later that nothing changed."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """The model's state_dict is bit-identical (keys, dtypes, values) to `snapshot`'s copy."""
    now = model.state_dict()
    assert set(now) == set(before), "tensors were added or removed"
    for k, v in before.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), f"{k} changed"
