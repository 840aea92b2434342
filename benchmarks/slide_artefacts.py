"""Measurement: what the quality filter flags on real tissue with painted slide artefacts.

    python benchmarks/slide_artefacts.py            # about a minute on 2 cores

Real tissue: the sample slide (``meddiff data sample-wsi``, scikit-image's IHC colon tissue) at
10x, cut into the 96-px grid, and the sample PCam set (all splits). Artefacts are painted on the
10x slide image with :mod:`meddiff.data.samples` (pen strokes of each ink at two densities,
folds, out-of-focus regions, bubbles, a coverslip edge) with fixed seeds; a tissue tile is
*affected* when at least half of it is under the artefact (its painter's mask; for bubbles and
the edge: when the rim crosses it, 15-85% of it empty).

Prints, per artefact, the share of affected tissue tiles the filter removes and under which
reason, and the share of the clean tiles (slide tiles and PCam patches) each reason removes. The filter is the tiny preset's (:func:`meddiff.morphology.quality.reject_reasons`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

TILE = 96


def slide_canvas(seed: int = 0) -> np.ndarray:
    """The sample slide's 10x level as one RGB array (1536 x 2048)."""
    from meddiff.data.samples import sample_wsi
    from meddiff.data.wsi import Slide

    path = sample_wsi(Path(tempfile.mkdtemp(prefix="artefacts-")), seed=seed)
    with Slide(path) as slide:
        w, h = slide.level_dimensions[1]
        return slide.read(0, 0, 1, w, h)


def grid(img: np.ndarray) -> np.ndarray:
    rows, cols = img.shape[0] // TILE, img.shape[1] // TILE
    return (
        img[: rows * TILE, : cols * TILE]
        .reshape(rows, TILE, cols, TILE, *img.shape[2:])
        .swapaxes(1, 2)
        .reshape(rows * cols, TILE, TILE, *img.shape[2:])
    )


def tissue_tiles(img: np.ndarray) -> np.ndarray:
    """Tiles of ``img`` that are at least half stained (OD > 0.15), as the slide mask keeps."""
    from meddiff.data.artefacts import optical_density

    density = np.linalg.norm(optical_density(grid(img)), axis=-1)
    return (density > 0.15).reshape(len(density), -1).mean(axis=1) >= 0.5


def painted(canvas: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Name → (painted canvas, coverage float (H, W)) for every artefact arm."""
    from meddiff.data import samples as s

    arms = {}
    for i, (ink, colour) in enumerate(s.PEN_INKS.items()):
        for density in (0.6, 0.9):
            rng = np.random.default_rng(100 + i)
            img, cover = canvas, np.zeros(canvas.shape[:2], np.float32)
            for _ in range(2):
                img, c = s.paint_pen_stroke(img, colour, rng, width=160, density=density)
                cover = np.maximum(cover, c)
            arms[f"ink {ink} {density:g}"] = (img, cover)
    for k in range(2):
        arms[f"fold {k}"] = s.paint_fold(canvas, np.random.default_rng(200 + k), width=320)
    for sigma in (2.0, 3.0):
        rng = np.random.default_rng(300 + int(sigma))
        arms[f"out of focus sigma {sigma:g}"] = s.blur_region(canvas, rng, sigma=sigma, radius=450)
    rng = np.random.default_rng(400)
    img, cover = canvas, np.zeros(canvas.shape[:2], np.float32)
    for centre in ((500, 600), (1000, 1400), (700, 1100)):
        img, c = s.paint_bubble(img, rng, radius=170, centre=centre)
        cover = np.maximum(cover, c)
    arms["bubbles"] = (img, cover)
    # A coverslip edge: the rim of a disc far larger than the tissue.
    arms["glass edge"] = s.paint_bubble(canvas, rng, radius=3000, centre=(3500, 1000))
    return arms


def affected(name: str, cover: np.ndarray) -> np.ndarray:
    """Tiles an arm's artefact affects: at least half covered; for bubbles and glass edges, the
    tiles the rim crosses (15-85% empty: the rest is tissue)."""
    share = grid(cover[..., None])[..., 0].reshape(-1, TILE * TILE).mean(axis=1)
    if name in ("bubbles", "glass edge"):
        return (share >= 0.15) & (share <= 0.85)
    return share >= 0.5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)

    from meddiff.config import load_config
    from meddiff.data.pcam import available_splits, open_pcam, read_rows
    from meddiff.data.samples import sample_pcam
    from meddiff.morphology.quality import reject_reasons

    qcfg = load_config("tiny").prompts.filter
    canvas = slide_canvas()
    keep = tissue_tiles(canvas)
    clean_slide = grid(canvas)[keep]
    root = Path(tempfile.mkdtemp(prefix="artefacts-pcam-"))
    sample_pcam(root)
    pcam = np.concatenate(
        [
            read_rows(h, 0, h.num_rows)["image"]
            for h in map(lambda s: open_pcam(root, s), available_splits(root))
        ]
    )
    results: dict = {"clean": {}, "arms": {}}
    for name, tiles in (("slide tiles", clean_slide), ("PCam patches", pcam)):
        reasons = Counter(reject_reasons(tiles, qcfg).tolist())
        results["clean"][name] = {
            "tiles": len(tiles),
            **{k or "kept": v for k, v in reasons.items()},
        }
    print("clean tissue: share removed, by reason")
    for name, row in results["clean"].items():
        n = row["tiles"]
        parts = ", ".join(
            f"{k} {v / n:.1%}" for k, v in sorted(row.items()) if k not in ("tiles", "kept")
        )
        print(f"  {name:<14} {n:>5} tiles: {parts or 'none'}")
    print("painted artefacts: affected tissue tiles removed (by reason)")
    for name, (img, cover) in painted(canvas).items():
        sel = affected(name, cover) & keep
        reasons = Counter(reject_reasons(grid(img)[sel], qcfg).tolist())
        n = int(sel.sum())
        removed = n - reasons.get("", 0)
        results["arms"][name] = {"tiles": n, **{k or "kept": v for k, v in reasons.items()}}
        parts = ", ".join(f"{k} {v}" for k, v in reasons.most_common() if k)
        print(f"  {name:<26} {removed:>3}/{n:<3} {removed / max(n, 1):>6.0%}  ({parts})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
