"""LTE in your own PyTorch loop: `loss_terms` gives the stage-1 objective, `gate_stats` the sparsity.

    python examples/train_lte_plain_loop.py
Uses the project's small Shakespeare LM. `lte.train` does all of this (and the target-sparsity
controller, checkpoints, DDP); this is the shape of it for people who keep their own loop.
"""
import torch

import lte_compile as lte
from lte_compile.training import TokenBatches, adamw_groups
from lte_compile.small_lm.model import corpus_tokens, load_small_lm
from lte_compile.training.losses import gate_stats, loss_terms


def main(stage1_steps: int = 30, stage2_steps: int = 20, eta: float = 8.0) -> None:
    torch.set_num_threads(2)
    model, tok = load_small_lm("llama")
    train_ids, _ = corpus_tokens(tok)
    batches = TokenBatches(train_ids, seq_len=128, batch_size=8)
    lte.prepare(model, lte.Config(expert_size=32))
    model.train()

    # Stage 1: soft gates; routers in their own group (paper: lr 1e-2, weight decay 0.1).
    lte.set_mode(model, "soft")
    opt = torch.optim.AdamW(adamw_groups(model, lr=2e-4, router_lr=1e-2, router_weight_decay=0.1))
    for step in range(stage1_steps):
        batch = next(batches)
        out = model(**batch)
        terms = loss_terms(model, out.loss, eta=eta, lam=0.5, attention_mask=batch["attention_mask"])
        terms.total.backward()
        opt.step(), opt.zero_grad()
        stats = gate_stats(lte.gates(model), tau=0.5, attention_mask=batch["attention_mask"])
        print(f"stage 1 step {step}: {terms.as_floats()} sparsity {stats.overall():.3f}")

    # Stage 2: hard mask, routers frozen, task loss only.
    lte.set_mode(model, "hard")
    for r in lte.routers(model).values():
        r.requires_grad_(False)
    opt = torch.optim.AdamW(adamw_groups(model, lr=1e-4))  # no router_lr: routers in no group
    for step in range(stage2_steps):
        batch = next(batches)
        loss = model(**batch).loss
        loss.backward()
        opt.step(), opt.zero_grad()
        stats = gate_stats(lte.gates(model), tau=0.5, attention_mask=batch["attention_mask"])
        print(f"stage 2 step {step}: task {loss.item():.3f} sparsity {stats.overall():.3f} "
              f"active/token {stats.active_per_token()}")


if __name__ == "__main__":
    main()
