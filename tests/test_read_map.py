"""The metric refit after classes are added: fitted on the memory's cells, kept only where it reads better, folded
into the encoder so queries and cells stay one space."""

import torch
import torch.nn.functional as F

from sam_cls import read_map
from sam_cls.model import build_encoder
from sam_cls.read_map import fit_map, fold_map, map_cells, projection


def crowded_memory(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three large classes and a small one (120 cells: 24 held out) that sits on class 0 but for one quiet
    dimension: only a map that stretches that dimension tells them apart."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(8)[:3]
    cells, labels = [], []
    for c, n in ((0, 600), (1, 600), (2, 600), (3, 120)):
        x = 0.35 * torch.randn(n, 8, generator=g) + centres[min(c, 2) if c < 3 else 0]
        x[:, 7] = (0.12 if c == 3 else -0.12) + 0.03 * torch.randn(n, generator=g)
        cells.append(x)
        labels.append(torch.full((n,), c))
    return F.normalize(torch.cat(cells), dim=1), torch.cat(labels)


def test_a_map_that_separates_a_small_class_is_fitted_and_kept():
    cells, labels = crowded_memory()
    origins = torch.arange(len(labels))
    w, report = fit_map(cells, labels, origins, 4, temperature=0.05, topk=32, seed=0)
    assert report["small_classes"] == [3]
    assert w is not None and report["kept"]
    # Kept only where it reads the held-out cells better for the small class and no worse for the others.
    assert report["small_after"] > report["small_before"]
    assert report["others_after"] >= report["others_before"]
    # The quiet dimension is the one the map learned to stretch.
    gains = w.norm(dim=1)
    assert gains[7] > gains[:7].max()
    # Deterministic under the seed.
    again, _ = fit_map(cells, labels, origins, 4, temperature=0.05, topk=32, seed=0)
    torch.testing.assert_close(w, again, rtol=0, atol=0)


def test_no_map_is_fitted_without_a_small_class_or_without_cells_to_check_it_on():
    cells, labels = crowded_memory()
    big = labels < 3
    w, report = fit_map(cells[big], labels[big], torch.arange(int(big.sum())), 3, 0.05, 32)
    assert w is None and not report["kept"] and report["reason"] == "no small class"
    one = torch.cat([big.nonzero().squeeze(1), (labels == 3).nonzero()[:1].squeeze(1)])  # a class of one cell
    w, report = fit_map(cells[one], labels[one], torch.arange(len(one)), 4, 0.05, 32)
    assert w is None and "fewer than 20 held-out cells" in report["reason"]


def test_a_folded_map_makes_the_encoder_write_the_mapped_cells():
    torch.manual_seed(0)
    for name in ("linear", "conv1"):
        encoder = build_encoder(name, (1, 8, 8), 16, torch.zeros(1), torch.ones(1)).eval()
        x = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
        with torch.no_grad():
            before = encoder(x)
            w = torch.eye(16) + 0.3 * torch.randn(16, 16)
            assert projection(encoder) is not None
            fold_map(encoder, w)
            torch.testing.assert_close(encoder(x), map_cells(before, w), atol=1e-5, rtol=1e-4)
    # A softmax head reads the features the map would change: there is nothing to fold into.
    softmax = build_encoder("linear", (1, 8, 8), 16, torch.zeros(1), torch.ones(1), num_classes=3)
    assert projection(softmax) is None


def test_every_small_class_held_out_cell_counts_when_the_others_are_capped(monkeypatch):
    cells, labels = crowded_memory()
    monkeypatch.setattr(read_map, "CHECK_QUERIES", 40)  # fewer than the small class's 24 and the others' 360
    w, report = fit_map(cells, labels, torch.arange(len(labels)), 4, 0.05, 32)
    assert report["small_held_out"] == 24 and report["held_out_queries"] == 40
    assert w is not None and report["kept"]


def test_a_memory_larger_than_the_fit_reads_is_sampled_with_its_classes_weighed_alike(monkeypatch):
    cells, labels = crowded_memory()
    monkeypatch.setattr(read_map, "FIT_CELLS", 600)  # a third of the large classes' cells, the small class whole
    w, report = fit_map(cells, labels, torch.arange(len(labels)), 4, 0.05, 32)
    assert w is not None and report["kept"] and report["small_after"] > report["small_before"]


def test_a_map_is_fitted_under_inference_mode_too():
    cells, labels = crowded_memory()
    with torch.inference_mode():
        inside, _ = fit_map(cells.clone(), labels, torch.arange(len(labels)), 4, 0.05, 32)
    outside, _ = fit_map(cells, labels, torch.arange(len(labels)), 4, 0.05, 32)
    torch.testing.assert_close(inside, outside, rtol=0, atol=0)
