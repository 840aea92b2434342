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


def sample_wsi(
    out_dir: str | Path,
    *,
    width: int = 4096,
    height: int = 3072,
    magnification: float = 20.0,
    seed: int = 0,
    name: str = "sample_slide.svs",
) -> Path:
    """Write a pyramidal whole-slide TIFF (SVS layout) of real tissue; returns its path.

    The canvas is a patchwork of scikit-image's IHC tissue (irregular cells, each a randomly
    rotated, flipped and shifted view of the mirror-extended image) out to ``width`` × ``height``,
    with a smooth random variation of stain intensity and hue so no two regions are identical,
    laid inside irregular tissue fragments on near-white glass. Level 0 is ``magnification`` (pixel size 10/magnification µm, so 20x is
    0.5 µm/px); the pyramid halves down to about 256 px.
    """
    from meddiff.data.wsi import write_pyramid_tiff

    if width < 512 or height < 512:
        raise DataError(f"sample slide must be at least 512x512 px, got {width}x{height}")
    rng = np.random.default_rng(seed)
    tissue = _patchwork_texture(ihc_tissue(), width, height, rng)
    alpha = _tissue_shape(width, height, rng)
    glass = np.array([238.0, 236.0, 240.0], dtype=np.float32)
    rgb = np.empty((height, width, 3), dtype=np.uint8)
    fields = _stain_fields(width, height, seed)
    band = 512  # rows per step (a multiple of 8): bounded float memory for slide-sized canvases
    for y0 in range(0, height, band):
        y1 = min(height, y0 + band)
        t = _stain_jitter(tissue[y0:y1], y0, fields)
        a = alpha[y0:y1, :, None]
        noise = rng.normal(0.0, 1.5, size=(y1 - y0, width, 1)).astype(np.float32)
        rgb[y0:y1] = np.clip(a * t + (1 - a) * (glass + noise), 0, 255).round().astype(np.uint8)
    return write_pyramid_tiff(
        Path(out_dir) / name,
        rgb,
        mpp=10.0 / magnification,
        magnification=magnification,
        title="meddiff sample slide (scikit-image IHC tissue)",
    )


def _patchwork_texture(
    tile: np.ndarray, width: int, height: int, rng: np.random.Generator
) -> np.ndarray:
    """A canvas of the tissue tile in irregular cells (jittered Voronoi, ~300 px), each cell a
    random rotation, flip and offset of the mirror-extended tile: no visible periodicity."""
    from scipy.spatial import cKDTree

    spacing = 300
    gy, gx = np.mgrid[0 : height + spacing : spacing, 0 : width + spacing : spacing]
    seeds = np.stack([gy.ravel(), gx.ravel()], axis=1).astype(np.float64)
    seeds += rng.uniform(-0.4, 0.4, size=seeds.shape) * spacing
    # Cell labels at 1/4 resolution (nearest seed), upsampled: 4-px steps along the seams.
    q = 4
    cy, cx = np.mgrid[0 : -(-height // q), 0 : -(-width // q)]
    _, cell = cKDTree(seeds).query(np.stack([cy.ravel() * q, cx.ravel() * q], axis=1))
    cell = cell.reshape(cy.shape).repeat(q, 0).repeat(q, 1)[:height, :width]
    # Mirror-extend the tile so any offset window inside a cell stays on real tissue.
    ext = np.pad(tile, ((spacing * 2,) * 2, (spacing * 2,) * 2, (0, 0)), mode="symmetric")
    views = [np.rot90(ext, k) for k in range(4)]
    views += [v[:, ::-1] for v in views]
    out = np.empty((height, width, 3), dtype=np.uint8)
    ys, xs = np.indices((height, width), dtype=np.int32)
    order = np.argsort(cell, axis=None, kind="stable")
    bounds = np.searchsorted(cell.ravel()[order], np.arange(len(seeds) + 1))
    for k in range(len(seeds)):
        idx = order[bounds[k] : bounds[k + 1]]
        if idx.size == 0:
            continue
        view = views[int(rng.integers(len(views)))]
        py, px = ys.ravel()[idx], xs.ravel()[idx]
        # Shift so the cell's pixels land inside the extended view.
        oy = int(rng.integers(0, view.shape[0] - (py.max() - py.min()) - 1)) - int(py.min())
        ox = int(rng.integers(0, view.shape[1] - (px.max() - px.min()) - 1)) - int(px.min())
        out.reshape(-1, 3)[idx] = view[py + oy, px + ox]
    return out


def _smooth_field(shape: tuple[int, int], cells: tuple[int, int], seed: int) -> np.ndarray:
    """A smooth random field in [-1, 1] of ``shape``, varying over about ``cells`` periods."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    coarse = ndimage.gaussian_filter(rng.standard_normal((cells[0] + 4, cells[1] + 4)), 1.0)
    coarse /= np.abs(coarse).max() + 1e-9
    zoom = (shape[0] / cells[0], shape[1] / cells[1])
    full = ndimage.zoom(coarse, zoom, order=3)
    oy = (full.shape[0] - shape[0]) // 2
    ox = (full.shape[1] - shape[1]) // 2
    return np.clip(full[oy : oy + shape[0], ox : ox + shape[1]], -1, 1).astype(np.float32)


def _tissue_shape(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Soft tissue mask float32 (H, W) in [0, 1]: irregular fragments covering about half."""
    small = (max(8, height // 64), max(8, width // 64))
    yy, xx = np.mgrid[0 : small[0], 0 : small[1]].astype(np.float32)
    cy, cx = small[0] / 2, small[1] / 2
    prior = 1 - np.hypot((yy - cy) / (0.48 * small[0]), (xx - cx) / (0.48 * small[1]))
    noise = _smooth_field(small, (6, 8), int(rng.integers(2**31)))
    field = prior + 0.6 * noise
    level = np.quantile(field, 0.5)
    from scipy import ndimage

    soft = np.clip((field - level) * 6.0, 0, 1)
    full = ndimage.zoom(soft, (height / small[0], width / small[1]), order=1)
    out = np.zeros((height, width), dtype=np.float32)
    out[: full.shape[0], : full.shape[1]] = full[:height, :width]
    return out


def _stain_fields(width: int, height: int, seed: int) -> np.ndarray:
    """Four smooth fields in [-1, 1] at 1/8 resolution, float32 (4, ceil(H/8), ceil(W/8))."""
    shape = (-(-height // 8), -(-width // 8))
    cells = (max(2, height // 700), max(2, width // 700))
    return np.stack([_smooth_field(shape, cells, seed + 101 + i) for i in range(4)])


def _stain_jitter(band: np.ndarray, y0: int, fields: np.ndarray) -> np.ndarray:
    """Vary stain intensity (±20%) and per-channel optical density (±8%) smoothly over the slide."""
    h, w = band.shape[:2]
    rows = fields[:, y0 // 8 : -(-(y0 + h) // 8)]
    # Nearest upsampling of a field that changes over ~700 px: steps far below one grey level.
    full = rows.repeat(8, axis=1).repeat(8, axis=2)[:, y0 % 8 : y0 % 8 + h, :w]
    od = -np.log((band.astype(np.float32) + 1.0) / 256.0)
    od *= (1.0 + 0.2 * full[0])[..., None]
    for c in range(3):
        od[..., c] *= 1.0 + 0.08 * full[c + 1]
    return 256.0 * np.exp(-od) - 1.0
