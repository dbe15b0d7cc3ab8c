"""The evaluation depth of an IVF index, chosen by the recall it measures on its own cells.

A depth rule written from one memory fails another: 1/64 of the lists read 0.99 of the exact top-256 on
deformed-MNIST embeddings and 0.90 on CIFAR-10's at 5e5 cells, and ivfpq's PQ ranking on clustered synthetic
cells stops short of 0.95 however many lists it scans (results/large_memory.json). So a new index measures
itself: a sample of its own cells are the queries (the depth chosen read about what it read on the sample on
the test images too: results/large_memory.json, `calibration` beside `recall_at_k`), the exact top-k over all
cells the truth, and the search deepens until it reads RECALL_TARGET of it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .recall import knn_intersection_measure
from .torch_exact import exact_search

# The target sits above the 0.95 the defaults are held to: the sample's estimate is noisy by about 0.005.
RECALL_TARGET = 0.96
# Sample queries: the exact search over all N cells is most of the cost, small beside the build at every N
# measured (results/large_memory.json: calibrate_s against build_s).
SAMPLE_QUERIES = 512
# Doubling nprobe that gains less than this means the lists are not what limits recall: ivfpq's PQ ranking
# is, and a deeper re-rank (k_factor) is the knob that helps; ivf's 8-bit codes have no such knob, so it stops.
MIN_GAIN = 0.005
MAX_K_FACTOR = 64


def without_own(ids: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """(B, k+1) ids less each row's own id (or its last, where the search missed it): (B, k). A sample cell
    finds itself for free, which at small k would be most of its recall."""
    drop = ids == own[:, None]
    drop[:, -1] |= ~drop.any(1)
    return ids[~drop].view(ids.shape[0], ids.shape[1] - 1)


def calibrate_depth(index, vectors: torch.Tensor, k: int, seed: int, max_nprobe: int,
                    log: Callable[[str], None] | None = None) -> dict:
    """Deepen an IVF FaissIndex (nprobe, then ivfpq's k_factor) until a sample of its cells (ids = rows of
    vectors) reads RECALL_TARGET of their exact top-k; leaves the index at that depth, returns what it measured."""
    n = vectors.shape[0]
    k = min(k, n - 1)
    generator = torch.Generator().manual_seed(seed)
    own = torch.randperm(n, generator=generator)[: min(SAMPLE_QUERIES, n)].to(vectors.device)
    queries = vectors[own]
    exact_ids = without_own(exact_search(vectors, queries, k + 1)[1], own).cpu().numpy()
    # faiss's torch bridge searches a CPU index with CPU tensors only, a GPU index with its own device's.
    queries = queries.to(index.gpu_device) if index.on_gpu else queries.cpu()
    own = own.to(queries.device)

    def recall_at(nprobe: int, k_factor: float | None) -> float:
        index._set("nprobe", nprobe)
        if k_factor is not None:
            index._set("k_factor", k_factor)
        found = index.index.search(queries, k + 1)[1]  # the faiss index itself: a missing id (-1) is a miss
        return float(knn_intersection_measure(without_own(found, own).cpu().numpy(), exact_ids))

    refines = index.kind == "ivfpq" and not index.on_gpu
    nprobe, k_factor = int(index._get("nprobe")), index._get("k_factor") if refines else None
    start = (nprobe, k_factor)
    recall = recall_at(nprobe, k_factor)
    while recall < RECALL_TARGET:
        deeper = min(max_nprobe, 2 * nprobe)
        gain = recall_at(deeper, k_factor) - recall if deeper > nprobe else 0.0
        if gain >= MIN_GAIN:
            nprobe, recall = deeper, recall + gain
        elif refines and k_factor < MAX_K_FACTOR:
            k_factor *= 2
            recall = recall_at(nprobe, k_factor)
        else:  # more lists stopped helping, and there is no re-rank to deepen: as deep as this index goes
            break
    recall_at(nprobe, k_factor)  # leave the index at the depth chosen
    result = {"nprobe": nprobe, "k_factor": k_factor, "recall_at_k": round(recall, 4), "queries": len(queries),
              "target": RECALL_TARGET}
    if log and ((nprobe, k_factor) != start or recall < RECALL_TARGET):
        changes = [f"{name} {a:g} -> {b:g}" for name, a, b in (("nprobe", start[0], nprobe),
                                                                ("k_factor", start[1], k_factor)) if a != b]
        short = "" if recall >= RECALL_TARGET else ", short of it at the deepest search this index has (a finer " \
            "index reads more: kind ivf, or ivfpq with a larger pq_m)"
        log(f"index depth: {', '.join(changes) or 'unchanged'} for recall@{k} {recall:.3f} on {len(queries)} of "
            f"its cells (target {RECALL_TARGET}){short}")
    return result
