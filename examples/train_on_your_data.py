"""LTE on your own transformers checkpoint and text, from Python: what `lte train --model DIR --data FILE` does.

    python examples/train_on_your_data.py path/to/checkpoint corpus.jsonl --target 0.5 --out runs/mine
The checkpoint directory holds config.json, safetensors weights and the model's tokenizer
(`model.save_pretrained(dir)`, `tokenizer.save_pretrained(dir)`); the data is a .txt, a .jsonl
with a "text" field per line, or a .safetensors file of token ids. The data is checked before the
model loads; the trained model is saved with `lte.save` and reloaded into a fresh copy to show
that the held-out perplexity comes back.
"""
import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lte_compile as lte
from lte_compile.training import TrainConfig, train
from lte_compile.training.data import check_token_data, load_token_data


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("data")
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--steps1", type=int, default=100)
    p.add_argument("--steps2", type=int, default=50)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default="runs/mine")
    args = p.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint, local_files_only=True)
    train_ids, heldout_ids = load_token_data(args.data, tokenizer, heldout_fraction=0.05)
    check_token_data(train_ids, heldout_ids, seq_len=args.seq_len, batch_size=args.batch_size)  # "too short"
    load = lambda: AutoModelForCausalLM.from_pretrained(args.checkpoint, local_files_only=True,  # noqa: E731
                                                        dtype=torch.float32, use_safetensors=True)
    model = lte.prepare(load(), lte.Config(expert_size=32))
    cfg = TrainConfig(stage1_steps=args.steps1, stage2_steps=args.steps2, target_sparsity=args.target,
                      seq_len=args.seq_len, batch_size=args.batch_size, out_dir=args.out)
    result = train(model, train_ids, cfg, eval_data=heldout_ids)  # log.jsonl and plots go to --out
    lte.save(model, f"{args.out}/lte")

    fresh = lte.load(load(), f"{args.out}/lte")
    again = lte.evaluate(fresh, heldout_ids, mode="hard", seq_len=args.seq_len, batch_size=args.batch_size)
    print(f"held-out sparsity {result.sparsity:.3f} (target {args.target}), perplexity {result.eval_ppl:.2f}; "
          f"reloaded: {again['ppl']:.2f}")


if __name__ == "__main__":
    main()
