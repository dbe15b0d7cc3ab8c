"""An IVF index's per-epoch retrain: k-means from a cold start against one from the last index's centroids.

    python benchmarks/ablations/warm_kmeans.py                 # CIFAR-10 (JPEG copy) / conv1, after epochs 1 to 3
    python benchmarks/ablations/warm_kmeans.py --warm-iterations 3,6
    python benchmarks/ablations/warm_kmeans.py --quick         # synthetic images, a few seconds

A fresh sam-cls trainer trains whole epochs as fit() does, the memory re-encoded at the end of each. Then
that memory is indexed each way, with the run's index settings and seed: cold (faiss's 10 k-means
iterations from random cells) and warm (a few iterations from the centroids of the index the epoch trained
against; WARM_KMEANS_ITERATIONS is what a rebuild does). Per build: seconds (median of 3), recall@K+1 at the
evaluation depth with 1024 cells as queries, the lists' imbalance factor (1 is even; a query from the cells
scans about that much more than the mean list), and the training-depth search of those 1024 queries in
training batches (ms a batch, median of 5 passes). After epoch 1 the memory has moved the most of any epoch
in a run (a random encoder's against a trained one's). Writes results/warm_kmeans.json.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common

import torch
from common import CIFAR10_DIR, conv1_run, median_ms, trainer, write_report

# isort: split
import faiss  # after torch (common.py says why)

from sam_cls.index import build_index, recall_at_k
from sam_cls.index.params import WARM_KMEANS_ITERATIONS
from sam_cls.train import Trainer

# ----------------------------------------------------------------------------- hyper-parameters, all here
BUILDS, SEARCH_PASSES, RECALL_QUERIES = 3, 5, 1024
QUICK_SYNTHETIC_TRAIN = 4096


def one_start(t: Trainer, queries: torch.Tensor, start: torch.Tensor | None, iterations: int) -> dict:
    """An index over the trainer's memory, k-means from `start` (None: cold): its build, recall, lists, search."""
    memory, refresher, batch = t.memory.embeddings, t.refresher, t.cfg.batch_size
    built = []

    def build(_: int) -> None:
        built.append(build_index(
            # No list layout: these indices are measured against the memory as it is, not moved to match.
            memory, replace(refresher.params, list_order=False), refresher.k, seed=t.cfg.seed, centroids=start,
            kmeans_iterations=iterations))

    build_ms = median_ms(build, BUILDS, warmup=0)
    index = built[-1]

    def training_searches(_: int) -> None:
        for i in range(0, len(queries), batch):
            index.search(queries[i : i + batch], refresher.k, training=True)

    pass_ms = median_ms(training_searches, SEARCH_PASSES, warmup=0)
    return {"build_s": round(build_ms / 1e3, 3),
            "recall_at_k": round(recall_at_k(index, memory, queries, refresher.k)["recall_at_k"], 4),
            "imbalance": round(faiss.extract_index_ivf(index.index).invlists.imbalance_factor(), 3),
            "train_search_ms": round(pass_ms / math.ceil(len(queries) / batch), 2)}


def compare(t: Trainer, centroids: torch.Tensor, warm_iterations: list[int]) -> dict[str, dict]:
    """Cold and warm builds over the trainer's current memory, side by side."""
    memory = t.memory.embeddings
    queries = memory[torch.randperm(len(memory), generator=torch.Generator().manual_seed(0))[:RECALL_QUERIES]]
    starts = [("cold", None, 0)] + [(f"warm{i}", centroids, i) for i in warm_iterations]
    return {name: one_start(t, queries, start, iterations) for name, start, iterations in starts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=CIFAR10_DIR, help="CIFAR-10 in image-folder layout")
    ap.add_argument("--epochs", type=int, default=3, help="epochs trained, one comparison after each")
    ap.add_argument("--warm-iterations", default=str(WARM_KMEANS_ITERATIONS), help="k-means iterations of "
                    f"each warm variant, comma-separated (default {WARM_KMEANS_ITERATIONS}, what rebuilds do)")
    ap.add_argument("--quick", action="store_true", help="synthetic images, index forced to ivf")
    ap.add_argument("--out", default="results/warm_kmeans.json")
    args = ap.parse_args()
    warm_iterations = [int(i) for i in args.warm_iterations.split(",")]
    if min(warm_iterations) < 1:
        ap.error(f"--warm-iterations must be >= 1 each, got {args.warm_iterations}")
    # The table-1 schedule (15 epochs), cut after --epochs; --quick forces ivf on its few cells.
    options, data = conv1_run(args.data_dir, args.quick, QUICK_SYNTHETIC_TRAIN, epochs=15,
                              index="ivf" if args.quick else None)
    t = trainer(options)
    if t.refresher.index.kind not in ("ivf", "ivfpq"):
        sys.exit(f"error: the memory is indexed by {t.refresher.index.kind}, not IVF: nothing to retrain")
    print(f"{data}, conv1, index {t.refresher.description}; rebuilds start warm with "
          f"{WARM_KMEANS_ITERATIONS} iterations")
    print(f"{'epoch':>5} {'start':>6} {'build_s':>8} {'recall@k':>9} {'imbalance':>9} {'train search ms':>15}")
    epochs = []
    for epoch in range(1, args.epochs + 1):
        centroids = t.refresher.centroids()  # of the index this epoch trains against
        t.train_epoch()
        t.refresh_memory()  # as fit() does before its evaluation rebuild
        rows = compare(t, centroids, warm_iterations)
        for name, r in rows.items():
            print(f"{epoch:>5} {name:>6} {r['build_s']:>8.3f} {r['recall_at_k']:>9.4f} "
                  f"{r['imbalance']:>9.3f} {r['train_search_ms']:>15.2f}")
        epochs.append({"epoch": epoch, **rows})
        t.refresher.rebuild("evaluation")  # the product's (warm) rebuild, for the next epoch
    write_report({"data": data, "encoder": "conv1", "index": t.refresher.description,
                  "rebuild_warm_kmeans_iterations": WARM_KMEANS_ITERATIONS, "k": t.refresher.k,
                  "search_batch": t.cfg.batch_size, "epochs": epochs}, args.out)


if __name__ == "__main__":
    main()
