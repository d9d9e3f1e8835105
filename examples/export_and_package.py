"""prepare -> fit routers -> export -> package -> load and run: a deployable LTE model.

    python examples/export_and_package.py [--out DIR] [--no-package]

A small transformers Llama built from a config (random weights, nothing downloaded) is prepared,
its routers are fitted training-free to 50 % sparsity on random tokens (`lte.fit_routers`; use
`lte.train` on real text for a real model), and in hard mode it is
1. exported with `lte.export` (an `ExportedProgram` whose FFNs are `lte::sparse_ffn` calls,
   dynamic in the sequence length) and saved with `torch.export.save`;
2. compiled with AOTInductor into a `.pt2` package (`lte.package`; runs g++, about a minute).
A fresh process (`--load DIR`, started by this script) then loads both artifacts with only
`import torch, lte_compile` (the `lte::` ops are registered from Python) and compares their
outputs with the eager model's. What is exported is `LogitsOnly(model)`: token ids in, logits
out (a `ModelOutput` would need `import transformers.modeling_outputs` in the loader, and
dynamic shapes for a forward's **kwargs trip torch.export up).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import lte_compile as lte

VOCAB = 256
LENGTHS = (16, 40)  # the exported length and another one (the length is a dynamic dim)


def build_model() -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return tf.LlamaForCausalLM(cfg).eval()


class LogitsOnly(torch.nn.Module):
    """The deployed signature: ids [batch, seq] -> logits [batch, seq, vocab], no KV cache."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


def prepare_and_export(out: Path, package: bool) -> None:
    from torch.export import Dim

    from lte_compile.deploy import count_ops

    model = build_model()
    lte.prepare(model, lte.Config(expert_size=32))
    tokens = torch.randint(0, VOCAB, (4096,), generator=torch.Generator().manual_seed(0))
    fit = lte.fit_routers(model, tokens, target_sparsity=0.5, batches=4, seq_len=64, batch_size=4, steps=100)
    print(f"routers fitted: held-out sparsity {fit.sparsity:.3f} (target 0.5); mode {lte.get_mode(model)}")

    inputs = {f"ids_{n}": torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(n)) for n in LENGTHS}
    with torch.no_grad():
        eager = {f"eager_{n}": model(input_ids=inputs[f"ids_{n}"], use_cache=False).logits for n in LENGTHS}
    save_file({**inputs, **eager}, out / "io.safetensors")

    deployed = LogitsOnly(model)  # lte.export finds the routers inside it
    example, dynamic = (inputs[f"ids_{LENGTHS[0]}"],), ({1: Dim("seq", max=128)},)
    start = time.perf_counter()
    ep = lte.export(deployed, example, dynamic_shapes=dynamic)
    print(f"exported in {time.perf_counter() - start:.1f} s: {count_ops(ep.graph, 'lte::sparse_ffn')} "
          f"lte::sparse_ffn call(s) for {len(lte.routers(model))} FFN(s)")
    torch.export.save(ep, out / "model_export.pt2")
    if package:
        start = time.perf_counter()
        path = lte.package(ep, out / "model_aoti.pt2")  # or lte.package(deployed, ..., example)
        print(f"packaged in {time.perf_counter() - start:.1f} s: {path}")


def load_and_run(out: Path) -> None:
    """What a deployment does: no model code, no transformers; lte_compile registers the ops."""
    io = load_file(out / "io.safetensors")
    runners = {"exported program": torch.export.load(out / "model_export.pt2").module()}
    if (out / "model_aoti.pt2").exists():
        runners["AOTI package"] = torch._inductor.aoti_load_package(str(out / "model_aoti.pt2"))
    with torch.no_grad():
        for name, run in runners.items():
            for n in LENGTHS:
                logits = run(io[f"ids_{n}"])
                diff = (logits - io[f"eager_{n}"]).abs().max().item()
                print(f"  fresh process, {name}, {n} tokens: max |artifact - eager| = {diff:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="where to write the artifacts (default: a temp dir)")
    parser.add_argument("--no-package", action="store_true", help="skip the AOTInductor package (no g++ run)")
    parser.add_argument("--load", type=Path, default=None, help="only load and run the artifacts in this dir")
    args = parser.parse_args()
    if args.load is not None:
        return load_and_run(args.load)
    out = args.out or Path(tempfile.mkdtemp(prefix="lte_export_"))
    out.mkdir(parents=True, exist_ok=True)
    prepare_and_export(out, package=not args.no_package)
    subprocess.run([sys.executable, __file__, "--load", str(out)], check=True)


if __name__ == "__main__":
    main()
