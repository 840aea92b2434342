"""Measurement: what the quality filter flags on real tissue with painted slide artefacts.

    python benchmarks/slide_artefacts.py            # about a minute on 2 cores

Real tissue: the sample slide (``meddiff data sample-wsi``, scikit-image's IHC colon tissue) at
10x, cut into the 96-px grid, and the sample PCam set (all splits). Artefacts are painted on the
10x slide image with :mod:`meddiff.data.samples` (pen strokes of each ink at two densities,
folds, out-of-focus regions, bubbles, a coverslip edge) with fixed seeds; a tissue tile is
*affected* when at least half of it is under the artefact (its painter's mask; for bubbles and
the edge: when the rim crosses it, 15-85% of it empty).

Prints, per artefact, the share of affected tissue tiles the filter removes and under which
reason, and the share of the clean tiles (slide tiles and PCam patches) each reason removes.

Then whole slides (skip with ``--no-slides``): the sample slide with one stroke of each ink
(density 0.85, 320 px wide at 20x), written as a pyramid and tiled as ``prompts build`` does:
of the tissue tiles the stroke covers at least half, how many tissue detection flags as ink and
how many the filter then removes (and why); and of the tiles it does not touch, how many either
flags. The filter is the tiny preset's (:func:`meddiff.morphology.quality.reject_reasons`).
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
    from meddiff.data.wsi import open_slide

    path = sample_wsi(Path(tempfile.mkdtemp(prefix="artefacts-")), seed=seed)
    with open_slide(path) as slide:
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


def whole_slides(qcfg, wcfg) -> dict:
    """Tissue detection + quality filter on the sample slide with one stroke of each ink."""
    from meddiff.data import samples as s
    from meddiff.data.samples import sample_wsi
    from meddiff.data.wsi import TILE_KINDS, open_slide, plan_slide, read_tiles, write_pyramid_tiff
    from meddiff.morphology.quality import reject_reasons

    work = Path(tempfile.mkdtemp(prefix="artefact-slides-"))
    with open_slide(sample_wsi(work)) as slide:
        w, h = slide.level_dimensions[0]
        level0 = slide.read(0, 0, 0, w, h)
    out: dict = {}
    print(
        "whole slide, one stroke each: covered tissue tiles flagged at tissue detection / removed"
    )
    for i, (ink, colour) in enumerate([("none", None), *s.PEN_INKS.items()]):
        img, cover = level0, np.zeros(level0.shape[:2], np.float32)
        if colour is not None:
            rng = np.random.default_rng(10 + i)
            img, cover = s.paint_pen_stroke(level0, colour, rng, width=320, edge=6)
        path = write_pyramid_tiff(work / f"{ink}.svs", img, mpp=0.5, magnification=20)
        plan = plan_slide(path, wcfg)
        size = plan.read_size * round(plan.level_downsample)
        share = np.array([cover[y : y + size, x : x + size].mean() for _, x, y in plan.tiles])
        flags = np.asarray(TILE_KINDS, dtype=object)[plan.kinds]
        images = np.concatenate([b["image"] for b in read_tiles(plan)])
        reasons = reject_reasons(images, qcfg, flags)
        hit, clean = share >= 0.5, share == 0
        row = {
            "covered": int(hit.sum()),
            "flagged": int((flags[hit] == "ink").sum()),
            "removed": dict(Counter(reasons[hit].tolist())),
            "clean": int(clean.sum()),
            "clean_flagged": int((flags[clean] != "").sum()),
            "clean_removed_as_artefact": int(
                np.isin(reasons[clean], ["ink", "fold", "bubble"]).sum()
            ),
        }
        out[ink] = row
        gone = row["covered"] - row["removed"].get("", 0)
        why = ", ".join(f"{k} {v}" for k, v in Counter(reasons[hit].tolist()).most_common() if k)
        print(
            f"  {ink:<7} covered {row['covered']:>3}: flagged {row['flagged']:>3}, removed "
            f"{gone:>3} ({why or '-'}); untouched {row['clean']:>3}: flagged "
            f"{row['clean_flagged']}, removed as an artefact {row['clean_removed_as_artefact']}"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--no-slides", action="store_true", help="skip the whole-slide part")
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
    if not args.no_slides:
        results["slides"] = whole_slides(qcfg, load_config("tiny").data.wsi)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
