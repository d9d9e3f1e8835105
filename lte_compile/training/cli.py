"""Command lines behind `lte train`, `lte fit` and `lte eval` (the `lte` CLI delegates its argv here).

    lte train --model llama --target 0.5 --steps1 150 --steps2 100 --out runs/lte
    lte train --model path/to/checkpoint --data corpus.jsonl --target 0.5 --seq-len 512 --out runs/mine
    lte fit   --model llama --target 0.7 --out runs/fit        (training-free: routers only, minutes)
    lte eval  --model path/to/checkpoint --data corpus.jsonl --lte-dir runs/mine/lte
    torchrun --nproc_per_node 2 -m lte_compile.cli train ...   (DDP: gloo on CPU, nccl on CUDA)

`--model` is a shipped small LM (`llama`, `gpt2`), a directory written by `lte_compile.small_lm.model`
(both use the shipped BPE tokenizer), or a local transformers checkpoint directory (config.json,
safetensors weights and the model's tokenizer; loaded with `AutoModelForCausalLM` /
`AutoTokenizer`, never from the hub). `--data` is a .txt, .jsonl or .safetensors file (data.py),
tokenized with the model's tokenizer, its last `--heldout-fraction` held out; without it, the
shipped Shakespeare corpus (train works / held-out works). Everything is checked before the model
loads, so a bad option, directory or file costs nothing and writes nothing.
`lte train` saves the trained LTE model with `lte.save` into `<out>/lte`, next to the driver's
log.jsonl and plots; `lte eval` loads it into a fresh copy of the model and prints held-out
perplexity and sparsity, dense vs LTE. Under torchrun (WORLD_SIZE > 1) `lte train` starts the
process group itself, runs one thread per rank unless `--threads` says otherwise, and only rank 0
prints and saves.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from ..errors import ConfigError, LTEError
from .config import TrainConfig

SHIPPED = ("llama", "gpt2")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tiktoken.model")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ModelDirError(LTEError, ValueError):
    """`--model` names no shipped model and no usable checkpoint directory; the message says what is missing."""


# ----------------------------------------------------------------------------- the model
@dataclass
class ModelSource:
    """Where `--model` points: a small LM (`small` True: shipped tokenizer, `load_small_lm`) or a
    transformers checkpoint directory; `config` is its transformers config (read, no weights)."""

    name: str
    directory: Path
    small: bool
    config: Any

    @property
    def vocab_size(self) -> int | None:
        return getattr(self.config, "vocab_size", None)

    @property
    def max_positions(self) -> int | None:
        for attr in ("max_position_embeddings", "n_positions"):
            if isinstance(getattr(self.config, attr, None), int):
                return getattr(self.config, attr)
        return None

    def tokenizer(self):
        from .data import as_text_tokenizer

        if self.small:
            from ..small_lm.model import EOS, load_tokenizer

            return as_text_tokenizer(load_tokenizer(), eos_token=EOS)
        from transformers import AutoTokenizer

        try:
            return as_text_tokenizer(AutoTokenizer.from_pretrained(str(self.directory), local_files_only=True))
        except (OSError, ValueError) as e:
            raise ModelDirError(f"{self.directory}: its tokenizer does not load ({_first_line(e)}); save the "
                                "model's tokenizer there with tokenizer.save_pretrained(dir)") from e

    def load(self, dtype: torch.dtype, device: torch.device) -> nn.Module:
        """The model in eval mode, `dtype`, on `device`."""
        if self.small:
            from ..small_lm.model import load_small_lm

            model, _ = load_small_lm(self.name) if self.name in SHIPPED else load_small_lm("llama", path=self.directory)
            return model.to(device=device, dtype=dtype)
        from transformers import AutoModelForCausalLM

        try:  # safetensors only: a pickled pytorch_model.bin is never unpickled
            model = AutoModelForCausalLM.from_pretrained(str(self.directory), local_files_only=True, dtype=dtype,
                                                         use_safetensors=True)
        except (OSError, ValueError) as e:
            raise ModelDirError(f"{self.directory}: the checkpoint does not load ({_first_line(e)}); save it with "
                                "model.save_pretrained(dir)") from e
        return model.to(device).eval()


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _model(name: str) -> ModelSource:
    """Resolve `--model` and check its files (config, weights, tokenizer) without loading weights."""
    from transformers import AutoConfig

    if name in SHIPPED:
        from ..small_lm.corpus import asset_path

        return ModelSource(name, asset_path(name), True, AutoConfig.from_pretrained(str(asset_path(name))))
    path = Path(name)
    if not path.is_dir():
        raise ModelDirError(f"--model {name}: no such directory; give {' or '.join(SHIPPED)} or a local transformers "
                            "checkpoint directory (model.save_pretrained(dir) and tokenizer.save_pretrained(dir))")
    if not (path / "config.json").is_file():
        raise ModelDirError(f"{path}: no config.json, so not a transformers checkpoint; save the model there with "
                            "model.save_pretrained(dir)")
    small = (path / "train_info.json").is_file() and not _has_tokenizer(path)  # written by small_lm.model
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:  # unreadable JSON, unknown model_type, remote code
        raise ModelDirError(f"{path}: its config.json does not load ({_first_line(e)}); save the model there with "
                            "model.save_pretrained(dir)") from e
    if small:
        return ModelSource(name, path, True, config)
    _check_checkpoint_files(path, config)
    return ModelSource(name, path, False, config)


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in TOKENIZER_FILES)


def _check_checkpoint_files(path: Path, config: Any) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ModelDirError(f"{path}: a {config.model_type} model has no causal-LM class (AutoModelForCausalLM); "
                            "lte train/fit/eval train and measure causal language models")
    if not any((path / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        pickled = [f for f in ("pytorch_model.bin", "pytorch_model.bin.index.json") if (path / f).is_file()]
        why = f"only {pickled[0]}, a pickle lte never loads" if pickled else "no model.safetensors"
        raise ModelDirError(f"{path}: {why}; save the weights as safetensors with model.save_pretrained(dir)")
    if not _has_tokenizer(path):
        raise ModelDirError(f"{path}: no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the model's "
                            "tokenizer there with tokenizer.save_pretrained(dir)")


# ----------------------------------------------------------------------------- options shared by the commands
def _data_options(p: argparse.ArgumentParser, *, seq_len: int, batch_size: int) -> None:
    p.add_argument("--model", default="llama", help="llama | gpt2 | a directory saved by lte_compile.small_lm.model "
                   "| a local transformers checkpoint directory (with its tokenizer)")
    p.add_argument("--data", default=None, help="a .txt, .jsonl ({\"text\": ...} per line) or .safetensors (1-D "
                   "token ids) file; default: the shipped Shakespeare corpus")
    p.add_argument("--heldout-fraction", type=float, default=TrainConfig.heldout_fraction,
                   help="share of --data held out for calibration and evaluation (whole documents where possible; "
                   "the shipped corpus is split by work instead)")
    p.add_argument("--seq-len", type=int, default=seq_len)
    p.add_argument("--batch-size", type=int, default=batch_size, help="sequences per batch (per rank under torchrun)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per process (default 2; 1 per rank "
                   "under torchrun)")


@dataclass
class _Inputs:
    """What every command has checked before the model loads."""

    source: ModelSource
    train_ids: Tensor
    heldout_ids: Tensor
    data: str
    device: torch.device
    dtype: torch.dtype


def _inputs(args: argparse.Namespace, source: ModelSource, *, world: int = 1, train: bool = True) -> _Inputs:
    """Device, options, data (read, tokenized, split, long enough, ids in the vocabulary), in that order."""
    from ..config import check_int
    from .data import check_heldout_fraction, check_token_data, corpus_token_data, fits_in_context, load_token_data

    device = _device(args.device)
    check_heldout_fraction(args.heldout_fraction)
    check_int("seq_len", args.seq_len, 2)
    check_int("batch_size", args.batch_size, 1)
    fits_in_context(args.seq_len, source.max_positions)
    tok = source.tokenizer()
    if args.data is not None:
        train_ids, heldout_ids = load_token_data(args.data, tok, args.heldout_fraction)
    else:
        train_ids, heldout_ids = corpus_token_data(tok)
    label = args.data or "the shipped corpus"
    check_token_data(train_ids if train else None, heldout_ids, seq_len=args.seq_len, batch_size=args.batch_size,
                     world_size=world, vocab_size=source.vocab_size, source=label)
    return _Inputs(source, train_ids, heldout_ids, label, device, DTYPES[args.dtype])


def _device(text: str) -> torch.device:
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ConfigError("device", text, "auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", text, "cpu on this machine (torch sees no CUDA device)")
    if device.type == "cuda" and device.index is None:  # under torchrun: one GPU per local rank
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


@contextlib.contextmanager
def _threads(threads: int | None, world: int) -> Iterator[None]:
    """torch's CPU threads for the command (default 2; 1 per rank under torchrun, where the ranks share
    the cores), restored afterwards for in-process callers."""
    from ..config import check_int

    before = torch.get_num_threads()
    torch.set_num_threads(check_int("threads", threads, 1) if threads is not None else 1 if world > 1 else 2)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _single_process(prog: str) -> None:
    if _world_size() > 1:
        raise ConfigError("WORLD_SIZE", _world_size(), f"1: {prog} runs in one process", "run it without torchrun")


@contextlib.contextmanager
def _process_group(device: torch.device) -> Iterator[int]:
    """Under torchrun (WORLD_SIZE > 1) start the process group (nccl for CUDA, gloo for CPU) and
    destroy it at the end, unless the caller had started one; yields this process's rank."""
    import torch.distributed as dist

    if _world_size() <= 1 or dist.is_initialized():
        yield dist.get_rank() if dist.is_initialized() else 0
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield dist.get_rank()
    finally:
        dist.destroy_process_group()


