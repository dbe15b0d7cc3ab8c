"""New classes without retraining: a memory classifier told of them by `add`, against a fine-tuned softmax head.

    python benchmarks/new_classes.py                       # MNIST and the CIFAR-10 JPEG copy, ../shared/data
    python benchmarks/new_classes.py --quick               # MNIST only, one short epoch: a smoke run

For each data set, conv1 trains on its first five classes only (old), twice: as sam-cls's memory classifier
and as the same network with a softmax head. Then, with no gradient step, n training examples of each of the
five held-out classes (new) are written into the memory (MemoryClassifier.add), for each n in N_PER_CLASS.
The softmax network instead gets a new 10-way output layer (old rows copied, new rows zero), fine-tuned on
frozen features with the same n examples of each new class and n of each old class (so the old rows are not
simply forgotten), FINETUNE_STEPS full-batch SGD steps. Test accuracy on old classes, new classes and all,
and the seconds each took (add: encoding and writing; fine-tune: feature extraction and the steps). Last,
the memory holding every example forgets one old class: its test images must never be predicted as it, and
the other classes' accuracy must move by at most 0.1 point.
Writes results/new_classes.json and results/new_classes.png.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch  # first: faiss imported after it shares torch's OpenMP runtime (sam_cls/index/_faiss.py)

# isort: split
import numpy as np
import torch.nn.functional as F
from common import write_report
from PIL import Image

import sam_cls
from sam_cls.checkpoint import RunDir
from sam_cls.config import make_config
from sam_cls.data import load_dataset
from sam_cls.evaluate import encode_all
from sam_cls.read import ReadRule
from sam_cls.train import train

# ----------------------------------------------------------------------------- hyper-parameters, all here
N_PER_CLASS = (1, 5, 20, 100, None)  # None: every training example of the class
EPOCHS = {"mnist": 3, "cifar10": 10}  # the seed table's conv1 runs reach their plateau in about these
FINETUNE_STEPS, FINETUNE_LR = 200, 0.1  # full-batch SGD on the new output layer; more steps changed nothing
SEED = 0
QUICK_TRAIN = 2000  # --quick: old-class training images


def old_class_folder(data, old: list[int], root: Path, limit: int | None) -> Path:
    """The old classes' images in image-folder layout (PNG, lossless): what `sam-cls train` trains on."""
    for split, x, y in (("train", data.train_x, data.train_y), ("test", data.test_x, data.test_y)):
        keep = torch.isin(y, torch.tensor(old)).nonzero().squeeze(1)
        keep = keep[:limit] if limit and split == "train" else keep
        for i in keep.tolist():
            folder = root / split / data.classes[int(y[i])]
            folder.mkdir(parents=True, exist_ok=True)
            image = x[i].permute(1, 2, 0).numpy()
            Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(folder / f"{i:05d}.png")
    return root


def examples(data, classes: list[int], n: int | None, seed: int) -> torch.Tensor:
    """n training indices of each class (all with None), in a seeded random order."""
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for c in classes:
        idx = (data.train_y == c).nonzero().squeeze(1)
        picks.append(idx[torch.randperm(len(idx), generator=gen)][:n])
    return torch.cat(picks)


def accuracies(predicted_names: list[str], data, old: list[int]) -> dict:
    truth = [data.classes[int(c)] for c in data.test_y]
    is_old = torch.isin(data.test_y, torch.tensor(old))
    right = torch.tensor([p == t for p, t in zip(predicted_names, truth, strict=True)])
    return {"old_acc": round(100 * right[is_old].float().mean().item(), 3),
            "new_acc": round(100 * right[~is_old].float().mean().item(), 3),
            "all_acc": round(100 * right.float().mean().item(), 3)}


def memory_rows(name: str, run: Path, data, old: list[int], new: list[int]) -> tuple[list[dict], dict]:
    rows = []
    for n in N_PER_CLASS:
        clf = sam_cls.load(run, device="cpu")
        # The read training made (a run also stores a tuned read: benchmarks/memory_value.py compares the rules).
        as_trained = ReadRule(clf.cfg.topk, clf.cfg.temperature).as_dict()
        picks = examples(data, new, n, SEED)
        start = time.perf_counter()
        # The encoder as trained (benchmarks/memory_value.py measures the add's metric refit beside it).
        clf.add(data.train_x[picks], [data.classes[int(c)] for c in data.train_y[picks]], refit=False)
        seconds = time.perf_counter() - start
        u = clf.encode(data.test_x)
        for read, balanced in (("as trained", False), ("class-balanced", True)):
            predicted = [clf.classes[int(i)] for i in clf.read(u, balanced=balanced, **as_trained).argmax(1)]
            rows.append({"dataset": name, "method": "memory-add", "read": read, "n_per_class": n or "all",
                         "added": len(picks), **accuracies(predicted, data, old), "seconds": round(seconds, 3)})
            print(rows[-1])
    # Forget one old class from the memory that holds every example (the read as trained: all classes are
    # about equally large there).
    forgotten, truth = data.classes[old[0]], [data.classes[int(c)] for c in data.test_y]
    before = [clf.classes[int(i)] for i in clf.read(u, **as_trained).argmax(1)]
    start = time.perf_counter()
    cells = clf.forget(class_name=forgotten)
    seconds = time.perf_counter() - start
    after = [clf.classes[int(i)] for i in clf.read(u, **as_trained).argmax(1)]
    others = [i for i, t in enumerate(truth) if t != forgotten]
    # Images the forgotten class had not claimed: only their neighbours' weights can move them.
    unclaimed = [i for i in others if before[i] != forgotten]

    def acc(pred: list[str], rows: list[int]) -> float:
        return round(100 * sum(pred[i] == truth[i] for i in rows) / len(rows), 3)

    forget = {"dataset": name, "class": forgotten, "cells": cells, "seconds": round(seconds, 3),
              "predicted_as_forgotten": sum(p == forgotten for p in after),
              "other_acc_before": acc(before, others), "other_acc_after": acc(after, others),
              "unclaimed_acc_before": acc(before, unclaimed), "unclaimed_acc_after": acc(after, unclaimed),
              "unclaimed_changed": sum(before[i] != after[i] for i in unclaimed), "unclaimed": len(unclaimed)}
    forget["other_acc_change"] = round(forget["other_acc_after"] - forget["other_acc_before"], 3)
    print(forget)
    return rows, forget


