"""Training behaviour on small synthetic data: it learns, it is deterministic, it resumes exactly."""

import json
import time

import pytest
import torch
from datafiles import write_cifar10

from sam_cls.checkpoint import RunDir, load_tensors
from sam_cls.config import ConfigError, make_config
from sam_cls.modes import DenseMemory, SparseMemory
from sam_cls.phases import phase
from sam_cls.read import dense_read
from sam_cls.train import Trainer, TrainingError, train


def config(tmp_path, name="run", **kw):
    base = {"dataset": "synthetic", "synthetic_train": 600, "synthetic_test": 200, "synthetic_classes": 5,
                "synthetic_shape": [1, 6, 6], "encoder": "linear", "dim": 16, "topk": 32, "epochs": 2, "batch_size": 64,
                "lr": 0.1, "device": "cpu", "out": str(tmp_path / name)}
    base.update(kw)
    return make_config(None, **base)


def quiet(_msg):
    pass


def test_sparse_training_learns_well_above_chance(tmp_path):
    result = train(config(tmp_path), log=quiet)
    assert result["epochs"] == 2 and result["test_acc"] > 60  # chance is 20%
    lines = RunDir(result["run_dir"]).metrics.read_text().splitlines()
    record = json.loads(lines[-1])
    assert len(lines) == 2 and set(record) >= {"epoch", "train_loss", "test_acc", "images_per_s", "seconds",
                                                "index_rebuilds"}


@pytest.mark.parametrize("mode", [{"topk": 0}, {"support_sample": 100}, {"rebuild_every": "3"}, {"head": "softmax"}])
def test_other_read_modes_train(tmp_path, mode):
    result = train(config(tmp_path, epochs=1, **mode), log=quiet)
    assert result["test_acc"] > 40
    record = json.loads(RunDir(result["run_dir"]).metrics.read_text().splitlines()[-1])
    # Every R steps plus the rebuild before evaluation; the other modes rebuild only before evaluation.
    assert record["index_rebuilds"] == (1 + 10 // 3 if mode.get("rebuild_every") else 1)


@pytest.mark.parametrize("index", [{"index": "flat"}, {"index": "ivf", "nprobe": 3, "train_nprobe": 3}])
def test_training_read_excludes_the_query_and_matches_the_dense_read(tmp_path, index):
    # With K = N - 2 from a flat index, or all 3 lists of an IVF one, the sparse read sees every cell but the
    # query's own and its farthest. The IVF index lays the memory out list by list, so the own cells are
    # found through the memory's rows, not the examples' numbers.
    trainer = Trainer(config(tmp_path, synthetic_train=120, topk=118, **index), log=quiet)
    trainer.prepare()
    idx = torch.arange(8)
    u = trainer.encoder(trainer.batch(idx)).detach()
    mem = trainer.memory
    # Each query's own cell becomes its perfect match under a wrong label: read, it would dominate at a low
    # temperature and move probability to that label.
    own = mem.rows[idx]
    mem.embeddings[own] = u
    mem.labels[own] = (mem.labels[own] + 1) % 5
    trainer.cfg.temperature = 0.01
    trainer.refresher.rebuild("test")
    assert index["index"] == "flat" or not torch.equal(mem.rows, torch.arange(120))
    sparse = trainer.mode.log_probs(u, idx)
    assert isinstance(trainer.mode, SparseMemory)
    dense = DenseMemory(trainer.cfg, trainer.encoder, mem, trainer.refresher, 5).log_probs(u, idx)
    torch.testing.assert_close(sparse.exp(), dense.exp(), atol=2e-3, rtol=0)  # only the farthest cell differs
    with_own = dense_read(u, mem.embeddings, mem.labels, 5, trainer.cfg.temperature)
    # ...and the setup is sensitive: reading the own cell would move most rows by far more than that.
    assert ((with_own.exp() - dense.exp()).abs().amax(1) > 0.1).float().mean() >= 0.5


def test_same_seed_same_weights(tmp_path):
    a = train(config(tmp_path, "a", epochs=1), log=quiet)
    b = train(config(tmp_path, "b", epochs=1), log=quiet)
    wa = load_tensors(RunDir(a["run_dir"]).checkpoint)["encoder"]
    wb = load_tensors(RunDir(b["run_dir"]).checkpoint)["encoder"]
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("index", [{}, {"index": "ivf", "nprobe": 2, "train_nprobe": 1},
                                   {"index": "ivf", "nprobe": 2, "train_nprobe": 1, "rebuild_every": "3"}])
def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, index):
    # Natural images, so the crop/flip generator's state must be restored too. An IVF index's rebuilds
    # start k-means from its centroids, so the checkpoint must bring them back; searching 1-2 of its 7
    # lists makes every read depend on them. Rebuilds every 3 steps also follow the recall of that index.
    write_cifar10(tmp_path / "data", n_train=300, n_test=60)
    natural = {"dataset": "cifar10", "data_dir": str(tmp_path / "data"), "epochs": 3, **index}
    whole = train(config(tmp_path, "whole", **natural), log=quiet)

    original_save = Trainer.save

    def save_then_die(self, run):
        original_save(self, run)
        if self.epoch == 1:
            raise Interrupted  # as if the process were killed right after the first checkpoint

    monkeypatch.setattr(Trainer, "save", save_then_die)
    with pytest.raises(Interrupted):
        train(config(tmp_path, "split", **natural), log=quiet)
    monkeypatch.setattr(Trainer, "save", original_save)
    resumed = train(config(tmp_path, "split", **natural), resume=True, log=quiet)

    a = load_tensors(RunDir(whole["run_dir"]).checkpoint)
    b = load_tensors(RunDir(resumed["run_dir"]).checkpoint)
    assert a["step"] == b["step"]
    for k in a["encoder"]:
        torch.testing.assert_close(a["encoder"][k], b["encoder"][k], rtol=0, atol=0)
    torch.testing.assert_close(a["memory"]["embeddings"], b["memory"]["embeddings"], rtol=0, atol=0)
    assert whole["test_acc"] == resumed["test_acc"]
    assert len(RunDir(resumed["run_dir"]).metrics.read_text().splitlines()) == 3


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
def test_nan_loss_stops_with_a_clear_error_and_no_checkpoint(tmp_path, device):
    # On a GPU the torch index searches non-finite queries and the loss check catches them instead.
    cfg = config(tmp_path, lr=1e30, epochs=1, device=device, index="torch" if device == "cuda" else "auto")
    with pytest.raises(TrainingError, match="lower --lr"):
        train(cfg, log=quiet)
    assert not RunDir(cfg.out).checkpoint.exists()


