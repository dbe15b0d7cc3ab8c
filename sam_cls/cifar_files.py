"""CIFAR's python files read without running code: the official bytes by md5, any other file by an unpickler
that builds only numpy arrays and plain values (sam_cls.data loads CIFAR through read_cifar)."""

from __future__ import annotations

import hashlib
import importlib
import io
import pickle
from math import prod
from pathlib import Path

import numpy as np
import torch
from torchvision import datasets as tvd

from sam_cls.data import DatasetError, _one_line
from sam_cls.files import read_bytes

# CIFAR's python files are pickles, and unpickling runs whatever code a file names: a crafted
# cifar-10-batches-py/data_batch_1 in --data-dir would run on load. So a file is unpickled with the full pickle
# module only when its md5 is the official one (torchvision's table; a second preimage of a fixed md5 is out of
# reach, unlike a collision). Any other file (re-pickled, or the small ones tests write) is read by
# _ArrayUnpickler, which builds only the numpy arrays, dtypes and plain Python values the format holds and refuses
# every other global, so no code can run.

# The official md5 of every CIFAR file, by its path under data_dir.
_CIFAR_MD5: dict[str, str] = {
    f"{cls.base_folder}/{f}": md5
    for cls in (tvd.CIFAR10, tvd.CIFAR100)
    for f, md5 in [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]
}

# The only globals a CIFAR pickle needs: numpy's array (and scalar) reconstruction under its numpy 1 and 2 module
# names, and _codecs.encode, which protocol-2 pickles written by Python 3 use for bytes. None of them runs code.
_PICKLE_GLOBALS = frozenset({
    *((f"numpy.{core}.multiarray", f) for core in ("core", "_core") for f in ("_reconstruct", "scalar")),
    *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),  # protocol 5
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
})


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle names a global outside _PICKLE_GLOBALS: the message is its dotted name."""


class _Oversized(pickle.UnpicklingError):
    """A pickle declares an array larger than the file that holds it."""


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain values and numpy arrays only; any other global (os.system, builtins.exec, ...) is refused.

    An array's data comes from the file, so the arrays of one file hold at most its size in bytes: numpy.ndarray
    called with a shape (which allocates without reading anything) and _reconstruct are charged against that
    budget before they allocate, so a small crafted file cannot declare a million images of uninitialised memory.
    """

    def __init__(self, file, budget: int, **kwargs):
        super().__init__(file, **kwargs)
        self.budget = budget

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _PICKLE_GLOBALS:
            raise _RefusedGlobal(f"{module}.{name}")
        if (module, name) == ("numpy", "ndarray"):
            return self._ndarray
        if module.startswith(("numpy.core.", "numpy._core.")):  # numpy 1 wrote numpy.core, numpy 2 numpy._core
            for core in ("numpy._core", "numpy.core"):  # import the one this numpy has, without a deprecation
                try:
                    found = getattr(importlib.import_module(f"{core}.{module.rsplit('.', 1)[1]}"), name)
                except (ImportError, AttributeError):
                    continue
                return self._reconstruct(found) if name == "_reconstruct" else found
        return super().find_class(module, name)

    def _charge(self, shape, dtype) -> None:
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        nbytes = prod(int(n) for n in shape) * np.dtype(dtype).itemsize
        if nbytes < 0 or nbytes > self.budget:
            raise _Oversized(f"an array of shape {shape} ({nbytes} bytes), more than the file's data can fill")
        self.budget -= nbytes

    def _ndarray(self, shape, dtype=float, *args, **kwargs) -> np.ndarray:
        self._charge(shape, dtype)
        return np.ndarray(shape, dtype, *args, **kwargs)

    def _reconstruct(self, reconstruct):
        def guarded(subtype, shape, dtype):
            self._charge(shape, dtype)
            return reconstruct(np.ndarray if subtype == self._ndarray else subtype, shape, dtype)

        return guarded


