"""Pictures of a run: the confusion matrix, and a query beside the cells a prediction read."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import make_grid

TILE = 64  # pixels a side for each image in a neighbour grid: MNIST's 28 and CIFAR's 32 scale up cleanly
CAPTION = 24  # pixels of text under each tile


def confusion_png(confusion: torch.Tensor, classes: list[str], path: str | Path, cell: int = 24) -> None:
    """Rows are true classes, columns predicted ones; each row shaded by its share, so rare classes show too."""
    share = confusion.float() / confusion.sum(1, keepdim=True).clamp_min(1)
    n, margin = len(classes), 8 * max(len(c) for c in classes) + 8
    image = Image.new("RGB", (margin + n * cell, margin + n * cell), "white")
    draw = ImageDraw.Draw(image)
    for i, name in enumerate(classes):
        draw.text((4, margin + i * cell + cell // 3), name, fill="black")  # true class, left
        draw.text((margin + i * cell + 2, 4 + (i % 2) * 10), name[:3], fill="black")  # predicted, top
        for j in range(n):
            shade = int(255 * (1 - share[i, j].item()))
            box = (margin + j * cell, margin + i * cell, margin + (j + 1) * cell - 1, margin + (i + 1) * cell - 1)
            draw.rectangle(box, fill=(shade, shade, 255))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def neighbour_grid(query: torch.Tensor, neighbours: list[torch.Tensor | None], captions: list[str],
                   path: str | Path) -> None:
    """One row: the query (uint8 C,H,W), then each neighbour's image (None: not reachable now) and caption."""
    grey = torch.full_like(query, 128)
    tiles = [query, *[grey if n is None else n for n in neighbours]]
    tiles = [TF.resize(t.expand(3, -1, -1), [TILE, TILE], antialias=True) for t in tiles]
    grid = make_grid(torch.stack(tiles), nrow=len(tiles), padding=4, pad_value=255)
    strip = Image.fromarray(grid.permute(1, 2, 0).numpy())
    image = Image.new("RGB", (strip.width, strip.height + CAPTION * 2), "white")
    image.paste(strip, (0, 0))
    draw = ImageDraw.Draw(image)
    for i, text in enumerate(["query", *captions]):
        x = 4 + i * (TILE + 4)
        for line, part in enumerate(text.split("\n")[:2]):
            draw.text((x, strip.height + 2 + line * 12), part[:10], fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
