"""Slide artefacts on real tissue: pen strokes of several inks, folds, out-of-focus regions and
bubbles painted on the sample slide's IHC tissue (realistic alpha-blended strokes), found by the
quality filter and by whole-slide tissue detection; clean tissue is kept."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from meddiff.config import load_config
from meddiff.config.data import WsiConfig
from meddiff.data import samples, wsi
from meddiff.data.artefacts import mask_artefacts, patch_artefacts
from meddiff.morphology.quality import QualityFilter, reject_reasons

TILE = 96


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    """A 2048×1536 slide at 20x of real IHC tissue on glass (levels 20x, 10x, 5x)."""
    return samples.sample_wsi(tmp_path_factory.mktemp("slides"), width=2048, height=1536, seed=3)


@pytest.fixture(scope="module")
def level0(slide) -> np.ndarray:
    with wsi.open_slide(slide) as s:
        return s.read(0, 0, 0, 2048, 1536)


@pytest.fixture(scope="module")
def canvas(level0) -> np.ndarray:
    """The slide at 10x (1024×768), by 2×2 area averages as the pyramid holds it."""
    return level0.reshape(768, 2, 1024, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)


@pytest.fixture(scope="module")
def quality():
    return load_config("tiny").prompts.filter


def _grid(img: np.ndarray) -> np.ndarray:
    rows, cols = img.shape[0] // TILE, img.shape[1] // TILE
    cut = img[: rows * TILE, : cols * TILE].reshape(rows, TILE, cols, TILE, *img.shape[2:])
    return cut.swapaxes(1, 2).reshape(rows * cols, TILE, TILE, *img.shape[2:])


def _share(mask: np.ndarray) -> np.ndarray:
    return _grid(mask[..., None].astype(np.float32))[..., 0].reshape(-1, TILE * TILE).mean(axis=1)


def _tissue(canvas: np.ndarray) -> np.ndarray:
    """Grid tiles at least half stained (OD above 0.15)."""
    od = -np.log(np.maximum(canvas.astype(np.float32), 1) / 255)
    return _share(np.linalg.norm(od, axis=-1) > 0.15) >= 0.5


def test_clean_tissue_is_kept(canvas, quality):
    """No clean tissue tile nor sample PCam patch is taken for an artefact."""
    import tempfile

    from meddiff.data.pcam import open_pcam, read_rows

    tiles = _grid(canvas)[_tissue(canvas)]
    root = Path(tempfile.mkdtemp(prefix="clean-pcam-"))
    samples.sample_pcam(root, samples.SampleSizes(384, 0, 0))
    pcam = read_rows(open_pcam(root, "train"), 0, 384)["image"]
    for name, patches in (("slide tiles", tiles), ("PCam patches", pcam)):
        # What the test reports when it fails is the false-positive rate on clean tissue.
        found = Counter(patch_artefacts(patches).tolist())
        assert found == {"": len(patches)}, f"{name}: {found} of {len(patches)}"
    assert len(tiles) >= 25
    # The whole filter keeps most of it (its paper tests remove a few pale or blurred ones).
    kept = (reject_reasons(tiles, quality) == "").mean()
    assert kept > 0.9


@pytest.mark.parametrize("ink", ["blue", "navy", "green", "teal", "black", "red"])
def test_pen_strokes_are_ink(canvas, quality, ink):
    rng = np.random.default_rng(sorted(samples.PEN_INKS).index(ink))
    img, cover = canvas, np.zeros(canvas.shape[:2], np.float32)
    tissue = _tissue(canvas)
    while ((_share(cover) >= 0.5) & tissue).sum() < 8:  # strokes until enough cross tissue
        img, c = samples.paint_pen_stroke(img, samples.PEN_INKS[ink], rng, width=140, density=0.85)
        cover = np.maximum(cover, c)
    share = _share(cover)
    covered = (share >= 0.5) & tissue
    reasons = reject_reasons(_grid(img)[covered], quality)
    # Where dense ink leaves too little light to see tissue, the patch is "dark" (first test).
    assert np.isin(reasons, ["ink", "dark"]).mean() >= 0.9, Counter(reasons.tolist())
    assert (reasons == "ink").mean() >= (0.3 if ink == "black" else 0.75)
    untouched = reject_reasons(_grid(img)[(share == 0) & tissue], quality)
    assert "ink" not in set(untouched.tolist())


def test_stain_coloured_ink_is_removed_when_dense(canvas, quality):
    """Violet ink is hematoxylin's colour: found by density, as ink or (a double layer) fold."""
    rng = np.random.default_rng(11)
    img, cover = samples.paint_pen_stroke(canvas, samples.PEN_INKS["violet"], rng, width=200)
    covered = (_share(cover) >= 0.5) & _tissue(canvas)
    reasons = reject_reasons(_grid(img)[covered], quality)
    assert np.isin(reasons, ["ink", "fold"]).mean() >= 0.7, Counter(reasons.tolist())


def test_out_of_focus_regions_are_blurry(canvas, quality):
    img, weight = samples.blur_region(canvas, np.random.default_rng(2), sigma=3.0, radius=300)
    covered = (_share(weight > 0.99) >= 0.9) & _tissue(canvas)
    assert covered.sum() >= 5
    reasons = reject_reasons(_grid(img)[covered], quality)
    assert (reasons != "").mean() >= 0.85 and (reasons == "blurry").mean() >= 0.7, Counter(
        reasons.tolist()
    )


