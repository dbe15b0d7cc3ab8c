"""The seed paper's table 1, re-measured: kNN on pixels, the seed's support-sample method, sam-cls, softmax.

    python benchmarks/table1.py --data-dir ../data            # MNIST, CIFAR-10, CIFAR-100 where present
    python benchmarks/table1.py --data-dir ../data --quick    # MNIST only, one epoch a cell: a few minutes
    python benchmarks/table1.py --cells softmax-cnn           # these learned cells only, into the committed table

Per data set, in one run on one machine:
  knn, knn-pca30       FAISS exact L2 kNN on raw pixels (and on their 30-dim PCA); k chosen on a validation split
  sam-cls              sparse memory (K = 256) with the linear, conv1 and cnn encoders
  softmax              the linear, conv1 and cnn encoders trained as plain softmax classifiers (parametric reference)
  seed-support-sample  the seed's method (conv1, M = 10^4 support images re-encoded every batch), given the
                       wall-clock seconds the sam-cls conv1 cell took, and reported at that budget
Each learned cell trains from its config in configs/table1/ (same epochs within a data set); test accuracy is
the last epoch's, never a best-of-test pick. Cells run one after another (never two at once) and each
finished cell is kept in its run directory, so an interrupted benchmark resumes where it stopped.
Writes results/table1.json (results/table1-quick.json with --quick), accuracy-versus-epoch plots, and with a
full run docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from common import write_report

# isort: split
import faiss  # after torch (common.py says why)
import faiss.contrib.torch_utils

from sam_cls.checkpoint import RunDir
from sam_cls.config import make_config
from sam_cls.data import load_dataset, split_validation
from sam_cls.train import train

# ----------------------------------------------------------------------------- hyper-parameters, all here
ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "table1"
KNN_KS = (1, 3, 5, 7, 9, 15, 21)  # candidates for k, chosen on the validation split
VALIDATION = 0.1  # share of train held out to choose k
PCA_DIM = 30  # the seed's CIFAR-10 kNN baseline: PCA to 30 dimensions
SEED = 0
# (method, encoder, config name); the seed's cell last: its budget is the sam-cls conv1 cell's seconds.
CELLS = [
    ("sam-cls", "linear", "samcls-linear"),
    ("sam-cls", "conv1", "samcls-conv1"),
    ("softmax", "linear", "softmax-linear"),
    ("softmax", "conv1", "softmax-conv1"),
    ("sam-cls", "cnn", "samcls-cnn"),
    ("softmax", "cnn", "softmax-cnn"),
    ("seed-support-sample", "conv1", "seed-conv1"),
]
# The seed paper's numbers (test accuracy %), shown beside ours.
PAPER = {
    ("knn", "pixels"): {"mnist": 98.90, "cifar10": None, "cifar100": 7.6},
    ("knn-pca30", "pixels"): {"mnist": None, "cifar10": 41.78, "cifar100": None},
    ("seed-support-sample", "linear"): {"mnist": 97.76, "cifar10": 38.55, "cifar100": 19.85},
    ("seed-support-sample", "conv1"): {"mnist": 98.87, "cifar10": 62.69, "cifar100": 31.70},
}
PAPER_NOTES = {"mnist": "the paper's MNIST kNN uses tangent distance; ours is Euclidean"}
TITLES = {"mnist": "MNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
CNN_TARGETS = {"mnist": 99.5, "cifar10": 85.0}  # what the deeper encoder should reach on a CPU


def data_source(name: str, data_dir: Path) -> tuple[str, str, str] | None:
    """(dataset option, data dir, label) for a data set, or None where its files are absent."""
    if name == "mnist":
        return ("mnist", str(data_dir), "MNIST") if (data_dir / "MNIST").is_dir() else None
    if name == "cifar10":
        if (data_dir / "cifar-10-batches-py").is_dir():
            return "cifar10", str(data_dir), "CIFAR-10"
        jpeg = data_dir / "cifar10-jpeg"
        return ("imagefolder", str(jpeg), "CIFAR-10 (JPEG copy)") if jpeg.is_dir() else None
    return ("cifar100", str(data_dir), "CIFAR-100") if (data_dir / "cifar-100-python").is_dir() else None


# ----------------------------------------------------------------------------- kNN on pixels
def knn_votes(base: torch.Tensor, base_y: torch.Tensor, queries: torch.Tensor, ks: tuple[int, ...],
              num_classes: int) -> dict[int, torch.Tensor]:
    """Predicted labels for each k: majority vote of the k nearest (exact L2), ties to the nearer neighbours."""
    index = faiss.IndexFlatL2(base.shape[1])
    index.add(base)
    _, ids = index.search(queries, max(ks))
    labels = base_y[ids]
    # A vote weighs 1 plus a tiny bonus for rank, so a tie goes to the class whose neighbours are nearer.
    weight = 1.0 + 1e-3 * torch.linspace(1, 0, max(ks))
    out = {}
    for k in ks:
        votes = torch.zeros(len(queries), num_classes).scatter_add_(1, labels[:, :k], weight[:k].expand(len(queries), k))
        out[k] = votes.argmax(1)
    return out


def flat(images: torch.Tensor) -> torch.Tensor:
    """Images as rows of pixels in [0, 1], the space the pixel kNN measures distance in."""
    return images.flatten(1).float().div(255.0).contiguous()


def project(fit_x: torch.Tensor, other_x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets on the top `dim` principal axes of `fit_x` (FAISS's PCAMatrix works on numpy)."""
    mat = faiss.PCAMatrix(fit_x.shape[1], dim)
    mat.train(fit_x.numpy())
    return torch.from_numpy(mat.apply(fit_x.numpy())), torch.from_numpy(mat.apply(other_x.numpy()))


