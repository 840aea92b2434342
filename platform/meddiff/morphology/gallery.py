"""An HTML gallery a person opens to see what each morphology type looks like.

One row per morphology type (cluster), one column per label, each cell a strip of example patches
with its count and prompt; then a row per quality-filter reason with examples of removed patches.
Images are written beside the page (``gallery/``) so the page stays small and opens offline;
the page is the report kit's ``gallery.html`` template. :func:`make_gallery` fills it from a
prompts build (its pairs, pass 1's rejected patches and the summary).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from meddiff.config import Config
from meddiff.morphology.columns import iter_column
from meddiff.morphology.layout import PROMPTS_CSV, Workspace
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


def make_gallery(cfg: Config, ws: Workspace, summary: Mapping[str, Any]) -> Path:
    """The gallery of a prompts build in ``ws.partial``: examples per (type, label) cell from
    its pairs, per reject reason from pass 1, counts and prompts from ``summary`` and
    ``prompts.csv``; returns the page's path."""
    from meddiff.prompts import label_word, read_prompt_table
    from meddiff.reports import provenance

    pcfg = cfg.prompts
    g = pcfg.gallery
    cells = sample_images(ws.pairs, ["cluster", "label"], g.examples, g.seed)
    cells = {(int(c), int(lab)): v for (c, lab), v in cells.items()}
    counts = {
        (int(c), int(lab)): n
        for c, per_label in summary["cluster_sizes"].items()
        for lab, n in per_label.items()
        if lab != "total"
    }
    labels = sorted({lab for _, lab in counts})
    table = read_prompt_table(ws.partial / PROMPTS_CSV, pcfg)
    rejected = {}
    if summary["removed"]["total"]:
        picked = sample_images(ws.checked, ["reject"], g.examples, g.seed)
        rejected = {str(k[0]): v for k, v in picked.items() if k[0] != ""}
    return write_gallery(
        ws.partial,
        title=f"Morphology types ({summary['strategy']} prompts)",
        stats=_stats(summary),
        label_names={lab: label_word(lab, pcfg) for lab in labels},
        cells=cells,
        counts=counts,
        prompts={(r.cluster, r.label): r.prompt for r in table},
        rejected=rejected,
        rejected_counts=summary["removed"]["by_reason"],
        thumb=g.thumb_size,
        provenance=provenance(
            cfg, model=summary.get("registered_model") or summary.get("embedder")
        ),
    )


def _stats(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The page's header figures from a build's summary."""
    stats = {
        "source": summary["source"],
        "strategy": summary["strategy"],
        "patches in": summary["rows_in"],
        "kept": summary["kept"],
        "removed": summary["removed"]["total"],
        "distinct prompts": summary["prompts"],
    }
    for key in ("k", "mode", "silhouette", "embedder"):
        if key in summary:
            stats[key] = summary[key]
    return stats


def sample_images(
    shard_dir: Path, key_columns: list[str], per_key: int, seed: int
) -> dict[tuple, np.ndarray]:
    """Up to ``per_key`` random images uint8 (m, H, W, C) per distinct value of ``key_columns``,
    reading only the row groups that hold a chosen row."""
    from meddiff.data.shards import read_manifest

    manifest = read_manifest(shard_dir)
    keys = (
        np.stack(
            [
                np.asarray(np.concatenate(list(iter_column(shard_dir, c, kept_only=False))))
                for c in key_columns
            ],
            axis=1,
        )
        if manifest["rows"]
        else np.empty((0, len(key_columns)))
    )
    rng = np.random.default_rng(seed)
    chosen: dict[tuple, np.ndarray] = {}
    for key in {tuple(k) for k in keys.tolist()}:
        rows = np.flatnonzero((keys == np.asarray(key, dtype=keys.dtype)).all(axis=1))
        chosen[key] = np.sort(rng.choice(rows, size=min(per_key, len(rows)), replace=False))
    wanted = np.sort(np.concatenate(list(chosen.values()))) if chosen else np.empty(0, int)
    images = _read_rows(shard_dir, manifest["files"], wanted)
    return {key: np.stack([images[int(r)] for r in rows]) for key, rows in chosen.items()}


def _read_rows(shard_dir: Path, files: list[str], wanted: np.ndarray) -> dict[int, np.ndarray]:
    """The decoded images of the rows ``wanted`` (sorted global row numbers over ``files``),
    reading only the row groups that hold one."""
    import pyarrow.parquet as pq

    from meddiff.data.shards import decode_batch

    images: dict[int, np.ndarray] = {}
    offset = 0
    cols = ["image", "height", "width", "channels"]
    for name in files:
        pf = pq.ParquetFile(shard_dir / name)
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            inside = wanted[(wanted >= offset) & (wanted < offset + n)]
            if inside.size:
                table = pf.read_row_group(g, columns=cols)
                batch = decode_batch({c: table[c].to_numpy(zero_copy_only=False) for c in cols})
                for row in inside:
                    images[int(row)] = batch["image"][row - offset]
            offset += n
    return images
