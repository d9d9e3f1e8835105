"""`make demo`: LTE end to end on the project's own small Shakespeare LM, on a CPU, in minutes.

    python -m lte_compile.small_lm.demo [--steps1 150] [--steps2 100] [--target 0.5] [--threads 1]

1. Load the shipped Llama-style LM (lte_compile/small_lm/assets/llama) and its BPE tokenizer.
2. Validation perplexity of the dense model on held-out works (Macbeth, Twelfth Night, ...).
3. `lte.prepare`, then `lte.train` stage 1 (soft) and stage 2 (hard) to the target sparsity.
4. Per-layer sparsity and active experts per token on held-out text; perplexity dense vs LTE.
5. A text sample from the LTE model.
6. `torch.compile(backend="lte")` against the dense model under Inductor: batch-1 greedy decode
   tokens/s, both measured in one run (interleaved), and their ratio.
Writes runs/demo/: log.jsonl, sparsity.png, losses.png, summary.json, lte/ (the trained LTE model).
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

PROMPT = "ROMEO.\nBut soft, what light"


def _ppl_table(dense: dict, sparse: dict) -> str:
    return (f"  validation perplexity  dense {dense['ppl']:.2f}  |  LTE {sparse['ppl']:.2f} "
            f"(hard mode, sparsity {sparse['sparsity']:.3f})")


def _sample(model, tok, n: int, seed: int = 0) -> str:
    torch.manual_seed(seed)
    ids = torch.tensor([tok.encode(PROMPT).ids])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=True, top_k=40, temperature=0.8, pad_token_id=0)
    return tok.decode(out[0].tolist())


def _decode_time(model, step_fn, prompt, n: int, tokens: list[int] | None = None) -> float:
    """Seconds for n greedy batch-1 decode steps through `step_fn` after an eager prefill.

    The KV cache is transformers' DynamicCache (grows by one token per step: Dynamo compiles the
    decode step once more with a dynamic length, then reuses it); the tokens are checked against
    eager so a wrong compiled model cannot report a speed.
    """
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        cache, tok = out.cache, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(n):
            out = step_fn(input_ids=tok, cache=cache, use_cache=True)
            cache, tok = out.cache, out.logits[:, -1:].argmax(-1)
            if tokens is not None:
                tokens.append(int(tok))
        return time.perf_counter() - start


def decode_benchmark(dense, sparse, new_tokens: int, reps: int) -> dict:
    """Compile both, warm up, then time interleaved batch-1 greedy decodes; medians per model."""
    from tqdm.auto import tqdm

    prompt = torch.tensor([[5, 6, 7, 8]])
    runs = {"dense": (dense, torch.compile(dense.forward, backend="inductor", fullgraph=True)),
            "lte": (sparse, torch.compile(sparse.forward, backend="lte", fullgraph=True))}
    compile_s = {}
    for name, (m, fn) in tqdm(runs.items(), desc="compile + warm-up"):
        t = time.perf_counter()
        _decode_time(m, fn, prompt, 4)  # static first shape, then the dynamic-length recompile
        compile_s[name] = time.perf_counter() - t
    eager, compiled = [], []  # the compiled sparse decode must give the eager hard-mode tokens
    _decode_time(sparse, sparse.forward, prompt, 16, eager)
    _decode_time(sparse, runs["lte"][1], prompt, 16, compiled)
    times: dict[str, list[float]] = {"dense": [], "lte": []}
    for _ in tqdm(range(reps), desc="decode benchmark"):
        for name, (m, fn) in runs.items():  # interleaved: both see the same host load
            times[name].append(_decode_time(m, fn, prompt, new_tokens))
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    tps = {k: new_tokens / max(v, 1e-9) for k, v in med.items()}
    return {"tokens_per_s": tps, "ratio": tps["lte"] / tps["dense"], "compile_s": compile_s,
            "tokens_match_eager": eager == compiled, "new_tokens": new_tokens, "reps": reps}


def finetune_dense(model, train_ids, steps: int, lr: float, batch_size: int, seq_len: int) -> None:
    """The fair baseline: the dense model gets the same number of fine-tuning steps as LTE."""
    from tqdm.auto import tqdm

    from lte_compile.training import TokenBatches

    data = TokenBatches(train_ids, seq_len, batch_size, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95))
    model.train()
    for _ in tqdm(range(steps), desc="dense fine-tune (fair baseline)"):
        model(**next(data)).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), opt.zero_grad(set_to_none=True)
    model.eval()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lte_compile.small_lm.demo", description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="llama", choices=["llama", "gpt2"])
    p.add_argument("--model-dir", default=None, help="a small LM saved by lte_compile.small_lm.model (default: the shipped one)")
    p.add_argument("--target", type=float, default=0.5, help="target FFN sparsity (fraction of experts off)")
    p.add_argument("--steps1", type=int, default=150, help="stage-1 (soft) steps")
    p.add_argument("--steps2", type=int, default=100, help="stage-2 (hard) steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 is the robust choice on a shared 2-core host (2 threads stall there)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--decode-reps", type=int, default=5)
    p.add_argument("--no-fair-dense", dest="fair_dense", action="store_false",
                   help="skip the equal-budget baseline (the dense model fine-tuned for steps1+steps2 steps)")
    p.add_argument("--skip-compile", action="store_true", help="skip the compiled decode benchmark")
    return p


def _train_lte(dense, train_ids, val_ids, args):
    """[3/6] A prepared copy of `dense`, trained through both stages to the target sparsity."""
    import lte_compile as lte
    from lte_compile.training import TrainConfig, train

    print(f"[3/6] lte.prepare + lte.train to target sparsity {args.target}")
    model = copy.deepcopy(dense)
    lte.prepare(model, lte.Config(expert_size=32))
    cfg = TrainConfig(stage1_steps=args.steps1, stage2_steps=args.steps2, target_sparsity=args.target,
                      batch_size=args.batch_size, seq_len=args.seq_len, out_dir=args.out, resume=False,
                      eval_batches=8, log_every=1)
    return model, train(model, train_ids, cfg, eval_data=val_ids)


def _report_sparsity(lte_eval: dict, target: float, bias_shift: float) -> None:
    for layer, s in lte_eval["sparsity_per_layer"].items():
        print(f"      {layer:24s} sparsity {s:.3f}   active experts/token {lte_eval['active_per_token'][layer]:5.2f}")
    print(f"      overall sparsity {lte_eval['sparsity']:.3f} (target {target}, |error| "
          f"{abs(lte_eval['sparsity'] - target):.3f}); router bias shift {bias_shift:+.3f}")


def _fair_dense_ppl(dense, train_ids, val_ids, args, ev: dict) -> float:
    """The honest headline: the dense model given LTE's fine-tuning budget (steps1 + steps2)."""
    from lte_compile.training import evaluate

    tuned = copy.deepcopy(dense)
    finetune_dense(tuned, train_ids, args.steps1 + args.steps2, 2e-4, args.batch_size, args.seq_len)
    return evaluate(tuned, val_ids, mode="dense", **ev)["ppl"]


