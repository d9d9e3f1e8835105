"""Command lines behind `lte train`, `lte fit` and `lte eval` (the `lte` CLI delegates its argv here).

    lte train --model llama --target 0.5 --steps1 150 --steps2 100 --out runs/lte
    lte fit   --model llama --target 0.7 --out runs/fit        (training-free: routers only, minutes)
    lte eval  --model llama --lte-dir runs/lte/lte
`--model` is a shipped small LM (`llama`, `gpt2`) or a directory written by `lte_compile.small_lm.model`;
text is the shipped Shakespeare corpus (train works / held-out works) and its BPE tokenizer.
`lte train` saves the trained LTE model with `lte.save` into `<out>/lte`; `lte eval` loads it
into a fresh copy of the model and prints held-out perplexity and sparsity, dense vs LTE.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

from .config import TrainConfig


def _model(name: str):
    from ..small_lm.model import load_small_lm

    return load_small_lm(name) if name in ("llama", "gpt2") else load_small_lm("llama", path=name)


def train_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="lte train", description="LTE stage 1 + stage 2 on the small LM")
    p.add_argument("--model", default="llama", help="llama | gpt2 | a directory saved by lte_compile.small_lm.model")
    p.add_argument("--target", type=float, default=None, help="target FFN sparsity in (0, 1); omit to use --eta")
    p.add_argument("--eta", type=float, default=TrainConfig.eta)
    p.add_argument("--steps1", type=int, default=TrainConfig.stage1_steps)
    p.add_argument("--steps2", type=int, default=TrainConfig.stage2_steps)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--seq-len", type=int, default=TrainConfig.seq_len)
    p.add_argument("--model-lr", type=float, default=TrainConfig.model_lr)
    p.add_argument("--expert-size", type=int, default=32)
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--out", default="runs/lte")
    p.add_argument("--threads", type=int, default=2)
    return p


def _user_errors(prog: str):
    """User errors (`LTEError`: bad settings, a model or directory that does not fit) print one
    line `<prog>: error: <message>` (the message says what to do) and exit with 2, like argparse;
    anything else is a bug and keeps its traceback."""
    def wrap(main):
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            from ..errors import LTEError

            try:
                return main(argv)
            except LTEError as e:
                print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
                return 2
        return run
    return wrap


@_user_errors("lte train")
def main_train(argv: list[str] | None = None) -> int:
    import lte_compile as lte

    from ..small_lm.model import corpus_tokens
    from .driver import train

    args = train_parser().parse_args(argv)
    # settings first: a bad value is reported before the model and corpus load
    lte_cfg = lte.Config(expert_size=args.expert_size)
    cfg = TrainConfig(stage1_steps=args.steps1, stage2_steps=args.steps2, eta=args.eta, target_sparsity=args.target,
                      batch_size=args.batch_size, seq_len=args.seq_len, model_lr=args.model_lr, out_dir=args.out,
                      checkpoint_every=args.checkpoint_every)
    torch.set_num_threads(args.threads)
    model, tok = _model(args.model)
    train_ids, val_ids = corpus_tokens(tok)
    lte.prepare(model, lte_cfg)
    result = train(model, train_ids, cfg, eval_data=val_ids)
    lte.save(model, Path(args.out) / "lte")
    print(json.dumps({"sparsity": result.sparsity, "sparsity_per_layer": result.sparsity_per_layer,
                      "active_per_token": result.active_per_token, "eval_ppl": result.eval_ppl,
                      "bias_shift": result.bias_shift, "saved": str(Path(args.out) / "lte")}, indent=2))
    return 0


@_user_errors("lte eval")
def main_eval(argv: list[str] | None = None) -> int:
    import lte_compile as lte

    from ..small_lm.model import corpus_tokens
    from .evaluate import evaluate

    p = argparse.ArgumentParser(prog="lte eval", description="held-out perplexity and sparsity, dense vs LTE")
    p.add_argument("--model", default="llama")
    p.add_argument("--lte-dir", required=True, help="a directory written by lte.save (e.g. by `lte train`)")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dense, tok = _model(args.model)
    _, val_ids = corpus_tokens(tok)
    ev = dict(max_batches=args.batches, seq_len=args.seq_len, batch_size=8)
    out = {"dense": evaluate(dense, val_ids, mode="dense", **ev)}
    sparse, _ = _model(args.model)
    lte.load(sparse, args.lte_dir)
    out["lte"] = evaluate(sparse, val_ids, mode="hard", **ev)
    print(json.dumps(out, indent=2))
    return 0


@_user_errors("lte fit")
def main_fit(argv: list[str] | None = None) -> int:
    import lte_compile as lte

    from ..small_lm.model import corpus_tokens
    from .fit import fit_routers

    p = argparse.ArgumentParser(prog="lte fit", description="training-free LTE: fit the routers on the frozen "
                                "model's activations and calibrate held-out sparsity to a target")
    p.add_argument("--model", default="llama", help="llama | gpt2 | a directory saved by lte_compile.small_lm.model")
    p.add_argument("--target", type=float, required=True, help="target FFN sparsity in (0, 1)")
    p.add_argument("--batches", type=int, default=8, help="batches of activations to fit on")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per router")
    p.add_argument("--expert-size", type=int, default=32)
    p.add_argument("--out", default="runs/fit")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    lte_cfg = lte.Config(expert_size=args.expert_size)
    torch.set_num_threads(args.threads)
    model, tok = _model(args.model)
    train_ids, val_ids = corpus_tokens(tok)
    lte.prepare(model, lte_cfg)
    report = fit_routers(model, train_ids, eval_data=val_ids, target_sparsity=args.target, batches=args.batches,
                         seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps)
    ppl = lte.evaluate(model, val_ids, mode="hard", seq_len=args.seq_len, batch_size=args.batch_size)["ppl"]
    lte.save(model, Path(args.out) / "lte")
    print(json.dumps({"sparsity": report.sparsity, "sparsity_per_layer": report.sparsity_per_layer,
                      "eval_ppl": ppl, "fit_loss": report.fit_loss, "bias_shift": report.bias_shift,
                      "saved": str(Path(args.out) / "lte")}, indent=2))
    return 0
