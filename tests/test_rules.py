"""Read rules: one vote per source, the class prior, the per-class read, and the tuned read a run stores."""

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import sam_cls
from sam_cls.checkpoint import RunDir, load_tensors
from sam_cls.cli import main
from sam_cls.config import ConfigError, make_config
from sam_cls.evaluate import CellFacts, classify
from sam_cls.index import IndexParams, build_index
from sam_cls.memory import MemoryBank
from sam_cls.read import ReadRule, rule_log_probs, select_cells, sparse_read, thin_candidates, thinned_class
from sam_cls.train import Trainer, train
from sam_cls.tune import tune_read


def quiet(_msg):
    pass


def memory_of_copies(n_images=40, copies=5, d=8, classes=4, seed=0):
    """Copies of each image near it (cell c * n + e is copy c of image e), and queries."""
    g = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(n_images, d, generator=g, dtype=torch.float64), dim=1)
    cells = F.normalize(images.repeat(copies, 1) + 0.3 * torch.randn(n_images * copies, d, generator=g,
                                                                      dtype=torch.float64), dim=1)
    labels = torch.randint(0, classes, (n_images,), generator=g).repeat(copies)
    origins = torch.arange(n_images).repeat(copies)
    queries = F.normalize(torch.randn(6, d, generator=g, dtype=torch.float64), dim=1)
    return MemoryBank(cells, labels), origins, queries


def flat_index(memory: MemoryBank):
    return build_index(memory.embeddings.float(), IndexParams(kind="flat"), k=8)


def test_one_vote_per_source_is_the_exact_read_over_sources():
    memory, origins, u = memory_of_copies()
    rule, classes, k = ReadRule(topk=10, temperature=0.1, per_source=True), 4, 10
    facts = CellFacts.of(memory.labels, classes, origins)
    memory.embeddings = memory.embeddings.float()
    got, _ = classify(u.float(), memory, flat_index(memory), rule, classes, facts)
    # By hand: each source's best copy, the K best sources, a softmax over them summed per class.
    scores = u.float() @ memory.embeddings.T
    best = torch.full((len(u), 40), float("-inf")).scatter_reduce(1, origins.expand(len(u), -1), scores, "amax")
    top = best.topk(k, dim=1)
    source_labels = memory.labels[:40]  # every copy of an image has its label
    p = torch.softmax(top.values / 0.1, dim=1)
    expected = torch.zeros(len(u), classes).scatter_add(1, source_labels[top.indices], p).clamp_min(1e-30).log()
    torch.testing.assert_close(got, expected)


def test_the_search_fetches_until_every_query_has_k_sources():
    memory, origins, u = memory_of_copies(copies=20)
    memory.embeddings = memory.embeddings.float()
    facts = CellFacts.of(memory.labels, 4, origins)
    facts.copies = 1  # as if a source had one cell: the first search (K candidates) cannot hold K sources
    rule = ReadRule(topk=30, temperature=0.1, per_source=True)
    got, ids = classify(u.float(), memory, flat_index(memory), rule, 4, facts)
    assert ids.shape[1] > 30  # it searched again, deeper
    again, _ = classify(u.float(), memory, flat_index(memory), rule, 4, CellFacts.of(memory.labels, 4, origins))
    torch.testing.assert_close(got, again)


