"""The report kit and every page made with it: what a reader relies on is on the page."""

from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

import report_pages as P
from meddiff.reports import (
    Provenance,
    encode_png,
    fmt,
    png_data_uri,
    provenance,
    render_source,
    write_index,
    write_page,
)
from meddiff.thor.report import pick_examples


class Page(HTMLParser):
    """Images (src, width), table cells (text) and the visible text of a page."""

    def __init__(self, html: str):
        super().__init__()
        self.imgs: list[dict[str, str]] = []
        self.cells: list[str] = []
        self.links: list[str] = []
        self.text: list[str] = []
        self._cell: list[str] | None = None
        self._skip = 0
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("p", "li", "div", "dt", "dd", "td", "th", "h1", "h2", "h3", "figcaption"):
            self.text.append(" ")  # a new block: words do not run together (<wbr> joins them)
        if tag == "img":
            self.imgs.append(a)
        elif tag == "a":
            self.links.append(a.get("href", ""))
        elif tag in ("td", "th"):
            self._cell = []
        elif tag in ("style", "script"):
            self._skip += 1
        elif tag == "br":
            self.handle_data(" ")

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.cells.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag in ("style", "script"):
            self._skip -= 1

    def handle_data(self, data):
        if self._skip:
            return
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    @property
    def words(self) -> str:
        return " ".join("".join(self.text).split())


def decode(uri: str) -> np.ndarray:
    from PIL import Image

    assert uri.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))


def test_png_data_uri_is_lossless_and_takes_arrays_bytes_and_files(tmp_path: Path):
    img = np.random.default_rng(1).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    assert np.array_equal(decode(png_data_uri(img)), img)
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert np.array_equal(decode(png_data_uri(encode_png(grey))), grey)
    (tmp_path / "a.png").write_bytes(encode_png(img))
    assert png_data_uri(tmp_path / "a.png") == png_data_uri(img)
    with pytest.raises(ValueError, match="float32"):
        encode_png(img.astype(np.float32))


def test_fmt_cells():
    assert fmt({"value": 0.123456, "ci": [0.1, 0.2]}) == "0.1235 [0.1, 0.2]"
    assert fmt({"skipped": "too few"}) == "too few"
    assert fmt(None) == "–" and fmt(float("nan")) == "–" and fmt(np.int64(3)) == "3"
    assert fmt(12.0) == "12" and fmt("a<b") == "a<b"


def test_pages_escape_text_and_state_what_made_them(tmp_path: Path):
    page = write_page(tmp_path / "p.html", "evaluation.html", title="<script>x</script>",
                      blocks=[{"kind": "paragraph", "text": "a & <b>", "cls": ""}],
                      provenance=P.PROV)  # fmt: skip
    html = page.read_text()
    assert "<script>x</script>" not in html and "&lt;script&gt;x&lt;/script&gt;" in html
    assert "a &amp; &lt;b&gt;" in html
    words = Page(html).words
    for value in ("0123456789ab", "models:/meddiff-thor/3", "0.1.0+git.abc1234", "2026-11-30"):
        assert value in words
    assert "meddiff demo --out runs/demo" in words
    assert "image-rendering:pixelated" in html and "@media print" in html
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", html)  # nothing fetched from a CDN
    assert [p.name for p in tmp_path.iterdir()] == ["p.html"]  # no temporary file left


def test_provenance_digest_follows_the_config(tiny_cfg):
    from meddiff.config import load_config

    a, b = provenance(tiny_cfg, model="m"), provenance(tiny_cfg)
    assert a.config_digest == b.config_digest and len(a.config_digest) == 12
    other = load_config("tiny", overrides=["runtime.seed=7"])
    assert provenance(other).config_digest != a.config_digest
    assert a.model == "m" and a.code_version and a.time.endswith("+00:00")


def test_a_page_that_is_not_a_file_extends_the_base():
    html = render_source(
        '{% extends "base.html" %}{% block content %}<p>{{ x }}</p>{% endblock %}',
        title="Served", provenance=Provenance(code_version="9.9"), x="<i>",
    )  # fmt: skip
    assert "<h1>Served</h1>" in html and "<p>&lt;i&gt;</p>" in html and "9.9" in html
    assert "overflow-x:auto" in html  # the shared CSS came along


