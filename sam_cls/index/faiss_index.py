"""FAISS indices built from factory strings (flat, ivf, ivfpq, hnsw), placed on a GPU when faiss can."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import replace

import numpy as np
import torch

from ._faiss import GPU_MAX_K, GPU_MAX_NPROBE, gpu_resources, has_faiss_gpu, require_faiss
from .base import MemoryIndex, check_vectors
from .params import (
    HNSW_EF_CONSTRUCTION,
    HNSW_M,
    HNSW_QUANTIZER_MIN_NLIST,
    IVF_KINDS,
    REFINE_K_FACTOR,
    TRAIN_POINTS_PER_LIST,
    WARM_KMEANS_ITERATIONS,
    IndexParams,
    default_ef_search,
    default_nlist,
    default_nprobe,
    default_pq_m,
    quantizer_ef_search,
)

FAISS_KINDS = ("flat", "ivf", "ivfpq", "hnsw")
# Faiss GPU has no HNSW, and no fast-scan PQ or refine stage, so these stay on the CPU.
CPU_ONLY_KINDS = ("hnsw", "ivfpq")


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
        # CIFAR-10/conv1's trained memory (N=5e4, nlist 894, k=257, 2 CPU cores; benchmarks/hot_path.py) a
        # training search of 128 queries right after the encoder's step took 5.5 ms against 7.3 ms with
        # float32 lists, recall@257 0.754 either way (nprobe 19); at nprobe 74, 10.1 against 14.5 ms for
        # recall 0.968 against 0.970. The lists take a quarter the bytes.
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
        # Chosen over 8-bit PQ alone (recall@256 0.92-0.96 at N=2e4, d=64, and 20-40 s to train) and over an
        # SQ4 refine (0.94): this reaches the IVF recall ceiling and trains in well under a second.
        return f"{ivf},PQ{m}x4fs,Refine(SQ8)"
    raise ValueError(f"not a faiss index kind: {kind!r}")


class FaissIndex(MemoryIndex):
    """A faiss index over the memory cells, inner-product metric, searched with torch tensors."""

    def __init__(
        self,
        cpu_index,
        kind: str,
        params: IndexParams,
        factory: str,
        k: int | None = None,
        template=None,
        log: Callable[[str], None] | None = None,
        place: bool = True,
    ):
        self.faiss = require_faiss()
        self.kind, self.params, self.factory, self.k = kind, params, factory, k
        self.index = cpu_index
        self.on_gpu = False
        # Serialized trained-but-empty CPU index: new values are re-added to it without re-training.
        self._template = template
        self._log = log
        self.layout: torch.Tensor | None = None
        self._set_search_knobs(cpu_index, params)
        # Params as this index actually searches, so a rebuild copies them without reading the live index.
        if kind in IVF_KINDS:
            self.params = replace(params, kind=kind, nprobe=self._get("nprobe"))
        elif kind == "hnsw":
            self.params = replace(params, kind=kind, ef_search=self._get("efSearch"))
        else:
            self.params = replace(params, kind=kind)
        self._describe()
        if place:
            self.place()

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        vectors: torch.Tensor,
        kind: str,
        params: IndexParams,
        k: int,
        log: Callable[[str], None] | None = None,
        seed: int = 0,
        place: bool = True,
        centroids: torch.Tensor | None = None,
        kmeans_iterations: int = WARM_KMEANS_ITERATIONS,
    ) -> FaissIndex:
        """Train (IVF kinds) and fill a new index; deterministic under `seed` on the CPU.

        centroids (nlist, d), an earlier index's over earlier values of these cells, start k-means warm for
        kmeans_iterations; with 0 they are the coarse quantizer as given (a resumed run's index, rebuilt
        exactly). Without centroids k-means starts cold and runs faiss's iterations.
        """
        if kmeans_iterations < 0:
            raise ValueError(f"kmeans_iterations must be >= 0, got {kmeans_iterations}")
        faiss = require_faiss()
        x = check_vectors(vectors).cpu()
        n, d = x.shape
        factory = factory_string(kind, n, d, k, params)
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        if kind in IVF_KINDS:
            ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
            ivf.cp.seed = seed  # faiss k-means has its own RNG: seed it for reproducible lists
            ivf.cp.max_points_per_centroid = TRAIN_POINTS_PER_LIST
            start = None if centroids is None else centroids.detach().float().cpu().contiguous().numpy()
            if start is not None and start.shape != (ivf.nlist, d):
                if log:
                    log(f"index: {start.shape[0]}x{start.shape[1]} centroids do not fit {ivf.nlist} lists of "
                        f"dimension {d} (a resized memory or another nlist): k-means starts cold")
                start = None
            if start is None or kmeans_iterations > 0:
                # Coarse k-means on all threads, assigning by exact search; faiss starts from centroids
                # already in clustering.centroids.
                clustering = faiss.Clustering(d, ivf.nlist, ivf.cp)
                if start is not None:
                    clustering.niter = kmeans_iterations
                    faiss.copy_array_to_vector(start.ravel(), clustering.centroids)
                clustering.train(x.numpy(), faiss.IndexFlatIP(d))
                start = faiss.vector_to_array(clustering.centroids).reshape(ivf.nlist, d)
            # Filling the quantizer here makes index.train skip it.
            with omp_threads(1):  # parallel HNSW inserts race: one thread keeps the graph deterministic
                ivf.quantizer.add(start)
            if kind == "ivfpq":
                ivf.pq.cp.seed = seed
                index.k_factor = REFINE_K_FACTOR
            # Search knobs first: an HNSW quantizer's beam also decides the lists the layout assigns below,
            # and it must be the beam faiss's own add would use.
            _set_nprobe(ivf, params.nprobe or default_nprobe(n, ivf.nlist, k))
            # Trained in the layout it is filled in: a rebuild from the memory laid out this way (a resumed
            # run's) then draws the same training sample and repeats this index exactly.
            x, layout, lists = _list_layout(ivf, x) if params.lays_out_lists else (x, None, None)
            # ivfpq's PQ codebooks are thousands of tiny k-means steps: barrier-bound, and 50x slower on 2
            # threads than on 1 when another process holds a core; one thread costs < 1 s. ivf's SQ8 ranges
            # are one assignment pass and a min/max, which all threads share.
            with omp_threads(1) if kind == "ivfpq" else nullcontext():
                index.train(x)
        elif kind == "hnsw":
            index.hnsw.efSearch = params.ef_search or default_ef_search(k)
            if index.hnsw.efSearch < k:
                raise ValueError(f"ef_search={index.hnsw.efSearch} must be >= k={k} for an hnsw index")
            index.hnsw.efConstruction = max(HNSW_EF_CONSTRUCTION, params.hnsw_m or HNSW_M)
        template = faiss.serialize_index(index)  # trained and empty: what refreshes re-add to
        built = cls(index, kind, params, factory, k, template, log, place=False)
        if kind in IVF_KINDS:
            built._fill(x, layout, lists)
        else:
            built.add(x)
        if place:
            built.place()
        return built

    def centroids(self) -> torch.Tensor | None:
        """The coarse centroids (nlist, d) of an IVF kind, from which its retrain starts; None otherwise."""
        if self.kind not in IVF_KINDS:
            return None
        # A GPU index's trained, empty CPU form holds the same quantizer without copying its lists back.
        cpu = self.faiss.deserialize_index(self._template_bytes()) if self.on_gpu else self.index
        return self.faiss.extract_index_ivf(cpu).quantizer.reconstruct_n(0, self.nlist)

    def add(self, x: torch.Tensor) -> None:
        """Append cells; a GPU index takes CPU or same-device tensors directly."""
        self.index.add(x if self.on_gpu else x.cpu())
        self._describe()

    def place(self) -> None:
        """Move to the GPU that params.device names when faiss can; else stay on the CPU and say why."""
        if self.on_gpu or not self.params.cuda:
            return
        nprobe = self._get("nprobe") if self.kind in IVF_KINDS else 0
        why = None
        if not has_faiss_gpu():
            why = "this faiss build has no GPU support (install faiss-gpu, or use kind='torch')"
        elif self.kind in CPU_ONLY_KINDS:
            why = f"faiss has no GPU form of the {self.kind} index {self.factory}"
        elif self.k is not None and self.k > GPU_MAX_K:
            why = f"k={self.k} is above the faiss GPU limit {GPU_MAX_K}"
        elif nprobe > GPU_MAX_NPROBE:
            why = f"nprobe={nprobe} is above the faiss GPU limit {GPU_MAX_NPROBE}"
        elif self.kind in IVF_KINDS and _hnsw_quantizer(self.faiss.extract_index_ivf(self.index)) is not None:
            why = (f"faiss GPU indices scan their centroids and cannot clone the HNSW quantizer of {self.factory} "
                   "(built for the CPU): rebuild it for the GPU with `sam-cls rebuild-index --device cuda`")
        if why:
            if self._log:
                self._log(f"index stays on the CPU: {why}; queries are copied over and results back")
            return
        faiss = self.faiss
        options = faiss.GpuClonerOptions()
        options.useFloat16 = self.params.fp16
        device = torch.device(self.params.device)
        gpu = device.index if device.index is not None else torch.cuda.current_device()
        self.index = faiss.index_cpu_to_gpu(gpu_resources(gpu), gpu, self.index, options)
        self.on_gpu, self.gpu_device = True, torch.device("cuda", gpu)
        self._describe()

    # -- the MemoryIndex interface --------------------------------------------------------------------
    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def nlist(self) -> int:
        """Inverted lists of an IVF kind."""
        return int(self.index.nlist if self.on_gpu else self.faiss.extract_index_ivf(self.index).nlist)

    @property
    def metric(self) -> int:
        return int(self.index.metric_type)

    def _search(
        self, queries: torch.Tensor, k: int, nprobe: int | None, k_factor: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        narrower = {
            knob: value
            for knob, value, kinds in (("nprobe", nprobe, IVF_KINDS), ("k_factor", k_factor, ("ivfpq",)))
            if value is not None and self.kind in kinds and value < self._get(knob)
        }
        if narrower:
            with ExitStack() as knobs:  # this call only: the index keeps its own depth
                for knob, value in narrower.items():
                    knobs.enter_context(self._knob(knob, value))
                return self._search(queries, k, None, None)
        if self.on_gpu:
            if k > GPU_MAX_K:
                raise ValueError(
                    f"k={k} is above the faiss GPU limit {GPU_MAX_K}: use kind='torch' or device='cpu'"
                )
            # A GPU index reads host memory or its own device; other devices must copy.
            x = (
                queries
                if queries.device in (torch.device("cpu"), self.gpu_device)
                else queries.to(self.gpu_device)
            )
        else:
            x = queries.cpu()
        scores, ids = self.index.search(x, k)
        if (ids < 0).any():  # a list or graph region held fewer than k cells: widen, never return -1 ids
            self._fill_missing(x, k, scores, ids)
        return scores.to(queries.device), ids.to(queries.device)

    def refresh(self, vectors: torch.Tensor) -> None:
        """Empty the index and re-add: IVF kinds keep their trained coarse quantizer and codebooks."""
        x = check_vectors(vectors)
        self.index.reset()
        if self.kind in IVF_KINDS and self.params.lays_out_lists:
            self._fill(*_list_layout(self.faiss.extract_index_ivf(self.index), x.cpu()))
        else:
            self.layout = None
            self.add(x)

    def _fill(self, x: torch.Tensor, layout: torch.Tensor | None, lists: torch.Tensor | None) -> None:
        """Add every cell to the empty IVF index: x already in `layout` order, with its rows' `lists`."""
        self.layout = layout
        if lists is not None and self.kind == "ivf":
            # The lists are known: skip faiss's second assignment of every cell (most of an add at 1e7).
            # Not for ivfpq: faiss's fast-scan lists pack their codes only through the ordinary add.
            from faiss.contrib.ivf_tools import add_preassigned

            add_preassigned(self.faiss.extract_index_ivf(self.index), x.numpy(), lists.numpy())
            self._describe()
        else:
            self.add(x)

    def rebuilder(self) -> Callable[[torch.Tensor], FaissIndex]:
        """A function indexing new values with this training and these knobs; safe in a worker thread."""
        faiss, template = self.faiss, self._template_bytes()
        kind, params, factory, k, log = self.kind, self.params, self.factory, self.k, self._log

        def make(vectors: torch.Tensor) -> FaissIndex:
            new = FaissIndex(
                faiss.deserialize_index(template), kind, params, factory, k, template, log, place=False
            )
            new.refresh(vectors)  # an empty index: the same list-by-list fill as a refresh
            return new

        return make

    def _template_bytes(self):
        """The serialized trained-but-empty form of this index, made once (e.g. for a loaded index)."""
        if self._template is None:
            faiss = self.faiss
            if self.kind in IVF_KINDS:  # the trained quantizer and codebooks live only in the index
                empty = self._cpu_index() if self.on_gpu else faiss.clone_index(self.index)
                empty.reset()
            else:  # nothing trained: a fresh factory index is the same, without copying the cells
                empty = faiss.index_factory(self.dim, self.factory, faiss.METRIC_INNER_PRODUCT)
                if self.kind == "hnsw":
                    empty.hnsw.efConstruction = self.index.hnsw.efConstruction
            self._template = faiss.serialize_index(empty)
        return self._template

    def _payload(self) -> tuple[str, object]:
        return "faiss", self.faiss.serialize_index(self._cpu_index())

    def header(self) -> dict:
        return {**super().header(), "factory": self.factory}

    # -- knobs ----------------------------------------------------------------------------------------
    def _cpu_index(self):
        """The CPU form of the index: a copy for a GPU index, the index itself otherwise."""
        return self.faiss.index_gpu_to_cpu(self.index) if self.on_gpu else self.index

    def _get(self, knob: str) -> float:
        if knob == "nprobe":
            return int((self.index if self.on_gpu else self.faiss.extract_index_ivf(self.index)).nprobe)
        if knob == "k_factor":  # ivfpq's re-rank stage, CPU only
            return self.index.k_factor
        return int(self.index.hnsw.efSearch)

    def _set(self, knob: str, value: float) -> None:
        if knob == "nprobe" and self.on_gpu:
            self.index.nprobe = int(value)
        elif knob == "nprobe":  # an HNSW quantizer's beam follows, so a shallow search is cheap there too
            _set_nprobe(self.faiss.extract_index_ivf(self.index), int(value))
        elif knob == "k_factor":
            self.index.k_factor = value
        else:
            self.index.hnsw.efSearch = int(value)

    def _set_search_knobs(self, index, params: IndexParams) -> None:
        """Apply explicit search-time knobs; unset ones keep the values the index carries."""
        if self.kind in IVF_KINDS and params.nprobe:
            _set_nprobe(self.faiss.extract_index_ivf(index), params.nprobe)
        if self.kind == "hnsw" and params.ef_search:
            index.hnsw.efSearch = params.ef_search

    @contextmanager
    def _knob(self, knob: str, value: int):
        old = self._get(knob)
        self._set(knob, value)
        try:
            yield
        finally:
            self._set(knob, old)

    def _fill_missing(self, x: torch.Tensor, k: int, scores: torch.Tensor, ids: torch.Tensor) -> None:
        """Re-search rows that came back with -1 ids, widening nprobe / efSearch 4x a time."""
        rows = (ids < 0).any(1).nonzero().squeeze(1)
        if self.kind in IVF_KINDS:
            knob, limit = "nprobe", min(self.nlist, GPU_MAX_NPROBE) if self.on_gpu else self.nlist
        elif self.kind == "hnsw":
            knob, limit = "efSearch", self.size
        else:  # flat is exhaustive: nothing to widen
            knob, limit = None, 0
        value = self._get(knob) if knob else 0
        while rows.numel() and value < limit:
            value = min(limit, value * 4)
            with self._knob(knob, value):
                s, i = self.index.search(x[rows].contiguous(), k)
            scores[rows], ids[rows] = s, i
            rows = rows[(i < 0).any(1)]
        if rows.numel():
            raise RuntimeError(f"{self.description}: fewer than k={k} neighbours for {rows.numel()} queries")

    def _describe(self) -> None:
        knobs = ""
        if self.kind in IVF_KINDS:
            knobs = f" nprobe={self._get('nprobe')}"
            if self.kind == "ivfpq" and not self.on_gpu and hasattr(self.index, "k_factor"):
                knobs += f" k_factor={int(self.index.k_factor)}"
        elif self.kind == "hnsw":
            knobs = f" efConstruction={self.index.hnsw.efConstruction} efSearch={self._get('efSearch')}"
        where = f"{self.gpu_device}{', fp16' if self.params.fp16 else ''}" if self.on_gpu else "cpu"
        self.description = f"faiss {self.factory} inner-product{knobs} ({where})"


