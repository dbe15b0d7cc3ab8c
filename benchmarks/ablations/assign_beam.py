"""An HNSW coarse quantizer's beam when cells are assigned to their IVF lists (add, list layout).

    python benchmarks/ablations/assign_beam.py                                  # synthetic cells, N = 3e6
    python benchmarks/ablations/assign_beam.py --cells runs/large-memory/mnist-c50.pt   # and a saved memory
    python benchmarks/ablations/assign_beam.py --quick                          # N = 1.1e6, few cells assigned: a smoke run

An index with an HNSW quantizer (from HNSW_QUANTIZER_MIN_NLIST lists on) assigns every cell it adds by a search
for its nearest centroid. faiss uses the quantizer's search beam for it, which the index sets from its probe
depth (2 nprobe: ~400 at 1e7 cells); one nearest centroid needs far less. For each memory this trains the
default lists' k-means once, then assigns SAMPLE cells at each beam: seconds, the same extrapolated to 1e7 cells,
and the share of cells given the list an exact scan of the centroids gives. Writes results/assign_beam.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common

import torch
from common import write_report

# isort: split
import faiss  # after torch (common.py says why)

from sam_cls.index import IndexParams
from sam_cls.index._faiss import omp_threads
from sam_cls.index.factory import factory_string
from sam_cls.index.params import ASSIGN_EF_SEARCH, TRAIN_POINTS_PER_LIST, default_nprobe, quantizer_ef_search
from sam_cls.index.synthetic import clustered_embeddings

# ----------------------------------------------------------------------------- hyper-parameters, all here
BEAMS = (32, 64, 128)  # and the search beam at the memory's default depth, the old assignment beam
SAMPLE = 200_000  # cells assigned at each beam
K = 256


def measure(name: str, cells: torch.Tensor, sample: int, seed: int) -> list[dict]:
    """Train the default IVF lists of these cells, then assign a sample of them at each beam."""
    n, d = cells.shape
    factory = factory_string("ivfpq", n, d, K, IndexParams())
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)  # kept: ivf below is a view into it
    ivf = faiss.extract_index_ivf(index)
    quantizer = faiss.downcast_index(ivf.quantizer)
    if not hasattr(quantizer, "hnsw"):
        raise SystemExit(f"{name}: {factory} has a flat quantizer at N={n}; use a larger memory")
    ivf.cp.seed, ivf.cp.max_points_per_centroid = seed, TRAIN_POINTS_PER_LIST  # as FaissIndex.build trains
    clustering = faiss.Clustering(d, ivf.nlist, ivf.cp)
    clustering.train(cells.numpy(), faiss.IndexFlatIP(d))
    centroids = faiss.vector_to_array(clustering.centroids).reshape(ivf.nlist, d)
    with omp_threads(1):  # as FaissIndex.build fills its quantizer: one thread, a deterministic graph
        quantizer.add(centroids)
    x = cells[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:sample]].numpy()
    scan = faiss.IndexFlatIP(d)
    scan.add(centroids)
    _, exact = scan.search(x, 1)
    search_beam = quantizer_ef_search(default_nprobe(n, ivf.nlist, K))
    rows = []
    for beam in sorted({*BEAMS, search_beam}):
        quantizer.hnsw.efSearch = beam
        start = time.perf_counter()
        _, lists = quantizer.search(x, 1)
        seconds = time.perf_counter() - start
        rows.append({"cells": name, "n_cells": n, "nlist": ivf.nlist, "ef_search": beam, "sample": sample,
                     "seconds": round(seconds, 2), "seconds_per_1e7": round(seconds * 1e7 / sample, 1),
                     "agreement": round(float((lists == exact).mean()), 5),
                     "role": " and ".join(role for role, at in (("search beam (old)", search_beam),
                                                                 ("ASSIGN_EF_SEARCH", ASSIGN_EF_SEARCH)) if beam == at)})
    searching = next(row["seconds"] for row in rows if row["ef_search"] == search_beam)
    for row in rows:
        row["time_vs_search_beam"] = round(row["seconds"] / searching, 3)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=float, default=3e6, help="synthetic cells (index_bench's clusters, d = 128)")
    ap.add_argument("--cells", type=Path, action="append", default=[], help="a saved (N, d) float32 memory "
                    "(torch.save of a tensor), e.g. large_memory.py's cached embeddings; repeatable")
    ap.add_argument("--quick", action="store_true", help="N = 1.1e6 (the fewest with an HNSW quantizer), 20,000 cells assigned")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/assign_beam.json")
    args = ap.parse_args()
    n, sample = (1_100_000, 20_000) if args.quick else (int(args.n), SAMPLE)
    memories = {f"synthetic {n}": lambda: clustered_embeddings(n, 128, seed=args.seed)[0]}
    for path in args.cells:
        memories[path.name] = lambda path=path: torch.load(path, weights_only=True)  # tensors only: no code
    rows = []
    print(f"{'cells':>18} {'N':>9} {'lists':>6} {'beam':>5} {'s':>7} {'s per 1e7':>9} {'agreement':>9} {'time':>6}")
    for name, load in memories.items():
        for r in measure(name, load(), sample, args.seed):
            rows.append(r)
            print(f"{name:>18} {r['n_cells']:>9} {r['nlist']:>6} {r['ef_search']:>5} {r['seconds']:>7.2f} "
                  f"{r['seconds_per_1e7']:>9.0f} {r['agreement']:>9.5f} {r['time_vs_search_beam']:>6.3f}  {r['role']}")
    print("agreement: share of the sampled cells given the list an exact scan of the centroids gives; "
          "time: against the search beam")
    write_report({"assign_ef_search": ASSIGN_EF_SEARCH, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
