"""Runs a person can follow from the command line: one meaning per option, unreadable files listed not fatal,
add and forget in the history, `sam-cls info`, hidden folders, pictures that say what they show."""

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from datafiles import write_imagefolder
from PIL import Image

import sam_cls
from sam_cls.checkpoint import load_tensors
from sam_cls.cli import main
from sam_cls.data import load_dataset
from sam_cls.imagefolder import load_imagefolder
from sam_cls.plots import confusion_figure


@pytest.fixture
def run(mini_linear_run, tmp_path):
    return shutil.copytree(mini_linear_run, tmp_path / "run")


def cli(*args, code=0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, result.output + repr(result.exception)
    return result


def digit_folder(root, name, items=range(3), extra=None):
    """root/<name>/NN.png: mnist-mini test digits; extra: file name -> bytes written beside them."""
    test_x = load_dataset("mnist-mini").test_x
    (root / name).mkdir(parents=True)
    for i in items:
        Image.fromarray(test_x[i, 0].numpy()).save(root / name / f"{i:02d}.png")
    for file, data in (extra or {}).items():
        (root / name / file).write_bytes(data)
    return root


def test_predict_topk_is_cells_read_and_top_is_classes_shown(run, tmp_path):
    digit_folder(tmp_path / "new", "d")
    lines = cli("predict", "--run", run, tmp_path / "new" / "d", "--top", 2, "--topk", 1, "--json").stdout.splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 3 and all(len(row["top"]) == 2 for row in rows)
    assert all(row["top"][0]["probability"] == 1.0 for row in rows)  # one cell read: all its mass on one class
    error = cli("index-stats", "--run", run, "--topk", 100000, code=2).stderr
    assert "--topk 100000" in error and "5000 cells" in error  # not a silent clamp


def test_skip_bad_images_answers_the_good_files_and_lists_the_bad(run, tmp_path):
    digit_folder(tmp_path / "new", "d", extra={"bad.png": b"not an image"})
    failed = cli("predict", "--run", run, tmp_path / "new" / "d", code=2)  # without the flag: one error, no answers
    assert not failed.stdout and "bad.png" in failed.stderr
    result = cli("predict", "--run", run, tmp_path / "new" / "d", "--skip-bad-images", code=1)
    assert [line.split()[0] for line in result.stdout.splitlines()] == [str(tmp_path / "new" / "d" / f"0{i}.png")
                                                                       for i in range(3)]
    skipped = [line for line in result.stderr.splitlines() if line.startswith("skipped:")]
    assert len(skipped) == 1 and "bad.png" in skipped[0]
    added = cli("add", "--run", run, "--data", tmp_path / "new", "--skip-bad-images", "--json", code=1)
    assert json.loads(added.stdout)["added"] == 3 and "bad.png" in added.stderr
    assert sam_cls.load(run, device="cpu").memory.size == 5003


def test_add_and_forget_are_in_the_history_and_a_forget_of_nothing_commits_nothing(run, tmp_path):
    before = (run / "checkpoint.pt").read_bytes()
    result = cli("forget", "--run", run, "--source", "nowhere/*", "--json")
    assert json.loads(result.stdout)["forgotten"] == 0 and "nothing committed" in result.stderr
    assert (run / "checkpoint.pt").read_bytes() == before  # no new generation: the run still resumes
    cli("add", "--run", run, "--data", digit_folder(tmp_path / "new", "seven"))
    cli("forget", "--run", run, "--class", "seven")
    history = load_tensors(run / "checkpoint.pt")["history"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics == history and [r.get("op") for r in history] == [None, "add", "forget"]
    assert history[1]["added"] == 3 and history[1]["new_classes"] == ["seven"] and history[1]["cells"] == 5003
    assert history[2]["forgotten"] == 3 and history[2]["class"] == "seven" and history[2]["cells"] == 5000


def test_info_shows_what_a_run_is(run, tmp_path):
    cli("add", "--run", run, "--data", digit_folder(tmp_path / "new", "x", items=range(4)))
    info = json.loads(cli("info", "--run", run, "--json").stdout)
    assert (info["dataset"], info["encoder"], info["dim"], info["image_shape"]) == ("mnist-mini", "linear", 16,
                                                                                    [1, 28, 28])
    assert info["classes"]["x"] == 4 and sum(info["classes"].values()) == info["memory"]["cells"] == 5004
    assert [(s["name"], s["cells"]) for s in info["memory"]["sources"]] == [("mnist-mini train", 5000),
                                                                              (str(tmp_path / "new"), 4)]
    assert info["index"]["size"] == 5004 and info["read"]["topk"] == 16 and info["edited"]
    assert [r.get("op") for r in info["history"]] == [None, "add"] and info["history"][0]["test_acc"] > 0
    text = cli("info", "--run", run).stdout
    assert "7 - seven" in text and "add     4 cells" in text and "test accuracy" in text


def test_hidden_folders_are_not_classes_and_a_label_text_twin_is_a_warning(run, tmp_path):
    folder = digit_folder(tmp_path / "new", "7", extra={})
    digit_folder(folder, ".ipynb_checkpoints")
    result = cli("add", "--run", run, "--data", folder, "--json")
    assert json.loads(result.stdout)["new_classes"] == ["7"]
    assert "'7'" in result.stderr and "'7 - seven'" in result.stderr
    assert len(cli("predict", "--run", run, folder).stdout.splitlines()) == 3  # the hidden folder's not read
    write_imagefolder(tmp_path / "images", n_per_class=2, classes=["cat", "dog"])
    for split in ("train", "test"):
        shutil.copytree(tmp_path / "images" / split / "cat", tmp_path / "images" / split / ".ipynb_checkpoints")
    assert load_imagefolder(tmp_path / "images", lambda _: None).classes == ["cat", "dog"]


def test_a_second_train_says_where_it_went_and_a_failed_one_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny = ["train", "--dataset", "synthetic", "--synthetic-train", 100, "--synthetic-test", 20, "--encoder",
            "linear", "--dim", 8, "--epochs", 1, "--device", "cpu", "--no-tune-read"]
    cli(*tiny, "--topk", 4)
    second = cli(*tiny, "--topk", 4)
    assert "runs/synthetic-linear-k4 holds a run already" in second.stderr
    assert "runs/synthetic-linear-k4-2" in second.stderr and (tmp_path / "runs/synthetic-linear-k4-2").is_dir()
    shutil.rmtree(tmp_path / "runs")
    failed = cli(*tiny, "--topk", 500, code=2)  # K over the memory: found after the run's folder is made
    assert "--topk 500" in failed.stderr and not (tmp_path / "runs").exists()


def test_the_confusion_matrix_has_titles_whole_labels_counts_and_a_scale(run, tmp_path):
    classes = ["a very long class name", "b"]
    fig = confusion_figure(torch.tensor([[5, 1], [0, 7]]), classes)
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("Predicted label", "True label")
    assert [t.get_text() for t in ax.get_xticklabels()] == classes == [t.get_text() for t in ax.get_yticklabels()]
    assert sorted(t.get_text() for t in ax.texts) == ["0", "1", "5", "7"] and len(fig.axes) == 2  # the colour bar
    result = cli("evaluate", "--run", run, "--plot", tmp_path / "cm.png")
    assert f"wrote {tmp_path / 'cm.png'}" in result.stderr and Image.open(tmp_path / "cm.png").size[0] > 300


def test_explain_says_when_neighbour_images_have_moved(run, tmp_path):
    cli("add", "--run", run, "--data", digit_folder(tmp_path / "new", "d", items=range(5)))
    query = tmp_path / "query.png"
    shutil.copy(tmp_path / "new" / "d" / "00.png", query)
    shutil.move(tmp_path / "new", tmp_path / "moved")
    result = cli("explain", "--run", run, query, "--neighbours", 3, "--out", tmp_path / "grid.png")
    assert "not where the run found them" in result.stderr and f"wrote {tmp_path / 'grid.png'}" in result.stderr
    grid = np.asarray(Image.open(tmp_path / "grid.png").convert("L"))
    tiles = [grid[4:68, x: x + 64] for x in range(4, grid.shape[1] - 64, 68)]
    assert len(tiles) == 4 and not any((t == t[0, 0]).all() for t in tiles)  # no blank standing in for an image
