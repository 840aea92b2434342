"""The main job's evaluation step: judges the synthetic set the synthesis step made."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval_helpers import make_synthetic
from meddiff.config import load_config
from meddiff.demo.evaluate_step import evaluate_demo


@pytest.mark.slow
def test_evaluate_demo_step_writes_report_and_resumes(
    sample_pcam_dir: Path, tmp_path: Path, capsys
):
    cfg = load_config(
        "tiny",
        overrides=[
            "runtime.progress=false",
            "evaluation.classifier.max_steps=10",
            "evaluation.classifier.arms=[synthetic]",
            "evaluation.features.max_images=32",  # the Inception on a CPU: keep it to a minute
        ],  # fmt: skip
    )
    synth = make_synthetic(sample_pcam_dir, tmp_path / "gen", shift=5, noise=2)
    out = tmp_path / "evaluation"
    summary = evaluate_demo(cfg, sample_pcam_dir, (synth, "train"), None, out, classifier=False)
    report = Path(summary["report"])
    assert report.is_file() and "Coverage" in report.read_text()
    assert "Memorization audit" in report.read_text()
    assert summary["network"] == "inception"  # the tiny preset's FID is the real one
    metrics = summary["metrics"]
    assert metrics["fid"] > 0 and 0 <= metrics["copy_rate"] <= 1
    assert metrics["coverage"] > 0  # near-copies of the real patches
    assert "Evaluation: FID (TF-FID Inception-v3)" in capsys.readouterr().out
    assert Path(summary["reader_study"]).is_file()
    assert json.loads((out / "summary.json").read_text()) == summary
    # Resumes: a second call returns the recorded summary without recomputing.
    report.unlink()
    again = evaluate_demo(cfg, sample_pcam_dir, (synth, "train"), None, out, classifier=False)
    assert again == summary
    assert not report.exists()
