"""The one place that imports faiss: optional, with its torch bridge and GPU detection."""

from __future__ import annotations

import torch

try:
    import faiss

    # Patches faiss.Index methods to take torch tensors (CPU or GPU) without numpy copies.
    import faiss.contrib.torch_utils
except ImportError:  # the torch exact back-end still works without faiss
    faiss = None

FAISS_MISSING = "faiss is not installed: pip install 'sam-cls[cpu]' (or 'sam-cls[gpu]' on a CUDA machine)"

# Limits of faiss GPU k-selection (GPU_MAX_SELECTION_K) and of nprobe on GPU IVF indices.
GPU_MAX_K = 2048
GPU_MAX_NPROBE = 2048

_gpu_resources: dict[int, object] = {}


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


def gpu_resources(device: int):
    """One StandardGpuResources per device: each reserves scratch memory, so share it between indices."""
    if device not in _gpu_resources:
        _gpu_resources[device] = require_faiss().StandardGpuResources()
    return _gpu_resources[device]
