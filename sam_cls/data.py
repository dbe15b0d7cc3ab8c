"""Data sets as whole uint8 tensors: MNIST, Fashion-MNIST, CIFAR-10/100, image folders, synthetic clusters, and
mnist-mini, a 5,000 + 1,000 image subset of MNIST shipped inside the package (sam_cls/assets/mnist-mini).

Every loader returns the full train and test splits as uint8 (N, C, H, W) tensors so training can keep
them on the accelerator and batch by indexing; `augment` is the matching vectorised augmentation.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import socket
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from math import prod
from pathlib import Path

import numpy as np
import torch
from torchvision import datasets as tvd

# The names --dataset accepts (the config's choices come from here); mnist-mini needs no files and no network.
DATASETS = ("mnist-mini", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder", "synthetic", "python")
PYTHON = "python"  # data handed to sam_cls.fit as tensors: in the run's memory, never on disk

# Seconds per socket operation: torchvision's urlopen sets no timeout and would hang on a dead link.
_DOWNLOAD_TIMEOUT_S = 20.0


class DatasetError(Exception):
    """One line for the user: names the expected files or folders and the flag that fixes it."""


@dataclass
class Dataset:
    """Whole splits as tensors, so a trainer can move them to the GPU once and batch by indexing."""

    name: str
    train_x: torch.Tensor  # uint8 (N, C, H, W), contiguous
    train_y: torch.Tensor  # int64 (N,)
    test_x: torch.Tensor  # uint8 (M, C, H, W)
    test_y: torch.Tensor  # int64 (M,)
    classes: list[str]
    natural: bool  # natural photos get random crop + flip; digits and synthetic data get no augmentation
    mean: torch.Tensor  # per-channel mean of train_x in [0, 1] units, shape (C,)
    std: torch.Tensor  # per-channel std, shape (C,)

    def __post_init__(self) -> None:
        for split, x, y in (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y)):
            if x.dtype != torch.uint8 or x.ndim != 4 or y.dtype != torch.int64 or y.shape != (len(x),):
                raise ValueError(f"{self.name} {split}: want uint8 (N,C,H,W) and int64 (N,), got {x.dtype} "
                                 f"{tuple(x.shape)} and {y.dtype} {tuple(y.shape)}")
        self.train_x, self.test_x = self.train_x.contiguous(), self.test_x.contiguous()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train_x.shape[1:]
        return (c, h, w)


@dataclass
class SyntheticSpec:
    """Gaussian class clusters drawn as tiny images: needs no files, and every encoder accepts it."""

    n_train: int = 5000
    n_test: int = 1000
    num_classes: int = 10
    shape: tuple[int, int, int] = (1, 8, 8)
    noise: float = 0.35  # per-pixel std in [0,1] units; the default spec gives ~99.7% 1-NN accuracy (easy)
    seed: int = 0


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean/std in [0,1] units over all of train, used to normalise inputs."""
    # Exact, via a 256-bin histogram per channel: 10x faster than float sums, and no subset, since a strided
    # subset can alias (MNIST's train order is periodic: x[::6] is off by 6% in the mean).
    hist = torch.zeros(x.shape[1], 256, dtype=torch.float64)
    for chunk in x.split(4096):
        for c in range(x.shape[1]):
            hist[c] += torch.bincount(chunk[:, c].reshape(-1), minlength=256)
    v = torch.arange(256, dtype=torch.float64) / 255
    n = hist.sum(1)
    mean = (hist * v).sum(1) / n
    var = (hist * (v - mean[:, None]).square()).sum(1) / (n - 1).clamp_min(1)  # unbiased, like torch.std
    return mean.float(), var.sqrt().float()


def _make(name: str, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
          classes: list[str], natural: bool) -> Dataset:
    """Build a Dataset, deriving the normalisation statistics from the train split."""
    mean, std = _channel_stats(train[0])
    return Dataset(name, train[0], train[1], test[0], test[1], list(classes), natural, mean, std)


# ---------------------------------------------------------------- torchvision data sets (MNIST, CIFAR)

