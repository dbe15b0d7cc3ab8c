"""The run directory: one writer at a time, commits that keep the generation before, configs that never lie."""

import os

import pytest
import torch

import sam_cls
from sam_cls.checkpoint import CheckpointError, RunDir, RunLockedError, load_tensors
from sam_cls.config import make_config
from sam_cls.run import evaluate_run, run_data
from sam_cls.train import TrainingError, resume, train


def quiet(_msg):
    pass


def config(tmp_path, **kw):
    base = {"dataset": "synthetic", "synthetic_train": 300, "synthetic_test": 100, "synthetic_classes": 5,
            "synthetic_shape": [1, 6, 6], "encoder": "linear", "dim": 16, "topk": 16, "epochs": 2,
            "batch_size": 32, "lr": 0.1, "device": "cpu", "out": str(tmp_path / "run")}
    return make_config(None, **{**base, **kw})


def test_a_second_writer_fails_at_once_naming_the_first(tmp_path):
    run = RunDir(tmp_path / "run")
    with run.lock():
        with pytest.raises(RunLockedError, match=f"process {os.getpid()}"), RunDir(tmp_path / "run").lock():
            pass
        with pytest.raises(RunLockedError):
            train(config(tmp_path), log=quiet)
    with run.lock():  # released with its holder
        pass


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_generation(tmp_path):
    train(config(tmp_path), log=quiet)
    run = RunDir(tmp_path / "run")
    first = run.load_metrics()[0]
    assert load_tensors(run.previous)["step"] == first["step"]
    data = b"\0" * run.checkpoint.stat().st_size
    run.checkpoint.write_bytes(data)  # zeroed in place: unreadable
    said = []
    clf = sam_cls.load(run.path, device="cpu", log=said.append)
    assert "previous checkpoint" in said[0] and clf.state["step"] == first["step"]
    assert evaluate_run(clf, run_data(clf, log=quiet))["accuracy"] == first["test_acc"]
    # Resuming continues from that generation and commits over the damaged file.
    resume(str(run.path), log=quiet, epochs=3)
    assert load_tensors(run.checkpoint)["epoch"] == 3


def test_a_failed_resume_changes_neither_config_nor_checkpoint(tmp_path, monkeypatch):
    from sam_cls.train import Trainer

    train(config(tmp_path), log=quiet)
    run = RunDir(tmp_path / "run")
    before = (run.config.read_text(), run.checkpoint.read_bytes())
    monkeypatch.setattr(Trainer, "train_epoch", lambda self: (_ for _ in ()).throw(self.diverged("nan")))
    with pytest.raises(TrainingError, match="checkpoint of epoch 2 is intact"):
        resume(str(run.path), log=quiet, epochs=3, temperature=0.5)
    assert (run.config.read_text(), run.checkpoint.read_bytes()) == before
    clf = sam_cls.load(run.path, device="cpu")
    assert clf.cfg.temperature == 0.05 and clf.cfg.epochs == 2


def test_divergence_before_any_checkpoint_says_none_was_written(tmp_path):
    with pytest.raises(TrainingError, match="no checkpoint was written"):
        train(config(tmp_path, lr=1e30), log=quiet)


def test_the_checkpoints_config_is_what_commands_read(tmp_path):
    train(config(tmp_path, epochs=1), log=quiet)
    run = RunDir(tmp_path / "run")
    run.config.write_text("topk: 3\ntemperature: 9.0\n")  # a config.yaml from elsewhere
    clf = sam_cls.load(run.path, device="cpu")
    assert (clf.cfg.topk, clf.cfg.temperature) == (16, 0.05)
    resume(str(run.path), log=quiet, epochs=2)
    assert "topk: 16" in run.config.read_text()  # the mirror follows the commit


def test_what_an_interrupted_writer_left_is_cleaned_at_the_next_start(tmp_path):
    train(config(tmp_path, epochs=1), log=quiet)
    run = RunDir(tmp_path / "run")
    leftovers = [run.path / "checkpoint.pt.tmp", run.path / ".index.next.tmp", run.path / ".index-0000beef.next"]
    for path in leftovers:
        path.write_bytes(b"half")
    with run.lock():
        pass
    assert not any(path.exists() for path in leftovers)
    assert sam_cls.load(run.path, device="cpu").index.size == 300


def test_a_crash_between_commit_and_rename_is_finished_by_the_next_writer(tmp_path, monkeypatch):
    from sam_cls import checkpoint

    train(config(tmp_path, epochs=1), log=quiet)
    run = RunDir(tmp_path / "run")
    real = os.replace
    monkeypatch.setattr(checkpoint.os, "replace",
                        lambda a, b: (_ for _ in ()).throw(OSError(5, "I/O error")) if str(a).endswith(".next")
                        else real(a, b))
    said = []
    resume(str(run.path), log=said.append, epochs=2)  # after the commit point: a warning, not a failure
    monkeypatch.undo()
    assert any(line.startswith("warning: committed") and "I/O error" in line for line in said), said
    assert load_tensors(run.checkpoint)["epoch"] == 2  # committed, its index still beside the run
    reader = sam_cls.load(run.path, device="cpu")
    assert reader.index.size == 300 and list(run.path.glob(".index-*.next"))
    with run.lock():  # the next writer puts it in place
        pass
    assert not list(run.path.glob(".index-*.next"))
    assert torch.equal(sam_cls.load(run.path, device="cpu").memory.embeddings, reader.memory.embeddings)


def test_an_unreadable_run_is_one_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        sam_cls.load(tmp_path / "nothing")


@pytest.mark.parametrize("key,offset", [("embeddings", 4 * 2112 + 3), ("labels", 8 * 150)])
def test_a_flipped_byte_inside_a_tensor_is_found(tmp_path, key, offset):
    # torch.load reads tensor data without checking it: the checkpoint's own checksum does.
    train(config(tmp_path), log=quiet)
    run = RunDir(tmp_path / "run")
    raw = bytearray(run.checkpoint.read_bytes())
    tensor = load_tensors(run.checkpoint)["memory"][key]
    raw[raw.find(tensor.numpy().tobytes()) + offset] ^= 0xFF
    run.checkpoint.write_bytes(raw)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_tensors(run.checkpoint)
    said = []
    clf = sam_cls.load(run.path, device="cpu", log=said.append)  # the previous generation, and it says so
    assert "checksum mismatch" in said[0] and clf.state["epoch"] == 1


def test_images_too_small_for_the_encoder_are_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cnn encoder needs images of at least 8x8"):
        train(config(tmp_path, encoder="cnn", synthetic_shape=[1, 4, 4]), log=quiet)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_run_directory_is_one_clear_error(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o555)
    try:
        with pytest.raises(OSError) as caught:
            train(config(tmp_path), log=quiet)
        assert caught.value.filename and str(run) in caught.value.filename
    finally:
        run.chmod(0o755)
