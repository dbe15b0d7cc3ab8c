"""Memories of deformed copies: pixels fixed by (seed, example, copy), own copies never read, runs that grow."""

import pytest
import torch
from click.testing import CliRunner

import sam_cls.modes
from sam_cls import load
from sam_cls.checkpoint import CheckpointError
from sam_cls.cli import main
from sam_cls.config import ConfigError, make_config
from sam_cls.copies import CROP_PAD, CopyStyle, cell_images, deform
from sam_cls.train import Trainer, train


def config(tmp_path, **kw):
    base = {"dataset": "synthetic", "synthetic_train": 300, "synthetic_test": 100, "synthetic_classes": 5,
            "synthetic_shape": [1, 12, 12], "encoder": "linear", "dim": 16, "topk": 16, "epochs": 1,
            "batch_size": 50, "lr": 0.1, "device": "cpu", "out": str(tmp_path / "run"), "copies": 3}
    return make_config(None, **{**base, **kw})


def quiet(_msg):
    pass


def images(n=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 14, 14), dtype=torch.uint8, generator=gen)


def test_a_copy_is_a_pure_function_of_seed_example_and_copy():
    x = images()
    cells = torch.randperm(5 * len(x), generator=torch.Generator().manual_seed(1))
    whole = cell_images(x, cells, seed=7)
    # Generated again, in other batches and alone: the same pixels, bit for bit.
    assert torch.equal(torch.cat([cell_images(x, cells[i : i + 3], seed=7) for i in range(0, len(cells), 3)]), whole)
    assert torch.equal(cell_images(x, cells[5:6], seed=7), whole[5:6])
    # Copy 0 is the image itself; the others are deformations, unlike each other and unlike another seed's.
    originals = cells < len(x)
    assert torch.equal(whole[originals], x[cells[originals]])
    e = torch.tensor([3, 3, 3])
    a, b, c = deform(x[e], e, torch.tensor([0, 1, 2]), seed=7)
    assert not torch.equal(a, b) and not torch.equal(b, c)
    assert not torch.equal(deform(x[e[:1]], e[:1], torch.tensor([1]), seed=8)[0], b)


def test_a_milder_elastic_copy_moves_the_pixels_less():
    x = images(n=64)
    e, one = torch.arange(64), torch.ones(64, dtype=torch.long)
    moved = {s: (deform(x, e, one, 7, CopyStyle("elastic", s)).float() - x.float()).abs().mean() for s in (0.3, 1)}
    assert torch.equal(deform(x, e, one, 7, CopyStyle()), deform(x, e, one, 7))  # strength 1: the copies of before
    assert 0 < moved[0.3] < 0.6 * moved[1]


@pytest.mark.parametrize("strength", [0.25, 1.0])
def test_a_crop_flip_copy_is_its_image_mirrored_on_odd_copies_and_shifted_within_the_pad(strength):
    x = images(n=8)
    pad = round(CROP_PAD * strength)
    e = torch.arange(8).repeat_interleave(4)
    c = torch.arange(4).repeat(8)
    out = deform(x[e], e, c, 3, CopyStyle("crop-flip", strength))
    assert torch.equal(out, cell_images(x, c * 8 + e, 3, CopyStyle("crop-flip", strength)))
    shifts = set()
    for img, src, copy in zip(out, x[e], c.tolist(), strict=True):
        src = src.flip(2) if copy % 2 else src
        # The shift that maps the (mirrored) image onto the copy, in its interior where no border is reflected.
        found = [(dy, dx) for dy in range(-pad, pad + 1) for dx in range(-pad, pad + 1)
                 if torch.equal(img[:, pad:-pad or None, pad:-pad or None],
                                src[:, pad + dy : 14 - pad + dy, pad + dx : 14 - pad + dx])]
        assert copy == 0 and torch.equal(img, src) or found, (copy, strength)
        shifts.update(found if copy else [])
    assert len(shifts) > 1  # seeded shifts, not one fixed one


def test_the_memory_is_encoded_from_the_pixels_training_reads(tmp_path):
    trainer = Trainer(config(tmp_path), log=quiet)
    trainer.prepare()
    n = len(trainer.train_y)
    assert trainer.memory.size == 3 * n
    cells = torch.tensor([0, 5, n + 5, 2 * n + 7, 3 * n - 1])
    trainer.encoder.eval()
    with torch.no_grad():
        again = trainer.encoder(trainer.batch(cells))
    rows = trainer.memory.rows[cells]
    torch.testing.assert_close(trainer.memory.embeddings[rows], again, atol=1e-5, rtol=0)
    assert torch.equal(trainer.memory.labels[rows], trainer.train_y[cells % n])