def knn_cell(data, pca: int | None) -> dict:
    """Choose k on a validation split of train, then classify the test split with k and all of train."""
    start = time.perf_counter()
    split = split_validation(data, VALIDATION, SEED)
    train_x, val_x, test_x, all_x = flat(split.train_x), flat(split.test_x), flat(data.test_x), flat(data.train_x)
    if pca:
        # The projection is fitted on the pixels the neighbours come from (never on test).
        train_x, val_x = project(train_x, val_x, pca)
        all_x, test_x = project(all_x, test_x, pca)
    val_pred = knn_votes(train_x, split.train_y, val_x, KNN_KS, data.num_classes)
    val_acc = {k: 100.0 * (p == split.test_y).float().mean().item() for k, p in val_pred.items()}
    k = max(val_acc, key=lambda k: (val_acc[k], -k))
    pred = knn_votes(all_x, data.train_y, test_x, (k,), data.num_classes)[k]
    seconds = time.perf_counter() - start
    return {"accuracy": round(100.0 * (pred == data.test_y).float().mean().item(), 2), "k": k,
            "validation_accuracy": {str(k): round(v, 2) for k, v in val_acc.items()}, "epochs": None,
            "seconds": round(seconds, 1), "images_per_s": round((len(data.test_y) + len(split.test_y)) / seconds, 1)}


