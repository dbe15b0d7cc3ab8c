"""A training step on a memory laid out list by list (as its IVF index) against one kept in example order.

    python benchmarks/ablations/list_layout.py                    # N = 5e4 (CIFAR-sized), 1e6, 1e7
    python benchmarks/ablations/list_layout.py --sizes 1e5,1e6    # without N = 1e7 (two 5 GB memories and indices)

The training search returns K + 1 cells from a few IVF lists; the index's SQ8 re-rank (ivfpq) and the read
then fetch those cells by row. MemoryBank.reorder, called by IndexRefresher, moves the rows so each list's
cells lie side by side, and a query's candidates share pages and DRAM rows instead of spanning the memory.
Per N two identical clustered memories (common.py's synthetic cells and queries, as scaling.py's) get the index
`--index auto` picks there, one built with the list-by-list layout and one without; the scaling benchmark's
step (training search, sparse_read forward and backward, write) is timed on each, alternating step by step
so both see the same machine. Medians of each part; ratio = laid out / example order. recall@K+1 of each
training search against exact search over its own memory shows whether both find equally good candidates.
Writes results/list_layout.json.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common

import torch
from common import (
    INDEX_BYTES,
    REPEATS,
    WARMUP,
    B,
    D,
    K,
    make_bank,
    make_batches,
    median_ms,
    now,
    sizes_that_fit,
    sparse_step,
    training_refresher,
    write_report,
)

# isort: split
from faiss.contrib.evaluation import knn_intersection_measure

from sam_cls.index import IndexParams, IndexRefresher, choose_kind, exact_search
from sam_cls.memory import MemoryBank

# ----------------------------------------------------------------------------- hyper-parameters, all here
# (D, B, K, classes, temperature, eta, warm-ups and repeats, the synthetic memory: common.py)
PARTS = ("search", "read", "write")


def training_recall(bank: MemoryBank, refresher: IndexRefresher, queries: torch.Tensor) -> float:
    """recall@K+1 of the training search against exact search over the same memory."""
    _, exact = exact_search(bank.embeddings, queries, K + 1)
    _, found = refresher.search(queries, K + 1)
    return round(float(knn_intersection_measure(found.numpy(), exact.numpy())), 4)


def compare(n: int, seed: int) -> dict:
    """Both layouts of one memory, their builds and recalls, and the step's parts side by side."""
    kind, _ = choose_kind(n, D, K + 1, "cpu")
    laid = make_bank(n, seed)
    plain = MemoryBank(laid.embeddings.clone(), laid.labels)
    idx, queries = make_batches(laid, WARMUP + REPEATS, seed)
    refreshers, build_s = {}, {}
    for name, bank in (("example_order", plain), ("list_order", laid)):
        start = now()
        refreshers[name] = training_refresher(bank, IndexParams(kind=kind), seed, layout=name == "list_order")
        build_s[name] = round(now() - start, 2)
    banks = {"list_order": laid, "example_order": plain}  # the first goes first in even rounds
    recall = {name: training_recall(banks[name], refreshers[name], queries[0]) for name in banks}
    med = median_ms({name: lambda i, name=name: sparse_step(banks[name], refreshers[name], idx[i], queries[i], i)
                     for name in banks})
    row = {"n_cells": n, "index": refreshers["list_order"].description, "kind": kind}
    for name in ("example_order", "list_order"):
        row[f"step_ms_{name}"] = round(med[name]["total"], 2)
        for part in PARTS:
            row[f"{part}_ms_{name}"] = round(med[name][part], 2)
        row[f"build_s_{name}"], row[f"recall_{name}"] = build_s[name], recall[name]
    for part in ("step", *PARTS[:2]):
        row[f"ratio_{part}"] = round(row[f"{part}_ms_list_order"] / row[f"{part}_ms_example_order"], 3)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="5e4,1e6,1e7", help="comma-separated N")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/list_layout.json")
    args = ap.parse_args()
    rows, skipped = [], []
    print(f"{'n_cells':>9} {'kind':>6} {'step_ex':>8} {'step_list':>9} {'ratio':>6} {'search':>13} {'read':>13} "
          f"{'recall ex/list':>15}")
    # Two memories and indices, and one memory-sized copy while a layout is applied.
    for n in sizes_that_fit(args.sizes, lambda n: n * (3 * 4 * D + 2 * INDEX_BYTES["ivfpq"]) + (1 << 30), skipped):
        row = compare(n, args.seed)
        gc.collect()
        rows.append(row)
        print(f"{n:>9} {row['kind']:>6} {row['step_ms_example_order']:>8.1f} {row['step_ms_list_order']:>9.1f} "
              f"{row['ratio_step']:>6.3f} {row['search_ms_example_order']:>6.1f}/{row['search_ms_list_order']:<6.1f} "
              f"{row['read_ms_example_order']:>6.1f}/{row['read_ms_list_order']:<6.1f} "
              f"{row['recall_example_order']:>7.3f}/{row['recall_list_order']:<7.3f}", flush=True)
    write_report({"settings": {"dim": D, "batch": B, "k": K, "warmup": WARMUP, "repeats": REPEATS},
                  "rows": rows, "skipped": skipped}, args.out)


if __name__ == "__main__":
    main()
