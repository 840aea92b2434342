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
    pen_strokes: int = 0,
) -> Path:
    """Write a pyramidal whole-slide TIFF (SVS layout) of real tissue; returns its path.

    The canvas is a patchwork of scikit-image's IHC tissue (irregular cells, each a randomly
    rotated, flipped and shifted view of the mirror-extended image) out to ``width`` × ``height``,
    with a smooth random variation of stain intensity and hue so no two regions are identical,
    laid inside irregular tissue fragments on near-white glass. Level 0 is ``magnification``
    (pixel size 10/magnification µm, so 20x is 0.5 µm/px); the pyramid halves down to about 256
    px. ``pen_strokes`` marker strokes (:func:`paint_pen_stroke`, inks in :data:`PEN_INKS` order,
    each an eighth of the shorter side wide) are drawn over it, as pathologists mark slides.
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
    inks = list(PEN_INKS.values())
    for i in range(pen_strokes):
        rgb, _ = paint_pen_stroke(rgb, inks[i % len(inks)], rng, width=min(width, height) / 8)
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


# --- slide artefacts (tests, benchmarks and the sample slide's artefact variant) --------------

# Marker inks as the transmittance of a dense stroke (RGB, 0-255): pathologists' pens.
PEN_INKS: dict[str, tuple[int, int, int]] = {
    "blue": (40, 70, 175),
    "green": (35, 140, 70),
    "black": (30, 30, 35),
    "red": (205, 35, 45),
    "navy": (25, 35, 95),
    "teal": (25, 135, 140),
    "violet": (110, 45, 155),
}


def _smooth_path(shape: tuple[int, int], rng: np.random.Generator, points: int = 4) -> np.ndarray:
    """A smooth random curve across ``shape``: a Bézier curve of ``points`` control points, as
    float (n, 2) row/column coordinates sampled every half pixel or finer."""
    from math import comb

    h, w = shape
    ctrl = rng.uniform([-0.1 * h, -0.1 * w], [1.1 * h, 1.1 * w], size=(points, 2))
    n = 4 * (h + w)
    t = np.linspace(0.0, 1.0, n)[:, None]
    deg = points - 1
    basis = [comb(deg, k) * t**k * (1 - t) ** (deg - k) for k in range(points)]
    return sum(b * c for b, c in zip(basis, ctrl, strict=True))


def _distance_to(path: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Euclidean distance float32 (H, W) of every pixel to the nearest point of ``path``."""
    from scipy import ndimage

    on = np.zeros(shape, bool)
    rc = np.round(path).astype(int)
    inside = (rc[:, 0] >= 0) & (rc[:, 0] < shape[0]) & (rc[:, 1] >= 0) & (rc[:, 1] < shape[1])
    on[rc[inside, 0], rc[inside, 1]] = True
    if not on.any():
        return np.full(shape, np.inf, np.float32)
    return ndimage.distance_transform_edt(~on).astype(np.float32)


