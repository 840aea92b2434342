"""Whole-slide tiling: sample slide, magnification, tissue detection, provenance, bad slides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from meddiff.config.data import WsiConfig
from meddiff.data import wsi
from meddiff.data.samples import ihc_tissue, sample_wsi
from meddiff.errors import DataError


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    """A 2048×1536 slide at 20x (levels 20x, 10x, 5x) of real IHC tissue on glass."""
    return sample_wsi(tmp_path_factory.mktemp("slides"), width=2048, height=1536, seed=3)


def test_sample_slide_has_pyramid_and_metadata(slide):
    import tiffslide

    with tiffslide.TiffSlide(slide) as s:
        assert s.level_dimensions == ((2048, 1536), (1024, 768), (512, 384))
        assert float(s.properties["tiffslide.objective-power"]) == 20
        assert float(s.properties["tiffslide.mpp-x"]) == pytest.approx(0.5)
        region = s.read_region((0, 0), 0, (64, 64), as_array=True)
    assert region.shape == (64, 64, 3) and region.dtype == np.uint8


def test_plan_at_10x_reads_level_1_and_keeps_tissue_tiles(slide):
    plan = wsi.plan_slide(slide, WsiConfig())
    assert (plan.level, plan.read_size, plan.cols, plan.rows) == (1, 96, 10, 8)
    assert plan.magnification == pytest.approx(10.0)
    n = len(plan.tiles)
    assert 0.2 * 80 < n < 0.9 * 80  # tissue in the middle, glass around it
    idx, x, y = plan.tiles.T
    # Provenance: grid index ↔ level-0 origin (the 10x tile spans 192 level-0 pixels).
    assert np.array_equal(x, (idx % plan.cols) * 192) and np.array_equal(
        y, (idx // plan.cols) * 192
    )
    assert 0 not in idx  # the top-left corner is glass
    # Every kept tile is mostly stained tissue, every dropped one mostly glass.
    with wsi.open_slide(slide) as s:

        def sat(i):
            r, c = divmod(i, plan.cols)
            px = s.read(c * 192, r * 192, 1, 96, 96).astype(float)
            return ((px.max(-1) - px.min(-1)) / np.maximum(px.max(-1), 1)).mean()

        kept = {int(i) for i in idx}
        dropped = [i for i in range(80) if i not in kept]
        assert min(sat(i) for i in kept) > max(0.05, np.median([sat(i) for i in dropped]))


def test_tiles_carry_pixels_and_provenance(slide):
    plan = wsi.plan_slide(slide, WsiConfig())
    blocks = list(wsi.read_tiles(plan, 0, None, rows_per_block=7))
    assert [len(b["image"]) for b in blocks[:-1]] == [7] * (len(blocks) - 1)
    tiles = np.concatenate([b["image"] for b in blocks])
    assert tiles.shape == (len(plan.tiles), 96, 96, 3)
    first = blocks[0]
    assert first["source"][0] == str(slide) and first["level"][0] == 1 and first["label"][0] == -1
    with wsi.open_slide(slide) as s:
        k = 3
        direct = s.read(int(first["x"][k]), int(first["y"][k]), 1, 96, 96)
    assert np.array_equal(first["image"][k], direct)


def test_magnification_choice(slide):
    five = wsi.plan_slide(slide, WsiConfig(magnification=5))
    assert (five.level, five.read_size, five.cols, five.rows) == (2, 96, 5, 4)
    # 8x has no level: read the 10x level with a 120-px window and resize to 96.
    eight = wsi.plan_slide(slide, WsiConfig(magnification=8))
    assert (eight.level, eight.read_size) == (1, 120)
    assert eight.magnification == pytest.approx(8.0)
    block = next(wsi.read_tiles(eight, 0, 4))
    assert block["image"].shape == (4, 96, 96, 3)
    twenty = wsi.plan_slide(slide, WsiConfig(magnification=20, tile_size=128))
    assert twenty.level == 0 and twenty.read_size == 128
    # Tissue area is about the same at every magnification: tile counts scale with the area.
    ten = wsi.plan_slide(slide, WsiConfig())
    assert 0.5 < (len(ten.tiles) / 4) / len(five.tiles) < 2.0
    with pytest.raises(DataError, match=r"magnification 40x is not available; level 0 is 20x"):
        wsi.plan_slide(slide, WsiConfig(magnification=40))


def test_bad_slides(tmp_path):
    text = tmp_path / "notes.svs"
    text.write_text("not a slide")
    with pytest.raises(DataError, match=r"notes\.svs is not a whole-slide image"):
        wsi.plan_slide(text, WsiConfig())
    with pytest.raises(DataError, match="does not exist"):
        wsi.plan_slide(tmp_path / "missing.svs", WsiConfig())
    glass = np.full((768, 1024, 3), 238, np.uint8)
    blank = wsi.write_pyramid_tiff(tmp_path / "blank.tif", glass, mpp=0.5, magnification=20)
    with pytest.raises(DataError, match=r"blank\.tif: no tissue found"):
        wsi.plan_slide(blank, WsiConfig())
    img = ihc_tissue().repeat(2, 0).repeat(2, 1)
    bare = wsi.write_pyramid_tiff(tmp_path / "bare.tif", img, mpp=None, magnification=None)
    with pytest.raises(DataError, match=r"bare\.tif: magnification unknown.*base_magnification"):
        wsi.plan_slide(bare, WsiConfig())
    plan = wsi.plan_slide(bare, WsiConfig(base_magnification=20))
    assert plan.magnification_source == "data.wsi.base_magnification" and plan.level == 1
    tiny = wsi.write_pyramid_tiff(tmp_path / "tiny.tif", img[:64, :64], mpp=0.5, magnification=20)
    with pytest.raises(DataError, match="smaller than one"):
        wsi.plan_slide(tiny, WsiConfig())


def test_slide_files_and_labels(tmp_path, slide):
    (tmp_path / "a.svs").write_bytes(slide.read_bytes())
    (tmp_path / "b.tif").write_bytes(slide.read_bytes())
    (tmp_path / "readme.txt").write_text("x")
    cfg = WsiConfig()
    files = wsi.slide_files(tmp_path, cfg)
    assert [p.name for p in files] == ["a.svs", "b.tif"]
    assert wsi.is_slide_input(tmp_path, cfg) and wsi.is_slide_input(files[0], cfg)
    assert wsi.slide_labels(tmp_path, files, cfg) == {}
    (tmp_path / "labels.csv").write_text("slide,label\na.svs,1\nb.tif,0\n")
    assert wsi.slide_labels(tmp_path, files, cfg) == {"a.svs": 1, "b.tif": 0}
    (tmp_path / "labels.csv").write_text("slide,label\na.svs,tumour\n")
    with pytest.raises(DataError, match="line 2.*not an integer"):
        wsi.slide_labels(tmp_path, files, cfg)


def _tiff_with_resolution(path: Path, rgb: np.ndarray, resolution: float, unit: str) -> Path:
    """A generic tiled TIFF (no scanner description) whose only pixel size is its resolution tags,
    as image editors write them."""
    import tifffile

    tifffile.imwrite(
        path, rgb, tile=(256, 256), photometric="rgb", resolution=(resolution, resolution),
        resolutionunit=unit, metadata=None,
    )  # fmt: skip
    return path


@pytest.mark.parametrize(
    ("resolution", "unit", "mpp"), [(72, "INCH", 352.778), (1, "CENTIMETER", 1e4)]
)
def test_implausible_resolution_tags_are_named_and_the_setting_wins(
    tmp_path, resolution, unit, mpp
):
    img = ihc_tissue().repeat(2, 0).repeat(2, 1)
    path = _tiff_with_resolution(tmp_path / "edited.tif", img, resolution, unit)
    with wsi.open_slide(path) as s:
        assert float(s.property("mpp-x")) == pytest.approx(mpp, rel=1e-3)
    with pytest.raises(DataError) as err:
        wsi.plan_slide(path, WsiConfig())
    msg = str(err.value)
    assert (
        "edited.tif" in msg and f"{mpp:g}" in msg and "outside what slide scanners produce" in msg
    )
    assert "--set data.wsi.base_magnification=" in msg
    plan = wsi.plan_slide(path, WsiConfig(base_magnification=20))
    assert plan.magnification_source == "data.wsi.base_magnification"
    assert plan.base_magnification == 20 and plan.magnification == pytest.approx(10)


def test_explicit_base_magnification_wins_over_plausible_metadata(slide):
    """The sample slide says 20x; a user who knows better (a 40x scan with a wrong header) wins."""
    plan = wsi.plan_slide(slide, WsiConfig(base_magnification=40))
    assert plan.magnification_source == "data.wsi.base_magnification"
    assert plan.base_magnification == 40 and plan.level == 2
    assert wsi.plan_slide(slide, WsiConfig()).magnification_source == "objective-power"


def test_data_inspect_takes_set(tmp_path, capsys):
    """The command that suggests data.wsi.base_magnification accepts it."""
    import json

    from meddiff.cli import main

    img = ihc_tissue().repeat(2, 0).repeat(2, 1)
    path = _tiff_with_resolution(tmp_path / "edited.tif", img, 72, "INCH")
    assert main(["data", "inspect", str(path)]) == 2
    assert "base_magnification" in capsys.readouterr().err
    code = main(["data", "inspect", str(path), "--set", "data.wsi.base_magnification=20"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary[str(path)]["magnification_from"] == "data.wsi.base_magnification"


def test_every_command_that_reads_config_accepts_set():
    """Each leaf command takes --set, except those that read no configuration at all."""
    import argparse

    from meddiff.cli import build_parser

    no_config = {"config presets", "data sample-pcam", "data sample-wsi", "eval reader-study score"}
    no_config |= {"data sample-volume"}
    no_config |= {"eval seeds"}  # reads finished runs' tables only
    # The services' settings live in the Serve config file these two take (the shipped tiny.yaml).
    no_config |= {"serve run", "serve check"}
    no_config |= {"serve token"}  # edits the credentials file only

    def leaves(parser, prefix=()):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield " ".join(prefix), parser
        for action in subs:
            for name, child in action.choices.items():
                yield from leaves(child, (*prefix, name))

    found = dict(leaves(build_parser()))
    assert "data inspect" in found and no_config <= set(found)
    missing = [
        name
        for name, p in found.items()
        if name not in no_config and "--set" not in p._option_string_actions
    ]
    assert not missing, missing
