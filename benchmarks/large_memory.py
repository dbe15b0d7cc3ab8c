"""Memories larger than the training set, from deformed copies of real images: accuracy and cost up to 1e7 cells.

    python benchmarks/large_memory.py                               # MNIST 6e4..1e7, CIFAR-10, trained runs (work: runs/large-memory)
    python benchmarks/large_memory.py --quick                       # synthetic images, tiny: a smoke run

(a) Fixed encoder: conv1 trained on the training images (EPOCHS), then memories of C deformed copies per image
(sam_cls/copies.py) for each C in COPIES. For each memory: test accuracy of the read over the exact top-K (torch,
chunked) and over the default index's top-K, recall@K of that index, its build seconds, classification
queries/s (search and read; encoder excluded), bytes per cell (the float32 memory plus the saved index) and peak
resident memory of the classifying process. Then a depth sweep (recall@K and accuracy at each IVF nprobe, at
evaluation and at training re-rank depth), the same on index_bench's synthetic cells of the same N, and a
training step less its encoder (benchmarks/common.py's sparse_step: search, read, backward, write) over the
memory with the training default index, timed side by side at the default and at each STEP_NPROBE training depth.
(b) Trained with the expanded memory: MNIST conv1 with C in TRAIN_COPIES for the same --train-seconds each:
test accuracy, ms a step (with the encoder: the run's own; without: sparse_step over its memory), rebuild seconds
and the staleness measured at each rebuild.

Each point runs in a process of its own (so peak memory is its own) and leaves its JSON in --work, where a rerun
finds it and moves on; a memory's embeddings and its test queries' exact top-K are cached there too. Writes
results/large_memory.json and .png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch  # first: faiss imported after it shares torch's OpenMP runtime (sam_cls/index/_faiss.py)

# isort: split
import numpy as np
from common import (
    CIFAR10_DIR,
    make_batches,
    median_ms,
    now,
    peak_rss_mb,
    reset_peaks,
    sparse_step,
    write_report,
)
from faiss.contrib.evaluation import knn_intersection_measure

import sam_cls
from sam_cls.checkpoint import RunDir
from sam_cls.config import make_config
from sam_cls.copies import encode_cells
from sam_cls.evaluate import encode_all
from sam_cls.index import IndexParams, IndexRefresher, build_index, exact_search
from sam_cls.index.synthetic import clustered_embeddings
from sam_cls.memory import MemoryBank
from sam_cls.read import sparse_read
from sam_cls.setup import get_dataset
from sam_cls.train import Trainer, train

# ----------------------------------------------------------------------------- hyper-parameters, all here
MNIST_DIR = "../shared/data"  # torchvision's MNIST layout (MNIST/raw)
COPIES = {"mnist": (1, 10, 50, 167), "cifar10": (1, 10)}  # 6e4, 6e5, 3e6, 1e7 MNIST cells; 5e4, 5e5 CIFAR
EPOCHS = {"mnist": 3, "cifar10": 5, "synthetic": 2}  # the fixed encoders' training: most of their plateau, in minutes
TRAIN_COPIES = (1, 10)  # (b): 6e4 and 6e5 MNIST cells
TRAIN_SECONDS = 240.0  # (b): each run's budget of training steps
K, TEMPERATURE = 256, 0.05  # the config defaults
SWEEP_NPROBE = (4, 8, 16, 32, 64, 128, 256, 512)
STEP_NPROBE = (8, 16, 32)  # training depths whose steps are timed side by side with the default's
QUERY_BATCH = 1024  # test queries per search call, as `sam-cls evaluate` reads them
STEP_REPEATS = 15
QUICK = {"copies": (1, 4), "train_copies": (1, 3), "train_seconds": 8.0, "synthetic_train": 1500}


def options(dataset: str, quick: bool) -> dict:
    """The fixed encoder's training options for a data set."""
    base = {"encoder": "conv1", "seed": 0, "topk": K, "device": "cpu", "epochs": EPOCHS[dataset]}
    if quick:
        return {**base, "dataset": "synthetic", "synthetic_train": QUICK["synthetic_train"], "synthetic_test": 500,
                "synthetic_shape": [1, 16, 16], "epochs": EPOCHS["synthetic"], "topk": 32}
    if dataset == "mnist":
        return {**base, "dataset": "mnist", "data_dir": MNIST_DIR}
    return {**base, "dataset": "imagefolder", "data_dir": CIFAR10_DIR}


