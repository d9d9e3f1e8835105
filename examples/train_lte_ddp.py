"""LTE training under torchrun with DDP (gloo on CPU, nccl on CUDA).

    torchrun --nproc_per_node 2 examples/train_lte_ddp.py --steps1 40 --steps2 20
The script starts the process group (torchrun's environment gives rank and world size);
`lte.train` then sees it, wraps the model in DDP for each stage, gives each rank its own token windows, all-reduces the sparsity statistics and the logged
losses, and applies the controller's bias shift identically on every rank. Rank 0 writes the
log, plots and checkpoints.
"""
import argparse

import torch

import lte_compile as lte
from lte_compile.small_lm.model import corpus_tokens, load_small_lm
from lte_compile.training import TrainConfig, train


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps1", type=int, default=40)
    p.add_argument("--steps2", type=int, default=20)
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--out", default="runs/ddp")
    args = p.parse_args()
    torch.set_num_threads(1)  # one core per rank
    torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    model, tok = load_small_lm("llama")
    train_ids, val_ids = corpus_tokens(tok)
    lte.prepare(model, lte.Config(expert_size=32))
    result = train(model, train_ids, TrainConfig(stage1_steps=args.steps1, stage2_steps=args.steps2,
                                                 target_sparsity=args.target, batch_size=4, seq_len=256,
                                                 out_dir=args.out, checkpoint_every=20),
                   eval_data=val_ids)
    if torch.distributed.get_rank() == 0:
        print(f"held-out sparsity {result.sparsity:.3f} (target {args.target}), eval ppl {result.eval_ppl:.2f}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
