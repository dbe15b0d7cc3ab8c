"""What every index back-end offers the classifier: k-NN search over the memory cells by inner product."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import torch

from .store import write_index_file

METRIC = "inner_product"


class MemoryIndex(ABC):
    """Top-k inner-product search over N memory cells of dimension d, plus cheap refresh and save."""

    kind: str  # resolved kind: "flat", "ivf", "ivfpq", "hnsw" or "torch"
    description: str  # factory string and knobs, for logs
    # True where a search of non-finite queries returns (meaningless) ids instead of failing, so a trainer
    # on a GPU need not stall it every step to check its queries first.
    searches_non_finite: bool = False
    # After a build or refresh with params.list_order: id i is row layout[i] of the vectors given, so the
    # memory must apply the same order (MemoryBank.reorder). None: ids are the vectors' own rows.
    layout: torch.Tensor | None = None

    @property
    @abstractmethod
    def size(self) -> int: ...

    @property
    @abstractmethod
    def dim(self) -> int: ...

    def search(
        self, queries: torch.Tensor, k: int, nprobe: int | None = None, k_factor: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (B, k) float32 and ids (B, k) int64 on the queries' device, best first.

        nprobe (IVF kinds) and k_factor (ivfpq's re-rank) narrow the search for this call only, never
        deepen it: a training read needs less than an evaluation. Other kinds search as they are.
        """
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be (B, {self.dim}), got {tuple(queries.shape)}")
        if not 1 <= k <= self.size:
            raise ValueError(f"k={k} must be between 1 and the index size {self.size}")
        if queries.shape[0] == 0:
            empty = torch.empty(0, k, device=queries.device)
            return empty, empty.long()
        # detach(): faiss's torch bridge rejects Tensor subclasses such as nn.Parameter.
        return self._search(queries.detach().float().contiguous(), k, nprobe, k_factor)

    @abstractmethod
    def _search(
        self, queries: torch.Tensor, k: int, nprobe: int | None, k_factor: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    @abstractmethod
    def refresh(self, vectors: torch.Tensor) -> None:
        """Re-index the same N cells with new values, reusing whatever training the index has."""

    @abstractmethod
    def rebuilder(self) -> Callable[[torch.Tensor], MemoryIndex]:
        """A function that indexes new values with this index's kind, training and knobs.

        It does not touch this index, so a worker thread can build the next index while this one serves
        searches; what it returns is still on the CPU (for faiss) until place() is called.
        """

    def save(self, path: str | Path) -> None:
        """Write the index with kind/metric/dim/size metadata so a later load can verify it."""
        backend, payload = self._payload()
        write_index_file(path, {**self.header(), "backend": backend}, payload)

    def header(self) -> dict:
        """The metadata saved with the index and checked by load_index."""
        return {
            "kind": self.kind,
            "metric": METRIC,
            "dim": self.dim,
            "size": self.size,
            "description": self.description,
        }

    @abstractmethod
    def _payload(self) -> tuple[str, object]:
        """(backend name, buffer) for save: the serialized CPU form of the index."""

    def centroids(self) -> torch.Tensor | None:
        """An IVF index's coarse centroids, which a retrain starts k-means from; None for other kinds."""
        return None

    def place(self) -> None:
        """Move to the target device where that was deferred (see rebuilder); a no-op by default."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description}, size={self.size}, dim={self.dim})"


def check_vectors(vectors: torch.Tensor) -> torch.Tensor:
    """Validate an (N, d) memory and return it as a detached contiguous float32 tensor."""
    if vectors.ndim != 2 or vectors.shape[0] < 1 or vectors.shape[1] < 1:
        raise ValueError(f"index vectors must be a non-empty (N, d) tensor, got {tuple(vectors.shape)}")
    return vectors.detach().float().contiguous()
