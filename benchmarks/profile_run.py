"""Whole training runs as a user runs them, memory against the same encoder's softmax head, broken into parts.

    python benchmarks/profile_run.py                       # MNIST linear, MNIST conv1, CIFAR-10 (JPEG) conv1
    python benchmarks/profile_run.py --cases mnist/linear --epochs 2 --rounds 5
    python benchmarks/profile_run.py --quick               # synthetic images, a smoke run of a few seconds

Each run is `sam_cls.train.train` from a fresh run directory (what `sam-cls train` does), with the phase clock
(sam_cls/phases.py) on. The epoch seconds are the run's own records' (steps and each epoch's end: re-encode,
rebuild, read tuning at the last epoch, test, checkpoint); the memory's first encoding and index build
("prepare") are reported apart. Parts are exclusive seconds per epoch: a step's search, read forward and
backward, encoder forward and backward, optimiser, memory write, index refresh; the epoch end's parts; what no
phase names is "other". Memory and softmax runs alternate, --rounds times, and medians are quoted; a ratio is
the median of each round's softmax / memory ratio, so drifting machine load hits both alike.
Writes results/profile_run.json: per case the parts of both heads and a `throughput` object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from common import CIFAR10_DIR, write_report

from sam_cls.checkpoint import RunDir
from sam_cls.config import make_config
from sam_cls.train import train

try:  # the phase clock: absent from versions before it (their runs report totals only)
    from sam_cls.phases import phase
except ImportError:
    phase = None

# ----------------------------------------------------------------------------- hyper-parameters, all here
CASES = "mnist/linear,mnist/conv1,cifar10/conv1"
HEADS = ("memory", "softmax")
ROUNDS = 3
EPOCHS = 1
# Exclusive parts: each phase less the phases nested in it (trainer: read > search, read forward; backward >
# read backward). Phases not listed are reported as measured.
NESTED = {"read": ("search", "read forward"), "backward": ("read backward",)}
NAMES = {"read": "read (ids, masks)", "backward": "encoder backward", "encoder": "encoder forward"}
STEP_PARTS = ("batch", "encoder", "search", "read", "read forward", "read backward", "backward", "optimizer",
              "memory write", "index refresh")
EPOCH_END_PARTS = ("re-encode", "rebuild", "tune read", "test", "checkpoint")  # the commit: outside the epoch's
# seconds as its record gives them (the record is written with it), reported beside them


def data_options(case: str, args: argparse.Namespace) -> dict:
    dataset, encoder = case.split("/")
    if args.quick:
        return {"dataset": "synthetic", "synthetic_train": 1024, "synthetic_test": 256,
                "synthetic_shape": [1, 28, 28] if dataset == "mnist" else [3, 32, 32], "encoder": encoder}
    if dataset == "mnist":
        return {"dataset": "mnist", "data_dir": args.mnist_dir, "encoder": encoder}
    return {"dataset": "imagefolder", "data_dir": args.cifar10_dir, "encoder": encoder}


def exclusive(seconds: dict[str, float]) -> dict[str, float]:
    """Each phase's seconds less its nested phases'."""
    out = dict(seconds)
    for outer, inner in NESTED.items():
        if outer in out:
            out[outer] -= sum(seconds.get(p, 0.0) for p in inner)
    return out


def one_run(options: dict, head: str, epochs: int, work: Path) -> dict:
    """Train one run; its epoch seconds, steps-only images/s, accuracy and parts (seconds per epoch)."""
    out = Path(tempfile.mkdtemp(dir=work))
    cfg = make_config(None, **options, head=head, epochs=epochs, seed=0, out=str(out / "run"))
    if phase is not None:
        phase.reset()
        phase.timing = True
    start = time.perf_counter()
    result = train(cfg, log=lambda line: None)
    wall = time.perf_counter() - start
    if phase is not None:
        phase.timing = False
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    epoch_s = sum(r["seconds"] for r in records)
    images = cfg.copies * RunDir(out / "run").load_state()["data"]["train_images"]  # cells: images an epoch
    steps_s = sum(images / r["images_per_s"] for r in records)
    parts: dict[str, float] = {}
    if phase is not None:
        measured = exclusive(phase.seconds)
        for name in STEP_PARTS + EPOCH_END_PARTS:
            if measured.get(name):
                parts[NAMES.get(name, name)] = measured[name] / epochs
        named_steps = sum(measured.get(p, 0.0) for p in STEP_PARTS)
        parts["step other"] = (steps_s - named_steps) / epochs
        end = sum(measured.get(p, 0.0) for p in EPOCH_END_PARTS if p != "checkpoint")  # after the record's clock
        parts["epoch end other"] = (epoch_s - steps_s - end) / epochs
        parts["prepare"] = measured.get("prepare", 0.0)  # once a run, not per epoch
    return {"epoch_s": epoch_s / epochs, "steps_s": steps_s / epochs, "wall_s": wall,
            "images_per_s": images / (epoch_s / epochs), "steps_images_per_s": images / (steps_s / epochs),
            "test_acc": result["test_acc"], "parts": parts, "tuned_read": records[-1].get("read")}


def median_row(runs: list[dict]) -> dict:
    keys = ("epoch_s", "steps_s", "wall_s", "images_per_s", "steps_images_per_s", "test_acc")
    row = {k: round(statistics.median(r[k] for r in runs), 3) for k in keys}
    names = sorted({p for r in runs for p in r["parts"]})
    row["parts"] = {p: round(statistics.median(r["parts"].get(p, 0.0) for r in runs), 3) for p in names}
    row["runs"] = [{k: r[k] for k in keys} for r in runs]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=CASES, help="data/encoder pairs: mnist|cifar10 / linear|conv1|cnn")
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--mnist-dir", default="../shared/data", help="folder holding MNIST/raw")
    ap.add_argument("--cifar10-dir", default=CIFAR10_DIR, help="CIFAR-10 in image-folder layout")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="results/profile_run.json")
    args = ap.parse_args()
    cases = args.cases.split(",")
    runs: dict[str, dict[str, list[dict]]] = {c: {h: [] for h in HEADS} for c in cases}
    with tempfile.TemporaryDirectory() as work:
        for r in range(args.rounds):
            for case in cases:
                for head in HEADS:  # alternating, so drifting load hits both alike
                    got = one_run(data_options(case, args), head, args.epochs, Path(work))
                    runs[case][head].append(got)
                    print(f"round {r + 1}/{args.rounds} {case:14s} {head:8s} epoch {got['epoch_s']:7.2f}s  steps "
                          f"{got['steps_s']:7.2f}s  test {got['test_acc']:.2f}", flush=True)
    report = {"epochs": args.epochs, "rounds": args.rounds, "quick": args.quick, "cases": {}}
    for case in cases:
        mem, soft = (median_row(runs[case][h]) for h in HEADS)
        ratios = [s["epoch_s"] / m["epoch_s"] for m, s in zip(runs[case]["memory"], runs[case]["softmax"])]
        step_ratios = [s["steps_s"] / m["steps_s"] for m, s in zip(runs[case]["memory"], runs[case]["softmax"])]
        bare_ratios = [(s["epoch_s"] - s["parts"].get("re-encode", 0.0) - s["parts"].get("rebuild", 0.0)) / m["epoch_s"]
                       for m, s in zip(runs[case]["memory"], runs[case]["softmax"])]
        report["cases"][case] = {
            "memory": mem, "softmax": soft,
            "throughput": {"ratio": round(statistics.median(ratios), 3),
                           "memory_images_per_s": mem["images_per_s"], "softmax_images_per_s": soft["images_per_s"],
                           "steps_ratio": round(statistics.median(step_ratios), 3),
                           # A softmax run also re-encodes its memory and rebuilds its index each epoch, so the
                           # run can be read as a memory too; a softmax classifier alone would not.
                           "ratio_softmax_without_memory_upkeep": round(statistics.median(bare_ratios), 3),
                           "memory_steps_images_per_s": mem["steps_images_per_s"],
                           "softmax_steps_images_per_s": soft["steps_images_per_s"]}}
    print_table(report)
    write_report(report, args.out)


def print_table(report: dict) -> None:
    for case, row in report["cases"].items():
        t = row["throughput"]
        print(f"\n{case}, {report['epochs']} epoch(s), median of {report['rounds']}: memory/softmax speed "
              f"{t['ratio']:.3f}x by epoch seconds, {t['steps_ratio']:.3f}x by steps; test "
              f"{row['memory']['test_acc']:.2f} / {row['softmax']['test_acc']:.2f}")
        names = sorted(set(row["memory"]["parts"]) | set(row["softmax"]["parts"]),
                       key=lambda p: -row["memory"]["parts"].get(p, 0.0))
        print(f"  {'part (s per epoch)':22s} {'memory':>8s} {'softmax':>8s}")
        for p in names:
            print(f"  {p:22s} {row['memory']['parts'].get(p, 0.0):8.3f} {row['softmax']['parts'].get(p, 0.0):8.3f}")
        print(f"  {'epoch (records)':22s} {row['memory']['epoch_s']:8.3f} {row['softmax']['epoch_s']:8.3f}")


if __name__ == "__main__":
    main()