def test_a_per_class_read_returns_every_present_class():
    g = torch.Generator().manual_seed(1)
    big = F.normalize(torch.randn(3000, 8, generator=g) + torch.tensor([4.0] + [0.0] * 7), dim=1)
    small = F.normalize(torch.randn(5, 8, generator=g) - torch.tensor([4.0] + [0.0] * 7), dim=1)  # far away
    memory = MemoryBank(torch.cat([big, small]), torch.cat([torch.arange(3000) % 2, torch.full((5,), 2)]))
    u = big[:4]
    index = flat_index(memory)
    shared, _ = classify(u, memory, index, ReadRule(topk=64, temperature=0.1), 3)
    assert (shared[:, 2] < -60).all()  # the shared top K never holds the small class: no mass at all
    per_class, _ = classify(u, memory, index, ReadRule(topk=64, temperature=0.1, class_k=3), 3)
    assert (per_class > -60).all()  # every class present has mass, the small one from its side scan
    # Its score is its own 3 best cells: the same as scoring those exactly.
    s = u @ memory.embeddings.T
    mass = torch.stack([torch.logsumexp(s[:, memory.labels == c].topk(3).values / 0.1, dim=1) for c in range(3)], 1)
    torch.testing.assert_close(per_class, torch.log_softmax(mass, dim=1), atol=1e-4, rtol=1e-4)


def test_the_class_prior_divides_mass_by_count_to_alpha():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6]])
    labels = torch.tensor([[0, 0, 0, 1]])
    counts = torch.tensor([9, 1])
    plain = rule_log_probs(scores, labels, ReadRule(topk=4, temperature=0.1), 2).exp()
    for alpha in (0.5, 1.0):
        got = rule_log_probs(scores, labels, ReadRule(topk=4, temperature=0.1, alpha=alpha), 2, None, counts).exp()
        expected = plain / counts**alpha
        torch.testing.assert_close(got, expected / expected.sum(1, keepdim=True))


def config(tmp_path, **kw):
    base = {"dataset": "synthetic", "synthetic_train": 600, "synthetic_test": 200, "synthetic_classes": 5,
            "synthetic_shape": [1, 6, 6], "encoder": "linear", "dim": 16, "topk": 32, "epochs": 1, "batch_size": 64,
            "lr": 0.1, "device": "cpu", "out": str(tmp_path / "run")}
    return make_config(None, **{**base, **kw})


def test_the_tuned_read_is_stored_reloaded_and_used_with_no_flags(tmp_path):
    result = train(config(tmp_path, validation=0.2), log=quiet)
    clf = sam_cls.load(result["run_dir"], device="cpu")
    stored = clf.state["read"]
    assert clf.rule == ReadRule.from_dict(stored["rule"])
    report = stored["report"]
    # Tuned on the validation share, and never worse there than the read as trained.
    assert not report["leave_one_out"] and report["tuned"]["accuracy"] >= report["as_trained"]["accuracy"]
    record = json.loads(clf.run.metrics.read_text().splitlines()[-1])
    assert record["read"] == stored["rule"] and record["test_acc"] == result["test_acc"]
    # evaluate and predict read by it with no flags: the CLI's accuracy is the metrics line's.
    out = CliRunner().invoke(main, ["evaluate", "--run", result["run_dir"], "--json"])
    assert out.exit_code == 0, out.output
    measured = json.loads(out.output.strip().splitlines()[-1])
    assert measured["read"] == stored["rule"] and measured["accuracy"] == result["test_acc"]


def test_evaluate_tune_stores_a_read_for_a_run_that_had_none(tmp_path):
    result = train(config(tmp_path, tune_read=False), log=quiet)
    assert "read" not in sam_cls.load(result["run_dir"]).state
    out = CliRunner().invoke(main, ["evaluate", "--run", result["run_dir"], "--tune", "--json"])
    assert out.exit_code == 0, out.output
    clf = sam_cls.load(result["run_dir"])
    report = clf.state["read"]["report"]
    assert report["leave_one_out"] and report["tuned"]["accuracy"] >= report["as_trained"]["accuracy"]
    assert json.loads(out.output.strip().splitlines()[-1])["read"] == clf.state["read"]["rule"]


