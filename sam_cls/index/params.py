"""Index knobs, and the defaults derived from N, d and k when a knob is left as None."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

INDEX_KINDS = ("auto", "flat", "ivf", "ivfpq", "hnsw", "torch")
IVF_KINDS = ("ivf", "ivfpq")

# k-means wants about 39 training points per centroid; fewer gives empty or noisy lists.
MIN_POINTS_PER_LIST = 39
# A retrain starts k-means from the index's own centroids: the memory drifts a little between rebuilds, so
# a few iterations refit lists that a cold start needs faiss's 10 for (k-means is most of a rebuild).
WARM_KMEANS_ITERATIONS = 3
# IVF training subsamples to this many points per list: good centroids, and cheap k-means at N=1e6+.
TRAIN_POINTS_PER_LIST = 64
# IVF lists scanned hold about this many times k candidates, and at least MIN_NPROBE lists: recall@256 of
# about 0.99 on clustered synthetic cells up to 1e5, where half the candidates fell short of 0.97
# (docs/INDEX.md; tests/test_index.py holds the defaults to 0.95).
PROBE_CANDIDATES_PER_K = 16
MIN_NPROBE = 32
# ...and at least this share of the lists. A fixed number of lists is a shrinking share of a memory as it grows
# (lists hold ~sqrt(N)/4 cells): at 1e7 synthetic cells 32 lists found half the exact top-256
# (results/index_bench.json), where a query's true neighbours spread over about 1% of the lists.
PROBE_LIST_SHARE = 1 / 64
# A training read tolerates a much shallower search: it only needs the cells that carry its softmax. On
# CIFAR-10/conv1's trained memory a quarter of the evaluation depth kept the read's loss and accuracy and
# halved the search (results/train_depth.json). Evaluation keeps the deeper default.
TRAIN_PROBE_CANDIDATES_PER_K = 4
MIN_TRAIN_NPROBE = 8
# ...and 1/400 of the lists, but no more than 16 of them: on deformed-MNIST memories of 6e4 to 1e7 cells the
# shallowest training depth whose test accuracy stayed within 0.1 point of the exact read's was 4, 8, 16 and
# 8 lists; 1/400 reaches 16 near 3e6 and would have scanned 32 at 1e7, where 16 read as well and the deeper
# scan only cost step time (results/large_memory.json: the depth sweeps, step_by_train_nprobe).
TRAIN_PROBE_LIST_SHARE = 1 / 400
TRAIN_PROBE_LIST_CAP = 16
# ...and beyond the memories measured (above ~12,800 lists, 1e7 cells), 1/800 of the lists: 16 at 1e7, kept as
# a share. Nothing was measured there, so this errs deep.
TRAIN_PROBE_LIST_SHARE_BEYOND = 1 / 800
# ...and a lighter ivfpq re-rank: it reads k_factor * k scattered SQ8 codes a query, which at large N is most
# of the search; at 1e6 synthetic cells k_factor 2 cut the training search by more than half for a few
# points of recall (docs/INDEX.md).
TRAIN_REFINE_K_FACTOR = 2
# ivfpq re-ranks k_factor * k PQ candidates with SQ8 codes; 8 reached the IVF recall ceiling in every
# measured setting, where 2 fell short of it at evaluation depth (docs/INDEX.md).
REFINE_K_FACTOR = 8
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 64
# From this many IVF lists on, the coarse quantizer is an HNSW graph over the centroids (faiss's IVFx_HNSW32)
# instead of a scan of all of them: faster at both depths at 1e6 and 1e7 cells, for a small loss of recall
# (results/coarse_quantizer.json).
HNSW_QUANTIZER_MIN_NLIST = 4000
# Assigning a cell to its list is a search for its one nearest centroid, which a narrower HNSW beam finds
# than a search for nprobe lists wants (2 nprobe: ~400 at 1e7 cells), the beam that made assignment most of an
# index build. 128 gave (nearly) every cell an exact scan's list on real and synthetic cells at 3e6, in 0.6x
# the time of the beam it replaces there; 64 missed about 1% of the synthetic ones (results/assign_beam.json).
ASSIGN_EF_SEARCH = 128


@dataclass
class IndexParams:
    """All optional knobs of an index; None means derive a sensible default from N, d and k."""

    kind: str = "auto"
    nlist: int | None = None  # IVF lists
    nprobe: int | None = None  # IVF lists scanned per query
    train_nprobe: int | None = None  # IVF lists scanned per query by a training read (at most nprobe)
    pq_m: int | None = None  # PQ sub-quantizers for ivfpq (4-bit each)
    hnsw_m: int | None = None  # HNSW graph degree
    ef_search: int | None = None  # HNSW search beam, must be >= k
    fp16: bool = False  # float16 storage on a faiss GPU index
    # CPU IVF kinds: add the cells list by list, so ids run through each list in turn; the index's `layout`
    # says which input row each id is, and the memory must move its rows to match (MemoryBank.reorder).
    list_order: bool = False
    device: str = "cpu"  # torch device string: "cpu", "cuda", "cuda:1"

    @property
    def lays_out_lists(self) -> bool:
        """Whether IVF builds fill list by list: asked for, and on a CPU (a GPU memory keeps its order)."""
        return self.list_order and not self.cuda

    def __post_init__(self):
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"unknown index kind {self.kind!r}: choose one of {', '.join(INDEX_KINDS)}")
        for name in ("nlist", "nprobe", "train_nprobe", "pq_m", "hnsw_m", "ef_search"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"index {name} must be >= 1, got {value}")

    @property
    def cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"


def default_nlist(n: int) -> int:
    """About 4*sqrt(N) lists, but never so many that a list trains on fewer than ~39 points."""
    return max(1, min(round(4 * math.sqrt(n)), n // MIN_POINTS_PER_LIST))


def default_nprobe(n: int, nlist: int, k: int) -> int:
    """Scan enough lists to see ~16k candidates and 1/64 of the lists, at least 32 lists, at most all of them."""
    return _lists_for(PROBE_CANDIDATES_PER_K * k, n, nlist, max(MIN_NPROBE, math.ceil(nlist * PROBE_LIST_SHARE)))


def default_train_nprobe(n: int, nlist: int, k: int) -> int:
    """The training read's probe depth: ~4k candidates, at least 8 lists and 1/400 of them up to 16 lists (1/800
    of them beyond), never deeper than default_nprobe."""
    share = min(math.ceil(nlist * TRAIN_PROBE_LIST_SHARE), TRAIN_PROBE_LIST_CAP)
    floor = max(MIN_TRAIN_NPROBE, share, math.ceil(nlist * TRAIN_PROBE_LIST_SHARE_BEYOND))
    return min(default_nprobe(n, nlist, k), _lists_for(TRAIN_PROBE_CANDIDATES_PER_K * k, n, nlist, floor))


def _lists_for(candidates: int, n: int, nlist: int, floor: int) -> int:
    """Lists of mean size n / nlist that hold about `candidates` cells, within [floor, nlist]."""
    return min(nlist, max(floor, -(-candidates * nlist // n)))  # integer ceil: no float rounding at a boundary


def quantizer_ef_search(nprobe: int) -> int:
    """An HNSW coarse quantizer's beam for a search of nprobe lists: twice that, at least 32."""
    return max(2 * nprobe, 32)


def default_pq_m(d: int) -> int:
    """Two dimensions per 4-bit sub-quantizer (d/4 bytes a cell); the largest divisor of d up to d/2."""
    return next(m for m in range(max(1, d // 2), 0, -1) if d % m == 0)


def default_ef_search(k: int) -> int:
    """An HNSW beam of 2k, at least 64: recall@256 0.980 at N=2e4, d=64 (1.5k gave 0.96, k gave 0.93)."""
    return max(2 * k, 64)
