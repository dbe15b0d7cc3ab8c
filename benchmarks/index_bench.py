"""Index back-ends on synthetic clustered cells: build time, search time, recall@K and bytes per cell.

    python benchmarks/index_bench.py                      # N = 1e4, 1e5, 1e6 at d=128, K=256
    python benchmarks/index_bench.py --quick              # N = 1e4 only: a smoke run
    python benchmarks/index_bench.py --sizes 1e7 --max-n 1e7 --kinds flat,ivf,ivfpq

Each row of the JSON output's "rows" has n_cells, dim, index, device, build_s, search_ms (median over
--repeats of one batch of --queries queries, after a warm-up), recall_at_k (top-K id overlap with exact
search), k and bytes_per_cell (saved index file size / N). IVF kinds search at the depth a run's index is
calibrated to (calibrate_s; the depth is in description). Writes results/index_bench.json.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
from pathlib import Path

import torch
from common import available_ram, median_ms, now, write_report

# isort: split
from faiss.contrib.evaluation import knn_intersection_measure

from sam_cls.index import IndexParams, build_index, exact_search
from sam_cls.index.synthetic import clustered_embeddings

# ----------------------------------------------------------------------------- hyper-parameters, all here
KINDS = ("flat", "ivf", "ivfpq", "hnsw", "torch")
# Peak memory of one size's run in units of the raw cells (N*d*4): the cells, one index, its serialized copy
# and slack; sizes that would not fit in the available RAM are skipped, not swapped.
PEAK_RAW_COPIES = 4


def parse_sizes(text: str) -> list[int]:
    """'1e4,1e5' -> [10000, 100000]."""
    return [int(float(s)) for s in text.split(",") if s.strip()]


def bench_kind(
    kind: str,
    x: torch.Tensor,
    q: torch.Tensor,
    exact_ids: torch.Tensor,
    k: int,
    repeats: int,
    device: str,
    seed: int,
) -> dict:
    """Build, time and measure one back-end on one memory."""
    n, d = x.shape
    start = now()
    index = build_index(x, IndexParams(kind=kind, device=device), k=k, seed=seed)
    build_s = now() - start
    # The evaluation depth a run's index gets (an IVF kind's nprobe deepened until a sample of the cells reads
    # the recall calibrate.py targets), timed apart from the build.
    start = now()
    index.calibrate(x)  # ids are rows of x: this build asks for no list-order layout
    calibrate_s = now() - start
    queries = q.to(device)
    _, ids = index.search(queries, k)  # also the warm-up: first-call allocations and thread start-up
    search_ms = median_ms(lambda _: index.search(queries, k), repeats, warmup=0)
    recall = knn_intersection_measure(ids.cpu().numpy(), exact_ids.numpy())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "index.bin"
        index.save(path)
        bytes_per_cell = path.stat().st_size / n
    row = {
        "n_cells": n,
        "dim": d,
        "index": kind,
        "device": device,
        "build_s": round(build_s, 3),
        "calibrate_s": round(calibrate_s, 3),
        "search_ms": round(search_ms, 2),
        "recall_at_k": round(float(recall), 4),
        "k": k,
        "bytes_per_cell": round(bytes_per_cell, 1),
        "description": index.description,
    }
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1e4,1e5,1e6", help="comma-separated cell counts")
    ap.add_argument("--max-n", type=float, default=1e6, help="skip sizes above this (raise it for 1e7)")
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated back-ends")
    ap.add_argument("--hnsw-max-n", type=float, default=1e6, help="skip hnsw above this N (slow to build)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--queries", type=int, default=256, help="queries per timed batch")
    ap.add_argument("--clusters", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5, help="timed searches; the median is reported")
    ap.add_argument("--device", default="cpu", help="torch device for the index and queries")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/index_bench.json")
    ap.add_argument("--quick", action="store_true", help="N=1e4 and 2 repeats: a smoke run")
    args = ap.parse_args()
    sizes = [10_000] if args.quick else parse_sizes(args.sizes)
    repeats = 2 if args.quick else args.repeats
    kinds = [s.strip() for s in args.kinds.split(",") if s.strip()]
    for kind in kinds:
        if kind not in KINDS:
            ap.error(f"unknown kind {kind!r}: choose from {', '.join(KINDS)}")

    rows: list[dict] = []
    settings = {"dim": args.dim, "k": args.k, "queries": args.queries, "clusters": args.clusters,
                "repeats": repeats, "device": args.device, "seed": args.seed}
    columns = ("n_cells", 9), ("index", 6), ("build_s", 8), ("search_ms", 10), ("recall", 7), ("B/cell", 7)
    print(" ".join(f"{name:>{width}}" for name, width in columns) + "  description")
    for n in sizes:
        if n > args.max_n:
            print(f"skip N={n}: above --max-n {args.max_n:.0f}")
            continue
        need = PEAK_RAW_COPIES * n * args.dim * 4
        if need > available_ram():
            print(f"skip N={n}: needs ~{need / 2**30:.1f} GiB, {available_ram() / 2**30:.1f} GiB free")
            continue
        x, q = clustered_embeddings(n, args.dim, args.clusters, args.seed, n_queries=args.queries)
        exact_ids = exact_search(x, q, args.k)[1]
        for kind in kinds:
            if kind == "hnsw" and n > args.hnsw_max_n:
                print(f"{n:>9} {kind:>6}  skipped: N above --hnsw-max-n {args.hnsw_max_n:.0f}")
                continue
            row = bench_kind(kind, x, q, exact_ids, args.k, repeats, args.device, args.seed)
            rows.append(row)
            print(
                f"{n:>9} {kind:>6} {row['build_s']:>8.2f} {row['search_ms']:>10.2f} "
                f"{row['recall_at_k']:>7.4f} {row['bytes_per_cell']:>7.1f}  {row['description']}",
                flush=True,
            )
            # Written after every row, so a long run that is stopped keeps what it measured.
            write_report({"settings": settings, "rows": rows}, args.out, quiet=True)
        del x, q, exact_ids
        gc.collect()
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
