"""An IVF index's per-epoch retrain: k-means from a cold start against one from the last index's centroids.

    python benchmarks/warm_kmeans.py                 # CIFAR-10 (JPEG copy) / conv1, after epochs 1 to 3
    python benchmarks/warm_kmeans.py --warm-iterations 3,6
    python benchmarks/warm_kmeans.py --quick         # synthetic images, a few seconds

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

import torch  # first: faiss imported after it shares torch's OpenMP runtime (sam_cls/index/_faiss.py)

# isort: split
import faiss
from machine import write_report

from sam_cls.config import Config
from sam_cls.index import build_index, recall_at_k
from sam_cls.index.params import WARM_KMEANS_ITERATIONS
from sam_cls.index.recall import timed_ms
from sam_cls.train import Trainer

BUILDS, SEARCH_PASSES, RECALL_QUERIES = 3, 5, 1024


def compare(trainer: Trainer, centroids: torch.Tensor, warm_iterations: list[int]) -> dict[str, dict]:
    """Cold and warm builds over the trainer's current memory, side by side."""
    memory, refresher, batch = trainer.memory.embeddings, trainer.refresher, trainer.cfg.batch_size
    gen = torch.Generator().manual_seed(0)
    queries = memory[torch.randperm(len(memory), generator=gen)[:RECALL_QUERIES]]
    rows = {}
    starts = [("cold", None, 0)] + [(f"warm{i}", centroids, i) for i in warm_iterations]
    for name, start, iterations in starts:
        index, build_ms = timed_ms(lambda start=start, iterations=iterations: build_index(
            # No list layout: these indices are measured against the memory as it is, not moved to match.
            memory, replace(refresher.params, list_order=False), refresher.k, seed=trainer.cfg.seed, centroids=start,
            kmeans_iterations=iterations), BUILDS)

        def training_searches(index=index) -> None:
            for i in range(0, len(queries), batch):
                index.search(queries[i : i + batch], refresher.k, nprobe=refresher.train_nprobe,
                             k_factor=refresher.train_k_factor)

        _, pass_ms = timed_ms(training_searches, SEARCH_PASSES)
        rows[name] = {"build_s": round(build_ms / 1e3, 3),
                      "recall_at_k": round(recall_at_k(index, memory, queries, refresher.k)["recall_at_k"], 4),
                      "imbalance": round(faiss.extract_index_ivf(index.index).invlists.imbalance_factor(), 3),
                      "train_search_ms": round(pass_ms / math.ceil(len(queries) / batch), 2)}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="../shared/data/cifar10-jpeg", help="CIFAR-10 in image-folder layout")
    ap.add_argument("--epochs", type=int, default=3, help="epochs trained, one comparison after each")
    ap.add_argument("--warm-iterations", default=str(WARM_KMEANS_ITERATIONS), help="k-means iterations of "
                    f"each warm variant, comma-separated (default {WARM_KMEANS_ITERATIONS}, what rebuilds do)")
    ap.add_argument("--quick", action="store_true", help="synthetic images, index forced to ivf")
    ap.add_argument("--out", default="results/warm_kmeans.json")
    args = ap.parse_args()
    warm_iterations = [int(i) for i in args.warm_iterations.split(",")]
    if min(warm_iterations) < 1:
        ap.error(f"--warm-iterations must be >= 1 each, got {args.warm_iterations}")
    base: dict = {"encoder": "conv1", "epochs": 15, "seed": 0}  # the table-1 schedule, cut after --epochs
    if args.quick:
        base.update(dataset="synthetic", synthetic_train=4096, synthetic_test=256, synthetic_shape=[3, 32, 32],
                    index="ivf")
        data = "synthetic (4096 images, 3x32x32)"
    else:
        if not (Path(args.data_dir) / "train").is_dir():
            sys.exit(f"error: no image folder at {args.data_dir}/train: pass --data-dir (or --quick)")
        base.update(dataset="imagefolder", data_dir=args.data_dir)
        data = "CIFAR-10 (JPEG copy)"
    trainer = Trainer(Config(**base).validate(), log=lambda line: None)
    trainer.prepare()
    if trainer.refresher.index.kind not in ("ivf", "ivfpq"):
        sys.exit(f"error: the memory is indexed by {trainer.refresher.index.kind}, not IVF: nothing to retrain")
    print(f"{data}, conv1, index {trainer.refresher.description}; rebuilds start warm with "
          f"{WARM_KMEANS_ITERATIONS} iterations")
    print(f"{'epoch':>5} {'start':>6} {'build_s':>8} {'recall@k':>9} {'imbalance':>9} {'train search ms':>15}")
    epochs = []
    for _ in range(args.epochs):
        centroids = trainer.refresher.centroids()  # of the index this epoch trains against
        trainer.train_epoch()
        trainer.epoch += 1
        trainer.refresh_memory()  # as fit() does before its evaluation rebuild
        rows = compare(trainer, centroids, warm_iterations)
        for name, r in rows.items():
            print(f"{trainer.epoch:>5} {name:>6} {r['build_s']:>8.3f} {r['recall_at_k']:>9.4f} "
                  f"{r['imbalance']:>9.3f} {r['train_search_ms']:>15.2f}")
        epochs.append({"epoch": trainer.epoch, **rows})
        trainer.refresher.rebuild("evaluation")  # the product's (warm) rebuild, for the next epoch
    write_report({"data": data, "encoder": "conv1", "index": trainer.refresher.description,
                  "rebuild_warm_kmeans_iterations": WARM_KMEANS_ITERATIONS, "k": trainer.refresher.k,
                  "search_batch": trainer.cfg.batch_size, "epochs": epochs},
                 args.out)


if __name__ == "__main__":
    main()
