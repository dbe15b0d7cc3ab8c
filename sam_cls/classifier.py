"""A trained run as a classifier: predict, explain, add and forget examples, with no training data on disk.

    clf = sam_cls.load("runs/mnist-mini-conv1-k256")
    clf.predict(["digit.png"])            # class indices into clf.classes (numpy; torch=True for tensors)
    clf.predict_proba(images)             # (B, C) probabilities
    clf.kneighbors(images, 5)             # (similarities, cells), nearest first, as scikit-learn's kneighbors
    clf.add(images, ["seven", "seven"])   # written into the memory and its index; no training
    clf.forget(class_name="seven")
    clf.save()                            # one atomic commit into the run directory

Images are file paths, PIL images, numpy arrays or tensors (sam_cls/images.py: layouts and value ranges); results
are numpy arrays, as scikit-learn gives them, or tensors with torch=True. The memory's labels index `classes`
(`classes_` as a numpy array), which grows when `add` names a new class. Each cell keeps where it came
from: its source (a data set's split, a folder, or images given from Python) and its item in that source.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sam_cls.backbones import check_module
from sam_cls.checkpoint import CheckpointError, RunDir
from sam_cls.config import Config, ConfigError, make_config
from sam_cls.copies import CopyStyle, cell_images
from sam_cls.evaluate import CellFacts, classify, encode_all
from sam_cls.images import ImageLike, background_level, image_files, to_batch
from sam_cls.index import MemoryIndex, build_index, load_index
from sam_cls.integrity import describe, generation
from sam_cls.memory import MemoryBank
from sam_cls.model import build_encoder
from sam_cls.read import ReadRule
from sam_cls.read_map import fit_map, fold_map, map_cells, projection
from sam_cls.setup import index_params, resolve_device
from sam_cls.shard_files import gather_shards, is_sharded
from sam_cls.tune import tune_memory


class MemoryClassifier:
    """A trained encoder, its memory of labelled cells and the index over them."""

    def __init__(self, run: RunDir, cfg: Config, state: dict, device: torch.device, index: MemoryIndex | None,
                 module: nn.Module | None = None):
        self.run, self.cfg, self.state, self.device, self.index = run, cfg, state, device, index
        self._facts: CellFacts | None = None  # cached by cell_facts(); add and forget clear it
        self.changes: list[str] = []  # a digest of each add and forget since the load, stored with the commit
        self.records: list[dict] = []  # what each add and forget since the load did, for the run's history
        data = state["data"]
        self.classes: list[str] = list(data["classes"])
        self.image_shape: tuple[int, int, int] = tuple(data["image_shape"])
        check_module(cfg.encoder, module, state.get("network"), str(run.path))  # a user network is handed back
        self.encoder = build_encoder(cfg.encoder, self.image_shape, cfg.dim, torch.zeros(self.image_shape[0]),
                                     torch.ones(self.image_shape[0]),
                                     len(self.classes) if cfg.head == "softmax" else None, module)
        try:  # the pixel statistics are buffers: they come with the weights
            self.encoder.load_state_dict(state["encoder"])
        except (KeyError, RuntimeError) as e:
            raise CheckpointError(f"{run.checkpoint} does not match encoder {cfg.encoder!r} with dim {cfg.dim}: "
                                  f"{str(e).splitlines()[0]}") from e
        self.encoder.to(device).eval()
        self.memory = MemoryBank.from_state_dict(state["memory"], device)
        labels = self.memory.labels
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(self.classes):
            raise CheckpointError(f"{run.checkpoint}: cell labels outside the run's {len(self.classes)} classes; "
                                  "the file is corrupt")
        cells = state.get("cells")
        if cells is None:  # as trained: every cell is the training example its row holds
            cells = {"source": torch.zeros(self.memory.size, dtype=torch.int32),
                     "item": self.memory.example_ids.cpu()}
        self.sources: list[dict] = list(state.get("sources") or [training_source(cfg)])
        self.cell_source, self.cell_item = cells["source"].cpu(), cells["item"].cpu()
        if not len(self.cell_source) == len(self.cell_item) == self.memory.size:
            raise CheckpointError(f"{run.checkpoint}: the cells' sources do not match its {self.memory.size} cells; "
                                  "the file is corrupt")

    @property
    def classes_(self) -> np.ndarray:
        """The class names as scikit-learn names them: clf.classes_[clf.predict(x)] are the predicted names."""
        return np.array(self.classes, dtype=object)

    @property
    def background(self) -> int:
        """The grey level of the training images' background, onto which a transparent image is composited:
        stored by training, else measured once on the run's data set (0, black, where that is not at hand)."""
        data = self.state["data"]
        if "background" not in data:
            from sam_cls.data import DatasetError
            from sam_cls.setup import get_dataset

            try:
                data["background"] = background_level(get_dataset(self.cfg, lambda _: None).train_x)
            except (DatasetError, OSError) as e:
                self.run.log(f"warning: the run stores no background level and its data set cannot be read "
                             f"({str(e).splitlines()[0]}): transparent images are composited onto black")
                data["background"] = 0
        return int(data["background"])

    def images(self, images: ImageLike | Sequence[ImageLike],
               skipped: list[tuple[Path, str]] | None = None) -> torch.Tensor:
        """uint8 (B, C, H, W) of images in any accepted form, in the run's input shape (sam_cls/images.py); with
        `skipped` given, unreadable files are listed there instead of raising."""
        return to_batch(images, self.image_shape, lambda: self.background, self.run.log, skipped)

    # -- classifying ------------------------------------------------------------------------------------------
    @property
    def topk(self) -> int:
        """Cells a prediction reads: the run's K (at most the memory), or all of them for a dense run."""
        return min(self.rule.topk, self.memory.size)

    @property
    def rule(self) -> ReadRule:
        """The read predictions use: the one tuned and stored in the run, else the read as trained."""
        stored = self.state.get("read")
        return ReadRule.from_dict(stored["rule"]) if stored else ReadRule(self.cfg.topk, self.cfg.temperature)

    def cell_facts(self) -> CellFacts:
        """Class sizes and each cell's source image (copy c of image e has source e), for the read rules."""
        if self._facts is None:
            images = self.state["data"].get("train_images")
            item = self.cell_item.long()
            for s, source in enumerate(self.sources):  # the copies of one image share its source
                if source["kind"] == "dataset" and source.get("copies", 1) > 1 and images:
                    rows = self.cell_source == s
                    item = torch.where(rows, item % images, item)
            self._facts = CellFacts.of(self.memory.labels, len(self.classes), (self.cell_source.long() << 40) | item)
        return self._facts

    def encode(self, images: ImageLike | Sequence[ImageLike]) -> torch.Tensor:
        """(B, d) embeddings (a tensor: what read() and the index take) of images in any accepted form."""
        return encode_all(self.encoder, self.images(images), self.cfg.eval_batch_size)

    def read_rule(self, topk: int | None = None, balanced: bool = False, **changes) -> ReadRule:
        """The run's rule with these changes: topk, balanced (alpha 1), or any ReadRule field by name."""
        rule = self.rule
        unknown = set(changes) - set(rule.as_dict())
        if unknown:
            raise ValueError(f"unknown read option(s) {sorted(unknown)}; known: {sorted(rule.as_dict())}")
        changes = {k: v for k, v in changes.items() if v is not None}
        if topk is not None:
            changes["topk"] = topk
        if balanced:
            changes["alpha"] = 1.0
        rule = replace(rule, **changes)
        if not 0 <= rule.topk <= self.memory.size:
            raise ValueError(f"topk {rule.topk} must be between 0 and the memory's {self.memory.size} cells")
        return replace(rule, topk=min(rule.topk, self.memory.size))

    # scikit-learn's names give numpy arrays; torch=True gives the tensors the library computes with.

    @torch.no_grad()
    def read(self, u: torch.Tensor, topk: int | None = None, balanced: bool = False, **changes) -> torch.Tensor:
        """(B, C) class log-probabilities of embeddings u under the run's read rule (ReadRule), as changed here.

        By default, the rule stored in the run (`sam-cls evaluate --tune`, or at the end of training), else the
        read as trained: the softmax over the K nearest cells, each class's share of the memory as its prior.
        balanced=True divides each class's mass by its cell count (alpha 1), which a class added from a few
        examples needs to be predicted at all: results/memory_value.json measures every rule.
        """
        rule = self.read_rule(topk, balanced, **changes)
        log_probs = torch.cat([classify(u[i : i + 1024], self.memory, self.index, rule, len(self.classes),
                                        self.cell_facts())[0] for i in range(0, len(u), 1024)]) if len(u) else \
            torch.zeros(0, len(self.classes))
        return log_probs.cpu()

    def predict_log_proba(self, images, topk: int | None = None, balanced: bool = False, torch: bool = False,
                          **changes) -> np.ndarray:
        """(B, C) class log-probabilities (see read())."""
        return _out(self.read(self.encode(images), topk, balanced, **changes), torch)

    def predict_proba(self, images, topk: int | None = None, balanced: bool = False, torch: bool = False,
                      **changes) -> np.ndarray:
        """(B, C) class probabilities (see read())."""
        return _out(self.read(self.encode(images), topk, balanced, **changes).exp(), torch)

    def predict(self, images, topk: int | None = None, balanced: bool = False, torch: bool = False,
                **changes) -> np.ndarray:
        """(B,) most probable class of each image, as an index into `classes`."""
        return _out(self.read(self.encode(images), topk, balanced, **changes).argmax(1), torch)

    def kneighbors(self, images, n_neighbors: int | None = None, torch: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, cells), each (B, n): the n nearest cells by cosine similarity, nearest first; n is the
        run's K by default, and 1 to the memory's size (anything else is a ValueError, as in scikit-learn)."""
        n = self.topk if n_neighbors is None else n_neighbors
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or not 1 <= n <= self.memory.size:
            raise ValueError(f"n_neighbors must be a whole number from 1 to the memory's {self.memory.size} cells, "
                             f"got {n_neighbors!r}")
        scores, cells = self._search(self.encode(images), int(n))
        return _out(scores, torch), _out(cells, torch)

    @torch.no_grad()
    def _search(self, u, n: int):
        scores, cells = self.index.search(u, n)
        return scores.cpu(), cells.cpu()

    @torch.no_grad()
    def explain(self, image: ImageLike, neighbours: int = 16) -> list[dict]:
        """The cells one prediction rests on, nearest first: label, similarity, softmax weight and source."""
        if not 1 <= neighbours <= self.memory.size:
            raise ValueError(f"neighbours must be from 1 to the memory's {self.memory.size} cells, got {neighbours}")
        u = self.encode(image)
        k = max(self.topk, min(neighbours, self.memory.size))
        scores, cells = self.index.search(u, k)
        # The weights of the read the prediction made: a softmax over its K cells at the run's temperature.
        weights = torch.softmax(scores[0, : self.topk] / self.rule.temperature, 0).tolist() + [0.0] * (k - self.topk)
        cells, scores = cells[0].cpu().tolist(), scores[0].cpu().tolist()
        labels = self.memory.labels.cpu()
        return [{"cell": c, "label": self.classes[int(labels[c])], "similarity": round(s, 4),
                 "weight": round(w, 4), "source": self.describe(c)}
                for c, s, w in zip(cells[:neighbours], scores[:neighbours], weights[:neighbours], strict=True)]

    def describe(self, cell: int) -> str:
        """Where a cell came from: `mnist train #12`, `mnist train #12 copy 3`, a file path, or `python #3`."""
        if isinstance(cell, bool) or not isinstance(cell, int | np.integer) or not 0 <= cell < self.memory.size:
            raise ValueError(f"cell {cell!r} is not in the memory: cells are numbered 0 to {self.memory.size - 1}")
        source, item = self.sources[int(self.cell_source[cell])], int(self.cell_item[cell])
        if source["kind"] == "files":
            return str(Path(source["root"]) / source["files"][item])
        images = self.state["data"].get("train_images")
        if source["kind"] == "dataset" and source.get("copies", 1) > 1 and images:
            return f"{source['name']} #{item % images} copy {item // images}"
        return f"{source['name']} #{item}"

    def cell_images(self, cells: Sequence[int], log=None) -> list[torch.Tensor | None]:
        """Each cell's image from its source, where that is still on disk (None where it is not)."""
        from sam_cls.data import DatasetError
        from sam_cls.setup import get_dataset

        data, out = None, []
        for cell in cells:
            source, item = self.sources[int(self.cell_source[cell])], int(self.cell_item[cell])
            try:
                if source["kind"] == "files":
                    out.append(self.images(Path(source["root"]) / source["files"][item])[0])
                elif source["kind"] == "dataset":
                    data = data or get_dataset(self.cfg, log or (lambda _: None))
                    # A deformed copy's pixels are regenerated from its seed, exactly as training made them.
                    out.append(cell_images(data.train_x, torch.tensor([item]), source.get("seed", 0),
                                           CopyStyle.of(source))[0])
                else:
                    out.append(None)
            except DatasetError:
                out.append(None)
        return out

    # -- changing the memory ----------------------------------------------------------------------------------
    def add(self, images, labels: Sequence[str | int], source: dict | None = None, refit: bool = True) -> int:
        """Write labelled examples into the memory and the index, encoded as they are (no training of the network).

        labels are class names (a new name adds a class) or indices into `classes`. source says where the
        images came from (add_folder sets it); by default they count as images given from Python. Where the add
        moves the classes' shares and leaves small classes, refit=True also refits the metric (sam_cls/read_map.py)
        and keeps it only where it reads the memory's held-out cells better.
        """
        x = self.images(images)
        if len(labels) != len(x):
            raise ValueError(f"{len(x)} images but {len(labels)} labels")
        before = self.cell_facts().class_cells
        ids = [self._class_id(label) for label in labels]
        u = encode_all(self.encoder, x, self.cfg.eval_batch_size)
        source = source or {"kind": "python", "name": "python"}
        self.sources.append(source)
        start = self.memory.size
        self.memory = MemoryBank(torch.cat([self.memory.embeddings, u.to(self.memory.embeddings)]),
                                 torch.cat([self.memory.labels, torch.tensor(ids, device=self.memory.labels.device)]))
        self.cell_source = torch.cat([self.cell_source, torch.full((len(x),), len(self.sources) - 1,
                                                                  dtype=torch.int32)])
        self.cell_item = torch.cat([self.cell_item, torch.arange(len(x))])
        self.index.add(self.memory.embeddings[start:])  # ids continue from the old size: the new rows
        # (refit=False marks its digest: the same images added again with a refit are another change, not a retry)
        self.changes.append(_digest("add", x.numpy().tobytes(), [self.classes[i] for i in ids],
                                    *(() if refit else ("no refit",))))
        refitted = self._memory_changed(before, refit)
        self._record({"op": "add", "added": len(x), "source": source["name"],
                      "new_classes": self.classes[len(before):], **({"refit": refitted} if refitted else {})})
        return len(x)

    def add_folder(self, folder: str | Path, skipped: list[tuple[Path, str]] | None = None, refit: bool = True) -> int:
        """Add every image of folder/<class>/* under its folder's name as the label (hidden folders, such as
        .ipynb_checkpoints, are not classes). With `skipped` given, unreadable files are listed there and left out."""
        root = Path(folder)
        classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")) \
            if root.is_dir() else []
        if not classes:
            raise ValueError(f"{root} has no class folders: lay the images out as {root}/<class>/<image>")
        files = [(f, d.name) for d in classes for f in image_files([d])]
        bad: list[tuple[Path, str]] = []
        x = self.images([f for f, _ in files], bad if skipped is not None else None)
        if skipped is not None:
            skipped += bad
        files = [(f, label) for f, label in files if f not in {p for p, _ in bad}]
        if not files:
            return 0
        source = {"kind": "files", "name": str(root), "root": str(root.resolve()),
                  "files": [str(f.relative_to(root)) for f, _ in files]}
        return self.add(x, [label for _, label in files], source, refit)

    def forget(self, class_name: str | None = None, source: str | None = None,
               cells: Sequence[int] | None = None) -> int:
        """Remove cells: all of a class, those whose source matches a glob pattern, or these cell numbers."""
        if sum(x is not None for x in (class_name, source, cells)) != 1:
            raise ValueError("forget takes exactly one of a class name, a source pattern or cell numbers")
        drop = torch.zeros(self.memory.size, dtype=torch.bool)
        if class_name is not None:
            if class_name not in self.classes:
                raise ValueError(f"no class {class_name!r}: the run's classes are {', '.join(self.classes)}")
            drop = self.memory.labels.cpu() == self.classes.index(class_name)
        elif source is not None:
            drop = torch.tensor([fnmatch.fnmatch(self.describe(c), source) for c in range(self.memory.size)])
        else:
            bad = [c for c in cells if not 0 <= c < self.memory.size]
            if bad:
                raise ValueError(f"cells {bad} are not in the memory (0 to {self.memory.size - 1})")
            drop[list(cells)] = True
        if not drop.any():  # nothing to remove: nothing changes, and save() has nothing to commit
            return 0
        keep = (~drop).nonzero().squeeze(1)
        before = self.cell_facts().class_cells
        if len(keep) < max(1, self.cfg.topk):
            raise ValueError(f"forgetting {int(drop.sum())} cells would leave {len(keep)}, fewer than the run "
                             f"reads (K={self.cfg.topk})")
        self.memory = MemoryBank(self.memory.embeddings[keep.to(self.device)].clone(),
                                 self.memory.labels[keep.to(self.device)])
        self.cell_source, self.cell_item = self.cell_source[keep], self.cell_item[keep]
        # Rows after a removed one move up; the index re-adds the rest (keeping what it trained).
        self.index.refresh(self.memory.embeddings)
        self.changes.append(_digest("forget", class_name, source, None if cells is None else list(cells)))
        self._memory_changed(before)
        what = {"class": class_name} if class_name is not None else {"source": source} if source is not None else \
            {"cell_numbers": len(cells)}
        self._record({"op": "forget", "forgotten": int(drop.sum()), **what})
        return int(drop.sum())

    def _record(self, record: dict) -> None:
        """A change's line in the run's history (the checkpoint's records, mirrored by metrics.jsonl): at the
        training step the memory was trained to, so a reader of the file keeps it in step order."""
        self.records.append({**record, "cells": self.memory.size, "classes": len(self.classes),
                             "step": int(self.state.get("step", 0))})

    def _memory_changed(self, before: torch.Tensor, refit: bool = False) -> dict | None:
        """After add or forget (cells of each class before it): the facts the rules read are stale, and where the
        classes' shares of the memory moved, the metric is refitted (if asked: its report returned) and a tuned
        read chosen again."""
        self._facts = None
        self.state["edited"] = True  # training's resume needs the memory it trained: this one cannot continue
        after = self.cell_facts().class_cells.float()
        before = torch.cat([before.float(), torch.zeros(len(after) - len(before))])
        moved = (after / after.sum()).clamp_min(1e-9) / (before / before.sum()).clamp_min(1e-9)
        shares_moved = not ((moved > 0.5) & (moved < 2)).all()
        refitted = self._refit_map() if refit and shares_moved else None
        if "read" in self.state and shares_moved:
            # A class came or went, or changed its share twofold: the class prior and the per-class read are
            # chosen anew, on the memory's own cells left one out (a class added from a few examples is read
            # as its test images will be).
            as_trained = ReadRule(min(self.cfg.topk, self.memory.size), self.cfg.temperature)
            self.state["read"] = tune_memory(self.memory, self.index, as_trained, len(self.classes),
                                             self.cell_facts(), None, self.cfg.seed)
        return refitted

    def _refit_map(self) -> dict:
        """Fit the metric map on the memory's cells; where it is kept, fold it into the encoder, map the cells
        and build the index over them again (one space for queries, cells and index). Everything new is made
        before anything is replaced: a failure part way leaves the classifier as it was."""
        if projection(self.encoder) is None:
            return {"kept": False, "reason": "the encoder has no Linear projection to fold a map into"}
        w, report = fit_map(self.memory.embeddings, self.memory.labels, self.cell_facts().origins,
                            len(self.classes), self.cfg.temperature, self.cfg.topk or None, self.cfg.seed)
        if w is None:
            return report
        encoder = copy.deepcopy(self.encoder)
        fold_map(encoder, w)
        cells = map_cells(self.memory.embeddings, w)
        # A new index over the mapped cells: O(N), as `rebuild-index` is (docs/MEMORY.md).
        index = build_index(cells, index_params(self.cfg, self.device), max(self.cfg.topk, 1), calibrate=True)
        self.encoder, self.index = encoder, index
        self.memory.embeddings.copy_(cells)
        self.state["encoder"] = {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}
        # Centroids a resumed training would start k-means from: this memory is another space (and an edited
        # run does not resume).
        self.state.pop("index_centroids", None)
        return report

    def save(self, once: bool = False) -> bool:
        """Commit memory, classes, sources and index into the run directory together (atomic), under the run's
        lock and only over the generation this classifier loaded (else StaleRunError: nothing is lost).

        once=True commits nothing when these changes are exactly those that made the loaded generation (a
        command retried after it had committed); returns whether it committed."""
        op = _digest("changes", *self.changes) if self.changes else None
        if once and op is not None and op == generation(self.state).get("op"):
            self.run.log(f"warning: {describe(self.state, str(self.run.path))} was made by this very change (a "
                         "retried command): nothing new was committed")
            return False
        state = {**self.state, "memory": {k: v.cpu() for k, v in self.memory.state_dict().items()},
                 "data": {**self.state["data"], "classes": list(self.classes)},
                 "cells": {"source": self.cell_source, "item": self.cell_item}, "sources": self.sources,
                 # a checkpoint from before it kept its records: metrics.jsonl holds them
                 "history": list(self.state.get("history", self.run.load_metrics())) + self.records}
        self.state = {**state, "generation": self.run.commit(state, self.index, op)}
        self.changes, self.records = [], []
        return True

    def _class_id(self, label: str | int) -> int:
        if isinstance(label, int):
            if not 0 <= label < len(self.classes):
                raise ValueError(f"class index {label} is not one of the run's {len(self.classes)} classes")
            return label
        if label not in self.classes:
            for name in self.classes:
                if _label_key(name) & _label_key(label):
                    self.run.log(f"warning: new class {label!r} differs from the run's class {name!r} only by its "
                                 f"label text: name the folder {name!r} to add to that class")
            self.classes.append(label)
        return self.classes.index(label)