def test_a_run_without_a_stored_read_predicts_as_it_did(tmp_path):
    result = train(config(tmp_path, tune_read=False), log=quiet)
    clf = sam_cls.load(result["run_dir"], device="cpu")
    assert clf.rule == ReadRule(32, 0.05)
    trainer = Trainer(clf.cfg, quiet)
    x = trainer.data.test_x[:50]
    u = clf.encode(x)
    # The read before rules existed: the index's K cells, a softmax at the run's temperature, summed per class.
    _, ids = clf.index.search(u, 32)
    before = sparse_read(u, ids, clf.memory.embeddings, clf.memory.labels, len(clf.classes), 0.05)
    torch.testing.assert_close(clf.predict_log_proba(x, torch=True), before)
    assert torch.equal(clf.predict(x, torch=True), before.argmax(1))


def test_deformed_queries_are_fresh_seeded_deformations(tmp_path):
    cfg = config(tmp_path, dataset="mnist-mini", encoder="linear", deform_queries=0.5, seed=3)
    a, b = Trainer(cfg, quiet), Trainer(cfg, quiet)
    idx = torch.arange(64)
    xa, xb = a.batch(idx), b.batch(idx)
    assert torch.equal(xa, xb)  # deterministic under the seed
    changed = (xa != a.train_x[idx]).flatten(1).any(1)
    assert 16 < int(changed.sum()) < 48  # about half of them
    assert not torch.equal(a.batch(idx), xa)  # the next step draws other deformations


def test_a_thinned_step_hides_a_class_but_for_a_few_cells_read_by_every_query():
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 2, 2])
    draws = [thinned_class(labels, 1.0, 3, seed=5, step=s) for s in range(40)]
    assert all(torch.equal(d, thinned_class(labels, 1.0, 3, seed=5, step=s)) for s, d in enumerate(draws))
    assert all(1 <= len(d) <= 3 and len(set(labels[d].tolist())) == 1 for d in draws)  # one class, a few cells
    assert {int(labels[d[0]]) for d in draws} == {0, 1, 2} and {len(d) for d in draws} == {1, 2, 3}
    assert thinned_class(labels, 0.0, 3, seed=5, step=0) is None
    shares = [thinned_class(labels, 0.3, 3, seed=5, step=s) is not None for s in range(400)]
    assert 0.2 < sum(shares) / 400 < 0.4

    ids = torch.tensor([[3, 4, 0, 8], [5, 6, 7, 9], [3, 4, 5, 6]])  # searched candidates of 3 queries
    exclude = torch.tensor([[True, False, False, False], [False] * 4, [False] * 4])  # query 0's own cell: 3
    kept = torch.tensor([7])  # class 1 thinned to cell 7, which is query 2's own
    own_kept = torch.tensor([[False], [False], [True]])
    got, mask = thin_candidates(ids, exclude, labels, kept, own_kept)
    assert torch.equal(got, torch.cat([ids, torch.full((3, 1), 7)], 1))  # the kept cell joins every query
    readable = [set(got[b][~mask[b]].tolist()) for b in range(3)]
    assert readable[0] == {0, 8, 7}  # class 1's searched cells hidden (and 3, its own, stays out)
    assert readable[1] == {9, 7}  # 7 is read once, as the kept cell
    assert readable[2] == {3, 4, 5, 6}  # nothing else to read: its step reads unthinned, its own cell still out


def test_thinned_training_is_seeded_and_learns(tmp_path):
    thin = {"thin_classes": 0.5, "thin_cells": 5}
    runs = [train(config(tmp_path, out=str(tmp_path / name), **kw), log=quiet)
            for name, kw in (("a", thin), ("b", thin), ("plain", {}))]
    weights = [torch.cat([w.flatten() for w in load_tensors(RunDir(r["run_dir"]).checkpoint)["encoder"].values()])
               for r in runs]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])
    assert runs[0]["test_acc"] > 40  # chance is 20%
    with pytest.raises(ConfigError, match="--thin-classes 0.5 needs the sparse memory read"):
        config(tmp_path, thin_classes=0.5, head="softmax")