def _compiled_decode(dense, model, args) -> dict:
    print("[6/6] torch.compile: backend='lte' (sparse) vs 'inductor' (dense), batch-1 greedy decode")
    bench = decode_benchmark(copy.deepcopy(dense).eval(), model.eval(), args.decode_tokens, args.decode_reps)
    tps = bench["tokens_per_s"]
    print(f"      dense {tps['dense']:.1f} tok/s | LTE {tps['lte']:.1f} tok/s | ratio {bench['ratio']:.2f}x "
          f"(compile+warm-up: dense {bench['compile_s']['dense']:.0f} s, lte {bench['compile_s']['lte']:.0f} s)")
    print(f"      compiled LTE decode gives the eager hard-mode tokens: {bench['tokens_match_eager']}")
    return bench


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    import lte_compile as lte
    from lte_compile.small_lm.model import corpus_tokens, load_small_lm
    from lte_compile.training import evaluate

    print(f"[1/6] loading the project's small {args.arch} LM and tokenizer")
    dense, tok = load_small_lm(args.arch, args.model_dir)
    train_ids, val_ids = corpus_tokens(tok)
    n_params = sum(p.numel() for p in dense.parameters())
    print(f"      {n_params / 1e6:.1f}M parameters; {train_ids.numel():,} training / {val_ids.numel():,} held-out tokens")

    ev = dict(seq_len=args.seq_len, batch_size=args.batch_size, max_batches=8)
    print("[2/6] dense validation perplexity (held-out works)")
    dense_eval = evaluate(dense, val_ids, mode="dense", **ev)
    print(f"      dense ppl {dense_eval['ppl']:.2f}")

    model, result = _train_lte(dense, train_ids, val_ids, args)
    print("[4/6] held-out results (hard mode)")
    lte_eval = evaluate(model, val_ids, mode="hard", **ev)
    _report_sparsity(lte_eval, args.target, result.bias_shift)
    print(_ppl_table(dense_eval, lte_eval))
    fair = _fair_dense_ppl(dense, train_ids, val_ids, args, ev) if args.fair_dense else None
    if fair is not None:
        print(f"      equal budget: dense fine-tuned for the same {args.steps1 + args.steps2} steps: ppl {fair:.2f} "
              f"-> LTE is {100 * (lte_eval['ppl'] / fair - 1):+.1f} % at sparsity {lte_eval['sparsity']:.3f}")

    lte.save(model, Path(args.out) / "lte")  # `lte eval --lte-dir runs/demo/lte` reloads it
    print("[5/6] sample from the LTE model (hard mode)")
    lte.set_mode(model, "hard")
    print("      " + _sample(model, tok, 60).replace("\n", "\n      "))

    bench = None if args.skip_compile else _compiled_decode(dense, model, args)
    total = time.perf_counter() - t0
    summary = {"arch": args.arch, "target": args.target, "dense_ppl": dense_eval["ppl"], "lte_ppl": lte_eval["ppl"],
               "dense_finetuned_ppl": fair,
               "sparsity": lte_eval["sparsity"], "sparsity_per_layer": lte_eval["sparsity_per_layer"],
               "active_per_token": lte_eval["active_per_token"], "bias_shift": result.bias_shift,
               "steps": [args.steps1, args.steps2], "decode": bench, "wall_s": total, "threads": args.threads}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"done in {total / 60:.1f} min; plots and log in {args.out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
