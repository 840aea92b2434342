"""An HTML gallery a person opens to see what each morphology type looks like.

One row per morphology type (cluster), one column per label, each cell a strip of example patches
with its count and prompt; then a row per quality-filter reason with examples of removed patches.
Images are written beside the page (``gallery/``) so the page stays small and opens offline;
the page is the report kit's ``gallery.html`` template.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from meddiff.reports import Provenance, write_page


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
    provenance: Provenance | None = None,
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

    rows = []
    for c in clusters:
        row_cells = []
        for lab in labels:
            n = counts.get((c, lab), 0)
            cell = {
                "count": n,
                "prompt": prompts.get((c, lab), ""),
                "alt": f"type {c}, label {lab}",
            }
            if n:
                cell["src"] = save(f"c{c}_l{lab}.png", cells[(c, lab)])
            row_cells.append(cell)
        rows.append(
            {
                "name": "all patches" if c < 0 else f"type {c}",
                "total": sum(counts.get((c, lab), 0) for lab in labels),
                "cells": row_cells,
            }
        )
    removed = []
    for reason, n in sorted(rejected_counts.items()):
        images = rejected.get(reason)
        has = images is not None and len(images) > 0
        removed.append(
            {
                "reason": reason,
                "count": n,
                "src": save(f"rejected_{reason}.png", images) if has else "",
            }
        )
    return write_page(
        out / "gallery.html",
        "gallery.html",
        title=title,
        provenance=provenance,
        stats=[(str(k), _fmt(v)) for k, v in stats.items()],
        labels=[{"id": lab, "name": label_names[lab]} for lab in labels],
        rows=rows,
        rejected=removed,
    )


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Sequence) and not isinstance(value, str):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    return str(value)
