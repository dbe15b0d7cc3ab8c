"""Using a trained run: predict, explain, add and forget, from Python and the command line, on tiny data."""

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from datafiles import write_imagefolder
from PIL import Image

import sam_cls
from sam_cls.checkpoint import CheckpointError, RunDir, load_tensors
from sam_cls.cli import main
from sam_cls.config import make_config
from sam_cls.data import DatasetError
from sam_cls.run import evaluate_run, run_data
from sam_cls.train import train


def quiet(_msg):
    pass


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1-epoch run on a 3-class RGB image folder of 12x12 images, and that folder; it reads as trained
    (tests/test_rules.py covers the tuned read)."""
    root = tmp_path_factory.mktemp("use")
    write_imagefolder(root / "images", n_per_class=30, classes=["ant", "bee", "cat"], size=12, seed=0)
    cfg = make_config(None, dataset="imagefolder", data_dir=str(root / "images"), encoder="linear", dim=16,
                      topk=16, epochs=1, batch_size=32, device="cpu", out=str(root / "run"), tune_read=False)
    train(cfg, log=quiet)
    return root / "run", root / "images"


@pytest.fixture
def run_copy(trained, tmp_path):
    """A copy of the trained run a test may change."""
    shutil.copytree(trained[0], tmp_path / "run")
    return tmp_path / "run"


def new_class_folder(root, name="dog", n=4, size=12, seed=7):
    """root/<name>/*.png: images unlike the training set (one flat colour each)."""
    rng = np.random.default_rng(seed)
    (root / name).mkdir(parents=True)
    for i in range(n):
        colour = rng.integers(0, 256, size=3, dtype=np.uint8)
        Image.fromarray(np.broadcast_to(colour, (size, size, 3)).copy()).save(root / name / f"{i}.png")
    return root


def test_python_predict_agrees_with_evaluate(trained):
    run, _ = trained
    clf = sam_cls.load(run, device="cpu")
    assert clf.classes == ["ant", "bee", "cat"] and clf.image_shape == (3, 12, 12)
    data = run_data(clf, log=quiet)
    predicted = clf.predict(data.test_x, torch=True)
    measured = evaluate_run(clf, data)
    assert measured["accuracy"] == pytest.approx(100.0 * (predicted == data.test_y).float().mean().item(), abs=1e-3)
    assert measured["accuracy"] == RunDir(run).load_metrics()[-1]["test_acc"]  # what training reported
    proba = clf.predict_proba(data.test_x[:5], torch=True)
    torch.testing.assert_close(proba.sum(1), torch.ones(5))
    sims, cells = clf.kneighbors(data.test_x[:5], 3)
    assert sims.shape == cells.shape == (5, 3) and (sims[:, :-1] >= sims[:, 1:]).all()  # nearest first


def test_predict_needs_no_training_data_and_takes_any_image(trained, tmp_path):
    run, images = trained
    moved = shutil.copytree(run, tmp_path / "run")
    files = sorted((images / "test" / "bee").iterdir())[:3]
    before = sam_cls.load(moved, device="cpu").predict(files)
    # The data set gone: a run predicts from its own files alone.
    hidden = shutil.move(str(images), str(tmp_path / "elsewhere"))
    try:
        files = [tmp_path / "elsewhere" / "test" / "bee" / f.name for f in files]
        clf = sam_cls.load(moved, device="cpu")
        assert np.array_equal(clf.predict(files), before)
        # A grey image into an RGB run, and a larger one: converted and resized as training's were.
        grey = tmp_path / "grey.png"
        Image.open(files[0]).convert("L").save(grey)
        large = tmp_path / "large.png"
        Image.open(files[0]).resize((40, 40)).save(large)
        assert clf.predict([grey, large]).shape == (2,)
        assert clf.predict(Image.open(files[0])).shape == (1,)
        # A corrupt file is one error naming it.
        bad = tmp_path / "bad.png"
        bad.write_bytes(files[0].read_bytes()[:40])
        with pytest.raises(DatasetError, match="bad.png"):
            clf.predict([bad])
        rows = clf.explain(files[0], neighbours=5)
        assert len(rows) == 5 and {"label", "similarity", "weight", "source"} <= set(rows[0])
        assert rows[0]["source"].startswith("imagefolder train #")
        assert sum(r["weight"] for r in clf.explain(files[0], neighbours=16)) == pytest.approx(1.0, abs=1e-3)
    finally:
        shutil.move(hidden, str(images))


def test_add_a_new_class_then_forget_it(run_copy, tmp_path):
    folder = new_class_folder(tmp_path / "new")
    clf = sam_cls.load(run_copy, device="cpu")
    size = clf.memory.size
    assert clf.add_folder(folder) == 4
    assert clf.classes[-1] == "dog" and clf.memory.size == size + 4
    files = sorted((folder / "dog").iterdir())
    # An added image is its own nearest cell: read with others, it is classified as the class it was given.
    assert clf.explain(files[0], 1)[0]["source"].endswith("dog/0.png")
    clf.save()
    again = sam_cls.load(run_copy, device="cpu")
    assert again.classes[-1] == "dog" and again.memory.size == size + 4
    assert again.describe(size) == str((folder / "dog" / "0.png").resolve())
    assert again.forget(class_name="dog") == 4
    assert "dog" not in [again.classes[i] for i in again.predict(files)]
    again.save()
    assert sam_cls.load(run_copy, device="cpu").memory.size == size
    # A run whose memory was edited cannot resume training.
    with pytest.raises(CheckpointError, match="add"):
        train(make_config(None, **{**sam_cls.load(run_copy).cfg.to_dict(), "epochs": 2, "out": str(run_copy)}),
              resume=True, log=quiet)


def test_a_balanced_read_lifts_a_class_added_from_few_examples(run_copy, tmp_path):
    clf = sam_cls.load(run_copy, device="cpu")
    files = sorted((new_class_folder(tmp_path / "new", n=2) / "dog").iterdir())
    clf.add(files[:1], ["dog"])  # one cell against ~30 of each trained class
    dog = clf.classes.index("dog")
    plain, balanced = clf.predict_proba(files[1:], torch=True), clf.predict_proba(files[1:], balanced=True, torch=True)
    torch.testing.assert_close(balanced.sum(1), torch.ones(1))
    assert balanced[0, dog] > plain[0, dog]
    # Every class weighed by its cell count: on equal counts the balanced read is the read as trained.
    counts = torch.bincount(clf.memory.labels, minlength=len(clf.classes)).float()
    expected = plain * counts.clamp_min(1).reciprocal()
    torch.testing.assert_close(balanced, expected / expected.sum(1, keepdim=True))


def test_forget_by_source_pattern_and_cell_numbers(run_copy):
    clf = sam_cls.load(run_copy, device="cpu")
    size = clf.memory.size
    assert clf.forget(cells=[0, 1, 2]) == 3 and clf.memory.size == size - 3
    n = clf.forget(source="imagefolder train #1?")  # the ten items 10-19 that are still there
    assert 0 < n <= 10 and clf.memory.size == size - 3 - n
    with pytest.raises(ValueError, match="no class"):
        clf.forget(class_name="whale")


@pytest.mark.parametrize("where", ["index", "checkpoint", "rename"])
def test_a_failed_save_leaves_the_run_as_it_was(run_copy, tmp_path, monkeypatch, where):
    import os

    from sam_cls import checkpoint

    folder = new_class_folder(tmp_path / "new")
    ckpt = (run_copy / "checkpoint.pt").read_bytes()
    index = (run_copy / "index.faiss").read_bytes()
    clf = sam_cls.load(run_copy, device="cpu")
    clf.add_folder(folder)

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if where == "index":
        monkeypatch.setattr(type(clf.index), "save", boom)
    elif where == "checkpoint":
        monkeypatch.setattr(checkpoint, "atomic_save", boom)
    else:  # the checkpoint landed; the index's rename did not
        real = os.replace
        monkeypatch.setattr(checkpoint.os, "replace",
                            lambda a, b: boom() if str(a).endswith(".next") else real(a, b))
    if where == "rename":  # after the commit point: a warning, and the save stands
        clf.save()
    else:
        with pytest.raises(OSError):
            clf.save()
    monkeypatch.undo()
    after = sam_cls.load(run_copy, device="cpu")
    if where == "rename":  # committed: the new memory with its own index
        assert after.memory.size == clf.memory.size and after.index.size == after.memory.size
    else:  # not committed: exactly the files before
        assert (run_copy / "checkpoint.pt").read_bytes() == ckpt
        assert (run_copy / "index.faiss").read_bytes() == index
        assert after.memory.size == after.index.size < clf.memory.size


def test_an_index_from_another_state_of_the_run_is_refused(run_copy, tmp_path):
    stale = (run_copy / "index.faiss").read_bytes()
    clf = sam_cls.load(run_copy, device="cpu")
    clf.forget(cells=[0])
    clf.save()
    (run_copy / "index.faiss").write_bytes(stale)  # same kind, dim and file format: only the digest tells
    with pytest.raises(CheckpointError, match="rebuild-index"):
        sam_cls.load(run_copy, device="cpu")
    # ...and the fix it names works on that very run.
    cli("rebuild-index", "--run", run_copy)
    assert sam_cls.load(run_copy, device="cpu").index.size == clf.memory.size


def test_rebuild_index_keeps_the_runs_own_index_settings(run_copy):
    cli("rebuild-index", "--run", run_copy, "--index", "hnsw", "--ef-search", "40")
    rebuilt = json.loads(cli("rebuild-index", "--run", run_copy, "--json").stdout)  # no options this time
    assert rebuilt["index"] == "hnsw"
    clf = sam_cls.load(run_copy, device="cpu")
    assert (clf.cfg.index, clf.cfg.ef_search, clf.index.kind) == ("hnsw", 40, "hnsw")


def cli(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def test_cli_predict_explain_add_forget_evaluate(run_copy, trained, tmp_path):
    _, images = trained
    files = sorted((images / "test" / "cat").iterdir())[:2]
    out = cli("predict", "--run", run_copy, *files, "--json", "--top", "2").stdout.strip().splitlines()
    first = json.loads(out[0])
    assert len(out) == 2 and first["path"] == str(files[0]) and len(first["top"]) == 2
    assert sum(t["probability"] for t in first["top"]) <= 1.0 + 1e-6
    rows = json.loads(cli("explain", "--run", run_copy, files[0], "--neighbours", "4", "--out",
                          tmp_path / "grid.png", "--json").stdout)
    assert len(rows["neighbours"]) == 4 and Image.open(tmp_path / "grid.png").size[0] > 4 * 64
    folder = new_class_folder(tmp_path / "new")
    added = json.loads(cli("add", "--run", run_copy, "--data", folder, "--json").stdout)
    assert added["added"] == 4 and "dog" in added["classes"]
    dog = min((folder / "dog").iterdir())
    assert json.loads(cli("predict", "--run", run_copy, dog, "--json").stdout)["top"][0]["class"] == "dog"
    forgot = json.loads(cli("forget", "--run", run_copy, "--class", "dog", "--json").stdout)
    assert forgot["forgotten"] == 4
    evaluated = json.loads(cli("evaluate", "--run", run_copy, "--plot", tmp_path / "cm.png", "--json").stdout)
    assert evaluated["top5"] >= evaluated["accuracy"] and set(evaluated["per_class"]) == {"ant", "bee", "cat"}
    assert (tmp_path / "cm.png").is_file()
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    result = cli("predict", "--run", run_copy, bad, ok=False)
    assert result.exit_code == 2 and "bad.jpg" in result.stderr.strip().splitlines()[-1]
    assert load_tensors(run_copy / "checkpoint.pt")["edited"]


def test_an_add_that_brings_a_small_class_refits_the_metric_in_one_space(mini_linear_run, tmp_path):
    run = shutil.copytree(mini_linear_run, tmp_path / "run")
    data = run_data(sam_cls.load(run, device="cpu"), log=quiet)
    mirrored = data.train_x[data.train_y == 2][:100].flip(3)  # a new class beside "2": 100 cells against 500 each
    plain = sam_cls.load(run, device="cpu")
    weights = {k: v.clone() for k, v in plain.encoder.state_dict().items()}
    plain.add(mirrored, ["mirrored two"] * 100, refit=False)
    assert [r["op"] for r in plain.records] == ["add"] and "refit" not in plain.records[0]
    assert all(torch.equal(v, weights[k]) for k, v in plain.encoder.state_dict().items())
    clf = sam_cls.load(run, device="cpu")
    clf.add(mirrored, ["mirrored two"] * 100)
    refit = clf.records[-1]["refit"]
    # Kept where it reads the held-out cells better for the small class and no worse for the others, as here.
    assert refit["small_classes"] == [10] and refit["kept"]
    assert refit["small_after"] > refit["small_before"] and refit["others_after"] >= refit["others_before"]
    assert any(not torch.equal(v, weights[k]) for k, v in clf.encoder.state_dict().items())
    # One space: each added image's cell is what the encoder now makes of it, and the index reads those cells.
    added = torch.arange(clf.memory.size - 100, clf.memory.size)
    torch.testing.assert_close(clf.encode(mirrored), clf.memory.embeddings[added], atol=1e-5, rtol=1e-4)
    assert torch.equal(torch.as_tensor(clf.kneighbors(mirrored[:10], 1)[1][:, 0]), added[:10])
    predicted = clf.predict(data.test_x[:200])
    clf.save()
    again = sam_cls.load(run, device="cpu")
    assert np.array_equal(again.predict(data.test_x[:200]), predicted)
    assert again.state["history"][-1]["refit"] == refit


def test_cli_add_refits_unless_told_not_to(mini_linear_run, tmp_path):
    data = run_data(sam_cls.load(mini_linear_run, device="cpu"), log=quiet)
    folder = tmp_path / "new" / "mirrored two"
    folder.mkdir(parents=True)
    for i, image in enumerate(data.train_x[data.train_y == 2][:100].flip(3)):
        Image.fromarray(image[0].numpy()).save(folder / f"{i:03d}.png")  # in the order the Python test adds
    answers = {}
    for flag in ("--refit", "--no-refit"):
        run = shutil.copytree(mini_linear_run, tmp_path / flag)
        result = CliRunner().invoke(main, ["add", "--run", str(run), "--data", str(tmp_path / "new"), "--json",
                                           flag])
        assert result.exit_code == 0, result.output
        answers[flag] = json.loads(result.stdout)
        assert answers[flag]["added"] == 100
    assert answers["--refit"]["refit"].startswith("metric refit kept")
    assert "refit" not in answers["--no-refit"]
    history = CliRunner().invoke(main, ["info", "--run", str(tmp_path / "--refit")]).stdout
    assert "100 cells from" in history and "metric refit kept" in history
