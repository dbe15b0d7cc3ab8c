"""Image folders (ROOT/{train,test}/<class>/*) as whole uint8 tensors, decoded once into a cache beside them."""

from __future__ import annotations

import hashlib
import os
import pickle
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import datasets as tvd
from tqdm import tqdm

from sam_cls.data import Dataset, DatasetError, _make, _one_line
from sam_cls.files import open_file

# Bump when the cached tensors' layout or decoding changes, so old caches are ignored. 2: the channel count
# follows all images (1 took the first image's, so a grey first image made a whole RGB folder grey).
_CACHE_VERSION = 2


class _ImageFolder(tvd.ImageFolder):
    """torchvision's ImageFolder, but a hidden folder (.ipynb_checkpoints, .git) is not a class."""

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
        return classes, {name: i for i, name in enumerate(classes)}


def _writable(folder: Path) -> bool:
    # root ignores permission bits, so os.access alone would say yes to a copy deliberately shipped without
    # write bits (as shared data sets are): honour the bits as the owner's "read-only" intent too.
    return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)


def _cache_path(root: Path, key: str) -> Path:
    """Cache next to the images when allowed, else per user; the stem names one folder's versions."""
    if _writable(root):
        return root / ".sam_cls_cache" / f"imagefolder-{key}.pt"
    # One per-user cache dir serves many folders, so its names also carry the folder's own path.
    tag = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sam_cls"
    return base / f"imagefolder-{tag}-{key}.pt"


def _folder_key(root: Path, splits: dict[str, list[tuple[str, int]]]) -> str:
    """Hash of every file's relative path, size and mtime: an added, removed or rewritten image changes it."""
    h = hashlib.sha256(f"v{_CACHE_VERSION}".encode())
    for split, samples in splits.items():
        for path, label in samples:
            st = os.stat(path)
            rel = Path(path).relative_to(root)
            h.update(f"{split}\t{rel}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


# PIL modes of one grey channel: a folder decodes as one channel only when every image has one of them.
_GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})
# What PIL raises for a file that is not an image, is truncated (with ImageFile.LOAD_TRUNCATED_IMAGES False, its
# default, load() raises OSError) or damaged: its plugins are Python code that parses untrusted bytes.
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, struct.error,
                 zlib.error, Image.DecompressionBombError)


def _read_image(path: str) -> np.ndarray:
    """Decode one file with PIL (which ImageFolder itself uses) to (H, W, 1) uint8 if its mode is grey, else to
    (H, W, 3) RGB."""
    with open_file(path, follow=True) as f, Image.open(f) as im:  # a FIFO named *.png would block the read
        im.load()  # decode every pixel now, so a truncated file raises here
        mode = "L" if im.mode in _GREY_MODES else "RGB"
        if im.mode != mode:
            im = im.convert(mode)
        return np.asarray(im).reshape(im.height, im.width, -1)  # "L" gives (H, W): add the channel axis


def _size_error(path: str, got: tuple[int, ...], size: tuple[int, ...]) -> DatasetError:
    return DatasetError(f"imagefolder: {path} is {got[1]}x{got[0]} but the images before it are {size[1]}x{size[0]}; "
                        "all images must share one size (resize first)")


def _decode(items: list[tuple[str, int]], size: tuple[int, ...] | None, desc: str,
            unreadable: Callable[[str, BaseException], None]) -> tuple[np.ndarray | None, list[int]]:
    """Decode a split in one pass into an (N, H, W, C) uint8 array (None if nothing was readable) and its labels.

    C is 1 while every image so far is grey, and 3 from the first colour image on, the grey ones before it
    repeated over R, G and B: the channel count follows all images, not the first. Every image must be `size`
    (H, W), or the first one's when size is None. An unreadable file goes to unreadable(), which raises or records
    it, and is then left out of both the images and the labels, so the two stay aligned.
    """
    x, labels = None, []
    for path, label in tqdm(items, desc=desc, unit="img", leave=False):
        try:
            img = _read_image(path)
        except _IMAGE_ERRORS as e:
            unreadable(path, e)
            continue
        size = size or img.shape[:2]
        if img.shape[:2] != size:
            raise _size_error(path, img.shape[:2], size)
        if x is None:
            x = np.empty((len(items), *size, img.shape[2]), dtype=np.uint8)
        elif img.shape[2] > x.shape[3]:  # the first colour image: from here on RGB
            x = _to_rgb(x, len(labels), len(items))
        x[len(labels)] = img  # a grey (H, W, 1) image broadcasts over an RGB slot's three channels
        labels.append(label)
    return (None if x is None else x[: len(labels)]), labels


