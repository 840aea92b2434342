"""Real sample data, built offline from images bundled in installed packages.

There is no bundled PCam, so ``sample_pcam`` cuts PCam-format patches from scikit-image's real
immunohistochemistry image of colon tissue (DAB + hematoxylin). The label is content-based, as in
PCam: 1 when the centre 32×32 region is DAB-positive (its mean DAB optical density, from
``skimage.color.rgb2hed``, is above the median over all candidate patches, which balances classes).
Variety comes from random positions, 90° rotations, flips and a mild rescale.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meddiff.data.pcam import SPLITS, PCamWriter
from meddiff.errors import DataError


@dataclass(frozen=True)
class SampleSizes:
    train: int = 1024
    valid: int = 256
    test: int = 256


def ihc_tissue() -> np.ndarray:
    """scikit-image's 512×512 RGB immunohistochemistry image (uint8, H×W×3)."""
    from skimage import data

    return np.ascontiguousarray(data.immunohistochemistry())


def dab_density(rgb: np.ndarray) -> np.ndarray:
    """Per-pixel DAB optical density of uint8 RGB (H, W, 3) → float (H, W)."""
    from skimage.color import rgb2hed

    return rgb2hed(rgb)[..., 2]


def sample_pcam(
    out_dir: str | Path,
    sizes: SampleSizes = SampleSizes(),
    patch_size: int = 96,
    seed: int = 0,
) -> dict[str, dict[str, int]]:
    """Write train/valid/test splits in the PCam layout; returns per-split counts of each label."""
    if patch_size < 32:
        raise DataError(f"patch_size {patch_size} is too small; the centre region is 32×32")
    tissue = ihc_tissue()
    dab = dab_density(tissue)
    rng = np.random.default_rng(seed)
    # Threshold on the median centre DAB over many random positions, for balanced labels.
    probe = _centre_dab(dab, _positions(rng, 4096, tissue.shape[0], patch_size), patch_size)
    threshold = float(np.median(probe))
    counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        n = getattr(sizes, split)
        if n <= 0:
            continue
        images, labels = _patches(tissue, dab, n, patch_size, threshold, rng)
        with PCamWriter(out_dir, split, patch_size=patch_size) as writer:
            writer.write(images, labels)
        counts[split] = {"0": int((labels == 0).sum()), "1": int((labels == 1).sum())}
    return counts


def _positions(rng: np.random.Generator, n: int, size: int, patch: int) -> np.ndarray:
    return rng.integers(0, size - patch + 1, size=(n, 2))


def _centre_dab(dab: np.ndarray, pos: np.ndarray, patch: int) -> np.ndarray:
    c0 = patch // 2 - 16
    return np.array([dab[r + c0 : r + c0 + 32, c + c0 : c + c0 + 32].mean() for r, c in pos])


def _patches(
    tissue: np.ndarray,
    dab: np.ndarray,
    n: int,
    patch: int,
    threshold: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    from skimage.transform import resize

    images = np.empty((n, patch, patch, 3), dtype=np.uint8)
    labels = np.empty(n, dtype=np.uint8)
    for i in range(n):
        # Crop a slightly larger or smaller window and resize it: a mild zoom for variety.
        window = int(round(patch * rng.uniform(0.85, 1.2)))
        r, c = _positions(rng, 1, tissue.shape[0], window)[0]
        crop = tissue[r : r + window, c : c + window]
        crop_dab = dab[r : r + window, c : c + window]
        if window != patch:
            crop = (resize(crop, (patch, patch), order=1, anti_aliasing=True) * 255).round()
            crop_dab = resize(crop_dab, (patch, patch), order=1, anti_aliasing=False)
        k, flip = int(rng.integers(4)), bool(rng.integers(2))
        crop = np.rot90(crop, k)
        crop_dab = np.rot90(crop_dab, k)
        if flip:
            crop, crop_dab = crop[:, ::-1], crop_dab[:, ::-1]
        c0 = patch // 2 - 16
        labels[i] = crop_dab[c0 : c0 + 32, c0 : c0 + 32].mean() > threshold
        images[i] = np.clip(crop, 0, 255).astype(np.uint8)
    return images, labels
