"""The user's own data for `lte train` / `lte fit` / `lte eval`: read, tokenize, split, check.

    tok = as_text_tokenizer(AutoTokenizer.from_pretrained(model_dir))   # or a `tokenizers.Tokenizer`
    train_ids, heldout_ids = load_token_data("corpus.jsonl", tok, heldout_fraction=0.05)
    check_token_data(train_ids, heldout_ids, seq_len=256, batch_size=8)  # the "too short" errors, up front

A data file is one of
- `.txt`: plain UTF-8 text, one document;
- `.jsonl`: one JSON object per line with a string `text` field, one document per line;
- `.safetensors`: one 1-D integer tensor of token ids (key `input_ids`, or the file's only tensor), one
  stream already tokenized. Pickle files (`.pt`, `.bin`, ...) are refused: loading one runs its code.
Documents are tokenized without special tokens and joined with the tokenizer's EOS between them. The
held-out part is whole documents from the end of the file when a document boundary lies near the
requested fraction, else the tail of the token stream (`split_heldout` says how near).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from ..errors import ConfigError, LTEError

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".npy", ".npz")
SUFFIXES = (".txt", ".jsonl", ".safetensors")
TENSOR_KEY = "input_ids"


class DataFileError(LTEError, ValueError):
    """A data file is missing, of an unsupported kind, or malformed; the message names the file (and line)."""


# ----------------------------------------------------------------------------- tokenizers
class TextTokenizer:
    """What data loading needs of a tokenizer: `encode(texts)` (ids per text, no special tokens),
    `eos_id` (None if the tokenizer has none) and `vocab_size`. `as_text_tokenizer` wraps a
    `tokenizers.Tokenizer` (the shipped small LMs) or a transformers tokenizer (`AutoTokenizer`)."""

    eos_id: int | None
    vocab_size: int

    def encode(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError


class _RawTokenizer(TextTokenizer):
    """A `tokenizers.Tokenizer`; its EOS is named by the caller (the library has no notion of one)."""

    def __init__(self, tok: Any, eos_token: str | None):
        self.tok = tok
        self.eos_id = tok.token_to_id(eos_token) if eos_token is not None else None
        self.vocab_size = tok.get_vocab_size()

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]


class _TransformersTokenizer(TextTokenizer):
    def __init__(self, tok: Any):
        self.tok = tok
        self.eos_id = tok.eos_token_id
        self.vocab_size = len(tok)

    def encode(self, texts: list[str]) -> list[list[int]]:
        # verbose=False: a whole file is longer than model_max_length on purpose (it is cut into windows later)
        return self.tok(texts, add_special_tokens=False, verbose=False)["input_ids"]


def as_text_tokenizer(tok: Any, eos_token: str | None = None) -> TextTokenizer:
    """Wrap a transformers tokenizer (EOS: its `eos_token`) or a `tokenizers.Tokenizer` (EOS: `eos_token`)."""
    if isinstance(tok, TextTokenizer):
        return tok
    if hasattr(tok, "encode_batch") and hasattr(tok, "token_to_id"):
        return _RawTokenizer(tok, eos_token)
    if callable(tok) and hasattr(tok, "eos_token_id"):
        return _TransformersTokenizer(tok)
    raise ConfigError("tokenizer", type(tok).__name__, "a transformers tokenizer (AutoTokenizer.from_pretrained) "
                      "or a tokenizers.Tokenizer")


# ----------------------------------------------------------------------------- reading files
def read_documents(path: str | Path) -> list[str] | Tensor:
    """The documents of a .txt / .jsonl file (list of texts), or the token stream of a .safetensors file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise DataFileError(f"{path}: {suffix} files are pickles, which lte never loads (unpickling runs code); "
                            f"save the token ids as safetensors: safetensors.torch.save_file({{'{TENSOR_KEY}': ids}}, "
                            "'data.safetensors') with ids a 1-D integer tensor")
    if suffix not in SUFFIXES:
        raise DataFileError(f"{path}: unsupported data file {suffix or '(no suffix)'}; give a .txt (plain text), "
                            ".jsonl (one {\"text\": ...} object per line) or .safetensors (1-D token ids) file")
    if not path.is_file():
        raise DataFileError(f"{path}: no such file; give the path of a {'/'.join(SUFFIXES)} file")
    if suffix == ".safetensors":
        return read_token_tensor(path)
    text = _read_text(path)
    docs = [text] if suffix == ".txt" else _jsonl_texts(path, text)
    docs = [d for d in docs if d]
    if not docs:
        raise DataFileError(f"{path}: no text in the file; give a file with text to train on")
    return docs


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataFileError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); convert it to UTF-8, "
                            "e.g. iconv -t utf-8") from None


