"""Patch quality filter: flag slide artefacts, background, blurred and off-colour patches.

Slide artefacts (:mod:`meddiff.data.artefacts`): marker ``ink``, ``fold``s and ``bubble``s (or
coverslip edges), found on the patch itself (after ``dark``: a patch too dark to show tissue is
dark whatever darkened it), or given by whole-slide tissue detection in an ``artefact`` column
(slide tiles; it comes first). Then paper A's outlier tests: thresholds on HSV statistics, the
variance of the Laplacian (``blurry``: out of focus) and the number of contours (values in
:class:`meddiff.config.prompts.QualityConfig`). The features are
computed here for a whole batch: H, S, V and the grey image by PIL's "HSV" and "L" conversions
(0-255 scales, as the paper), the Laplacian with the 4-neighbour kernel and mirrored borders, and
contours as OpenCV's ``findContours(RETR_TREE)`` counts them on the thresholded grey image: one per
8-connected foreground component plus one per enclosed 4-connected hole.

:class:`QualityFilter` is a Ray Data stage. It keeps every row and adds ``reject``: "" for a kept
patch, else the first failing reason, so the caller can count reasons and show examples.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from meddiff.config.prompts import QualityConfig
from meddiff.errors import DataError

# Test order: the first failing test names a removed patch. A patch too dark to show tissue is
# "dark" whatever darkened it (black ink looks the same as an underexposed scan).
REASONS = ("dark", "ink", "fold", "bubble", "grey", "flat", "blurry", "few_contours", "off_colour")


def hsv(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """H, S, V uint8 (n, H, W) of uint8 RGB (n, H, W, 3): PIL's "HSV" conversion (0-255 scales),
    the one the paper's thresholds were set on; PIL's C loop is also faster than numpy here."""
    from PIL import Image

    out = np.empty(images.shape, dtype=np.uint8)
    for i, img in enumerate(images):
        out[i] = np.asarray(Image.fromarray(np.ascontiguousarray(img)).convert("HSV"))
    return out[..., 0], out[..., 1], out[..., 2]


def grey(images: np.ndarray) -> np.ndarray:
    """PIL's "L" conversion, uint8 (n, H, W): L = (299 R + 587 G + 114 B) / 1000, rounded."""
    from PIL import Image

    out = np.empty(images.shape[:3], dtype=np.uint8)
    for i, img in enumerate(images):
        out[i] = np.asarray(Image.fromarray(np.ascontiguousarray(img)).convert("L"))
    return out


def laplacian_variance(gray: np.ndarray) -> np.ndarray:
    """Variance of the 4-neighbour Laplacian of each grey image (n, H, W) → float64 (n,)."""
    # float32 is exact here: integer sums of at most 5 terms of 0..255.
    g = np.pad(gray.astype(np.float32), ((0, 0), (1, 1), (1, 1)), mode="reflect")
    lap = g[:, :-2, 1:-1] + g[:, 2:, 1:-1] + g[:, 1:-1, :-2] + g[:, 1:-1, 2:] - 4 * g[:, 1:-1, 1:-1]
    return lap.reshape(len(lap), -1).var(axis=1, dtype=np.float64)


