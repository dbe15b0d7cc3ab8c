"""Measuring and maintaining a trained run: test accuracy, index rebuilds and index recall."""

import time
from dataclasses import replace
from pathlib import Path

import torch

from sam_cls.classifier import MemoryClassifier
from sam_cls.config import ConfigError
from sam_cls.copies import CopyStyle, encode_cells
from sam_cls.data import Dataset
from sam_cls.evaluate import encode_all
from sam_cls.index import IndexParams, build_index, recall_at_k
from sam_cls.memory import MemoryBank
from sam_cls.read import ReadRule
from sam_cls.setup import get_dataset
from sam_cls.tune import tune_memory


def run_data(clf: MemoryClassifier, data_dir: str | None = None, log=print) -> Dataset:
    """The run's data set (its test split is what evaluate and index-stats read), from data_dir if given."""
    cfg = replace(clf.cfg, data_dir=data_dir) if data_dir else clf.cfg
    data = get_dataset(cfg, log)
    if data.image_shape != clf.image_shape:
        raise ConfigError(f"{cfg.data_dir} holds {data.image_shape} images but the run was trained on "
                          f"{clf.image_shape}: check --data-dir")
    return data


@torch.no_grad()
def evaluate_run(clf: MemoryClassifier, data: Dataset, topk: int | None = None, plot: str | None = None,
                 balanced: bool = False, **changes) -> dict:
    """Top-1 and top-5 test accuracy, per-class accuracy and the confusion matrix of the memory classifier, read
    by the run's rule (the stored tuned one, else as trained) with these changes (ReadRule fields)."""
    topk = clf.topk if topk is None else topk
    if not 0 <= topk <= clf.memory.size:
        raise ConfigError(f"--topk {topk} must be between 0 and the memory's {clf.memory.size} cells")
    rule = clf.read_rule(topk, balanced, **changes)
    # The data set's labels name its own classes; the run's may have grown (sam-cls add): map them by name.
    names = {name: i for i, name in enumerate(clf.classes)}
    missing = [c for c in data.classes if c not in names]
    if missing:
        raise ConfigError(f"the test set's classes {missing} are not in the run's memory")
    truth = torch.tensor([names[c] for c in data.classes])[data.test_y]
    u = encode_all(clf.encoder, data.test_x, clf.cfg.eval_batch_size, desc="test")
    log_probs = clf.read(u, **rule.as_dict())
    ranked = log_probs.topk(min(5, len(clf.classes)), dim=1).indices
    predicted = ranked[:, 0]
    confusion = torch.zeros(len(clf.classes), len(clf.classes), dtype=torch.long)
    confusion.index_put_((truth, predicted), torch.ones_like(truth), accumulate=True)
    seen = confusion.sum(1)
    per_class = {clf.classes[c]: round(100.0 * confusion[c, c].item() / seen[c].item(), 3)
                 for c in range(len(clf.classes)) if seen[c] > 0}
    if plot:
        from sam_cls.plots import confusion_png

        confusion_png(confusion, clf.classes, plot)
        clf.run.log(f"wrote {plot}")
    return {"accuracy": round(100.0 * (predicted == truth).float().mean().item(), 3),
            "top5": round(100.0 * (ranked == truth[:, None]).any(1).float().mean().item(), 3),
            "topk": topk, "n": len(truth), "read": rule.as_dict(), "per_class": per_class}


def tune_run(clf: MemoryClassifier, data: Dataset | None = None, log=print) -> dict:
    """Choose the run's read rule (sam_cls/tune.py) on its validation share (data's test split, where the run
    trained with --validation), else on its own cells left one out; stored by the caller's clf.save()."""
    start = time.perf_counter()
    validation = None
    if data is not None and clf.cfg.validation:
        names = {name: i for i, name in enumerate(clf.classes)}
        truth = torch.tensor([names[c] for c in data.classes])[data.test_y]
        validation = (encode_all(clf.encoder, data.test_x, clf.cfg.eval_batch_size, desc="validation"), truth)
    as_trained = ReadRule(min(clf.cfg.topk, clf.memory.size), clf.cfg.temperature)
    clf.state["read"] = tune_memory(clf.memory, clf.index, as_trained, len(clf.classes), clf.cell_facts(),
                                    validation, clf.cfg.seed)
    log(f"read tuned in {time.perf_counter() - start:.1f}s")
    return clf.state["read"]["report"]


