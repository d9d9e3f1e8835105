"""prepare -> fit routers -> export -> package -> load and run: a deployable LTE model.

    python examples/export_and_package.py [--out DIR] [--no-package]

A small transformers Llama built from a config (random weights, nothing downloaded) is prepared,
its routers are fitted training-free to 50 % sparsity on random tokens (`lte.fit_routers`; use
`lte.train` on real text for a real model), and in hard mode it is
1. exported with `lte.export` (an `ExportedProgram` whose FFNs are `lte::sparse_ffn` calls,
   dynamic in the sequence length), saved with `torch.export.save` and loaded back;
2. compiled with AOTInductor into a `.pt2` package (`lte.package`; runs g++, about a minute) and
   loaded with `torch._inductor.aoti_load_package`.
Both artifacts need `import lte_compile` in the process that loads them (the `lte::` ops are
registered from Python). Each is compared with the eager model in hard mode.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import transformers as tf
from torch.export import Dim

import lte_compile as lte
from lte_compile.deploy import count_ops

VOCAB = 256


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return tf.LlamaForCausalLM(cfg).eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="where to write the artifacts (default: a temp dir)")
    parser.add_argument("--no-package", action="store_true", help="skip the AOTInductor package (no g++ run)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="lte_export_"))
    out.mkdir(parents=True, exist_ok=True)

    model = build_model()
    lte.prepare(model, lte.Config(expert_size=32))
    tokens = torch.randint(0, VOCAB, (4096,), generator=torch.Generator().manual_seed(0))
    fit = lte.fit_routers(model, tokens, target_sparsity=0.5, batches=4, seq_len=64, batch_size=4, steps=100)
    print(f"routers fitted: held-out sparsity {fit.sparsity:.3f} (target 0.5); mode {lte.get_mode(model)}")

    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(1))
    longer = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        eager = {n: model(input_ids=x, use_cache=False).logits for n, x in (("16", ids), ("40", longer))}

    # 1. torch.export: one lte::sparse_ffn per FFN; the sequence length stays dynamic
    start = time.perf_counter()
    ep = lte.export(model, {"input_ids": ids, "use_cache": False},
                    dynamic_shapes={"input_ids": {1: Dim("seq", max=128)}, "use_cache": None})
    print(f"exported in {time.perf_counter() - start:.1f} s: {count_ops(ep.graph, 'lte::sparse_ffn')} "
          f"lte::sparse_ffn call(s) for {len(lte.routers(model))} FFN(s)")
    torch.export.save(ep, out / "model_export.pt2")
    loaded = torch.export.load(out / "model_export.pt2")  # another process: `import lte_compile` first
    with torch.no_grad():
        for n, x in (("16", ids), ("40", longer)):
            y = loaded.module()(input_ids=x, use_cache=False).logits
            print(f"  loaded program, {n} tokens: max |exported - eager| = {max_diff(y, eager[n]):.2e}")

    if args.no_package:
        return
    # 2. AOTInductor: compile the same program into a .pt2 package, load it, run it
    start = time.perf_counter()
    path = lte.package(model, out / "model_aoti.pt2", {"input_ids": ids, "use_cache": False},
                       dynamic_shapes={"input_ids": {1: Dim("seq", max=128)}, "use_cache": None})
    print(f"packaged in {time.perf_counter() - start:.1f} s: {path}")
    runner = torch._inductor.aoti_load_package(path)
    with torch.no_grad():
        for n, x in (("16", ids), ("40", longer)):
            y = runner(input_ids=x, use_cache=False).logits
            print(f"  AOTI package, {n} tokens: max |package - eager| = {max_diff(y, eager[n]):.2e}")


if __name__ == "__main__":
    main()
