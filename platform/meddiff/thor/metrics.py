"""Anomaly-detection metrics, computed from anomaly maps and ground-truth masks (numpy only).

Protocol (THOR's brain evaluation, from the official evaluator):

- pixel AUPRC (average precision) and AUROC over all pixels of the lesion images, with AUPRC's
  chance level (the lesion pixel fraction) beside it,
- best Dice over 101 thresholds in [0, 1] (a pixel is predicted anomalous when its map value is
  above the threshold; Dice pooled over all pixels),
- the same per lesion-size stratum: small (3, 71], medium (71, 570], large > 570 lesion pixels at
  128x128, the bounds scaled by image area for other sizes (at 64x64: (0.75, 17.75],
  (17.75, 142.5], > 142.5),
- image-level AUROC of the image scores, lesion vs lesion-free images,
- for box-shaped anomalies: the threshold at which lesion-free images have at most 5 % of pixels
  above it; a box (connected mask component) is found when more than 10 % of its pixels are
  above; precision counts above-threshold regions touching no box as false positives.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from meddiff.config.thor import ThorEvalConfig

STRATA = ("small", "medium", "large")


def strata_bounds(cfg: ThorEvalConfig, image_size: int) -> dict[str, tuple[float, float]]:
    """(low, high] pixel-count bounds of each stratum at ``image_size``, scaled from 128x128."""
    scale = (image_size / 128.0) ** 2
    a, b, c = (x * scale for x in cfg.size_strata)
    return {"small": (a, b), "medium": (b, c), "large": (c, float("inf"))}


def pixel_metrics(maps: np.ndarray, masks: np.ndarray, thresholds: int = 101) -> dict[str, Any]:
    """AUPRC, AUROC and best Dice of maps (N, H, W) against bool masks (N, H, W).

    ``chance_auprc`` is the AUPRC of a map that knows nothing (random or constant): the share of
    lesion pixels (the precision of every threshold of such a map, in expectation), so a pixel
    AUPRC reads against it; AUROC's chance level is always 0.5.
    """
    scores = maps.reshape(-1).astype(np.float64)
    labels = masks.reshape(-1).astype(bool)
    out: dict[str, Any] = {
        "images": int(maps.shape[0]),
        "lesion_pixels": int(labels.sum()),
        "chance_auprc": float(labels.mean()) if labels.size else None,
    }
    if labels.all() or not labels.any():
        out.update(auprc=None, auroc=None, best_dice=None, best_dice_threshold=None)
        return out
    from sklearn.metrics import average_precision_score, roc_auc_score

    out["auprc"] = float(average_precision_score(labels, scores))
    out["auroc"] = float(roc_auc_score(labels, scores))
    dice, th = best_dice(scores, labels, thresholds)
    out["best_dice"], out["best_dice_threshold"] = dice, th
    return out


def dice_curve(
    scores: np.ndarray, labels: np.ndarray, thresholds: int = 101
) -> tuple[np.ndarray, np.ndarray]:
    """Dice at each of ``thresholds`` evenly spaced thresholds in [0, 1] (pred = score > th)."""
    ths = np.linspace(0.0, 1.0, thresholds)
    pos = np.sort(scores[labels])
    neg = np.sort(scores[~labels])
    tp = pos.size - np.searchsorted(pos, ths, side="right")
    fp = neg.size - np.searchsorted(neg, ths, side="right")
    dice = 2.0 * tp / (2.0 * tp + fp + (pos.size - tp) + 1e-12)
    return ths, dice


def best_dice(scores: np.ndarray, labels: np.ndarray, thresholds: int = 101) -> tuple[float, float]:
    ths, dice = dice_curve(scores, labels, thresholds)
    i = int(np.argmax(dice))
    return float(dice[i]), float(ths[i])


def image_auroc(scores: np.ndarray, has_lesion: np.ndarray) -> float | None:
    """AUROC of image scores for lesion (True) vs lesion-free images; None without both."""
    if has_lesion.all() or not has_lesion.any():
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(has_lesion.astype(int), scores))


def is_box_mask(mask: np.ndarray) -> bool:
    """True when every connected component of ``mask`` fills its bounding box (a rectangle)."""
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n == 0:
        return False
    for i, box in enumerate(ndimage.find_objects(labels), start=1):
        if not (labels[box] == i).all():
            return False
    return True


def box_metrics(
    maps: np.ndarray, masks: np.ndarray, max_fpr: float = 0.05, hit_fraction: float = 0.1
) -> dict[str, Any]:
    """The ≤ ``max_fpr`` pixel-FPR protocol for box anomalies (see module docstring)."""
    from scipy import ndimage

    normal = ~masks.reshape(len(masks), -1).any(axis=1)
    if not normal.any():
        return {"note": "needs lesion-free images to set the threshold"}
    # Mean per-image FPR equals the pooled FPR (equal image sizes): a quantile of normal pixels.
    threshold = float(np.quantile(maps[normal], 1.0 - max_fpr))
    above = maps > threshold
    boxes = found = false_regions = 0
    for amap, mask in zip(above, masks, strict=True):
        labels, n = ndimage.label(mask)
        boxes += n
        for i in range(1, n + 1):
            comp = labels == i
            found += int(amap[comp].sum() > hit_fraction * comp.sum())
        regions, m = ndimage.label(amap)
        if m:
            touched = np.unique(regions[mask & amap])
            false_regions += m - np.count_nonzero(touched)
    recall = found / boxes if boxes else None
    precision = found / (found + false_regions) if (found + false_regions) else None
    f1 = None
    if recall is not None and precision is not None and precision + recall > 0:
        f1 = 2 * precision * recall / (precision + recall)
    return {
        "threshold": threshold,
        "normal_pixel_fpr": float(above[normal].mean()),
        "boxes": boxes,
        "found": found,
        "false_regions": false_regions,
        "precision": precision,
        "recall": recall,
        "f1": f1,
    }


def evaluate_maps(
    maps: np.ndarray,
    masks: np.ndarray,
    scores: np.ndarray,
    cfg: ThorEvalConfig,
    box_protocol: bool | None = None,
) -> dict[str, Any]:
    """All metrics for maps (N, H, W), bool masks (N, H, W) and image scores (N,).

    ``box_protocol`` None applies the box protocol when every lesion mask is made of rectangles.
    """
    size = maps.shape[-1]
    area = masks.reshape(len(masks), -1).sum(axis=1)
    lesion = area > 0
    out: dict[str, Any] = {
        "images": {"lesion": int(lesion.sum()), "normal": int((~lesion).sum())},
        "pixel": pixel_metrics(maps[lesion], masks[lesion], cfg.dice_thresholds)
        if lesion.any()
        else None,
        "pixel_all_images": pixel_metrics(maps, masks, cfg.dice_thresholds),
        "image_auroc": image_auroc(scores, lesion),
        "strata": {},
    }
    for name, (lo, hi) in strata_bounds(cfg, size).items():
        sel = (area > lo) & (area <= hi)
        entry = {"bounds_pixels": [round(lo, 2), None if np.isinf(hi) else round(hi, 2)]}
        if sel.any():
            entry.update(pixel_metrics(maps[sel], masks[sel], cfg.dice_thresholds))
        else:
            entry["images"] = 0
        out["strata"][name] = entry
    if box_protocol is None:
        box_protocol = bool(lesion.any()) and all(is_box_mask(m) for m in masks[lesion])
    if box_protocol:
        out["box"] = box_metrics(maps, masks, cfg.box_max_fpr, cfg.box_hit_fraction)
    return out


def summary_row(metrics: dict[str, Any]) -> dict[str, float | None]:
    """The headline numbers of :func:`evaluate_maps` as a flat row (tables, MLflow)."""
    px = metrics.get("pixel") or {}
    row: dict[str, float | None] = {
        "pixel_auprc": px.get("auprc"),
        "pixel_auprc_chance": px.get("chance_auprc"),
        "pixel_auroc": px.get("auroc"),
        "best_dice": px.get("best_dice"),
        "image_auroc": metrics.get("image_auroc"),
    }
    for name in STRATA:
        s = metrics["strata"].get(name, {})
        row[f"{name}_auprc"] = s.get("auprc")
        row[f"{name}_dice"] = s.get("best_dice")
    if "box" in metrics:
        for k in ("precision", "recall", "f1"):
            row[f"box_{k}"] = metrics["box"].get(k)
    return row