def paint_pen_stroke(
    rgb: np.ndarray,
    ink: tuple[int, int, int],
    rng: np.random.Generator,
    *,
    width: float = 60.0,
    density: float = 0.85,
    edge: float = 3.0,
) -> tuple[np.ndarray, np.ndarray]:
    """A marker stroke on uint8 RGB (H, W, 3): a smooth curve ``width`` px wide whose ink layer
    transmits ``ink`` (RGB 0-255) where dense. Returns the painted image and the ink coverage
    float32 (H, W) in [0, 1].

    The ink lies on the coverslip, over the tissue: light passes both, so transmittances multiply
    (Beer-Lambert), ``out = rgb * (1 - a + a * ink / 255)`` with coverage ``a`` up to ``density``,
    soft edges ``edge`` px wide (a felt tip, slightly out of focus) and ±10% streaks along it.
    """
    h, w = rgb.shape[:2]
    dist = _distance_to(_smooth_path((h, w), rng), (h, w))
    cover = np.clip((width / 2 - dist) / max(edge, 1e-3) + 0.5, 0.0, 1.0)
    streaks = 1.0 + 0.1 * _smooth_field(
        (h, w), (max(2, h // 40), max(2, w // 40)), int(rng.integers(2**31))
    )
    a = np.clip(cover * density * streaks, 0.0, 1.0)[..., None]
    t = np.asarray(ink, np.float32) / 255.0
    out = rgb.astype(np.float32) * (1.0 - a + a * t)
    return np.clip(out, 0, 255).round().astype(np.uint8), cover.astype(np.float32)


def paint_fold(
    rgb: np.ndarray, rng: np.random.Generator, *, width: float = 80.0
) -> tuple[np.ndarray, np.ndarray]:
    """A tissue fold on uint8 RGB (H, W, 3): along a smooth curve, a band ``width`` px wide where
    the section lies over itself (a mirrored copy of the neighbouring tissue: two layers, so
    transmittances multiply: darker and more saturated), with a dark crease at its edge.
    Returns the image and the fold's mask float32 (H, W) in [0, 1]."""
    h, w = rgb.shape[:2]
    dist = _distance_to(_smooth_path((h, w), rng, points=3), (h, w))
    band = np.clip((width / 2 - dist) / 2.0 + 0.5, 0.0, 1.0)
    # The flipped-over layer: the same tissue, mirrored and displaced.
    over = np.roll(rgb[::-1, ::-1].astype(np.float32), (7, -5), axis=(0, 1))
    t = rgb.astype(np.float32) / 255.0
    two = t * (over / 255.0)
    crease = np.exp(-(((dist - width / 2) / 2.5) ** 2)) * 0.5
    out = (t * (1 - band[..., None]) + two * band[..., None]) * (1 - crease[..., None])
    return np.clip(out * 255, 0, 255).round().astype(np.uint8), band.astype(np.float32)


def blur_region(
    rgb: np.ndarray, rng: np.random.Generator, *, sigma: float = 3.0, radius: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """An out-of-focus patch of uint8 RGB (H, W, 3): Gaussian blur of ``sigma`` px inside a soft
    ellipse (radius ``radius`` px, default a third of the image), as a region where the scanner's
    focus missed the section. Returns the image and the blurred region's weight float32 (H, W)."""
    from scipy import ndimage

    h, w = rgb.shape[:2]
    r = radius or min(h, w) / 3
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    yy, xx = np.mgrid[0:h, 0:w]
    d = np.hypot((yy - cy) / 1.3, xx - cx)
    weight = np.clip((r - d) / (0.2 * r) + 0.5, 0.0, 1.0).astype(np.float32)
    blurred = ndimage.gaussian_filter(rgb.astype(np.float32), (sigma, sigma, 0))
    out = rgb * (1 - weight[..., None]) + blurred * weight[..., None]
    return np.clip(out, 0, 255).round().astype(np.uint8), weight


def paint_bubble(
    rgb: np.ndarray,
    rng: np.random.Generator,
    *,
    radius: float,
    centre: tuple[float, float] | None = None,
    glass: tuple[int, int, int] = (238, 236, 240),
) -> tuple[np.ndarray, np.ndarray]:
    """An air bubble under the coverslip on uint8 RGB (H, W, 3): an empty (glass-coloured)
    disc of ``radius`` px whose edge refracts light away, a sharp dark rim ~3 px wide with a
    bright halo just inside. A centre outside the image gives a straight-ish glass edge.
    Returns the image and the disc's mask float32 (H, W)."""
    h, w = rgb.shape[:2]
    cy, cx = centre if centre is not None else (rng.uniform(0, h), rng.uniform(0, w))
    yy, xx = np.mgrid[0:h, 0:w]
    d = np.hypot(yy - cy, xx - cx) - radius  # < 0 inside
    inside = np.clip(-d / 1.0 + 0.5, 0.0, 1.0)[..., None]
    noise = rng.normal(0.0, 1.5, size=(h, w, 1))
    empty = np.asarray(glass, np.float32) + noise
    out = rgb.astype(np.float32) * (1 - inside) + empty * inside
    rim = np.exp(-((d / 1.6) ** 2))[..., None]  # dark line on the edge
    halo = np.exp(-(((d + 4.0) / 1.5) ** 2))[..., None]  # bright line just inside
    out = out * (1 - 0.75 * rim) + (255.0 - out) * 0.6 * halo
    return np.clip(out, 0, 255).round().astype(np.uint8), inside[..., 0].astype(np.float32)
