"""Image grids shared by commands, the demo and reports."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw


def make_grid(images: Sequence[Image.Image], cols: int | None = None, labels: Sequence[str] | None = None,
              pad: int = 2, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Tile images into one picture; optional labels are drawn under each tile."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    label_h = 12 if labels else 0
    grid = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad + label_h) + pad), background)
    draw = ImageDraw.Draw(grid)
    for k, img in enumerate(images):
        r, c = divmod(k, cols)
        x, y = pad + c * (w + pad), pad + r * (h + pad + label_h)
        grid.paste(img.convert("RGB").resize((w, h)), (x, y))
        if labels:
            draw.text((x + 1, y + h), str(labels[k])[: max(1, w // 6)], fill=(0, 0, 0))
    return grid
