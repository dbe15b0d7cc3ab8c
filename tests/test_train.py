"""Training behaviour on small synthetic data: it learns, it is deterministic, it resumes exactly."""

import json

import pytest
import torch
from datafiles import write_cifar10

from sam_cls.checkpoint import RunDir, load_tensors
from sam_cls.config import make_config
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


def test_training_read_excludes_the_query_and_matches_the_dense_read(tmp_path):
    # With a flat index and K = N - 2, the sparse read sees every cell but the query's own and its farthest.
    trainer = Trainer(config(tmp_path, synthetic_train=120, topk=118, index="flat"), log=quiet)
    trainer.prepare()
    idx = torch.arange(8)
    u = trainer.encoder(trainer.batch(idx)).detach()
    mem = trainer.memory
    # Each query's own cell becomes its perfect match under a wrong label: read, it would dominate at a low
    # temperature and move probability to that label.
    mem.embeddings[idx] = u
    mem.labels[idx] = (mem.labels[idx] + 1) % 5
    trainer.cfg.temperature = 0.01
    trainer.refresher.rebuild("test")
    sparse = trainer.log_probs(u, idx)
    trainer.cfg.topk = 0
    dense = trainer.log_probs(u, idx)
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


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    # Natural images, so the crop/flip generator's state must be restored too.
    write_cifar10(tmp_path / "data", n_train=300, n_test=60)
    natural = {"dataset": "cifar10", "data_dir": str(tmp_path / "data"), "epochs": 3}
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


def test_nan_loss_stops_with_a_clear_error_and_no_checkpoint(tmp_path):
    cfg = config(tmp_path, lr=1e30, epochs=1)
    with pytest.raises(TrainingError, match="lower --lr"):
        train(cfg, log=quiet)
    assert not RunDir(cfg.out).checkpoint.exists()


def test_validation_split_replaces_test_and_shrinks_train(tmp_path):
    trainer = Trainer(config(tmp_path, validation=0.25), log=quiet)
    assert len(trainer.data.train_y) == 450 and len(trainer.data.test_y) == 150
