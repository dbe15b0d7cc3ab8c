"""The index subsystem on real FAISS indices: search contract, recall at defaults, files, refresh policies."""

import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

faiss = pytest.importorskip("faiss")

from sam_cls.index import (
    INDEX_KINDS,
    IndexMismatchError,
    IndexParams,
    IndexRefresher,
    build_index,
    choose_kind,
    exact_search,
    load_index,
    recall_at_k,
)
from sam_cls.index._faiss import OPENMP_NOT_SHARED, has_faiss_gpu, openmp_shared_with_torch
from sam_cls.index.params import default_nlist, default_nprobe, default_train_nprobe
from sam_cls.index.synthetic import clustered_embeddings

KINDS = [kind for kind in INDEX_KINDS if kind != "auto"]
APPROX_KINDS = ["ivf", "ivfpq", "hnsw"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def small():
    """2000 cells, d=32, and 16 held-out queries: enough for every kind to train."""
    return clustered_embeddings(2000, 32, clusters=20, seed=1, n_queries=16)


@pytest.fixture(scope="module")
def clustered():
    """The recall benchmark in miniature: N=20000, d=64, 100 clusters, 256 held-out queries."""
    return clustered_embeddings(20000, 64, clusters=100, seed=0, n_queries=256)


def drift(memory: torch.Tensor, scale: float, seed: int = 0) -> None:
    """Move every cell in place, as training writes would, and keep it unit-norm."""
    noise = torch.randn(memory.shape, generator=torch.Generator().manual_seed(seed))
    memory.copy_(F.normalize(memory + scale * noise, dim=1))


# -- the search contract ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_search_shapes_dtypes_device(kind, small):
    x, q = small
    index = build_index(x, IndexParams(kind=kind), k=10)
    assert (index.kind, index.size, index.dim) == (kind, 2000, 32)
    scores, ids = index.search(q[:7], 10)
    assert scores.shape == ids.shape == (7, 10)
    assert scores.dtype == torch.float32 and ids.dtype == torch.int64
    assert scores.device == ids.device == q.device
    assert ((ids >= 0) & (ids < 2000)).all()
    assert (scores[:, :-1] >= scores[:, 1:] - 1e-5).all()  # best first
    # Float64 and nn.Parameter queries work too; an empty batch gives empty results.
    assert index.search(torch.nn.Parameter(q[:3].double()), 5)[1].shape == (3, 5)
    assert index.search(q[:0], 5)[1].shape == (0, 5)


def test_flat_equals_torch_exact(small):
    x, q = small
    flat = build_index(x, IndexParams(kind="flat"), k=50)
    exact = build_index(x, IndexParams(kind="torch"), k=50)
    (fs, fi), (ts, ti) = flat.search(q, 50), exact.search(q, 50)
    torch.testing.assert_close(fs, ts, atol=1e-5, rtol=0)
    assert (fi == ti).float().mean() > 0.999  # only float-rounding ties may swap
    assert torch.equal(exact_search(x, q, 50)[1], ti)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_only_the_torch_index_claims_to_search_non_finite_queries(small, device):
    x, q = small
    exact = build_index(x.to(device), IndexParams(kind="torch", device=device), k=50)
    assert exact.searches_non_finite
    faiss_kinds = [kind for kind in KINDS if kind != "torch"]
    assert not any(build_index(x, IndexParams(kind=kind), k=50).searches_non_finite for kind in faiss_kinds)
    q = q[:4].clone().to(device)
    q[0, 0], q[1] = float("nan"), float("inf")  # what diverged encoder weights produce
    _, ids = exact.search(q, 50)
    # Valid, distinct ids for every row: the read can gather them and its loss carries the NaN on.
    assert ((ids >= 0) & (ids < x.shape[0])).all()
    assert all(len(set(row.tolist())) == 50 for row in ids)


@pytest.mark.parametrize("kind", KINDS)
def test_k_larger_than_size_raises(kind, small):
    x, q = small
    index = build_index(x[:100], IndexParams(kind=kind), k=5)
    with pytest.raises(ValueError, match=r"k=101.*size 100"):
        index.search(q, 101)
    with pytest.raises(ValueError, match="k=101"):
        build_index(x[:100], IndexParams(kind=kind), k=101)


def test_ivf_never_returns_missing_ids(small):
    """Lists of ~40 cells and nprobe=1 cannot hold k=100: the search widens instead of returning -1."""
    x, q = small
    index = build_index(x, IndexParams(kind="ivf", nlist=50, nprobe=1), k=100)
    ids = index.search(q, 100)[1]
    assert (ids >= 0).all()
    assert index.params.nprobe == 1  # the widening is per call only


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_search_nprobe_narrows_one_call_and_never_deepens(kind, small):
    x, q = small
    deep = build_index(x, IndexParams(kind=kind, nlist=50, nprobe=16), k=10, seed=2)
    shallow = build_index(x, IndexParams(kind=kind, nlist=50, nprobe=2), k=10, seed=2)  # same lists: same seed
    assert torch.equal(deep.search(q, 10, nprobe=2)[1], shallow.search(q, 10)[1])
    assert deep.params.nprobe == 16 and "nprobe=16" in deep.description
    assert torch.equal(deep.search(q, 10, nprobe=64)[1], deep.search(q, 10)[1])  # a deeper ask is capped
    assert not torch.equal(deep.search(q, 10)[1], shallow.search(q, 10)[1])  # the depth matters on this data
    if kind == "ivfpq":  # the re-rank narrows the same way, for the call only
        narrow = deep.search(q, 10, k_factor=1)[1]
        assert deep.index.k_factor == 8
        deep.index.k_factor = 1
        assert torch.equal(narrow, deep.search(q, 10)[1])


def test_a_deep_search_probes_lists_in_proportion_to_k_beyond_the_built_k(small):
    x, q = small
    index = build_index(x, IndexParams(kind="ivf", nlist=50, nprobe=2), k=10, seed=2)
    wide = build_index(x, IndexParams(kind="ivf", nlist=50, nprobe=8), k=10, seed=2)  # same lists: same seed
    # k = 40 is 4 x the built k: the 2 lists the index probes become 8, for this call only.
    assert torch.equal(index.search_deep(q, 40)[1], wide.search(q, 40)[1])
    assert not torch.equal(index.search(q, 40)[1], wide.search(q, 40)[1])  # the depth matters on this data
    assert index._get("nprobe") == 2 and "nprobe=2" in index.description
    assert torch.equal(index.search_deep(q, 10)[1], index.search(q, 10)[1])  # within the built k: a plain search
    exact = build_index(x, IndexParams(kind="torch"), k=10)
    assert torch.equal(exact.search_deep(q, 40)[1], exact.search(q, 40)[1])  # an exact index has no depth


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_many_lists_find_their_lists_by_an_hnsw_quantizer(kind, small, monkeypatch, tmp_path):
    from sam_cls.index import factory

    x, q = small
    params = IndexParams(kind=kind, nlist=50, nprobe=8)
    scanned = build_index(x, params, k=10, seed=3)
    monkeypatch.setattr(factory, "HNSW_QUANTIZER_MIN_NLIST", 50)  # 50 lists count as many here
    graph = build_index(x, params, k=10, seed=3)
    quantizer = faiss.downcast_index(faiss.extract_index_ivf(graph.index).quantizer)
    assert graph.factory.startswith("IVF50_HNSW32,") and "HNSW" not in scanned.factory
    assert quantizer.metric_type == faiss.METRIC_INNER_PRODUCT and quantizer.hnsw.efSearch == 32  # 2 x 8, >= 32
    # Same seed, same exactly-assigned k-means: the graph finds the lists a full scan of the centroids finds.
    assert torch.equal(graph.search(q, 10)[1], scanned.search(q, 10)[1])
    # A deeper index narrowed to 2 lists searches a beam for 2 lists, then gets its own beam back.
    deep = build_index(x, IndexParams(kind=kind, nlist=50, nprobe=40), k=10, seed=3)
    beam = faiss.downcast_index(faiss.extract_index_ivf(deep.index).quantizer).hnsw
    with deep._knob("nprobe", 2):  # how search(..., nprobe=2) narrows one call
        assert beam.efSearch == 32
    assert beam.efSearch == 80
    assert torch.equal(graph.search(q, 10)[1], build_index(x, params, k=10, seed=3).search(q, 10)[1])
    graph.save(tmp_path / "index.bin")
    assert torch.equal(load_index(tmp_path / "index.bin").search(q, 10)[1], graph.search(q, 10)[1])


@pytest.mark.parametrize("kind,graph", [("ivf", False), ("ivfpq", False), ("ivfpq", True)])
def test_an_ivf_index_rebuilds_from_its_centroids(kind, graph, small, monkeypatch):
    from sam_cls.index import factory

    if graph:  # an HNSW coarse quantizer takes the centroids too
        monkeypatch.setattr(factory, "HNSW_QUANTIZER_MIN_NLIST", 50)
    x, q = small
    params = IndexParams(kind=kind, nlist=50)
    first = build_index(x, params, k=10, seed=3)
    centroids = first.centroids()
    assert centroids.shape == (50, 32) and build_index(x, IndexParams(kind="flat"), k=10).centroids() is None
    # No k-means: the same quantizer, so the same index (how a resumed run gets its index back).
    exact = build_index(x, params, k=10, seed=3, centroids=centroids, kmeans_iterations=0)
    assert torch.equal(exact.centroids(), centroids)
    assert torch.equal(exact.search(q, 10)[1], first.search(q, 10)[1])
    # A warm retrain over drifted cells refits the lists from there: deterministic, and list i stays near
    # where it started, which a cold start's list i does not.
    moved = x.clone()
    drift(moved, 0.3)
    warm = build_index(moved, params, k=10, seed=3, centroids=centroids)
    assert torch.equal(warm.centroids(), build_index(moved, params, k=10, seed=3, centroids=centroids).centroids())
    assert not torch.equal(warm.centroids(), centroids)
    cold = build_index(moved, params, k=10, seed=3)
    kept = F.cosine_similarity(warm.centroids(), centroids).mean()
    assert kept > 0.8 > F.cosine_similarity(cold.centroids(), centroids).mean()
    # Centroids for another list count (a resized memory) are set aside: a cold start, no error.
    other = build_index(x, IndexParams(kind=kind, nlist=40), k=10, seed=3, centroids=centroids)
    assert torch.equal(other.centroids(), build_index(x, IndexParams(kind=kind, nlist=40), k=10, seed=3).centroids())


def test_refresher_retrains_from_its_centroids(small, monkeypatch):
    from sam_cls.index.faiss_index import FaissIndex

    x, _ = small
    memory = x.clone()
    refresher = IndexRefresher(memory, IndexParams(kind="ivf", nlist=50), k=10, rebuild_every=None, seed=3)
    seen = []
    real = FaissIndex.build.__func__

    def build_and_record(cls, *args, **kwargs):  # the real build; records what k-means was started from
        seen.append(kwargs.get("centroids"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(FaissIndex, "build", classmethod(build_and_record))
    before = refresher.centroids()
    drift(memory, 0.3)
    refresher.rebuild("evaluation")
    assert len(seen) == 1 and torch.equal(seen[0], before)
    assert refresher.history[-1]["retrained"] and refresher.history[-1]["recall_after"] > 0.9
    # After a recall below the floor the next retrain starts cold: those centroids served badly.
    refresher._retrain_next = True
    refresher.rebuild("evaluation")
    assert seen[-1] is None
    # Built from a checkpoint's centroids, the first index is that index again, with no k-means.
    again = IndexRefresher(memory, IndexParams(kind="ivf", nlist=50), k=10, rebuild_every=None, seed=3,
                           centroids=refresher.centroids())
    assert torch.equal(again.centroids(), refresher.centroids())


def test_background_retrain_starts_from_the_centroids_too(small):
    x, _ = small
    memory = x.clone()
    params = IndexParams(kind="ivf", nlist=50)
    refresher = IndexRefresher(memory, params, k=10, rebuild_every=1, retrain_every=1, background=True, seed=3)
    before = refresher.centroids()
    drift(memory, 0.3)
    assert refresher.step(1) is None  # starts the build from a snapshot of the drifted memory
    record, deadline = None, time.monotonic() + 30
    while record is None and time.monotonic() < deadline:
        record = refresher.step(2)  # swaps the finished build in
        time.sleep(0.01)
    refresher.close()
    assert record is not None and record["background"] and record["retrained"]
    expected = build_index(memory, refresher.params, k=10, seed=3, centroids=before)
    assert torch.equal(refresher.centroids(), expected.centroids())


def test_refresher_reads_at_the_training_depth(small):
    x, q = small
    ivf = IndexRefresher(x, IndexParams(kind="ivf", nlist=50), k=40, rebuild_every=None)
    # ~4 candidates per k over lists of ~40 cells: 4 lists, raised to the floor of 8; evaluation scans 32+.
    assert ivf.index.train_nprobe == default_train_nprobe(2000, 50, 40) == 8 < ivf.index.params.nprobe
    assert torch.equal(ivf.search(q, 40)[1], ivf.index.search(q, 40, nprobe=8)[1])
    chosen = IndexRefresher(x, IndexParams(kind="ivf", nlist=50, train_nprobe=3), k=40, rebuild_every=None)
    assert chosen.index.train_nprobe == 3 and "training reads nprobe=3" in chosen.description
    flat = IndexRefresher(x, IndexParams(kind="flat"), k=40, rebuild_every=None)
    assert torch.equal(flat.search(q, 40)[1], exact_search(x, q, 40)[1])  # exact kinds search in full
    # CIFAR-10's memory: 50k cells in 894 lists, K + 1 = 257 -> 19 lists read in training, 74 in evaluation.
    assert (default_train_nprobe(50_000, 894, 257), default_nprobe(50_000, 894, 257)) == (19, 74)


def test_the_default_depths_grow_with_the_memory():
    # Lists hold ~sqrt(N)/4 cells, so a fixed number of them is a shrinking share of a growing memory: the
    # evaluation default keeps scanning 1/64 of the lists at any N. The training default scans 1/400 of them
    # up to the 16 lists that every memory up to 1e7 cells needed at most, and 1/800 beyond.
    sizes = [10**5, 10**6, 3 * 10**6, 10**7, 10**8, 10**9]
    depths = [(default_nlist(n), default_nprobe(n, default_nlist(n), 257), default_train_nprobe(n, default_nlist(n), 257))
              for n in sizes]
    for (nlist, nprobe, train_nprobe), n in zip(depths, sizes, strict=True):
        assert nlist / 64 <= nprobe <= nlist and max(8, min(nlist / 400, 16), nlist / 800) <= train_nprobe, n
    evaluation = [nprobe for _, nprobe, _ in depths]
    training = [train_nprobe for _, _, train_nprobe in depths]
    assert evaluation == sorted(evaluation) and evaluation[-1] > 10 * evaluation[1]
    # (Below 1e6 the training depth is set by candidates a query, which longer lists hold in fewer of them.)
    assert training[1:] == sorted(training[1:]) and training[-1] > 10 * training[1]
    # A 1e7-cell memory: 12,649 lists, 198 of them read at evaluation and 16 in training (1/400 would be 32).
    assert depths[3] == (12649, 198, 16) and training[2] == 16 and training[4] == 50


def test_hnsw_ef_search_below_k_raises(small):
    with pytest.raises(ValueError, match="ef_search=8 must be >= k=10"):
        build_index(small[0], IndexParams(kind="hnsw", ef_search=8), k=10)


def test_auto_chooses_and_says_why(small):
    lines = []
    index = build_index(small[0], IndexParams(kind="auto"), k=10, log=lines.append)
    assert index.kind == "flat" and "auto -> flat" in lines[0]
    assert choose_kind(1_000_000, 128, 256)[0] == "ivf"
    if not has_faiss_gpu():  # CUDA without the faiss GPU build: exact torch search takes the index's place
        assert choose_kind(1_000_000, 128, 256, device="cuda")[0] == "torch"
    assert choose_kind(2_999_999, 128, 256)[0] == "ivf" and choose_kind(3_000_000, 128, 256)[0] == "ivfpq"


# -- recall at the defaults -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", APPROX_KINDS)
def test_recall_at_256_default_knobs(kind, clustered):
    x, q = clustered
    index = build_index(x, IndexParams(kind=kind), k=256)
    stats = recall_at_k(index, x, q, 256)
    print(f"{index.description}: recall@256 {stats['recall_at_k']:.4f}, {stats['search_ms']:.1f} ms")
    assert stats["recall_at_k"] >= 0.95
    assert stats["k"] == 256 and stats["n_queries"] == 256


def test_a_cpu_ivf_index_keeps_one_byte_a_dimension(clustered):
    x, _ = clustered
    index = build_index(x, IndexParams(kind="ivf"), k=256)
    assert faiss.extract_index_ivf(index.index).code_size == x.shape[1]  # 8-bit codes, not float32
    assert len(faiss.serialize_index(index.index)) < x.numel() * 4 / 2  # the file too: not float32 lists


# -- files ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(kind, small, tmp_path):
    x, q = small
    index = build_index(x, IndexParams(kind=kind), k=10)
    path = tmp_path / "index.bin"
    index.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["index.bin"]  # no temporary file left behind
    loaded = load_index(path, IndexParams(kind=kind), expect_dim=32, expect_size=2000)
    assert (loaded.kind, loaded.size, loaded.dim) == (kind, 2000, 32)
    (s0, i0), (s1, i1) = index.search(q, 10), loaded.search(q, 10)
    assert torch.equal(i0, i1)
    torch.testing.assert_close(s0, s1)
    assert load_index(path).kind == kind  # params default to "auto": any kind is accepted


def test_load_applies_search_knobs(small, tmp_path):
    path = tmp_path / "index.bin"
    build_index(small[0], IndexParams(kind="ivf"), k=10).save(path)
    loaded = load_index(path, IndexParams(nprobe=7))
    assert loaded.params.nprobe == 7 and "nprobe=7" in loaded.description


@pytest.mark.parametrize(("expect", "field"), [({"expect_dim": 64}, "dim"), ({"expect_size": 1999}, "size")])
def test_load_mismatch_names_file_value_and_fix(expect, field, small, tmp_path):
    path = tmp_path / "index.bin"
    build_index(small[0], IndexParams(kind="flat"), k=10).save(path)
    with pytest.raises(IndexMismatchError) as err:
        load_index(path, **expect)
    message = str(err.value)
    assert (
        str(path) in message
        and f"index {field} is" in message
        and str(next(iter(expect.values()))) in message
    )
    assert "sam-cls rebuild-index --run RUN_DIR" in message and "\n" not in message
    with pytest.raises(IndexMismatchError, match="kind is 'flat' but 'ivf'"):
        load_index(path, IndexParams(kind="ivf"))


def test_corrupt_or_missing_file_is_a_clear_error(small, tmp_path):
    path = tmp_path / "index.bin"
    build_index(small[0], IndexParams(kind="ivf"), k=10).save(path)
    good = path.read_bytes()
    cases = {
        "not a sam-cls index file": b"definitely not an index",
        "truncated": good[: len(good) // 2],
        "checksum mismatch": good[:-10] + bytes(b ^ 0xFF for b in good[-10:]),
        "corrupt header": good[:16] + b"{not json" + good[25:],
    }
    for why, data in cases.items():
        path.write_bytes(data)
        with pytest.raises(IndexMismatchError, match=why):
            load_index(path)
    with pytest.raises(IndexMismatchError, match="file not found"):
        load_index(tmp_path / "absent.bin")
    assert issubclass(IndexMismatchError, ValueError)


# -- refresh ----------------------------------------------------------------------------------------------
def test_ivf_refresh_keeps_the_trained_quantizer(small):
    x, _ = small
    index = build_index(x, IndexParams(kind="ivf"), k=10)
    ivf = faiss.extract_index_ivf(index.index)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist).clone()
    moved = x.clone()
    drift(moved, 0.3)
    index.refresh(moved)
    ivf = faiss.extract_index_ivf(index.index)
    assert torch.equal(ivf.quantizer.reconstruct_n(0, ivf.nlist), centroids)
    assert index.size == 2000
    assert torch.equal(index.search(moved[:20], 1)[1].squeeze(1), torch.arange(20))  # new values are searched


def test_refresher_rebuilds_every_r_steps(small):
    memory = small[0].clone()
    lines = []
    refresher = IndexRefresher(memory, IndexParams(kind="flat"), k=10, rebuild_every=3, log=lines.append)
    records = [refresher.step(step) for step in range(1, 11)]
    assert [i + 1 for i, r in enumerate(records) if r] == [3, 6, 9] and refresher.rebuilds == 3
    assert set(records[2]) >= {"reason", "seconds", "staleness_before", "recall_after", "kind"}
    assert sum("index rebuild" in line for line in lines) == 3


def test_refresher_auto_rebuilds_on_drift_only(small):
    memory = small[0].clone()
    refresher = IndexRefresher(
        memory,
        IndexParams(kind="ivf"),
        k=10,
        rebuild_every="auto",
        staleness_threshold=0.02,
        retrain_every=100,
    )
    assert all(refresher.step(step) is None for step in range(1, 6)) and refresher.staleness() < 1e-6
    drift(memory, 0.01)  # ~0.002 cosine drift: under the threshold
    assert refresher.step(6) is None and 0 < refresher.staleness() < 0.02
    drift(memory, 0.3, seed=1)
    record = refresher.step(7)
    assert record is not None and "staleness" in record["reason"] and record["staleness_before"] > 0.02
    assert record["recall_after"] >= 0.9 and record["retrained"] is False
    assert refresher.staleness() == pytest.approx(0.0, abs=1e-6) and refresher.rebuilds == 1
    assert refresher.rebuild("evaluation")["retrained"] is True  # a forced rebuild retrains IVF


def test_refresher_background_swaps_and_keeps_searching(small):
    memory, queries = small[0].clone(), small[1]
    refresher = IndexRefresher(memory, IndexParams(kind="ivf"), k=10, rebuild_every=1, background=True)
    first = refresher.index
    drift(memory, 0.3)
    assert refresher.step(1) is None  # started, not finished
    record, deadline = None, time.monotonic() + 30
    while record is None and time.monotonic() < deadline:
        assert refresher.search(queries, 10)[1].shape == (16, 10)  # the current index keeps serving
        record = refresher.step(2)
        time.sleep(0.01)
    refresher.close()
    assert record is not None and record["background"] and refresher.index is not first
    assert torch.equal(refresher.search(memory[:20], 1)[1].squeeze(1), torch.arange(20))


def test_same_seed_same_index_and_sample(clustered):
    x, q = clustered
    for kind in ("ivf", "ivfpq"):
        a = build_index(x, IndexParams(kind=kind), k=100, seed=5).search(q, 100)
        b = build_index(x, IndexParams(kind=kind), k=100, seed=5).search(q, 100)
        assert torch.equal(a[1], b[1]), kind
    memories = [x[:5000].clone(), x[:5000].clone()]
    refreshers = [
        IndexRefresher(m, IndexParams(kind="ivf"), k=10, seed=3, staleness_sample=64) for m in memories
    ]
    for m in memories:
        m[:2500] = F.normalize(m[:2500] + 0.3, dim=1)  # moves half the cells: the sample decides the value
    assert refreshers[0].staleness() == refreshers[1].staleness()
    other = IndexRefresher(x[:5000].clone(), IndexParams(kind="flat"), k=10, seed=4, staleness_sample=64)
    other.memory[:2500] = memories[0][:2500]
    assert other.staleness() != refreshers[0].staleness()


# -- without faiss, and on the GPU ------------------------------------------------------------------------
def test_without_faiss_torch_works_and_faiss_kinds_say_how_to_install():
    code = """
import sys
sys.modules["faiss"] = None  # makes `import faiss` fail as it does where faiss is not installed
import torch
from sam_cls.index import IndexParams, build_index, recall_at_k
x = torch.nn.functional.normalize(torch.randn(300, 8), dim=1)
index = build_index(x, IndexParams(), k=5)
assert index.kind == "torch" and recall_at_k(index, x, x[:4], 5)["recall_at_k"] == 1.0
try:
    build_index(x, IndexParams(kind="flat"), k=5)
except ImportError as e:
    print(e)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert (
        "faiss is not installed: pip install 'sam-cls[cpu]' (or 'sam-cls[gpu]' on a CUDA machine)"
        in out.stdout
    )


@pytest.mark.skipif(openmp_shared_with_torch() is None, reason="no faiss, or no libgomp in torch to compare")
def test_faiss_imported_before_torch_is_warned_of_and_torch_first_shares_one_openmp_runtime():
    code = "import {}; import sam_cls.index._faiss as f; print(f.openmp_shared_with_torch())"
    runs = {order: subprocess.run([sys.executable, "-W", "always", "-c", code.format(order)], check=False,
                                  capture_output=True, text=True, timeout=120)
            for order in ("torch, faiss", "faiss, torch")}
    assert all(out.returncode == 0 for out in runs.values()), [out.stderr for out in runs.values()]
    assert runs["torch, faiss"].stdout.split() == ["True"] and OPENMP_NOT_SHARED not in runs["torch, faiss"].stderr
    assert runs["faiss, torch"].stdout.split() == ["False"] and OPENMP_NOT_SHARED in runs["faiss, torch"].stderr


@cuda
@pytest.mark.parametrize("kind", ["flat", "ivf", "torch", "hnsw"])
def test_cuda_queries_give_cuda_results(kind, small):
    x, q = small
    index = build_index(x.cuda(), IndexParams(kind=kind, device="cuda"), k=10)
    scores, ids = index.search(q.cuda(), 10)
    assert scores.is_cuda and ids.is_cuda
    cpu = build_index(x, IndexParams(kind=kind), k=10).search(q, 10)[1]
    assert (ids.cpu() == cpu).float().mean() > 0.95


@cuda
def test_cuda_large_k_is_exact_not_truncated(small):
    x = small[0].repeat(2, 1).cuda()
    index = build_index(x, IndexParams(kind="auto", device="cuda"), k=3000)
    ids = index.search(x[:4], 3000)[1]
    assert ids.shape == (4, 3000) and (ids >= 0).all()


def _list_ids(index) -> list[torch.Tensor]:
    """Each IVF list's ids, in storage order."""
    il = faiss.extract_index_ivf(index.index).invlists
    return [torch.from_numpy(faiss.rev_swig_ptr(il.get_ids(i), il.list_size(i)).copy())
            for i in range(il.nlist)]


@pytest.mark.parametrize("kind,graph", [("ivf", False), ("ivfpq", False), ("ivf", True), ("ivfpq", True)])
def test_a_list_ordered_index_stores_each_list_as_one_run_of_ids(small, kind, graph, monkeypatch):
    # With an HNSW coarse quantizer the layout must assign each cell as faiss's own add does (same beam),
    # or some ids land in other lists than the layout put them in and a list is no longer one run.
    from sam_cls.index import factory

    if graph:
        monkeypatch.setattr(factory, "HNSW_QUANTIZER_MIN_NLIST", 16)
    x, q = small
    plain = build_index(x, IndexParams(kind=kind, nlist=20), k=10, seed=3)
    ordered = build_index(x, IndexParams(kind=kind, nlist=20, list_order=True), k=10, seed=3)
    assert ("HNSW" in ordered.factory) == graph
    assert plain.layout is None and torch.equal(torch.sort(ordered.layout).values, torch.arange(len(x)))
    start = 0
    for ids in _list_ids(ordered):  # list by list: ids 0.. in the first list, and so on
        assert torch.equal(ids, torch.arange(start, start + len(ids)))
        start += len(ids)
    # Same lists as the plain index (same centroids): only the ids are renamed.
    for a, b in zip(_list_ids(plain), _list_ids(ordered), strict=True):
        assert torch.equal(torch.sort(a).values, torch.sort(ordered.layout[b]).values)
    assert torch.equal(plain.centroids(), ordered.centroids())
    # Refreshed from the cells in that layout, the index keeps it: a resumed run rebuilds the same index.
    laid_out = x[ordered.layout]
    ordered.refresh(laid_out)
    assert torch.equal(ordered.layout, torch.arange(len(x)))
    assert recall_at_k(ordered, laid_out, q, 10)["recall_at_k"] > 0.9  # id i is row i of the laid-out cells


def test_an_hnsw_quantizer_assigns_cells_with_its_assignment_beam(clustered, monkeypatch):
    # Adding a cell is a search for its one nearest centroid: the quantizer's narrow assignment beam, not the
    # search beam its probe depth sets, which it keeps for searches.
    from sam_cls.index import factory, layout

    monkeypatch.setattr(factory, "HNSW_QUANTIZER_MIN_NLIST", 16)
    x, _ = clustered
    params = IndexParams(kind="ivf", nlist=200, nprobe=20)

    def beam(index) -> int:
        return faiss.downcast_index(faiss.extract_index_ivf(index.index).quantizer).hnsw.efSearch

    def lists_of(index) -> torch.Tensor:
        lists = torch.empty(len(x), dtype=torch.long)
        for i, ids in enumerate(_list_ids(index)):
            lists[ids] = i
        return lists

    wide = build_index(x, params, k=10, seed=3)  # a beam of 128 over 200 centroids: each cell's nearest list
    nearest = (x @ wide.centroids().T).argmax(1)
    assert (lists_of(wide) == nearest).float().mean() > 0.999  # (float sums may order a near-tie apart)
    monkeypatch.setattr(layout, "ASSIGN_EF_SEARCH", 1)  # a greedy walk of the graph: some cells miss theirs
    narrow = build_index(x, params, k=10, seed=3)
    assert torch.equal(narrow.centroids(), wide.centroids())
    assert (lists_of(narrow) != lists_of(wide)).any()
    assert beam(wide) == beam(narrow) == 40  # the search beam, 2 x nprobe, is back after the add
    with pytest.raises(Exception):  # noqa: B017 -- faiss's own error for cells of the wrong width
        narrow.add(torch.randn(5, x.shape[1] + 1))
    assert beam(narrow) == 40
    # The list layout assigns with the same beam as faiss's add: each list still holds one run of ids.
    ordered = build_index(x, replace(params, kind="ivfpq", list_order=True), k=10, seed=3)
    start = 0
    for ids in _list_ids(ordered):
        assert torch.equal(ids, torch.arange(start, start + len(ids)))
        start += len(ids)


@pytest.mark.parametrize("background", [False, True])
def test_refresher_lays_the_memory_out_as_its_index(small, background):
    from sam_cls.memory import MemoryBank

    x, q = small
    bank = MemoryBank(x.clone(), torch.arange(len(x)) % 7)
    refresher = IndexRefresher(bank.embeddings, IndexParams(kind="ivf", nlist=20), k=10, rebuild_every=1,
                               retrain_every=1, background=background, seed=3, reorder=bank.reorder)

    def check():
        assert bank.embeddings.data_ptr() == refresher.memory.data_ptr()
        assert torch.equal(bank.labels, bank.example_ids % 7)  # labels moved with their cells
        start = 0
        for ids in _list_ids(refresher.index):
            assert torch.equal(ids, torch.arange(start, start + len(ids)))
            start += len(ids)
        # The index's ids are the memory's rows: a search finds the cells exact search over the memory finds.
        assert recall_at_k(refresher.index, bank.embeddings, q, 10)["recall_at_k"] > 0.9

    check()
    torch.testing.assert_close(bank.embeddings, x[bank.example_ids])
    first = bank.example_ids.clone()
    drift(bank.embeddings, 0.3)
    drifted = bank.embeddings[bank.rows].clone()  # by example
    record, deadline = refresher.step(1), time.monotonic() + 30
    while background and record is None and time.monotonic() < deadline:
        record = refresher.step(2)
        time.sleep(0.01)
    refresher.close()
    assert record is not None and record["retrained"]
    check()
    assert not torch.equal(bank.example_ids, first)  # new centroids, new lists: the rows moved again
    torch.testing.assert_close(bank.embeddings, drifted[bank.example_ids])