def softmax_rows(name: str, run: Path, data, old: list[int], new: list[int], train_seconds: float) -> list[dict]:
    clf = sam_cls.load(run, device="cpu")  # the softmax run: its encoder has a head over the old classes
    encoder, head = clf.encoder, clf.encoder.head
    features = lambda x: encode_all(encoder, x, 1024, fn=encoder.features)
    test_features = features(data.test_x)
    rows = []
    for n in N_PER_CLASS:
        torch.manual_seed(SEED)
        start = time.perf_counter()
        picks = examples(data, old + new, n, SEED)
        x, y = features(data.train_x[picks]), data.train_y[picks]
        layer = torch.nn.Linear(head.in_features, len(data.classes))
        with torch.no_grad():  # old rows as trained, new rows from zero
            layer.weight.zero_()
            layer.bias.zero_()
            layer.weight[old], layer.bias[old] = head.weight, head.bias
        opt = torch.optim.SGD(layer.parameters(), lr=FINETUNE_LR, momentum=0.9)
        for _ in range(FINETUNE_STEPS):
            opt.zero_grad()
            F.cross_entropy(layer(x), y).backward()
            opt.step()
        seconds = time.perf_counter() - start
        with torch.no_grad():
            predicted = [data.classes[int(i)] for i in layer(test_features).argmax(1)]
        rows.append({"dataset": name, "method": "softmax-finetune", "n_per_class": n or "all",
                     "added": int((torch.isin(y, torch.tensor(new))).sum()), **accuracies(predicted, data, old),
                     "seconds": round(seconds, 3), "finetune_steps": FINETUNE_STEPS,
                     "base_train_seconds": round(train_seconds, 1)})
        print(rows[-1])
    return rows


def run_dataset(name: str, data, epochs: int, work: Path, limit: int | None) -> tuple[list[dict], dict]:
    old, new = list(range(5)), list(range(5, 10))
    folder = work / f"{name}-old"
    if not folder.is_dir():
        old_class_folder(data, old, folder, limit)
    trained = {}
    for head in ("memory", "softmax"):
        if (work / f"{name}-{head}" / "checkpoint.pt").is_file():  # kept from an earlier run (--work)
            trained[head] = sum(r["seconds"] for r in RunDir(work / f"{name}-{head}").load_metrics())
            continue
        cfg = make_config(None, dataset="imagefolder", data_dir=str(folder), encoder="conv1", epochs=epochs,
                          head=head, seed=SEED, device="cpu", out=str(work / f"{name}-{head}"))
        start = time.perf_counter()
        result = train(cfg, log=lambda line: None)
        trained[head] = time.perf_counter() - start
        print(f"{name} {head}: {result['test_acc']}% on the old classes after {epochs} epochs, {trained[head]:.0f}s")
    rows, forget = memory_rows(name, work / f"{name}-memory", data, old, new)
    forget["memory_train_seconds"] = round(trained["memory"], 1)
    rows += softmax_rows(name, work / f"{name}-softmax", data, old, new, trained["softmax"])
    return rows, forget


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for dataset in sorted({r["dataset"] for r in rows}):
        for method, read, style in (("memory-add", "class-balanced", "-o"), ("memory-add", "as trained", ":o"),
                                    ("softmax-finetune", None, "--s")):
            pts = [r for r in rows if r["dataset"] == dataset and r["method"] == method and r.get("read") == read]
            label = f"{dataset} {method}" + (f" ({read})" if read else "")
            ax.plot([r["added"] / 5 for r in pts], [r["new_acc"] for r in pts], style, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("examples per new class")
    ax.set_ylabel("test accuracy on the new classes (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data", help="holds MNIST/raw and cifar10-jpeg/")
    parser.add_argument("--datasets", default="mnist,cifar10")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="results/new_classes.json")
    parser.add_argument("--work", help="keep the trained runs here and reuse them (default: a temporary folder)")
    args = parser.parse_args()
    names = ["mnist"] if args.quick else args.datasets.split(",")
    rows, forgets = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        for name in names:
            data = (load_dataset("mnist", args.data_dir, download=False) if name == "mnist" else
                    load_dataset("imagefolder", Path(args.data_dir) / "cifar10-jpeg"))
            epochs = 1 if args.quick else EPOCHS[name]
            got, forget = run_dataset(name, data, epochs, work, QUICK_TRAIN if args.quick else None)
            rows += got
            forgets.append({**forget, "epochs": epochs})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, out.with_suffix(".png"))
    write_report({"rows": rows, "forget": forgets, "n_per_class": [n or "all" for n in N_PER_CLASS],
                  "finetune": {"steps": FINETUNE_STEPS, "lr": FINETUNE_LR, "features": "frozen"}}, out)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