def fixed_encoder(work: Path, dataset: str, quick: bool) -> Path:
    """The trained run whose encoder every memory of this data set uses; trained here when --work lacks it."""
    out = work / f"{dataset}-conv1"
    if not (out / "checkpoint.pt").exists():
        train(make_config(None, **options(dataset, quick), out=str(out)), log=print)
    return out


def accuracy(u: torch.Tensor, ids: torch.Tensor, memory: torch.Tensor, labels: torch.Tensor, truth: torch.Tensor,
             classes: int) -> float:
    """Test accuracy (percent) of the read over the given K cells a query."""
    correct = 0
    for i in range(0, len(u), QUERY_BATCH):
        log_probs = sparse_read(u[i : i + QUERY_BATCH], ids[i : i + QUERY_BATCH], memory, labels, classes, TEMPERATURE)
        correct += int((log_probs.argmax(1) == truth[i : i + QUERY_BATCH]).sum())
    return round(100.0 * correct / len(u), 3)


def search_all(index, u: torch.Tensor, k: int, **depth) -> torch.Tensor:
    return torch.cat([index.search(u[i : i + QUERY_BATCH], k, **depth)[1] for i in range(0, len(u), QUERY_BATCH)])


def sweep(index, u: torch.Tensor, k: int, exact_ids: torch.Tensor, score) -> list[dict]:
    """Recall@K (and accuracy, where score is given) at each nprobe, at evaluation and training re-rank depth."""
    if index.kind not in ("ivf", "ivfpq"):
        return []
    rows = []
    for nprobe in [p for p in SWEEP_NPROBE if p <= index.nlist]:
        # A training read differs only in ivfpq's re-rank depth (k_factor); ivf reads the same lists alike.
        for depth in ("evaluation", "training") if index.kind == "ivfpq" else ("evaluation",):
            k_factor = index.train_k_factor if depth == "training" else None
            with index._knob("nprobe", nprobe):  # this depth for the sweep; the index keeps its own after
                ids = search_all(index, u, k, k_factor=k_factor)
            row = {"nprobe": nprobe, "depth": depth,
                   "recall_at_k": round(float(knn_intersection_measure(ids.numpy(), exact_ids.numpy())), 4)}
            if score is not None:
                row["acc"] = score(ids)
            rows.append(row)
    return rows


def phase(name: str) -> None:
    """A progress line: a point at 1e7 cells runs for an hour."""
    print(f"{time.strftime('%H:%M:%S')} {name}", flush=True)


