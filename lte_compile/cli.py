"""The `lte` command line: inspect, train, eval, bench, demo.

    lte inspect path/to/model_dir_or_config.json [--sparsity 0.5] [--tokens 1]
    lte inspect my_pkg.models:build_model         (a callable returning a module, or (module, inputs))
    lte train [--model llama --target 0.5 ...]    (LTE stage 1 + 2 on the project's small LM)
    lte train --model CKPT_DIR --data text.jsonl --target 0.5 --out runs/mine
                                                  (your transformers checkpoint and its tokenizer, your
                                                   .txt / .jsonl / .safetensors data; also under torchrun)
    lte fit --target 0.7                          (training-free: routers fitted on the frozen model)
    lte eval --lte-dir runs/train/lte             (held-out perplexity and sparsity, dense vs LTE)
    lte compare [--quick ...]                     (LTE vs other selection rules at equal budget: table + plot)
    lte bench [--quick ...]                       (benchmarks/bench_kernels.py, from a source checkout)
    lte bench decode [--quick ...]                (benchmarks/bench_decode.py: end-to-end decode, lte vs inductor)
    lte demo                                      (what `make demo` runs)
"""
from __future__ import annotations

import argparse
import importlib
import json
import runpy
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn


def load_target(target: str) -> tuple[nn.Module, Any]:
    """(model, example_inputs) from a `module:callable`, a config.json, or a model directory.

    Transformers models are built from their config with random weights (inspect only needs
    shapes); weights in the directory are never read.
    """
    if ":" in target and not Path(target).exists():
        mod_name, _, fn_name = target.partition(":")
        obj = getattr(importlib.import_module(mod_name), fn_name)
        made = obj() if callable(obj) and not isinstance(obj, nn.Module) else obj
        return made if isinstance(made, tuple) else (made, None)
    path = Path(target)
    cfg_path = path / "config.json" if path.is_dir() else path
    if not cfg_path.exists():
        raise SystemExit(f"lte: {target}: no config.json found; give a transformers model directory, "
                         "a config.json, or module:callable")
    import transformers
    config = transformers.AutoConfig.for_model(**json.loads(cfg_path.read_text()))
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.AutoModelForCausalLM if not config.is_encoder_decoder else transformers.AutoModelForSeq2SeqLM
        return cls.from_config(config).eval(), None
    return cls(config).eval(), None


