"""Compile time of backend="lte" (prepared model, hard mode) vs backend="inductor" (original model).

    TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 python benchmarks/compile_time.py [--rounds 2] [--arch llama]

The model is the demo's small LM shape (lte_compile.small_lm.model.ARCHS, random weights). Each round compiles
both from cold (Inductor caches off), alternating which goes first; the first call (compile + one
forward) is timed after a warm-up compile of a tiny MLP with each backend, and the median over
rounds is reported with the ratio lte / inductor.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import torch  # noqa: E402

import lte_compile as lte  # noqa: E402
from lte_compile.small_lm.model import ARCHS, build_model  # noqa: E402


def first_call_seconds(model, backend: str, ids: torch.Tensor) -> float:
    torch._dynamo.reset()
    start = time.perf_counter()
    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(ids)
    return time.perf_counter() - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--arch", default="llama", choices=sorted(ARCHS))
    args = p.parse_args(argv)
    dense = build_model(ARCHS[args.arch]).eval()
    sparse = lte.prepare(copy.deepcopy(dense))
    lte.set_mode(sparse, "hard")
    ids = torch.randint(0, 4096, (1, 16))
    # One-time process costs (Inductor imports, C++ toolchain probe, the lte kernel extension load)
    # would land on whichever backend goes first: pay them on a tiny prepared MLP before timing.
    mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    lte.set_mode(lte.prepare(mlp, example_inputs=(torch.randn(2, 32),)), "hard")
    for backend in ("inductor", "lte"):
        first_call_seconds(mlp, backend, torch.randn(2, 32))
    times = {"inductor": [], "lte": []}
    for r in range(args.rounds):
        order = [("inductor", dense), ("lte", sparse)]
        for name, model in order if r % 2 == 0 else order[::-1]:
            times[name].append(first_call_seconds(model, name, ids))
            print(f"round {r}: {name:9s} {times[name][-1]:6.1f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.arch} ({ARCHS[args.arch].n_layers} FFNs), torch {torch.__version__}: compile+first call "
          f"inductor {med['inductor']:.1f} s, lte {med['lte']:.1f} s, ratio lte/inductor {med['lte'] / med['inductor']:.2f}")


if __name__ == "__main__":
    main()
