"""The quick start's images (`sam-cls examples`): two test digits, and crosses drawn as a new class to add.

digit0.png and digit1.png are mnist-mini's first two test images (a 7 and a 2); letters/x/ holds 20 crosses and
more-x/ 5 others, each drawn white on black as MNIST's digits are, from its own seed, so every copy is the same.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

from sam_cls.data import load_dataset

SIZE = 28  # MNIST's side
DRAW = 4  # drawn at 4x and reduced, so strokes have MNIST's soft edges


def cross(seed: int) -> Image.Image:
    """A hand-drawn-looking 'x': two strokes with jittered ends and width, white on black, 28 x 28 grey."""
    rng = random.Random(seed)
    big = Image.new("L", (SIZE * DRAW, SIZE * DRAW), 0)
    draw = ImageDraw.Draw(big)
    lo, hi = 6 * DRAW, 22 * DRAW

    def jitter() -> int:
        return rng.randint(-3 * DRAW, 3 * DRAW)

    width = rng.randint(2 * DRAW, 3 * DRAW)
    draw.line([(lo + jitter(), lo + jitter()), (hi + jitter(), hi + jitter())], fill=255, width=width)
    draw.line([(hi + jitter(), lo + jitter()), (lo + jitter(), hi + jitter())], fill=255, width=width)
    return big.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def write_examples(folder: str | Path) -> list[Path]:
    """Write digit0.png, digit1.png, letters/x/00-19.png and more-x/00-04.png into folder; returns the paths."""
    root = Path(folder)
    test_x = load_dataset("mnist-mini", log=lambda _: None).test_x
    images = {root / f"digit{i}.png": Image.fromarray(test_x[i, 0].numpy()) for i in range(2)}
    images |= {root / "letters" / "x" / f"{i:02d}.png": cross(i) for i in range(20)}
    images |= {root / "more-x" / f"{i:02d}.png": cross(1000 + i) for i in range(5)}
    for path, image in images.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    return list(images)