def test_thor_report_shows_metrics_images_and_notes(tmp_path: Path):
    page = Page(P.thor_page(tmp_path).read_text())
    assert "residual-only" in page.words
    assert page.cells[:3] == ["method", "schedule", "map"]
    thor_row = page.cells[page.cells.index("thor") :]
    # Pixel AUPRC, then its chance level (the lesion pixel fraction), AUROC, Dice, image AUROC.
    assert thor_row[3:8] == ["0.432", "0.023", "0.901", "0.346", "0.777"] and "12.500" in thor_row
    assert "pixel_auprc_chance" in page.cells and "share of lesion pixels" in page.words
    # Per method one row of 4 pictures per example; slices are 32 px, shown at 64 px.
    shown = pick_examples(P.thor_inputs()["masks"], 6)
    assert len(shown) == 5 and len(page.imgs) == 2 * len(shown) * 4
    assert all(img["width"] == "64" for img in page.imgs)
    assert decode(page.imgs[0]["src"]).shape == (32, 32)
    assert decode(page.imgs[2]["src"]).shape == (32, 32, 3)  # the anomaly map, coloured
    assert "Images scaled by data.images.scaling=significant_bits: type: 16-bit (6 sampled)" in (
        page.words
    )
    assert "harmonization at [300, 150, 50]" in page.words and "slice_000.png" in page.cells


def test_gallery_shows_every_type_with_counts_prompts_and_pictures(tmp_path: Path):
    path = P.gallery_page(tmp_path)
    html = path.read_text()
    page = Page(html)
    srcs = [img["src"] for img in page.imgs]
    assert len(srcs) == 7 + 1  # seven filled cells and one quality-filter reason with examples
    assert all((path.parent / s).is_file() for s in srcs)
    assert page.cells.count("none") == 1
    assert any("Histology image of cancer tissue, type 3" in c for c in page.cells)
    assert "cancer (label 1)" in page.cells and "type 2 25 patches" in page.cells
    assert "0.1235" in page.cells and "3, 4" in page.cells  # stats formatted
    assert "Removed by the quality filter" in page.words and "blurry" in page.cells
    assert not list(path.parent.glob("*.tmp*"))


def test_evaluation_report_shows_metrics_with_intervals_and_the_network(tmp_path: Path):
    page = Page(P.evaluation_page(tmp_path).read_text())
    assert "RANDOM network" in page.words
    assert "123.5 [111.1, 135.8] (unreliable: fewer samples than feature dimensions)" in page.cells
    assert "Fréchet distance on 64 samples in 768 dimensions" in page.words
    assert "vit_base_patch8_224_dino_random (not the FID Inception" in page.words
    assert "fewer than 10 images" in page.cells  # a skipped stratum says why
    assert "Not computed: the synthetic set has no prompt column in its meta." in page.words
    assert [decode(i["src"]).shape for i in page.imgs] == [(490, 490, 3)] * 2 + [(394, 296, 3)]
    # The memorization audit: both spaces with Wilson intervals, then the closest pairs.
    assert "Memorization audit: baseline" in page.words
    assert "0.03125 [0.0086, 0.1068]" in page.cells and "features (inception)" in page.cells
    assert "nearest real in features | nearest real in pixels" in page.words


def test_reader_study_page_is_blinded_and_works_offline(tmp_path: Path):
    html = P.study_page(tmp_path).read_text()
    page = Page(html)
    assert [i["alt"] for i in page.imgs] == [f"img-{i:04d}" for i in range(1, 9)]
    assert all(decode(i["src"]).shape == (96, 96, 3) for i in page.imgs)
    assert all(i["width"] == "288" for i in page.imgs)
    assert '"study": "abcd1234abcd1234"' in html and "meddiff-reader-answers/1" in html
    assert "truth" not in html and "Download answers" in page.words


def test_index_links_each_report_relatively_and_flags_missing_ones(tmp_path: Path):
    html = P.index_page(tmp_path).read_text()
    page = Page(html)
    assert page.links == ["prompts/gallery.html", "thor/report.html",
                          "evaluation/report.html", "evaluation/reader_study/study.html"]  # fmt: skip
    assert all((tmp_path / link).is_file() for link in page.links)
    assert "missing page (missing)" in page.words
    assert any(c.startswith("failed DataError: yyy") for c in page.cells)
    assert "not run" in page.cells and "95.0 s" in page.cells
    assert f"FD ({P.FD}): 123.4 [110, 130]" in page.words
    assert page.cells[-3:] == ["ddpm", "0.21", "–"]


def test_index_of_a_job_folder_lists_its_pages_or_is_not_written(tmp_path: Path):
    from meddiff.reports import index_folder

    assert index_folder(tmp_path, "meddiff data ingest") is None
    assert not (tmp_path / "index.html").exists()
    P.thor_page(tmp_path)
    index = index_folder(tmp_path, "meddiff thor evaluate", seconds=4.0, figures={"images": 8})
    page = Page(index.read_text())
    assert page.links == ["thor/report.html"] and "images: 8" in page.words


def test_write_index_links_absolute_paths_too(tmp_path: Path):
    target = tmp_path / "sub dir" / "r.html"
    target.parent.mkdir()
    target.write_text("x")
    index = write_index(tmp_path, "t", [P.IndexStep("s", links={"r": target})])
    assert Page(index.read_text()).links == ["sub%20dir/r.html"]


