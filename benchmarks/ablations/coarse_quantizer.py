"""An IVF index's coarse quantizer at large N: a scan of every centroid against an HNSW graph over them.

    python benchmarks/ablations/coarse_quantizer.py                  # N = 1e6, 1e7 (ivfpq, as scaling.py runs them)
    python benchmarks/ablations/coarse_quantizer.py --quick          # N = 2e5 with 4000 lists: a smoke run

From HNSW_QUANTIZER_MIN_NLIST lists on, an IVF index finds a query's lists through an HNSW graph over its
centroids (faiss's IVFx_HNSW32) instead of scanning all of them. Both quantizers hold the same k-means
centroids, so this builds each index once and swaps its quantizer between them. Queries are what a training
step sends (common.py's synthetic ones, as scaling.py's: a cell plus noise, B = 256). For each size and depth (training: the refresher's
nprobe and re-rank; evaluation: the index's own) it reports the median search time of a batch and recall of
the exact top K+1, both quantizers side by side. Writes results/coarse_quantizer.json.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common

import torch
from common import B, K, make_bank, make_batches, median_ms, training_refresher, write_report

# isort: split
import faiss  # after torch (common.py says why)
from faiss.contrib.evaluation import knn_intersection_measure

from sam_cls.index import IndexParams, exact_search
from sam_cls.index.faiss_index import FaissIndex
from sam_cls.index.params import quantizer_ef_search

# ----------------------------------------------------------------------------- hyper-parameters, all here
REPEATS, WARMUP, RECALL_BATCHES = 15, 2, 2


def timed_searches(index: FaissIndex, quantizers: dict, queries: torch.Tensor, k: int, nprobe: int,
                   k_factor: float | None) -> dict[str, float]:
    """Median ms of a batch's search with each quantizer; they take turns going first, so neither gets the
    warmer caches."""
    ivf = faiss.extract_index_ivf(index.index)

    def search(quantizer, i: int) -> None:
        ivf.quantizer = quantizer
        index.search(queries[i], k, nprobe=nprobe, k_factor=k_factor)

    return median_ms({name: lambda i, q=q: search(q, i) for name, q in quantizers.items()}, REPEATS, WARMUP)


def recall(index: FaissIndex, queries: torch.Tensor, exact: list[torch.Tensor], k: int, nprobe: int,
           k_factor: float | None) -> float:
    """faiss.contrib.evaluation's top-k intersection with the exact ids, over the batches in `exact`."""
    return statistics.mean(
        knn_intersection_measure(index.search(q, k, nprobe=nprobe, k_factor=k_factor)[1].numpy(), e.numpy())
        for q, e in zip(queries, exact, strict=False)  # the first len(exact) batches
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1e6,1e7", help="comma-separated N")
    ap.add_argument("--nlist", type=int, help="IVF lists (default ~4 sqrt(N))")
    ap.add_argument("--quick", action="store_true", help="N = 2e5 with 4000 lists")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/coarse_quantizer.json")
    args = ap.parse_args()
    sizes = [200_000] if args.quick else [int(float(s)) for s in args.sizes.split(",")]
    nlist = 4000 if args.quick and args.nlist is None else args.nlist
    k = K + 1  # a training read searches K + 1 so that dropping the query's own cell leaves K

    rows = []
    print(f"{'N':>9} {'lists':>6} {'depth':>10} {'nprobe':>6} {'k_factor':>8} {'scan ms':>8} {'HNSW ms':>8} "
          f"{'ratio':>6} {'scan recall':>11} {'HNSW recall':>11}")
    for n in sizes:
        bank = make_bank(n, args.seed)
        _, queries = make_batches(bank, WARMUP + REPEATS, args.seed)
        refresher = training_refresher(bank, IndexParams(kind="ivfpq", nlist=nlist), args.seed, layout=False)
        index = refresher.index
        ivf = faiss.extract_index_ivf(index.index)
        graph = faiss.downcast_index(ivf.quantizer)
        if not hasattr(graph, "hnsw"):
            raise SystemExit(f"N={n}: {index.description} has a flat quantizer; raise --nlist or N")
        scan = faiss.IndexFlatIP(bank.dim)  # the same centroids, found by a full scan
        scan.add(index.centroids())
        exact = [exact_search(bank.embeddings, q, k)[1] for q in queries[:RECALL_BATCHES]]
        depths = {"training": (index.train_nprobe, index.train_k_factor),
                  "evaluation": (index.params.nprobe, index.index.k_factor)}
        for depth, (nprobe, k_factor) in depths.items():
            row = {"n_cells": n, "nlist": ivf.nlist, "depth": depth, "nprobe": nprobe, "k_factor": k_factor,
                   "hnsw_ef_search": quantizer_ef_search(nprobe), "batch": B, "k": k}
            quantizers = {"scan": scan, "hnsw": graph}
            try:  # the index owns its graph: always hand it back, never leave the borrowed scan in place
                for name, ms in timed_searches(index, quantizers, queries, k, nprobe, k_factor).items():
                    row[f"{name}_search_ms"] = round(ms, 2)
                for name, quantizer in quantizers.items():
                    ivf.quantizer = quantizer
                    row[f"{name}_recall"] = round(recall(index, queries, exact, k, nprobe, k_factor), 4)
            finally:
                ivf.quantizer = graph
            row["ratio"] = round(row["hnsw_search_ms"] / row["scan_search_ms"], 3)
            rows.append(row)
            print(f"{n:>9} {ivf.nlist:>6} {depth:>10} {nprobe:>6} {k_factor:>8g} {row['scan_search_ms']:>8.2f} "
                  f"{row['hnsw_search_ms']:>8.2f} {row['ratio']:>6.3f} {row['scan_recall']:>11.4f} "
                  f"{row['hnsw_recall']:>11.4f}")
        del refresher, index, ivf, graph, scan, bank
        gc.collect()
    print(f"ratio: HNSW-quantizer search time / full-scan search time, batches of {B} training-mode queries")
    write_report({"index": "ivfpq", "rows": rows}, args.out)


if __name__ == "__main__":
    main()
