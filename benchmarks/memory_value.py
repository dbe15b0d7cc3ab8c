"""What the memory is worth: accuracy as it grows without training, with deformed copies, and with new classes.

    python benchmarks/memory_value.py                          # MNIST and the CIFAR-10 JPEG copy, ../shared/data
    python benchmarks/memory_value.py --parts grown --datasets mnist --quick     # a smoke run

Three parts, each per data set, conv1 throughout (2-core CPU):
  grown        conv1 trained on a seeded, class-stratified 10% of train; then the other 90% written into the
               memory by `add` in steps (to 25, 50, 100%), read by the run's stored (tuned) rule and as trained.
               Beside it, at each step, a softmax head refit on the same frozen encoder's embeddings with the same
               examples (L-BFGS logistic regression), and the encoder trained on 100% for the same epochs.
  copies       encoders trained on all of train without and with deformed queries (--deform-queries), each
               with a memory of 1, 10, 50 (167) copies an image (`rebuild-index --copies`), read by each rule,
               exactly (every cell scored) and through the index the run builds; distinct sources per read.
               --copy-kind / --copy-strength: which copies (sam_cls/copies.py; each row records its own).
  new-classes  benchmarks/new_classes.py's protocol (5 classes trained, n examples of 5 more added) read by each
               rule and by the tuned default, after the add's metric refit (sam_cls/read_map.py) and, for the
               tuned default, without it; against its fine-tuned head and a head refit with every old example
               replayed.
Writes results/memory_value.json and results/memory_value.png. --work keeps the trained runs for a re-run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch  # first: faiss imported after it shares torch's OpenMP runtime (sam_cls/index/_faiss.py)

# isort: split
import torch.nn.functional as F
from common import write_report
from new_classes import N_PER_CLASS, accuracies, examples, run_dataset
from PIL import Image

import sam_cls
from sam_cls.config import COPY_KINDS, make_config
from sam_cls.copies import CopyStyle, encode_cells
from sam_cls.data import load_dataset
from sam_cls.evaluate import CellFacts, classify, encode_all
from sam_cls.index import build_index
from sam_cls.memory import MemoryBank
from sam_cls.read import ReadRule, rule_log_probs
from sam_cls.run import tune_run
from sam_cls.setup import index_params
from sam_cls.train import train

# ----------------------------------------------------------------------------- hyper-parameters, all here
SEED = 0
START_SHARE, GROWN_SHARES = 0.1, (0.1, 0.25, 0.5, 1.0)  # the memory trained on 10%, then grown by add
EPOCHS = {"mnist": 3, "cifar10": 10}  # as benchmarks/new_classes.py: the conv1 runs' plateau
SMALL_EPOCHS = {"mnist": 10, "cifar10": 20}  # the 10% run sees as many steps as it usefully can
DEFORM_SHARE = 0.5  # --deform-queries of the deformed-query encoders
COPIES = "1,10,50"  # --copies; 167 on MNIST makes 1e7 cells (benchmarks/large_memory.py's largest)
POOL = 1024  # exact reads: each test image's nearest cells (and source images) kept for every rule
HEAD_ITERS = 200  # L-BFGS iterations of a refit head
THIN_SHARES, THIN_CELLS = (0.1, 0.5), 100  # --thin-classes / --thin-cells of the new-classes part's thinned runs


def rules(base: ReadRule, tuned: ReadRule, copies: int = 1) -> dict[str, ReadRule]:
    """The read rules compared: as trained, the class prior, per-class and per-source reads, and the tuned one."""
    out = {"as trained": base, "balanced (alpha 1)": replace(base, alpha=1.0),
           "per-class k 16": replace(base, class_k=16), "per-class k 16, alpha 0.25": replace(base, class_k=16,
                                                                                               alpha=0.25),
           "tuned (default)": tuned}
    if copies > 1:
        out["one vote per source"] = replace(base, per_source=True)
    return out


def stratified(labels: torch.Tensor, share: float, seed: int) -> torch.Tensor:
    """A seeded random share of each class's indices, as one sorted index tensor."""
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().squeeze(1)
        picks.append(idx[torch.randperm(len(idx), generator=g)[: round(share * len(idx))]])
    return torch.cat(picks).sort().values


