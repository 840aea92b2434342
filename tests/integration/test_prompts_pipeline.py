"""build_prompts end to end on real-tissue samples through the shared local Ray."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from meddiff.config import load_config
from meddiff.data.pcam import write_pcam
from meddiff.data.shards import load_shards, read_manifest
from meddiff.errors import DataError
from meddiff.morphology.cluster import MorphologyModel
from meddiff.morphology.pipeline import build_prompts

QUIET = ["--set", "runtime.progress=false"]
JOB = Path(__file__).resolve().parents[2] / "jobs" / "build_prompts.py"
PROMPT = re.compile(r"^Histology image of (healthy|cancer) tissue, morphology type ([a-z-]+)$")


def _cfg(*overrides: str):
    return load_config("tiny", overrides=["runtime.progress=false", *overrides])


def test_job_builds_morphology_prompts_and_resumes(sample_pcam_dir, tmp_path, capsys):
    import importlib.util

    import mlflow

    spec = importlib.util.spec_from_file_location("build_prompts_job", JOB)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)

    out = tmp_path / "morph"
    args = ["--preset", "tiny", "--input", str(sample_pcam_dir), "--out", str(out), *QUIET]
    # k larger than the data: a clear error, and nothing that looks complete.
    assert job.main([*args, "--set", "prompts.cluster.k=500"]) == 2
    assert "prompts.cluster.k = 500 is larger than the number of patches" in capsys.readouterr().err
    assert not out.exists() and (tmp_path / "morph.partial").is_dir()

    # Fixed k: the run resumes after the embedding pass and completes.
    assert job.main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed"] is True and summary["k"] == 33 and summary["mode"] == "exact"
    assert not (tmp_path / "morph.partial").exists() and not (out / "_work").exists()
    assert summary["rows_in"] == 128 == summary["kept"] + summary["removed"]["total"]

    pairs = load_shards(out / "pairs")
    assert set(pairs) >= {
        "image",
        "label",
        "cluster",
        "prompt",
        "source",
        "index",
        "level",
        "x",
        "y",
    }
    assert len(pairs["image"]) == summary["kept"] and pairs["image"].shape[1:] == (96, 96, 3)
    assert pairs["cluster"].min() >= 0 and pairs["cluster"].max() < 33
    from meddiff.prompts import number_to_words

    for label, cluster, prompt in zip(
        pairs["label"], pairs["cluster"], pairs["prompt"], strict=True
    ):
        m = PROMPT.match(prompt)
        assert m and m.group(1) == ["healthy", "cancer"][label]
        assert m.group(2) == number_to_words(cluster)

    with open(out / "prompts.csv", newline="") as f:
        table = list(csv.DictReader(f))
    distinct = {(int(c), int(lab)) for c, lab in zip(pairs["cluster"], pairs["label"], strict=True)}
    assert len(table) == len(distinct) == summary["prompts"] <= 66
    assert sum(int(r["count"]) for r in table) == summary["kept"]
    sizes = summary["cluster_sizes"]
    assert sum(v["total"] for v in sizes.values()) == summary["kept"]

    # The saved model records its embedder (the tiny preset's trained EfficientNet-Lite0, named in
    # the summary) and re-assigns the same clusters with it.
    from meddiff.config.prompts import EmbedConfig
    from meddiff.morphology.embed import PatchEmbedder

    model = MorphologyModel.load(out / "morphology_model")
    embed_cfg = EmbedConfig.model_validate(model.info["embedder"])
    assert embed_cfg.weights == "meddiff:efficientnet-lite0" == _cfg().prompts.embed.weights
    assert summary["embedder"].startswith(
        "tf_efficientnet_lite0 (224px; meddiff:efficientnet-lite0"
    )
    emb = PatchEmbedder(embed_cfg).embed(pairs["image"][:16])
    assert np.array_equal(model.assign(emb), pairs["cluster"][:16])

    # `prompts assign`: new patches through the saved model (no refit) get the same types.
    from meddiff.cli import main as cli_main

    again = tmp_path / "assigned"
    rc = cli_main(
        ["prompts", "assign", "--model", str(out / "morphology_model"), "--preset", "tiny",
         "--input", str(sample_pcam_dir), "--limit", "40", "--out", str(again), *QUIET]
    )  # fmt: skip
    assert rc == 0
    new = load_shards(again / "pairs")
    first = dict(zip(pairs["index"].tolist(), pairs["cluster"].tolist(), strict=True))
    assert len(new["index"]) > 30
    assert [first[i] for i in new["index"].tolist()] == new["cluster"].tolist()
    assert json.loads((again / "summary.json").read_text())["mode"] == "reused"

    page = (out / "gallery.html").read_text()
    images = re.findall(r"src=[\"'](gallery/[^\"']+)[\"']", page)
    assert "tf_efficientnet_lite0" in page  # the gallery names the network
    assert len(images) >= len(table) and all((out / p).is_file() for p in images)

    runs = mlflow.search_runs(
        experiment_names=["meddiff"], filter_string="tags.`meddiff.job` = 'prompts'"
    )
    done = runs[runs["status"] == "FINISHED"]  # the build and the assign run
    assert (done["metrics.kept"] == summary["kept"]).any()
    assert (done["params.embedder"] == summary["embedder"]).all()  # build and assign: same net
    assert (runs["status"] == "FAILED").any()  # the k=500 attempt is recorded as failed
    assert summary["registered_model"].startswith("models:/meddiff-morphology/")


def test_baseline_strategy_and_reuse_of_a_fitted_model(sample_pcam_dir, tmp_path):
    base = build_prompts(
        _cfg("prompts.strategy=baseline"), sample_pcam_dir, tmp_path / "base", split="valid"
    )
    pairs = load_shards(tmp_path / "base" / "pairs")
    assert set(pairs["cluster"].tolist()) == {-1}
    assert set(pairs["prompt"].tolist()) <= {
        "Histology image of healthy tissue",
        "Histology image of cancer tissue",
    }
    assert base["prompts"] == len(set(pairs["label"].tolist()))
    assert not (tmp_path / "base" / "morphology_model").exists()
    with pytest.raises(DataError, match="already exists"):
        build_prompts(_cfg("prompts.strategy=baseline"), sample_pcam_dir, tmp_path / "base")


def test_empty_after_filter_and_wrong_patch_size(tmp_path):
    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal(236, 2, (24, 96, 96, 3)), 0, 255).astype(np.uint8)
    write_pcam(tmp_path / "glass", "train", glass, np.zeros(24, np.uint8))
    with pytest.raises(DataError, match="no patches left after the quality filter.*all 24 removed"):
        build_prompts(_cfg(), tmp_path / "glass", tmp_path / "out")
    assert not (tmp_path / "out").exists()

    small = np.clip(rng.normal(150, 40, (8, 64, 64, 3)), 0, 255).astype(np.uint8)
    write_pcam(tmp_path / "small", "train", small, np.zeros(8, np.uint8))
    with pytest.raises(DataError, match=r"camelyonpatch.*\(64, 64, 3\); expected uint8 96x96"):
        build_prompts(_cfg("data.pcam.patch_size=64"), tmp_path / "small", tmp_path / "out2")


def test_missing_weights_path_fails_before_any_work(sample_pcam_dir, tmp_path, capsys):
    from meddiff.cli import main

    rc = main(
        [
            "prompts", "build", "--preset", "tiny", "--input", str(sample_pcam_dir),
            "--out", str(tmp_path / "w"), "--set", "prompts.embed.weights=/no/such/dino.pth", *QUIET,
        ]
    )  # fmt: skip
    assert rc == 2
    assert "/no/such/dino.pth (prompts.embed.weights) does not exist" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_slides_to_shards_to_prompts(tmp_path):
    """Whole-slide path: tile a real-tissue slide with pen marks into shards (CLI), then build
    prompts on them: ink tiles are flagged at tiling, removed and counted, and shown."""
    from meddiff.cli import main
    from meddiff.data.samples import sample_wsi

    slides = tmp_path / "slides"
    sample_wsi(slides, width=2048, height=1536, seed=1, pen_strokes=2)
    (slides / "labels.csv").write_text("slide,label\nsample_slide.svs,1\n")
    shards = tmp_path / "shards"
    rc = main(
        ["data", "ingest", "--input", str(slides), "--out", str(shards), "--preset", "tiny",
         "--set", "data.wsi.tiles_per_task=16", *QUIET]
    )  # fmt: skip
    assert rc == 0
    manifest = read_manifest(shards)
    tiles = load_shards(shards)
    assert manifest["rows"] == len(tiles["image"]) > 16 and manifest["labels"] == {
        "1": manifest["rows"]
    }
    assert set(tiles["level"].tolist()) == {1} and (tiles["x"] % 192 == 0).all()
    assert set(tiles["reader"].tolist()) == {"tiffslide"}  # the reader, in every tile's provenance
    inked = int((tiles["artefact"] == "ink").sum())
    assert inked >= 3 and set(tiles["artefact"].tolist()) == {"", "ink"}
    assert len(set(zip(tiles["x"].tolist(), tiles["y"].tolist(), strict=True))) == manifest["rows"]

    # Streaming mini-batch K-means here (the exact mode is covered above): the same outputs.
    cfg = _cfg(
        "prompts.cluster.k=4", "prompts.cluster.mode=streaming", "prompts.cluster.batch_size=32"
    )
    summary = build_prompts(cfg, shards, tmp_path / "prompts")
    pairs = load_shards(tmp_path / "prompts" / "pairs")
    assert (
        summary["k"] == 4 and summary["mode"] == "streaming" and summary["silhouette"] is not None
    )
    assert set(pairs["label"].tolist()) == {1}
    assert summary["removed"]["by_reason"]["ink"] >= inked
    flagged = {int(i) for i, a in zip(tiles["index"], tiles["artefact"], strict=True) if a}
    assert not flagged & set(pairs["index"].tolist())
    assert (tmp_path / "prompts" / "gallery" / "rejected_ink.png").is_file()
    assert set(pairs["source"].tolist()) == {str(slides / "sample_slide.svs")}
    assert summary["prompts"] == len(set(pairs["cluster"].tolist())) <= 4

    with pytest.raises(DataError, match="magnification 40x is not available"):
        build_prompts(_cfg("data.wsi.magnification=40"), slides, tmp_path / "p40")
    assert not Path(tmp_path / "p40").exists()


def test_unlabelled_slide_tiles_get_prompts_that_read_back(tmp_path):
    """Tiles of a slide without labels.csv have label -1: the stage's table must read back, the
    gallery names the column, and generation refuses a table with no labelled prompt (issue 12)."""
    from meddiff.data.samples import sample_wsi
    from meddiff.prompts import read_prompt_table
    from meddiff.synthesis.generate import generation_plan

    slides = tmp_path / "slides"
    sample_wsi(slides, width=2048, height=1536, seed=1)
    cfg = _cfg("prompts.cluster.k=3", "data.wsi.tiles_per_task=16")
    out = tmp_path / "prompts"
    summary = build_prompts(cfg, slides, out, limit=48)
    assert set(summary["cluster_sizes"]["0"]) == {"-1", "total"}
    table = read_prompt_table(out / "prompts.csv", cfg.prompts)
    assert {r.label for r in table} == {-1} and len(table) == summary["prompts"] <= 3
    assert all(
        r.prompt.startswith("Histology image of unlabelled tissue, morphology type") for r in table
    )
    pairs = load_shards(out / "pairs")
    assert set(pairs["prompt"].tolist()) == {r.prompt for r in table}
    assert "unlabelled (label -1)" in (out / "gallery.html").read_text()
    with pytest.raises(DataError, match="every prompt is unlabelled"):
        generation_plan(table, cfg.synthesis.generate, cfg.prompts)