def _list_layout(ivf, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x[layout], layout, lists): the rows of x list by list (stable: rows in order stay put), and their lists."""
    _, lists = ivf.quantizer.search(x, 1)  # each cell's list, as faiss's own add would assign it
    layout = torch.sort(lists[:, 0], stable=True).indices
    return x[layout], layout, lists[layout, 0].contiguous()


def _hnsw_quantizer(ivf):
    """The HNSW coarse quantizer of a CPU IVF index, or None for a flat one."""
    quantizer = require_faiss().downcast_index(ivf.quantizer)
    return quantizer if hasattr(quantizer, "hnsw") else None


def _set_nprobe(ivf, nprobe: int) -> None:
    """The probe depth of a CPU IVF index, and an HNSW quantizer's beam, always derived from it."""
    ivf.nprobe = min(nprobe, ivf.nlist)
    quantizer = _hnsw_quantizer(ivf)
    if quantizer is not None:
        quantizer.hnsw.efSearch = quantizer_ef_search(ivf.nprobe)


def faiss_from_bytes(payload, kind: str, params: IndexParams, factory: str, log=None) -> FaissIndex:
    """Rebuild a FaissIndex from its serialized CPU form (placed on params.device when possible)."""
    faiss = require_faiss()
    cpu = faiss.deserialize_index(np.frombuffer(payload, dtype=np.uint8))
    return FaissIndex(cpu, kind, params, factory, None, None, log)