def count_contours(gray: np.ndarray, threshold: int) -> np.ndarray:
    """Contours of ``gray > threshold`` per image (n, H, W) → int64 (n,).

    One labelling call for the whole batch: the structuring elements connect pixels within an
    image only, and labels run in raster order, so image i owns a contiguous range of labels.
    """
    from scipy import ndimage

    fg = gray > threshold
    n = len(fg)
    if n == 0:
        return np.zeros(0, np.int64)
    eight = np.zeros((3, 3, 3), bool)
    eight[1] = True
    four = np.zeros((3, 3, 3), bool)
    four[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    outer = _labels_per_image(ndimage.label(fg, structure=eight)[0])
    bg = ndimage.label(~fg, structure=four)[0]
    # Background components touching the frame are not holes.
    edge = np.sort(np.concatenate([bg[:, 0], bg[:, -1], bg[:, :, 0], bg[:, :, -1]], axis=1), 1)
    touching = (edge[:, 0] > 0) + ((edge[:, 1:] != edge[:, :-1]) & (edge[:, 1:] > 0)).sum(1)
    return (outer + _labels_per_image(bg) - touching).astype(np.int64)


def _labels_per_image(labels: np.ndarray) -> np.ndarray:
    top = labels.reshape(len(labels), -1).max(axis=1)
    seen = np.maximum.accumulate(top)
    before = np.concatenate([[0], seen[:-1]])
    return np.where(top > 0, top - before, 0)


def quality_features(
    images: np.ndarray, contour_threshold: int = 150, colour_stride: int = 2
) -> dict[str, np.ndarray]:
    """Per-patch statistics of uint8 RGB (n, H, W, 3), each float64 or int64 (n,), plus the
    per-pixel ``hue`` and ``sat`` the off-colour test uses.

    Colour statistics (HSV means, stds, hue band) use every ``colour_stride``²-th pixel: the same
    values to a fraction of a grey level at a fraction of the cost, which keeps the filter far
    below the embedding's cost (it runs in the embedding actor). Texture (Laplacian, contours)
    uses every pixel.
    """
    h, s, v = (c.reshape(len(images), -1).astype(np.float32) for c in hsv(images))
    h, s, v = h[:, :: colour_stride**2], s[:, :: colour_stride**2], v[:, :: colour_stride**2]
    g = grey(images)
    return {
        "mean_v": v.mean(axis=1, dtype=np.float64),
        "mean_s": s.mean(axis=1, dtype=np.float64),
        "std_v": v.std(axis=1, dtype=np.float64),
        "std_s": s.std(axis=1, dtype=np.float64),
        "std_h": h.std(axis=1, dtype=np.float64),
        "laplacian_var": laplacian_variance(g),
        "contours": count_contours(g, contour_threshold),
        "hue": h,
        "sat": s,
    }


def reject_reasons(
    images: np.ndarray, cfg: QualityConfig, artefacts: np.ndarray | None = None
) -> np.ndarray:
    """The first failing test of each patch (object array of str, "" when it passes), in the
    order of :data:`REASONS`. ``artefacts`` (str (n,), "" for none) are the artefacts whole-slide
    tissue detection found; they come before every test of the patch itself."""
    from meddiff.data.artefacts import patch_artefacts

    n = len(images)
    reasons = np.full(n, "", dtype=object)
    if not cfg.enabled or n == 0:
        return reasons
    f = quality_features(images, cfg.contour_threshold)
    found = patch_artefacts(
        images,
        max_ink_fraction=cfg.max_ink_fraction,
        max_fold_fraction=cfg.max_fold_fraction,
        min_rim_pixels=cfg.min_bubble_rim_pixels,
    )

    def below(values: np.ndarray, limit: float | None) -> np.ndarray:
        return np.zeros(n, bool) if limit is None else values < limit

    # Hue in degrees from PIL's 0-255 scale; the band never holds H&E or IHC stains.
    deg = f.pop("hue") * (360.0 / 255.0)
    lo, hi = cfg.off_colour_hue
    in_band = (deg >= lo) & (deg <= hi) & (f.pop("sat") >= cfg.off_colour_min_saturation)
    off = in_band.mean(axis=1)
    tests = [
        ("dark", below(f["mean_v"], cfg.min_mean_value)),
        *((kind, found == kind) for kind in ("ink", "fold", "bubble")),
        ("grey", below(f["mean_s"], cfg.min_mean_saturation)),
        (
            "flat",
            below(f["std_v"], cfg.min_std_value)
            | below(f["std_s"], cfg.min_std_saturation)
            | below(f["std_h"], cfg.min_std_hue),
        ),
        ("blurry", below(f["laplacian_var"], cfg.min_laplacian_var)),
        ("few_contours", below(f["contours"], cfg.min_contours)),
        (
            "off_colour",
            np.zeros(n, bool)
            if cfg.max_off_colour_fraction is None
            else off > cfg.max_off_colour_fraction,
        ),
    ]
    # Later tests first, so the earliest failing reason is the one that stays.
    for name, failed in reversed(tests):
        reasons[failed] = name
    if artefacts is not None:
        given = np.asarray(artefacts, dtype=object)
        reasons = np.where(given != "", given, reasons)
    return reasons


def check_patches(batch: Mapping[str, np.ndarray], patch_size: int | None) -> None:
    """Raise :class:`DataError` naming the first patch when images are not uint8 RGB squares of
    ``patch_size`` (any square size when None)."""
    images = batch["image"]
    shape = tuple(images.shape)
    ok = images.dtype == np.uint8 and images.ndim == 4 and shape[3] == 3 and shape[1] == shape[2]
    if ok and patch_size is not None:
        ok = shape[1] == patch_size
    if ok:
        return
    where = ""
    if "source" in batch and len(batch["source"]):
        where = f" from {batch['source'][0]} (row {int(batch['index'][0])})"
    size = f"{patch_size}x{patch_size}" if patch_size else "square"
    raise DataError(
        f"patches{where} are {images.dtype} {shape[1:]}; expected uint8 {size} RGB "
        "(prompts.patch_size; tile slides at data.wsi.tile_size to match, or set it to null)"
    )


class QualityFilter:
    """Ray Data stage: validate patch shape and add the ``reject`` reason column; a slide's
    ``artefact`` column (whole-slide tissue detection) is folded into it and dropped.

    Cheap numpy work, so the pipeline passes an *instance* to ``map_batches``, which Ray runs as
    tasks fused with the read (a class would hold an actor, and a CPU, for the whole job).
    """

    def __init__(self, cfg: QualityConfig | Mapping[str, Any], patch_size: int | None = 96):
        self.cfg = cfg if isinstance(cfg, QualityConfig) else QualityConfig.model_validate(cfg)
        self.patch_size = patch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_patches(batch, self.patch_size)
        given = batch.pop("artefact", None)
        batch["reject"] = reject_reasons(batch["image"], self.cfg, given)
        return batch