def test_a_training_read_never_reads_a_copy_of_its_own_image(tmp_path, monkeypatch):
    trainer = Trainer(config(tmp_path, copies=4, topk=8, temperature=0.01), log=quiet)
    trainer.prepare()
    n = len(trainer.train_y)
    seen = []

    def spy(u, ids, memory, labels, num_classes, temperature, exclude=None):
        seen.append((ids, exclude))
        return read(u, ids, memory, labels, num_classes, temperature, exclude)

    read = sam_cls.modes.sparse_read
    monkeypatch.setattr(sam_cls.modes, "sparse_read", spy)
    idx = torch.arange(0, 4 * n, 37)  # cells of every copy
    trainer.mode.log_probs(trainer.mode.embed(trainer.batch(idx)), idx)
    ids, exclude = seen[0]
    assert ids.shape == (len(idx), 8 + 4)
    sources = trainer.memory.example_ids[ids] % n
    own = sources == (idx % n).unsqueeze(1)
    # Deformed copies are near-duplicates: most queries find some of their own image's among the candidates...
    assert own.any(1).float().mean() > 0.5
    # ...and none of them is read: exactly K cells are, all of other images.
    assert not (own & ~exclude).any()
    assert ((~exclude).sum(1) == 8).all()


def test_training_with_copies_learns_and_resumes_only_with_the_same_copies(tmp_path):
    result = train(config(tmp_path), log=quiet)
    assert result["test_acc"] > 50  # chance is 20%
    clf = load(result["run_dir"], "cpu")
    n = 300
    assert clf.memory.size == 3 * n
    cell = int((clf.cell_item >= n).nonzero()[0])
    item = int(clf.cell_item[cell])
    assert clf.describe(cell) == f"synthetic train #{item % n} copy {item // n}"
    data = Trainer(config(tmp_path), log=quiet)
    assert torch.equal(clf.cell_images([cell])[0], data.batch(torch.tensor([item]))[0])
    with pytest.raises(CheckpointError, match="copies=3"):
        train(config(tmp_path, copies=2, epochs=2), resume=True, log=quiet)


def test_copies_need_the_sparse_read(tmp_path):
    with pytest.raises(ConfigError, match="--copies 3 needs the sparse memory read"):
        config(tmp_path, topk=0).validate()


def test_rebuild_index_grows_a_trained_memory_without_training(tmp_path):
    result = train(config(tmp_path, copies=1), log=quiet)
    run = result["run_dir"]
    before = load(run, "cpu")
    out = CliRunner().invoke(main, ["rebuild-index", "--run", run, "--copies", "4", "--device", "cpu"])
    assert out.exit_code == 0, out.output
    after = load(run, "cpu")
    n = before.memory.size
    assert after.memory.size == 4 * n and after.cfg.copies == 4
    # The same encoder: the images' own cells keep their embeddings, and the copies lie near them.
    rows = after.memory.rows[:n]
    torch.testing.assert_close(after.memory.embeddings[rows], before.memory.embeddings[before.memory.rows])
    copies = after.memory.embeddings[after.memory.rows[n:]].view(3, n, -1)
    assert (copies * after.memory.embeddings[rows]).sum(-1).mean() > 0.5
    assert after.describe(int(after.memory.rows[2 * n + 1])) == "synthetic train #1 copy 2"
    assert after.predict(torch.zeros(2, 1, 12, 12, dtype=torch.uint8)).shape == (2,)
    # A memory only grows, and an expanded run does not train on.
    out = CliRunner().invoke(main, ["rebuild-index", "--run", run, "--copies", "2", "--device", "cpu"])
    assert out.exit_code != 0 and "below the run's 4" in out.output
    with pytest.raises(CheckpointError, match="rebuild-index --copies"):
        train(config(tmp_path, copies=4, epochs=2), resume=True, log=quiet)


def test_rebuild_index_grows_crop_flip_copies_that_explain_and_train_as_their_kind(tmp_path):
    result = train(config(tmp_path, copies=1), log=quiet)
    run = result["run_dir"]
    out = CliRunner().invoke(main, ["rebuild-index", "--run", run, "--copies", "3", "--copy-kind", "crop-flip",
                                    "--copy-strength", "0.5", "--device", "cpu"])
    assert out.exit_code == 0, out.output
    clf = load(run, "cpu")
    assert (clf.cfg.copy_kind, clf.cfg.copy_strength) == ("crop-flip", 0.5)
    n = clf.memory.size // 3
    # A copy's image is regenerated as the run made it: the mirror of its image, shifted.
    image, copy = clf.cell_images([3, n + 3])
    assert torch.equal(copy, deform(image[None], torch.tensor([3]), torch.tensor([1]), clf.cfg.seed,
                                    CopyStyle("crop-flip", 0.5))[0])
    # The same kind again is fine; another kind would mix two kinds of copy in one memory.
    out = CliRunner().invoke(main, ["rebuild-index", "--run", run, "--copies", "4", "--copy-kind", "elastic",
                                    "--device", "cpu"])
    assert out.exit_code != 0 and "grow it with the same --copy-kind" in out.output
    out = CliRunner().invoke(main, ["rebuild-index", "--run", run, "--copy-strength", "0.3", "--device", "cpu"])
    assert out.exit_code != 0 and "go with --copies" in out.output


def test_training_reads_its_copies_in_the_kind_it_was_given(tmp_path):
    trainer = Trainer(config(tmp_path, copy_kind="crop-flip"), log=quiet)
    n = len(trainer.train_y)
    cells = torch.tensor([1, n + 1, 2 * n + 1])
    assert torch.equal(trainer.batch(cells), cell_images(trainer.train_x, cells, 0, CopyStyle("crop-flip")))
    assert torch.equal(trainer.batch(cells)[1], cell_images(trainer.train_x, cells[1:2], 0,
                                                             CopyStyle("crop-flip"))[0])