def test_folds_are_flagged(canvas, quality):
    """A fold doubles the section's density; on this dense IHC tissue the patch test finds only
    the denser part of it (about a third of the fold's tiles; benchmarks/slide_artefacts.py)."""
    found, total = Counter(), 0
    for seed in range(2):
        img, band = samples.paint_fold(canvas, np.random.default_rng(seed), width=300)
        covered = (_share(band) >= 0.5) & _tissue(canvas)
        found.update(reject_reasons(_grid(img)[covered], quality).tolist())
        total += int(covered.sum())
    assert total >= 10 and found["fold"] >= 0.2 * total, (found, total)


def test_bubbles_and_glass_edges_are_flagged(canvas, quality):
    rng = np.random.default_rng(4)
    img, disc = canvas, np.zeros(canvas.shape[:2], np.float32)
    for centre in ((250, 300), (500, 700)):
        img, d = samples.paint_bubble(img, rng, radius=120, centre=centre)
        disc = np.maximum(disc, d)
    img, d = samples.paint_bubble(img, rng, radius=2000, centre=(2700, 500))  # a coverslip edge
    disc = np.maximum(disc, d)
    share = _share(disc)
    crossed = (share >= 0.15) & (share <= 0.85) & _tissue(canvas)
    assert crossed.sum() >= 5
    reasons = reject_reasons(_grid(img)[crossed], quality)
    assert (reasons == "bubble").mean() >= 0.6, Counter(reasons.tolist())


def test_slide_ink_is_flagged_at_tissue_detection(tmp_path, level0, slide):
    """Strokes on the slide: the tissue mask flags the tiles they cover (read with artefact
    "ink", counted in the plan), leaves the clean slide alone, and ink on glass is not tissue."""
    rng = np.random.default_rng(5)
    img, cover = level0, np.zeros(level0.shape[:2], np.float32)
    for ink in ("blue", "green", "red"):
        img, c = samples.paint_pen_stroke(img, samples.PEN_INKS[ink], rng, width=260, edge=6)
        cover = np.maximum(cover, c)
    painted = wsi.write_pyramid_tiff(tmp_path / "inked.svs", img, mpp=0.5, magnification=20)
    cfg = WsiConfig()
    clean = wsi.plan_slide(slide, cfg)
    assert clean.artefact_counts() == {} and (clean.kinds == 0).all()
    plan = wsi.plan_slide(painted, cfg)
    share = np.array([cover[y : y + 192, x : x + 192].mean() for _, x, y in plan.tiles])
    kinds = np.asarray(wsi.TILE_KINDS)[plan.kinds]
    assert (share >= 0.5).sum() >= 5
    assert (kinds[share >= 0.5] == "ink").mean() >= 0.8
    assert (kinds[share == 0] == "").all()
    assert plan.summary()["artefact_tiles"] == {"ink": int((kinds == "ink").sum())}
    blocks = list(wsi.read_tiles(plan))
    assert np.array_equal(np.concatenate([b["artefact"] for b in blocks]), kinds)
    # Switched off, ink is tissue again (saturated) and nothing is flagged.
    plain = wsi.plan_slide(painted, WsiConfig(artefacts=False))
    assert plain.artefact_counts() == {} and len(plain.tiles) >= (kinds == "").sum()


@pytest.mark.parametrize("pixels_per_tile", [4, 8, 16])
def test_mask_ink_rule_keeps_stained_tissue(slide, pixels_per_tile):
    """On the tissue mask's thumbnail, at coarser and finer mask resolutions than the default
    (8), no pixel of the clean slide is ink."""
    with wsi.open_slide(slide) as s:
        thumb = wsi._grid_thumbnail(s, 1, TILE, 10, 8, pixels_per_tile)
    assert not mask_artefacts(thumb).any()


def test_filter_stage_takes_the_slides_flags(canvas, quality):
    """A slide's artefact column becomes the reject reason (first) and leaves the batch."""
    tiles = _grid(canvas)[_tissue(canvas)][:4]
    batch = {"image": tiles, "artefact": np.array(["ink", "", "", ""], dtype=object)}
    out = QualityFilter(quality, 96)(batch)
    assert "artefact" not in out and out["reject"][0] == "ink"
    assert reject_reasons(tiles, quality, np.array(["", "ink", "", ""]))[1] == "ink"


def test_single_strip_tiff_is_decoded_once(tmp_path, level0, caplog):
    """A flat TIFF stored in one strip (as image editors write it): its tiles are cut from one
    decode of the strip, with a warning naming the slide, and equal tile-by-tile reads."""
    import tifffile

    path = tmp_path / "flat.tif"
    tifffile.imwrite(
        path, level0, photometric="rgb", rowsperstrip=level0.shape[0], compression="zlib",
        resolution=(2e4, 2e4), resolutionunit="CENTIMETER", metadata=None,
    )  # fmt: skip
    with wsi.open_slide(path) as s:
        assert s.segment_rows(0) == level0.shape[0]
    with caplog.at_level(logging.WARNING, logger="meddiff.data.wsi"):
        plan = wsi.plan_slide(path, WsiConfig())
    assert "flat.tif is not tiled" in caplog.text
    assert plan.level == 0 and plan.read_size == 192
    reads = []
    real = wsi.Slide.read

    def counted(self, *args):
        reads.append(args)
        return real(self, *args)

    wsi.Slide.read = counted
    try:
        once = np.concatenate([b["image"] for b in wsi.read_tiles(plan)])
        n_once = len(reads)
        each = np.concatenate([b["image"] for b in wsi.read_tiles(plan, whole_segments=False)])
    finally:
        wsi.Slide.read = real
    assert n_once == 1 and len(reads) - n_once > 1
    assert np.array_equal(once, each)