def _is_official(rel: str, blob: bytes) -> bool:
    """Whether the bytes of the CIFAR file at rel (its path under data_dir) are the official file's, by md5."""
    want = _CIFAR_MD5.get(rel)
    if want is None:
        return False
    try:
        return hashlib.md5(blob, usedforsecurity=False).hexdigest() == want
    except ValueError:  # no md5 in this Python (FIPS mode): every file takes the restricted reader
        return False


def _unpickle_cifar(name: str, root: Path, rel: str) -> dict:
    """One CIFAR file as a dict with str keys; the full unpickler only for the official file's exact bytes."""
    path = root / rel
    try:
        blob = read_bytes(path, follow=True)  # once (the bytes checked are the bytes unpickled); no FIFO
        if _is_official(rel, blob):
            unpickler = pickle.Unpickler(io.BytesIO(blob), encoding="latin1")  # latin1: Python 2's str
        else:
            unpickler = _ArrayUnpickler(io.BytesIO(blob), len(blob), encoding="latin1")
        obj = unpickler.load()
    except _Oversized as e:
        raise DatasetError(f"{name}: refusing {path}: it declares {e}, {len(blob)} bytes; pass --data-dir DIR "
                           "pointing at intact files") from None
    except _RefusedGlobal as e:
        raise DatasetError(f"{name}: refusing to unpickle {path}: it is not the official file and names {e}, "
                           "which a CIFAR file never holds (unpickling it could run code); pass --data-dir DIR "
                           "pointing at intact files") from None
    # A damaged pickle can fail in many ways (EOFError, UnpicklingError, ValueError, LookupError, TypeError...).
    except Exception as e:  # noqa: BLE001 -- any of them means a damaged file, told in one line
        raise DatasetError(f"{name}: cannot read {path} ({_one_line(e)}); pass --data-dir DIR pointing at "
                           "intact files") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{name}: {path} holds a {type(obj).__name__}, not CIFAR's dict; pass --data-dir DIR "
                           "pointing at intact files")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def read_cifar(name: str, cls: type, root: Path) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[str]]:
    """Train and test splits as (uint8 (N,3,32,32), int64 (N,)) and the class names, checked against the format."""

    def bad(rel: str, what: str) -> DatasetError:
        return DatasetError(f"{name}: {root / rel} is not a CIFAR file ({what}); pass --data-dir DIR pointing "
                            "at intact files")

    meta_rel = f"{cls.base_folder}/{cls.meta['filename']}"
    names = _unpickle_cifar(name, root, meta_rel).get(cls.meta["key"])
    if isinstance(names, (list, tuple)):
        names = [n.decode("latin1") if isinstance(n, bytes) else n for n in names]
    if not names or not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise bad(meta_rel, f"no list of class names under {cls.meta['key']!r}")
    splits = []
    for files in (cls.train_list, cls.test_list):
        xs, ys = [], []
        for f, _ in files:
            rel = f"{cls.base_folder}/{f}"
            entry = _unpickle_cifar(name, root, rel)
            x = entry.get("data")
            if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
                raise bad(rel, "'data' is not a uint8 array of N x 3072 pixels")
            key = "labels" if "labels" in entry else "fine_labels"  # CIFAR-10, CIFAR-100 (as torchvision)
            y = np.asarray(entry.get(key, []))
            if y.shape != (len(x),) or (len(y) and y.dtype.kind not in "iu"):
                raise bad(rel, f"{len(x)} images but not as many integer {key!r}")
            if len(y) and not 0 <= int(y.min()) <= int(y.max()) < len(names):
                raise bad(rel, f"{key!r} outside 0..{len(names) - 1}, the classes {meta_rel} names")
            xs.append(x)
            ys.append(y.astype(np.int64))
        x = np.concatenate(xs).reshape(-1, 3, 32, 32)  # each row: 1024 red, 1024 green, 1024 blue, row-major
        splits.append((torch.from_numpy(x), torch.from_numpy(np.concatenate(ys))))
    return splits, names