@torch.no_grad()
def expand_memory(clf: MemoryClassifier, data: Dataset, copies: int, log=print, kind: str | None = None,
                  strength: float | None = None) -> int:
    """Grow a trained run's memory to `copies` cells per training image with its own encoder (no training).

    The cells it has keep their embeddings; copies it lacks are made and encoded as training would have, in the
    run's copy style, or with the kind and strength given where the memory holds no copies yet (one memory, one
    kind of copy; what is not given stays the run's).
    Returns the number of cells added; the caller rebuilds the index and commits.
    """
    cfg, n = clf.cfg, len(data.train_y)
    own = CopyStyle.of(cfg)
    style = CopyStyle(kind or own.kind, strength or own.strength)
    if style != own and cfg.copies > 1:
        raise ConfigError(f"the run's memory holds {cfg.copies} copies an image of kind {own.kind} at strength "
                          f"{own.strength:g}: grow it with the same --copy-kind and --copy-strength (or none)")
    if clf.state.get("edited") not in (None, False, "copies"):
        raise ConfigError("the run's memory was changed by `sam-cls add` or `forget`: --copies grows a memory as "
                          "trained, so expand it before editing (or train a new run with --copies)")
    if copies < cfg.copies:
        raise ConfigError(f"--copies {copies} is below the run's {cfg.copies}: a memory only grows (use forget "
                          f"to remove cells)")
    if clf.memory.size != cfg.copies * n or list(data.classes) != clf.classes:
        raise ConfigError(f"the run's memory has {clf.memory.size} cells of {len(clf.classes)} classes, the data "
                          f"set {n} training images of {len(data.classes)}: check --data-dir")
    if copies == cfg.copies:
        return 0
    start = time.perf_counter()
    memory = clf.memory
    new = encode_cells(clf.encoder, data.train_x.to(clf.device), copies, cfg.seed, cfg.eval_batch_size,
                       start=cfg.copies * n, style=style)
    # Cell order again (an IVF build may have laid the rows out by list): cell c * N + e is copy c of image e.
    clf.memory = MemoryBank(torch.cat([memory.embeddings[memory.rows], new.to(memory.embeddings)]),
                            data.train_y.to(memory.labels.device).repeat(copies))
    clf.cell_source = torch.zeros(clf.memory.size, dtype=torch.int32)
    clf.cell_item = torch.arange(clf.memory.size)
    clf.cfg = replace(cfg, copies=copies, copy_kind=style.kind, copy_strength=style.strength)
    clf.sources = [{**clf.sources[0], "copies": copies, "seed": cfg.seed, "copy_kind": style.kind,
                    "copy_strength": style.strength}]
    clf.state["data"] = {**clf.state["data"], "train_images": n}
    # Training continues only from the memory it trained: its epochs and schedule assumed the old size.
    clf.state["edited"] = "copies"
    log(f"memory grown from {memory.size} to {clf.memory.size} cells ({copies} per training image) in "
        f"{time.perf_counter() - start:.1f}s")
    return len(new)


def rebuild_run_index(clf: MemoryClassifier, params: IndexParams, log=print) -> dict:
    """Rebuild the index (any kind) over the run's memory as saved, and commit it into the run."""
    embeddings = clf.memory.embeddings
    k = max(clf.cfg.topk, 1)
    start = time.perf_counter()
    clf.index = build_index(embeddings, params, k=k, log=log, calibrate=True)
    build_seconds = time.perf_counter() - start
    queries = embeddings[torch.randperm(len(embeddings), generator=torch.Generator().manual_seed(0))[:256]]
    recall = recall_at_k(clf.index, embeddings, queries, k)
    # A resumed run rebuilds its index from what this one learned, not from the old index's centroids.
    learned = clf.index.learned()
    clf.state = {k: v for k, v in clf.state.items() if k != "index_centroids"}
    if learned is not None:
        clf.state["index_centroids"] = learned
    clf.state["config"] = clf.cfg.to_dict()  # the kind and knobs later reads of the run use
    clf.save()
    return {"ntotal": clf.index.size, "dim": clf.index.dim, "index": clf.index.kind,
            "build_seconds": round(build_seconds, 3), "recall_at_k": round(recall["recall_at_k"], 4), "k": k}


def index_stats(clf: MemoryClassifier, data: Dataset, topk: int | None = None, queries: int = 1000) -> dict:
    """Recall@K of the run's saved index against exact search, on queries from the run's test images."""
    k = min(max(clf.cfg.topk, 1), clf.memory.size) if topk is None else topk
    if not 1 <= k <= clf.memory.size:
        raise ConfigError(f"--topk {k} must be between 1 and the memory's {clf.memory.size} cells")
    q = encode_all(clf.encoder, data.test_x[:queries], clf.cfg.eval_batch_size)
    stats = recall_at_k(clf.index, clf.memory.embeddings, q, k)
    index = clf.index
    return {"index": index.kind, "description": index.description, "ntotal": index.size, "dim": index.dim, **stats}


def explain_picture(clf: MemoryClassifier, image, rows: list[dict], path: str | Path, log=print) -> None:
    """The query beside the cells it read, each captioned with its label and softmax weight; a neighbour whose
    image is no longer where the run found it is drawn crossed out, and said so."""
    from sam_cls.plots import neighbour_grid

    query = clf.images(image)[0]
    neighbours = clf.cell_images([row["cell"] for row in rows], log)
    missing = [row["source"] for row, n in zip(rows, neighbours, strict=True) if n is None]
    if missing:
        log(f"warning: the images of {len(missing)} of {len(rows)} neighbours are not where the run found them "
            f"(first: {missing[0]}): moved, deleted or given from Python, they are drawn crossed out")
    neighbour_grid(query, neighbours, [f"{row['label']}\nw {row['weight']:.2f}" for row in rows], path)
    log(f"wrote {path}")
