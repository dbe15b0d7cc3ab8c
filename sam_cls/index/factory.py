"""FAISS index_factory strings for each kind, with N-, d- and k-derived defaults for the knobs left unset."""

from __future__ import annotations

from ._faiss import has_faiss_gpu
from .params import HNSW_M, HNSW_QUANTIZER_MIN_NLIST, IndexParams, default_nlist, default_pq_m

FAISS_KINDS = ("flat", "ivf", "ivfpq", "hnsw")


def factory_string(kind: str, n: int, d: int, k: int, params: IndexParams) -> str:
    """The index_factory string for a kind, with N/d/k-derived defaults for unset knobs."""
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return f"HNSW{params.hnsw_m or HNSW_M},Flat"
    nlist = params.nlist or default_nlist(n)
    if nlist > n:
        raise ValueError(
            f"nlist={nlist} is more than the {n} cells to index: lower nlist (default {default_nlist(n)})"
        )
    ivf = f"IVF{nlist}"
    on_faiss_gpu = kind == "ivf" and params.cuda and has_faiss_gpu()  # the one kind faiss-gpu holds here
    # Many lists: find a query's nearest centroids by HNSW, not a scan of all of them. A faiss GPU index
    # scans its centroids fast and wants a flat quantizer, so an ivf index bound for one (faiss-gpu) keeps it.
    if nlist >= HNSW_QUANTIZER_MIN_NLIST and not on_faiss_gpu:
        ivf += f"_HNSW{HNSW_M}"
    if kind == "ivf":
        # Candidates are ranked by 8-bit codes of each cell's residual to its centroid; the read scores
        # them from the float32 memory, so the codes choose the K cells and never set their weights. On
        # CIFAR-10/conv1's trained memory the search was faster than over float32 lists at the same recall
        # (results/hot_path.json), and the lists take a quarter the bytes.
        # An index bound for a faiss GPU keeps float32 lists (--fp16 halves them), the form measured there.
        return f"{ivf},Flat" if on_faiss_gpu else f"{ivf},SQ8"
    if kind == "ivfpq":
        m = params.pq_m or default_pq_m(d)
        if d % m:
            raise ValueError(f"pq_m={m} must divide the embedding dimension {d} (default {default_pq_m(d)})")
        if n < 16:
            raise ValueError(
                f"ivfpq needs at least 16 cells to train its 4-bit codebooks, got {n}: use kind='flat'"
            )
        # 4-bit fast-scan PQ ranks candidates; the SQ8 codes (d bytes a cell) re-rank k_factor*k of them.
        # Chosen over 8-bit PQ alone (lower recall, and tens of seconds to train) and over an SQ4 refine:
        # this reaches the IVF recall ceiling and trains in well under a second (docs/INDEX.md).
        return f"{ivf},PQ{m}x4fs,Refine(SQ8)"
    raise ValueError(f"not a faiss index kind: {kind!r}")