def _user_errors(prog: str):
    """User errors (`LTEError`: bad settings, a model, directory or data file that does not fit)
    print one line `<prog>: error: <message>` (the message says what to do) and exit with 2, like
    argparse; anything else is a bug and keeps its traceback."""
    def wrap(main):
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            try:
                return main(argv)
            except LTEError as e:
                print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
                return 2
        return run
    return wrap


def _print(summary: dict[str, Any]) -> None:
    print(json.dumps(summary, indent=2))


# ----------------------------------------------------------------------------- lte train
def train_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="lte train", description="LTE stage 1 + stage 2 to a target sparsity "
                                     "on a shipped small LM or your own checkpoint and text")
    _data_options(p, seq_len=TrainConfig.seq_len, batch_size=TrainConfig.batch_size)
    p.add_argument("--target", type=float, default=None, help="target FFN sparsity in (0, 1); omit to use --eta")
    p.add_argument("--eta", type=float, default=TrainConfig.eta)
    p.add_argument("--steps1", type=int, default=TrainConfig.stage1_steps)
    p.add_argument("--steps2", type=int, default=TrainConfig.stage2_steps)
    p.add_argument("--model-lr", type=float, default=TrainConfig.model_lr)
    p.add_argument("--router-init", choices=["fit", "keep"], default=TrainConfig.router_init,
                   help="fit: stage 1 starts from routers fitted to the dense model's expert labels (default); "
                        "keep: from the routers as prepared")
    p.add_argument("--expert-size", type=int, default=32)
    p.add_argument("--eval-batches", type=int, default=TrainConfig.eval_batches,
                   help="held-out batches for the final sparsity and perplexity")
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-plots", action="store_true", help="no sparsity.png / losses.png (log.jsonl is written)")
    p.add_argument("--out", default="runs/lte", help="log.jsonl, plots, checkpoints and the LTE state (<out>/lte)")
    return p


