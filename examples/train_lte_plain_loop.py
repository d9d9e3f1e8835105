"""LTE in your own PyTorch loop: `loss_terms` gives the stage-1 objective, `gate_stats` the sparsity.

    python examples/train_lte_plain_loop.py
Uses the project's small Shakespeare LM. `lte.train` does all of this (and the target-sparsity
controller, checkpoints, DDP); this is the shape of it for people who keep their own loop.
"""
import torch

import lte_compile as lte
from lte_compile.data import TokenBatches
from lte_compile.lm import corpus_tokens, load_small_lm
from lte_compile.losses import gate_stats, loss_terms


def main(stage1_steps: int = 30, stage2_steps: int = 20, eta: float = 8.0) -> None:
    torch.set_num_threads(2)
    model, tok = load_small_lm("llama")
    train_ids, _ = corpus_tokens(tok)
    batches = TokenBatches(train_ids, seq_len=128, batch_size=8)
    lte.prepare(model, lte.Config(expert_size=32))
    model.train()

    # Stage 1: soft gates; routers in their own group (paper: lr 1e-2, weight decay 0.1).
    lte.set_mode(model, "soft")
    router_params = [p for r in lte.routers(model).values() for p in r.parameters()]
    ids = {id(p) for p in router_params}
    opt = torch.optim.AdamW([
        {"params": [p for p in model.parameters() if id(p) not in ids], "lr": 2e-4, "weight_decay": 0.0},
        {"params": router_params, "lr": 1e-2, "weight_decay": 0.1},
    ])
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
    for p in router_params:
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
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
