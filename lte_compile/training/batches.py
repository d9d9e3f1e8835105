"""Training batches: deterministic token windows (`TokenBatches`), lists of dict batches, the held-out
split, and one batch's task loss.

`TokenBatches` turns a 1-D token tensor into fixed-length windows served in a seeded order. Batch `i`
depends only on (seed, i), so a checkpoint stores the position alone and a resumed run sees the same
batches; under DDP each rank takes every `world_size`-th window.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .config import LossFn, TrainConfig

logger = logging.getLogger(__name__)


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


class _ListBatches:
    """Cycles through a list of dict batches; `position` is the checkpointed state."""

    def __init__(self, batches: list[dict[str, Tensor]], rank: int = 0, world_size: int = 1):
        self.batches = batches[rank::world_size] if world_size > 1 else batches
        if not self.batches:
            raise ConfigError("data", f"{len(batches)} batches", f">= {world_size} batches (one per rank)")
        self.position = 0

    def batch(self, index: int) -> dict[str, Tensor]:
        return self.batches[index % len(self.batches)]

    def __next__(self) -> dict[str, Tensor]:
        out = self.batch(self.position)
        self.position += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])


def make_batches(data: Any, cfg: TrainConfig, rank: int = 0, world_size: int = 1,
                 eval_data: Any = None) -> tuple[Any, list[dict[str, Tensor]]]:
    """(training batch source with `batch(i)`/`position`, held-out batches) from user data."""
    if isinstance(data, Tensor):
        if data.dim() != 1:
            raise ConfigError("data", tuple(data.shape), "a 1-D token tensor, a TokenBatches or a list of dict batches")
        if eval_data is None:
            _check_token_split(data.numel(), cfg, world_size)
            n_hold = int(data.numel() * cfg.heldout_fraction)
            data, eval_data = data[: data.numel() - n_hold], data[data.numel() - n_hold:]
        data = TokenBatches(data, cfg.seq_len, cfg.batch_size, seed=cfg.seed)
    if isinstance(data, TokenBatches):
        train = TokenBatches(data.tokens, data.seq_len, data.batch_size, data.seed, rank, world_size, data.position)
        if eval_data is None:
            raise ConfigError("eval_data", None, "held-out data (a token tensor or batches) with a TokenBatches")
        return train, eval_list(eval_data, data.seq_len, data.batch_size, cfg.eval_batches, rank, world_size)
    if isinstance(data, dict):
        raise ConfigError("data", "a dict", "a list of dict batches (wrap one batch in a list)")
    batches = list(data) if not isinstance(data, list) else data
    if not batches:
        raise ConfigError("data", "0 batches", "at least one batch")
    n_given = len(batches)
    if eval_data is None:
        n_hold = max(1, int(len(batches) * 0.1)) if len(batches) > 1 else 0
        if not n_hold:
            logger.warning("lte.train: the single batch you passed is used for training and for the held-out "
                           "evaluation, so the final eval_loss and sparsity are measured on training data; pass "
                           "eval_data=[...] (or more batches: 10%% are held out) for an honest held-out figure")
        eval_data = batches[len(batches) - n_hold:] if n_hold else batches
        batches = batches[: len(batches) - n_hold]
    held = eval_list(eval_data, cfg.seq_len, cfg.batch_size, cfg.eval_batches, rank, world_size)
    try:
        return _ListBatches(batches, rank, world_size), held
    except ConfigError as e:  # quote what the user passed, not what is left after the hold-out
        if n_given == len(batches):
            raise
        raise ConfigError("data", f"{n_given} batches", f">= {world_size + max(1, int(n_given * 0.1))} batches "
                          f"({world_size} to train on, one per rank, after 10% are held out)",
                          "pass more batches, or eval_data=[...] so none are held out") from e


def _check_token_split(total: int, cfg: TrainConfig, world_size: int) -> None:
    """A token tensor split into training and held-out parts must fill one batch on each side;
    the error quotes the tokens the user passed (not what is left after the hold-out)."""
    need_train, need_hold, f = cfg.seq_len * cfg.batch_size * world_size, cfg.seq_len * cfg.batch_size, \
        cfg.heldout_fraction
    n_hold = int(total * f)
    if total - n_hold >= need_train and n_hold >= need_hold:
        return
    need = max(math.ceil(need_train / (1 - f)), math.ceil(need_hold / f))
    while need - int(need * f) < need_train or int(need * f) < need_hold:
        need += 1
    raise ConfigError("data", f"{total} tokens", f">= {need} tokens: {need_train} to train on "
                      f"(seq_len*batch_size*world_size = {cfg.seq_len}*{cfg.batch_size}*{world_size}) after holding out "
                      f"heldout_fraction={f}, which must itself fill one batch of {need_hold} tokens "
                      f"(you passed {total}: {total - n_hold} to train on, {n_hold} held out)",
                      "give more text, lower seq_len/batch_size, or pass eval_data")


def eval_list(eval_data: Any, seq_len: int, batch_size: int, limit: int, rank: int, world: int) -> list[dict[str, Tensor]]:
    if isinstance(eval_data, Tensor):
        try:
            eval_data = TokenBatches(eval_data, seq_len, batch_size)
        except ConfigError as e:
            raise ConfigError("eval_data", f"{eval_data.numel()} tokens", f">= {seq_len * batch_size} tokens "
                              "(one batch of seq_len x batch_size)", "give more held-out text") from e
    if isinstance(eval_data, TokenBatches):
        out = eval_data.eval_batches(limit * world)
    else:
        out = list(eval_data)[: limit * world]
    out = out[rank::world] if world > 1 and len(out) >= world else out
    if not out:
        raise ConfigError("eval_data", "0 batches", "at least one held-out batch")
    return out


def prepare_batch(batch: dict[str, Tensor], task: str, device: torch.device) -> dict[str, Tensor]:
    """Move to device; for causal LMs add labels (input_ids, padding -> -100) when missing."""
    if not isinstance(batch, dict) or "input_ids" not in batch and "inputs_embeds" not in batch:
        raise ConfigError("batch", type(batch).__name__, "a dict with 'input_ids' (and optionally "
                          "'attention_mask', 'labels')")
    b = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    kind = _task_of(b, task)
    if kind == "causal_lm":
        labels = b.get("labels", b["input_ids"]).clone()
        if "attention_mask" in b:
            labels = labels.masked_fill(b["attention_mask"] == 0, -100)
        b["labels"] = labels
    elif "labels" not in b:
        raise ConfigError("labels", None, "a 'labels' entry in every batch for sequence classification")
    return b


def _task_of(batch: dict[str, Tensor], task: str) -> str:
    if task != "auto":
        return task
    labels = batch.get("labels")
    if labels is None or ("input_ids" in batch and labels.shape == batch["input_ids"].shape):
        return "causal_lm"
    return "sequence_classification"


def task_loss(model: nn.Module, batch: dict[str, Tensor], loss_fn: LossFn | None = None) -> Tensor:
    """The task loss of one forward: `loss_fn(model, batch)` or the model's own `.loss` (transformers)."""
    if loss_fn is not None:
        return loss_fn(model, batch)
    out = model(**batch)
    loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
    if loss is None:
        raise ConfigError("loss_fn", None, "a loss function (model, batch) -> Tensor for models without a .loss output")
    return loss
