"""The command line end to end on tiny data written in the real on-disk formats."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from datafiles import write_cifar100, write_imagefolder

from sam_cls.checkpoint import load_tensors
from sam_cls.cli import main

TINY = ["--encoder", "linear", "--dim", "16", "--topk", "16", "--batch-size", "32", "--device", "cpu"]


def run(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def last_json(result) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


def check_run_lifecycle(tmp_path, dataset, data_dir, n_train, n_test):
    out = tmp_path / "run"
    common = ["--dataset", dataset, "--data-dir", data_dir, *TINY]
    summary = last_json(run("train", *common, "--epochs", "1", "--out", out, "--json"))
    assert summary["epochs"] == 1 and summary["run_dir"] == str(out)
    assert 0 <= summary["test_acc"] <= 100 and summary["seconds"] > 0
    for name in ("config.yaml", "checkpoint.pt", "index.faiss", "metrics.jsonl"):
        assert (out / name).is_file(), name

    rebuilt = last_json(run("rebuild-index", "--run", out, "--index", "flat", "--json"))
    assert rebuilt["ntotal"] == n_train and rebuilt["dim"] == 16 and rebuilt["build_seconds"] >= 0
    assert rebuilt["recall_at_k"] == 1.0  # flat is exact

    evaluated = last_json(run("evaluate", "--run", out, "--json"))
    assert evaluated["n"] == n_test and evaluated["topk"] == 16
    assert evaluated["accuracy"] == pytest.approx(summary["test_acc"], abs=1e-6)  # same encoder, same memory

    stats = last_json(run("index-stats", "--run", out, "--queries", "10", "--json"))
    assert stats["recall_at_k"] == 1.0 and stats["ntotal"] == n_train

    resumed = last_json(run("train", "--out", out, "--resume", "--epochs", "2", "--json"))
    assert resumed["epochs"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_cifar100_train_rebuild_evaluate_resume(tmp_path):
    write_cifar100(tmp_path / "data", n_train=200, n_test=40)
    check_run_lifecycle(tmp_path, "cifar100", tmp_path / "data", 200, 40)


def test_imagefolder_train_rebuild_evaluate_resume(tmp_path):
    write_imagefolder(tmp_path / "images", n_per_class=30, classes=["ant", "bee", "cat"], size=12, seed=0)
    n_train = len(list((tmp_path / "images" / "train").rglob("*.*")))
    n_test = len(list((tmp_path / "images" / "test").rglob("*.*")))
    check_run_lifecycle(tmp_path, "imagefolder", tmp_path / "images", n_train, n_test)


def error_line(result) -> str:
    assert result.exit_code == 2, result.output + repr(result.exception)
    return result.stderr.strip().splitlines()[-1]


def test_bad_input_fails_with_one_clear_line(tmp_path):
    line = error_line(run("train", "--dataset", "imagenet", "--out", tmp_path / "x", ok=False))
    assert line.startswith("error: --dataset") and "'imagenet'" in line and "mnist-mini" in line
    assert "--encoder" in error_line(run("train", "--dataset", "synthetic", "--encoder", "vit",
                                         "--out", tmp_path / "y", ok=False))
    line = error_line(run("train", "--dataset", "synthetic", "--topk", "100000", "--out", tmp_path / "z", ok=False))
    assert "--topk 100000" in line
    assert not (tmp_path / "z" / "checkpoint.pt").exists()
    assert "no checkpoint" in error_line(run("evaluate", "--run", tmp_path / "nowhere", ok=False))


def test_mismatched_or_corrupt_run_files_are_refused(tmp_path):
    out = tmp_path / "run"
    run("train", "--dataset", "synthetic", *TINY, "--epochs", "1", "--out", out)
    good_index = (out / "index.faiss").read_bytes()
    # An index over a different number of cells than the memory.
    from sam_cls.index import IndexParams, build_index

    other = build_index(torch.nn.functional.normalize(torch.randn(50, 16), dim=1), IndexParams(kind="flat"), k=16)
    other.save(out / "index.faiss")
    line = error_line(run("evaluate", "--run", out, ok=False))
    assert "50" in line and "rebuild-index" in line
    (out / "index.faiss").write_bytes(good_index)
    # A truncated checkpoint.
    ckpt = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(ckpt[: len(ckpt) // 2])
    assert "corrupt" in error_line(run("evaluate", "--run", out, ok=False))
    (out / "checkpoint.pt").write_bytes(ckpt)
    assert load_tensors(out / "checkpoint.pt")["epoch"] == 1
    # Resuming with a different encoder is refused and leaves the run as it was.
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    line = error_line(run("train", "--out", copy, "--resume", "--encoder", "conv1", ok=False))
    assert "encoder" in line
    assert (copy / "checkpoint.pt").read_bytes() == ckpt


def test_config_file_with_cli_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset: synthetic\nencoder: linear\ndim: 8\ntopk: 8\nepochs: 3\nbatch_size: 64\ndevice: cpu\n")
    out = tmp_path / "run"
    summary = last_json(run("train", "--config", cfg, "--epochs", "1", "--out", out, "--json"))
    assert summary["epochs"] == 1
    assert "dim: 8" in (out / "config.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: synthetic\ntopkk: 3\n")
    assert "topkk" in error_line(run("train", "--config", bad, ok=False))


def test_readme_commands_are_what_ci_runs():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme, ci = (root / "README.md").read_text(), (root / ".ci" / "run").read_text()
    for command in ('pip install -e ".[cpu,dev]"', "pytest -q"):
        assert f"\n{command}\n" in readme and f"\n{command}\n" in ci, command


def test_train_nprobe_option_sets_the_training_search_depth(tmp_path):
    out = tmp_path / "run"
    result = run("train", "--dataset", "synthetic", *TINY, "--epochs", "1", "--index", "ivf", "--nlist", "8",
                 "--nprobe", "6", "--train-nprobe", "2", "--out", out)
    assert "nprobe=6" in result.output and "training reads nprobe=2" in result.output
    assert "train_nprobe: 2" in (out / "config.yaml").read_text()
    assert "--train-nprobe" in run("train", "--train-nprobe", "0", ok=False).output  # named in the error


def test_default_data_set_trains_offline_without_data_options(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./data folder anywhere: mnist-mini comes from inside the package
    out = tmp_path / "run"
    summary = last_json(run("train", "--epochs", "1", "--encoder", "linear", "--dim", "16", "--topk", "16",
                            "--batch-size", "256", "--device", "cpu", "--out", out, "--json"))
    assert summary["epochs"] == 1 and summary["test_acc"] > 60  # 10 digits: chance is 10%
    assert "dataset: mnist-mini" in (out / "config.yaml").read_text()
    evaluated = last_json(run("evaluate", "--run", out, "--json"))
    assert evaluated["n"] == 1000 and evaluated["accuracy"] == pytest.approx(summary["test_acc"], abs=1e-6)
    assert not (tmp_path / "data").exists()


def test_using_a_run_does_not_import_the_training_module():
    import subprocess
    import sys

    code = "import sys, sam_cls, sam_cls.run, sam_cls.cli; print('sam_cls.train' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False"]
