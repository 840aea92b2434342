"""PNG grids of image patches, with an optional caption above them (for people to look at)."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np


def grid(images: np.ndarray, caption: str | None = None, cols: int | None = None, pad: int = 2):
    """uint8 (n, H, W, 3) → a PIL image of the patches in rows, with an optional caption strip."""
    from PIL import Image, ImageDraw

    n, h, w, _ = images.shape
    cols = cols or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    top = 14 if caption else 0
    canvas = Image.new(
        "RGB", (cols * (w + pad) + pad, top + rows * (h + pad) + pad), (255, 255, 255)
    )
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        canvas.paste(Image.fromarray(img), (pad + c * (w + pad), top + pad + r * (h + pad)))
    if caption:
        ImageDraw.Draw(canvas).text((pad, 1), caption, fill=(0, 0, 0))
    return canvas


def save_grid(path: str | Path, images: np.ndarray, caption: str | None = None) -> Path:
    """Write a grid PNG (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}.png")
    grid(images, caption).save(tmp)
    os.replace(tmp, path)
    return path


def slug(text: str, limit: int = 60) -> str:
    """A file-name-safe form of a prompt."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "empty"