def test_a_new_class_retunes_the_stored_read_and_a_balanced_add_does_not(tmp_path):
    result = train(config(tmp_path), log=quiet)
    clf = sam_cls.load(result["run_dir"], device="cpu")
    data = Trainer(clf.cfg, quiet).data
    stored = clf.state["read"]
    # More of every class in the proportions it has: the shares do not move, the read stays.
    per_class = torch.cat([(data.test_y == c).nonzero().squeeze(1)[:4] for c in range(5)])
    clf.add(data.test_x[per_class], data.test_y[per_class].tolist())
    assert clf.state["read"] is stored
    # Five images of a new class: it is small, so the read is chosen again on it, left one out.
    clf.add(data.test_x[:5], ["new"] * 5)
    report = clf.state["read"]["report"]
    assert clf.state["read"] is not stored and report["small_classes"] == [clf.classes.index("new")]
    assert report["leave_one_out"] and report["tuned"]["accuracy"] >= report["as_trained"]["accuracy"]
    clf.save()
    assert sam_cls.load(result["run_dir"]).rule == ReadRule.from_dict(clf.state["read"]["rule"])


def test_the_tuned_reads_accuracy_weighs_each_class_alike():
    # 200 cells of one class and 10 of a small one beside it: read as trained, the small class's cells are
    # mostly misread, which a plain accuracy over the 210 queries would all but hide.
    g = torch.Generator().manual_seed(0)
    centre = F.normalize(torch.randn(8, generator=g), dim=0)
    big = F.normalize(centre + 0.6 * torch.randn(200, 8, generator=g), dim=1)
    small = F.normalize(centre + 0.3 + 0.6 * torch.randn(10, 8, generator=g), dim=1)
    memory = MemoryBank(torch.cat([big, small]), torch.tensor([0] * 200 + [1] * 10))
    base = ReadRule(topk=16, temperature=0.1)
    _, report = tune_read(memory.embeddings, memory.labels, memory, flat_index(memory), base, 2,
                          CellFacts.of(memory.labels, 2), own=torch.arange(210))
    # By hand: every cell read leave-one-out by the read as trained, each class's accuracy, their mean.
    scores = (memory.embeddings @ memory.embeddings.T).fill_diagonal_(float("-inf"))
    top = scores.topk(16, dim=1)
    p = torch.softmax(top.values / 0.1, dim=1)
    right = torch.zeros(210, 2).scatter_add(1, memory.labels[top.indices], p).argmax(1) == memory.labels
    per_class = [100 * right[memory.labels == c].float().mean().item() for c in (0, 1)]
    assert report["as_trained"]["accuracy"] == pytest.approx(sum(per_class) / 2, abs=1e-3)
    assert abs(sum(per_class) / 2 - 100 * right.float().mean().item()) > 5  # the weighing matters here
    assert report["tuned"]["accuracy"] >= report["as_trained"]["accuracy"]
    assert report["tuned"]["small_classes_score"] > report["as_trained"]["small_classes_score"]


def test_a_selection_from_shared_ranks_is_the_selection_made_alone():
    # The tuner keeps each pool's ranks between rules; a rule must select the same cells as it would alone.
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(5, 40, generator=g).sort(dim=1, descending=True).values
    scores[:, -4:] = float("-inf")  # masked candidates sort last
    labels, origins = torch.randint(0, 3, (5, 40), generator=g), torch.randint(0, 12, (5, 40), generator=g)
    ranks = {}
    for rule in (ReadRule(8, 0.1, class_k=2), ReadRule(8, 0.1, per_source=True), ReadRule(8, 0.1, per_source=True,
                 class_k=3), ReadRule(8, 0.1, class_k=5), ReadRule(16, 0.1)):
        shared = select_cells(scores, labels, rule, origins, ranks)
        assert torch.equal(shared, select_cells(scores, labels, rule, origins)), rule
    assert len(ranks) == 3  # by source; by class, with and without the per-source vote