def exact_top_k(cache: Path, memory: torch.Tensor, u: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """The test queries' exact top-k ids and the seconds their search took, measured once per memory and cached:
    at 1e7 cells it is a third of an hour."""
    if cache.exists():
        saved = torch.load(cache, weights_only=True)
        if saved["ids"].shape == (len(u), k):  # else another k or test set: measured again below
            return saved["ids"], float(saved["seconds"])
    start = time.perf_counter()
    _, ids = exact_search(memory, u, k)
    seconds = time.perf_counter() - start
    torch.save({"ids": ids, "seconds": torch.tensor(seconds)}, cache)
    return ids, seconds


def measure_point(work: Path, dataset: str, copies: int, quick: bool) -> dict:
    """One memory of C copies: part (a)'s row, its depth sweeps and its training step."""
    run = fixed_encoder(work, dataset, quick)
    clf = sam_cls.load(run, "cpu", index=False)
    data = get_dataset(clf.cfg, lambda _: None)
    n, k = copies * len(data.train_y), clf.cfg.topk
    reset_peaks()
    cache = work / f"{dataset}-c{copies}.pt"
    phase(f"{dataset} x{copies}: memory")
    start = time.perf_counter()
    if cache.exists():
        memory = torch.load(cache, weights_only=True)
    else:
        memory = encode_cells(clf.encoder, data.train_x, copies, clf.cfg.seed, 1024)
        torch.save(memory, cache)
    encode_s = time.perf_counter() - start
    labels = data.train_y.repeat(copies)
    u = encode_all(clf.encoder, data.test_x, 1024, desc="test")
    truth, classes = data.test_y, data.num_classes

    phase("exact search")
    exact_ids, exact_s = exact_top_k(work / f"{dataset}-c{copies}-exact.pt", memory, u, k)
    exact_acc = accuracy(u, exact_ids, memory, labels, truth, classes)

    phase("index build")
    start = time.perf_counter()
    index = build_index(memory, IndexParams(), k=k, seed=0)
    build_s = time.perf_counter() - start
    phase("depth calibration")  # as `sam-cls rebuild-index` and a trainer's evaluation rebuild choose it
    start = time.perf_counter()
    calibration = index.calibrate(memory, print)
    calibrate_s = time.perf_counter() - start
    search_all(index, u[:QUERY_BATCH], k)  # warm-up: first-call allocations and thread start-up
    start = now()
    ids = search_all(index, u, k)
    index_acc = accuracy(u, ids, memory, labels, truth, classes)
    queries_per_s = len(u) / (now() - start)
    recall = float(knn_intersection_measure(ids.numpy(), exact_ids.numpy()))
    peak_classify = peak_rss_mb()  # memory, index and the test queries' reads: what classifying holds
    with tempfile.TemporaryDirectory(dir=work) as tmp:  # saving serializes the index in memory first
        index.save(Path(tmp) / "index")
        index_bytes = (Path(tmp) / "index").stat().st_size
    row = {"dataset": dataset, "n_cells": n, "copies": copies, "exact_acc": exact_acc, "index_acc": index_acc,
           "index": index.description, "recall_at_k": round(recall, 4), "build_s": round(build_s, 2),
           "queries_per_s": round(queries_per_s, 1), "bytes_per_cell": round(memory[0].nbytes + index_bytes / n, 1),
           "index_bytes_per_cell": round(index_bytes / n, 1), "peak_rss_mb": peak_classify,
           "peak_rss_save_mb": peak_rss_mb(),
           "encode_s": round(encode_s, 1), "exact_search_s": round(exact_s, 1), "k": k,
           **({"nprobe": int(index._get("nprobe")), "train_nprobe": index.train_nprobe, "calibration": calibration,
               "calibrate_s": round(calibrate_s, 1)} if index.kind in ("ivf", "ivfpq") else {})}
    phase("depth sweep")
    row["sweep"] = sweep(index, u, k, exact_ids, lambda found: accuracy(u, found, memory, labels, truth, classes))
    learned = index.learned()  # the training index below starts from these centroids: no second k-means
    del index, exact_ids, ids

    phase("training step")
    # A training step less its encoder over this memory, with the index a trainer builds (list layout included).
    reset_peaks()
    bank = MemoryBank(memory, labels)
    refresher = IndexRefresher(bank.embeddings, IndexParams(), k=k + 1, rebuild_every=None, seed=0, recall_sample=0,
                               centroids=learned, reorder=bank.reorder)
    idx, batch = make_batches(bank, 8, seed=0)
    default = refresher.index.train_nprobe  # None for exact kinds: the default step only
    depths = sorted({default, *(p for p in STEP_NPROBE if default and p <= refresher.index.nlist)} - {None})
    laps = median_ms({p: lambda i, p=p: sparse_step(bank, refresher, idx[i % 8], batch[i % 8], i, nprobe=p)
                      for p in depths or [None]}, repeats=STEP_REPEATS)  # side by side: the same load on each
    row["step_ms"] = round(laps[default]["total"], 2)
    row["step_parts_ms"] = {part: round(ms, 2) for part, ms in laps[default].items() if part != "total"}
    row["step_by_train_nprobe"] = [{"train_nprobe": p, "step_ms": round(laps[p]["total"], 2),
                                    "search_ms": round(laps[p]["search"], 2)} for p in depths]
    row["peak_rss_train_mb"] = peak_rss_mb()
    return row


def synthetic_point(n: int, k: int) -> dict:
    """The same N of index_bench's synthetic cells (100 Gaussian clusters, d = 128; queries from the same
    clusters): the depth defaults must hold there too."""
    cells, queries = clustered_embeddings(n, 128, seed=0, n_queries=1000)
    _, exact = exact_search(cells, queries, k)
    start = time.perf_counter()
    index = build_index(cells, IndexParams(), k=k, seed=0, calibrate=True)
    build_s = time.perf_counter() - start
    found = search_all(index, queries, k)
    return {"n_cells": n, "index": index.description, "build_s": round(build_s, 1), "recall_at_k": round(float(
        knn_intersection_measure(found.numpy(), exact.numpy())), 4), "sweep": sweep(index, queries, k, exact, None)}


def train_point(work: Path, copies: int, seconds: float, quick: bool) -> dict:
    """Part (b): conv1 trained from scratch with a memory of C copies, for `seconds` of training steps."""
    opts = {**options("mnist", quick), "copies": copies, "epochs": 1000, "max_seconds": seconds,
            "rebuild_every": "auto"}
    out = work / f"trained-c{copies}"
    trainer = Trainer(make_config(None, **opts, out=str(out)), log=print)
    run = RunDir(out)
    start = time.perf_counter()
    with run.lock():
        result = trainer.fit(run)
    total = time.perf_counter() - start
    history = trainer.refresher.history
    bank, refresher = trainer.memory, trainer.refresher
    idx, batch = make_batches(bank, 8, seed=0)
    step_ms = median_ms(lambda i: sparse_step(bank, refresher, idx[i % 8], batch[i % 8], trainer.step + i),
                        repeats=STEP_REPEATS)["total"]
    return {"dataset": "mnist" if not quick else "synthetic", "n_cells": bank.size, "copies": copies,
            "test_acc": result["test_acc"], "step_ms": round(step_ms, 2),
            "step_ms_with_encoder": round(1e3 * trainer.train_seconds / max(1, trainer.step), 2),
            "rebuild_s": round(float(np.median([h["seconds"] for h in history])), 2) if history else None,
            "rebuilds": len(history), "staleness_at_rebuild": [h["staleness_before"] for h in history],
            "steps": trainer.step, "epochs": result["epochs"], "seconds": round(total, 1)}


def run_point(args, kind: str, dataset: str, copies: int) -> dict | None:
    """A point's JSON from --work, else measured now in a process of its own (None with --cached-only)."""
    path = args.work / f"point-{kind}-{dataset}-c{copies}.json"
    if not path.exists() and args.cached_only:
        print(f"--- {kind} {dataset} x{copies}: not measured in {args.work}, left out", flush=True)
        return None
    if not path.exists():
        cmd = [sys.executable, __file__, "--work", str(args.work), "--point", f"{kind}:{dataset}:{copies}",
               "--train-seconds", str(args.train_seconds)] + (["--quick"] if args.quick else [])
        print(f"--- {kind} {dataset} x{copies}", flush=True)
        subprocess.run(cmd, check=True)
    return json.loads(path.read_text())


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, cost_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for dataset in sorted({r["dataset"] for r in report["fixed_encoder"]}):
        rows = [r for r in report["fixed_encoder"] if r["dataset"] == dataset]
        n = [r["n_cells"] for r in rows]
        acc_ax.plot(n, [100 - r["exact_acc"] for r in rows], "o-", label=f"{dataset} exact read")
        acc_ax.plot(n, [100 - r["index_acc"] for r in rows], "x--", label=f"{dataset} default index")
        cost_ax.plot(n, [r["step_ms"] for r in rows], "o-", label=f"{dataset} training step (no encoder), ms")
        cost_ax.plot(n, [1e3 / r["queries_per_s"] for r in rows], "x--", label=f"{dataset} classification, ms/query")
    for ax, title in ((acc_ax, "test error (%) vs memory cells"), (cost_ax, "cost vs memory cells")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("cells (deformed copies of the training images)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/large-memory"), help="trained runs, cached "
                        "memories and point results (a rerun skips what is there)")
    parser.add_argument("--quick", action="store_true", help="synthetic images, tiny memories: a smoke run")
    parser.add_argument("--only", choices=("fixed", "trained"), help="one part only")
    parser.add_argument("--datasets", default="mnist,cifar10")
    parser.add_argument("--copies", type=lambda s: [int(c) for c in s.split(",")], help="these C only (part a)")
    parser.add_argument("--train-seconds", type=float, default=None)
    parser.add_argument("--out", default="results/large_memory.json")
    parser.add_argument("--cached-only", action="store_true", help="assemble the points --work holds; measure "
                        "none (a point at 1e7 cells takes over an hour)")
    parser.add_argument("--point", help=argparse.SUPPRESS)  # kind:dataset:copies, run by the parent
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.train_seconds = args.train_seconds or (QUICK["train_seconds"] if args.quick else TRAIN_SECONDS)
    if args.point:
        kind, dataset, copies = args.point.split(":")
        if kind == "fixed":
            row = measure_point(args.work, dataset, int(copies), args.quick)
        elif kind == "synthetic":  # copies here is N
            row = synthetic_point(int(copies), 32 if args.quick else K)
        else:
            row = train_point(args.work, int(copies), args.train_seconds, args.quick)
        (args.work / f"point-{kind}-{dataset}-c{copies}.json").write_text(json.dumps(row) + "\n")
        return
    datasets = ["synthetic"] if args.quick else args.datasets.split(",")
    fixed = [] if args.only == "trained" else [
        run_point(args, "fixed", d, c) for d in datasets for c in (QUICK["copies"] if args.quick else COPIES[d])
        if not args.copies or c in args.copies]
    fixed = [row for row in fixed if row is not None]
    for row in fixed:  # each N's synthetic depth check, once a size
        if "synthetic" not in row:
            row["synthetic"] = run_point(args, "synthetic", "cells", row["n_cells"])
    trained = [] if args.only == "fixed" else [
        run_point(args, "trained", "mnist", c) for c in (QUICK["train_copies"] if args.quick else TRAIN_COPIES)]
    trained = [row for row in trained if row is not None]
    print(f"{'data':>9} {'cells':>9} {'exact %':>8} {'index %':>8} {'recall':>7} {'build s':>8} {'q/s':>8} "
          f"{'B/cell':>7} {'peak MB':>8} {'step ms':>8}")
    for r in fixed:
        print(f"{r['dataset']:>9} {r['n_cells']:>9} {r['exact_acc']:>8.2f} {r['index_acc']:>8.2f} "
              f"{r['recall_at_k']:>7.3f} {r['build_s']:>8.1f} {r['queries_per_s']:>8.0f} {r['bytes_per_cell']:>7.0f} "
              f"{r['peak_rss_mb']:>8.0f} {r['step_ms']:>8.1f}")
    for r in trained:
        print(f"trained {r['n_cells']:>9} cells: test {r['test_acc']}%  step {r['step_ms']} ms "
              f"({r['step_ms_with_encoder']} with the encoder)  rebuild {r['rebuild_s']}s x{r['rebuilds']}")
    report = write_report({"fixed_encoder": fixed, "trained": trained}, args.out)
    if fixed:
        plot(report, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
