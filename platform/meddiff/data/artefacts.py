"""Slide artefacts that are not tissue: marker ink, folds, air bubbles and glass edges.

Two places use these tests: whole-slide tissue detection (:func:`mask_artefacts`, on the
low-resolution tissue mask of :mod:`meddiff.data.wsi`) and the patch quality filter
(:func:`patch_artefacts`, on full-resolution patches in :mod:`meddiff.morphology.quality`).
Out-of-focus patches are the quality filter's ``blurry`` test (variance of the Laplacian).

Everything works in optical density (OD, Beer-Lambert: ``OD = -ln(I / 255)`` per RGB channel),
where stains and ink layers add. Facts the tests rest on:

- **Stain colours.** The stain vectors of Ruifrok & Johnston (2001, *Anal. Quant. Cytol.
  Histol.* 23:291; ``skimage.color.rgb_from_hed``): hematoxylin (0.65, 0.70, 0.29), eosin (0.07,
  0.99, 0.11), DAB (0.27, 0.57, 0.78). Each absorbs green at least as much as red, so no
  non-negative mixture of them absorbs red more than green (``OD_R > OD_G``): blue, cyan, green,
  blue-black inks do. Nor does one absorb green and blue but not red with blue close to green
  (eosin leaves blue through, DAB absorbs red too): red and orange inks do. Measured on
  scikit-image's IHC tissue, local OD ratios reach R/G 1.13 only in pale (OD < 0.6) areas, so the
  colour test needs a dense floor.
- **Ink is a film.** Marker ink lies on the coverslip, over everything: a stroke adds its OD to
  every pixel below it, so it raises the *floor* (the minimum density over a neighbourhood): a
  section always has pale gaps (stroma, lumen, glass) within ~20 µm, a stroke does not. Dense ink
  also flattens the image (transmittances multiply, so contrast shrinks with the light that gets
  through): dense and untextured is ink, dense and textured is stained tissue or a fold. Blur
  flattens too, but it removes edges *relative* to brightness, which a film keeps (it scales
  both): a flat area whose relative edge strength is that of focused tissue is ink.
- **Folds** are the section lying over itself: two layers, about twice the OD of the tissue
  around, still textured and stain-coloured.
- **Bubbles and glass edges**: empty glass (bright, unstained) bounded by a thin, sharp, grey
  line (light refracted away), not by stained tissue.

Thresholds were set on scikit-image's IHC tissue (the sample slide, sample PCam patches) with
painted artefacts (:mod:`meddiff.data.samples`); ``benchmarks/slide_artefacts.py`` prints the
detection and false-positive rates they give. Stain-coloured inks (violet ~ hematoxylin, brown ~
DAB, pink ~ eosin) are found only where dense enough to flatten the image.
"""

from __future__ import annotations

import numpy as np

KINDS = ("ink", "fold", "bubble")

# Patch scale (about 1 µm per pixel, PCam's 10x): window edges in pixels.
SMOOTH = 7  # box filter before OD: nuclei-scale noise out of the colour ratios
FLOOR_WINDOW = 21  # a section has a pale gap within this
TEXTURE_WINDOW = 15
INK_COLOUR_FLOOR = 0.6  # OD floor above which a non-stain colour is ink, not pale noise
INK_DENSE_FLOOR = 1.0  # OD floor of a dense film
INK_FLAT_STD = 6.0  # grey-level std (0-255) below which a dense area is untextured
# ... unless it is out of focus: mean |Laplacian| / mean grey level, which a film over tissue keeps
# (it scales both) and blur removes (sample tissue: median 0.15 sharp, below 0.023 at sigma 2 px).
SHARP_RELATIVE = 0.03
INK_NEUTRAL_SATURATION = 0.25  # dense and this grey: black or grey ink
FOLD_FLOOR = 1.4  # OD floor of a double layer of the sample tissue (single: median 0.35)
GLASS_DENSITY = 0.12  # OD below this (grey above ~226 of 255) is empty glass
RIM_SATURATION = 0.15  # a bubble's rim is grey: light refracted away, not stain
RIM_CONTRAST = 40.0  # ... and darker than the glass beside it by this many grey levels
# Slide thumbnails (area averages, then 3x3 means): mixtures of brown DAB and blue hematoxylin
# average to greyish browns (saturation ~0.2, OD ~1.1 on the sample slide), bluish hematoxylin
# areas to R/G just above 1 at OD below 1; strokes at 60% ink density are above 1.07.
MASK_COLOUR_DENSITY = 1.0
MASK_NEUTRAL_DENSITY = 1.3
MASK_NEUTRAL_SATURATION = 0.12


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """OD float32 (..., 3) of RGB (..., 3) on the 0-255 scale: ``-ln(max(I, 1) / 255)``."""
    return -np.log(np.maximum(np.asarray(rgb, np.float32), 1.0) / 255.0)


def _norm(od: np.ndarray) -> np.ndarray:
    """Euclidean length of OD vectors (..., 3): the total density."""
    return np.sqrt(np.einsum("...i,...i->...", od, od))


def _box(x: np.ndarray, size: int, spatial: tuple[int, int]) -> np.ndarray:
    """Mean over ``size`` × ``size`` windows of the two ``spatial`` axes (reflected borders)."""
    from scipy import ndimage

    window = [1] * x.ndim
    for axis in spatial:
        window[axis] = size
    return ndimage.uniform_filter(x, tuple(window), mode="reflect")


def non_stain_colour(od: np.ndarray) -> np.ndarray:
    """Whether OD vectors (..., 3) have a colour no H, E or DAB mixture has: red absorbed more
    than green (blue, cyan, green, blue-black inks), or green and blue absorbed but not red, with
    blue at least 0.75 of green (red, orange inks)."""
    r, g, b = od[..., 0], od[..., 1], od[..., 2]
    g = np.maximum(g, 1e-3)
    return (r > g) | ((r < 0.45 * g) & (b > 0.75 * g))