def write_folder(data, train_idx: torch.Tensor, root: Path) -> Path:
    """train_idx of train and all of test as an image folder (PNG, lossless): what `sam-cls train` reads."""
    if (root / "done").exists():
        return root
    for split, x, y, idx in (("train", data.train_x, data.train_y, train_idx),
                             ("test", data.test_x, data.test_y, torch.arange(len(data.test_y)))):
        for i in idx.tolist():
            folder = root / split / data.classes[int(y[i])]
            folder.mkdir(parents=True, exist_ok=True)
            image = x[i].permute(1, 2, 0).numpy()
            Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(folder / f"{i:05d}.png")
    (root / "done").touch()
    return root


def trained_run(work: Path, name: str, folder: Path | None, dataset: str, data_dir: str, epochs: int,
                **options) -> tuple[Path, float]:
    """A conv1 memory run (trained now, or kept from --work) and its training seconds."""
    out = work / name
    if (out / "checkpoint.pt").is_file():  # kept from an earlier run: finished, or continued to its end here
        clf = sam_cls.load(out, device="cpu")
        if clf.run.load_metrics()[-1]["epoch"] < epochs:
            from sam_cls.train import resume

            resume(str(out), log=lambda line: None)
            clf = sam_cls.load(out, device="cpu")
        metrics = clf.run.load_metrics()
        # Its read chosen again, as this version's training would store it.
        stored = clf.state.get("read", {}).get("rule")
        tune_run(clf, None, log=lambda line: None)
        if clf.state["read"]["rule"] != stored:
            clf.save()
        return out, sum(r["seconds"] for r in metrics)
    cfg = make_config(None, dataset=dataset, data_dir=str(folder or data_dir), encoder="conv1", epochs=epochs,
                      seed=SEED, device="cpu", out=str(out), **options)
    start = time.perf_counter()
    result = train(cfg, log=lambda line: None)
    seconds = time.perf_counter() - start
    print(f"{name}: {result['test_acc']}% after {epochs} epochs, {seconds:.0f}s", flush=True)
    return out, seconds


