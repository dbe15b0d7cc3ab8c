"""The memory bank: one cell (embedding, label) per training example; the classifier's real weights."""

import ctypes
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from sam_cls.checkpoint import CheckpointError

# madvise(2) advice values (Linux): allow transparent huge pages on a range, and back it with them now.
MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25
THP_SIZE_FILE = Path("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")
# Memories from this size on get huge pages. It is above glibc's largest mmap threshold (32 MiB), so the range
# is the tensor's own mapping and the advice goes with it; a smaller one may sit in the malloc heap, whose
# later allocations would inherit it. Below it the reads gain little (huge_pages.py at 1e5 cells: 0.92x
# forward, 0.93x backward).
HUGE_PAGES_MIN_BYTES = 64 << 20


def back_with_huge_pages(tensor: torch.Tensor) -> bool:
    """Back a contiguous CPU tensor with transparent huge pages, in place; False where that did not happen."""
    # A read gathers K cells a query at random rows: once the memory outgrows the TLB's reach, each row costs
    # a page walk as well, which huge pages save (results/huge_pages.json: a quarter of the training read at
    # 1e7 cells). MADV_COLLAPSE (Linux 6.1+) moves the written pages into huge ones once, in seconds.
    # A non-contiguous view's nbytes is not the span it lives in: leave such tensors alone.
    if tensor.device.type != "cpu" or not tensor.is_contiguous() or sys.platform != "linux" \
            or not THP_SIZE_FILE.exists():
        return False
    page = int(THP_SIZE_FILE.read_text())
    start = tensor.data_ptr()
    # Only the whole huge pages inside the tensor: the edges may share pages with other allocations.
    lo, hi = -(-start // page) * page, (start + tensor.nbytes) // page * page
    if hi <= lo:
        return False
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    # HUGEPAGE first, so the range stays eligible when the kernel later splits or migrates a page. Where
    # COLLAPSE fails (a kernel before 6.1, no free huge pages) that advice stays: the background khugepaged
    # may still collapse the range later, and nothing is read or written differently.
    return madvise(lo, hi - lo, MADV_HUGEPAGE) == 0 and madvise(lo, hi - lo, MADV_COLLAPSE) == 0


class MemoryBank:
    """N x d embeddings and N labels, written in place so an index can keep a live view of them.

    Row r holds the cell of training example example_ids[r] (rows[e] is example e's row). Rows start in
    example order; reorder() moves them so that an IVF index's lists lie side by side (see IndexRefresher).
    """

    def __init__(self, embeddings: torch.Tensor, labels: torch.Tensor):
        if embeddings.ndim != 2 or labels.shape != (embeddings.shape[0],):
            raise ValueError(
                f"memory needs (N, d) embeddings and (N,) labels, got {tuple(embeddings.shape)} "
                f"and {tuple(labels.shape)}"
            )
        # Kept as given when it is float32 and contiguous (no copy), so the caller's tensor is the one advised;
        # the collapse blocks once (results/huge_pages.json gives its seconds).
        self.embeddings = embeddings.float().contiguous()
        if self.embeddings.nbytes >= HUGE_PAGES_MIN_BYTES:
            back_with_huge_pages(self.embeddings)
        # Its own copy: reorder() moves labels in place, and the caller's (a data set's targets) must stay put.
        self.labels = labels.to(embeddings.device, torch.long, copy=True)
        # The step at which each cell was last written: how stale a cell is, for staleness policies.
        self.last_written = torch.zeros(len(labels), dtype=torch.long, device=embeddings.device)
        self.example_ids = torch.arange(len(labels), device=embeddings.device)
        self.rows = torch.empty_like(self.example_ids)
        self._index_rows()

    @property
    def size(self) -> int:
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    @torch.no_grad()
    def write(self, examples: torch.Tensor, u: torch.Tensor, eta: float, step: int) -> None:
        """Momentum write of the batch's own cells: m <- normalise(eta m + (1 - eta) u)."""
        ids = self.rows[examples]
        # index_select / index_copy_: the plain kernels, cheaper on CPU than advanced indexing's.
        mixed = torch.lerp(u.detach().to(self.embeddings), self.embeddings.index_select(0, ids), eta)
        self.embeddings.index_copy_(0, ids, F.normalize(mixed, dim=1))
        self.last_written.index_fill_(0, ids, step)

    @torch.no_grad()
    def replace(self, embeddings: torch.Tensor, step: int) -> None:
        """Overwrite every cell in place from embeddings in example order (views held elsewhere stay valid)."""
        self.embeddings.copy_(embeddings.index_select(0, self.example_ids.to(embeddings.device)))
        self.last_written.fill_(step)

    @torch.no_grad()
    def reorder(self, order: torch.Tensor) -> None:
        """Move the cell in row order[r] to row r, in place: the layout an index built its ids in."""
        # Why: a training read fetches K scattered rows a query. With each IVF list's cells side by side, a
        # query's candidates (from a few lists) share pages and DRAM rows instead of spanning the whole
        # memory: at N=1e7 (benchmarks/scaling.py) that is most of what the step gains.
        order = order.to(self.embeddings.device)
        if order.shape != (self.size,):
            raise ValueError(f"a reorder of {self.size} cells needs ({self.size},) rows, got {tuple(order.shape)}")
        if torch.equal(order, torch.arange(self.size, device=order.device)):
            return  # already in this layout (a resumed run rebuilding the index it saved)
        # One gathered copy, then back into the same tensors: indexes and trainers hold views of them.
        self.embeddings.copy_(self.embeddings.index_select(0, order))
        for tensor in (self.labels, self.last_written, self.example_ids):
            tensor.copy_(tensor.index_select(0, order))
        self._index_rows()

    def _index_rows(self) -> None:
        """rows, the inverse of example_ids: a write or an exclusion maps a batch of examples in one gather."""
        self.rows[self.example_ids] = torch.arange(self.size, device=self.example_ids.device)

    def state_dict(self) -> dict:
        return {"embeddings": self.embeddings, "labels": self.labels, "last_written": self.last_written,
                "example_ids": self.example_ids}

    @classmethod
    def from_state_dict(cls, state: dict, device: torch.device | str = "cpu") -> "MemoryBank":
        bank = cls(state["embeddings"].to(device), state["labels"].to(device))
        if "last_written" in state:
            bank.last_written = state["last_written"].to(device)
        if "example_ids" in state:  # absent before cells were laid out by index list: example order
            example_ids = state["example_ids"].to(device).long()
            if example_ids.shape != (bank.size,) or not torch.equal(
                    torch.sort(example_ids).values, torch.arange(bank.size, device=example_ids.device)):
                raise CheckpointError(f"memory example_ids must order the {bank.size} cells' examples, each once: "
                                      f"the checkpoint is corrupt")
            bank.example_ids = example_ids
            bank._index_rows()
        return bank
