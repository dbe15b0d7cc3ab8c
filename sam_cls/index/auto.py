"""Choosing a back-end from N, d, k and the device, and the build / load entry points."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from ._faiss import GPU_MAX_K, has_faiss, has_faiss_gpu, require_faiss
from .base import METRIC, MemoryIndex, check_vectors
from .factory import FAISS_KINDS
from .faiss_index import FaissIndex, faiss_from_bytes
from .params import IVF_KINDS, WARM_KMEANS_ITERATIONS, IndexParams
from .store import REBUILD_HINT, IndexMismatchError, check_header, memory_bound, read_index_file
from .torch_exact import TorchExactIndex

# Up to here exact search is cheap on a CPU and needs no training. Beyond, IVF wins: at 6e4 cells a flat
# scan took several times IVF's search at recall ~0.99 (docs/INDEX.md).
FLAT_MAX_CELLS = 20_000
# From here on a CPU memory gets ivfpq: with lists of ~sqrt(N)/4 cells, its 4-bit fast-scan and short SQ8
# re-rank beat ivf's scan of 8-bit codes at 1e7 cells and tie at 1e6 (a training step at K=256 on 2 CPU cores;
# results/scaling.json). Both keep the float32 memory beside the index, and ivf's 8-bit codes take fewer
# bytes than ivfpq's PQ codes and re-rank codes, so size does not decide.
IVFPQ_MIN_CELLS = 3_000_000
# Approximate search pays only when k is a small share of N: IVF/HNSW would otherwise scan most of it.
APPROX_MIN_CELLS_PER_K = 64


def choose_kind(n: int, d: int, k: int, device: str = "cpu") -> tuple[str, str]:
    """The index kind "auto" resolves to, and why, in words for the log."""
    raw = n * d * 4
    if torch.device(device).type == "cuda":
        if k > GPU_MAX_K:
            return "torch", f"k={k} is above the faiss GPU limit {GPU_MAX_K}"
        if not has_faiss_gpu():
            return "torch", "CUDA without a faiss GPU build: exact matmul+topk on the GPU"
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        if raw <= free // 4:
            return "flat", f"{n} cells ({raw / 2**20:.0f} MiB) fit the GPU: exact faiss GPU search"
        return "ivf", f"{n} cells ({raw / 2**20:.0f} MiB) are too big for exact GPU search"
    if not has_faiss():
        return "torch", "faiss is not installed: exact torch search"
    if n <= FLAT_MAX_CELLS or n < APPROX_MIN_CELLS_PER_K * k:
        return "flat", f"N={n} <= {FLAT_MAX_CELLS} (or k={k} is large for N): exact search is cheap"
    if n >= IVFPQ_MIN_CELLS:
        return "ivfpq", f"N={n} >= {IVFPQ_MIN_CELLS}: long inverted lists, scanned fastest as 4-bit PQ codes"
    return "ivf", f"N={n} > {FLAT_MAX_CELLS} cells: inverted lists instead of a full scan"


def build_index(
    vectors: torch.Tensor,
    params: IndexParams,
    k: int,
    log: Callable[[str], None] | None = None,
    *,
    seed: int = 0,
    centroids: torch.Tensor | None = None,
    kmeans_iterations: int = WARM_KMEANS_ITERATIONS,
    calibrate: bool = False,
) -> MemoryIndex:
    """Index L2-normalised (N, d) cells for inner-product top-k; kind="auto" picks by N, d, k and device.

    centroids and kmeans_iterations start an IVF kind's k-means (FaissIndex.build); other kinds ignore them.
    calibrate chooses an IVF kind's evaluation depth by the recall it measures (MemoryIndex.calibrate); it is
    for indices that classify, and only where params.nprobe leaves the depth open.
    """
    vectors = check_vectors(vectors)
    n, d = vectors.shape
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of cells {n}")
    kind = params.kind
    if kind == "auto":
        kind, why = choose_kind(n, d, k, params.device)
        if log:
            log(f"index auto -> {kind}: {why}")
    if params.train_nprobe and kind not in IVF_KINDS and log:
        log(f"--train-nprobe {params.train_nprobe} applies to IVF indices only: the {kind} index searches in full")
    if kind == "torch":
        return TorchExactIndex(vectors, params.device)
    require_faiss()
    index = FaissIndex.build(vectors, kind, replace(params, kind=kind), k, log, seed=seed, centroids=centroids,
                             kmeans_iterations=kmeans_iterations)
    if calibrate and params.nprobe is None:
        # Ids follow the list layout where the build chose one (the caller moves its rows by take_layout).
        index.calibrate(vectors if index.layout is None else vectors[index.layout], log)
    return index


def load_index(
    path: str | Path,
    params: IndexParams | None = None,
    expect_dim: int | None = None,
    expect_size: int | None = None,
) -> MemoryIndex:
    """Load a saved index, checking kind, metric, dim and size; params place it and may set search knobs."""
    header, payload = read_index_file(path)
    params = params or IndexParams()
    kind = header.get("kind")
    check_header(
        path,
        header,
        {
            "metric": METRIC,
            "dim": expect_dim,
            "size": expect_size,
            "kind": None if params.kind == "auto" else params.kind,
        },
    )
    params = replace(params, kind=kind)
    dim, size = header.get("dim"), header.get("size")
    if not (isinstance(dim, int) and isinstance(size, int) and dim > 0 and size > 0):
        raise IndexMismatchError(
            f"{path}: corrupt header (dim={dim!r}, size={size!r}); {REBUILD_HINT} to rebuild it"
        )
    if kind == "torch":
        if len(payload) != size * dim * 4:
            raise IndexMismatchError(
                f"{path}: payload holds {len(payload)} bytes, not {size}x{dim} float32 cells; "
                f"{REBUILD_HINT} to rebuild it"
            )
        vectors = torch.frombuffer(payload, dtype=torch.float32).view(size, dim)
        return TorchExactIndex(vectors, params.device)
    if kind not in FAISS_KINDS:
        raise IndexMismatchError(f"{path}: unknown index kind {kind!r}; {REBUILD_HINT} to rebuild it")
    require_faiss()
    try:
        with memory_bound(len(payload)):  # a length faiss reads is allocated before it is checked
            index = faiss_from_bytes(payload, kind, params, header.get("factory", kind))
    except MemoryError:
        raise IndexMismatchError(
            f"{path}: the index declares more memory than its {len(payload)} bytes can hold (a crafted or damaged "
            f"file); {REBUILD_HINT} to rebuild it"
        ) from None
    except RuntimeError as e:  # faiss raises RuntimeError on a payload it cannot parse
        raise IndexMismatchError(
            f"{path}: faiss cannot read the index ({str(e).splitlines()[0]}); {REBUILD_HINT} to rebuild it"
        ) from e
    # The header was checked; the faiss payload must agree with it.
    metric = (
        METRIC if index.metric == require_faiss().METRIC_INNER_PRODUCT else f"faiss metric {index.metric}"
    )
    check_header(
        path,
        {"dim": index.dim, "size": index.size, "metric": metric},
        {"dim": dim, "size": size, "metric": METRIC},
    )
    return index
