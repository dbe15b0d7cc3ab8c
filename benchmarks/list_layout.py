"""A training step on a memory laid out list by list (as its IVF index) against one kept in example order.

    python benchmarks/list_layout.py                    # N = 5e4 (CIFAR-sized), 1e6, 1e7
    python benchmarks/list_layout.py --sizes 1e5,1e6    # without N = 1e7 (two 5 GB memories and indices)

The training search returns K + 1 cells from a few IVF lists; the index's SQ8 re-rank (ivfpq) and the read
then fetch those cells by row. MemoryBank.reorder, called by IndexRefresher, moves the rows so each list's
cells lie side by side, and a query's candidates share pages and DRAM rows instead of spanning the memory.
Per N two identical clustered memories (benchmarks/scaling.py's synthetic cells and queries) get the index
`--index auto` picks there, one built with the list-by-list layout and one without; the scaling benchmark's
step (training search, sparse_read forward and backward, write) is timed on each, alternating step by step
so both see the same machine. Medians of each part; ratio = laid out / example order. recall@K+1 of each
training search against exact search over its own memory shows whether both find equally good candidates.
Writes results/list_layout.json.
"""

from __future__ import annotations

import argparse
import gc
import time

import numpy as np
import torch
import torch.nn.functional as F
from faiss.contrib.evaluation import knn_intersection_measure
from machine import sizes_that_fit, write_report
from scaling import ETA, INDEX_BYTES, NUM_CLASSES, TEMPERATURE, B, D, K, make_bank, make_batches

from sam_cls.index import IndexParams, IndexRefresher, choose_kind, exact_search
from sam_cls.memory import MemoryBank
from sam_cls.read import exclusion_mask, sparse_read

WARMUP, REPEATS = 3, 25
PARTS = ("search", "read", "write")


def step_ms(bank: MemoryBank, refresher: IndexRefresher, idx: torch.Tensor, queries: torch.Tensor,
            i: int) -> tuple[float, float, float]:
    """The scaling benchmark's sparse step, timed in its three parts."""
    u = queries.clone().requires_grad_()
    t0 = time.perf_counter()
    _, ids = refresher.search(u.detach(), K + 1)
    t1 = time.perf_counter()
    own = bank.rows[idx]  # idx names examples; the index's ids are the memory's rows
    log_probs = sparse_read(u, ids, bank.embeddings, bank.labels, NUM_CLASSES, TEMPERATURE,
                            exclude=exclusion_mask(ids, own))
    F.nll_loss(log_probs, bank.labels[own]).backward()
    t2 = time.perf_counter()
    bank.write(idx, u, ETA, step=i)
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3, (time.perf_counter() - t2) * 1e3


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
        start = time.perf_counter()
        refreshers[name] = IndexRefresher(bank.embeddings, IndexParams(kind=kind), k=K + 1, rebuild_every=None,
                                          seed=seed, recall_sample=0,
                                          reorder=bank.reorder if name == "list_order" else None)
        build_s[name] = round(time.perf_counter() - start, 2)
    banks = {"example_order": plain, "list_order": laid}
    recall = {name: training_recall(banks[name], refreshers[name], queries[0]) for name in banks}
    times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in banks}
    for i in range(WARMUP + REPEATS):
        for name in banks if i % 2 else reversed(list(banks)):
            measured = step_ms(banks[name], refreshers[name], idx[i], queries[i], i)
            if i >= WARMUP:
                times[name].append(measured)
    row = {"n_cells": n, "index": refreshers["list_order"].description, "kind": kind}
    for name, t in times.items():
        parts = np.array(t)
        row[f"step_ms_{name}"] = round(float(np.median(parts.sum(1))), 2)
        for part, values in zip(PARTS, parts.T, strict=True):
            row[f"{part}_ms_{name}"] = round(float(np.median(values)), 2)
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
