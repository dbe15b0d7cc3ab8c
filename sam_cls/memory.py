"""The memory bank: one cell (embedding, label) per training example; the classifier's real weights."""

import ctypes
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

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
    # a page walk as well. At N=1e7 (5 GB; benchmarks/huge_pages.py, 2 CPU cores) huge pages cut the training
    # read's forward 9.9 -> 7.6 ms and its backward 5.0 -> 3.9 ms. MADV_COLLAPSE (Linux 6.1+) moves the
    # written pages into huge ones once: 2.3 s there.
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
    """N x d embeddings and N labels, written in place so an index can keep a live view of them."""

    def __init__(self, embeddings: torch.Tensor, labels: torch.Tensor):
        if embeddings.ndim != 2 or labels.shape != (embeddings.shape[0],):
            raise ValueError(
                f"memory needs (N, d) embeddings and (N,) labels, got {tuple(embeddings.shape)} "
                f"and {tuple(labels.shape)}"
            )
        # Kept as given when it is float32 and contiguous (no copy), so the caller's tensor is the one advised;
        # the collapse blocks once (2.3 s for 1e7 cells in benchmarks/huge_pages.py).
        self.embeddings = embeddings.float().contiguous()
        if self.embeddings.nbytes >= HUGE_PAGES_MIN_BYTES:
            back_with_huge_pages(self.embeddings)
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
