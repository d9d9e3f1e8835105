"""Where LTE's quality goes, stage by stage (issue 9 diagnosis, session 4).

    python benchmarks/quality/stage_diagnosis.py TARGET VARIANT [VARIANT ...]
    e.g.  ... 0.8 lte,init=keep lte lte,kd=1 lte,lr1=0 lte,s1=40,s2=80

A VARIANT is `lte` plus comma-separated options: init=fit|keep (router_init), kd=W (kd_weight),
s1=/s2= (stage steps), lr1=/lr2= (model lr per stage), rlr= (router lr), eta=, lam=, s2seeds=0:1
(stage 2 is run from a copy of the stage-1 model once per seed: seed 0 re-reads stage 1's first
batches, another seed reads other ones). On the shipped Llama with `lte compare`'s budget (80 + 40
steps, batch 8 x 256, one thread) it prints one JSON line after stage 1 and after each stage 2:
held-out (ppl, sparsity) in hard, soft and dense mode of the same weights -- the dense column shows
how far training moved the model itself. Numbers from session 4 are in README's quality section.
"""
import copy, json, sys, time
import torch
torch.set_num_threads(1)
import lte_compile as lte
from lte_compile.training.compare import load_model_and_data, SweepSettings
from lte_compile.training.driver import train
from lte_compile.training.evaluate import evaluate
from dataclasses import replace

target = float(sys.argv[1]); variants = sys.argv[2:]
dense, train_ids, val_ids, _ = load_model_and_data("llama", False)
st = SweepSettings(targets=(target,), progress=False)
base = copy.deepcopy(dense); lte.prepare(base, lte.Config(expert_size=32))
cfg = st.train_config()

def ev(model, mode):
    e = evaluate(model, val_ids, mode=mode, seq_len=256, batch_size=8, max_batches=8)
    return round(e["ppl"], 2), round(e.get("sparsity", 0.0), 3)

def report(tag, model):
    rec = {"target": target, "tag": tag, "hard": ev(model, "hard"), "soft": ev(model, "soft"), "dense": ev(model, "dense")}
    lte.set_mode(model, "hard")
    print(json.dumps(rec), flush=True)

for v in variants:
    t0 = time.time()
    model = copy.deepcopy(base)
    c = cfg
    opts = dict(x.split("=") for x in v.split(",")[1:])
    name = v.split(",")[0]
    if "kd" in opts: c = replace(c, kd_weight=float(opts["kd"]))
    if "s1" in opts: c = replace(c, stage1_steps=int(opts["s1"]))
    if "s2" in opts: c = replace(c, stage2_steps=int(opts["s2"]))
    if "lr1" in opts: c = replace(c, model_lr=float(opts["lr1"]))
    if "lr2" in opts: c = replace(c, stage2_lr=float(opts["lr2"]))
    if "rlr" in opts: c = replace(c, router_lr=float(opts["rlr"]))
    if "eta" in opts: c = replace(c, eta=float(opts["eta"]))
    if "lam" in opts: c = replace(c, lam=float(opts["lam"]))
    if "init" in opts: c = replace(c, router_init=opts["init"])
    r1 = train(model, train_ids, replace(c, stage2_steps=0, target_sparsity=target), eval_data=val_ids)
    report(v + ":after_s1", model)
    for s2seed in [int(x) for x in opts.get("s2seeds", "1").split(":")]:
        m2 = copy.deepcopy(model)
        c2 = replace(c, stage1_steps=0, target_sparsity=target, seed=s2seed)
        r2 = train(m2, train_ids, c2, eval_data=val_ids)
        report(v + f":after_s2 seed{s2seed} ({time.time()-t0:.0f}s)", m2)
