"""Tiny transformers models (random weights, built from configs) for the prepare/backend tests."""
import pytest
import torch
import transformers as tf

D, FF, VOCAB = 64, 128, 256  # FF = 4 experts of 32


def _cfg(name: str):
    common = dict(vocab_size=VOCAB)
    if name == "llama":
        return tf.LlamaForCausalLM, tf.LlamaConfig(hidden_size=D, intermediate_size=FF, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2, **common)
    if name == "phi3":
        return tf.Phi3ForCausalLM, tf.Phi3Config(hidden_size=D, intermediate_size=FF, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=4,
                                                 pad_token_id=0, bos_token_id=0, eos_token_id=0, **common)
    if name == "gpt2":
        return tf.GPT2LMHeadModel, tf.GPT2Config(n_embd=D, n_inner=FF, n_layer=2, n_head=4,
                                                 bos_token_id=0, eos_token_id=0, **common)
    if name == "opt":
        return tf.OPTForCausalLM, tf.OPTConfig(hidden_size=D, ffn_dim=FF, num_hidden_layers=2, num_attention_heads=4,
                                               word_embed_proj_dim=D, pad_token_id=0, **common)
    if name == "bert":
        return tf.BertModel, tf.BertConfig(hidden_size=D, intermediate_size=FF, num_hidden_layers=2,
                                           num_attention_heads=4, **common)
    if name == "t5":
        return tf.T5ForConditionalGeneration, tf.T5Config(d_model=D, d_ff=FF, d_kv=16, num_layers=1, num_heads=4,
                                                          decoder_start_token_id=0, **common)
    raise KeyError(name)


def build(name: str, seed: int = 0) -> torch.nn.Module:
    cls, cfg = _cfg(name)
    torch.manual_seed(seed)
    return cls(cfg).eval()


def ids(batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def run(model, input_ids):
    kw = {"decoder_input_ids": input_ids} if model.config.is_encoder_decoder else {}
    out = model(input_ids=input_ids, **kw)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture
def tiny():
    return build


def tiny_mlp():
    """A `module:callable` target for `lte inspect`: (model, example_inputs)."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))
    return mlp, (torch.randn(2, 16),)
