"""Distributed training on one machine: what each collective sends a step, step time, and agreement with one
process (results/distributed.json; docs/DISTRIBUTED.md reads it).

    python benchmarks/distributed.py            # mnist-mini/conv1, K = 64 and 256, 1 process, 1 and 2 ranks

For each K: a single-process Trainer (the reference), then torchrun jobs of 1 and 2 ranks (this script again,
with --worker) that train the same steps from the same seed with an exact (flat) index on each shard. Each job
reports the bytes each of its collectives sent a step (per rank, logical payload: Comm's counters and DDP's
gradient hook), its mean step time, each step's global loss, its final encoder, and whether every rank merged
the same top-K for the same queries and the top-K a single process finds over the whole memory. On a 2-core
CPU the ranks share the cores: the step times say what the collectives cost, not what more machines gain.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import write_report

from sam_cls.config import make_config
from sam_cls.evaluate import encode_all
from sam_cls.index import IndexParams, build_index
from sam_cls.train import Trainer

SETTINGS = {"dataset": "mnist-mini", "encoder": "conv1", "dim": 128, "batch_size": 256, "index": "flat",
            "device": "cpu", "epochs": 1}
STEPS = 19  # the whole epoch of mnist-mini's 5,000 images in batches of 256, but its short last batch
QUERIES = 256  # test images whose merged top-K every rank computes, for the agreement figures
KS = (64, 256)
RANKS = (1, 2)


def quiet(_line: str) -> None:
    pass


def single_process(k: int, out: Path) -> dict:
    """The reference: sam_cls.train's Trainer, each step's loss recorded from the log-probabilities it read."""
    torch.set_num_threads(1)  # as torchrun gives each rank
    trainer = Trainer(make_config(None, **SETTINGS, topk=k), log=quiet)
    trainer.prepare()
    losses, mode, read = [], trainer.mode, trainer.mode.log_probs

    def recorded(u, idx):
        log_probs = read(u, idx)
        losses.append(float(torch.nn.functional.nll_loss(log_probs.detach(), trainer.train_y[idx])))
        return log_probs

    mode.log_probs = recorded
    start = time.perf_counter()
    trainer.train_epoch(max_steps=STEPS)
    seconds = time.perf_counter() - start
    torch.save(trainer.encoder.state_dict(), out)
    return {"losses": losses, "step_ms": round(1000 * seconds / STEPS, 2)}


def worker(k: int, out: Path) -> None:
    """One rank of a torchrun job: train STEPS steps, then measure the merge; rank 0 writes the record."""
    from sam_cls.distributed import init
    from sam_cls.shards import merge_topk
    from sam_cls.train_distributed import DistributedTrainer

    comm = init("cpu")
    trainer = DistributedTrainer(make_config(None, **SETTINGS, topk=k), comm, log=quiet)
    trainer.prepare()
    trainer.step_losses = []
    comm.traffic.sent.clear()
    comm.traffic.calls.clear()
    comm.barrier()
    start = time.perf_counter()
    trainer.train_epoch(max_steps=STEPS)
    seconds = time.perf_counter() - start
    epoch_end = {"epoch totals"}  # one all_reduce an epoch, not a step
    sent = {name: round(b / STEPS) for name, b in comm.traffic.sent.items() if name not in epoch_end}
    calls = {name: round(c / STEPS, 2) for name, c in comm.traffic.calls.items() if name not in epoch_end}
    losses = trainer.global_step_losses()
    # Agreement: every rank merges the top-K of the same test queries; one process's top-K over the whole
    # memory (gathered here) is the reference.
    mode, memory = trainer.mode, trainer.memory
    trainer.refresh_memory()  # as before an evaluation: the memory re-encoded, each shard's index rebuilt
    trainer.refresher.rebuild("agreement")
    u = encode_all(trainer.encoder, trainer.data.test_x[:QUERIES], QUERIES)
    scores, ids = mode.search(torch.cat([u] * comm.world), [QUERIES] * comm.world, k, training=False)
    every = comm.all_gather_object("agreement", ids.tolist())
    sizes = [b - a for a, b in trainer.ranges]
    whole = comm.all_gather("agreement", memory.embeddings[memory.rows], sizes)
    # The search a single process makes: the same kind of index (flat: exact), over all the cells at once.
    # Equal scores are common (a trained memory has exact twins): ranked by the merge's rule, smaller id
    # first, from twice the candidates so that ties across the K-th place are settled by it too.
    exact_scores, exact = merge_topk(*build_index(whole, IndexParams(kind=SETTINGS["index"]), k).search(u, 2 * k), k)
    if comm.rank == 0:
        torch.save(trainer.encoder.state_dict(), out.with_suffix(".pt"))
        record = {"ranks": comm.world, "k": k, "step_ms": round(1000 * seconds / STEPS, 2),
                  "bytes_per_step": sent, "calls_per_step": calls, "losses": losses,
                  "ranks_agree": all(other == every[0] for other in every),
                  "rows_equal_to_single_process": float((ids == exact).all(1).float().mean()),
                  "sets_equal_to_single_process": float((ids.sort(1).values == exact.sort(1).values).all(1)
                                                        .float().mean()),
                  # Where the order differs, by how much the scores differ: rounding (a shard's index sums
                  # its products in another blocking than one index over all cells) or more.
                  "max_score_diff_vs_single_process": float((scores - exact_scores).abs().max()),
                  "cells_per_rank": sizes}
        out.write_text(json.dumps(record))


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[key] - b[key]).abs().max()) for key in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", type=int, metavar="K", help=argparse.SUPPRESS)
    parser.add_argument("--record", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="results/distributed.json")
    args = parser.parse_args()
    if args.worker is not None:
        return worker(args.worker, args.record)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in KS:
            ref_weights = Path(tmp) / f"single-{k}.pt"
            ref = single_process(k, ref_weights)
            print(f"K={k:<4} 1 process      step {ref['step_ms']:8.1f} ms")
            rows.append({"ranks": "1 process", "k": k, "step_ms": ref["step_ms"]})
            for ranks in RANKS:
                record = Path(tmp) / f"ranks{ranks}-k{k}.json"
                job = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                      str(ranks), __file__, "--worker", str(k), "--record", str(record)],
                                     check=False, capture_output=True, text=True)
                if job.returncode != 0:
                    sys.exit(f"torchrun with {ranks} ranks failed:\n{job.stderr[-4000:]}")
                row = json.loads(record.read_text())
                losses = row.pop("losses")
                row["max_loss_diff_vs_single_process"] = max(abs(a - b) for a, b in zip(losses, ref["losses"],
                                                                                        strict=True))
                row["max_weight_diff_vs_single_process"] = max_diff(
                    torch.load(record.with_suffix(".pt"), weights_only=True), torch.load(ref_weights, weights_only=True))
                row["first_last_loss"] = [round(losses[0], 4), round(losses[-1], 4)]
                rows.append(row)
                total = sum(row["bytes_per_step"].values())
                print(f"K={k:<4} {ranks} rank(s)      step {row['step_ms']:8.1f} ms  sent/rank/step {total / 1e6:7.3f} MB  "
                      f"loss diff {row['max_loss_diff_vs_single_process']:.2e}  weight diff "
                      f"{row['max_weight_diff_vs_single_process']:.2e}  ranks agree {row['ranks_agree']}  "
                      f"top-K rows = 1 process {row['rows_equal_to_single_process']:.4f}")
                for name, b in sorted(row["bytes_per_step"].items()):
                    print(f"        {name:<16} {b:>12,d} B  ({row['calls_per_step'][name]} calls)")
    write_report({"settings": {**SETTINGS, "steps": STEPS, "queries": QUERIES}, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
