"""Inputs to a trained run: files, folders, PIL images or tensors, as uint8 batches of the run's image shape."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF

from sam_cls.data import DatasetError
from sam_cls.files import NotRegularFileError, check_regular, open_file

# What PIL (and so torchvision's ImageFolder) reads; other files in a folder are not images.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")

ImageLike = str | Path | Image.Image | torch.Tensor


def image_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders as their image files (recursively, sorted); a missing path, or a FIFO or device
    where an image should be, is an error."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and not f.is_dir())
            if not found:
                raise DatasetError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in folder {p}")
            out += found
        elif p.exists():
            out.append(p)
        else:
            raise DatasetError(f"no such file or folder: {p}")
    for f in out:
        try:
            check_regular(f, follow=True)  # a link the user made is theirs to point anywhere
        except FileNotFoundError:
            raise DatasetError(f"cannot read image {f}: a link to nothing") from None
        except NotRegularFileError as e:  # a FIFO would block the read forever
            raise DatasetError(f"cannot read image {f}: {e.strerror}") from None
    return out


def max_pixels(limit: int | None) -> int | None:
    """Set the largest image (in pixels) that is decoded (PIL's Image.MAX_IMAGE_PIXELS; None keeps it); returns
    the limit before, to restore it."""
    before = Image.MAX_IMAGE_PIXELS
    if limit is not None:
        Image.MAX_IMAGE_PIXELS = limit
    return before


def read_image(path: str | Path) -> Image.Image:
    """Decode a file fully now, so a truncated or mis-named one fails here with its name, not later; an image
    over the pixel limit is refused before it is decoded (a small file can declare a huge image)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL's limit, not twice it
            with open_file(path, follow=True) as f, Image.open(f) as im:
                im.load()
                return im.copy()
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        size = re.search(r"\((\d+) pixels\)", str(e))
        raise DatasetError(f"cannot read image {path}: {size[1] if size else 'too many'} pixels, over the limit of "
                           f"{Image.MAX_IMAGE_PIXELS}: raise it with --max-image-pixels N (in Python, "
                           "sam_cls.images.max_pixels(N))") from None
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DatasetError(f"cannot read image {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def to_batch(images: ImageLike | Iterable[ImageLike], shape: tuple[int, int, int]) -> torch.Tensor:
    """uint8 (B, C, H, W) in the run's shape: channels converted (grey <-> RGB) and resized, as training saw."""
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.ndim != 4 or images.dtype != torch.uint8:
            raise DatasetError(f"image tensors must be uint8 (C, H, W) or (B, C, H, W), got {images.dtype} "
                               f"{tuple(images.shape)}")
        return _conform(images, shape)
    if isinstance(images, str | Path | Image.Image):
        images = [images]
    batch = [_conform(_tensor(im), shape) for im in images]
    if not batch:
        raise DatasetError("no images given")
    return torch.cat(batch)


def _tensor(image: ImageLike) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        return image if image.ndim == 4 else image.unsqueeze(0)
    if isinstance(image, str | Path):
        image = read_image(image)
    # Any PIL mode (palette, 16-bit, alpha) as grey or RGB, the two the encoders take.
    image = image.convert("L" if image.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB")
    return TF.pil_to_tensor(image).unsqueeze(0)


def _conform(x: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    c, h, w = shape
    if x.shape[1] != c:
        if x.shape[1] == 1 and c == 3:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] == 3 and c == 1:
            x = TF.rgb_to_grayscale(x)
        else:
            raise DatasetError(f"images with {x.shape[1]} channels cannot be read as the run's {c}")
    if x.shape[2:] != (h, w):
        x = TF.resize(x, [h, w], antialias=True)
    return x.contiguous()
