"""FAISS indices built from factory strings (flat, ivf, ivfpq, hnsw), placed on a GPU when faiss can."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import replace

import numpy as np
import torch

from ._faiss import GPU_MAX_K, GPU_MAX_NPROBE, omp_threads, require_faiss
from .base import MemoryIndex, check_vectors
from .calibrate import calibrate_depth
from .factory import factory_string
from .gpu import hnsw_quantizer, to_gpu, why_not_on_gpu
from .layout import add_in_lists, assignment_beam, list_layout
from .params import (
    HNSW_EF_CONSTRUCTION,
    HNSW_M,
    IVF_KINDS,
    REFINE_K_FACTOR,
    TRAIN_POINTS_PER_LIST,
    TRAIN_REFINE_K_FACTOR,
    WARM_KMEANS_ITERATIONS,
    IndexParams,
    default_ef_search,
    default_nprobe,
    default_train_nprobe,
    quantizer_ef_search,
)


class FaissIndex(MemoryIndex):
    """A faiss index over the memory cells, inner-product metric, searched with torch tensors.

    IVF kinds also search at a training depth (fewer lists, a lighter ivfpq re-rank), lay their cells out
    list by list where params ask (`layout`), and keep their coarse centroids for warm retrains and resumes.
    An index bound for a GPU moves there at its first search or add, in the thread that searches it.
    """

    def __init__(self, cpu_index, kind: str, params: IndexParams, factory: str, k: int | None = None,
                 template=None, log: Callable[[str], None] | None = None, seed: int = 0):
        self.faiss = require_faiss()
        self.kind, self.factory, self.k, self.seed = kind, factory, k, seed
        self.index = cpu_index
        self.on_gpu, self._placed = False, False
        self.trains = kind in IVF_KINDS
        self.exact = kind == "flat" and not params.fp16
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
        # ivfpq's re-rank depth as built or saved: a refresh returns to it, as to params.nprobe (see calibrate).
        self._k_factor = cpu_index.k_factor if kind == "ivfpq" else None
        self._describe()

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
        layout = lists = None
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
            # Search knobs now, before the template below is serialised with them. (The lists the layout and
            # the add assign take the narrower assignment beam, layout.assignment_beam, in both.)
            _set_nprobe(ivf, params.nprobe or default_nprobe(n, ivf.nlist, k))
            # Trained in the layout it is filled in: a rebuild from the memory laid out this way (a resumed
            # run's) then draws the same training sample and repeats this index exactly.
            x, layout, lists = list_layout(ivf, x) if params.lays_out_lists else (x, None, None)
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
        built = cls(index, kind, params, factory, k, template, log, seed)
        built._fill(x, layout, lists)
        return built

    def centroids(self) -> torch.Tensor | None:
        """The coarse centroids (nlist, d) of an IVF kind, from which its retrain starts; None otherwise."""
        if self.kind not in IVF_KINDS:
            return None
        # A GPU index's trained, empty CPU form holds the same quantizer without copying its lists back.
        cpu = self.faiss.deserialize_index(self._template_bytes()) if self.on_gpu else self.index
        return self.faiss.extract_index_ivf(cpu).quantizer.reconstruct_n(0, self.nlist)

    def calibrate(self, vectors: torch.Tensor, log: Callable[[str], None] | None = None) -> dict | None:
        """IVF kinds: from the default depth for this N, deepen until a sample of the cells reads the recall
        calibrate.py targets. Always from the default, so the depth is a function of the cells alone.

        This index searches (and saves) at the depth found; `params` keep the default, so a rebuild over other
        cells, and the training depth capped by it, are what they would be without calibration.
        """
        if self.kind not in IVF_KINDS or not self.k:
            return None
        self._place()
        self._set("nprobe", default_nprobe(self.size, self.nlist, self.k))
        if self.kind == "ivfpq" and not self.on_gpu:
            self._set("k_factor", REFINE_K_FACTOR)
        limit = min(self.nlist, GPU_MAX_NPROBE) if self.on_gpu else self.nlist
        result = calibrate_depth(self, check_vectors(vectors), self.k, self.seed, limit, log)
        self._describe()
        return result

    learned = centroids  # what the interface calls it: what this index learned from the cells

    def add(self, x: torch.Tensor) -> None:
        """Append cells; a GPU index takes CPU or same-device tensors directly."""
        self._place()
        x = check_vectors(x)
        if self.on_gpu:
            self.index.add(x)
        else:
            with assignment_beam(self.index):
                self.index.add(x.cpu())
        self._describe()

    def _place(self) -> None:
        """Once: move to the GPU that params.device names when faiss can; else stay on the CPU and say why."""
        if self._placed:
            return
        self._placed = True
        if not self.params.cuda:
            return
        why = why_not_on_gpu(self.index, self.kind, self.factory, self.k)
        if why:
            if self._log:
                self._log(f"index stays on the CPU: {why}; queries are copied over and results back")
            return
        self.index, self.gpu_device = to_gpu(self.index, self.params)
        self.on_gpu = True
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

    @property
    def train_nprobe(self) -> int | None:
        """IVF lists a training read scans: params.train_nprobe, else a shallow default (see params.py)."""
        if self.kind not in IVF_KINDS:
            return None
        k = self.k or 1
        wanted = self.params.train_nprobe or default_train_nprobe(self.size, self.nlist, k)
        return min(wanted, self.params.nprobe)  # a search is narrowed, never deepened

    @property
    def train_k_factor(self) -> float | None:
        """ivfpq's re-rank depth for a training read: TRAIN_REFINE_K_FACTOR, or the index's own if lower."""
        if self.kind != "ivfpq":
            return None
        return min(TRAIN_REFINE_K_FACTOR, self.index.k_factor)

    def search(self, queries: torch.Tensor, k: int, training: bool = False, nprobe: int | None = None,
               k_factor: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """As MemoryIndex.search; nprobe (IVF kinds) and k_factor (ivfpq's re-rank) narrow this call only,
        never deepen it, and training=True narrows to the training depth."""
        self._place()  # first: a GPU copy takes the index's own depth, not this call's
        if training:
            nprobe, k_factor = nprobe or self.train_nprobe, k_factor or self.train_k_factor
        narrower = {
            knob: value
            for knob, value, kinds in (("nprobe", nprobe, IVF_KINDS), ("k_factor", k_factor, ("ivfpq",)))
            if value is not None and self.kind in kinds and value < self._get(knob)
        }
        with ExitStack() as knobs:  # this call only: the index keeps its own depth
            for knob, value in narrower.items():
                knobs.enter_context(self._knob(knob, value))
            return super().search(queries, k)

    def search_deep(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """An IVF kind probes nprobe x ceil(k / K) lists for k beyond the K its depth was calibrated for: the
        k-th nearest cell lies farther out than the K-th, in lists the calibrated depth does not reach (the
        per-source rows of results/memory_value.json; docs/MEMORY.md)."""
        if self.kind not in IVF_KINDS or not self.k or k <= self.k:
            return self.search(queries, k)
        self._place()  # first: a GPU copy takes the index's own depth, not this call's
        limit = min(self.nlist, GPU_MAX_NPROBE) if self.on_gpu else self.nlist
        deeper = min(limit, int(self._get("nprobe")) * -(-k // self.k))
        with self._knob("nprobe", deeper):  # this call only: the index keeps its own depth
            return super().search(queries, k)

    def _search(self, queries: torch.Tensor, k: int, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
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
        """Empty the index and re-add: IVF kinds keep their trained coarse quantizer and codebooks, and go back
        to the depth of their params (a depth calibrated for the old values is not one for the new)."""
        x = check_vectors(vectors).cpu()
        self.index.reset()
        if self.kind in IVF_KINDS:
            self._set("nprobe", self.params.nprobe)
        if self._k_factor is not None and not self.on_gpu:
            self._set("k_factor", self._k_factor)
        if self.kind in IVF_KINDS and self.params.lays_out_lists:
            self._fill(*list_layout(self.faiss.extract_index_ivf(self.index), x))
        else:
            self._fill(x, None, None)

    def _fill(self, x: torch.Tensor, layout: torch.Tensor | None, lists: torch.Tensor | None) -> None:
        """Add every cell to the empty index: x already in `layout` order, with its rows' IVF `lists`."""
        self.layout = layout
        if lists is None:
            self.add(x)
        else:
            add_in_lists(self.index, self.kind, x, lists)
            self._describe()

    def take_layout(self) -> torch.Tensor | None:
        layout, self.layout = self.layout, None
        return layout

    def rebuilder(self, retrain: bool = False, warm: bool = True) -> Callable[[torch.Tensor], FaissIndex]:
        """A function indexing new values with this kind and these knobs; safe in a worker thread.

        retrain re-runs an IVF kind's k-means, from this index's centroids where warm; otherwise the new
        index re-adds to this one's trained quantizer and codebooks.
        """
        kind, params, factory, k, log, seed = self.kind, self.params, self.factory, self.k, self._log, self.seed
        if retrain and self.trains:
            centroids = self.centroids() if warm else None
            return lambda vectors: FaissIndex.build(vectors, kind, params, k, log, seed=seed, centroids=centroids)
        faiss, template = self.faiss, self._template_bytes()

        def make(vectors: torch.Tensor) -> FaissIndex:
            new = FaissIndex(faiss.deserialize_index(template), kind, params, factory, k, template, log, seed)
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
            if self.size and self.k:  # the depth a training read searches at (see train_nprobe)
                knobs += f", training reads nprobe={self.train_nprobe}"
                knobs += f" k_factor={self.train_k_factor:g}" if self.train_k_factor else ""
        elif self.kind == "hnsw":
            knobs = f" efConstruction={self.index.hnsw.efConstruction} efSearch={self._get('efSearch')}"
        where = f"{self.gpu_device}{', fp16' if self.params.fp16 else ''}" if self.on_gpu else "cpu"
        self.description = f"faiss {self.factory} inner-product{knobs} ({where})"


def _set_nprobe(ivf, nprobe: int) -> None:
    """The probe depth of a CPU IVF index, and an HNSW quantizer's beam, always derived from it."""
    ivf.nprobe = min(nprobe, ivf.nlist)
    quantizer = hnsw_quantizer(ivf)
    if quantizer is not None:
        quantizer.hnsw.efSearch = quantizer_ef_search(ivf.nprobe)


def faiss_from_bytes(payload, kind: str, params: IndexParams, factory: str, log=None) -> FaissIndex:
    """Rebuild a FaissIndex from its serialized CPU form (placed on params.device when possible)."""
    faiss = require_faiss()
    cpu = faiss.deserialize_index(np.frombuffer(payload, dtype=np.uint8))
    return FaissIndex(cpu, kind, params, factory, log=log)