def _to_rgb(x: np.ndarray, n: int, capacity: int | None = None) -> np.ndarray:
    """The first n images of x as RGB in a new (capacity, H, W, 3) array: grey ones repeated over R, G and B."""
    rgb = np.empty((capacity or n, *x.shape[1:3], 3), dtype=np.uint8)
    rgb[:n] = x[:n]
    return rgb


def load_imagefolder(root: Path, log: Callable[[str], None], skip_bad_images: bool = False) -> Dataset:
    """Load root/{train,test}/<class>/* once, then from a tensor cache keyed by the folder's contents.

    An unreadable image (not an image, truncated, damaged) is a DatasetError naming it, or with skip_bad_images
    is left out of images and labels alike, and the number left out is logged.
    """
    layout = f"expected {root}/train/<class>/* and {root}/test/<class>/* image files"
    folders = {}
    for split in ("train", "test"):
        try:
            folders[split] = _ImageFolder(str(root / split))  # only lists files; we decode them below
        except (OSError, ValueError) as e:
            raise DatasetError(f"imagefolder: no images in {root / split} ({_one_line(e)}); {layout}; "
                               "pass --data-dir DIR pointing at such a folder") from None
    classes = folders["train"].classes
    if folders["test"].classes != classes:
        raise DatasetError(f"imagefolder: {root}/test has classes {folders['test'].classes} but {root}/train "
                           f"has {classes}; both must hold the same class folders")
    samples = {split: f.samples for split, f in folders.items()}
    cache = _cache_path(root, _folder_key(root, samples))
    n = {split: len(s) for split, s in samples.items()}

    def log_skipped(skipped: list[str]) -> None:
        shown = ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else "")
        log(f"imagefolder: skipped {len(skipped)} unreadable image(s) under {root} (--skip-bad-images): {shown}")

    if cache.is_file():
        try:
            blob = torch.load(cache, weights_only=True)  # plain tensors and strings: no code runs on load
            train, test = (blob["train_x"], blob["train_y"]), (blob["test_x"], blob["test_y"])
            skipped = list(blob["skipped"])  # files under root left out as unreadable
            fits = (blob["version"] == _CACHE_VERSION and blob["classes"] == classes
                    and len(train[1]) + len(test[1]) + len(skipped) == n["train"] + n["test"])
            # Without skip_bad_images a cache that left files out is not used: decoding names the first one.
            if fits and (skip_bad_images or not skipped):
                log(f"imagefolder: cache hit {cache}")
                if skipped:
                    log_skipped(skipped)
                return _make("imagefolder", train, test, classes, natural=True)
        # A damaged or foreign cache is only a lost shortcut: decode again.
        except (OSError, RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as e:
            log(f"imagefolder: ignoring unreadable cache {cache} ({_one_line(e)})")

    skipped: list[str] = []

    def unreadable(path: str, err: BaseException) -> None:
        if not skip_bad_images:
            raise DatasetError(f"imagefolder: cannot read {path} ({_one_line(err)}); fix or remove it, or pass "
                               "--skip-bad-images to leave unreadable images out")
        skipped.append(str(Path(path).relative_to(root)))

    log(f"imagefolder: decoding {n['train']} train + {n['test']} test images from {root}")
    xs, ys, size = {}, {}, None
    for split, items in samples.items():
        x, labels = _decode(items, size, f"decoding {split}", unreadable)
        if x is None:
            raise DatasetError(f"imagefolder: no readable images in {root / split} ({len(skipped)} unreadable "
                               f"left out); {layout}")
        xs[split], ys[split], size = x, torch.tensor(labels, dtype=torch.int64), x.shape[1:3]
    channels = max(x.shape[3] for x in xs.values())  # RGB if any image of either split is in colour
    for split, x in xs.items():
        x = _to_rgb(x, len(x)) if x.shape[3] < channels else x
        xs[split] = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    if skipped:
        log_skipped(skipped)
    blob = {"version": _CACHE_VERSION, "classes": classes, "train_x": xs["train"], "train_y": ys["train"],
            "test_x": xs["test"], "test_y": ys["test"], "skipped": skipped}
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(blob, tmp)
        os.replace(tmp, cache)  # atomic: a reader sees the old cache or the whole new one, never half a file
        stem = cache.name.rsplit("-", 1)[0]
        for old in cache.parent.glob(f"{stem}-*.pt"):  # earlier versions of this folder are dead weight
            if old != cache:
                old.unlink(missing_ok=True)
        log(f"imagefolder: cached as {cache}")
    except (OSError, RuntimeError) as e:  # no cache is slower next time, not wrong
        tmp.unlink(missing_ok=True)
        log(f"imagefolder: could not write cache {cache} ({_one_line(e)})")
    return _make("imagefolder", (xs["train"], ys["train"]), (xs["test"], ys["test"]), classes, natural=True)
