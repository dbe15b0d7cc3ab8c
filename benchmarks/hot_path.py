"""A training read's two memory-bound kernels on a trained memory, each against the form it replaced.

    python benchmarks/hot_path.py             # trains 2 epochs of CIFAR-10 (JPEG copy) / conv1 first
    python benchmarks/hot_path.py --quick     # synthetic images, a few seconds

- search: the run's IVF lists holding float32 cells (IVFx,Flat, as `ivf` indices were) against 8-bit
  residual codes (IVFx,SQ8, as they are on a CPU now), over the same centroids, at the training and the
  evaluation depth: median ms a batch, and recall@K+1 against exact search;
- scores: the candidates' scores u_b . m_{ids[b, k]} gathered into a 4 MiB buffer a few queries at a time
  and multiplied in a batch (the read's earlier forward) against one sampled product straight from the
  memory (sam_cls.read.candidate_scores): median ms a batch and the largest difference.
Queries are what a training step sends (augmented training images through the encoder in train mode), and
each timed call follows one encoder forward and backward, so the caches hold what they hold in a step.
Variants alternate batch by batch, so drifting machine load hits them alike. Writes results/hot_path.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from machine import write_report

# isort: split
import faiss
from faiss.contrib.evaluation import knn_intersection_measure

from sam_cls.config import Config
from sam_cls.index import exact_search
from sam_cls.read import candidate_scores
from sam_cls.train import Trainer

K = 257  # a training read's candidates at --topk 256: K + 1, so that its own cell can be dropped
GATHER_BUFFER_BYTES = 4 << 20  # the earlier forward's buffer


def gathered_scores(u: torch.Tensor, ids: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """The read's earlier forward: cells gathered a few queries at a time into a small buffer, then bmm."""
    B, k = ids.shape
    d = memory.shape[1]
    rows = max(1, GATHER_BUFFER_BYTES // (k * d * memory.element_size()))
    scores = torch.empty(B, k)
    buffer = torch.empty(min(rows, B) * k, d)
    for start in range(0, B, rows):
        stop = min(start + rows, B)
        cells = torch.index_select(memory, 0, ids[start:stop].reshape(-1), out=buffer[: (stop - start) * k])
        torch.bmm(cells.view(stop - start, k, d), u[start:stop].unsqueeze(2), out=scores[start:stop].unsqueeze(2))
    return scores


def ivf_index(codes: str, centroids: torch.Tensor, memory: torch.Tensor):
    """An IVF index over the run's own coarse centroids (so only the lists' storage differs)."""
    index = faiss.index_factory(memory.shape[1], f"IVF{len(centroids)},{codes}", faiss.METRIC_INNER_PRODUCT)
    faiss.extract_index_ivf(index).quantizer.add(centroids)  # a filled quantizer: train() skips k-means
    index.train(memory)
    index.add(memory)
    return index


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="../shared/data/cifar10-jpeg", help="CIFAR-10 in image-folder layout")
    ap.add_argument("--epochs", type=int, default=2, help="training epochs before measuring")
    ap.add_argument("--batches", type=int, default=20, help="training batches timed per variant")
    ap.add_argument("--quick", action="store_true", help="synthetic images, 1 epoch, 4 batches")
    ap.add_argument("--out", default="results/hot_path.json")
    args = ap.parse_args()
    base: dict = {"encoder": "conv1", "epochs": args.epochs, "seed": 0}
    if args.quick:
        base.update(dataset="synthetic", synthetic_train=2048, synthetic_test=256, synthetic_shape=[3, 32, 32],
                    index="ivf", nlist=16, epochs=1)
        data, batches = "synthetic (2048 images, 3x32x32)", min(args.batches, 4)
    else:
        base.update(dataset="imagefolder", data_dir=args.data_dir, index="ivf")
        data, batches = "CIFAR-10 (JPEG copy)", args.batches
    trainer = Trainer(Config(**base).validate(), log=lambda line: None)
    trainer.prepare()
    for _ in range(base["epochs"]):  # as fit() does: train, re-encode the memory, rebuild before evaluating
        trainer.train_epoch()
        trainer.refresh_memory()
        trainer.refresher.rebuild("epoch")
    memory, centroids = trainer.memory.embeddings, trainer.refresher.centroids()
    depths = {"training": trainer.refresher.train_nprobe, "evaluation": trainer.refresher.index.params.nprobe}

    gen = torch.Generator().manual_seed(1)
    batch_ids = [torch.randperm(len(memory), generator=gen)[: trainer.cfg.batch_size] for _ in range(batches)]
    with torch.no_grad():
        queries = [trainer.encoder(trainer.batch(idx)) for idx in batch_ids]
    exact = [exact_search(memory, q, K)[1] for q in queries]
    images = trainer.batch(batch_ids[0])

    def timed(fn: Callable[[], object]) -> tuple[float, object]:
        trainer.encoder(images).sum().backward()  # one step's encoder pass: the caches a training read meets
        start = time.perf_counter()
        out = fn()
        return 1000 * (time.perf_counter() - start), out

    rows: list[dict] = []
    search_ms: dict[tuple[str, str], float] = {}
    indices = {codes: ivf_index(codes, centroids, memory) for codes in ("Flat", "SQ8")}
    for depth, nprobe in depths.items():
        times: dict[str, list[float]] = {codes: [] for codes in indices}
        found: dict[str, list[torch.Tensor]] = {codes: [] for codes in indices}
        for index in indices.values():
            faiss.extract_index_ivf(index).nprobe = nprobe
        for q in queries:
            for codes, index in indices.items():
                ms, (_, ids) = timed(lambda index=index, q=q: index.search(q, K))
                times[codes].append(ms)
                found[codes].append(ids)
        for codes in indices:
            search_ms[codes, depth] = round(statistics.median(times[codes]), 3)
            hits = knn_intersection_measure(torch.cat(found[codes]).numpy(), torch.cat(exact).numpy())
            rows.append({"kernel": "search", "variant": f"IVF{len(centroids)},{codes}", "depth": depth,
                         "nprobe": nprobe, "ms": search_ms[codes, depth], "recall": round(float(hits), 4)})

    faiss.extract_index_ivf(indices["SQ8"]).nprobe = depths["training"]
    variants = {"gather + bmm (earlier)": gathered_scores, "sampled product": candidate_scores}
    times = {name: [] for name in variants}
    largest = 0.0
    for q in queries:
        ids = indices["SQ8"].search(q, K)[1]
        outs = []
        for name, fn in variants.items():
            ms, out = timed(lambda fn=fn, q=q, ids=ids: fn(q, ids, memory))
            times[name].append(ms)
            outs.append(out)
        largest = max(largest, (outs[0] - outs[1]).abs().max().item())
    for name in variants:
        rows.append({"kernel": "scores", "variant": name, "ms": round(statistics.median(times[name]), 3)})
    rows[-1]["max_abs_difference"] = largest

    print(f"{data}, conv1 after {base['epochs']} epoch(s), {len(memory)} cells, batch {trainer.cfg.batch_size}, "
          f"K+1 = {K}, medians of {batches} batches")
    for r in rows:
        extra = f"  nprobe {r['nprobe']:>3} ({r['depth']})  recall {r['recall']:.4f}" if "recall" in r else ""
        print(f"{r['kernel']:7s} {r['variant']:26s} {r['ms']:7.2f} ms{extra}")
    ratios = {f"search_{depth}": round(search_ms["SQ8", depth] / search_ms["Flat", depth], 3) for depth in depths}
    ratios["scores"] = round(rows[-1]["ms"] / rows[-2]["ms"], 3)
    print("ratios, new / earlier: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    write_report({"data": data, "encoder": "conv1", "epochs": base["epochs"], "cells": len(memory),
                  "batch_size": trainer.cfg.batch_size, "k": K, "batches": batches, "rows": rows,
                  "ratios_new_over_earlier": ratios}, args.out)


if __name__ == "__main__":
    main()
