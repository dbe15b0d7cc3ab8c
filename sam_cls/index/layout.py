"""Filling an IVF index list by list, so that the memory can keep each list's cells side by side."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ._faiss import require_faiss
from .gpu import hnsw_quantizer
from .params import ASSIGN_EF_SEARCH


@contextmanager
def assignment_beam(index) -> Iterator[None]:
    """An HNSW coarse quantizer's narrow assignment beam while cells are added to lists (see ASSIGN_EF_SEARCH);
    its search beam is back after. Every add and layout goes through here, so both assign a cell alike. Any
    other CPU index (no IVF, or a flat quantizer) adds as it is."""
    ivf = require_faiss().try_extract_index_ivf(index)
    quantizer = hnsw_quantizer(ivf) if ivf is not None else None
    if quantizer is None:
        yield
        return
    searching = quantizer.hnsw.efSearch
    quantizer.hnsw.efSearch = ASSIGN_EF_SEARCH
    try:
        yield
    finally:
        quantizer.hnsw.efSearch = searching


def list_layout(ivf, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x[layout], layout, lists): the rows of x list by list (stable: rows in order stay put), and their lists."""
    # Why: a training read fetches K scattered rows a query. With each list's cells side by side, a query's
    # candidates (from a few lists) share pages instead of spanning the whole memory (see
    # benchmarks/ablations/list_layout.py and results/list_layout.json).
    with assignment_beam(ivf):
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
        with assignment_beam(index):
            index.add(x)