# torchvision's classes are used to download (the archive's md5 is checked, then each file's) and to name the
# files; reading CIFAR is done here (_read_cifar), never by torchvision, whose reader unpickles whatever it finds.
_TORCHVISION: dict[str, type] = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10,
                                 "cifar100": tvd.CIFAR100}


def _expected_files(cls: type) -> list[str]:
    """Paths, relative to data_dir, that torchvision reads for this data set."""
    if issubclass(cls, tvd.MNIST):  # uncompressed idx files in <ClassName>/raw, as MNIST._check_exists wants
        return [f"{cls.__name__}/raw/{Path(url).stem}" for url, _ in cls.resources]
    names = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    return [f"{cls.base_folder}/{f}" for f in names]


def _download(name: str, cls: type, root: Path, log: Callable[[str], None]) -> None:
    """Download into a scratch folder, then move only finished files in: a failure leaves nothing behind."""
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".download-", dir=root))  # same filesystem, so os.replace works
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)
    try:
        log(f"{name}: downloading into {root}")
        cls(str(scratch), train=True, download=True)  # fetches both splits; verifies the archive's md5
        for rel in _expected_files(cls):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(scratch / rel, root / rel)
    finally:
        socket.setdefaulttimeout(old_timeout)
        shutil.rmtree(scratch, ignore_errors=True)  # archives and half-written files go with it


def _one_line(err: BaseException, last: bool = False) -> str:
    """Squeeze an exception into one line for DatasetError (last=True: the innermost cause, listed last)."""
    lines = [line for line in str(err).splitlines() if line.strip()] or [""]
    return f"{type(err).__name__}: {(lines[-1] if last else lines[0]).strip()}"


def _load_torchvision(name: str, cls: type, root: Path, download: bool,
                      log: Callable[[str], None]) -> Dataset:
    """Read a torchvision data set from root (downloading if allowed): MNIST through torchvision, CIFAR here."""
    expected = _expected_files(cls)
    missing = [rel for rel in expected if not (root / rel).is_file()]
    if missing:
        hint = f"{name} not found: expected {', '.join(expected)} under {root}"
        fix = "pass --data-dir DIR pointing at a folder that holds them"
        if not download:
            raise DatasetError(f"{hint}; {fix}, or allow downloading")
        try:
            _download(name, cls, root, log)
        # URLError is an OSError; MNIST wraps its mirrors' errors in a RuntimeError.
        except (OSError, RuntimeError) as e:
            raise DatasetError(f"{hint}, and downloading failed ({_one_line(e, last=True)}); {fix}, "
                               "or run where a network exists") from None
    if issubclass(cls, tvd.CIFAR10):  # CIFAR100 too
        from sam_cls.cifar_files import read_cifar  # here: it raises this module's DatasetError

        splits, classes = read_cifar(name, cls, root)
    else:
        splits = []
        try:  # MNIST's idx files hold no pickle: torchvision's reader is safe
            for train in (True, False):
                ds = cls(str(root), train=train, download=False)
                x = torch.as_tensor(ds.data).unsqueeze(1).contiguous()  # (N, H, W) -> (N, 1, H, W)
                splits.append((x, torch.as_tensor(ds.targets, dtype=torch.int64)))
        except (OSError, RuntimeError, ValueError, TypeError, KeyError, EOFError, pickle.UnpicklingError) as e:
            folder = root / Path(expected[0]).parts[0]
            raise DatasetError(f"{name}: cannot read the files in {folder} ({_one_line(e)}); "
                               "pass --data-dir DIR pointing at intact files") from None
        classes = list(ds.classes)
    log(f"{name}: {len(splits[0][0])} train, {len(splits[1][0])} test images from {root}")
    natural = not issubclass(cls, tvd.MNIST)  # MNIST-style: centred grey objects, trained without crops/flips
    return _make(name, splits[0], splits[1], classes, natural)


# ---------------------------------------------------------------- mnist-mini (embedded)

