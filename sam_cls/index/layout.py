"""Filling an IVF index list by list, so that the memory can keep each list's cells side by side."""

from __future__ import annotations

import torch

from ._faiss import require_faiss


def list_layout(ivf, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x[layout], layout, lists): the rows of x list by list (stable: rows in order stay put), and their lists."""
    # Why: a training read fetches K scattered rows a query. With each list's cells side by side, a query's
    # candidates (from a few lists) share pages instead of spanning the whole memory (see
    # benchmarks/ablations/list_layout.py and results/list_layout.json).
    _, lists = ivf.quantizer.search(x, 1)  # each cell's list, as faiss's own add would assign it
    layout = torch.sort(lists[:, 0], stable=True).indices
    return x[layout], layout, lists[layout, 0].contiguous()


def add_in_lists(index, kind: str, x: torch.Tensor, lists: torch.Tensor) -> None:
    """Add cells already assigned to their lists: ivf skips faiss's second assignment of every cell."""
    if kind == "ivf":
        # Most of an add at 1e7 cells is that assignment.
        from faiss.contrib.ivf_tools import add_preassigned

        add_preassigned(require_faiss().extract_index_ivf(index), x.numpy(), lists.numpy())
    else:  # ivfpq: faiss's fast-scan lists pack their codes only through the ordinary add
        index.add(x)
