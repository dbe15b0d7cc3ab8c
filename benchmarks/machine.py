"""What a benchmark's figures were measured on, recorded beside them in every results file."""

import json
import os
import platform
import shlex
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch  # first: faiss imported after it shares torch's OpenMP runtime (sam_cls/index/_faiss.py)

# isort: split
import faiss
import numpy as np


def proc_kib(file: str, key: str) -> int | None:
    """A 'Key: value kB' field of a Linux /proc file, or None elsewhere."""
    try:
        line = next((x for x in Path(file).read_text().splitlines() if x.startswith(key + ":")), None)
    except OSError:
        return None
    return int(line.split()[1]) if line else None


def available_ram() -> int:
    """Bytes the kernel could hand out now: MemAvailable counts reclaimable page cache, which free RAM does not."""
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


def describe() -> dict:
    """CPU, memory, GPU and library versions: enough to tell whether two results files are comparable."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "ram_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "faiss": faiss.__version__,
            "numpy": np.__version__}


def write_report(report: dict, path: str | Path) -> None:
    """A benchmark's JSON, led by the command line that produced it and closed by the machine it ran on."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    full = {"command": shlex.join(["python", *sys.argv]), **report, "machine": describe()}
    out.write_text(json.dumps(full, indent=1) + "\n")
    print(f"wrote {out}")
