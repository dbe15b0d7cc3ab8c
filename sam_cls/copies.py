"""Deformed copies: C memory cells per training image, as InfiMNIST made 8.1M digits out of MNIST's 60k.

Cell c * N + e of an expanded memory is copy c of training example e: copy 0 is the image itself, copy c >= 1
a deformation of it, of one of two kinds (`CopyStyle`): an elastic and small affine warp (digits, the default),
or a mirror and shift (natural images: the crop and flip their training augments with). The pixels are a pure
function of (seed, example, copy, style), made on the fly in batches on the images' device and never stored, so
re-encoding the memory, evaluating or explaining a cell regenerates exactly the pixels training saw, at any
batch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from sam_cls.config import COPY_KINDS
from sam_cls.data import shift_flip
from sam_cls.evaluate import encode_batch

# ----------------------------------------------------------------------------- hyper-parameters, all here
# Elastic field: a smooth random displacement, uniform in +-ELASTIC_SHIFT (of the image side) at knots every
# ELASTIC_SPACING of the side, bicubic in between: the scale of Simard et al.'s (2003) alpha 34, sigma 4 on
# 29-pixel digits (a pixel or two, over about 4 pixels), at a twelfth of the random numbers and no blur.
ELASTIC_SHIFT = 2.0 / 28
ELASTIC_SPACING = 4.0 / 28
# The small affine part: rotation, isotropic scale and translation, uniform in +-these.
MAX_ROTATION_DEG = 10.0
MAX_SCALE = 0.1
MAX_SHIFT = 0.08  # of the image side (2 pixels of 28)
# Crop-flip copies: odd copies mirrored, every copy shifted by up to this many pixels each way (reflected border),
# the random crop sam-cls trains natural images with (data.augment's pad).
CROP_PAD = 4

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32), in halves: the full product would overflow int64."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _MASK32


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with full avalanche (Wellons' lowbias32): counters in, independent bits out."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def copy_keys(seed: int, examples: torch.Tensor, copies: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per (seed, example, copy): what a copy's random numbers are drawn from."""
    # A counter-based generator: each copy's numbers depend on its key alone, not on which batch it is made in
    # (a torch.Generator would give a copy different pixels in a different batch).
    key = _mix(torch.full_like(examples, seed & _MASK32))
    key = _mix(key ^ (examples & _MASK32))
    return _mix(key ^ (copies & _MASK32))


def uniform(keys: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n) float32 draws in (-1, 1), a row per key."""
    counters = _mix(torch.arange(n, device=keys.device) + 0x9E3779B9)
    bits = _mix(keys[:, None] ^ counters[None, :])
    return ((bits.double() + 0.5) / 2**31 - 1.0).float()


@dataclass(frozen=True)
class CopyStyle:
    """What a copy is: its kind and a strength that scales every magnitude of it (1 = the constants above)."""

    kind: str = "elastic"
    strength: float = 1.0

    def __post_init__(self):
        if self.kind not in COPY_KINDS:
            raise ValueError(f"unknown copy kind {self.kind!r}: choose one of {', '.join(COPY_KINDS)}")
        if not self.strength > 0:
            raise ValueError(f"copy strength must be > 0, got {self.strength}")

    @classmethod
    def of(cls, values) -> CopyStyle:
        """The style a config or a memory source records (one written before styles existed: the default)."""
        get = values.get if isinstance(values, dict) else lambda key, default: getattr(values, key, default)
        return cls(get("copy_kind", "elastic"), float(get("copy_strength", 1.0)))


ELASTIC = CopyStyle()


def deform(images: torch.Tensor, examples: torch.Tensor, copies: torch.Tensor, seed: int,
           style: CopyStyle = ELASTIC) -> torch.Tensor:
    """Copy `copies[i]` of image `examples[i]` for each uint8 image (B, C, H, W); copy 0 is the image itself."""
    out = images.clone()
    moved = (copies > 0).nonzero().squeeze(1)
    if len(moved) == 0:
        return out
    keys = copy_keys(seed, examples[moved], copies[moved]).to(images.device)
    if style.kind == "crop-flip":
        out[moved] = _crop_flip(images[moved], keys, copies[moved].to(images.device), style.strength)
        return out
    x = images[moved].float()
    b, _, h, w = x.shape
    knots = 1 + math.ceil(1 / ELASTIC_SPACING)  # per axis, corners included
    draws = uniform(keys, 4 + 2 * knots * knots) * style.strength
    # Affine: theta maps output to input coordinates in [-1, 1] units (affine_grid's convention).
    angle = draws[:, 0] * math.radians(MAX_ROTATION_DEG)
    scale = 1.0 + draws[:, 1] * MAX_SCALE
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    shift = draws[:, 2:4] * (2 * MAX_SHIFT)
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False)
    # Elastic: knots upsampled by torchvision in one call for every copy (its elastic and affine kernels take
    # one transform per call, so the per-copy grid is built and sampled here). Grid units: 2 is the side.
    knot_shift = draws[:, 4:].view(b, 2, knots, knots) * (2 * ELASTIC_SHIFT)
    field = TF.resize(knot_shift, [h, w], interpolation=InterpolationMode.BICUBIC, antialias=False)
    grid = grid + field.permute(0, 2, 3, 1)
    # Border padding: a natural image's edge continues; a digit's background is already 0.
    warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    out[moved] = warped.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _crop_flip(x: torch.Tensor, keys: torch.Tensor, copies: torch.Tensor, strength: float) -> torch.Tensor:
    """Odd copies mirrored; each shifted by a seeded (dy, dx) of up to CROP_PAD * strength pixels, border reflected."""
    _, _, h, w = x.shape
    pad = min(round(CROP_PAD * strength), h - 1, w - 1)
    dy, dx = ((uniform(keys, 2) + 1) / 2 * (2 * pad + 1)).floor().long().clamp_(max=2 * pad).sub_(pad).split(1, 1)
    # Mirror by copy number, not by a draw: two copies an image are the image and its mirror, as a flip needs.
    return shift_flip(x, dy, dx, (copies % 2 == 1)[:, None])


def cell_images(images: torch.Tensor, cells: torch.Tensor, seed: int, style: CopyStyle = ELASTIC) -> torch.Tensor:
    """The pixels of memory cells of an expanded memory over `images` (N originals): source cell % N, copy cell // N."""
    n = len(images)
    cells = cells.to(images.device)
    examples = cells % n
    return deform(images[examples], examples, cells // n, seed, style)


@torch.no_grad()
def encode_cells(encoder: nn.Module, images: torch.Tensor, copies: int, seed: int, batch_size: int,
                 start: int = 0, desc: str = "memory", style: CopyStyle = ELASTIC) -> torch.Tensor:
    """Embeddings of cells start .. copies * N - 1 of the expanded memory, in eval mode, generated batch by batch."""
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    batch_size = encode_batch(batch_size, device)
    total = copies * len(images)
    if not 0 <= start < total:
        raise ValueError(f"cells {start}.. are not in a memory of {total} cells")
    out = None  # filled in place: a list of chunks and a cat would hold the memory twice at its largest
    for i in tqdm(range(start, total, batch_size), desc=desc, leave=False, unit="batch"):
        cells = torch.arange(i, min(i + batch_size, total), device=images.device)
        u = encoder(cell_images(images, cells, seed, style).to(device))
        if out is None:
            out = u.new_empty(total - start, u.shape[1])
        out[i - start : i - start + len(u)] = u
    encoder.train(was_training)
    return out