@_user_errors("lte train")
def main_train(argv: list[str] | None = None) -> int:
    import lte_compile as lte

    from .driver import train

    args = train_parser().parse_args(argv)
    # settings first: a bad value is reported before the model and data load
    lte_cfg = lte.Config(expert_size=args.expert_size)
    cfg = TrainConfig(stage1_steps=args.steps1, stage2_steps=args.steps2, eta=args.eta, target_sparsity=args.target,
                      batch_size=args.batch_size, seq_len=args.seq_len, model_lr=args.model_lr, out_dir=args.out,
                      checkpoint_every=args.checkpoint_every, heldout_fraction=args.heldout_fraction,
                      eval_batches=args.eval_batches, progress=not args.no_progress,
                      plots=not args.no_plots, router_init=args.router_init)
    inputs = _inputs(args, _model(args.model), world=_world_size())
    with _threads(args.threads, _world_size()), _process_group(inputs.device) as rank:
        model = inputs.source.load(inputs.dtype, inputs.device)
        lte.prepare(model, lte_cfg)
        result = train(model, inputs.train_ids, cfg, eval_data=inputs.heldout_ids)
        if rank == 0:
            out = Path(args.out)
            lte.save(model, out / "lte")
            _print({"sparsity": result.sparsity, "sparsity_per_layer": result.sparsity_per_layer,
                    "active_per_token": result.active_per_token, "eval_ppl": result.eval_ppl,
                    "bias_shift": result.bias_shift, "target": result.target_sparsity,
                    "saved": str(out / "lte"), "log": str(out / "log.jsonl"),
                    "plots": [str(out / n) for n in ("sparsity.png", "losses.png") if cfg.plots and (out / n).exists()],
                    "data": _data_summary(inputs), "world_size": _world_size()})
    return 0


