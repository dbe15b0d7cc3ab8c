"""Exact top-k by chunked matmul + topk on any torch device: CUDA without faiss GPU, and the reference."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .base import MemoryIndex, check_vectors

# Score-matrix elements per chunk (128 MB of float32): bounds memory whatever N and the batch size are.
CHUNK_ELEMENTS = 1 << 25


@torch.no_grad()
def exact_search(
    vectors: torch.Tensor, queries: torch.Tensor, k: int, chunk_elements: int = CHUNK_ELEMENTS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product top-k of queries (B, d) against vectors (N, d), on the vectors' device."""
    n, b = vectors.shape[0], queries.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of vectors {n}")
    queries = queries.to(vectors.device, vectors.dtype)
    q_step = max(1, min(b, chunk_elements // k))
    out_s = torch.empty(b, k, device=vectors.device, dtype=torch.float32)
    out_i = torch.empty(b, k, device=vectors.device, dtype=torch.int64)
    for q0 in range(0, b, q_step):
        q = queries[q0 : q0 + q_step]
        # Database chunk: as many cells as fit the element budget for this query chunk, never fewer than k.
        n_step = max(k, chunk_elements // q.shape[0])
        best_s = best_i = None
        for n0 in range(0, n, n_step):
            scores = q @ vectors[n0 : n0 + n_step].T
            s, i = scores.topk(min(k, scores.shape[1]), dim=1)
            i += n0
            if best_s is not None:
                # Merge this chunk's top-k with the running top-k.
                s, j = torch.cat([best_s, s], 1).topk(k, dim=1)
                i = torch.cat([best_i, i], 1).gather(1, j)
            best_s, best_i = s, i
        out_s[q0 : q0 + q_step], out_i[q0 : q0 + q_step] = best_s, best_i
    return out_s, out_i


class TorchExactIndex(MemoryIndex):
    """A copy of the cells on a torch device, searched exactly: no training, rebuild is a copy."""

    kind = "torch"
    exact = True
    searches_non_finite = True  # matmul and topk rank NaN like any value; nothing reads the ids on the host

    def __init__(self, vectors: torch.Tensor, device: str | torch.device = "cpu"):
        # A copy, not a view: the index holds the cells as indexed, like every other back-end.
        self.vectors = check_vectors(vectors).to(device, copy=True)
        self.description = f"torch exact matmul+topk ({self.vectors.device})"

    @property
    def size(self) -> int:
        return self.vectors.shape[0]

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def _search(self, queries: torch.Tensor, k: int, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        # Exact at any depth: a training read searches as an evaluation does.
        scores, ids = exact_search(self.vectors, queries, k)
        return scores.to(queries.device), ids.to(queries.device)

    def add(self, vectors: torch.Tensor) -> None:
        self.vectors = torch.cat([self.vectors, check_vectors(vectors).to(self.vectors.device)])

    def refresh(self, vectors: torch.Tensor) -> None:
        """Copy the new values in place (same N), else re-allocate."""
        vectors = check_vectors(vectors)
        if vectors.shape == self.vectors.shape:
            self.vectors.copy_(vectors)
        else:
            self.vectors = vectors.to(self.vectors.device, copy=True)

    def rebuilder(self, retrain: bool = False, warm: bool = True) -> Callable[[torch.Tensor], TorchExactIndex]:
        device = self.vectors.device
        return lambda vectors: TorchExactIndex(vectors, device)

    def _payload(self) -> tuple[str, object]:
        return "torch", self.vectors.cpu().numpy()
