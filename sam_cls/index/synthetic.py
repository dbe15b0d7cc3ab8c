"""Clustered, L2-normalised synthetic embeddings: a trained memory's stand-in in index tests and benches."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clustered_embeddings(
    n: int, d: int, clusters: int = 100, seed: int = 0, n_queries: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cells (n, d), queries (n_queries, d)) drawn from the same Gaussian clusters, all unit-norm.

    Cluster centres are random unit vectors; noise has norm ~1 so a cluster is a broad cap, not a point,
    and with N/clusters < k the true top-k spans several clusters (the hard case for IVF).
    """
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(clusters, d, generator=gen), dim=1)
    total = n + n_queries
    points = torch.empty(total, d)
    step = 1 << 20  # rows per chunk: bounds the temporary memory at large N
    for i in range(0, total, step):
        m = min(step, total - i)
        labels = torch.randint(clusters, (m,), generator=gen)
        points[i : i + m] = F.normalize(centres[labels] + torch.randn(m, d, generator=gen) / d**0.5, dim=1)
    return points[:n], points[n:]