def _data_summary(inputs: _Inputs) -> dict[str, Any]:
    return {"source": inputs.data, "train_tokens": inputs.train_ids.numel(),
            "heldout_tokens": inputs.heldout_ids.numel()}


# ----------------------------------------------------------------------------- lte eval
@_user_errors("lte eval")
def main_eval(argv: list[str] | None = None) -> int:
    import lte_compile as lte

    from .evaluate import evaluate

    p = argparse.ArgumentParser(prog="lte eval", description="held-out perplexity and sparsity, dense vs LTE")
    _data_options(p, seq_len=TrainConfig.seq_len, batch_size=TrainConfig.batch_size)
    p.add_argument("--lte-dir", required=True, help="a directory written by lte.save (e.g. by `lte train`)")
    p.add_argument("--batches", type=int, default=TrainConfig.eval_batches, help="held-out batches to measure")
    args = p.parse_args(argv)
    _single_process("lte eval")
    source = _model(args.model)
    if not Path(args.lte_dir).is_dir():
        raise ConfigError("--lte-dir", args.lte_dir, "a directory written by lte.save", "train one with `lte train "
                          "--out DIR` (it saves DIR/lte) or `lte fit`")
    inputs = _inputs(args, source, train=False)
    ev = dict(max_batches=args.batches, seq_len=args.seq_len, batch_size=args.batch_size)
    with _threads(args.threads, 1):
        model = inputs.source.load(inputs.dtype, inputs.device)
        out = {"dense": evaluate(model, inputs.heldout_ids, mode="dense", **ev)}  # before lte.load: the original
        lte.load(model, args.lte_dir)
        out["lte"] = evaluate(model, inputs.heldout_ids, mode="hard", **ev)
    _print({**out, "data": _data_summary(inputs)})
    return 0


# ----------------------------------------------------------------------------- lte fit
@_user_errors("lte fit")
def main_fit(argv: list[str] | None = None) -> int:
    import lte_compile as lte

    from .controller import SparsityController
    from .fit import fit_routers

    p = argparse.ArgumentParser(prog="lte fit", description="training-free LTE: fit the routers on the frozen "
                                "model's activations and calibrate held-out sparsity to a target")
    _data_options(p, seq_len=256, batch_size=8)
    p.add_argument("--target", type=float, required=True, help="target FFN sparsity in (0, 1)")
    p.add_argument("--batches", type=int, default=8, help="batches of activations to fit on (and to evaluate)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per router")
    p.add_argument("--expert-size", type=int, default=32)
    p.add_argument("--out", default="runs/fit")
    args = p.parse_args(argv)
    _single_process("lte fit")
    lte_cfg = lte.Config(expert_size=args.expert_size)
    SparsityController(args.target, 0.02)  # checks the target before the model loads (fit_routers checks it again)
    inputs = _inputs(args, _model(args.model))
    with _threads(args.threads, 1):
        model = inputs.source.load(inputs.dtype, inputs.device)
        lte.prepare(model, lte_cfg)
        report = fit_routers(model, inputs.train_ids, eval_data=inputs.heldout_ids, target_sparsity=args.target,
                             batches=args.batches, seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps)
        ppl = lte.evaluate(model, inputs.heldout_ids, mode="hard", max_batches=args.batches, seq_len=args.seq_len,
                           batch_size=args.batch_size)["ppl"]
        lte.save(model, Path(args.out) / "lte")
    _print({"sparsity": report.sparsity, "sparsity_per_layer": report.sparsity_per_layer,
            "eval_ppl": ppl, "fit_loss": report.fit_loss, "bias_shift": report.bias_shift,
            "saved": str(Path(args.out) / "lte"), "data": _data_summary(inputs)})
    return 0
