"""Write small data sets in the exact on-disk formats the real ones use, so tests exercise the real readers.

Each writer returns what it wrote as uint8 (N, C, H, W) arrays and int64 labels, in the order the
loaders read them back, so tests can compare values exactly.
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # train_x, train_y, test_x, test_y


def _write_idx(path: Path, array: np.ndarray) -> None:
    """IDX as LeCun published it: magic 0x0000 <type 0x08 = uint8> <ndim>, big-endian dims, raw bytes."""
    header = struct.pack(f">I{array.ndim}I", (0x08 << 8) | array.ndim, *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_mnist(root: str | Path, n_train: int = 60, n_test: int = 20, seed: int = 0,
                folder: str = "MNIST") -> Arrays:
    """Write root/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte (uncompressed idx).

    folder="FashionMNIST" writes the Fashion-MNIST layout instead (same format, different folder).
    """
    rng = np.random.default_rng(seed)
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    out = []
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, size=n).astype(np.uint8)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", x)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", y)
        out += [x[:, None], y.astype(np.int64)]
    return out[0], out[1], out[2], out[3]


def _cifar_images(rng: np.random.Generator, n: int) -> np.ndarray:
    """Rows of 3072 bytes: 1024 red, 1024 green, then 1024 blue, each 32x32 row-major (CIFAR's layout)."""
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the official files are Python 2 pickles (cPickle protocol 2)


def write_cifar10(root: str | Path, n_train: int = 50, n_test: int = 20, seed: int = 0) -> Arrays:
    """Write root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} as the official pickles."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    x_train, x_test = _cifar_images(rng, n_train), _cifar_images(rng, n_test)
    y_train, y_test = rng.integers(0, 10, size=n_train), rng.integers(0, 10, size=n_test)
    for i, rows in enumerate(np.array_split(np.arange(n_train), 5), start=1):  # train spans 5 batch files
        _pickle(folder / f"data_batch_{i}", {"batch_label": f"training batch {i} of 5", "data": x_train[rows],
                                              "labels": y_train[rows].tolist(),
                                              "filenames": [f"img_{j}.png" for j in rows]})
    test = {"batch_label": "testing batch 1 of 1", "data": x_test, "labels": y_test.tolist(),
            "filenames": [f"t_{j}.png" for j in range(n_test)]}
    _pickle(folder / "test_batch", test)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _pickle(folder / "batches.meta", {"label_names": names, "num_cases_per_batch": 10000, "num_vis": 3072})
    return (x_train.reshape(-1, 3, 32, 32), y_train.astype(np.int64),
            x_test.reshape(-1, 3, 32, 32), y_test.astype(np.int64))


def write_cifar100(root: str | Path, n_train: int = 50, n_test: int = 20, seed: int = 0) -> Arrays:
    """Write root/cifar-100-python/{train,test,meta}; returns the fine labels (what torchvision loads)."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for split, n in (("train", n_train), ("test", n_test)):
        x, fine = _cifar_images(rng, n), rng.integers(0, 100, size=n)
        _pickle(folder / split, {"filenames": [f"{split}_{j}.png" for j in range(n)], "batch_label": split,
                                 "fine_labels": fine.tolist(), "coarse_labels": (fine // 5).tolist(),
                                 "data": x})
        out += [x.reshape(-1, 3, 32, 32), fine.astype(np.int64)]
    _pickle(folder / "meta", {"fine_label_names": [f"fine{i:02d}" for i in range(100)],
                              "coarse_label_names": [f"coarse{i:02d}" for i in range(20)]})
    return out[0], out[1], out[2], out[3]


def write_imagefolder(root: str | Path, n_per_class: int = 3, classes: Sequence[str] = ("cat", "dog"),
                      size: int | tuple[int, int] = 8, seed: int = 0, fmt: str = "png",
                      channels: int = 3) -> Arrays:
    """Write root/{train,test}/<class>/NNNN.<fmt> (ImageFolder layout): n_per_class per class and split.

    size is (height, width) or one int for squares; channels 1 writes greyscale ("L") files. PNG is lossless,
    so its returned arrays equal what a loader must decode; JPEG only approximately.
    """
    rng = np.random.default_rng(seed)
    h, w = (size, size) if isinstance(size, int) else size
    out = []
    for split in ("train", "test"):
        xs, ys = [], []
        for label, name in enumerate(sorted(classes)):  # ImageFolder numbers classes in sorted order
            folder = Path(root) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n_per_class):
                img = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
                Image.fromarray(img[:, :, 0] if channels == 1 else img).save(folder / f"{i:04d}.{fmt}")
                xs.append(img.transpose(2, 0, 1))
                ys.append(label)
        out += [np.stack(xs), np.array(ys, dtype=np.int64)]
    return out[0], out[1], out[2], out[3]
