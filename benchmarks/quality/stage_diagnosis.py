"""Where LTE's quality goes, stage by stage (issue 9 diagnosis, sessions 4-5).

    python benchmarks/quality/stage_diagnosis.py TARGET VARIANT [VARIANT ...]
    e.g.  ... 0.8 lte,init=keep lte lte,kd=1 lte,lr1=0 lte,s1=40,s2=80

A VARIANT is `lte` plus comma-separated options: init=fit|keep (router_init), kd=W (kd_weight),
kds=stage1|stage2|both (kd_stages), s1=/s2= (stage steps), lr1=/lr2= (model lr per stage), rlr=
(router lr), eta=, lam=, s2seeds=0:1 (stage 2 is run from a copy of the stage-1 model once per
seed: seed 0 re-reads stage 1's first batches, another seed reads other ones), ste=1 (stage 1's
gates straight-through: the forward multiplies by the 0/1 mask as stage 2 does, the backward
gives the gates the soft-mode gradient; a diagnosis switch, patched into the reference's
`expert_scale` for this process, not a library option: it did not help, README). On the shipped Llama with `lte compare`'s budget (80 + 40
steps, batch 8 x 256, one thread) it prints one JSON line after stage 1 and after each stage 2:
held-out (ppl, sparsity) in hard, soft and dense mode of the same weights -- the dense column shows
how far training moved the model itself. Numbers from sessions 4-5 are in README's quality section.
"""
from __future__ import annotations

import contextlib
import copy
import json
import sys
import time
from dataclasses import replace

import torch

import lte_compile as lte
from lte_compile.training.compare import SweepSettings, load_model_and_data
from lte_compile.training.config import TrainConfig
from lte_compile.training.driver import train
from lte_compile.kernels import reference
from lte_compile.training.evaluate import evaluate

OPTIONS = {"kd": ("kd_weight", float), "s1": ("stage1_steps", int), "s2": ("stage2_steps", int),
           "lr1": ("model_lr", float), "lr2": ("stage2_lr", float), "rlr": ("router_lr", float),
           "eta": ("eta", float), "lam": ("lam", float), "init": ("router_init", str), "kds": ("kd_stages", str)}
"""VARIANT option -> (TrainConfig field, type); `s2seeds` and `ste` are handled apart."""


def parse_variant(variant: str, base: TrainConfig) -> tuple[TrainConfig, list[int], bool]:
    """'lte,kd=1,s2seeds=0:1' -> (the config with its overrides, stage-2 seeds, straight-through)."""
    opts = dict(item.split("=") for item in variant.split(",")[1:])
    seeds = [int(x) for x in opts.pop("s2seeds", "1").split(":")]
    ste = opts.pop("ste", "0") == "1"
    unknown = set(opts) - set(OPTIONS)
    if unknown:
        raise SystemExit(f"unknown option(s) {sorted(unknown)} in {variant!r}; known: {sorted(OPTIONS)}, s2seeds, ste")
    return replace(base, **{OPTIONS[k][0]: OPTIONS[k][1](v) for k, v in opts.items()}), seeds, ste


@contextlib.contextmanager
def straight_through(on: bool):
    """Soft-mode gates as mask + (G - G.detach()): the value of the 0/1 mask, the gradient of G.
    `apply_gates`' forward and backward both scale by `expert_scale`, so patching it is the whole
    change (the losses and statistics read the router's real G)."""
    original = reference.expert_scale

    def expert_scale(gates, mode, tau, dtype):
        if mode != "soft":
            return original(gates, mode, tau, dtype)
        g = gates.to(dtype)
        return (gates > tau).to(dtype) + g - g.detach()

    reference.expert_scale = expert_scale if on else original
    try:
        yield
    finally:
        reference.expert_scale = original


def held_out(model, val_ids, mode: str) -> tuple[float, float]:
    e = evaluate(model, val_ids, mode=mode, seq_len=256, batch_size=8, max_batches=8)
    return round(e["ppl"], 2), round(e.get("sparsity", 0.0), 3)


def report(tag: str, target: float, model, val_ids) -> None:
    """One JSON line: held-out (ppl, sparsity) of the same weights in each mode; leaves hard mode."""
    rec = {"target": target, "tag": tag, **{mode: held_out(model, val_ids, mode) for mode in ("hard", "soft", "dense")}}
    lte.set_mode(model, "hard")
    print(json.dumps(rec), flush=True)


def main() -> None:
    torch.set_num_threads(1)
    target, variants = float(sys.argv[1]), sys.argv[2:]
    dense, train_ids, val_ids, _ = load_model_and_data("llama", False)
    base = copy.deepcopy(dense)
    lte.prepare(base, lte.Config(expert_size=32))
    budget = SweepSettings(targets=(target,), progress=False).train_config()
    for variant in variants:
        start = time.time()
        cfg, seeds, ste = parse_variant(variant, budget)
        model = copy.deepcopy(base)
        with straight_through(ste):
            train(model, train_ids, replace(cfg, stage2_steps=0, target_sparsity=target), eval_data=val_ids)
            report(f"{variant}:after_s1", target, model, val_ids)
        for seed in seeds:  # stage 2 from a copy of the stage-1 model, per seed of the batch order
            tuned = copy.deepcopy(model)
            train(tuned, train_ids, replace(cfg, stage1_steps=0, target_sparsity=target, seed=seed), eval_data=val_ids)
            report(f"{variant}:after_s2 seed{seed} ({time.time() - start:.0f}s)", target, tuned, val_ids)


if __name__ == "__main__":
    main()
