"""What every index back-end offers the classifier: k-NN search over the memory cells by inner product."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import torch

from .store import write_index_file

METRIC = "inner_product"


class MemoryIndex(ABC):
    """Top-k inner-product search over N memory cells of dimension d, kept in step with them and saved."""

    kind: str  # resolved kind: "flat", "ivf", "ivfpq", "hnsw" or "torch"
    description: str  # factory string and knobs, for logs
    exact: bool = False  # returns the exact top-k: its recall needs no measuring
    trains: bool = False  # learns from the cells (IVF k-means), so a rebuild may retrain it
    # True where a search of non-finite queries returns (meaningless) ids instead of failing, so a trainer
    # on a GPU need not stall it every step to check its queries first.
    searches_non_finite: bool = False

    @property
    @abstractmethod
    def size(self) -> int: ...

    @property
    @abstractmethod
    def dim(self) -> int: ...

    def search(self, queries: torch.Tensor, k: int, training: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (B, k) float32 and ids (B, k) int64 on the queries' device, best first.

        training=True lets a back-end search shallower (a training read needs only the cells that carry its
        softmax; see params.py); exact back-ends search as they are.
        """
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be (B, {self.dim}), got {tuple(queries.shape)}")
        if not 1 <= k <= self.size:
            raise ValueError(f"k={k} must be between 1 and the index size {self.size}")
        if queries.shape[0] == 0:
            empty = torch.empty(0, k, device=queries.device)
            return empty, empty.long()
        # detach(): faiss's torch bridge rejects Tensor subclasses such as nn.Parameter.
        return self._search(queries.detach().float().contiguous(), k, training)

    def search_deep(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A search for far more candidates than the K the index was built for (a per-source read's): as search()
        here; an IVF index probes lists in proportion (faiss_index.py)."""
        return self.search(queries, k)

    @abstractmethod
    def _search(self, queries: torch.Tensor, k: int, training: bool) -> tuple[torch.Tensor, torch.Tensor]: ...

    @abstractmethod
    def add(self, vectors: torch.Tensor) -> None:
        """Append cells: their ids continue from the current size (the memory's rows appended to)."""

    @abstractmethod
    def refresh(self, vectors: torch.Tensor) -> None:
        """Re-index the cells with new values (N may change), in place, reusing whatever training it has."""

    @abstractmethod
    def rebuilder(self, retrain: bool = False, warm: bool = True) -> Callable[[torch.Tensor], MemoryIndex]:
        """A function that indexes new values with this index's kind and knobs (retrained where asked and
        the kind trains; warm: from what this one learned).

        It reads nothing of this index when called, so a worker thread can build the next index while this
        one serves searches.
        """

    def take_layout(self) -> torch.Tensor | None:
        """The row order the last build or refresh filled the cells in (id i is row layout[i] of the vectors
        given), once: the memory must move its rows to match (MemoryBank.reorder). None: ids are rows."""
        return None

    def learned(self) -> torch.Tensor | None:
        """What the index learned from the cells (IVF's coarse centroids): a checkpoint keeps it, so a resumed
        run rebuilds this very index. None for kinds that learn nothing."""
        return None

    def calibrate(self, vectors: torch.Tensor, log: Callable[[str], None] | None = None) -> dict | None:
        """Set the evaluation depth by the recall it measures on a sample of `vectors` (the cells, in id
        order); None for kinds with no depth to choose (calibrate.py)."""
        return None

    def save(self, path: str | Path, extra: dict | None = None) -> dict:
        """Write the index with kind/metric/dim/size metadata so a later load can verify it (and any extra
        fields: the run's generation it was committed with); returns that."""
        backend, payload = self._payload()
        return write_index_file(path, {**self.header(), "backend": backend, **(extra or {})}, payload)

    def header(self) -> dict:
        """The metadata saved with the index and checked by load_index."""
        return {"kind": self.kind, "metric": METRIC, "dim": self.dim, "size": self.size,
                "description": self.description}

    @abstractmethod
    def _payload(self) -> tuple[str, object]:
        """(backend name, buffer) for save: the serialized CPU form of the index."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description}, size={self.size}, dim={self.dim})"


def check_vectors(vectors: torch.Tensor) -> torch.Tensor:
    """Validate an (N, d) memory and return it as a detached contiguous float32 tensor."""
    if vectors.ndim != 2 or vectors.shape[0] < 1 or vectors.shape[1] < 1:
        raise ValueError(f"index vectors must be a non-empty (N, d) tensor, got {tuple(vectors.shape)}")
    return vectors.detach().float().contiguous()