def patch_artefact_pixels(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per-pixel artefact masks bool (n, H, W) of uint8 RGB patches (n, H, W, 3) at ~10x:
    ``ink``, ``fold`` (a dense, sharp floor: a double layer, or dense ink, which ``ink`` tells
    apart),
    ``glass`` and ``rim`` (bubble/glass-edge line).
    """
    from scipy import ndimage

    x = _box(images.astype(np.float32), SMOOTH, (1, 2))
    od = optical_density(x)
    density = _norm(od)
    floor = ndimage.minimum_filter(density, (1, FLOOR_WINDOW, FLOOR_WINDOW), mode="reflect")
    grey = images.astype(np.float32).mean(axis=-1)
    mean = _box(grey, TEXTURE_WINDOW, (1, 2))
    std = np.sqrt(np.maximum(_box(grey * grey, TEXTURE_WINDOW, (1, 2)) - mean * mean, 0.0))
    g = np.pad(grey, ((0, 0), (1, 1), (1, 1)), mode="reflect")
    lap = g[:, :-2, 1:-1] + g[:, 2:, 1:-1] + g[:, 1:-1, :-2] + g[:, 1:-1, 2:] - 4 * grey
    sharp = _box(np.abs(lap), TEXTURE_WINDOW, (1, 2)) / np.maximum(mean, 1.0)

    top, low = x.max(axis=-1), x.min(axis=-1)
    saturation = (top - low) / np.maximum(top, 1.0)
    dense = floor > INK_DENSE_FLOOR
    ink = (
        (non_stain_colour(od) & (floor > INK_COLOUR_FLOOR))
        | (dense & (std < INK_FLAT_STD) & (sharp >= SHARP_RELATIVE))
        | (dense & (saturation < INK_NEUTRAL_SATURATION))
    )
    glass = density < GLASS_DENSITY
    # A rim: grey, much darker than the brightest glass nearby, next to glass.
    small = _box(images.astype(np.float32), 3, (1, 2))
    small_top = small.max(axis=-1)
    small_sat = (small_top - small.min(axis=-1)) / np.maximum(small_top, 1.0)
    bright = ndimage.maximum_filter(small_top, (1, 9, 9), mode="reflect")
    near_glass = ndimage.maximum_filter(glass.view(np.uint8), (1, 9, 9), mode="constant") > 0
    rim = (small_sat < RIM_SATURATION) & (bright - small_top > RIM_CONTRAST) & near_glass
    fold = (floor > FOLD_FLOOR) & (sharp >= SHARP_RELATIVE)  # blurred dense tissue is "blurry"
    return {"ink": ink, "fold": fold, "glass": glass, "rim": rim}


def patch_artefacts(
    images: np.ndarray,
    *,
    max_ink_fraction: float | None = 0.25,
    max_fold_fraction: float | None = 0.4,
    min_rim_pixels: int | None = 96,
    min_glass_fraction: float = 0.1,
) -> np.ndarray:
    """The artefact of each uint8 RGB patch (n, H, W, 3): object array (n,) of "ink", "fold",
    "bubble" or "" (none), in that order of precedence.

    ``ink``: more than ``max_ink_fraction`` of the pixels are ink; ``fold`` (not ink): more than
    ``max_fold_fraction`` have a dense floor (a double layer); ``bubble``: at
    least ``min_glass_fraction`` empty glass and ``min_rim_pixels`` pixels of a thin grey line (a
    bubble's rim or a coverslip edge; about one patch edge's length). None disables a test.
    """
    n = len(images)
    out = np.full(n, "", dtype=object)
    if n == 0 or (max_ink_fraction, max_fold_fraction, min_rim_pixels) == (None, None, None):
        return out
    px = patch_artefact_pixels(images)
    frac = {k: v.reshape(n, -1).mean(axis=1) for k, v in px.items()}
    tests = []
    if max_ink_fraction is not None:
        tests.append(("ink", frac["ink"] > max_ink_fraction))
    if max_fold_fraction is not None:
        tests.append(("fold", frac["fold"] > max_fold_fraction))
    if min_rim_pixels is not None:
        rims = px["rim"].reshape(n, -1).sum(axis=1)
        tests.append(("bubble", (frac["glass"] >= min_glass_fraction) & (rims >= min_rim_pixels)))
    for name, hit in reversed(tests):  # the first kind in KINDS wins
        out[hit] = name
    return out


def mask_artefacts(thumb: np.ndarray) -> np.ndarray:
    """Marker ink bool (h, w) on a slide's low-resolution RGB thumbnail (h, w, 3), whose pixels
    are area averages over ~10-20 µm: a non-stain colour with OD above ``MASK_COLOUR_DENSITY``,
    or OD above ``MASK_NEUTRAL_DENSITY`` and grey (black ink over pale tissue or glass).

    Averages blur texture away, so folds, focus and bubbles are left to the patch filter. The
    thumbnail is averaged over 3×3 pixels first and specks under 2×2 pixels are dropped, so the
    result barely depends on the mask resolution.
    """
    from scipy import ndimage

    x = _box(thumb.astype(np.float32), 3, (0, 1))
    od = optical_density(x)
    density = _norm(od)
    top = x.max(axis=-1)
    saturation = (top - x.min(axis=-1)) / np.maximum(top, 1.0)
    colour = non_stain_colour(od) & (density > MASK_COLOUR_DENSITY)
    grey = (density > MASK_NEUTRAL_DENSITY) & (saturation < MASK_NEUTRAL_SATURATION)
    return ndimage.binary_opening(colour | grey, np.ones((2, 2), bool))