def _label_key(name: str) -> set[str]:
    """The parts of a class name that name the class: '7 - seven' is 7 and seven, as torchvision names MNIST's."""
    return {part.strip().lower() for part in name.split(" - ") if part.strip()}


def _out(x: torch.Tensor, as_tensor: bool) -> np.ndarray | torch.Tensor:
    return x if as_tensor else x.numpy()


def _digest(*parts) -> str:
    """What identifies a change to the memory: its kind and content (the pixels and labels an add wrote)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def training_source(cfg: Config) -> dict:
    """The source of a trained memory's cells: the training split (less a validation share) of its data set."""
    return {"kind": "dataset", "name": f"{cfg.dataset} train", "validation": cfg.validation,
            "copies": cfg.copies, "seed": cfg.seed, "copy_kind": cfg.copy_kind, "copy_strength": cfg.copy_strength}


def load(path: str | Path | RunDir, device: str = "auto", log=None, index: bool = True,
         encoder: nn.Module | None = None) -> MemoryClassifier:
    """A trained run directory as a classifier (weights-only loading: no code in the files runs).

    encoder: for a run trained with a user nn.Module (sam_cls.fit), a module of the same class; the run's
    weights are loaded into it (a run keeps weights, never code).

    A RunDir whose lock the caller holds (a command's add or forget) is used as it is, so save() commits under it.

    index=False leaves the saved index unread (None), for a caller about to build a new one (rebuild-index:
    it must work when the saved index is missing, damaged or another run's).
    """
    run = path if isinstance(path, RunDir) else RunDir(path, log)
    run.finish_unfinished()  # a kill after the last commit point leaves config.yaml and metrics.jsonl behind
    state = run.load_state(log=log)
    sharded = is_sharded(state)
    state = gather_shards(run, state)  # a distributed run's shards, as one memory (a no-op for others)
    try:  # the config the checkpoint was trained with, not config.yaml beside it (a copy for people)
        cfg = make_config(None, **state["config"])
    except (KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{run.checkpoint} holds no usable config ({e}): the file is corrupt") from None
    dev = resolve_device(device)
    if "data" not in state:  # written before runs kept their classes and input shape: read them off the data
        from sam_cls.setup import get_dataset

        data = get_dataset(cfg, log or (lambda _: None))
        state["data"] = {"name": cfg.dataset, "classes": list(data.classes), "image_shape": list(data.image_shape)}
    memory_size, dim = state["memory"]["embeddings"].shape
    if not index:
        return MemoryClassifier(run, cfg, state, dev, None, encoder)
    if sharded:  # each shard's index covered its own cells only: one over all of them, built now
        memory = state["memory"]["embeddings"].to(dev)
        index = build_index(memory, index_params(cfg, dev), max(cfg.topk, 1), calibrate=True)
        return MemoryClassifier(run, cfg, state, dev, index, encoder)
    saved = load_index(run.index_file(state), index_params(cfg, dev), expect_dim=dim, expect_size=memory_size)
    return MemoryClassifier(run, cfg, state, dev, saved, encoder)
