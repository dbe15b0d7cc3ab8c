"""Keeping an index in step with a memory bank that the trainer rewrites every step."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F

from .auto import build_index
from .base import MemoryIndex
from .params import IndexParams
from .recall import recall_at_k

# A refresh re-using the old quantizer that falls below this recall makes the next rebuild retrain.
RECALL_FLOOR = 0.9


class IndexRefresher:
    """Owns the index over a live (N, d) memory tensor and rebuilds it when a policy says it is stale.

    rebuild_every=R rebuilds every R steps; "auto" rebuilds when staleness() passes staleness_threshold;
    None only when asked (rebuild()), e.g. once an epoch before evaluation.
    IVF kinds re-add to the trained quantizer and retrain only every `retrain_every`-th rebuild (or after
    recall fell below RECALL_FLOOR); a retrain's k-means starts from the current centroids (cold after a
    recall below the floor), and `centroids` (from a checkpoint) make the first IVF index with no k-means.
    background=True builds the next index in a worker thread from a snapshot of the memory while searches
    use the current one, and swaps at the first step() after it is done.
    reorder (MemoryBank.reorder) lets a CPU IVF index lay the cells out list by list: each build that does
    calls it with the new row order, and the memory tensor given here must be the one it moves.
    """

    def __init__(
        self,
        memory: torch.Tensor,
        params: IndexParams,
        k: int,
        rebuild_every: int | str | None = "auto",
        staleness_threshold: float = 0.02,
        retrain_every: int = 10,
        background: bool = False,
        log: Callable[[str], None] | None = None,
        seed: int = 0,
        recall_sample: int = 256,
        staleness_sample: int = 1024,
        centroids: torch.Tensor | None = None,
        reorder: Callable[[torch.Tensor], None] | None = None,
    ):
        if rebuild_every not in ("auto", None) and not (isinstance(rebuild_every, int) and rebuild_every >= 1):
            raise ValueError(
                f"rebuild_every must be a positive number of steps or 'auto', got {rebuild_every!r}"
            )
        if retrain_every < 1:
            raise ValueError(f"retrain_every must be >= 1, got {retrain_every}")
        self.memory, self.k, self.seed = memory, k, seed
        self.rebuild_every, self.staleness_threshold = rebuild_every, staleness_threshold
        self.retrain_every, self.background = retrain_every, background
        self.recall_sample, self.staleness_sample = recall_sample, staleness_sample
        self.log = log or (lambda line: None)
        self.reorder = reorder
        self.rebuilds = 0
        self.history: list[dict] = []  # every rebuild record, oldest first
        self._steps_since = 0  # steps since the memory was last snapshotted for an index
        self._since_retrain = 0  # IVF rebuilds that re-used the quantizer since it was last trained
        self._retrain_next = False
        self._worker: threading.Thread | None = None  # the background build, while one runs
        self._job: dict | None = None  # what it was started from
        self._built: tuple | None = None  # (index, layout, recall, seconds) once it is done
        self._error: Exception | None = None

        start = time.perf_counter()
        snapshot = memory.detach()
        self._draw_samples(snapshot.shape[0])
        params = replace(params, list_order=reorder is not None)
        self.index: MemoryIndex = build_index(snapshot, params, k, log=self.log, seed=seed, centroids=centroids,
                                              kmeans_iterations=0)
        self._lay_out(self.index.take_layout())  # snapshot is a view of the memory: it moves too
        # Later builds come from the index's own rebuilder: its resolved kind and knobs, never "auto" again.
        self.params = replace(params, kind=self.index.kind)
        self._indexed_sample = snapshot[self._sample_ids].clone()
        if centroids is not None:  # a checkpoint's index again: its recall decided how the next retrain starts
            self._retrain_next = self._below_floor(self._recall(self.index, snapshot))
        self.log(
            f"index built: {self.description}, {self.index.size} cells, "
            f"{time.perf_counter() - start:.2f}s"
        )

    # -- searching and policy -------------------------------------------------------------------------
    @property
    def description(self) -> str:
        return self.index.description

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A training read's search of the current index (the previous one while a background rebuild runs)."""
        return self.index.search(queries, k, training=True)

    def centroids(self) -> torch.Tensor | None:
        """What the current index learned (IVF centroids): what a checkpoint keeps to rebuild it; else None."""
        return self.index.learned()

    def _below_floor(self, recall: float | None) -> bool:
        return recall is not None and recall < RECALL_FLOOR and self.index.trains

    def staleness(self) -> float:
        """Mean cosine drift (1 - cos) of a fixed sample of rows between their indexed and current values."""
        current = self.memory.detach()[self._sample_ids].float()
        # clamp: rounding can put cos a hair above 1 for unchanged cells
        return float((1.0 - F.cosine_similarity(current, self._indexed_sample, dim=1)).clamp_min(0).mean())

    def step(self, step: int) -> dict | None:
        """Call after each training step's memory write; returns the rebuild record when one completes."""
        record = self._collect()
        if record is not None:
            return record
        self._steps_since += 1
        if self._worker is not None:  # a background build is in flight: it is the pending rebuild
            return None
        reason = self._due()
        if reason is None:
            return None
        if self.background:
            self._start(reason, step)
            return None
        return self._rebuild_now(reason, retrain=self._retrain_due(), step=step)

    def rebuild(self, reason: str, retrain: bool = True, calibrate: bool = False) -> dict:
        """Forced rebuild from the current memory (e.g. before evaluation); IVF kinds retrain by default, and
        with calibrate choose their evaluation depth by measured recall (MemoryIndex.calibrate)."""
        self.close()  # a background build's snapshot is older than the memory now: drop it
        return self._rebuild_now(reason, retrain=retrain, calibrate=calibrate)

    def close(self) -> None:
        """Wait for a background build, if any, and drop its result."""
        if self._worker is not None:
            self._worker.join()
        self._worker = self._built = self._error = self._job = None

    def _due(self) -> str | None:
        """Why a rebuild is due now, or None."""
        if self.rebuild_every is None:
            return None
        if self.rebuild_every == "auto":
            drift = self.staleness()
            return (
                f"staleness {drift:.4f} > {self.staleness_threshold}"
                if drift > self.staleness_threshold
                else None
            )
        return f"every {self.rebuild_every} steps" if self._steps_since >= self.rebuild_every else None

    def _retrain_due(self) -> bool:
        return self.index.trains and (self._retrain_next or self._since_retrain + 1 >= self.retrain_every)

    # -- building -------------------------------------------------------------------------------------
    def _draw_samples(self, n: int) -> None:
        """Fixed, seeded rows for staleness and for recall queries: same seed, same rows, on any device.

        A layout change moves other cells into those rows; each rebuild re-reads the sample from the memory
        as laid out then, so staleness always compares a row with what the index holds for it.
        """
        gen = torch.Generator().manual_seed(self.seed)
        self._sample_ids = torch.randperm(n, generator=gen)[: self.staleness_sample].to(self.memory.device)
        self._recall_ids = torch.randperm(n, generator=gen)[: self.recall_sample].to(self.memory.device)

    def _recall(self, index: MemoryIndex, snapshot: torch.Tensor) -> float | None:
        """Recall@k on a fixed sample of cells used as queries; 1.0 for exact kinds, None when disabled."""
        if self.recall_sample <= 0:
            return None
        if index.exact:
            return 1.0
        return round(recall_at_k(index, snapshot, snapshot[self._recall_ids], self.k)["recall_at_k"], 4)

    def _rebuild_now(self, reason: str, retrain: bool, step: int | None = None, calibrate: bool = False) -> dict:
        start = time.perf_counter()
        before = self.staleness()
        snapshot = self.memory.detach()
        retrained = retrain and self.index.trains
        if retrained:  # k-means from the current centroids, unless they served below the recall floor
            self.index = self.index.rebuilder(retrain=True, warm=not self._retrain_next)(snapshot)
        else:  # in place: keeps IVF training, and no second copy of the cells
            self.index.refresh(snapshot)
        self._lay_out(self.index.take_layout())  # snapshot is a view of the memory: it moves too
        self._steps_since = 0
        # Recall at the built depth, before any calibration: it decides the next retrain, and a resumed run
        # (whose index starts at that depth) must decide it alike.
        recall = self._recall(self.index, snapshot)
        if calibrate:
            self.index.calibrate(snapshot, self.log)
        job = {"snapshot": snapshot, "reason": reason, "before": before, "retrained": retrained, "step": step}
        return self._install(job, recall, time.perf_counter() - start, background=False)

    def _start(self, reason: str, step: int) -> None:
        """Snapshot the memory and build the next index from it in a worker thread."""
        snapshot = self.memory.detach().clone()
        retrain = self._retrain_due()
        self._job = {"snapshot": snapshot, "reason": reason, "before": self.staleness(), "retrained": retrain,
                     "step": step}
        # Everything the worker needs from the current index is read here, in the searching thread.
        make = self.index.rebuilder(retrain=retrain, warm=not self._retrain_next)
        self._steps_since = 0

        def work():
            try:
                start = time.perf_counter()
                index = make(snapshot)
                layout = index.take_layout()
                if layout is not None:  # this thread's own copy, laid out now; the memory at the swap
                    snapshot.copy_(snapshot.index_select(0, layout))
                self._built = (index, layout, self._recall(index, snapshot), time.perf_counter() - start)
            except Exception as e:  # noqa: BLE001 -- kept and re-raised in the training thread by _collect
                self._error = e

        self._worker = threading.Thread(target=work, name="sam-cls-index-rebuild", daemon=True)
        self._worker.start()

    def _collect(self) -> dict | None:
        """Swap in a finished background index; re-raise its error if the build failed."""
        if self._worker is None or self._worker.is_alive():
            return None
        self._worker.join()
        built, error, job = self._built, self._error, self._job
        self._worker = self._built = self._error = self._job = None
        if error is not None:
            raise RuntimeError(f"background index rebuild failed: {error}") from error
        index, layout, recall, seconds = built
        # Rows written since the snapshot move with the rest, so the new index's ids find them too.
        self._lay_out(layout)
        self.index = index
        return self._install(job, recall, seconds, background=True)

    def _lay_out(self, layout: torch.Tensor | None) -> None:
        """Move the memory's rows to the order an index was just filled in, where it chose one."""
        if layout is not None:
            self.reorder(layout)

    def _install(self, job: dict, recall: float | None, seconds: float, background: bool) -> dict:
        """Book-keeping after a rebuild: the indexed sample, retrain schedule, record and log line."""
        snapshot, before, retrained = job["snapshot"], job["before"], job["retrained"]
        self._indexed_sample = snapshot[self._sample_ids].clone()
        self.rebuilds += 1
        self._since_retrain = 0 if retrained else self._since_retrain + 1
        self._retrain_next = self._below_floor(recall)
        record = {
            "reason": job["reason"],
            "seconds": round(seconds, 4),
            "staleness_before": None if before is None else round(before, 6),
            "recall_after": recall,
            "kind": self.index.kind,
            "retrained": retrained,
            "background": background,
            "step": job["step"],
        }
        self.history.append(record)
        self.log(
            f"index rebuild {self.rebuilds} ({job['reason']}): {self.index.kind} in {seconds:.2f}s, "
            f"staleness {record['staleness_before']} -> 0, recall@{self.k} {recall}, retrained {retrained}"
            f"{', background' if background else ''}"
        )
        return record