def refit_head(x: torch.Tensor, y: torch.Tensor, classes: int) -> torch.nn.Linear:
    """Multinomial logistic regression on frozen features (L-BFGS, as scikit-learn's default solver)."""
    torch.manual_seed(SEED)
    layer = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.LBFGS(layer.parameters(), max_iter=HEAD_ITERS, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(layer(x), y) + 1e-4 * layer.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return layer


def full_dataset(name: str, data_dir: str) -> tuple[str, str]:
    """(--dataset, --data-dir) of all of a data set's train split."""
    return ("mnist", data_dir) if name == "mnist" else ("imagefolder", str(Path(data_dir) / "cifar10-jpeg"))


def as_trained(clf) -> ReadRule:
    return ReadRule(clf.cfg.topk, clf.cfg.temperature)


def test_truth(clf, data) -> torch.Tensor:
    names = {name: i for i, name in enumerate(clf.classes)}
    return torch.tensor([names[c] for c in data.classes])[data.test_y]


def percent(log_probs: torch.Tensor, truth: torch.Tensor) -> float:
    return round(100.0 * (log_probs.argmax(1) == truth).float().mean().item(), 3)


# ----------------------------------------------------------------------------- part 1: grown without training
def grown(name: str, data, data_dir: str, work: Path, quick: bool) -> list[dict]:
    small_idx = stratified(data.train_y, START_SHARE, SEED)
    folder = write_folder(data, small_idx, work / f"{name}-10pc")
    epochs = 1 if quick else SMALL_EPOCHS[name]
    run, small_seconds = trained_run(work, f"{name}-10pc-run", folder, "imagefolder", data_dir, epochs)
    full_epochs = 1 if quick else EPOCHS[name]
    full_data = full_dataset(name, data_dir)
    full, full_seconds = trained_run(work, f"{name}-full-run", None, full_data[0], full_data[1], full_epochs)
    full_clf = sam_cls.load(full, device="cpu")
    full_acc = percent(full_clf.read(full_clf.encode(data.test_x)), test_truth(full_clf, data))
    clf = sam_cls.load(run, device="cpu")
    truth = test_truth(clf, data)
    u_test = clf.encode(data.test_x)
    rest = torch.ones(len(data.train_y), dtype=torch.bool)
    rest[small_idx] = False
    order = rest.nonzero().squeeze(1)[torch.randperm(int(rest.sum()), generator=torch.Generator().manual_seed(SEED))]
    rows, held = [], small_idx
    for share in GROWN_SHARES:
        target = round(share * len(data.train_y))
        new = order[: max(0, target - len(held))]
        order = order[len(new):]
        start = time.perf_counter()
        if len(new):
            clf.add(data.train_x[new], [data.classes[int(c)] for c in data.train_y[new]])
        add_seconds = time.perf_counter() - start
        held = torch.cat([held, new])
        start = time.perf_counter()
        feats = clf.encode(data.train_x[held])  # the head's features: the same frozen encoder's embeddings
        head = refit_head(feats, torch.tensor([clf.classes.index(data.classes[int(c)]) for c in data.train_y[held]]),
                          len(clf.classes))
        head_seconds = time.perf_counter() - start
        with torch.no_grad():
            head_acc = percent(head(u_test), truth)
        row = {"dataset": name, "share": share, "cells": clf.memory.size, "memory_tuned": percent(clf.read(u_test), truth),
               "memory_as_trained": percent(clf.read(u_test, **as_trained(clf).as_dict()), truth),
               "head_refit": head_acc, "add_seconds": round(add_seconds, 3), "head_seconds": round(head_seconds, 3),
               "read": clf.rule.as_dict(), "trained_on_100pc": full_acc, "train_seconds_10pc": round(small_seconds, 1),
               "train_seconds_100pc": round(full_seconds, 1)}
        rows.append(row)
        print(row, flush=True)
    return rows


# ----------------------------------------------------------------------------- part 2: copies
@torch.no_grad()
def exact_pools(u: torch.Tensor, cells: torch.Tensor, n_images: int, chunk: int = 512):
    """Each query's POOL best cells and POOL best source images (a source's score: its best copy), exactly."""
    top_s, top_i, src_s, src_i = [], [], [], []
    copies = len(cells) // n_images
    for q in range(0, len(u), chunk):
        block = u[q : q + chunk]
        best_s = torch.full((len(block), 0), float("-inf"))
        best_i = torch.zeros((len(block), 0), dtype=torch.long)
        per_source = torch.full((len(block), n_images), float("-inf"))
        for c in range(copies):  # copy c's cells are rows c * n .. (c + 1) * n - 1
            s = block @ cells[c * n_images : (c + 1) * n_images].T
            torch.maximum(per_source, s, out=per_source)
            k = min(POOL, s.shape[1])
            v, i = s.topk(k, dim=1)
            merged_s, pick = torch.cat([best_s, v], 1).topk(min(POOL, best_s.shape[1] + k), dim=1)
            best_i = torch.cat([best_i, i + c * n_images], 1).gather(1, pick)
            best_s = merged_s
        v, i = per_source.topk(min(POOL, n_images), dim=1)
        top_s.append(best_s), top_i.append(best_i), src_s.append(v), src_i.append(i)
    return torch.cat(top_s), torch.cat(top_i), torch.cat(src_s), torch.cat(src_i)


def copies_part(name: str, data, data_dir: str, work: Path, quick: bool, copies_list,
                style: CopyStyle) -> list[dict]:
    full_data = full_dataset(name, data_dir)
    epochs = 1 if quick else EPOCHS[name]
    rows = []
    for queries, options in (("plain", {}), ("deformed", {"deform_queries": DEFORM_SHARE})):
        run, seconds = trained_run(work, f"{name}-full-run" if not options else f"{name}-deformed-run", None,
                                   full_data[0], full_data[1], epochs, **options)
        clf = sam_cls.load(run, device="cpu")
        truth = test_truth(clf, data).to(torch.long)
        u = clf.encode(data.test_x)
        n = len(data.train_y)
        cells = clf.memory.embeddings[clf.memory.rows]  # cell order: copy c of image e is row c * n + e
        labels = data.train_y.repeat(max(copies_list))
        for copies in copies_list:
            if copies > 1:
                start = time.perf_counter()
                more = encode_cells(clf.encoder, data.train_x, copies, SEED, 1024, start=len(cells), style=style)
                cells = torch.cat([cells, more])
                print(f"{name} {queries}: {copies} copies encoded in {time.perf_counter() - start:.0f}s", flush=True)
            memory = cells[: copies * n]
            cell_labels = labels[: copies * n]
            origins = torch.arange(copies * n) % n
            tuned = ReadRule.from_dict(clf.state["read"]["rule"]) if "read" in clf.state else ReadRule(256, 0.05)
            start = time.perf_counter()
            top_s, top_i, src_s, src_i = exact_pools(u, memory, n)
            exact_seconds = time.perf_counter() - start
            facts = CellFacts.of(cell_labels, len(clf.classes), origins)
            index_cfg = replace(clf.cfg, copies=copies)
            start = time.perf_counter()
            bank = MemoryBank(memory, cell_labels)
            index = build_index(bank.embeddings, index_params(index_cfg, torch.device("cpu")), k=256, calibrate=True)
            build_seconds = time.perf_counter() - start
            # Distinct source images among the exact top 256 cells of each test image.
            distinct = torch.tensor([len(torch.unique(o)) for o in origins[top_i[:, :256]]]).float()
            for rule_name, rule in rules(as_trained(clf), tuned, copies).items():
                if rule.per_source:  # the pool of best sources: each entry a distinct image
                    exact = rule_log_probs(src_s, data.train_y[src_i], replace(rule, per_source=False),
                                           len(clf.classes), None, facts.class_sources)
                else:
                    exact = rule_log_probs(top_s, cell_labels[top_i], rule, len(clf.classes), None,
                                           facts.counts(rule))
                start = time.perf_counter()
                read = torch.cat([classify(u[i : i + 1024], bank, index, rule, len(clf.classes), facts)[0]
                                  for i in range(0, len(u), 1024)])
                read_seconds = time.perf_counter() - start
                row = {"dataset": name, "queries": queries, "copies": copies, "copy_kind": style.kind,
                       "copy_strength": style.strength, "cells": len(memory), "rule": rule_name,
                       "read": rule.as_dict(), "exact_acc": percent(exact, truth), "index_acc": percent(read, truth),
                       "index": index.description, "build_seconds": round(build_seconds, 1),
                       "index_read_seconds": round(read_seconds, 2), "exact_pool_seconds": round(exact_seconds, 1),
                       "distinct_sources_median": float(distinct.median()), "distinct_sources_min": float(distinct.min()),
                       "train_seconds": round(seconds, 1)}
                rows.append(row)
                print(row, flush=True)
            del index, bank
    return rows


# ----------------------------------------------------------------------------- part 3: new classes
def new_classes_part(name: str, data, work: Path, quick: bool) -> list[dict]:
    epochs = 1 if quick else EPOCHS[name]
    rows, _ = run_dataset(name, data, epochs, work / "new-classes", 2000 if quick else None)  # trains or reuses
    old, new = list(range(5)), list(range(5, 10))
    run = work / "new-classes" / f"{name}-memory"
    base = sam_cls.load(run, device="cpu")
    if "read" not in base.state:  # a run trained before reads were tuned: tune it as `evaluate --tune` would
        tune_run(base, None, log=lambda line: None)
        base.save()
    # The same five classes trained with thinned steps (--thin-classes): the encoder learns to read a class of a
    # few cells, as an added class is read.
    runs, train_seconds = {"memory-add": run}, {}
    for share in THIN_SHARES:
        method = f"memory-add-thinned-{share}"
        runs[method], train_seconds[method] = trained_run(work / "new-classes", f"{name}-memory-thinned-{share}",
                                                    work / "new-classes" / f"{name}-old", "imagefolder", "", epochs,
                                                    thin_classes=share, thin_cells=THIN_CELLS)
    out = [r for r in rows if r["method"] == "softmax-finetune"]
    soft = sam_cls.load(work / "new-classes" / f"{name}-softmax", device="cpu").encoder
    train_feats, test_feats = (encode_all(soft, x, 1024, fn=soft.features) for x in (data.train_x, data.test_x))
    for n in N_PER_CLASS:
        picks = examples(data, new, n, SEED)
        # The default add refits the metric where it reads held-out cells better (sam_cls/read_map.py); beside it
        # the same add with the encoder as trained.
        for method, path, refit in (*((m, p, True) for m, p in runs.items()), ("memory-add-no-refit", run, False)):
            clf = sam_cls.load(path, device="cpu")
            start = time.perf_counter()
            clf.add(data.train_x[picks], [data.classes[int(c)] for c in data.train_y[picks]], refit=refit)
            add_seconds = time.perf_counter() - start  # encoding, writing, the refit if any, the read tuned again
            refitted = clf.records[-1].get("refit")
            u = clf.encode(data.test_x)
            for rule_name, rule in rules(as_trained(clf), clf.rule).items():
                if method == "memory-add-no-refit" and rule_name != "tuned (default)":
                    continue  # the fixed rules of the encoder as trained: as the rows of before the refit
                predicted = [clf.classes[int(i)] for i in clf.read(u, **rule.as_dict()).argmax(1)]
                out.append({"dataset": name, "method": method, "read_rule": rule_name, "read": rule.as_dict(),
                            "n_per_class": n or "all", **accuracies(predicted, data, old)})
                if method in train_seconds:
                    out[-1]["train_seconds"] = round(train_seconds[method], 1)
                if rule_name == "tuned (default)":
                    out[-1]["add_seconds"] = round(add_seconds, 2)
                if refitted and rule_name == "tuned (default)":
                    out[-1]["refit"] = {k: refitted[k] for k in ("kept", "step_share", "small_before", "small_after",
                                                                 "others_before", "others_after") if k in refitted}
                print(out[-1], flush=True)
        # A head refit from scratch on the softmax network's frozen features: every old example replayed.
        replay = torch.cat([examples(data, old, None, SEED), picks])
        start = time.perf_counter()
        head = refit_head(train_feats[replay], data.train_y[replay], len(data.classes))
        seconds = time.perf_counter() - start
        with torch.no_grad():
            predicted = [data.classes[int(i)] for i in head(test_feats).argmax(1)]
        out.append({"dataset": name, "method": "softmax-replay-refit", "n_per_class": n or "all",
                    **accuracies(predicted, data, old), "seconds": round(seconds, 2)})
        print(out[-1], flush=True)
    for r in out:
        r["harmonic"] = round(2 * r["old_acc"] * r["new_acc"] / max(1e-9, r["old_acc"] + r["new_acc"]), 3)
    return out


# ----------------------------------------------------------------------------- report
def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name in sorted({r["dataset"] for r in report.get("grown", [])}):
        pts = [r for r in report["grown"] if r["dataset"] == name]
        x = [100 * r["share"] for r in pts]
        axes[0].plot(x, [r["memory_tuned"] for r in pts], "-o", label=f"{name} memory (add)")
        axes[0].plot(x, [r["head_refit"] for r in pts], "--s", label=f"{name} head refit")
    axes[0].set_xlabel("% of train in the memory (encoder trained on 10%)")
    axes[0].set_ylabel("test accuracy (%)")
    families = {(r["dataset"], r["queries"], CopyStyle.of(r)) for r in report.get("copies", [])}
    for (name, queries, style) in sorted(families, key=lambda f: (f[0], f[1], f[2].kind, f[2].strength)):
        pts = [r for r in report["copies"] if r["dataset"] == name and r["queries"] == queries
               and CopyStyle.of(r) in (style, CopyStyle())]  # one copy is the same memory in every style
        best = {}
        for r in pts:
            best[r["copies"]] = max(best.get(r["copies"], 0), r["exact_acc"])
        label = f"{name}, {queries} queries" + ("" if style == CopyStyle() else f", {style.kind} {style.strength:g}")
        axes[1].plot(sorted(best), [100 - best[c] for c in sorted(best)], "-o", label=label)
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("copies an image (best rule, exact read)")
    axes[1].set_ylabel("test error (%)")
    for name in sorted({r["dataset"] for r in report.get("new_classes", [])}):
        for method, rule, style in (("memory-add", "tuned (default)", "-o"), ("memory-add", "as trained", ":o"),
                                    ("memory-add-no-refit", "tuned (default)", "-x"),
                                    *((f"memory-add-thinned-{share}", "tuned (default)", "-D") for share in THIN_SHARES),
                                    ("softmax-finetune", None, "--s"), ("softmax-replay-refit", None, "-.^")):
            pts = [r for r in report["new_classes"] if r["dataset"] == name and r["method"] == method
                   and r.get("read_rule") == rule]
            axes[2].plot(range(len(pts)), [r["harmonic"] for r in pts], style,
                         label=f"{name} {method}" + (f" ({rule})" if rule else ""))
    axes[2].set_xticks(range(len(N_PER_CLASS)), [str(n or "all") for n in N_PER_CLASS])
    axes[2].set_xlabel("examples per new class")
    axes[2].set_ylabel("harmonic mean of old and new accuracy (%)")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def kept_from(before: dict, parts: list[str], datasets: list[str], copies: list[int], style: CopyStyle) -> dict:
    """The rows of an earlier report that this run does not measure again, each with the command that made it."""
    def again(key: str, row: dict) -> bool:
        return key in parts and row["dataset"] in datasets and (
            key != "copies" or (row["copies"] in copies and CopyStyle.of(row) == style))

    return {key: [{"command": before["command"], **r} for r in before.get(key, []) if not again(key, r)]
            for key in ("grown", "copies", "new_classes")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data", help="holds MNIST/raw and cifar10-jpeg/")
    parser.add_argument("--datasets", default="mnist,cifar10")
    parser.add_argument("--parts", default="new-classes,grown,copies")
    parser.add_argument("--copies", default=COPIES, help="memories of copies to read, e.g. 1,10,50,167")
    parser.add_argument("--copy-kind", default="elastic", choices=COPY_KINDS, help="what a copy is")
    parser.add_argument("--copy-strength", type=float, default=1.0, help="scales the copies' deformation")
    parser.add_argument("--quick", action="store_true", help="one epoch a run: a smoke run")
    parser.add_argument("--out", default="results/memory_value.json")
    parser.add_argument("--work", help="keep the trained runs here and reuse them (default: a temporary folder)")
    args = parser.parse_args()
    parts, report = args.parts.split(","), {"grown": [], "copies": [], "new_classes": []}
    out = Path(args.out)
    copies = [int(c) for c in args.copies.split(",")]
    style = CopyStyle(args.copy_kind, args.copy_strength)
    if out.is_file():  # a partial re-run replaces only the parts and data sets it measures
        report = kept_from(json.loads(out.read_text()), [p.replace("-", "_") for p in parts],
                           args.datasets.split(","), copies, style)
    report["settings"] = {"epochs": EPOCHS, "small_epochs": SMALL_EPOCHS, "deform_queries": DEFORM_SHARE,
                          "pool": POOL, "head_iters": HEAD_ITERS, "quick": args.quick,
                          "thin_classes": THIN_SHARES, "thin_cells": THIN_CELLS}
    steps = {"new-classes": ("new_classes", lambda name, data, work: new_classes_part(name, data, work, args.quick)),
             "grown": ("grown", lambda name, data, work: grown(name, data, args.data_dir, work, args.quick)),
             "copies": ("copies", lambda name, data, work: copies_part(name, data, args.data_dir, work, args.quick,
                                                                      copies, style))}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        for name in args.datasets.split(","):
            data = (load_dataset("mnist", args.data_dir, download=False) if name == "mnist" else
                    load_dataset("imagefolder", Path(args.data_dir) / "cifar10-jpeg"))
            for part in parts:
                key, run_part = steps[part]
                report[key] += [{"command": shlex.join(["python", *sys.argv]), **r} for r in run_part(name, data, work)]
                write_report(report, out, quiet=True)  # each part as it ends: a long run keeps what it measured
    plot(report, out.with_suffix(".png"))
    write_report(report, out)

if __name__ == "__main__":
    main()