_MNIST_MINI = ("assets", "mnist-mini")  # inside the sam_cls package; LICENSE.txt there: MNIST, CC BY-SA 3.0
MNIST_CLASSES = ["0 - zero", "1 - one", "2 - two", "3 - three", "4 - four", "5 - five", "6 - six", "7 - seven",
                 "8 - eight", "9 - nine"]  # torchvision's MNIST.classes


def read_idx(data: bytes, what: str = "idx data") -> np.ndarray:
    """An idx file of uint8 (LeCun's format: 0x0000, type 0x08, ndim, big-endian uint32 dims, bytes) as an array."""
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise DatasetError(f"{what} is not an idx file of uint8 (bad magic number)")
    ndim = data[3]
    start = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:start]) if len(data) >= start else None
    if shape is None or len(data) - start != prod(shape):
        raise DatasetError(f"{what}: idx header and data length disagree (truncated or damaged file)")
    return np.frombuffer(bytearray(data), dtype=np.uint8, offset=start).reshape(shape)  # bytearray: writable


def _load_mnist_mini(log: Callable[[str], None]) -> Dataset:
    """The embedded MNIST subset: read from the installed package, so it needs no --data-dir and no network."""
    folder = resources.files("sam_cls").joinpath(_MNIST_MINI[0]).joinpath(_MNIST_MINI[1])
    splits = []
    for prefix in ("train", "t10k"):
        arrays = []
        for name in (f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"):
            try:
                arrays.append(read_idx(gzip.decompress(folder.joinpath(name).read_bytes()), name))
            except (OSError, EOFError, DatasetError) as e:  # gzip's BadGzipFile is an OSError
                raise DatasetError(f"mnist-mini: the embedded file {name} is missing or damaged ({_one_line(e)}); "
                                   "reinstall sam-cls, or pass --dataset mnist --data-dir DIR") from None
        x, y = arrays
        if x.ndim != 3 or y.shape != (len(x),):
            raise DatasetError(f"mnist-mini: {prefix} images {x.shape} do not match labels {y.shape}; reinstall sam-cls")
        splits.append((torch.from_numpy(x).unsqueeze(1).contiguous(), torch.from_numpy(y).to(torch.int64)))
    log(f"mnist-mini: {len(splits[0][0])} train, {len(splits[1][0])} test MNIST images embedded in sam_cls "
        "(CC BY-SA 3.0, LeCun, Cortes and Burges)")
    return _make("mnist-mini", splits[0], splits[1], MNIST_CLASSES, natural=False)


# ---------------------------------------------------------------- synthetic

def _load_synthetic(spec: SyntheticSpec) -> Dataset:
    """Class centres uniform in [0,1]^D plus Gaussian noise, quantised to uint8; same seed, same data."""
    if spec.num_classes < 2 or min(spec.n_train, spec.n_test) < spec.num_classes:
        raise ValueError(f"synthetic: need >= 2 classes and >= one sample per class per split, got {spec}")
    g = torch.Generator().manual_seed(spec.seed)
    d = prod(spec.shape)
    centres = torch.rand(spec.num_classes, d, generator=g)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randperm(n, generator=g) % spec.num_classes  # balanced classes in random order
        x = centres[y] + spec.noise * torch.randn(n, d, generator=g)
        return x.clamp_(0, 1).mul_(255).round_().to(torch.uint8).view(n, *spec.shape), y

    train, test = draw(spec.n_train), draw(spec.n_test)
    return _make("synthetic", train, test, [f"class{i}" for i in range(spec.num_classes)], natural=False)


# ---------------------------------------------------------------- public API

def in_memory(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
              classes: list[str], natural: bool) -> Dataset:
    """Splits given from Python (sam_cls.fit) as uint8 (N, C, H, W) and int64 (N,) tensors: the `python` data
    set, whose images the run holds as cells only, so they cannot be read back."""
    return _make(PYTHON, train, test, classes, natural)


def load_dataset(name: str, data_dir: str | Path = "data", *, download: bool = True,
                 synthetic: SyntheticSpec | None = None, log: Callable[[str], None] | None = None,
                 skip_bad_images: bool = False) -> Dataset:
    """Load a named data set whole: from data_dir in torchvision's layout, an image folder, synthetic, or the
    embedded mnist-mini (which ignores data_dir). skip_bad_images: leave an image folder's unreadable files out
    (their count is logged) instead of stopping at the first."""
    log = log or (lambda _msg: None)
    root = Path(data_dir).expanduser()
    if name == "mnist-mini":
        return _load_mnist_mini(log)
    if name in _TORCHVISION:
        return _load_torchvision(name, _TORCHVISION[name], root, download, log)
    if name == "imagefolder":
        from sam_cls.imagefolder import load_imagefolder  # here: it builds on this module's Dataset

        return load_imagefolder(root, log, skip_bad_images)
    if name == "synthetic":
        return _load_synthetic(synthetic or SyntheticSpec())
    if name == PYTHON:
        raise DatasetError("the data set was given from Python (sam_cls.fit) and a run does not keep its images: "
                           "give it again (sam_cls.fit), or train on files (--dataset imagefolder)")
    raise DatasetError(f"unknown dataset {name!r}; pass --dataset one of: {', '.join(DATASETS)}")


def split_validation(ds: Dataset, fraction: float, seed: int) -> Dataset:
    """Hold out a stratified fraction of train as the test split, to tune without ever looking at test."""
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    g = torch.Generator().manual_seed(seed)
    held = []
    for c in range(ds.num_classes):  # per class, so rare classes keep their share in both parts
        idx = (ds.train_y == c).nonzero().squeeze(1)
        held.append(idx[torch.randperm(len(idx), generator=g)[: round(fraction * len(idx))]])
    val = torch.cat(held).sort().values  # sorted: both parts keep the original order
    keep = torch.ones(len(ds.train_y), dtype=torch.bool)
    keep[val] = False
    if len(val) == 0 or not keep.any():
        raise ValueError(f"validation fraction {fraction} leaves an empty split of {len(keep)} train samples")
    return _make(ds.name, (ds.train_x[keep], ds.train_y[keep]), (ds.train_x[val], ds.train_y[val]),
                 ds.classes, ds.natural)


def reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Map indices in [-(n-1), 2(n-1)] into [0, n) by mirroring at the edges (reflect: edge not repeated)."""
    return (n - 1) - ((n - 1) - i.abs()).abs()


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """Random crop (reflect padding) + horizontal flip of a uint8 batch in one gather: cheap on a GPU.

    Each image is shifted by an independent (dy, dx) in [-pad, pad]; pixels shifted in from outside are
    reflections of the border (reflect padding, as airbench does) rather than zeros. The generator must live
    on x's device (torch.Generator(device=x.device)); the same generator state gives the same output.
    """
    b, _, h, w = x.shape
    if not 0 <= pad < min(h, w):
        raise ValueError(f"pad must be in [0, {min(h, w)}) for {h}x{w} images, got {pad}")
    dev = x.device
    dy = torch.randint(-pad, pad + 1, (b, 1), generator=generator, device=dev)
    dx = torch.randint(-pad, pad + 1, (b, 1), generator=generator, device=dev)
    mirror = torch.rand(b, 1, generator=generator, device=dev) < 0.5 if flip else None
    return shift_flip(x, dy, dx, mirror)


def shift_flip(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, mirror: torch.Tensor | None) -> torch.Tensor:
    """Each image of (B, C, H, W) shifted by its (dy, dx) (each (B, 1)), border reflected, and mirrored where
    `mirror` (B, 1) says: one gather for the whole batch (augment's crops and flips, crop-flip copies)."""
    b, c, h, w = x.shape
    dev = x.device
    cols = torch.arange(w, device=dev).expand(b, w)
    if mirror is not None:
        cols = torch.where(mirror, (w - 1) - cols, cols)  # reading columns backwards flips the image
    rows = reflect(torch.arange(h, device=dev) + dy, h)  # (b, h) source row of each output row
    cols = reflect(cols + dx, w)  # (b, w) source column of each output column
    bi = torch.arange(b, device=dev).view(b, 1, 1, 1)
    ci = torch.arange(c, device=dev).view(1, c, 1, 1)
    return x[bi, ci, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]
