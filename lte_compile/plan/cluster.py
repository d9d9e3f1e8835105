"""Balanced k-means: group an FFN's neurons into E experts of exactly B neurons each.

Neurons are represented by the L2-normalised rows of W_up (W_gate for GLU), so neurons that
respond to similar inputs share an expert and an expert's activity is well predicted by a router.
"""
from __future__ import annotations

import torch
from torch import Tensor


def balanced_assign(scores: Tensor, capacity: int) -> Tensor:
    """scores: [N, E] similarity -> labels [N] with exactly `capacity` neurons per cluster.

    Greedy rounds: each unassigned neuron proposes to its best cluster that still has room; each
    cluster accepts its highest-scoring proposals up to its remaining room. At least one neuron is
    placed per round, so it terminates; in practice a few rounds suffice.
    """
    n, e = scores.shape
    if n != e * capacity:
        raise ValueError(f"balanced_assign: {n} neurons do not fill {e} clusters of {capacity}")
    labels = torch.full((n,), -1, dtype=torch.long)
    room = torch.full((e,), capacity, dtype=torch.long)
    while True:
        todo = (labels < 0).nonzero().squeeze(1)
        if todo.numel() == 0:
            return labels
        s = scores[todo].clone()
        s[:, room == 0] = float("-inf")
        best_score, best = s.max(dim=1)
        # Sort proposals by cluster, then by score (descending): rank within each cluster.
        order = torch.argsort(best_score, descending=True, stable=True)
        order = order[torch.argsort(best[order], stable=True)]
        cluster = best[order]
        first = torch.searchsorted(cluster, cluster, right=False)
        rank = torch.arange(order.numel()) - first
        accepted = order[rank < room[cluster]]
        labels[todo[accepted]] = best[accepted]
        room -= torch.bincount(best[accepted], minlength=e)


def balanced_kmeans(rows: Tensor, num_clusters: int, iters: int = 20, seed: int = 0) -> Tensor:
    """rows: [N, d] -> labels [N] in [0, E), each label used exactly N / E times (spherical k-means)."""
    n = rows.shape[0]
    if num_clusters <= 0 or n % num_clusters:
        raise ValueError(f"balanced_kmeans: {n} rows cannot form {num_clusters} equal clusters")
    capacity = n // num_clusters
    x = torch.nn.functional.normalize(rows.detach().float().cpu(), dim=1)  # [N, d]
    gen = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(n, generator=gen)[:num_clusters]]  # [E, d]
    labels = balanced_assign(x @ centroids.T, capacity)
    for _ in range(iters):
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        centroids = torch.nn.functional.normalize(sums, dim=1)
        new = balanced_assign(x @ centroids.T, capacity)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


def expert_permutation(labels: Tensor) -> Tensor:
    """labels [N] -> perm [N] such that neurons perm[e*B:(e+1)*B] are expert e (stable order)."""
    return torch.argsort(labels, stable=True)
