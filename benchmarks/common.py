"""What the benchmarks share: the machine and the report, RAM checks, one median timer, the synthetic memory,
and the CIFAR-10/conv1 trainer.

The scripts in benchmarks/ import it as `common` (python puts a script's folder on the path); those in
benchmarks/ablations/ put benchmarks/ on sys.path first. The trainer's set-up (make_config, Trainer) is used
here only, so a change to it is adapted in one place.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch  # first: faiss imported after it shares torch's OpenMP runtime (sam_cls/index/_faiss.py)

# isort: split
import faiss
import numpy as np
import torch.nn.functional as F

from sam_cls.config import make_config
from sam_cls.index import IndexParams, IndexRefresher
from sam_cls.index.synthetic import clustered_embeddings
from sam_cls.memory import MemoryBank
from sam_cls.read import exclusion_mask, sparse_read
from sam_cls.train import Trainer

# ----------------------------------------------------------------------------- hyper-parameters, all here
D, B, K = 128, 256, 256  # embedding dim, batch, cells read per query: the defaults in sam_cls/config.py
NUM_CLASSES = 10  # label = synthetic cluster mod C, as many classes as CIFAR-10
CLUSTERS = 100
TEMPERATURE, ETA = 0.05, 0.5  # config.py defaults: softmax temperature, memory write momentum
QUERY_NOISE = 0.1  # a query is its own cell plus noise: an encoder output near the cell it last wrote
# Resident bytes a cell for each index (RAM checks only).
INDEX_BYTES = {"flat": 4 * D, "torch": 4 * D, "ivf": D + 16, "hnsw": 4 * D + 320, "ivfpq": D + 80}
WARMUP, REPEATS = 3, 25  # median_ms's defaults: 25, as a 1e4 step is ~15 ms and its medians over 10 varied 2x
BUDGET_S = 30.0  # a slow measurement (dense at 1e6) takes fewer repeats, never fewer than 3
CIFAR10_DIR = "../shared/data/cifar10-jpeg"  # CIFAR-10 in image-folder layout (train/, test/)


# ----------------------------------------------------------------------------- the machine and the report
def describe() -> dict:
    """CPU, memory, GPU and library versions: enough to tell whether two results files are comparable."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "ram_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "faiss": faiss.__version__,
            "numpy": np.__version__}


