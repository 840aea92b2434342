"""An HTML gallery a person opens to see what each morphology type looks like.

One row per morphology type (cluster), one column per label, each cell a strip of example patches
with its count and prompt; then a row per quality-filter reason with examples of removed patches.
Images are written beside the page (``gallery/``) so the page stays small and opens offline.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def strip(images: np.ndarray, thumb: int) -> np.ndarray:
    """uint8 (m, H, W, 3) → one uint8 (thumb, m*thumb + (m-1)*2, 3) row with 2-px white gaps."""
    from PIL import Image

    tiles = []
    for img in images:
        pil = Image.fromarray(np.ascontiguousarray(img))
        if pil.size != (thumb, thumb):
            pil = pil.resize((thumb, thumb), Image.Resampling.LANCZOS)
        tiles.append(np.asarray(pil))
        tiles.append(np.full((thumb, 2, 3), 255, np.uint8))
    return np.concatenate(tiles[:-1], axis=1) if tiles else np.full((thumb, 2, 3), 255, np.uint8)


def write_gallery(
    out_dir: str | Path,
    *,
    title: str,
    stats: Mapping[str, Any],
    label_names: Mapping[int, str],
    cells: Mapping[tuple[int, int], np.ndarray],
    counts: Mapping[tuple[int, int], int],
    prompts: Mapping[tuple[int, int], str],
    rejected: Mapping[str, np.ndarray],
    rejected_counts: Mapping[str, int],
    thumb: int = 96,
) -> Path:
    """Write ``gallery.html`` and ``gallery/*.png`` under ``out_dir``; returns the page's path.

    ``cells`` maps (cluster, label) to example images uint8 (m, H, W, 3); cluster -1 is the
    baseline's single row. ``rejected`` maps a filter reason to examples of removed patches.
    """
    from PIL import Image

    out = Path(out_dir)
    img_dir = out / "gallery"
    img_dir.mkdir(parents=True, exist_ok=True)
    clusters = sorted({c for c, _ in counts})
    labels = sorted(label_names)

    def save(name: str, images: np.ndarray) -> str:
        Image.fromarray(strip(images, thumb)).save(img_dir / name, optimize=True)
        return f"gallery/{name}"

    head = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:6px;vertical-align:top;text-align:left}"
        "th{background:#f4f4f4}.p{font-size:85%;color:#444}.n{font-weight:bold}"
        "img{image-rendering:pixelated;display:block;margin-top:4px}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<table>",
        *(
            f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>"
            for k, v in stats.items()
        ),
        "</table>",
        "<h2>Morphology types</h2><table><tr><th>type</th>",
        *(f"<th>{html.escape(label_names[lab])} (label {lab})</th>" for lab in labels),
        "</tr>",
    ]
    body = []
    for c in clusters:
        total = sum(counts.get((c, lab), 0) for lab in labels)
        name = "all patches" if c < 0 else f"type {c}"
        body.append(f"<tr><th>{html.escape(name)}<br><span class='p'>{total} patches</span></th>")
        for lab in labels:
            n = counts.get((c, lab), 0)
            if n == 0:
                body.append("<td class='p'>none</td>")
                continue
            src = save(f"c{c}_l{lab}.png", cells[(c, lab)])
            body.append(
                f"<td><span class='n'>{n}</span> "
                f"<span class='p'>{html.escape(prompts.get((c, lab), ''))}</span>"
                f"<img src='{src}' alt='type {c}, label {lab}'></td>"
            )
        body.append("</tr>")
    body.append("</table>")
    if rejected_counts:
        body.append("<h2>Removed by the quality filter</h2><table>")
        for reason, n in sorted(rejected_counts.items()):
            images = rejected.get(reason)
            img = (
                f"<img src='{save(f'rejected_{reason}.png', images)}' alt='{reason}'>"
                if images is not None and len(images)
                else ""
            )
            body.append(
                f"<tr><th>{html.escape(reason)}</th><td><span class='n'>{n}</span>{img}</td></tr>"
            )
        body.append("</table>")
    page = out / "gallery.html"
    page.write_text("\n".join([*head, *body, "</body></html>"]))
    return page


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Sequence) and not isinstance(value, str):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    return str(value)
