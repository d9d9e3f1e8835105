"""Prepare a transformers model for LTE and compile it with the `lte` backend.

    python examples/prepare_and_compile.py
Builds a small Llama from a config (random weights; no download), prepares it, and compares the
compiled sparse model with eager in hard mode.
"""
import time

import torch
import transformers as tf

import lte_compile as lte


def main():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4)
    model = tf.LlamaForCausalLM(cfg).eval()
    lte.prepare(model, lte.Config(expert_size=32))
    for path, r in lte.routers(model).items():
        print(f"{path}: {r.num_experts} experts x {r.expert_size} neurons, act={r.spec.activation}")
    lte.set_mode(model, "hard")  # mask G > tau (routers are untrained here: about half the experts on)
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        eager = model(ids).logits
        start = time.perf_counter()
        fast = torch.compile(model, backend="lte", fullgraph=True)
        compiled = fast(ids).logits
        print(f"compiled in {time.perf_counter() - start:.1f} s; max |compiled - eager| = "
              f"{(compiled - eager).abs().max().item():.2e}")
        active = torch.cat([(g > 0.5).float().flatten() for g in lte.gates(model).values()]).mean()
        print(f"experts active: {active.item():.0%}")


if __name__ == "__main__":
    main()
