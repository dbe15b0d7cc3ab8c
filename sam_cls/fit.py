"""Training from Python: a network (a name or your nn.Module) and data (arrays, a torch Dataset or a folder).

    clf = sam_cls.fit("resnet18", (images, labels), (test_images, test_labels), epochs=5, out="runs/mine")
    clf = sam_cls.fit(MyNet(), train_dataset, epochs=0, freeze_backbone=True)   # a memory of MyNet's features
    clf = sam_cls.load("runs/mine-module", encoder=MyNet())                      # a user module is handed back

The options are `sam-cls train`'s, by their config names (batch_size=64, topk=32, ...). Data given as tensors
becomes the `python` data set (data.in_memory): the run keeps its cells, not its images.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.transforms.v2 import functional as TF

from sam_cls.backbones import USER_MODULE
from sam_cls.classifier import MemoryClassifier, load
from sam_cls.config import ConfigError, make_config
from sam_cls.data import PYTHON, Dataset, in_memory

# Given by fit's own arguments, never as options.
_SET_BY_FIT = {"encoder": "the first argument", "dataset": "train", "data_dir": "train"}
HELD_OUT = 0.1  # the share of train measured on (the validation option) where no test split is given


def fit(encoder: str | nn.Module, train, test=None, *, log=print, **options) -> MemoryClassifier:
    """Train a memory classifier and return it, loaded from the run directory it wrote (options["out"]).

    encoder: linear, conv1, cnn or a torchvision model name, or an nn.Module whose output (flattened) is its
    features: a linear projection to `dim` follows it, and the module is trained in place (freeze_backbone=True
    trains the projection only). train and test: a pair (images, labels) of arrays or tensors, a torch Dataset
    of (image, label), or for train a folder holding train/<class>/* and test/<class>/*. Images are uint8
    (0..255) or float (0..1), as N x C x H x W or N x H x W x C (C 1 or 3) or N x H x W; labels are integers or
    class names. With no test split, the `validation` share of train (0.1 unless given) is held out.
    """
    clash = sorted(set(options) & set(_SET_BY_FIT))
    if clash:
        raise ConfigError(f"fit sets {', '.join(clash)} from {', '.join(_SET_BY_FIT[k] for k in clash)}: "
                          "leave them out of the options")
    if isinstance(options.get("out"), Path):  # a path as Python code holds one
        options["out"] = str(options["out"])
    module = encoder if isinstance(encoder, nn.Module) else None
    if module is None and not isinstance(encoder, str):
        raise ConfigError(f"encoder must be a name or an nn.Module, got a {type(encoder).__name__}")
    data = None
    if isinstance(train, str | Path):
        if test is not None:
            raise ConfigError(f"the folder {train} brings its own test split ({train}/test): pass test=None")
        source = {"dataset": "imagefolder", "data_dir": str(train)}
    else:
        if test is None:
            options.setdefault("validation", HELD_OUT)
            if not options["validation"]:
                raise ConfigError("with test=None, fit measures on a held-out share of train: pass test=(images, "
                                  "labels) or validation > 0")
        data = as_dataset(train, test)
        source = {"dataset": PYTHON}
    cfg = make_config(None, encoder=USER_MODULE if module is not None else encoder, **source, **options)
    from sam_cls.train import train as train_run  # here: `import sam_cls` to use a run never loads training

    train_run(cfg, log=log, data=data, module=module)
    return load(cfg.out, device=cfg.device, log=log, encoder=module)


def as_dataset(train, test=None) -> Dataset:
    """Python data as the data set a Trainer takes: uint8 (N, C, H, W) images, int64 labels, class names."""
    train_x, train_labels, classes = _split(train, "train")
    if test is None:  # held out of train by the validation option (setup.get_dataset)
        test_x, test_labels = train_x[:0], train_labels[:0]
    else:
        test_x, test_labels, _ = _split(test, "test")
        if test_x.shape[1:] != train_x.shape[1:]:
            raise ConfigError(f"test images are {_shape(test_x)} but train images are {_shape(train_x)}: give both "
                              "splits at one size and channel count")
    train_y, test_y, classes = _label_ids(train_labels, test_labels, classes)
    # Colour images get the crop-and-flip augmentation of natural photos; grey ones (digits) do not.
    return in_memory((train_x, train_y), (test_x, test_y), classes, natural=train_x.shape[1] == 3)


def _shape(x: torch.Tensor) -> str:
    return "x".join(map(str, x.shape[1:]))


def _split(split, name: str) -> tuple[torch.Tensor, list, list[str] | None]:
    """(images as uint8 N x C x H x W, labels as given, the Dataset's class names if it has them)."""
    if isinstance(split, tuple | list) and len(split) == 2:
        images, labels = split
        x = as_images(images, name)
        labels = labels.tolist() if isinstance(labels, np.ndarray | torch.Tensor) else list(labels)
        if len(labels) != len(x):
            raise ConfigError(f"{name}: {len(x)} images but {len(labels)} labels")
        return x, labels, None
    if isinstance(split, torch.utils.data.Dataset) and hasattr(split, "__len__"):
        if len(split) == 0:
            raise ConfigError(f"{name}: the Dataset is empty")
        items = [split[i] for i in range(len(split))]
        x = torch.stack([as_image(item[0], f"{name} item {i}") for i, item in enumerate(items)])
        labels = [item[1].item() if isinstance(item[1], torch.Tensor) else item[1] for item in items]
        return x, labels, getattr(split, "classes", None)
    raise ConfigError(f"{name} must be a pair (images, labels) of arrays or tensors, a torch Dataset of (image, "
                      f"label), or for train a folder; got a {type(split).__name__}")


def as_images(images, name: str) -> torch.Tensor:
    """A batch of images as uint8 N x C x H x W: from N x C x H x W, N x H x W x C (C 1 or 3) or N x H x W."""
    x = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    if x.ndim == 3:
        x = x.unsqueeze(1)  # N x H x W: grey
    elif x.ndim == 4 and x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):
        x = x.permute(0, 3, 1, 2)  # channels last, as numpy and PIL hold them
    if x.ndim != 4 or x.shape[1] not in (1, 3) or len(x) == 0:
        raise ConfigError(f"{name}: images of shape {tuple(x.shape)}: give N x C x H x W, N x H x W x C (C 1 or 3) "
                          "or N x H x W, at least one image")
    return _to_uint8(x, name).contiguous()


def as_image(image, name: str) -> torch.Tensor:
    """One image (a PIL image, or C x H x W / H x W x C / H x W array or tensor) as uint8 C x H x W."""
    if isinstance(image, Image.Image):
        return TF.pil_to_tensor(image.convert("L" if image.mode in ("1", "L", "I", "I;16", "F") else "RGB"))
    x = torch.as_tensor(np.asarray(image)) if not isinstance(image, torch.Tensor) else image
    return as_images(x.unsqueeze(0) if x.ndim >= 2 else x, name)[0]


def _to_uint8(x: torch.Tensor, name: str) -> torch.Tensor:
    """uint8 as it is; float in [0, 1] (torchvision's ToTensor range) scaled by torchvision's own routine."""
    if x.dtype == torch.uint8:
        return x
    if x.is_floating_point():
        low, high = float(x.min()), float(x.max())
        if low < 0 or high > 1:
            raise ConfigError(f"{name}: float images must hold values in [0, 1] (as ToTensor gives), got "
                              f"{low:g}..{high:g}: scale them, or give uint8 (0..255)")
        return TF.to_dtype(x, torch.uint8, scale=True)
    raise ConfigError(f"{name}: images of dtype {x.dtype}: give uint8 (0..255) or float (0..1)")


def _label_ids(train: Sequence, test: Sequence, classes: list[str] | None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   list[str]]:
    """Labels as int64 ids into the class names: names sorted as given, or integer ids 0..C-1 (named by the
    Dataset's `classes`, else by their number)."""
    every = list(train) + list(test)
    if all(isinstance(v, str) for v in every):
        names = sorted(set(every))
        ids = {n: i for i, n in enumerate(names)}
        return (torch.tensor([ids[v] for v in train], dtype=torch.int64),
                torch.tensor([ids[v] for v in test], dtype=torch.int64), names)
    if not all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in every):
        raise ConfigError("labels must be all integers (class ids from 0) or all strings (class names)")
    if min(every) < 0:
        raise ConfigError(f"labels must be class ids from 0, got {min(every)}")
    count = max(max(every) + 1, len(classes or []))
    names = list(classes) if classes and len(classes) == count else [str(c) for c in range(count)]
    return (torch.tensor(list(train), dtype=torch.int64), torch.tensor(list(test), dtype=torch.int64), names)
