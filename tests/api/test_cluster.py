"""Balanced k-means: equal-size experts, a valid permutation, and it actually clusters."""
import torch
from lte_compile.testing import examples
from hypothesis import given, settings, strategies as st

from lte_compile.plan.cluster import balanced_assign, balanced_kmeans, expert_permutation


@settings(max_examples=examples(40))
@given(e=st.integers(1, 12), b=st.integers(1, 9), d=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_every_expert_gets_exactly_b_neurons(e, b, d, seed):
    rows = torch.randn(e * b, d, generator=torch.Generator().manual_seed(seed))
    labels = balanced_kmeans(rows, e, iters=5, seed=seed)
    assert torch.equal(torch.bincount(labels, minlength=e), torch.full((e,), b))
    perm = expert_permutation(labels)
    assert torch.equal(torch.sort(perm).values, torch.arange(e * b)), "not a permutation"
    assert torch.equal(labels[perm], torch.arange(e).repeat_interleave(b)), "experts not contiguous"


def test_separated_groups_are_recovered():
    """Four tight, well separated direction clusters of 8 rows: k-means must find them exactly."""
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(4, 16) * 10
    truth = torch.arange(4).repeat_interleave(8)[torch.randperm(32, generator=g)]
    rows = centers[truth] + 0.01 * torch.randn(32, 16, generator=g)
    labels = balanced_kmeans(rows, 4, iters=10)
    for k in range(4):  # each found cluster is one true group
        assert truth[labels == k].unique().numel() == 1


def test_balanced_assign_respects_capacity_under_contention():
    scores = torch.zeros(6, 3)
    scores[:, 0] = 1.0  # every neuron prefers cluster 0
    labels = balanced_assign(scores, 2)
    assert torch.equal(torch.bincount(labels, minlength=3), torch.tensor([2, 2, 2]))


def test_balanced_kmeans_rejects_unequal_split():
    import pytest
    with pytest.raises(ValueError, match="equal clusters"):
        balanced_kmeans(torch.randn(10, 3), 3)
