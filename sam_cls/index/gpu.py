"""Placing a CPU-built faiss index on a GPU where faiss can hold it, and saying why where it cannot."""

from __future__ import annotations

import torch

from ._faiss import GPU_MAX_K, GPU_MAX_NPROBE, gpu_resources, has_faiss_gpu, require_faiss
from .params import IVF_KINDS, IndexParams

# Faiss GPU has no HNSW, and no fast-scan PQ or refine stage, so these stay on the CPU.
CPU_ONLY_KINDS = ("hnsw", "ivfpq")


def hnsw_quantizer(ivf):
    """The HNSW coarse quantizer of a CPU IVF index, or None for a flat one."""
    quantizer = require_faiss().downcast_index(ivf.quantizer)
    return quantizer if hasattr(quantizer, "hnsw") else None


def why_not_on_gpu(cpu_index, kind: str, factory: str, k: int | None) -> str | None:
    """The reason faiss cannot hold this index on a GPU, or None where it can."""
    faiss = require_faiss()
    if not has_faiss_gpu():
        return "this faiss build has no GPU support (install faiss-gpu, or use kind='torch')"
    if kind in CPU_ONLY_KINDS:
        return f"faiss has no GPU form of the {kind} index {factory}"
    if k is not None and k > GPU_MAX_K:
        return f"k={k} is above the faiss GPU limit {GPU_MAX_K}"
    if kind in IVF_KINDS:
        ivf = faiss.extract_index_ivf(cpu_index)
        if ivf.nprobe > GPU_MAX_NPROBE:
            return f"nprobe={ivf.nprobe} is above the faiss GPU limit {GPU_MAX_NPROBE}"
        if hnsw_quantizer(ivf) is not None:
            return (f"faiss GPU indices scan their centroids and cannot clone the HNSW quantizer of {factory} "
                    "(built for the CPU): rebuild it for the GPU with `sam-cls rebuild-index --device cuda`")
    return None


def to_gpu(cpu_index, params: IndexParams) -> tuple[object, torch.device]:
    """A GPU copy of the index on the device params names (float16 storage with params.fp16)."""
    faiss = require_faiss()
    options = faiss.GpuClonerOptions()
    options.useFloat16 = params.fp16
    device = torch.device(params.device)
    gpu = device.index if device.index is not None else torch.cuda.current_device()
    return faiss.index_cpu_to_gpu(gpu_resources(gpu), gpu, cpu_index, options), torch.device("cuda", gpu)
