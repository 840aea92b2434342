"""``meddiff eval`` end to end on the shared Ray: fidelity report, classifier arms, reader study,
and bad input as one-line errors with exit code 2."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from eval_helpers import make_synthetic
from meddiff.cli import main

TINY = ["--preset", "tiny", "--set", "runtime.progress=false"]
# Plumbing tests use the tiny stand-in ViT (fast); the first test runs the TF-FID Inception.
STAND_IN = [*TINY, "--set", "evaluation.features.network=dino"]


@pytest.fixture(scope="module")
def sets(sample_pcam_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("eval-sets")
    return {
        "baseline": make_synthetic(sample_pcam_dir, tmp / "baseline", shift=30, noise=6, seed=1),
        "morphology": make_synthetic(sample_pcam_dir, tmp / "morph", shift=4, noise=2, seed=2),
        "copies": make_synthetic(sample_pcam_dir, tmp / "copies"),  # the real patches as they are
    }


def _generated_by_registered_model(folder: Path, tmp_path: Path) -> str:
    """Register a (stand-in) synthesis model and name it in ``folder``'s summary.json, as
    ``synth generate`` does for a set it generated from the registry."""
    from meddiff.config import load_config
    from meddiff.tracking import register_model, start_run

    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    with start_run(load_config("tiny"), "synthesis-train"):
        version = register_model(model, "eval-cli-copier")
    ref = f"models:/eval-cli-copier/{version}"
    (folder / "summary.json").write_text(json.dumps({"model": ref, "model_version": ref}))
    return version


def test_fidelity_cli_fid_and_memorization_audit(sample_pcam_dir, sets, tmp_path: Path, capsys):
    out, js = tmp_path / "fid", tmp_path / "fid.json"
    version = _generated_by_registered_model(sets["copies"], tmp_path)
    rc = main(
        [
            "eval", "fidelity", "--real", str(sample_pcam_dir),
            *[f"--synthetic={name}={path}" for name, path in sets.items()],
            "--out", str(out), "--json", str(js), *TINY,
            # 32 images per set keep the Inception's CPU time to a minute.
            "--set", "evaluation.features.max_images=32",
        ]
    )  # fmt: skip
    assert rc == 0
    result = json.loads(js.read_text())
    assert result["network"] == "inception" and not result["note"]
    for name in sets:
        overall = result["sets"][name]["overall"]
        assert result["sets"][name]["is_fid"] and "kid" in overall
        assert not any(k.startswith("fd_") for k in overall)
        fid = overall["fid"]
        assert fid["ci"][0] <= fid["value"] <= fid["ci"][1]
        assert set(result["sets"][name]["by_label"]) == {"0", "1"}
    fid = {name: result["sets"][name]["overall"]["fid"]["value"] for name in sets}
    # The same 32 rows of each set: copies are at 0, the milder perturbation is closer.
    assert fid["copies"] == pytest.approx(0.0, abs=0.05)
    assert 0.05 < fid["morphology"] < fid["baseline"]
    copies = result["sets"]["copies"]["memorization"]
    assert copies["copy_rate"]["value"] == 1.0 and copies["copy_rate_pixels"]["value"] == 1.0
    assert copies["network"] == "inception" and copies["n_synthetic"] == 32
    # Recorded on the registry version that generated the set; promoting it is refused.
    assert copies["recorded_on"] == f"models:/eval-cli-copier/{version}"
    capsys.readouterr()
    assert main(["serve", "promote", "eval-cli-copier", version, *TINY]) == 2
    assert "copy rate 1 " in capsys.readouterr().err
    with open(out / "memorization" / "copies.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 32 and all(r["nearest_real_pixels"] == r["synthetic_index"] for r in rows)
    page = (out / "report.html").read_text()
    assert "Metric × strategy" in page and "Coverage" in page
    assert "Memorization audit: copies" in page and "nearest real in pixels" in page
    # UMAP + 4 sample grids + 3 closest-pair pictures.
    assert len(re.findall(r"data:image/png;base64,", page)) >= 8
    assert (out / "umap.png").stat().st_size > 1000
    assert np.load(out / "features" / "real.npz")["features"].shape == (32, 2048)


def test_fidelity_cli_bad_input_is_one_line_error(sample_pcam_dir, tmp_path: Path, capsys):
    small = make_synthetic(sample_pcam_dir, tmp_path / "small", n=10, size=64)
    rc = main(["eval", "fidelity", "--real", str(sample_pcam_dir), "--synthetic", str(small),
               "--local", "--no-umap", *TINY])  # fmt: skip
    assert rc == 2
    assert "different sizes" in capsys.readouterr().err
    few = make_synthetic(sample_pcam_dir, tmp_path / "few", n=3)
    rc = main(["eval", "fidelity", "--real", str(sample_pcam_dir), "--synthetic", str(few),
               "--local", "--no-umap", *STAND_IN])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "synthetic set has 3 images" in err and err.count("\n") == 1


@pytest.mark.slow
def test_classifier_cli_three_arms_on_tiny_real_sample(sample_pcam_dir, sets, tmp_path: Path):
    js = tmp_path / "clf.json"
    rc = main(
        ["eval", "classifier", "--real", str(sample_pcam_dir), "--synthetic",
         str(sets["morphology"]), "--out", str(tmp_path / "clf"), "--json", str(js), *TINY]
    )  # fmt: skip
    assert rc == 0
    arms = json.loads(js.read_text())["arms"]
    assert list(arms) == ["real", "synthetic", "real+synthetic"]
    for arm in arms.values():
        assert 0.0 <= arm["auc"] <= 1.0 and 0.0 <= arm["accuracy"] <= 1.0
        assert arm["steps"] == 60 and arm["n_test"] == 32
    assert arms["real"]["n_train"] == 128 and arms["real+synthetic"]["n_train"] == 256
    # The stain-based label is learnable from 128 real patches in 60 steps.
    assert arms["real"]["auc"] > 0.7
    assert (tmp_path / "clf" / "roc.png").stat().st_size > 1000
    import torch

    a = torch.load(arms["real"]["weights"], weights_only=True)
    b = torch.load(arms["synthetic"]["weights"], weights_only=True)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # arms learnt different weights


def test_classifier_cli_needs_synthetic_for_synthetic_arms(sample_pcam_dir, tmp_path, capsys):
    rc = main(["eval", "classifier", "--real", str(sample_pcam_dir), "--out", str(tmp_path),
               "--arms", "synthetic", *TINY])  # fmt: skip
    assert rc == 2 and "need a synthetic set" in capsys.readouterr().err


def test_reader_study_cli_export_and_score(sample_pcam_dir, sets, tmp_path: Path, capsys):
    study = tmp_path / "study"
    rc = main(["eval", "reader-study", "export", "--real", str(sample_pcam_dir), "--synthetic",
               str(sets["baseline"]), "--out", str(study), "--num-real", "5",
               "--num-synthetic", "5", *TINY])  # fmt: skip
    assert rc == 0
    info = json.loads(capsys.readouterr().out)
    assert info["images"] == 10 and Path(info["page"]).is_file()
    index = (study / "index.html").read_text()  # every job's --out folder gets an index
    assert 'href="study.html"' in index and "meddiff eval reader-study export" in index
    assert "meddiff eval reader-study export --real" in Path(info["page"]).read_text()
    key = json.loads((study / "key.json").read_text())
    files = []
    for reader, flip in (("r1", 0), ("r2", 3)):
        answers = {it["id"]: it["truth"] for it in key["items"]}
        for it in key["items"][:flip]:
            answers[it["id"]] = "real" if it["truth"] == "synthetic" else "synthetic"
        path = tmp_path / f"{reader}.json"
        path.write_text(json.dumps({"study_id": key["study_id"], "reader": reader,
                                    "answers": answers}))  # fmt: skip
        files.append(str(path))
    rc = main(["eval", "reader-study", "score", "--key", str(study / "key.json"), *files])
    assert rc == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["readers"]["r1"]["accuracy"] == 1.0
    assert scored["readers"]["r2"]["accuracy"] == pytest.approx(0.7)
    assert scored["kappa"]["all"]["pairs"]["r1 | r2"] < 1.0
    rc = main(["eval", "reader-study", "score", "--key", str(study / "key.json"),
               str(tmp_path / "missing.json")])  # fmt: skip
    assert rc == 2 and "missing.json does not exist" in capsys.readouterr().err


def test_fidelity_cli_without_out_leaves_no_temporary_folder(
    sample_pcam_dir, sets, tmp_path: Path, monkeypatch, capsys
):
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    rc = main(["eval", "fidelity", "--real", str(sample_pcam_dir), "--synthetic",
               str(sets["morphology"]), "--local", "--no-umap", *STAND_IN])  # fmt: skip
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert list(scratch.iterdir()) == []
    assert "report" not in result and "no --out" in result["files"]