# ----------------------------------------------------------------------------- learned cells
def learned_cell(name: str, dataset: str, data_dir: str, config: str, runs: Path, quick: bool,
                 max_seconds: float | None) -> dict:
    """Train one cell from its config (or reuse it if this run directory finished it before)."""
    out = runs / name / config
    done = out / "cell.json"
    if done.is_file():
        print(f"  {config}: reusing {done}", file=sys.stderr)
        return json.loads(done.read_text())
    options = {"dataset": dataset, "data_dir": data_dir, "out": str(out), "max_seconds": max_seconds}
    if quick:
        options["epochs"] = 1
    cfg = make_config(CONFIGS / f"{name}-{config}.yaml", **options)
    resume = (out / "checkpoint.pt").is_file()
    start = time.perf_counter()
    summary = train(cfg, resume=resume, log=lambda m: print(f"  {config}: {m}", file=sys.stderr))
    curve = RunDir(out).load_metrics()
    cell = {"accuracy": summary["test_acc"], "epochs": summary["epochs"],
            # A resumed cell's seconds are its epochs' own (the interrupted process's loading is not counted).
            "seconds": round(sum(r["seconds"] for r in curve) if resume else time.perf_counter() - start, 1),
            "resumed": resume,
            # Training images a second, the median over epochs (evaluation excluded).
            "images_per_s": sorted(r["images_per_s"] for r in curve)[len(curve) // 2],
            "curve": [{k: r[k] for k in ("epoch", "train_acc", "test_acc", "seconds")} for r in curve],
            "config": f"configs/table1/{name}-{config}.yaml"}
    done.write_text(json.dumps(cell))
    return cell


def run_dataset(name: str, source: tuple[str, str, str], runs: Path, quick: bool) -> list[dict]:
    """Every cell of one data set, in order: kNN first, the seed's method last (its budget comes from conv1)."""
    dataset, data_dir, label = source
    rows = []
    print(f"{label}: kNN on pixels", file=sys.stderr)
    data = load_dataset(dataset, data_dir, download=False, log=lambda m: print(m, file=sys.stderr))
    for method, pca in (("knn", None), ("knn-pca30", PCA_DIM)):
        rows.append({"dataset": name, "data": label, "method": method, "encoder": "pixels", **knn_cell(data, pca)})
    del data
    for method, encoder, config in CELLS:
        budget = None
        if method == "seed-support-sample":
            # The seed's steps each re-encode 10^4 images: it gets the sam-cls conv1 cell's whole wall-clock time
            # (data loading and evaluations included) for its training steps alone, which favours the seed.
            budget = next(r["seconds"] for r in rows if r["method"] == "sam-cls" and r["encoder"] == "conv1")
        print(f"{label}: {method} / {encoder}" + (f" (budget {budget:.0f} s)" if budget else ""), file=sys.stderr)
        rows.append({"dataset": name, "data": label, "method": method, "encoder": encoder,
                     **learned_cell(name, dataset, data_dir, config, runs, quick, budget)})
    return rows


# ----------------------------------------------------------------------------- reporting
def paper(row: dict) -> float | None:
    """The seed paper's figure for this cell, if it reports one."""
    return PAPER.get((row["method"], row["encoder"]), {}).get(row["dataset"])


def row_text(r: dict) -> dict[str, str]:
    """A cell's figures as table text, shared by the printed and the markdown table; blank where absent."""
    return {"accuracy": num(r["accuracy"], ".2f"), "paper": num(paper(r), ".2f"),
            "epochs": num(None if r["encoder"] == "pixels" else r.get("epochs"), "g"),
            "seconds": num(r.get("seconds"), ".0f"), "images_per_s": num(r.get("images_per_s"), ".0f")}


def print_table(rows: list[dict]) -> None:
    """The table on stdout, one line a cell, the paper's figure beside ours."""
    print(f"{'data':22s} {'method':20s} {'encoder':8s} {'acc %':>7s} {'paper':>7s} {'epochs':>7s} {'s':>8s} {'img/s':>8s}")
    for r in rows:
        t = row_text(r)
        print(f"{r['data']:22s} {r['method']:20s} {r['encoder']:8s} {t['accuracy'] or '-':>7s} {t['paper']:>7s} "
              f"{t['epochs']:>7s} {t['seconds']:>8s} {t['images_per_s']:>8s}" + (f"  {r['note']}" if r.get("note") else ""))


def plot(rows: list[dict], path: Path) -> list[Path]:
    """Accuracy against epoch, train (dashed) and test (solid), one figure per data set (the seed's figure 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name in dict.fromkeys(r["dataset"] for r in rows if r.get("curve")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        cells = [r for r in rows if r["dataset"] == name and r.get("curve")]
        for i, cell in enumerate(cells):
            epochs = [p["epoch"] for p in cell["curve"]]
            ax.plot(epochs, [p["test_acc"] for p in cell["curve"]], "o-", color=f"C{i}",
                    label=f"{cell['method']} / {cell['encoder']}")
            ax.plot(epochs, [p["train_acc"] for p in cell["curve"]], "--", color=f"C{i}", alpha=0.6, label="_nolegend_")
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy %")
        ax.set_title(f"{rows_label(rows, name)}: train (dashed) and test (solid) accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        out = path.with_name(f"{path.stem}-{name}.png")
        fig.tight_layout()
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out)
    return written


def rows_label(rows: list[dict], name: str) -> str:
    """How the table names a data set (e.g. CIFAR-10 (JPEG copy))."""
    return next(r["data"] for r in rows if r["dataset"] == name)


def targets(rows: list[dict]) -> list[str]:
    """The claims, checked against this run's figures."""
    lines, cell = [], {(r["dataset"], r["method"], r["encoder"]): r for r in rows if r["accuracy"] is not None}
    for name in dict.fromkeys(r["dataset"] for r in rows):
        for enc in ("linear", "conv1"):
            ours, ref = cell.get((name, "sam-cls", enc)), PAPER[("seed-support-sample", enc)][name]
            if ours:
                verdict = "beats" if ours["accuracy"] > ref else "does not beat"
                lines.append(f"- {TITLES[name]}, {enc}: sam-cls {ours['accuracy']:.2f}% {verdict} the seed's {ref:.2f}%")
        ours, seed = cell.get((name, "sam-cls", "conv1")), cell.get((name, "seed-support-sample", "conv1"))
        if ours and seed:
            ratio = ours["images_per_s"] / seed["images_per_s"]
            lines.append(f"- {TITLES[name]}, conv1: sam-cls trains {ratio:.1f}x the images a second of the seed's method "
                         f"at M = 10^4 ({ours['images_per_s']:.0f} vs {seed['images_per_s']:.0f}); accuracy "
                         f"{ours['accuracy']:.2f}% vs {seed['accuracy']:.2f}% at the same wall-clock budget "
                         f"({seed['epochs']:g} epochs reached)")
        cnn = cell.get((name, "sam-cls", "cnn"))
        if cnn:
            goal = f" (target >= {CNN_TARGETS[name]}%)" if name in CNN_TARGETS else ""
            lines.append(f"- {TITLES[name]}, cnn: {cnn['accuracy']:.2f}% after {cnn['epochs']:g} epochs{goal}")
    return lines


def num(value: float | None, spec: str) -> str:
    """A table entry: blank where a cell has no such figure."""
    return "" if value is None else format(value, spec)


def write_markdown(rows: list[dict], info: dict, plots: list[Path], path: Path) -> None:
    """docs/RESULTS.md: the table beside the seed's numbers, the command, the machine, the plots."""
    m = info["machine"]
    out = ["# Results: the seed paper's table 1, re-measured", "",
           "Written by `benchmarks/table1.py` from the run it describes; the same figures are in `results/table1.json`.", "",
           f"Command: `{info['command']}`  ", f"Wall time: {info['wall_seconds'] / 60:.1f} min  ",
           (f"Machine: {m['cpu_count']} CPU cores ({m['processor']}), no GPU; {m['platform']}; Python {m['python']}, "
           f"torch {m['torch']} ({m['torch_threads']} threads), faiss {m['faiss']}"), "",
           ("Test accuracy (%) of the last epoch; the seed paper's number beside it where it has one. "
           "`seconds` is the cell's wall time (training, per-epoch evaluation and memory re-encoding); "
           "`images/s` the median training throughput over its epochs."), "",
           "| data | method | encoder | accuracy | seed paper | epochs | seconds | images/s |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = row_text(r)
        k = f" (k={r['k']})" if r.get("k") else ""
        out.append(f"| {r['data']} | {r['method']}{k} | {r['encoder']} | {r.get('note') or t['accuracy']} | "
                   f"{t['paper']} | {t['epochs']} | {t['seconds']} | {t['images_per_s']} |")
    out += ["", "## Targets", "", *targets(rows), "", "## How each cell was run", "",
            "- kNN: FAISS exact L2 search over raw pixels scaled to [0, 1] (and over their PCA to 30 dimensions, fitted "
            "on training pixels); majority vote; k chosen from " + ", ".join(map(str, KNN_KS)) + f" on a {VALIDATION:.0%} "
            "validation split of train, then applied with all of train. " + PAPER_NOTES["mnist"] + ".",
            ("- sam-cls, softmax: configs in `configs/table1/`, the same epochs for every learned cell of a data set. "
            "Learning rates and temperature were chosen on a validation split of train, never on test."),
            ("- seed-support-sample: the seed's method as `--support-sample 10000` (M random training images re-encoded "
            "with gradients every batch, dense softmax over them), stopped by `--max-seconds` at the wall-clock time "
            "of the sam-cls conv1 cell of its data set (that cell's whole wall time, loading and evaluations "
            "included, given to the seed's training steps alone: a budget that favours the seed). It is "
            "evaluated like sam-cls: the K = 256 nearest cells of "
            "its re-encoded training set."),
            ("- Train accuracy in the plots is the running accuracy over each epoch's augmented batches (for the "
            "memory, with each image's own cell excluded); test accuracy is measured after each epoch."), "",
            "## Accuracy against epoch", ""]
    out += [f"![{p.stem}]({p.name})" for p in plots]
    path.write_text("\n".join(out) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="../shared/data", help="folder with MNIST/, cifar-10-batches-py/ or cifar10-jpeg/, "
                        "cifar-100-python/")
    parser.add_argument("--quick", action="store_true", help="MNIST only, one epoch a cell")
    parser.add_argument("--runs", default=None, help="run directories (default runs/table1 or runs/table1-quick)")
    parser.add_argument("--datasets", default="mnist,cifar10,cifar100")
    parser.add_argument("--report", action="store_true", help="only re-render plots and docs from results/")
    parser.add_argument("--cells", default=None, help="learned cells to (re)measure, by config name (e.g. "
                        "softmax-cnn); their rows replace or join the committed table's, the others stay")
    args = parser.parse_args()
    tag = "table1-quick" if args.quick else "table1"
    runs = Path(args.runs or Path("runs") / tag)
    names = ["mnist"] if args.quick else args.datasets.split(",")
    unknown = [n for n in names if n not in TITLES]
    if unknown:
        sys.exit(f"error: unknown data set(s) {', '.join(unknown)}; choose from {', '.join(TITLES)}")
    results, info_path = ROOT / "results" / f"{tag}.json", ROOT / "results" / f"{tag}-run.json"
    if args.report:  # re-render plots and markdown from the committed figures; nothing is re-measured
        rows, info = json.loads(results.read_text()), json.loads(info_path.read_text())
    elif args.cells:
        rows, info = measure_cells(names, args.cells.split(","), Path(args.data_dir), runs, results, info_path)
        print_table(rows)
    else:
        rows, wall = measure(names, Path(args.data_dir), runs, args.quick)
        print_table(rows)
        print(f"wall time {wall / 60:.1f} min")
        for r in rows:
            r["paper_accuracy"] = paper(r)
        info = write_report({"wall_seconds": round(wall, 1), "paper_notes": PAPER_NOTES}, info_path, quiet=True)
        results.write_text(json.dumps(rows, indent=1) + "\n")
    plots = plot(rows, (ROOT / "results" if args.quick else ROOT / "docs") / f"{tag}.png")
    if not args.quick:
        write_markdown(rows, info, plots, ROOT / "docs" / "RESULTS.md")
    print("\n".join(targets(rows)))
    print(f"wrote {results.relative_to(ROOT)} and {', '.join(str(p.relative_to(ROOT)) for p in plots)}")


def measure(names: list[str], data_dir: Path, runs: Path, quick: bool) -> tuple[list[dict], float]:
    """Every cell of every data set whose files exist; the others get a "not run: data absent" row each."""
    start, rows = time.perf_counter(), []
    for name in names:
        source = data_source(name, data_dir)
        if source is None:
            print(f"{TITLES[name]}: not run: data absent (no files under {data_dir})", file=sys.stderr)
            rows += [{"dataset": name, "data": TITLES[name], "method": m, "encoder": enc, "accuracy": None,
                      "epochs": None, "seconds": None, "images_per_s": None, "note": "not run: data absent"}
                     for m, enc in [("knn", "pixels"), ("knn-pca30", "pixels")] + [c[:2] for c in CELLS]]
        else:
            rows += run_dataset(name, source, runs, quick)
    return rows, time.perf_counter() - start


def measure_cells(names: list[str], configs: list[str], data_dir: Path, runs: Path, results: Path,
                  info_path: Path) -> tuple[list[dict], dict]:
    """Only the learned cells named, merged into the committed table (a row replaced, or placed in CELLS order)."""
    known = {c[2]: c for c in CELLS if c[0] != "seed-support-sample"}  # the seed's cell needs conv1's budget
    unknown = [c for c in configs if c not in known]
    if unknown:
        sys.exit(f"error: unknown cell(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    rows, info = json.loads(results.read_text()), json.loads(info_path.read_text())
    order = {c[:2]: i for i, c in enumerate([("knn", "pixels"), ("knn-pca30", "pixels")] + CELLS)}
    start = time.perf_counter()
    for name in names:
        source = data_source(name, data_dir)
        if source is None:
            print(f"{TITLES[name]}: not run: data absent (no files under {data_dir})", file=sys.stderr)
            continue
        dataset, path, label = source
        for config in configs:
            method, encoder, _ = known[config]
            print(f"{label}: {method} / {encoder}", file=sys.stderr)
            row = {"dataset": name, "data": label, "method": method, "encoder": encoder,
                   **learned_cell(name, dataset, path, config, runs, False, None), "paper_accuracy": None}
            rows = [r for r in rows if (r["dataset"], r["method"], r["encoder"]) != (name, method, encoder)]
            rows.append(row)
    datasets = list(TITLES)
    rows.sort(key=lambda r: (datasets.index(r["dataset"]), order[(r["method"], r["encoder"])]))
    info.setdefault("cells_measured_later", []).append(
        {"cells": configs, "datasets": names, "wall_seconds": round(time.perf_counter() - start, 1),
         "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d")})
    results.write_text(json.dumps(rows, indent=1) + "\n")
    info_path.write_text(json.dumps(info, indent=1) + "\n")
    return rows, info


if __name__ == "__main__":
    main()
