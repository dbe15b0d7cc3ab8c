"""Pictures of a run: the confusion matrix, and a query beside the cells a prediction read."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import make_grid

TILE = 64  # pixels a side for each image in a neighbour grid: MNIST's 28 and CIFAR's 32 scale up cleanly
CAPTION = 18  # pixels of text under each tile, a line each


def confusion_figure(confusion: torch.Tensor, classes: list[str]):
    """The confusion matrix as scikit-learn's ConfusionMatrixDisplay draws one: true label down, predicted label
    across, whole class names, each cell's count written in it, shaded by its share of its true class (so rare
    classes show too) beside a colour scale. matplotlib (the dev extra) draws it."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("drawing the confusion matrix needs matplotlib: pip install matplotlib") from None
    n = len(classes)
    share = (confusion.float() / confusion.sum(1, keepdim=True).clamp_min(1)).numpy()
    side = max(4.0, 0.45 * n + 2)
    fig, ax = plt.subplots(figsize=(side + 1.5, side), layout="constrained")
    shown = ax.imshow(share, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(shown, ax=ax, label="share of the true class")
    if n <= 40:  # past that, counts would not fit their cells
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center", fontsize=8,
                        color="black" if share[i, j] > 0.5 else "white")
    ax.set(xticks=range(n), yticks=range(n), xlabel="Predicted label", ylabel="True label")
    ax.set_xticklabels(classes, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticklabels(classes)
    return fig


def confusion_png(confusion: torch.Tensor, classes: list[str], path: str | Path) -> None:
    """Rows are true classes, columns predicted ones (confusion_figure), as a PNG."""
    import matplotlib.pyplot as plt

    fig = confusion_figure(confusion, classes)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")  # tight: no class name cut at the edge
    plt.close(fig)


def neighbour_grid(query: torch.Tensor, neighbours: list[torch.Tensor | None], captions: list[str],
                   path: str | Path) -> None:
    """One row: the query (uint8 C,H,W), then each neighbour's image and caption; a neighbour whose image cannot
    be reached now (None) is a white tile crossed out, captioned as missing, never a blank that looks like data."""
    missing = torch.full_like(query, 255)
    diagonal = torch.arange(min(query.shape[1:]))
    missing[:, diagonal, diagonal] = missing[:, diagonal, diagonal.flip(0)] = 0
    tiles = [query, *[missing if n is None else n for n in neighbours]]
    captions = [f"{text}\nnot found" if n is None else text for n, text in zip(neighbours, captions, strict=True)]
    tiles = [TF.resize(t.expand(3, -1, -1), [TILE, TILE], antialias=True) for t in tiles]
    grid = make_grid(torch.stack(tiles), nrow=len(tiles), padding=4, pad_value=255)
    strip = Image.fromarray(grid.permute(1, 2, 0).numpy())
    image = Image.new("RGB", (strip.width, strip.height + CAPTION * 3), "white")
    image.paste(strip, (0, 0))
    draw = ImageDraw.Draw(image)
    for i, text in enumerate(["query", *captions]):
        x = 4 + i * (TILE + 4)
        for line, part in enumerate(text.split("\n")[:3]):
            draw.text((x, strip.height + 2 + line * 12), part[:10], fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