def write_report(report: dict, path: str | Path, quiet: bool = False) -> dict:
    """A benchmark's JSON, led by the command line that produced it and closed by the machine it ran on."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    full = {"command": shlex.join(["python", *sys.argv]), **report, "machine": describe()}
    out.write_text(json.dumps(full, indent=1) + "\n")
    if not quiet:
        print(f"wrote {out}")
    return full


# ----------------------------------------------------------------------------- RAM and peaks
def proc_kib(file: str, key: str) -> int | None:
    """A 'Key: value kB' field of a Linux /proc file, or None elsewhere."""
    try:
        line = next((x for x in Path(file).read_text().splitlines() if x.startswith(key + ":")), None)
    except OSError:
        return None
    return int(line.split()[1]) if line else None


def available_ram(planned_gib: float | None = None) -> int:
    """Bytes the kernel could hand out now: MemAvailable counts reclaimable page cache, which free RAM does not.
    With planned_gib (a VM whose memory grows on use reports too little), that total less what this process holds."""
    if planned_gib is not None:
        return int(planned_gib * 2**30) - (proc_kib("/proc/self/status", "VmRSS") or 0) * 1024
    kib = proc_kib("/proc/meminfo", "MemAvailable")
    return kib * 1024 if kib is not None else os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def sizes_that_fit(sizes: str, need: Callable[[int], int], skipped: list[dict]) -> Iterator[int]:
    """Each N of a comma-separated list whose need(N) bytes fit in RAM now; the others go to `skipped`."""
    for n in (int(float(x)) for x in sizes.split(",")):
        if (bytes_needed := need(n)) > available_ram():
            skipped.append({"n_cells": n, "why": f"needs ~{bytes_needed / 2**30:.1f} GiB"})
            print(f"{n:>9} skipped: needs ~{bytes_needed / 2**30:.1f} GiB")
            continue
        yield n


# The GPU helpers act only once something ran on CUDA: a CPU run on a GPU machine never starts it.
def reset_peaks() -> None:
    """Restart the peak-RSS (Linux) and GPU peak-memory counters, so each row reports its own peaks."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    if torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def peak_rss_mb() -> float:
    """Peak resident set since the last reset (VmHWM), else the process-lifetime ru_maxrss."""
    kib = proc_kib("/proc/self/status", "VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kib / 1024, 1)


def peak_gpu_mb() -> float | None:
    """Peak GPU memory allocated by torch since the last reset; None on a CPU run."""
    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_initialized() else None


# ----------------------------------------------------------------------------- timing
def now() -> float:
    """perf_counter once queued GPU work has finished, so a reading covers it (CUDA kernels run asynchronously)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


class Laps:
    """A call's split times for median_ms: made at the start of the call, lap(name) at the end of each part."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self.last = now()

    def lap(self, name: str) -> Laps:
        t = now()
        self.ms[name], self.last = (t - self.last) * 1e3, t
        return self


def median_ms(fn: Callable[[int], object] | dict[str, Callable[[int], object]], repeats: int = REPEATS,
              warmup: int = WARMUP, budget_s: float = BUDGET_S):
    """Median milliseconds of fn(i), i = 0, 1, ..., over `repeats` calls after `warmup` uncounted ones.

    A slow fn gets fewer repeats (never under 3), so a measurement stays near budget_s. fn may be a dict of
    variants: each round calls every one with the same i, in an order rotated each round so that each goes
    first, and follows each other, as often (drifting machine load and warm caches favour none), and a dict of
    medians comes back. A call that returns its Laps gives the median of each of its parts and of their sum
    ("total") instead of a float.
    """
    variants = fn if isinstance(fn, dict) else {"": fn}
    times: dict[str, list] = {name: [] for name in variants}
    names, i = list(variants), 0
    while i < warmup + repeats:
        start = now()
        for name in names[i % len(names) :] + names[: i % len(names)]:  # each variant leads in turn
            t0 = now()
            out = variants[name](i)
            ms = (now() - t0) * 1e3
            if i >= warmup:
                times[name].append({**out.ms, "total": sum(out.ms.values())} if isinstance(out, Laps) else ms)
        if i == max(warmup, 1) - 1:
            repeats = min(repeats, max(3, int(budget_s / max(now() - start, 1e-6))))
        i += 1

    def median(values: list) -> float | dict[str, float]:
        if isinstance(values[0], dict):
            return {part: float(np.median([v[part] for v in values])) for part in values[0]}
        return float(np.median(values))

    medians = {name: median(t) for name, t in times.items()}
    return medians if isinstance(fn, dict) else medians[""]


# ----------------------------------------------------------------------------- the synthetic memory and step
def make_bank(n: int, seed: int, device: str = "cpu") -> MemoryBank:
    """N unit-norm clustered cells labelled by cluster mod NUM_CLASSES, drawn on the CPU (same on any device)."""
    cells, _ = clustered_embeddings(n, D, CLUSTERS, seed)
    # clustered_embeddings returns no cluster ids; its centres are the seeded generator's first draw, so draw
    # them again and label each cell by its nearest centre (its own cluster at this noise level).
    centres = F.normalize(torch.randn(CLUSTERS, D, generator=torch.Generator().manual_seed(seed)), dim=1)
    labels = torch.cat([(c @ centres.T).argmax(1) for c in cells.split(1 << 20)]) % NUM_CLASSES
    return MemoryBank(cells.to(device), labels.to(device))


def make_batches(bank: MemoryBank, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, B) own-cell ids and (count, B, d) queries: each its own cell plus noise, re-normalised."""
    gen = torch.Generator().manual_seed(seed + 1)
    # randint, not randperm: no O(N) work per size (a repeated id in a batch is harmless)
    idx = torch.randint(bank.size, (count, B), generator=gen).to(bank.embeddings.device)
    noise = (torch.randn(count, B, D, generator=gen) * QUERY_NOISE / D**0.5).to(bank.embeddings.device)
    return idx, F.normalize(bank.embeddings[idx] + noise, dim=2)


def training_refresher(bank: MemoryBank, params: IndexParams, seed: int, layout: bool = True) -> IndexRefresher:
    """What a training step searches through (k = K + 1, the shallower training depth of IVF), never rebuilt;
    with layout, an IVF index lays the memory out list by list as a trainer's does (MemoryBank.reorder)."""
    return IndexRefresher(bank.embeddings, params, k=K + 1, rebuild_every=None, seed=seed, recall_sample=0,
                          reorder=bank.reorder if layout else None)


def sparse_step(bank: MemoryBank, refresher: IndexRefresher, idx: torch.Tensor, queries: torch.Tensor,
                step: int, nprobe: int | None = None) -> Laps:
    """A training step less its encoder, on B examples `idx` and their queries, timed in its three parts:
    search, sparse read forward and backward (the query's own cell masked), memory write. nprobe: an IVF
    training read at that depth instead of the index's training default."""
    u = queries.clone().requires_grad_()
    laps = Laps()
    # K + 1 so that masking the query's own cell leaves K
    if nprobe is None:
        _, ids = refresher.search(u.detach(), K + 1)
    else:
        _, ids = refresher.index.search(u.detach(), K + 1, training=True, nprobe=nprobe)
    laps.lap("search")
    own = bank.rows[idx]  # idx names examples; the index's ids are the memory's rows
    log_probs = sparse_read(u, ids, bank.embeddings, bank.labels, NUM_CLASSES, TEMPERATURE,
                            exclude=exclusion_mask(ids, own))
    F.nll_loss(log_probs, bank.labels[own]).backward()
    laps.lap("read")
    bank.write(idx, u, ETA, step=step)
    return laps.lap("write")


# ----------------------------------------------------------------------------- the CIFAR-10/conv1 trainer
def conv1_run(data_dir: str, quick: bool, synthetic_train: int = 2048, required: bool = True,
              **options) -> tuple[dict, str] | None:
    """Trainer options for conv1 on CIFAR-10 (JPEG copy), or with quick on synthetic 3x32x32 images, and
    the data's name. Where the image folder is absent: exit, or None when not `required`."""
    base: dict = {"encoder": "conv1", "seed": 0, **options}
    if quick:
        base.update(dataset="synthetic", synthetic_train=synthetic_train, synthetic_test=256,
                    synthetic_shape=[3, 32, 32])
        return base, f"synthetic ({synthetic_train} images, 3x32x32)"
    if not (Path(data_dir) / "train").is_dir():
        if required:
            sys.exit(f"error: no image folder at {data_dir}/train: pass --data-dir (or --quick)")
        return None
    return {**base, "dataset": "imagefolder", "data_dir": data_dir}, "CIFAR-10 (JPEG copy)"


def trainer(options: dict, **extra) -> Trainer:
    """A quiet trainer set up as fit() sets it up (memory encoded, index built), ready for train_epoch."""
    t = Trainer(make_config(None, **options, **extra), log=lambda line: None)
    t.prepare()
    return t
