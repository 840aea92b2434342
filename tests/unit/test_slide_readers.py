"""Slide readers: the sample slide read by tiffslide and by OpenSlide, and converted to DICOM-WSI,
gives the same tiles; the reader is in every tile's provenance; bad slides are named."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from meddiff.config.data import WsiConfig
from meddiff.data import wsi
from meddiff.data.samples import sample_wsi
from meddiff.data.slide_dicom import write_dicom_wsi
from meddiff.data.slides import choose_reader, is_dicom_wsi, open_slide
from meddiff.errors import DataError

# The DICOM frames re-encode the TIFF's decoded JPEG pixels (quality 95, 4:2:0 chroma): errors
# concentrate on colour edges. Measured on this slide: mean |diff| 0.98 grey levels, largest 13,
# lowest per-tile PSNR 43.3 dB (docs/wsi.md). The bounds leave room for another libjpeg build, and
# fail on what would matter: a tile taken from the wrong place (measured on this slide: the
# neighbouring tile 8-14 dB, the same tile shifted by 8 pixels 15-22 dB) or a wrong colour
# conversion (a mean error of tens of grey levels).
MAX_MEAN_ABS = 2.0
MIN_TILE_PSNR_DB = 38.0
MAX_ABS = 40


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, Path]:
    """The 2048×1536 sample slide at 20x (levels 20x, 10x, 5x) as SVS and as DICOM-WSI."""
    root = tmp_path_factory.mktemp("readers")
    svs = sample_wsi(root, width=2048, height=1536, seed=3)
    return {"svs": svs, "dicom": write_dicom_wsi(svs, root / "sample_slide_dicom")}


def _tiles(path: Path, reader: str) -> tuple[wsi.SlidePlan, dict[str, np.ndarray]]:
    plan = wsi.plan_slide(path, WsiConfig(reader=reader))
    blocks = list(wsi.read_tiles(plan, rows_per_block=13))
    return plan, {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}


def _decisions(plan: wsi.SlidePlan) -> tuple:
    return (plan.level, plan.read_size, plan.rows, plan.cols, plan.tiles.tolist(), plan.kinds)


def test_openslide_and_tiffslide_give_identical_tiles(slides):
    tiff, by_tiffslide = _tiles(slides["svs"], "auto")
    osl, by_openslide = _tiles(slides["svs"], "openslide")
    assert tiff.reader == "tiffslide" and osl.reader == "openslide"
    assert osl.reader_version.startswith("openslide 4.")
    assert _decisions(tiff)[:5] == _decisions(osl)[:5]
    assert np.array_equal(tiff.kinds, osl.kinds) and len(tiff.tiles) > 10
    assert np.array_equal(by_tiffslide["image"], by_openslide["image"])
    assert set(by_tiffslide["reader"]) == {"tiffslide"} and set(by_openslide["reader"]) == {
        "openslide"
    }
    for key in ("source", "index", "level", "x", "y", "artefact"):
        assert np.array_equal(by_tiffslide[key], by_openslide[key]), key


def test_dicom_wsi_of_the_sample_slide_gives_the_same_tiles(slides):
    dicom = slides["dicom"]
    assert sorted(p.name for p in dicom.iterdir()) == ["level-0.dcm", "level-1.dcm", "level-2.dcm"]
    with open_slide(dicom) as d, open_slide(slides["svs"]) as t:
        assert d.reader == "openslide" and d.property("vendor") == "dicom"
        assert d.level_dimensions == t.level_dimensions
        assert float(d.property("mpp-x")) == pytest.approx(float(t.property("mpp-x")))
    tiff, ref = _tiles(slides["svs"], "auto")
    plan, got = _tiles(dicom, "auto")
    # DICOM-WSI has no objective power: the same 20x comes from the pixel size (10 / 0.5 µm).
    assert plan.magnification_source == "mpp" and plan.base_magnification == pytest.approx(20)
    assert _decisions(plan)[:5] == _decisions(tiff)[:5]
    assert np.array_equal(plan.kinds, tiff.kinds)
    assert set(got["reader"]) == {"openslide"} and set(got["source"]) == {str(dicom)}
    a, b = ref["image"].astype(np.float64), got["image"].astype(np.float64)
    diff = np.abs(a - b)
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(axis=1)
    psnr = 10 * np.log10(255.0**2 / np.maximum(mse, 1e-12))
    assert diff.mean() <= MAX_MEAN_ABS and diff.max() <= MAX_ABS, (diff.mean(), diff.max())
    assert psnr.min() >= MIN_TILE_PSNR_DB, psnr.min()
    assert diff.max() > 0  # re-encoded: a test that compared a file with itself would not see this


def test_auto_reader_and_slide_collections(slides, tmp_path):
    assert choose_reader(slides["svs"]) == "tiffslide"
    assert choose_reader(slides["dicom"] / "level-0.dcm") == "openslide"
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(slides["svs"], folder / "a.svs")
    shutil.copytree(slides["dicom"], folder / "b")
    (folder / "notes").mkdir()  # a folder without DICOM instances is not a slide
    cfg = WsiConfig()
    assert [p.name for p in wsi.slide_files(folder, cfg)] == ["a.svs", "b"]
    assert wsi.slide_files(folder / "b", cfg) == [folder / "b"]
    assert wsi.is_slide_input(folder / "b", cfg) and wsi.is_slide_input(
        folder / "b/level-1.dcm", cfg
    )
    assert not wsi.is_slide_input(folder / "notes", cfg)
    (folder / "labels.csv").write_text("slide,label\na.svs,0\nb,1\n")
    assert wsi.slide_labels(folder, wsi.slide_files(folder, cfg), cfg) == {"a.svs": 0, "b": 1}


def test_an_mr_instance_is_not_a_slide(tmp_path):
    from pydicom import examples

    mr = tmp_path / "mr.dcm"
    examples.mr.save_as(mr)
    assert not is_dicom_wsi(mr) and not wsi.is_slide_input(tmp_path, WsiConfig())
    with pytest.raises(DataError, match=r"without VL Whole Slide Microscopy instances"):
        open_slide(tmp_path)


def test_unreadable_slides_are_named(tmp_path, slides, monkeypatch):
    text = tmp_path / "notes.ndpi"
    text.write_text("not a slide")
    with pytest.raises(DataError, match=r"notes\.ndpi is not a whole-slide image"):
        open_slide(text)
    with pytest.raises(DataError, match=r"notes\.ndpi: not a format OpenSlide reads"):
        open_slide(text, "openslide")
    with pytest.raises(DataError, match=r"notes\.ndpi is not a TIFF whole-slide image"):
        open_slide(text, "tiffslide")
    # A flat (stripped) TIFF: tiffslide reads it, OpenSlide does not.
    flat = tmp_path / "flat.tif"
    import tifffile

    tifffile.imwrite(flat, np.full((64, 64, 3), 200, np.uint8), photometric="rgb")
    assert choose_reader(flat) == "tiffslide"
    with pytest.raises(DataError, match=r"flat\.tif: not a format OpenSlide reads"):
        open_slide(flat, "openslide")
    with pytest.raises(DataError, match=r"level-0\.dcm is not a TIFF"):
        open_slide(slides["dicom"] / "level-0.dcm", "tiffslide")
    # Without OpenSlide: TIFFs still open with tiffslide, a DICOM slide names the packages.
    monkeypatch.setitem(sys.modules, "openslide", None)
    with open_slide(slides["svs"]) as s:
        assert s.reader == "tiffslide"
    with pytest.raises(DataError, match=r"level-0\.dcm: .*pip install openslide-python openslide"):
        open_slide(slides["dicom"] / "level-0.dcm")


def test_dicom_writer_refuses_a_folder_with_files(tmp_path, slides):
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(DataError, match="not an empty folder"):
        write_dicom_wsi(slides["svs"], tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep"


def test_sample_wsi_command_writes_dicom(tmp_path, capsys):
    from meddiff.cli import main

    args = ["data", "sample-wsi", str(tmp_path), "--width", "768", "--height", "512"]
    assert main([*args, "--format", "dicom"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["slide"] == str(tmp_path / "sample_slide") and out["reader"].startswith("openslide")
    assert out["levels"] == [[768, 512], [384, 256]] and float(out["mpp"]) == pytest.approx(0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample_slide"]  # no TIFF left behind