def test_validation_split_replaces_test_and_shrinks_train(tmp_path):
    trainer = Trainer(config(tmp_path, validation=0.25), log=quiet)
    assert len(trainer.data.train_y) == 450 and len(trainer.data.test_y) == 150


def fake_clock(monkeypatch):
    """A step clock that advances one second per reading: each step takes exactly one second."""
    ticks = iter(range(10**6))
    monkeypatch.setattr(Trainer, "clock", staticmethod(lambda: float(next(ticks))))


def test_time_budget_stops_mid_epoch_and_reports_fractional_epochs(tmp_path, monkeypatch):
    fake_clock(monkeypatch)
    result = train(config(tmp_path, epochs=5, max_seconds=4), log=quiet)
    run = RunDir(result["run_dir"])
    assert result["epochs"] == 0.4 == run.load_metrics()[-1]["epoch"]  # 4 of the 10 steps of a pass
    state = load_tensors(run.checkpoint)
    assert state["step"] == 4 and state["train_seconds"] == 4 and state["epoch"] == 0
    with pytest.raises(ConfigError, match="max-seconds"):
        train(config(tmp_path, epochs=5, max_seconds=4), resume=True, log=quiet)


def test_a_resumed_cut_pass_finishes_the_same_batch_order(tmp_path, monkeypatch):
    fake_clock(monkeypatch)
    train(config(tmp_path, epochs=2, max_seconds=4), log=quiet)
    seen = []
    original = Trainer.batch
    monkeypatch.setattr(Trainer, "batch", lambda self, idx: (seen.append(idx.clone()), original(self, idx))[1])
    result = train(config(tmp_path, epochs=2), resume=True, log=quiet)
    run = RunDir(result["run_dir"])
    assert [r["epoch"] for r in run.load_metrics()] == [0.4, 1.0, 2.0] and result["epochs"] == 2
    # Steps 5-10 of the first pass, then a full second pass: each pass covers every training image once.
    first_pass = torch.cat(seen[:6])
    untouched = Trainer(config(tmp_path, "fresh", epochs=2), log=quiet)
    full_first = torch.randperm(600, generator=untouched.perm_gen)
    assert torch.equal(first_pass, full_first[4 * 64 :])
    assert torch.equal(torch.cat(seen[6:]).sort().values, torch.arange(600))


