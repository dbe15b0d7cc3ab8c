"""The memory bank: one cell (embedding, label) per training example; the classifier's real weights."""

import torch
import torch.nn.functional as F


class MemoryBank:
    """N x d embeddings and N labels, written in place so an index can keep a live view of them."""

    def __init__(self, embeddings: torch.Tensor, labels: torch.Tensor):
        if embeddings.ndim != 2 or labels.shape != (embeddings.shape[0],):
            raise ValueError(
                f"memory needs (N, d) embeddings and (N,) labels, got {tuple(embeddings.shape)} "
                f"and {tuple(labels.shape)}"
            )
        self.embeddings = embeddings.float().contiguous()
        self.labels = labels.long().to(embeddings.device)
        # The step at which each cell was last written: how stale a cell is, for staleness policies.
        self.last_written = torch.zeros(len(labels), dtype=torch.long, device=embeddings.device)

    @property
    def size(self) -> int:
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    @torch.no_grad()
    def write(self, ids: torch.Tensor, u: torch.Tensor, eta: float, step: int) -> None:
        """Momentum write of the batch's own cells: m <- normalise(eta m + (1 - eta) u)."""
        # index_select / index_copy_: the plain kernels, cheaper on CPU than advanced indexing's.
        mixed = torch.lerp(u.detach().to(self.embeddings), self.embeddings.index_select(0, ids), eta)
        self.embeddings.index_copy_(0, ids, F.normalize(mixed, dim=1))
        self.last_written.index_fill_(0, ids, step)

    @torch.no_grad()
    def replace(self, embeddings: torch.Tensor, step: int) -> None:
        """Overwrite every cell in place (keeps views held by the index refresher valid)."""
        self.embeddings.copy_(embeddings)
        self.last_written.fill_(step)

    def state_dict(self) -> dict:
        return {"embeddings": self.embeddings, "labels": self.labels, "last_written": self.last_written}

    @classmethod
    def from_state_dict(cls, state: dict, device: torch.device | str = "cpu") -> "MemoryBank":
        bank = cls(state["embeddings"].to(device), state["labels"].to(device))
        if "last_written" in state:
            bank.last_written = state["last_written"].to(device)
        return bank
