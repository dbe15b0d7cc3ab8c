"""The evaluation depth chosen by measured recall: deep enough for held-out queries, a function of the cells."""

import torch
import torch.nn.functional as F
from faiss.contrib.evaluation import knn_intersection_measure

from sam_cls.index import IndexParams, IndexRefresher, build_index, exact_search
from sam_cls.index.calibrate import RECALL_TARGET
from sam_cls.index.params import REFINE_K_FACTOR, default_nprobe
from sam_cls.index.synthetic import clustered_embeddings


def held_out_recall(index, cells: torch.Tensor, queries: torch.Tensor, k: int) -> float:
    _, exact = exact_search(cells, queries, k)
    return float(knn_intersection_measure(index.search(queries, k)[1].numpy(), exact.numpy()))


def uniform(n: int, d: int, seed: int) -> torch.Tensor:
    """Unclustered cells: a query's neighbours spread over many lists, so the default depth reads too few."""
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_ivf_deepens_until_held_out_queries_read_the_target():
    cells, queries, k = uniform(20_000, 32, 0), uniform(500, 32, 1), 10
    index = build_index(cells, IndexParams(kind="ivf", nlist=256), k=k, seed=0)
    default = default_nprobe(20_000, 256, k)
    assert index.params.nprobe == default and held_out_recall(index, cells, queries, k) < 0.9
    lines = []
    result = index.calibrate(cells, lines.append)
    assert result["nprobe"] > default and result["recall_at_k"] >= RECALL_TARGET
    assert index._get("nprobe") == result["nprobe"] and f"nprobe={result['nprobe']}" in index.description
    assert held_out_recall(index, cells, queries, k) >= 0.95  # the sample of cells stood for unseen queries
    assert lines and f"nprobe {default} -> {result['nprobe']}" in lines[0]
    # The same cells and seed choose the same depth, through build_index too.
    again = build_index(cells, IndexParams(kind="ivf", nlist=256), k=k, seed=0, calibrate=True)
    assert again._get("nprobe") == result["nprobe"]


def test_ivfpq_reranks_deeper_when_more_lists_do_not_help():
    """With coarse PQ codes the lists are not what limits recall: the re-rank depth (k_factor) is."""
    cells, queries = clustered_embeddings(10_000, 32, seed=0, n_queries=500)
    index = build_index(cells, IndexParams(kind="ivfpq", nlist=128, pq_m=8), k=10, seed=0)
    assert index.index.k_factor == REFINE_K_FACTOR and held_out_recall(index, cells, queries, 10) < 0.9
    result = index.calibrate(cells)
    assert result["k_factor"] > REFINE_K_FACTOR and result["recall_at_k"] >= RECALL_TARGET
    assert held_out_recall(index, cells, queries, 10) >= 0.95


def test_the_depth_depends_on_the_cells_not_on_the_depth_before():
    """A resumed run calibrates from a default-depth index, an unbroken one from its last calibration: both
    must land on the same depth for the same cells."""
    cells, k = uniform(20_000, 32, 0), 10
    fresh = build_index(cells, IndexParams(kind="ivf", nlist=256), k=k, seed=0)
    deep = build_index(cells, IndexParams(kind="ivf", nlist=256, nprobe=256), k=k, seed=0)
    assert fresh.calibrate(cells)["nprobe"] == deep.calibrate(cells)["nprobe"] < 256


def test_a_given_nprobe_is_kept_and_exact_kinds_have_nothing_to_choose():
    cells, k = uniform(20_000, 32, 0), 10
    assert build_index(cells, IndexParams(kind="ivf", nlist=256, nprobe=4), k=k, calibrate=True).params.nprobe == 4
    assert build_index(cells, IndexParams(kind="flat"), k=k, calibrate=True).calibrate(cells) is None


def test_an_evaluation_rebuild_calibrates_and_a_resumed_run_rebuilds_alike():
    """The calibrated depth serves evaluation only: training reads, the recall that decides the next retrain
    and every later build are those of the default depth, so a run resumed from this index's centroids (at
    the default depth) goes on exactly as the unbroken one."""
    cells, k = uniform(20_000, 32, 0), 10
    params = IndexParams(kind="ivf", nlist=256, train_nprobe=64)  # above the default depth (32): capped there
    unbroken = IndexRefresher(cells.clone(), params, k=k, rebuild_every=None, seed=0)
    train_nprobe = unbroken.index.train_nprobe
    unbroken.rebuild("evaluation", calibrate=True)
    assert unbroken.index._get("nprobe") > default_nprobe(20_000, 256, k) == unbroken.index.params.nprobe
    assert unbroken.index.train_nprobe == train_nprobe == 32
    resumed = IndexRefresher(unbroken.memory.clone(), params, k=k, rebuild_every=None, seed=0,
                             centroids=unbroken.centroids())
    assert resumed._retrain_next == unbroken._retrain_next
    queries = uniform(200, 32, 1)
    for refresher in (unbroken, resumed):
        refresher.rebuild("drift", retrain=False)  # in place: back to the default depth
    assert unbroken.history[-1]["recall_after"] == resumed.history[-1]["recall_after"]
    assert torch.equal(unbroken.index.search(queries, k)[1], resumed.index.search(queries, k)[1])
    assert torch.equal(unbroken.search(queries, k)[1], resumed.search(queries, k)[1])


def test_a_cell_finding_itself_is_no_recall():
    """At k = 1 each sample cell's nearest is itself, found at any depth: counted, the default would pass."""
    cells = uniform(20_000, 32, 0)
    index = build_index(cells, IndexParams(kind="ivf", nlist=256), k=1, seed=0)
    result = index.calibrate(cells)
    assert result["nprobe"] > default_nprobe(20_000, 256, 1) and result["recall_at_k"] < 1.0
