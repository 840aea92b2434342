"""Patch grids: layout, white gaps, caption strip, all-or-nothing PNG write."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from meddiff.grids import grid, save_grid, slug


def test_grid_places_patches_in_rows_with_white_gaps():
    images = np.stack([np.full((4, 6, 3), 10 * (i + 1), np.uint8) for i in range(7)])
    out = np.asarray(grid(images, cols=3, pad=2))
    assert out.shape == (3 * (4 + 2) + 2, 3 * (6 + 2) + 2, 3)
    assert (out[2:6, 2:8] == 10).all() and (out[8:12, 2:8] == 40).all()  # row 2 starts with #4
    assert (out[:2] == 255).all() and (out[-8:, 10:] == 255).all()  # gaps and empty cells
    captioned = np.asarray(grid(images, caption="a prompt", cols=3, pad=2))
    assert captioned.shape[0] == out.shape[0] + 14 and (captioned[:14] < 255).any()


def test_save_grid_and_slug(tmp_path: Path):
    images = np.zeros((4, 8, 8, 3), np.uint8)
    path = save_grid(tmp_path / "g" / "x.png", images, "cap")
    assert Image.open(path).size == (2 * 10 + 2, 14 + 2 * 10 + 2)
    assert [p.name for p in path.parent.iterdir()] == ["x.png"]
    assert slug("Histology image of CANCER tissue!") == "histology-image-of-cancer-tissue"
    assert slug("???") == "empty"
