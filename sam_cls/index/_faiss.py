"""The one place that imports faiss: optional, with its torch bridge and GPU detection."""

from __future__ import annotations

import ctypes
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch  # before faiss: see OPENMP_NOT_SHARED

try:
    import faiss

    # Patches faiss.Index methods to take torch tensors (CPU or GPU) without numpy copies.
    import faiss.contrib.torch_utils
except ImportError:  # the torch exact back-end still works without faiss
    faiss = None

# torch loads its libgomp globally, so a faiss imported after it binds its OpenMP calls to that one runtime
# and one pool of threads serves both. A faiss imported first keeps its own: two pools then contend for the
# cores and spin-wait against each other, and the torch work between searches slows down (a training step
# about a quarter slower; docs/PERFORMANCE.md).
OPENMP_NOT_SHARED = (
    "faiss does not share torch's OpenMP runtime (usually because faiss was imported before torch), so two "
    "thread pools contend for the CPU (a CPU training step measured ~1.25x slower): import torch (or sam_cls) "
    "before faiss"
)

FAISS_MISSING = "faiss is not installed: pip install 'sam-cls[cpu]' (or 'sam-cls[gpu]' on a CUDA machine)"

# Limits of faiss GPU k-selection (GPU_MAX_SELECTION_K) and of nprobe on GPU IVF indices.
GPU_MAX_K = 2048
GPU_MAX_NPROBE = 2048

_gpu_resources: dict[int, object] = {}


def openmp_shared_with_torch() -> bool | None:
    """Whether faiss's OpenMP calls reach torch's libgomp; None where that can't be told (no faiss or libgomp)."""
    torch_gomp = Path(torch.__file__).parent / "lib" / "libgomp.so.1"  # what Linux torch wheels ship
    if faiss is None or not torch_gomp.exists():
        return None
    gomp = ctypes.CDLL(str(torch_gomp))  # already loaded by torch: this is the same library, not a new copy
    before = faiss.omp_get_max_threads()
    # Thread counts are one runtime's per-thread state: only a shared runtime sees faiss's change. Lowering
    # (from 2 on) can't hit a thread limit; the count is set back, for this calling thread, right after.
    probe = before - 1 if before > 1 else 2
    faiss.omp_set_num_threads(probe)
    shared = gomp.omp_get_max_threads() == probe
    faiss.omp_set_num_threads(before)
    return shared


if openmp_shared_with_torch() is False:
    warnings.warn(OPENMP_NOT_SHARED, RuntimeWarning)


def require_faiss():
    """Return the faiss module, or say how to install it."""
    if faiss is None:
        raise ImportError(FAISS_MISSING)
    return faiss


def has_faiss() -> bool:
    """True when some faiss build can be imported."""
    return faiss is not None


def has_faiss_gpu() -> bool:
    """True when faiss was built with GPU support and a CUDA device is visible."""
    return faiss is not None and hasattr(faiss, "StandardGpuResources") and torch.cuda.is_available()


@contextmanager
def omp_threads(n: int):
    """Run faiss with n OpenMP threads in this thread only (OpenMP thread counts are per calling thread)."""
    faiss = require_faiss()
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def gpu_resources(device: int):
    """One StandardGpuResources per device: each reserves scratch memory, so share it between indices."""
    if device not in _gpu_resources:
        _gpu_resources[device] = require_faiss().StandardGpuResources()
    return _gpu_resources[device]