def _jsonl_texts(path: Path, text: str) -> list[str]:
    docs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFileError(f"{path}: line {number} is not JSON ({e.msg} at column {e.colno}); every line "
                                'must be one object like {"text": "..."}') from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            what = "has no 'text' field" if not isinstance(record, dict) or "text" not in record else \
                f"has a 'text' that is a {type(record['text']).__name__}, not a string"
            raise DataFileError(f"{path}: line {number} {what}; every line must be one object like "
                                '{"text": "..."}')
        docs.append(record["text"])
    return docs


def read_token_tensor(path: Path) -> Tensor:
    """The 1-D integer tensor of a .safetensors file (`input_ids`, or its only tensor), as int64."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            key = TENSOR_KEY if TENSOR_KEY in keys else keys[0] if len(keys) == 1 else None
            if key is None:
                raise DataFileError(f"{path}: {len(keys)} tensors ({', '.join(keys[:5]) or 'none'}) and none named "
                                    f"'{TENSOR_KEY}'; save the token ids alone or under the key '{TENSOR_KEY}'")
            ids = f.get_tensor(key)
    except SafetensorError as e:
        raise DataFileError(f"{path}: not a readable safetensors file ({e}); write it with "
                            "safetensors.torch.save_file") from None
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise DataFileError(f"{path}: tensor '{key}' is {ids.dtype} of shape {tuple(ids.shape)}; expected a 1-D "
                            "integer tensor of token ids (flatten it: ids.reshape(-1).long())")
    if ids.numel() and int(ids.min()) < 0:
        raise DataFileError(f"{path}: tensor '{key}' has a negative token id ({int(ids.min())}); token ids are >= 0")
    return ids.long()


# ----------------------------------------------------------------------------- tokenizing and splitting
def tokenize_documents(docs: Sequence[str], tokenizer: Any) -> list[Tensor]:
    """Token ids of each document (no special tokens)."""
    tok = as_text_tokenizer(tokenizer)
    return [torch.tensor(ids, dtype=torch.long) for ids in tok.encode(list(docs))]


def join_documents(docs: Sequence[Tensor], eos_id: int | None) -> Tensor:
    """One stream with `eos_id` between documents."""
    if len(docs) > 1 and eos_id is None:
        raise ConfigError("tokenizer.eos_token", None, "an end-of-sequence token to put between documents",
                          "set one (tokenizer.eos_token = '...'; tokenizer.save_pretrained(dir)) or give one document")
    parts: list[Tensor] = []
    for i, d in enumerate(docs):
        if i:
            parts.append(torch.tensor([eos_id], dtype=torch.long))
        parts.append(d)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def split_heldout(docs: Sequence[Tensor], heldout_fraction: float, eos_id: int | None) -> tuple[Tensor, Tensor]:
    """(train stream, held-out stream): the last documents when their tokens come within half of
    `heldout_fraction` of the total (so no document is cut and none is in both parts), else the
    last `heldout_fraction` of the joined stream (one document, or documents too large to split at)."""
    sizes = [d.numel() for d in docs]
    target = heldout_fraction * sum(sizes)
    best, held = None, 0
    for k in range(1, len(docs)):  # k documents held out, at least one left to train on
        held += sizes[-k]
        if best is None or abs(held - target) < abs(best[1] - target):
            best = (k, held)
    if best is not None and abs(best[1] - target) <= target / 2:
        k = best[0]
        return join_documents(docs[:-k], eos_id), join_documents(docs[-k:], eos_id)
    stream = join_documents(docs, eos_id)
    n_hold = int(stream.numel() * heldout_fraction)
    return stream[: stream.numel() - n_hold], stream[stream.numel() - n_hold:]


def check_heldout_fraction(value: Any) -> float:
    """The range `TrainConfig.heldout_fraction` allows."""
    from ..config import check_float

    return check_float("heldout_fraction", value, low=0.0, high=0.5, low_open=True, high_open=True,
                       allowed="a float in (0, 0.5)")


def load_token_data(path: str | Path, tokenizer: Any, heldout_fraction: float = 0.05) -> tuple[Tensor, Tensor]:
    """(train_ids, heldout_ids), 1-D int64, from a .txt / .jsonl / .safetensors file (module docstring).

    `tokenizer`: a transformers tokenizer, a `tokenizers.Tokenizer` or a `TextTokenizer`; a
    .safetensors file is already tokenized and only split.
    """
    heldout_fraction = check_heldout_fraction(heldout_fraction)
    content = read_documents(path)
    if isinstance(content, Tensor):
        return split_heldout([content], heldout_fraction, None)
    tok = as_text_tokenizer(tokenizer)
    docs = [d for d in tokenize_documents(content, tok) if d.numel()]
    if not docs:
        raise DataFileError(f"{path}: the tokenizer turned the text into no tokens; check that it is the model's "
                            "tokenizer")
    return split_heldout(docs, heldout_fraction, tok.eos_id)


def corpus_token_data(tokenizer: Any) -> tuple[Tensor, Tensor]:
    """(train, held-out) of the shipped Shakespeare corpus, split by work as `small_lm.model.corpus_tokens`
    does (EOS after every work), tokenized with any tokenizer."""
    from ..small_lm.corpus import load_works, split_works

    tok = as_text_tokenizer(tokenizer)
    if tok.eos_id is None:
        raise ConfigError("tokenizer.eos_token", None, "an end-of-sequence token to put between the corpus' works",
                          "set one (tokenizer.eos_token = '...'; tokenizer.save_pretrained(dir)) or pass --data")
    eos = torch.tensor([tok.eos_id], dtype=torch.long)
    return tuple(torch.cat([part for d in tokenize_documents(texts, tok) for part in (d, eos)])
                 for texts in split_works(load_works()))


# ----------------------------------------------------------------------------- checks
def check_token_data(train_ids: Tensor | None, heldout_ids: Tensor, *, seq_len: int, batch_size: int,
                     world_size: int = 1, vocab_size: int | None = None, source: str | None = None) -> None:
    """Raise the "too short" ConfigError before any model work: the training stream must fill one batch
    per rank (seq_len*batch_size*world_size tokens), the held-out stream one batch (seq_len*batch_size);
    every id must be < `vocab_size` (the model's embedding rows). `train_ids` None: held-out only (eval)."""
    need_train, need_hold = seq_len * batch_size * world_size, seq_len * batch_size
    short_train = train_ids is not None and train_ids.numel() < need_train
    if short_train or heldout_ids.numel() < need_hold:
        have = (f"{train_ids.numel()} tokens to train on, " if train_ids is not None else "") + \
            f"{heldout_ids.numel()} held out"
        want = (f">= {need_train} tokens to train on (seq_len*batch_size*world_size = "
                f"{seq_len}*{batch_size}*{world_size}) and " if train_ids is not None else "") + \
            f">= {need_hold} held out (one batch of seq_len*batch_size)"
        hint = "give more text or lower seq_len/batch_size" + \
            (" or raise heldout_fraction" if heldout_ids.numel() < need_hold and not short_train else "")
        raise ConfigError("data", f"{source}: {have}" if source else have, want, hint)
    if vocab_size is not None:
        top = max(int(t.max()) for t in (train_ids, heldout_ids) if t is not None and t.numel())
        if top >= vocab_size:
            raise ConfigError("data", f"{source}: token id {top}" if source else f"token id {top}",
                              f"ids < {vocab_size} (the model's vocab_size)",
                              "tokenize with the model's own tokenizer")


def fits_in_context(seq_len: int, max_positions: int | None) -> None:
    if max_positions is not None and seq_len > max_positions:
        raise ConfigError("seq_len", seq_len, f"<= {max_positions} (the model's max_position_embeddings)",
                          "lower --seq-len")
