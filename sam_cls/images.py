"""Inputs to a trained run: files, folders, PIL images, numpy arrays or tensors, as uint8 batches of the run's
image shape, each decoded as an image viewer shows it."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, ImageStat, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF

from sam_cls.data import DatasetError
from sam_cls.files import NotRegularFileError, check_regular, open_file

# What PIL (and so torchvision's ImageFolder) reads; other files in a folder are not images.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")

ImageLike = str | Path | Image.Image | torch.Tensor | np.ndarray
# The grey level transparent images are composited onto, or a function that finds it (called only for those).
Background = int | Callable[[], int]


def image_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders as their image files (recursively, sorted, hidden folders and files such as
    .ipynb_checkpoints left out); a missing path, or a FIFO or device where an image should be, is an error."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and not f.is_dir()
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
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


def to_batch(images: ImageLike | Iterable[ImageLike], shape: tuple[int, int, int], background: Background = 0,
             log: Callable[[str], None] | None = None,
             skipped: list[tuple[Path, str]] | None = None) -> torch.Tensor:
    """uint8 (B, C, H, W) in the run's shape: decoded as a viewer shows them (decode()), channels converted (grey
    <-> RGB) and resized, as training saw. An array or tensor is one image or a batch (array_batch()); a list
    holds any mix of forms. With `skipped` given, an unreadable file is listed there (path, reason) and left out
    instead of ending the call."""
    say = log or (lambda message: warnings.warn(message, stacklevel=3))
    if isinstance(images, torch.Tensor | np.ndarray):
        return _conform(array_batch(images, background), shape, "an image", say)
    if isinstance(images, str | Path | Image.Image):
        images = [images]
    batch = []
    for i, image in enumerate(images):
        try:
            x = _decoded(image, background)
        except DatasetError as e:
            if skipped is None or not isinstance(image, str | Path):
                raise
            skipped.append((Path(image), str(e)))
            continue
        batch.append(_conform(x, shape, str(image) if isinstance(image, str | Path) else f"image #{i}", say))
    if not batch:
        if skipped:  # every file was unreadable: nothing to answer, which the caller reports
            return torch.zeros(0, *shape, dtype=torch.uint8)
        raise DatasetError("no images given")
    return torch.cat(batch)


def _decoded(image: ImageLike, background: Background) -> torch.Tensor:
    if isinstance(image, torch.Tensor | np.ndarray):
        return array_batch(image, background)
    if isinstance(image, str | Path):
        image = read_image(image)
    if not isinstance(image, Image.Image):
        raise DatasetError(f"images are file paths, PIL images, numpy arrays or torch tensors, got "
                           f"{type(image).__name__}")
    return decode(image, background)


# Channel counts an image array may have: grey, grey + alpha, RGB, RGBA.
_CHANNELS = (1, 2, 3, 4)
_LAYOUTS = "(H, W), (C, H, W), (H, W, C), (B, C, H, W) or (B, H, W, C) with C = 1, 2, 3 or 4"


def array_batch(x: torch.Tensor | np.ndarray, background: Background = 0) -> torch.Tensor:
    """uint8 (B, C, H, W), C 1 or 3, of an image array or tensor in any common layout and value range.

    Layouts: (H, W); (C, H, W) or (H, W, C), read as numpy's own (H, W, C) when both could be (np.asarray of a
    PIL image) and as torch's (C, H, W) for a tensor; (B, C, H, W), or (B, H, W, C) where only the last axis can
    be channels. Values: uint8 0..255, uint16 0..65535, float 0..1 (as torchvision's ToTensor gives). An alpha
    channel (C = 2 or 4) is composited onto the run's background, as decode() does for files."""
    given = f"{'numpy array' if isinstance(x, np.ndarray) else 'tensor'} {str(x.dtype).removeprefix('torch.')} " \
            f"{tuple(x.shape)}"
    t = torch.from_numpy(np.array(x)) if isinstance(x, np.ndarray) else x.detach().cpu()  # a copy: never aliased
    s, numpy_first = t.shape, isinstance(x, np.ndarray)
    first, last = len(s) >= 3 and s[-3] in _CHANNELS, len(s) >= 3 and s[-1] in _CHANNELS
    if t.ndim == 2:
        t = t[None, None]
    elif t.ndim == 3 and last and (numpy_first or not first):
        t = t.permute(2, 0, 1)[None]
    elif t.ndim == 3 and first:
        t = t[None]
    elif t.ndim == 4 and first:
        pass
    elif t.ndim == 4 and last:
        t = t.permute(0, 3, 1, 2)
    else:
        raise DatasetError(f"image arrays must be {_LAYOUTS}; got {given}")
    t = _uint8(t, given)
    if t.shape[1] in (2, 4):  # with alpha: each image through PIL's own compositing
        mode = "LA" if t.shape[1] == 2 else "RGBA"
        t = torch.cat([decode(Image.fromarray(im.permute(1, 2, 0).numpy(), mode), background) for im in t])
    return t.contiguous()


def _uint8(t: torch.Tensor, given: str) -> torch.Tensor:
    """uint8 pixels of an image array, by torchvision's own scaling (to_dtype) from its dtype's range."""
    if t.dtype == torch.uint8:
        return t
    if t.dtype == torch.uint16:
        return TF.to_dtype(t, torch.uint8, scale=True)
    if t.is_floating_point():
        t = t.float()
        lo, hi = (float(t.min()), float(t.max())) if t.numel() else (0.0, 0.0)
        if not (torch.isfinite(t).all() and lo >= 0 and hi <= 1):
            raise DatasetError(f"float images must hold values in 0..1 (as torchvision's ToTensor gives); got {given} "
                               f"with values {lo:.4g}..{hi:.4g}: divide by 255, or pass uint8")
        return TF.to_dtype(t, torch.uint8, scale=True)
    raise DatasetError(f"image arrays must be uint8 (0..255), uint16 (0..65535) or float (0..1); got {given}")


# PIL modes with more than 8 bits a pixel: one grey channel each.
_DEEP_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def decode(image: Image.Image, background: Background = 0) -> torch.Tensor:
    """uint8 (1, C, H, W), C 1 (grey) or 3 (RGB), of a PIL image as a viewer shows it: EXIF orientation applied,
    palette images converted, 16-bit, 32-bit and float images scaled from their range, and transparency
    composited onto the run's background grey level (composite())."""
    image = ImageOps.exif_transpose(image)
    if image.mode in _DEEP_MODES:
        return _deep(image)
    if image.mode == "P" or "transparency" in image.info:  # a palette, or one colour marked transparent
        image = image.convert("RGBA")
    if image.mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        image = composite(image, background).convert("L" if image.mode in ("LA", "La") else "RGB")
    elif image.mode not in ("L", "RGB"):
        image = image.convert("L" if image.mode == "1" else "RGB")
    return TF.pil_to_tensor(image).unsqueeze(0)


def composite(image: Image.Image, background: Background) -> Image.Image:
    """An image with transparency flattened onto the background grey level, by PIL's alpha_composite. A drawing
    exported with its shape in the alpha channel and ink of the background's own shade (black strokes on a clear
    canvas, for a run of white-on-black digits) would vanish into it: its shape is drawn in the opposite shade,
    as it stands out from whatever a viewer shows behind it."""
    background = background() if callable(background) else background
    rgba = image.convert("RGBA")
    alpha = rgba.getchannel("A")
    back = Image.new("RGBA", rgba.size, (background,) * 3 + (255,))
    drawn = alpha.point(lambda a: 255 if a >= 128 else 0)  # the pixels that are mostly ink
    if alpha.getextrema()[0] < 255 and drawn.getbbox() is not None:
        ink = ImageStat.Stat(rgba.convert("L"), mask=drawn).mean[0]
        if abs(ink - background) < 64:  # ink and background alike: the shape is only in the alpha channel
            rgba = Image.new("RGBA", rgba.size, (255 - background,) * 3 + (255,))
            rgba.putalpha(alpha)
    return Image.alpha_composite(back, rgba)


def _deep(image: Image.Image) -> torch.Tensor:
    """A 16-bit, 32-bit or float grey image as uint8, by its range: 16-bit over 0..65535; 32-bit integers over
    0..255 where they fit it, else 0..65535; floats over 0..1 (torchvision's convention) where they fit it, else
    0..255, else 0..65535."""
    t = TF.pil_to_tensor(image).unsqueeze(0)
    if t.dtype == torch.uint16:
        return TF.to_dtype(t, torch.uint8, scale=True)
    t = t.double().nan_to_num(0.0).clamp_min(0)
    hi = float(t.max()) if t.numel() else 0.0
    if image.mode == "F" and hi <= 1:
        return TF.to_dtype(t.float(), torch.uint8, scale=True)
    if hi <= 255:
        return t.round().to(torch.uint8)
    return TF.to_dtype(t.clamp_max(65535).to(torch.int32).to(torch.uint16), torch.uint8, scale=True)


def _conform(x: torch.Tensor, shape: tuple[int, int, int], name: str, say: Callable[[str], None]) -> torch.Tensor:
    c, h, w = shape
    if x.shape[1] != c:
        if x.shape[1] == 1 and c == 3:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] == 3 and c == 1:
            x = TF.rgb_to_grayscale(x)
        else:
            raise DatasetError(f"images with {x.shape[1]} channels cannot be read as the run's {c}")
    if x.shape[2:] != (h, w):
        if 4 * x.shape[2] < h or 4 * x.shape[3] < w:  # enlarged over four times: little left to read
            say(f"warning: {name} is {x.shape[3]}x{x.shape[2]}, far smaller than the run's {w}x{h} input: it is "
                "enlarged and may be read poorly")
        x = TF.resize(x, [h, w], antialias=True)
    return x.contiguous()


def background_level(images: torch.Tensor) -> int:
    """The grey level of a data set's background: the median of its images' border pixels (uint8 B, C, H, W),
    onto which a transparent image is composited (0 for MNIST's white-on-black digits)."""
    if not len(images):
        return 0
    x = images[:1000].float().mean(1)  # grey
    border = torch.cat([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], 1)
    return int(border.median().round())