def test_schedule_warms_up_to_the_peak_then_decays_linearly_to_zero(tmp_path):
    trainer = Trainer(config(tmp_path, epochs=3, warmup_epochs=0.5), log=quiet)  # 10 steps a pass
    factors = [trainer.lr_factor(s) for s in range(trainer.total_steps + 1)]
    peak = [s for s, f in enumerate(factors) if f == pytest.approx(1.0)]  # the peak rate, for a step or two
    assert peak and 0 < factors[0] < 0.5 and factors[-1] == 0.0
    assert 0 < peak[0] and peak[-1] < trainer.total_steps // 2  # a short warm-up, then the long decay
    rising, falling = torch.tensor(factors[: peak[0] + 1]).diff(), torch.tensor(factors[peak[-1] :]).diff()
    assert (rising > 0).all() and (falling < 0).all()
    # Linear: every step of the decay lowers the rate by the same amount, and so does every warm-up step.
    torch.testing.assert_close(falling, falling.mean().expand_as(falling))
    torch.testing.assert_close(rising, rising.mean().expand_as(rising))


def test_schedule_runs_to_the_time_budget_when_it_ends_first(tmp_path):
    trainer = Trainer(config(tmp_path, epochs=4, warmup_epochs=0, max_seconds=100), log=quiet)
    assert trainer.lr_factor(0) == pytest.approx(1.0, abs=0.05)
    trainer.train_seconds = 50  # half the budget spent after very few steps: half the rate left
    assert trainer.lr_factor(1) == pytest.approx(0.5, abs=0.05)
    trainer.train_seconds = 100
    assert trainer.lr_factor(2) == 0.0


def test_metrics_carry_train_accuracy(tmp_path):
    result = train(config(tmp_path, epochs=2), log=quiet)
    records = RunDir(result["run_dir"]).load_metrics()
    assert all(0 <= r["train_acc"] <= 100 for r in records) and records[-1]["train_acc"] > 40


def test_batchnorm_is_calibrated_before_the_first_memory(tmp_path):
    # A fresh BatchNorm's running statistics (0, 1) would make the eval-mode memory unlike train-mode queries.
    trainer = Trainer(config(tmp_path, encoder="cnn", synthetic_shape=[3, 8, 8]), log=quiet)
    trainer.prepare()
    norm = next(m for m in trainer.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert norm.momentum == 0.1 and norm.num_batches_tracked > 0
    assert not torch.allclose(norm.running_var, torch.ones_like(norm.running_var))
    # The memory is what the calibrated eval-mode encoder says about each image.
    trainer.encoder.eval()
    with torch.no_grad():
        assert torch.allclose(trainer.memory.embeddings[:5], trainer.encoder(trainer.train_x[:5]), atol=1e-5)


def test_a_checkpoint_from_another_encoder_layout_is_refused_by_name(tmp_path):
    from sam_cls.checkpoint import CheckpointError, atomic_save

    result = train(config(tmp_path, epochs=1), log=quiet)
    run = RunDir(result["run_dir"])
    state = load_tensors(run.checkpoint)
    state["encoder"]["body.1.weight"] = torch.zeros(3, 3)  # weights of a differently shaped layer
    atomic_save(state, run.checkpoint)
    with pytest.raises(CheckpointError, match="linear encoder does not fit"):
        train(config(tmp_path, epochs=2), resume=True, log=quiet)


def test_the_phase_clock_breaks_a_run_into_its_parts(tmp_path):
    phase.reset()
    phase.timing = True
    try:
        start = time.perf_counter()
        train(config(tmp_path, epochs=1), log=quiet)
        wall = time.perf_counter() - start
    finally:
        phase.timing = False
    seconds = dict(phase.seconds)
    step = ("batch", "encoder", "read", "search", "read forward", "read backward", "backward", "optimizer",
            "memory write", "index refresh")
    end = ("prepare", "re-encode", "rebuild", "tune read", "test", "checkpoint")
    assert all(seconds.get(name, 0) > 0 for name in step + end), seconds
    # Nested phases lie inside their own: a read holds its search and forward, a backward the read's backward.
    assert seconds["read"] >= seconds["search"] + seconds["read forward"]
    assert seconds["backward"] >= seconds["read backward"]
    assert sum(seconds[name] for name in ("batch", "encoder", "read", "backward", "optimizer") + end) < wall
    phase.reset()
    train(config(tmp_path, "off", epochs=1), log=quiet)  # timing off: the labels cost nothing and count nothing
    assert not phase.seconds
