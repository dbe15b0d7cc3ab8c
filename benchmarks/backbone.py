"""A torchvision network as a memory classifier against the same network with a softmax head, on CIFAR-10.

    python benchmarks/backbone.py                                     # resnet18, the whole JPEG copy, EPOCHS each
    python benchmarks/backbone.py --max-seconds 3600                  # the same wall-clock budget for each head
    python benchmarks/backbone.py --per-class 30 --test-per-class 10 --epochs 1 --out results/backbone-tiny.json

Both cells train the same network (`--encoder resnet18`, its small-image stem at 32 x 32) from the same seed
for the same epochs (or seconds), each with its own default learning rate, through `sam_cls.fit`; the memory
cell's accuracy is the read it chose and stored at the end (and the read as trained beside it). Test accuracy
is the last epoch's, never a best-of-test pick. A cell whose run directory already holds a run is read back,
not trained again, so an interrupted benchmark resumes at the cell it stopped in.
Writes results/backbone.json (--out) and prints a table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from common import CIFAR10_DIR, write_report
from PIL import Image
from torchvision.datasets import ImageFolder

import sam_cls
from sam_cls.data import load_dataset

# ----------------------------------------------------------------------------- hyper-parameters, all here
NET = "resnet18"
EPOCHS = 10
BATCH = 128
DIM = 128  # embedding size (and the softmax cell's feature size: the same network)
TOPK = 256
SEED = 0
CELLS = {"memory": {"head": "memory"}, "softmax": {"head": "softmax"}}


def load_split(root: Path, split: str, per_class: int | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A split as uint8 (N, 32, 32, 3) and labels: all of it through sam-cls's decode cache, or the first
    `per_class` files of each class decoded here (a quick run need not decode 60,000 JPEGs)."""
    if per_class is None:
        data = load_dataset("imagefolder", root, log=print)
        x, y = (data.train_x, data.train_y) if split == "train" else (data.test_x, data.test_y)
        return x.permute(0, 2, 3, 1).numpy(), y.numpy(), data.classes
    folder = ImageFolder(str(root / split))  # lists the files only
    taken: dict[int, int] = {}
    images, labels = [], []
    for path, label in folder.samples:
        if taken.get(label, 0) < per_class:
            taken[label] = taken.get(label, 0) + 1
            with Image.open(path) as im:
                images.append(np.asarray(im.convert("RGB")))
            labels.append(label)
    return np.stack(images), np.array(labels), folder.classes


def run_cell(name: str, train, test, args) -> dict:
    out = Path(args.runs) / f"{args.net}-{name}"
    start = time.perf_counter()
    if (out / "checkpoint.pt").exists():
        print(f"{name}: reading the finished run in {out}")
        clf = sam_cls.load(out, device=args.device)
    else:
        options = {"epochs": args.epochs, "batch_size": BATCH, "dim": DIM, "seed": SEED, "device": args.device,
                   "topk": min(TOPK, len(train[1]) - 2), "out": str(out), **CELLS[name]}
        if args.max_seconds:
            options["max_seconds"] = args.max_seconds
        clf = sam_cls.fit(args.net, train, test, log=print, **options)
    last = clf.state["history"][-1]
    return {"cell": name, "head": CELLS[name]["head"], "test_acc": last["test_acc"],
            "test_acc_as_trained": last.get("test_acc_as_trained", last["test_acc"]), "epochs": last["epoch"],
            "train_seconds": round(clf.state["train_seconds"], 1), "seconds": round(time.perf_counter() - start, 1),
            "lr": clf.cfg.lr, "run_dir": str(out),
            "curve": [{"epoch": h["epoch"], "test_acc": h["test_acc"]} for h in clf.state["history"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=CIFAR10_DIR, help="CIFAR-10 in image-folder layout (train/, test/)")
    parser.add_argument("--net", default=NET, help="a torchvision classification model")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--max-seconds", type=float, default=None, help="the training budget of each cell")
    parser.add_argument("--per-class", type=int, default=None, help="train images a class (default: all)")
    parser.add_argument("--test-per-class", type=int, default=None, help="test images a class (default: all)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--runs", default="runs/backbone", help="where each cell's run directory goes")
    parser.add_argument("--out", default="results/backbone.json")
    args = parser.parse_args()
    torch.manual_seed(SEED)
    root = Path(args.data_dir)
    train_x, train_y, classes = load_split(root, "train", args.per_class)
    test_x, test_y, _ = load_split(root, "test", args.test_per_class)
    labels = [classes[i] for i in train_y], [classes[i] for i in test_y]  # names, so the runs keep them
    print(f"{args.net} on {root}: {len(train_y)} train, {len(test_y)} test images")
    rows = [run_cell(name, (train_x, labels[0]), (test_x, labels[1]), args) for name in CELLS]
    print(f"\n| {args.net} head | test accuracy % | as trained % | epochs | training s | wall s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['head']} | {r['test_acc']:.2f} | {r['test_acc_as_trained']:.2f} | {r['epochs']:g} | "
              f"{r['train_seconds']:.0f} | {r['seconds']:.0f} |")
    write_report({"net": args.net, "data_dir": str(root), "train_images": len(train_y), "test_images": len(test_y),
                  "epochs": args.epochs, "max_seconds": args.max_seconds, "batch_size": BATCH, "dim": DIM,
                  "seed": SEED, "cells": rows}, args.out)


if __name__ == "__main__":
    main()