def _fmt(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def inspect_model(model: nn.Module, example_inputs: Any = None, *, sparsity: float = 0.5, tokens: int = 1,
                  expert_size: int = 32, bytes_per_param: int = 2) -> str:
    """A table per FFN (path, form, activation, sizes, experts, FLOPs and bytes per step) + near misses."""
    from .passes import ffn_cost, find_ffns_in_model
    from .plan.prepare import example_args

    args, kwargs = example_args(model, example_inputs)
    with torch.no_grad():
        report = find_ffns_in_model(model, *args, **kwargs)
    head = (f"{'FFN':<34} {'form':<14} {'act':<9} {'glu':<4} {'d':>6} {'d_ff':>7} {'experts':>8} "
            f"{'FLOPs dense':>11} {f'FLOPs s={sparsity}':>11} {'bytes dense':>11} {f'bytes s={sparsity}':>11}")
    lines = [f"{len(report.matches)} FFN(s) found (T={tokens} tokens, {bytes_per_param}-byte weights; "
             "sparse columns include the router)", head,
             "-" * len(head)]
    for m in report.matches:
        c = ffn_cost(m.d_model, m.d_ff, m.d_out, m.glu, bytes_per_param=bytes_per_param,
                     expert_size=expert_size).evaluate(T=tokens, s=sparsity)
        experts = f"{m.d_ff // expert_size}x{expert_size}" if m.d_ff % expert_size == 0 else "n/a"
        lines.append(f"{m.module or '<root>':<34} {m.form:<14} {m.activation:<9} {'yes' if m.glu else 'no':<4} "
                     f"{m.d_model:>6} {m.d_ff:>7} {experts:>8} {_fmt(c['flops_dense']):>11} "
                     f"{_fmt(c['flops_sparse']):>11} {_fmt(c['bytes_dense']):>11} {_fmt(c['bytes_sparse']):>11}")
    if report.near_misses:
        lines.append(f"\n{len(report.near_misses)} near miss(es):")
        lines += [f"  {n}" for n in report.near_misses]
    return "\n".join(lines)


# Subcommands that own their argument parsers: name -> (help, module, function); module None runs
# a script of the checkout's benchmarks/ folder.
DELEGATED = {
    "train": ("LTE stage 1 + 2 to a target sparsity, on a shipped LM or your checkpoint and data; runs "
              "under torchrun (lte train --help)", ".training.cli", "main_train"),
    "fit": ("training-free: fit routers, calibrate to a target sparsity (lte fit --help)", ".training.cli", "main_fit"),
    "eval": ("held-out perplexity and sparsity, dense vs LTE (lte eval --help)", ".training.cli", "main_eval"),
    "compare": ("LTE vs other selection rules at equal budget: table, plot, JSON (lte compare --help)",
                ".training.compare", "main"),
    "bench": ("sparse vs dense FFN kernel benchmark (lte bench --help); `lte bench decode`: "
              "end-to-end decode, lte vs inductor (lte bench decode --help)", None, "bench_kernels.py"),
    "demo": ("the end-to-end demo `make demo` runs (lte demo --help)", ".small_lm.demo", "main"),
}


def _delegate(command: str, argv: list[str]) -> int:
    """Subcommands that own their argument parsers."""
    module, function = DELEGATED[command][1:]
    if command == "bench" and argv[:1] == ["decode"]:
        function, argv = "bench_decode.py", argv[1:]
    if module is None:
        return _run_benchmark(function, argv)
    return getattr(importlib.import_module(module, __package__), function)(argv) or 0


def _run_benchmark(script: str, argv: list[str]) -> int:
    """Benchmarks live in the source checkout's benchmarks/ (not in the wheel)."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / script
    if not path.exists():
        raise SystemExit(f"lte bench: {path} not found; benchmarks ship with the source repository "
                         "(git clone it and `pip install -e .`)")
    sys.argv = [str(path), *argv]
    runpy.run_path(str(path), run_name="__main__")
    return 0


def _ranged(kind, low: float, high: float | None = None, *, low_open: bool = False):
    """argparse `type=`: a finite number of `kind` in the range, else one-line usage error (exit 2)."""
    import math

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        ok = math.isfinite(value) and (value > low if low_open else value >= low) and (high is None or value <= high)
        if not ok:
            rng = (f"in {'(' if low_open else '['}{low}, {high}]" if high is not None
                   else f"{'>' if low_open else '>='} {low}")
            raise argparse.ArgumentTypeError(f"{text} is out of range: expected {rng}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lte", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect", help="list the FFNs the passes find, with their cost")
    ins.add_argument("target", help="model directory, config.json, or module:callable")
    ins.add_argument("--sparsity", type=_ranged(float, 0.0, 1.0), default=0.5,
                     help="sparsity s in [0, 1] for the sparse columns (default 0.5)")
    ins.add_argument("--tokens", type=_ranged(int, 1), default=1, help="tokens per step T >= 1 (default 1: decode)")
    ins.add_argument("--expert-size", type=_ranged(int, 1), default=32, help="neurons per expert B >= 1 (default 32)")
    ins.add_argument("--bytes-per-param", type=_ranged(int, 1), default=2, help="2 for bf16/fp16, 4 for fp32")
    for name, (text, _, _) in DELEGATED.items():
        sub.add_parser(name, help=text, add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command in DELEGATED:
        return _delegate(args.command, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    model, inputs = load_target(args.target)
    print(inspect_model(model, inputs, sparsity=args.sparsity, tokens=args.tokens,
                        expert_size=args.expert_size, bytes_per_param=args.bytes_per_param))
    return 0


if __name__ == "__main__":
    sys.exit(main())
