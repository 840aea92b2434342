"""A self-contained HTML report of an evaluation: a metrics table with one row per method, then per
method example rows of input, pseudo-healthy reconstruction, anomaly map and ground truth.
Images are embedded as PNG data URIs so the file can be mailed or attached to an MLflow run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from meddiff.reports import Provenance, png_data_uri, render
from meddiff.thor.metrics import STRATA, summary_row

# Shown at twice their size (pixels kept by the kit's CSS): 32-128 px slices are small on screen.
SCALE = 2


def to_rgb(img: np.ndarray, cmap: str | None = None, vmax: float = 1.0) -> np.ndarray:
    """float (H, W) on [0, vmax] → uint8 (H, W) grey, or (H, W, 3) through matplotlib's ``cmap``."""
    a = np.clip(np.asarray(img, dtype=np.float32) / max(vmax, 1e-8), 0, 1)
    if cmap:
        import matplotlib

        return (matplotlib.colormaps[cmap](a)[..., :3] * 255).round().astype(np.uint8)
    return (a * 255).round().astype(np.uint8)


def pick_examples(masks: np.ndarray, n: int) -> list[int]:
    """Indices to show: lesion images spread over sizes (smallest to largest), then lesion-free."""
    area = masks.reshape(len(masks), -1).sum(axis=1)
    lesion = np.flatnonzero(area > 0)
    normal = np.flatnonzero(area == 0)
    n_normal = min(len(normal), max(1, n // 4)) if len(normal) else 0
    n_lesion = min(len(lesion), n - n_normal)
    by_size = lesion[np.argsort(area[lesion], kind="stable")]
    picks = (
        [int(by_size[i]) for i in np.linspace(0, len(by_size) - 1, n_lesion).round().astype(int)]
        if n_lesion
        else []
    )
    picks += [int(i) for i in normal[:n_normal]]
    return list(dict.fromkeys(picks))


def schedule_label(plan: Mapping[str, Any]) -> str:
    """The schedule and, when known, the networks' precision (``meddiff.precision``)."""
    precision = plan.get("precision")
    return f"{plan['schedule']}, {precision}" if precision else plan["schedule"]


def _intensity(plan: Mapping[str, Any]) -> str:
    """How the input images were scaled to [0, 1] (``data.images``), as a sentence."""
    info = plan.get("intensity")
    if not info:
        return ""
    read_as = "; ".join(f"{how} ({n} sampled)" for how, n in info.get("read_as", {}).items())
    text = f". Images scaled by data.images.scaling={info['scaling']}: {read_as}"
    if info.get("warning"):
        text += f". Warning: {info['warning']}"
    return text


def _cell(v: Any) -> Any:
    return f"{v:.3f}" if isinstance(v, float) else v


def render_report(
    title: str,
    results: Mapping[str, Mapping[str, Any]],
    names: Sequence[str],
    images: np.ndarray,
    masks: np.ndarray,
    outputs: Mapping[str, Mapping[str, np.ndarray]],
    rows: int = 8,
    notes: Sequence[str] = (),
    provenance: Provenance | None = None,
) -> str:
    """HTML text. ``results[method]`` holds ``metrics`` and ``plan``; ``outputs[method]`` holds
    ``maps`` and ``reconstructions`` (N, H, W) in the order of ``names``."""
    cols = ["pixel_auprc", "pixel_auprc_chance", "pixel_auroc", "best_dice", "image_auroc"]
    cols += [f"{s}_{m}" for s in STRATA for m in ("auprc", "dice")]
    if any("box" in r["metrics"] for r in results.values()):
        cols += ["box_precision", "box_recall", "box_f1"]
    metric_rows = []
    for method, r in results.items():
        row = summary_row(r["metrics"])
        metric_rows.append(
            [method, schedule_label(r["plan"]), r["plan"]["map_kind"]]
            + [_cell(row.get(c)) for c in cols]
            + [_cell(r.get("images_per_s"))]
        )
    picks = pick_examples(masks, rows)
    width = int(images.shape[-1]) * SCALE
    methods = []
    for method, out in outputs.items():
        plan = results[method]["plan"]
        vmax = float(np.quantile(out["maps"], 0.999)) or 1.0
        examples = [
            {
                "name": names[i],
                "input": png_data_uri(to_rgb(images[i])),
                "reconstruction": png_data_uri(to_rgb(out["reconstructions"][i])),
                "map": png_data_uri(to_rgb(out["maps"][i], "inferno", vmax)),
                "mask": png_data_uri(to_rgb(masks[i].astype(np.float32))),
                "score": float(out["scores"][i]),
            }
            for i in picks
        ]
        methods.append(
            {
                "name": method,
                "schedule": schedule_label(plan),
                "noise_level": plan["noise_level"],
                "noise": plan["noise"],
                "harmonization": plan["harmonization_steps"] or "none",
                "map_kind": plan["map_kind"],
                "intensity": _intensity(plan),
                "vmax": vmax,
                "width": width,
                "examples": examples,
            }
        )
    return render(
        "thor.html",
        title=title,
        provenance=provenance,
        notes=list(notes),
        headers=["method", "schedule", "map", *cols, "images/s"],
        metric_rows=metric_rows,
        methods=methods,
    )
