"""How shallow a training read's IVF search may be: recall, softmax mass, loss and search time against nprobe.

    python benchmarks/ablations/train_depth.py                                    # the table-1 CIFAR-10 conv1 run
    python benchmarks/ablations/train_depth.py --run RUN_DIR --nprobes 8,16,32

Over a trained run's memory and saved IVF index, queries are what a training step sends: augmented training
images through the encoder in train mode. Each is searched exactly (top K+1) and through the index at each
nprobe. Per depth the table gives:
- recall of the exact K+1;
- the share of the exact read's softmax mass that the candidates hold;
- the training read's loss and accuracy (own cell excluded, as in a step);
- the median search time per batch.
Writes results/train_depth.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common

import torch
from common import median_ms, write_report

import sam_cls
from sam_cls.data import augment
from sam_cls.index import exact_search
from sam_cls.read import exclusion_mask, sparse_read
from sam_cls.run import run_data

# ----------------------------------------------------------------------------- hyper-parameters, all here
SEARCH_PASSES = 3  # timed passes over the queries' batches at each depth (after one untimed pass)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/table1/cifar10/samcls-conv1", help="a trained run with an IVF index")
    ap.add_argument("--data-dir", help="override the run's data folder")
    ap.add_argument("--nprobes", default="8,16,19,24,32,48,74", help="IVF depths to compare")
    ap.add_argument("--queries", type=int, default=1024, help="training images used as queries")
    ap.add_argument("--out", default="results/train_depth.json")
    args = ap.parse_args()
    if not (Path(args.run) / "checkpoint.pt").is_file():
        sys.exit(f"error: no trained run at {args.run}: run benchmarks/table1.py first, or pass --run")
    clf = sam_cls.load(args.run, device="cpu")
    cfg, data, encoder = clf.cfg, run_data(clf, args.data_dir, log=lambda line: None), clf.encoder
    memory, index = clf.memory, clf.index
    if index.kind not in ("ivf", "ivfpq"):
        sys.exit(f"error: {args.run} has a {index.kind} index; this compares IVF depths")
    k, batch = cfg.topk + 1, cfg.batch_size  # K + 1: the query's own cell is dropped, as in a step

    gen = torch.Generator().manual_seed(0)
    own = torch.randperm(memory.size, generator=gen)[: args.queries]
    x = data.train_x[own]
    if cfg.augment and data.natural:
        x = augment(x, gen)
    encoder.train()  # the mode a training step encodes its queries in
    with torch.no_grad():
        u = torch.cat([encoder(x[i : i + batch]) for i in range(0, len(x), batch)])
    own = memory.rows[own]  # from here on the queries' own cells: rows of the memory, as the index's ids are
    labels = memory.labels[own]

    def read(ids: torch.Tensor) -> dict:
        """The training read over these candidates: loss, accuracy, and rows whose K cells hold no positive."""
        log_probs = sparse_read(u, ids, memory.embeddings, memory.labels, data.num_classes, cfg.temperature,
                                exclude=exclusion_mask(ids, own))
        nll = -log_probs.gather(1, labels.unsqueeze(1)).squeeze(1)
        # A row with no cell of its class among the K reads P = 1e-30 (loss 69): a handful swing the mean.
        hopeless = nll > 60
        return {"loss": nll.mean().item(), "loss_with_a_positive": nll[~hopeless].mean().item(),
                "no_positive": int(hopeless.sum()), "acc": 100.0 * (log_probs.argmax(1) == labels).float().mean().item()}

    exact_scores, exact_ids = exact_search(memory.embeddings, u, k)
    exact_scores = exact_scores.masked_fill(exclusion_mask(exact_ids, own), float("-inf"))
    exact_p = torch.softmax(exact_scores / cfg.temperature, dim=1)  # the exact read's weights
    rows = [{"nprobe": "exact", "recall": 1.0, "mass": 1.0, **read(exact_ids)}]
    for nprobe in sorted({min(int(n), index.nlist) for n in args.nprobes.split(",")}):
        ids = torch.cat([index.search(u[i : i + batch], k, nprobe=nprobe)[1] for i in range(0, len(u), batch)])
        found = (exact_ids.unsqueeze(2) == ids.unsqueeze(1)).any(2)  # (Q, K+1): exact neighbour among candidates
        batches = u.split(batch)
        search_ms = median_ms(lambda i, nprobe=nprobe, batches=batches: index.search(
            batches[i % len(batches)], k, nprobe=nprobe), SEARCH_PASSES * len(batches), warmup=0)
        rows.append({"nprobe": nprobe, "recall": found.float().mean().item(),
                     "mass": (exact_p * found).sum(1).mean().item(), **read(ids), "search_ms": search_ms})

    print(f"{args.run}: {index.description}, K+1 = {k}, {len(own)} training-mode queries, batches of {batch}")
    print(f"{'nprobe':>7} {'recall':>7} {'mass':>7} {'loss':>7} {'loss*':>7} {'no pos':>7} {'acc %':>7} {'search ms':>10}")
    for r in rows:
        ms = f"{r['search_ms']:10.2f}" if "search_ms" in r else f"{'-':>10}"
        print(f"{r['nprobe']:>7} {r['recall']:7.3f} {r['mass']:7.4f} {r['loss']:7.4f} {r['loss_with_a_positive']:7.4f} "
              f"{r['no_positive']:7d} {r['acc']:7.2f} {ms}")
    print("loss*: over rows with a positive among their K cells; no pos: rows without one (loss 69 each)")
    write_report({"run": args.run, "index": index.description, "k": k, "queries": len(own), "batch": batch,
                  "rows": [{key: round(v, 4) if isinstance(v, float) else v for key, v in r.items()} for r in rows]},
                 args.out)


if __name__ == "__main__":
    main()
