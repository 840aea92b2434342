"""What the training slices looked like, recorded with the model, and a check that the images given
to detection look like them.

A DDPM trained on axial T1 slices read one way says nothing useful about a sagittal slice, an
upside-down one, or a 12-bit image read as 16-bit: it reconstructs them badly everywhere and the
anomaly maps light up the whole brain. Nothing fails; the numbers are just wrong. So training
records, in ``thor_model.json`` (``info.reference``), the distribution of a few per-image
statistics over its slices, and detection compares its images with them.

Per image x (float (H, W) in [0, 1]; foreground = pixels above :data:`FOREGROUND`):

- ``p99``: the 99th percentile of the pixels (a 12-bit image read over 16 bits: ~0.06 for ~0.95);
- ``foreground_mean``, ``foreground_fraction``: mean intensity of the foreground and its share of
  the image (another contrast or windowing; another field of view);
- ``aspect``: height / width of the foreground's bounding box (axial brains are longer front to
  back than wide; a sagittal or rotated slice is not);
- ``symmetry``: intersection over union of the foreground box's outline with its left-right
  mirror (axial and coronal brains are near symmetric, sagittal slices are not);
- ``shape_match``: correlation of the foreground box, resized to :data:`GRID` × :data:`GRID`,
  with the mean of the training slices' boxes (the layout of a training slice).

Two checks, whose findings go to the outputs and the log (:func:`check_images`):

- per image: ``p99``, ``foreground_mean``, ``foreground_fraction`` or ``aspect`` outside the
  training band [q01 − t·w, q99 + t·w] (w = q99 − q01, t = :data:`TOLERANCE`) marks the image,
  naming the statistic;
- per folder, on medians over the images (a slice's outline and layout depend on its level in
  the brain, so single slices are not judged, and even a folder's median is compared
  relatively): a transform (upside down, rotated by 90°, 180° or 270°) that makes most images
  match the training layout better, the median ``shape_match`` rising by more than
  :data:`ORIENTATION_GAIN`, says "another orientation"; else a median ``aspect`` more than
  :data:`ASPECT_SHIFT` from the training median or a median ``symmetry`` more than
  :data:`SYMMETRY_DROP` below it says "another plane".
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FORMAT = "meddiff-thor-reference/1"
REFERENCE_IMAGES = 1024  # training slices summarised (the first ones the pipeline yields)
FOREGROUND = 0.05  # slices are normalised so background is 0 and tissue mostly above 0.1
GRID = 16
QUANTILES = (0.01, 0.5, 0.99)
TOLERANCE = 0.5
ORIENTATION_GAIN = 0.05
ASPECT_SHIFT = 0.15  # axial brains: height/width ~1.15; sagittal ~0.85, coronal ~0.95
SYMMETRY_DROP = 0.15  # axial and coronal outlines ~0.95; sagittal ~0.75
EXAMPLES = 10  # flagged images named in the summary (all of them are in scores.csv)
# Checked image by image; shape_match varies too much between the levels of one brain (the top
# slices are small ovals) to judge a single slice, so it is judged on the folder's median.
STATISTICS = ("p99", "foreground_mean", "foreground_fraction", "aspect")
TRANSFORMS = {
    "turned upside down": lambda x: x[:, ::-1, :],
    "rotated 90° counter-clockwise": lambda x: np.rot90(x, 1, axes=(1, 2)),
    "rotated 180°": lambda x: np.rot90(x, 2, axes=(1, 2)),
    "rotated 90° clockwise": lambda x: np.rot90(x, 3, axes=(1, 2)),
}


def _boxes(images: np.ndarray, size: int = GRID) -> tuple[np.ndarray, np.ndarray]:
    """Each image's foreground bounding box resized to size × size (zeros when no foreground),
    and the box's height / width (0 when none)."""
    from skimage.transform import resize

    boxes = np.zeros((len(images), size, size), dtype=np.float64)
    aspect = np.zeros(len(images))
    for i, x in enumerate(images):
        fg = x > FOREGROUND
        if not fg.any():
            continue
        rows, cols = np.flatnonzero(fg.any(axis=1)), np.flatnonzero(fg.any(axis=0))
        crop = x[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        boxes[i] = resize(crop, (size, size), anti_aliasing=True)
        aspect[i] = len(np.arange(rows[0], rows[-1] + 1)) / len(np.arange(cols[0], cols[-1] + 1))
    return boxes, aspect


def _mirror_overlap(images: np.ndarray, size: int = 2 * GRID) -> np.ndarray:
    """Intersection over union of each image's foreground box (as a size × size mask) with its
    left-right mirror: 1 for a symmetric outline (0 when there is no foreground)."""
    from skimage.transform import resize

    out = np.zeros(len(images))
    for i, x in enumerate(images):
        fg = x > FOREGROUND
        if not fg.any():
            continue
        rows, cols = np.flatnonzero(fg.any(axis=1)), np.flatnonzero(fg.any(axis=0))
        box = fg[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(np.float64)
        m = resize(box, (size, size), order=0, anti_aliasing=False) > 0.5
        out[i] = (m & m[:, ::-1]).sum() / max(int((m | m[:, ::-1]).sum()), 1)
    return out


def _correlate(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of a (N, D) with b (D,) or with each row of b (N, D)."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=-1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def statistics(images: np.ndarray, mean_box: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The per-image statistics of the module docstring for (N, H, W) images in [0, 1];
    ``shape_match`` only with ``mean_box`` (GRID × GRID)."""
    x = np.asarray(images, dtype=np.float64)
    n = len(x)
    fg = x > FOREGROUND
    frac = fg.reshape(n, -1).mean(axis=1)
    fg_sum = np.where(fg, x, 0.0).reshape(n, -1).sum(axis=1)
    out = {
        "p99": np.percentile(x.reshape(n, -1), 99, axis=1),
        "foreground_mean": fg_sum / np.maximum(fg.reshape(n, -1).sum(axis=1), 1),
        "foreground_fraction": frac,
    }
    boxes, out["aspect"] = _boxes(x)
    out["symmetry"] = _mirror_overlap(x)
    if mean_box is not None:
        out["shape_match"] = _correlate(boxes.reshape(n, -1), np.asarray(mean_box).ravel())
    return out


def reference_statistics(images: np.ndarray) -> dict[str, Any]:
    """What ``images`` (N, H, W) in [0, 1], the training slices, look like: the quantiles
    :data:`QUANTILES` of each statistic over the images and the mean foreground box (rounded to
    4 decimals, JSON-ready). Recorded as ``info.reference`` of ``thor_model.json``.

    Raises:
        ValueError: no images.
    """
    x = np.asarray(images, dtype=np.float64)
    if x.ndim != 3 or not len(x):
        raise ValueError(f"reference statistics need (N, H, W) images, got shape {x.shape}")
    boxes, _ = _boxes(x)
    mean_box = boxes.mean(axis=0)
    stats = statistics(x, mean_box)
    return {
        "format": FORMAT,
        "images": len(x),
        "quantiles": list(QUANTILES),
        "statistics": {
            k: [round(float(q), 4) for q in np.quantile(v, QUANTILES)] for k, v in stats.items()
        },
        "mean_box": np.round(mean_box, 4).tolist(),
    }


def _band(q: Sequence[float]) -> tuple[float, float]:
    lo, hi = q[0], q[-1]
    return lo - TOLERANCE * (hi - lo), hi + TOLERANCE * (hi - lo)


def check_images(
    reference: dict[str, Any] | None, images: np.ndarray, names: Sequence[str]
) -> tuple[list[str], dict[str, Any]]:
    """Compare (N, H, W) images in [0, 1] with a model's ``reference`` (None: not recorded).

    Returns (per-image findings, "" for an image that looks like the training slices; summary:
    ``checked``, ``unlike_training`` (images with a finding), ``by_statistic`` (counts),
    ``layout`` (folder-level findings), ``medians`` vs ``training_medians``, ``warning``: one
    sentence or None). The warning is logged here.
    """
    if not reference or reference.get("format") != FORMAT:
        summary = {
            "checked": False,
            "warning": None,
            "note": "the model records no training-image statistics (trained before they were "
            "recorded); the images were not compared with the training data",
        }
        return [""] * len(names), summary
    ref = reference["statistics"]
    mean_box = np.asarray(reference["mean_box"])
    stats = statistics(images, mean_box)
    findings = [[] for _ in names]
    by_stat: dict[str, int] = {}
    for key in STATISTICS:
        lo, hi = _band(ref[key])
        for i, v in enumerate(stats[key]):
            if not lo <= v <= hi:
                findings[i].append(f"{key} {v:.3g} outside the training range [{lo:.3g}, {hi:.3g}]")
                by_stat[key] = by_stat.get(key, 0) + 1
    layout = _layout(images, stats, ref, mean_box)
    medians = {k: round(float(np.median(v)), 4) for k, v in stats.items()}
    flagged = sum(bool(f) for f in findings)
    warning = None
    if flagged or layout:
        parts = [f"{flagged} of {len(names)} images have statistics outside the training range"]
        if by_stat:
            parts[0] += " (" + ", ".join(f"{k}: {n}" for k, n in sorted(by_stat.items())) + ")"
        parts += layout
        warning = (
            "the images look unlike the model's training data: " + "; ".join(parts) + ". Anomaly "
            "maps and scores of such images are not meaningful (check the plane, orientation and "
            "data.images scaling)"
        )
        log.warning("%s", warning)
    examples = {n: f for n, f in zip(names, findings, strict=True) if f}
    summary = {
        "checked": True,
        "images": len(names),
        "unlike_training": flagged,
        "by_statistic": by_stat,
        "examples": {n: "; ".join(f) for n, f in list(examples.items())[:EXAMPLES]},
        "layout": layout,
        "medians": medians,
        "training_medians": {k: v[QUANTILES.index(0.5)] for k, v in ref.items()},
        "warning": warning,
    }
    return ["; ".join(f) for f in findings], summary


def _layout(images, stats, ref, mean_box) -> list[str]:
    """Folder-level findings: an orientation that fits the training layout better, else
    another plane (outline proportions or symmetry unlike the training slices')."""
    trained = {k: v[QUANTILES.index(0.5)] for k, v in ref.items()}
    best = None
    for name, transform in TRANSFORMS.items():
        moved = statistics(np.ascontiguousarray(transform(np.asarray(images))), mean_box)
        gain = moved["shape_match"] - stats["shape_match"]
        fits = np.mean(gain > 0) > 0.5 and float(np.median(gain)) > ORIENTATION_GAIN
        if fits and (best is None or _median(moved) > _median(best[1])):
            best = (name, moved)
    median = {k: float(np.median(v)) for k, v in stats.items()}
    # A slice of another plane, turned, may match a little better yet keep its outline.
    if best is not None and not _other_plane(best[1], trained):
        turned = _median(best[1])
        return [
            f"they would match the training slices' layout better {best[0]} (median shape "
            f"match {turned:.2f} vs {median['shape_match']:.2f}): another orientation?"
        ]
    if _other_plane(stats, trained):
        return [
            "their outlines are unlike the training slices' (median height/width "
            f"{median['aspect']:.2f}, training {trained['aspect']:.2f}; median left-right "
            f"symmetry {median['symmetry']:.2f}, training {trained['symmetry']:.2f}): another "
            "plane?"
        ]
    return []


def _median(stats: dict[str, np.ndarray]) -> float:
    return float(np.median(stats["shape_match"]))


def _other_plane(stats: dict[str, np.ndarray], trained: dict[str, float]) -> bool:
    aspect = abs(float(np.median(stats["aspect"])) - trained["aspect"]) > ASPECT_SHIFT
    return aspect or float(np.median(stats["symmetry"])) < trained["symmetry"] - SYMMETRY_DROP
