"""Helpers for the prepare/backend/CLI tests; the tiny models themselves come from tests/models.py."""
import torch

from tests.models import VOCAB, hf_model as build  # noqa: F401  (build(name, seed) -> tiny model)


def ids(batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def run(model, input_ids):
    kw = {"decoder_input_ids": input_ids} if model.config.is_encoder_decoder else {}
    out = model(input_ids=input_ids, **kw)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def tiny_mlp():
    """A `module:callable` target for `lte inspect`: (model, example_inputs)."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))
    return mlp, (torch.randn(2, 16),)
