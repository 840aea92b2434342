"""A self-contained HTML report of an evaluation: a metrics table with one row per method, then per
method example rows of input, pseudo-healthy reconstruction, anomaly map and ground truth.
Images are embedded as PNG data URIs so the file can be mailed or attached to an MLflow run.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from meddiff.thor.metrics import STRATA, summary_row


def _png_uri(img: np.ndarray, cmap: str | None = None, vmax: float = 1.0, scale: int = 2) -> str:
    from PIL import Image

    a = np.clip(np.asarray(img, dtype=np.float32) / max(vmax, 1e-8), 0, 1)
    if cmap:
        import matplotlib

        rgb = (matplotlib.colormaps[cmap](a)[..., :3] * 255).round().astype(np.uint8)
        pil = Image.fromarray(rgb)
    else:
        pil = Image.fromarray((a * 255).round().astype(np.uint8))
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


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


def _intensity(plan: Mapping[str, Any]) -> str:
    """How the input images were scaled to [0, 1] (``data.images``), as a sentence."""
    info = plan.get("intensity")
    if not info:
        return ""
    read_as = "; ".join(f"{how} ({n} sampled)" for how, n in info.get("read_as", {}).items())
    text = f". Images scaled by data.images.scaling={info['scaling']}: {read_as}"
    if info.get("warning"):
        text += f". Warning: {info['warning']}"
    return html.escape(text)


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return html.escape(str(v))


def render_report(
    title: str,
    results: Mapping[str, Mapping[str, Any]],
    names: Sequence[str],
    images: np.ndarray,
    masks: np.ndarray,
    outputs: Mapping[str, Mapping[str, np.ndarray]],
    rows: int = 8,
    notes: Sequence[str] = (),
) -> str:
    """HTML text. ``results[method]`` holds ``metrics`` and ``plan``; ``outputs[method]`` holds
    ``maps`` and ``reconstructions`` (N, H, W) in the order of ``names``."""
    cols = ["pixel_auprc", "pixel_auroc", "best_dice", "image_auroc"]
    cols += [f"{s}_{m}" for s in STRATA for m in ("auprc", "dice")]
    has_box = any("box" in r["metrics"] for r in results.values())
    if has_box:
        cols += ["box_precision", "box_recall", "box_f1"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "th{background:#f0f0f0}.ex td{text-align:center;border:none;padding:2px}"
        ".note{background:#fff4d6;padding:6px 10px;border-left:4px solid #e0a000}</style>",
        f"</head><body><h1>{html.escape(title)}</h1>",
    ]
    for note in notes:
        parts.append(f"<p class='note'>{html.escape(note)}</p>")
    parts.append("<h2>Metrics</h2><table><tr><th>method</th><th>schedule</th><th>map</th>")
    parts += [f"<th>{c}</th>" for c in cols] + ["<th>images/s</th></tr>"]
    for method, r in results.items():
        row = summary_row(r["metrics"])
        plan = r["plan"]
        parts.append(
            f"<tr><th>{html.escape(method)}</th><td>{html.escape(plan['schedule'])}</td>"
            f"<td>{html.escape(plan['map_kind'])}</td>"
        )
        parts += [f"<td>{_fmt(row.get(c))}</td>" for c in cols]
        parts.append(f"<td>{_fmt(r.get('images_per_s'))}</td></tr>")
    parts.append("</table>")
    parts.append(
        "<p>Strata: lesion pixel counts small/medium/large as in THOR at 128x128, scaled by area; "
        "pixel metrics over lesion images; image AUROC: lesion vs lesion-free slices.</p>"
    )
    picks = pick_examples(masks, rows)
    for method, out in outputs.items():
        plan = results[method]["plan"]
        vmax = float(np.quantile(out["maps"], 0.999)) or 1.0
        parts.append(
            f"<h2>{html.escape(method)}</h2><p>{html.escape(plan['schedule'])}, T = "
            f"{plan['noise_level']}, {html.escape(plan['noise'])} noise, harmonization at "
            f"{plan['harmonization_steps'] or 'none'}; map: {html.escape(plan['map_kind'])} "
            f"(shown on [0, {vmax:.3f}]){_intensity(plan)}</p>"
        )
        parts.append(
            "<table class='ex'><tr><th>image</th><th>input</th><th>pseudo-healthy</th>"
            "<th>anomaly map</th><th>ground truth</th><th>score</th></tr>"
        )
        for i in picks:
            score = float(out["scores"][i])
            parts.append(
                f"<tr><td>{html.escape(names[i])}</td>"
                f"<td><img src='{_png_uri(images[i])}'></td>"
                f"<td><img src='{_png_uri(out['reconstructions'][i])}'></td>"
                f"<td><img src='{_png_uri(out['maps'][i], 'inferno', vmax)}'></td>"
                f"<td><img src='{_png_uri(masks[i].astype(np.float32))}'></td>"
                f"<td>{score:.4f}</td></tr>"
            )
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