def test_write_index_links_paths_relative_to_the_working_directory(tmp_path: Path, monkeypatch):
    """Jobs' summaries name their outputs relative to where the job ran (runs/demo/...)."""
    monkeypatch.chdir(tmp_path)
    out = Path("runs") / "demo"
    (out / "thor").mkdir(parents=True)
    (out / "thor" / "report.html").write_text("x")
    step = P.IndexStep("thor", links={"report": str(out / "thor" / "report.html")})
    page = Page(write_index(out, "t", [step]).read_text())
    assert page.links == ["thor/report.html"] and "(missing)" not in page.words


def test_demo_index_names_every_step_and_its_key_figures(tmp_path: Path, tiny_cfg):
    import json

    from meddiff.demo.index import write_demo_index

    thor = P.thor_inputs()
    report = P.thor_page(tmp_path)
    methods = {m: {"metrics": r["metrics"], "plan": r["plan"]} for m, r in thor["results"].items()}
    (report.parent / "metrics.json").write_text(json.dumps({"methods": methods}))
    gallery = P.gallery_page(tmp_path)
    results = {
        "sample-data": {"pcam": str(tmp_path / "data")},
        "prompts": {"prompts": 8, "kept": 100, "removed": 3, "k": 4, "gallery": str(gallery)},
        "thor": {
            "report": str(report),
            "train_steps": 120,
            "evaluated_model": "models:/thor-ddpm-shipped/1",
            "evaluated_model_steps": 480,
        },
        "evaluate": {
            "network": P.FD.removeprefix("fd_"),
            "report": str(tmp_path / "evaluation" / "report.html"),
            "metrics": {
                P.FD: 123.4,
                "precision": 0.6,
                "classifier_synthetic_auc": 0.71,
                "classifier_real+synthetic_auc": 0.83,
            },  # fmt: skip
        },
    }
    names = ["sample-data", "prompts", "thor", "evaluate", "after"]
    records = {n: {"status": "done", "seconds": 1.5} for n in names[:3]}
    records["evaluate"] = {"status": "failed", "seconds": 2.0, "error": "DataError: bad"}
    page = Page(write_demo_index(tiny_cfg, tmp_path, names, results, records).read_text())
    words = page.words
    assert "prompts found: 8" in words and "morphology types (k): 4" in words
    assert f"FD ({P.FD.removeprefix('fd_')}, not FID): 123.4" in words
    assert "classifier AUC, trained on synthetic: 0.71" in words
    assert "classifier AUC, trained on real+synthetic: 0.83" in words
    assert page.links == ["prompts/gallery.html", "thor/report.html"]
    assert "evaluation report (missing)" in words and "not run" in page.cells
    # THOR vs DDPM, one row per method, from the THOR step's metrics.json.
    assert "THOR vs DDPM (lesion benchmark)" in words
    at = page.cells.index("thor", page.cells.index("method", 5))
    assert page.cells[at + 2 : at + 4] == ["0.4321", "0.9012"] and "ddpm" in page.cells
    assert "Synthetic set vs real (evaluate step)" in words and "brief demo training" in words


def test_demo_index_and_printed_line_show_the_real_fid_and_the_copy_rate():
    from meddiff.demo.evaluate_step import headline
    from meddiff.demo.index import step_row

    metrics = {"fid": 93.12, "kid": 0.011, "precision": 0.5, "copy_rate": 0.0125}
    row = step_row("evaluate", {"network": "inception", "metrics": metrics}, "done", 1.0)
    assert row.figures == {
        "FID (TF-FID Inception-v3)": 93.12,
        "copy rate (memorization audit)": 0.0125,
    }
    assert headline(metrics) == "FID (TF-FID Inception-v3) 93.12, copy rate 0.0125"
    assert headline({P.FD: 4.5}) == f"{P.FD} 4.5"  # a stand-in network is never called FID


def test_a_command_names_itself_on_its_pages_and_indexes_its_out_folder(
    sample_pcam_dir: Path, tmp_path: Path, capsys
):
    from eval_helpers import make_synthetic
    from meddiff.cli import main
    from meddiff.reports import kit

    synth = make_synthetic(sample_pcam_dir, tmp_path / "synth", shift=8, n=12)
    out = tmp_path / "study"
    argv = ["eval", "reader-study", "export", "--real", str(sample_pcam_dir), "--synthetic",
            str(synth), "--out", str(out), "--num-real", "3", "--num-synthetic", "3",
            "--preset", "tiny"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    study = Page((out / "study.html").read_text())
    assert f"meddiff eval reader-study export --real {sample_pcam_dir}" in study.words
    assert len(study.imgs) == 6
    index = Page((out / "index.html").read_text())
    assert index.links == ["study.html"] and "meddiff eval reader-study export" in index.cells
    assert kit.COMMAND is None  # the next page this process makes is not credited to it
