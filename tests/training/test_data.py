"""The shipped corpus, its split by work, and deterministic token batches."""
from __future__ import annotations

import torch

from lte_compile.small_lm.corpus import VALIDATION_WORKS, load_works, split_works
from lte_compile.training import TokenBatches


def test_corpus_is_shipped_and_split_by_work():
    works = load_works()
    assert len(works) == 42 and all(k.endswith("_gut") for k in works)  # one modern text per work
    train, val = split_works(works)
    assert len(val) == len(VALIDATION_WORKS) and len(train) == 42 - len(VALIDATION_WORKS)
    assert not set(val) & set(train)
    assert all("Project Gutenberg" not in t for t in train + val)  # boilerplate-free texts
    assert 0.05 < sum(map(len, val)) / sum(map(len, works.values())) < 0.15


def test_token_batches_are_a_function_of_position_and_shard_by_rank():
    ids = torch.arange(10_000)
    a, b = TokenBatches(ids, 16, 4, seed=3), TokenBatches(ids, 16, 4, seed=3)
    first = [next(a)["input_ids"] for _ in range(5)]
    b.load_state_dict({"position": 3, "seed": 3, "seq_len": 16, "batch_size": 4})
    assert torch.equal(next(b)["input_ids"], first[3])
    r0, r1 = (TokenBatches(ids, 16, 4, seed=3, rank=r, world_size=2).batch(0)["input_ids"] for r in (0, 1))
    starts0, starts1 = set(r0[:, 0].tolist()), set(r1[:, 0].tolist())
    assert len(starts0) == 4 and not starts0 & starts1  # disjoint windows per rank
    assert all(s % 16 == 0 for s in starts0)
