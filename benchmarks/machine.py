"""What a benchmark's figures were measured on, recorded beside them in every results file."""

import json
import os
import platform
import shlex
import sys
from pathlib import Path

import faiss
import numpy as np
import torch


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
