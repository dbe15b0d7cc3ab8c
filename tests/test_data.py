"""Loaders read real on-disk files written by tests/datafiles.py; augment and splits checked by content."""

from __future__ import annotations

import hashlib
import os
import pickle
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
import torchvision
from datafiles import write_cifar10, write_cifar100, write_imagefolder, write_mnist
from PIL import Image

from sam_cls import cifar_files, data
from sam_cls.data import (
    DATASETS,
    Dataset,
    DatasetError,
    SyntheticSpec,
    augment,
    load_dataset,
    split_validation,
)


def _check(ds: Dataset, arrays: tuple[np.ndarray, ...], shape: tuple[int, int, int], n_classes: int) -> None:
    """Shapes, dtypes, exact values and labels, and the normalisation statistics of a loaded data set."""
    train_x, train_y, test_x, test_y = arrays
    assert ds.train_x.dtype == ds.test_x.dtype == torch.uint8
    assert ds.train_y.dtype == ds.test_y.dtype == torch.int64
    assert ds.train_x.is_contiguous() and ds.test_x.is_contiguous()
    assert ds.image_shape == shape and ds.num_classes == n_classes
    for got, want in ((ds.train_x, train_x), (ds.train_y, train_y), (ds.test_x, test_x), (ds.test_y, test_y)):
        assert torch.equal(got, torch.from_numpy(want))
    x = torch.from_numpy(train_x).float() / 255
    assert torch.allclose(ds.mean, x.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(ds.std, x.std(dim=(0, 2, 3)), atol=1e-5)


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_family_round_trip(tmp_path: Path, name: str, folder: str) -> None:
    arrays = write_mnist(tmp_path, n_train=30, n_test=12, seed=1, folder=folder)
    ds = load_dataset(name, tmp_path, download=False)
    _check(ds, arrays, (1, 28, 28), 10)
    assert not ds.natural and ds.name == name


def test_cifar10_round_trip(tmp_path: Path) -> None:
    arrays = write_cifar10(tmp_path, n_train=23, n_test=7, seed=2)  # 23 forces uneven batches
    ds = load_dataset("cifar10", tmp_path, download=False)
    _check(ds, arrays, (3, 32, 32), 10)
    assert ds.natural and ds.classes[0] == "airplane"


def test_cifar100_round_trip(tmp_path: Path) -> None:
    arrays = write_cifar100(tmp_path, n_train=40, n_test=10, seed=3)
    ds = load_dataset("cifar100", tmp_path, download=False)
    _check(ds, arrays, (3, 32, 32), 100)
    assert ds.classes[7] == "fine07"


class _RunsCode:
    """Unpickling this calls builtins.exec: what a crafted data file would do (here, only create a file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def _repickle(path: Path, protocol: int = 2, as_bytes: bool = False, wrap: type = dict) -> None:
    """Rewrite a CIFAR pickle as another writer would: another protocol, bytes keys and names, a dict subclass."""
    with open(path, "rb") as f:
        obj = pickle.load(f)
    if as_bytes:
        obj = {k.encode(): [n.encode() for n in v] if k.endswith("names") else v for k, v in obj.items()}
    path.write_bytes(pickle.dumps(wrap(obj), protocol=protocol))


def test_cifar_crafted_pickle_runs_no_code(tmp_path: Path) -> None:
    write_cifar10(tmp_path, n_train=10, n_test=4)
    marker = tmp_path / "MARKER"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(pickle.dumps({"data": _RunsCode(marker), "labels": []}, protocol=2))
    pickle.loads(batch.read_bytes())
    assert marker.exists()  # the file really runs code when unpickled
    marker.unlink()
    with pytest.raises(DatasetError) as info:
        load_dataset("cifar10", tmp_path, download=False)
    message = str(info.value)
    assert "\n" not in message and str(batch) in message and "exec" in message and "--data-dir" in message
    assert not marker.exists()


@pytest.mark.parametrize("protocol, as_bytes", [(2, True), (4, False), (5, True)])
def test_cifar_repickled_files_load(tmp_path: Path, protocol: int, as_bytes: bool) -> None:
    arrays = write_cifar100(tmp_path, n_train=12, n_test=5, seed=13)
    for f in (tmp_path / "cifar-100-python").iterdir():
        _repickle(f, protocol, as_bytes)
    ds = load_dataset("cifar100", tmp_path, download=False)
    _check(ds, arrays, (3, 32, 32), 100)
    assert ds.classes[7] == "fine07"


def test_cifar_official_checksum_takes_the_full_unpickler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = write_cifar10(tmp_path, n_train=10, n_test=4, seed=14)
    rel = "cifar-10-batches-py/data_batch_1"
    _repickle(tmp_path / rel, wrap=OrderedDict)  # harmless, but a global the restricted reader refuses
    with pytest.raises(DatasetError, match="collections.OrderedDict"):
        load_dataset("cifar10", tmp_path, download=False)
    blob = (tmp_path / rel).read_bytes()
    assert not cifar_files._is_official(rel, blob) and cifar_files._CIFAR_MD5[rel] == torchvision.datasets.CIFAR10.train_list[0][1]
    monkeypatch.setitem(cifar_files._CIFAR_MD5, rel, hashlib.md5(blob).hexdigest())  # as if these were the official bytes
    assert cifar_files._is_official(rel, blob) and not cifar_files._is_official(rel, blob + b"x")
    assert not cifar_files._is_official("cifar-10-batches-py/other", blob)
    _check(load_dataset("cifar10", tmp_path, download=False), arrays, (3, 32, 32), 10)


@pytest.mark.parametrize("damage, expected", [
    (lambda f: f.write_bytes(f.read_bytes()[:500]), "cannot read"),  # truncated
    (lambda f: f.write_bytes(pickle.dumps([1, 2], protocol=2)), "not CIFAR's dict"),
    (lambda f: f.write_bytes(pickle.dumps({"data": np.zeros((2, 5), np.uint8), "labels": [0, 1]})), "3072"),
    (lambda f: f.write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0]})), "labels"),
    (lambda f: f.write_bytes(pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [10]})), "0..9"),
])
def test_cifar_damaged_file_is_one_line_naming_it(tmp_path: Path, damage: Callable, expected: str) -> None:
    write_cifar10(tmp_path, n_train=10, n_test=4)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    damage(batch)
    with pytest.raises(DatasetError, match=expected) as info:
        load_dataset("cifar10", tmp_path, download=False)
    assert "\n" not in str(info.value) and str(batch) in str(info.value)


@pytest.mark.parametrize("channels", [3, 1])
def test_imagefolder_png_round_trip(tmp_path: Path, channels: int) -> None:
    arrays = write_imagefolder(tmp_path, n_per_class=4, classes=("b", "a", "c"), size=(6, 9), seed=4,
                               channels=channels)
    ds = load_dataset("imagefolder", tmp_path)
    _check(ds, arrays, (channels, 6, 9), 3)
    assert ds.classes == ["a", "b", "c"] and ds.natural


def test_imagefolder_jpeg_matches_pil(tmp_path: Path) -> None:
    arrays = write_imagefolder(tmp_path, n_per_class=2, size=16, seed=5, fmt="jpg")
    ds = load_dataset("imagefolder", tmp_path)
    assert ds.train_x.shape == (4, 3, 16, 16) and torch.equal(ds.train_y, torch.from_numpy(arrays[1]))
    # JPEG is lossy, so the reference is an independent decode of each file rather than the written pixels.
    files = sorted((tmp_path / "train").glob("*/*.jpg"))
    reference = np.stack([np.asarray(Image.open(f).convert("RGB")).transpose(2, 0, 1) for f in files])
    assert torch.equal(ds.train_x, torch.from_numpy(reference))


def test_imagefolder_cache_hit_and_invalidation(tmp_path: Path) -> None:
    write_imagefolder(tmp_path, n_per_class=3, seed=6)
    logs: list[str] = []
    first = load_dataset("imagefolder", tmp_path, log=logs.append)
    assert any("decoding" in m for m in logs) and not any("cache hit" in m for m in logs)
    caches = list((tmp_path / ".sam_cls_cache").glob("imagefolder-*.pt"))
    assert len(caches) == 1

    logs.clear()
    second = load_dataset("imagefolder", tmp_path, log=logs.append)
    assert any("cache hit" in m for m in logs) and not any("decoding" in m for m in logs)
    assert torch.equal(first.train_x, second.train_x) and torch.equal(first.test_y, second.test_y)

    # A rewritten file of the same size must invalidate too: the key includes the mtime.
    victim = tmp_path / "train" / "cat" / "0000.png"
    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 10**9))
    logs.clear()
    load_dataset("imagefolder", tmp_path, log=logs.append)
    assert any("decoding" in m for m in logs)

    # An added image changes the data, and the superseded cache file is removed.
    write_imagefolder(tmp_path / "extra", n_per_class=1, seed=7)
    os.replace(tmp_path / "extra" / "train" / "dog" / "0000.png", tmp_path / "train" / "dog" / "9999.png")
    logs.clear()
    third = load_dataset("imagefolder", tmp_path, log=logs.append)
    assert any("decoding" in m for m in logs) and len(third.train_y) == len(first.train_y) + 1
    assert len(list((tmp_path / ".sam_cls_cache").glob("imagefolder-*.pt"))) == 1


def test_imagefolder_read_only_uses_user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "ro"
    write_imagefolder(root, n_per_class=2, seed=8)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root.chmod(0o555)  # no write bits: the loader must leave the folder alone even when run as root
    try:
        logs: list[str] = []
        load_dataset("imagefolder", root, log=logs.append)
        load_dataset("imagefolder", root, log=logs.append)
    finally:
        root.chmod(0o755)
    assert not (root / ".sam_cls_cache").exists()
    assert len(list((tmp_path / "xdg" / "sam_cls").glob("imagefolder-*.pt"))) == 1
    assert any("cache hit" in m for m in logs)


def test_imagefolder_errors(tmp_path: Path) -> None:
    write_imagefolder(tmp_path, n_per_class=2, size=8, seed=9)
    write_imagefolder(tmp_path / "odd", n_per_class=1, size=(8, 10), seed=9)
    odd = tmp_path / "train" / "dog" / "0005.png"
    os.replace(tmp_path / "odd" / "train" / "dog" / "0000.png", odd)
    with pytest.raises(DatasetError, match=r"0005\.png is 10x8 .* 8x8"):
        load_dataset("imagefolder", tmp_path)
    odd.unlink()
    (tmp_path / "test" / "cat").rename(tmp_path / "test" / "cow")
    with pytest.raises(DatasetError, match="same class folders"):
        load_dataset("imagefolder", tmp_path)


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _damage_header(f: Path) -> None:
    b = bytearray(f.read_bytes())
    b[8:40] = bytes(32)  # after PNG's signature: IHDR gone
    f.write_bytes(bytes(b))


@pytest.mark.parametrize("fmt, damage", [
    ("png", lambda f: f.write_text("not an image, whatever the name says")),  # mis-named
    ("png", _truncate),
    ("jpg", _truncate),
    ("png", _damage_header),
])
def test_imagefolder_unreadable_image_is_one_line_naming_it(tmp_path: Path, fmt: str, damage: Callable) -> None:
    write_imagefolder(tmp_path, n_per_class=3, size=16, seed=15, fmt=fmt)
    victim = tmp_path / "train" / "dog" / f"0001.{fmt}"
    damage(victim)
    with pytest.raises(DatasetError) as info:
        load_dataset("imagefolder", tmp_path)
    message = str(info.value)
    assert "\n" not in message and str(victim) in message and "--skip-bad-images" in message
    assert not (tmp_path / ".sam_cls_cache").exists()


def test_imagefolder_skip_bad_images_keeps_labels_aligned(tmp_path: Path) -> None:
    train_x, train_y, test_x, test_y = write_imagefolder(tmp_path, n_per_class=4, classes=("a", "b", "c"),
                                                         seed=16)
    bad = {"train": [1, 6], "test": [11]}  # in sorted order: a/0001, b/0002, c/0003
    for split, rows in bad.items():
        for i in rows:
            f = tmp_path / split / "abc"[i // 4] / f"{i % 4:04d}.png"
            (f.write_text("garbage") if i == 1 else _truncate(f))
    logs: list[str] = []
    ds = load_dataset("imagefolder", tmp_path, log=logs.append, skip_bad_images=True)
    keep = {split: [i for i in range(12) if i not in rows] for split, rows in bad.items()}
    assert torch.equal(ds.train_x, torch.from_numpy(train_x[keep["train"]]))
    assert torch.equal(ds.train_y, torch.from_numpy(train_y[keep["train"]]))
    assert torch.equal(ds.test_x, torch.from_numpy(test_x[keep["test"]]))
    assert torch.equal(ds.test_y, torch.from_numpy(test_y[keep["test"]]))
    assert any("skipped 3 unreadable" in m for m in logs)

    logs.clear()  # the cache remembers what it left out ...
    again = load_dataset("imagefolder", tmp_path, log=logs.append, skip_bad_images=True)
    assert any("cache hit" in m for m in logs) and any("skipped 3 unreadable" in m for m in logs)
    assert torch.equal(again.train_x, ds.train_x) and torch.equal(again.test_y, ds.test_y)
    with pytest.raises(DatasetError, match=r"train/a/0001\.png"):  # ... so without the flag it is no way round
        load_dataset("imagefolder", tmp_path)


def test_imagefolder_channels_follow_all_images(tmp_path: Path) -> None:
    train_x, *_ = write_imagefolder(tmp_path, n_per_class=2, seed=17)
    grey = train_x[0, 0]
    Image.fromarray(grey).save(tmp_path / "train" / "cat" / "0000.png")  # the first file in sort order
    ds = load_dataset("imagefolder", tmp_path)
    assert ds.image_shape == (3, 8, 8)
    assert torch.equal(ds.train_x[0], torch.from_numpy(grey).expand(3, 8, 8))  # grey spread over R, G, B
    assert torch.equal(ds.train_x[1:], torch.from_numpy(train_x[1:]))


def test_imagefolder_one_colour_test_image_makes_train_rgb(tmp_path: Path) -> None:
    train_x, _, test_x, _ = write_imagefolder(tmp_path, n_per_class=2, seed=20, channels=1)
    colour = np.random.default_rng(0).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    Image.fromarray(colour).save(tmp_path / "test" / "dog" / "0001.png")  # the very last file read
    ds = load_dataset("imagefolder", tmp_path)
    assert ds.image_shape == (3, 8, 8) and ds.test_x.shape == (4, 3, 8, 8)
    assert torch.equal(ds.train_x, torch.from_numpy(train_x).expand(-1, 3, -1, -1))
    assert torch.equal(ds.test_x[:3], torch.from_numpy(test_x[:3]).expand(-1, 3, -1, -1))
    assert torch.equal(ds.test_x[3], torch.from_numpy(colour.transpose(2, 0, 1)))


def test_imagefolder_all_grey_modes_give_one_channel(tmp_path: Path) -> None:
    train_x, *_ = write_imagefolder(tmp_path, n_per_class=2, seed=18, channels=1)
    last = tmp_path / "test" / "dog" / "0001.png"
    Image.fromarray(np.zeros((8, 8, 2), np.uint8), "LA").save(last)  # grey with alpha is still grey
    ds = load_dataset("imagefolder", tmp_path)
    assert ds.image_shape == (1, 8, 8) and torch.equal(ds.train_x, torch.from_numpy(train_x))


def test_imagefolder_ignores_a_cache_of_the_old_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_imagefolder(tmp_path, n_per_class=2, seed=19)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "train" / "cat" / "0000.png")
    from sam_cls import imagefolder

    with monkeypatch.context() as m:  # what version 1 cached for this folder: one channel, as its first image
        m.setattr(imagefolder, "_CACHE_VERSION", 1)
        old = load_dataset("imagefolder", tmp_path)
        (cache,) = (tmp_path / ".sam_cls_cache").glob("*.pt")
        torch.save({"version": 1, "classes": old.classes, "train_x": old.train_x[:, :1].contiguous(),
                    "train_y": old.train_y, "test_x": old.test_x[:, :1].contiguous(), "test_y": old.test_y,
                    "skipped": []}, cache)
        assert load_dataset("imagefolder", tmp_path).image_shape == (1, 8, 8)  # version 1 would reuse it
    logs: list[str] = []
    ds = load_dataset("imagefolder", tmp_path, log=logs.append)
    assert ds.image_shape == (3, 8, 8) and any("decoding" in m for m in logs)


@pytest.mark.parametrize("name, expected", [
    ("mnist", "MNIST/raw/train-images-idx3-ubyte"),
    ("fashion-mnist", "FashionMNIST/raw/t10k-labels-idx1-ubyte"),
    ("cifar10", "cifar-10-batches-py/data_batch_1"),
    ("cifar100", "cifar-100-python/train"),
    ("imagefolder", "train/<class>/*"),
])
def test_missing_data_names_files_and_flag(tmp_path: Path, name: str, expected: str) -> None:
    with pytest.raises(DatasetError) as info:
        load_dataset(name, tmp_path / "nowhere", download=False)
    message = str(info.value)
    assert "\n" not in message and expected in message and "--data-dir" in message


def _refused_url() -> str:
    """A loopback port nothing listens on: a real download attempt that fails at once, without any network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


class MNIST(torchvision.datasets.MNIST):  # torchvision derives the folder name from the class name
    mirrors: ClassVar = [_refused_url()]


class CIFAR100(torchvision.datasets.CIFAR100):
    url = _refused_url() + "cifar-100-python.tar.gz"


@pytest.mark.parametrize("cls", [MNIST, CIFAR100])
def test_failed_download_is_one_line_and_leaves_nothing(tmp_path: Path, cls: type) -> None:
    root = tmp_path / "data"
    start = time.perf_counter()
    with pytest.raises(DatasetError) as info:
        data._load_torchvision("x", cls, root, download=True, log=lambda _m: None)
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "\n" not in message and "downloading failed" in message and "--data-dir" in message
    assert list(root.iterdir()) == []  # the scratch folder and any partial archive are gone


def test_unknown_dataset_lists_choices() -> None:
    with pytest.raises(DatasetError, match="--dataset") as info:
        load_dataset("imagenet")
    assert all(name in str(info.value) for name in DATASETS)


def test_synthetic_deterministic_and_separable() -> None:
    spec = SyntheticSpec(n_train=600, n_test=200, num_classes=6, shape=(3, 4, 4), seed=11)
    a, b = load_dataset("synthetic", synthetic=spec), load_dataset("synthetic", synthetic=spec)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    other = load_dataset("synthetic", synthetic=SyntheticSpec(n_train=600, n_test=200, num_classes=6,
                                                              shape=(3, 4, 4), seed=12))
    assert not torch.equal(a.train_x, other.train_x)
    assert a.train_x.shape == (600, 3, 4, 4) and a.train_x.dtype == torch.uint8 and not a.natural
    assert torch.bincount(a.train_y).tolist() == [100] * 6  # balanced
    # Nearest train centroid classifies test well: the classes really are separate clusters.
    flat = a.train_x.flatten(1).float()
    centroids = torch.stack([flat[a.train_y == c].mean(0) for c in range(6)])
    pred = torch.cdist(a.test_x.flatten(1).float(), centroids).argmin(1)
    assert (pred == a.test_y).float().mean() > 0.9


def _indexed(n: int, classes: int) -> Dataset:
    """A data set whose images encode their own index, so splits can be checked for overlap."""
    idx = torch.arange(n)
    x = torch.stack([idx % 256, idx // 256], 1).to(torch.uint8).view(n, 1, 1, 2).contiguous()
    y = idx % classes
    return Dataset("t", x, y, x[:3], y[:3], [str(c) for c in range(classes)], False,
                   torch.zeros(1), torch.ones(1))


def test_split_validation_sizes_disjoint_stratified() -> None:
    ds = _indexed(1000, 4)
    split = split_validation(ds, 0.2, seed=0)
    def ids(x: torch.Tensor) -> set[int]:
        return set((x[:, 0, 0, 0].long() + 256 * x[:, 0, 0, 1].long()).tolist())

    train, val = ids(split.train_x), ids(split.test_x)
    assert len(train) == 800 and len(val) == 200 and not train & val and train | val == set(range(1000))
    assert torch.bincount(split.test_y).tolist() == [50] * 4
    assert torch.equal(split.test_x, split_validation(ds, 0.2, seed=0).test_x)
    assert not torch.equal(split.test_x, split_validation(ds, 0.2, seed=1).test_x)
    assert split.classes == ds.classes and split.mean.shape == (1,)
    with pytest.raises(ValueError):
        split_validation(ds, 1.0, seed=0)


def _batch(b: int = 64, c: int = 3, h: int = 8, w: int = 8) -> torch.Tensor:
    """Distinct pixel values, so where each output pixel came from can be recovered."""
    return (torch.arange(b * c * h * w) % 251).to(torch.uint8).view(b, c, h, w)


def test_augment_shape_dtype_determinism() -> None:
    x = _batch()
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(out, augment(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, augment(x, torch.Generator().manual_seed(1)))


def test_augment_crop_shifts_content() -> None:
    x, pad = _batch(h=10, w=10), 2
    out = augment(x, torch.Generator().manual_seed(3), pad=pad, flip=False)
    # Reference: torch's own reflect padding, then a crop. Each output must be exactly one such crop.
    padded = torch.nn.functional.pad(x.float(), (pad, pad, pad, pad), mode="reflect").to(torch.uint8)
    shifts = set()
    for i in range(len(x)):
        found = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                 if torch.equal(out[i], padded[i, :, dy:dy + 10, dx:dx + 10])]
        assert len(found) == 1
        shifts.add(found[0])
    assert len(shifts) > 10  # many different shifts occur, not just the identity


def test_augment_flip_mirrors() -> None:
    x = _batch()
    out = augment(x, torch.Generator().manual_seed(4), pad=0, flip=True)
    same = [torch.equal(o, i) for o, i in zip(out, x)]
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x)]
    assert all(s or f for s, f in zip(same, flipped)) and 0 < sum(flipped) < len(x)
    assert torch.equal(augment(x, torch.Generator(), pad=0, flip=False), x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_augment_on_cuda_matches_its_own_generator() -> None:
    x = _batch().cuda()
    out = augment(x, torch.Generator(device="cuda").manual_seed(0))
    assert out.is_cuda and torch.equal(out, augment(x, torch.Generator(device="cuda").manual_seed(0)))


# ---------------------------------------------------------------- mnist-mini, the embedded default data set

ASSETS = Path(data.__file__).parent / "assets"
RAW_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "MNIST" / "raw"


def test_mnist_mini_ships_inside_the_package(tmp_path: Path) -> None:
    from sam_cls.config import Config

    assert Config().dataset == "mnist-mini" and "mnist-mini" in DATASETS
    ds = load_dataset("mnist-mini", tmp_path / "nowhere", download=False)  # no --data-dir, no network
    assert ds.name == "mnist-mini" and not ds.natural and ds.num_classes == 10 and ds.image_shape == (1, 28, 28)
    assert ds.train_x.shape == (5000, 1, 28, 28) and ds.test_x.shape == (1000, 1, 28, 28)
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64 and ds.train_x.is_contiguous()
    assert torch.bincount(ds.train_y).tolist() == [500] * 10 and torch.bincount(ds.test_y).tolist() == [100] * 10
    assert int(ds.train_x.max()) == 255 and 0.12 < float(ds.mean) < 0.14  # MNIST's own mean is 0.1307
    assert not (tmp_path / "nowhere").exists()


def test_mnist_mini_is_packaged_with_its_licence() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    root = Path(__file__).resolve().parents[1]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["sam_cls"]
    shipped = sorted((ASSETS / "mnist-mini").iterdir())
    assert {f.name for f in shipped} >= {"train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "LICENSE.txt"}
    for f in shipped:  # every file there goes into the wheel, so a non-editable install has the data set
        assert any(f.relative_to(root / "sam_cls").match(g) for g in globs), f
    assert sum(f.stat().st_size for f in shipped) < 2_000_000
    licence = (ASSETS / "mnist-mini" / "LICENSE.txt").read_text()
    assert all(name in licence for name in ("Yann LeCun", "Corinna Cortes", "Burges", "CC BY-SA 3.0"))


@pytest.mark.skipif(not RAW_MNIST.is_dir(), reason=f"the full MNIST is not at {RAW_MNIST}")
def test_mnist_mini_is_what_its_script_makes_from_mnist() -> None:
    import gzip
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_mnist_mini", ASSETS / "make_mnist_mini.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    made = {name: data.read_idx(gzip.decompress(blob)) for name, blob in script.build(RAW_MNIST).items()}
    ds = load_dataset("mnist-mini")
    assert np.array_equal(made["train-images-idx3-ubyte.gz"], ds.train_x[:, 0].numpy())
    assert np.array_equal(made["t10k-labels-idx1-ubyte.gz"], ds.test_y.numpy())
    # The first 500 of each digit, in MNIST's order: the subset starts as MNIST itself does.
    full = data.read_idx((RAW_MNIST / "train-labels-idx1-ubyte").read_bytes())
    assert np.array_equal(ds.train_y[:50].numpy(), full[:50])


def test_read_idx_refuses_damaged_files() -> None:
    header = bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3])
    assert data.read_idx(header + bytes(range(6))).tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(DatasetError, match="truncated"):
        data.read_idx(header + bytes(5))
    with pytest.raises(DatasetError, match="magic"):
        data.read_idx(bytes([0, 0, 13, 1, 0, 0, 0, 1, 0, 0, 0, 0]))  # type 0x0D: float, not uint8

