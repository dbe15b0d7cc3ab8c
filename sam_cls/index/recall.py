"""Recall@k of an index against exact search, and how long each took."""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from ._faiss import faiss
from .base import MemoryIndex
from .torch_exact import exact_search

if faiss is not None:
    from faiss.contrib.evaluation import knn_intersection_measure
else:

    def knn_intersection_measure(I1: np.ndarray, I2: np.ndarray) -> float:
        """Same measure as faiss.contrib.evaluation's: mean |top-k(a) & top-k(b)| / k."""
        return sum(np.intersect1d(a, b).size for a, b in zip(I1, I2)) / I1.size


def timed_ms(fn, repeats: int = 1):
    """(result, median milliseconds) of fn() over `repeats` calls, synchronising CUDA around each."""
    times, out = [], None
    for _ in range(max(1, repeats)):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return out, statistics.median(times)


def recall_at_k(
    index: MemoryIndex, vectors: torch.Tensor, queries: torch.Tensor, k: int, repeats: int = 1
) -> dict:
    """Share of the exact top-k ids (over `vectors`) the index also returns, and per-batch search times."""
    (_, approx), search_ms = timed_ms(lambda: index.search(queries, k), repeats)
    (_, exact), exact_ms = timed_ms(
        lambda: exact_search(vectors.detach().float(), queries.detach().float(), k), repeats
    )
    recall = knn_intersection_measure(approx.cpu().numpy(), exact.cpu().numpy())
    return {
        "recall_at_k": float(recall),
        "search_ms": round(search_ms, 3),
        "exact_search_ms": round(exact_ms, 3),
        "k": k,
        "n_queries": int(queries.shape[0]),
    }
