"""The sparse read's gathers from a memory in 4 KiB pages against the same memory in transparent huge pages.

    python benchmarks/ablations/huge_pages.py                   # N = 1e5, 1e6, 1e7 (two copies of the memory each)
    python benchmarks/ablations/huge_pages.py --sizes 1e4,5e4   # CIFAR-sized memories

MemoryBank backs its cells with huge pages (memory.back_with_huge_pages) because a read gathers K cells a
query at random rows: once the memory outgrows the TLB's reach, each gathered row costs a page walk too. Per N
two identical unit-norm memories are filled, one left in 4 KiB pages and one collapsed into huge pages (the
seconds that takes are reported), and the training read (sparse_read, B=256 queries x K+1=257 random cells,
own cell masked) is timed forward and backward on each, alternating repeat by repeat so both see the same
machine. Medians; the ratio is huge / 4k. Writes results/huge_pages.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common

import torch
import torch.nn.functional as F
from common import (
    NUM_CLASSES,
    REPEATS,
    TEMPERATURE,
    WARMUP,
    B,
    D,
    K,
    Laps,
    median_ms,
    now,
    proc_kib,
    sizes_that_fit,
    write_report,
)

from sam_cls.memory import back_with_huge_pages
from sam_cls.read import exclusion_mask, sparse_read

# ----------------------------------------------------------------------------- hyper-parameters, all here
# (D, B, K, classes, temperature, warm-ups and repeats: common.py, as in benchmarks/scaling.py)
FILL_ROWS = 1 << 20  # cells drawn at a time, so filling never holds a second N x d temporary


def filled_memory(n: int, seed: int) -> torch.Tensor:
    """N unit-norm random cells, written chunk by chunk into one fresh tensor (4 KiB pages as allocated)."""
    gen = torch.Generator().manual_seed(seed)
    memory = torch.empty(n, D)
    for start in range(0, n, FILL_ROWS):
        rows = torch.randn(min(FILL_ROWS, n - start), D, generator=gen)
        memory[start : start + FILL_ROWS] = F.normalize(rows, dim=1)
    return memory


def read(memory: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor, u: torch.Tensor) -> Laps:
    """One training read on these ids, timed forward and backward."""
    u = u.clone().requires_grad_()
    laps = Laps()
    exclude = exclusion_mask(ids, ids[:, 0])  # the first candidate stands in for the query's own cell
    log_probs = sparse_read(u, ids, memory, labels, NUM_CLASSES, TEMPERATURE, exclude=exclude)
    laps.lap("forward")
    log_probs[:, 0].sum().backward()
    return laps.lap("backward")


def compare(n: int, seed: int) -> dict:
    """Both memories, the collapse's cost, and the reads' medians side by side."""
    plain = filled_memory(n, seed)
    huge = filled_memory(n, seed)
    huge_kib = proc_kib("/proc/meminfo", "AnonHugePages") or 0
    start = now()
    collapsed = back_with_huge_pages(huge)
    collapse_s = now() - start
    huge_gib = ((proc_kib("/proc/meminfo", "AnonHugePages") or 0) - huge_kib) / 2**20
    labels = torch.randint(NUM_CLASSES, (n,), generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 1)
    reads = []  # the same ids and queries for both memories in a round
    for _ in range(WARMUP + REPEATS):
        ids = torch.randint(n, (B, K + 1), generator=gen)
        reads.append((ids, F.normalize(torch.randn(B, D, generator=gen), dim=1)))
    med = median_ms({name: lambda i, memory=memory: read(memory, labels, *reads[i])
                     for name, memory in (("huge", huge), ("4k", plain))})
    row = {"n_cells": n, "collapsed": collapsed, "collapse_s": round(collapse_s, 2),
           "huge_pages_gib": round(huge_gib, 2)}
    for name in ("4k", "huge"):
        for part in ("forward", "backward"):
            row[f"{part}_ms_{name}"] = round(med[name][part], 2)
    row["ratio_forward"] = round(row["forward_ms_huge"] / row["forward_ms_4k"], 3)
    row["ratio_backward"] = round(row["backward_ms_huge"] / row["backward_ms_4k"], 3)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1e5,1e6,1e7", help="comma-separated N")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/huge_pages.json")
    args = ap.parse_args()
    rows, skipped = [], []
    print(f"{'n_cells':>9} {'collapse_s':>10} {'fwd_4k':>8} {'fwd_huge':>8} {'ratio':>6} {'bwd_4k':>8} "
          f"{'bwd_huge':>8} {'ratio':>6}")
    # Two memories and the fill's temporaries.
    for n in sizes_that_fit(args.sizes, lambda n: 2 * n * 4 * D + (2 << 30), skipped):
        row = compare(n, args.seed)
        rows.append(row)
        print(f"{n:>9} {row['collapse_s']:>10.2f} {row['forward_ms_4k']:>8.2f} {row['forward_ms_huge']:>8.2f} "
              f"{row['ratio_forward']:>6.3f} {row['backward_ms_4k']:>8.2f} {row['backward_ms_huge']:>8.2f} "
              f"{row['ratio_backward']:>6.3f}{'' if row['collapsed'] else '  (not collapsed)'}", flush=True)
    write_report({"settings": {"dim": D, "batch": B, "k": K, "warmup": WARMUP, "repeats": REPEATS},
                  "rows": rows, "skipped": skipped}, args.out)


if __name__ == "__main__":
    main()
