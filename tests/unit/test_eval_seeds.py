"""`meddiff eval seeds`: mean, spread and wins across compare-prompting or THOR evaluate runs."""

from __future__ import annotations

import json

import pytest

from meddiff.cli import main
from meddiff.errors import DataError
from meddiff.evaluation.seeds import summarize_runs


def _run(root, name, fd, auc):
    d = root / name / "evaluation"
    d.mkdir(parents=True)
    table = {
        "fd_tiny_random": {"baseline": {"value": fd[0], "lo": 0, "hi": 99}, "morphology": fd[1]},
        "classifier_synthetic_auc": {"baseline": auc[0], "morphology": auc[1]},
    }
    (d / "comparison.json").write_text(json.dumps(table))
    strata = {s: {"by_label": {"1": {"n_real": 9, "precision": {"value": v, "ci": [0, 1]}}}}
              for s, v in zip(("baseline", "morphology"), auc, strict=True)}  # fmt: skip
    (d / "fidelity.json").write_text(json.dumps({"sets": strata}))
    return root / name


def test_mean_sd_and_wins_respect_the_metric_direction(tmp_path):
    runs = [
        _run(tmp_path, "s0", (10.0, 8.0), (0.5, 0.7)),
        _run(tmp_path, "s1", (12.0, 9.0), (0.6, 0.5)),
        _run(tmp_path, "s2", (11.0, 13.0), (0.4, 0.9)),
    ]
    out = summarize_runs(runs, tmp_path / "summary")
    fd = out["table"]["fd_tiny_random"]
    assert fd["baseline"]["mean"] == pytest.approx(11.0)
    assert fd["baseline"]["sd"] == pytest.approx(1.0)
    # Lower distance wins: morphology in seeds 0 and 1, baseline in seed 2.
    assert (fd["morphology"]["best_in"], fd["baseline"]["best_in"]) == (2, 1)
    auc = out["table"]["classifier_synthetic_auc"]
    assert (auc["morphology"]["best_in"], auc["baseline"]["best_in"]) == (2, 1)
    label = out["table"]["precision (label 1)"]
    assert label["morphology"]["values"] == [0.7, 0.5, 0.9]
    assert "11.000 ± 1.000 (best in 1/3)" in out["markdown"]
    rows = (tmp_path / "summary" / "seeds.csv").read_text().splitlines()
    assert "fd_tiny_random,baseline,11,1,1,10 12 11" in rows


def test_fid_kid_and_the_copy_rate_are_lower_is_better():
    from meddiff.evaluation.seeds import summarize

    tables = [{m: {"baseline": 1.0, "morphology": 2.0} for m in ("fid", "kid (label 0)",
               "copy_rate", "copy_rate_pixels", "coverage")}]  # fmt: skip
    out = summarize(tables)
    for metric in ("fid", "kid (label 0)", "copy_rate", "copy_rate_pixels"):
        assert out[metric]["baseline"]["best_in"] == 1, metric
    assert out["coverage"]["morphology"]["best_in"] == 1


def test_an_unfinished_run_is_named(tmp_path, capsys):
    done = _run(tmp_path, "s0", (1, 2), (0.5, 0.5))
    with pytest.raises(DataError, match="s1: no evaluation/comparison.json or metrics.json"):
        summarize_runs([done, tmp_path / "s1"])
    assert main(["eval", "seeds", str(done), str(tmp_path / "s1")]) == 2
    assert "s1" in capsys.readouterr().err


def _thor_run(root, name, auprc):
    """A `thor evaluate --out` folder with the fields metrics.json has (two methods)."""
    methods = {}
    for method, value in zip(("thor", "ddpm"), auprc, strict=True):
        pixel = {"auprc": value, "auroc": 0.8, "best_dice": value / 2}
        strata = {"small": {"auprc": value / 4}, "large": {"auprc": value * 2}}
        methods[method] = {"metrics": {"pixel": pixel, "image_auroc": 0.6, "strata": strata}}
    (root / name).mkdir()
    (root / name / "metrics.json").write_text(json.dumps({"methods": methods}))
    return root / name


def test_thor_evaluate_runs_give_one_row_per_metric_and_method(tmp_path):
    runs = [
        _thor_run(tmp_path, f"s{i}", v) for i, v in enumerate([(0.3, 0.2), (0.1, 0.2), (0.2, 0.1)])
    ]
    out = summarize_runs(runs)["table"]
    assert out["pixel_auprc"]["thor"]["mean"] == pytest.approx(0.2)
    assert out["pixel_auprc"]["thor"]["sd"] == pytest.approx(0.1)
    assert (out["pixel_auprc"]["thor"]["best_in"], out["pixel_auprc"]["ddpm"]["best_in"]) == (2, 1)
    assert out["pixel_auprc (large)"]["ddpm"]["values"] == [0.4, 0.4, 0.2]
    # A tie in every seed (image AUROC 0.6 for both) is nobody's win.
    assert out["image_auroc"]["thor"]["best_in"] == out["image_auroc"]["ddpm"]["best_in"] == 0


def test_one_method_gets_mean_and_spread_without_wins(tmp_path):
    runs = [_thor_run(tmp_path, f"s{i}", (v, v)) for i, v in enumerate([0.3, 0.1])]
    for run in runs:  # keep only THOR, as a run of `thor evaluate --method anoddpm` alone
        metrics = json.loads((run / "metrics.json").read_text())
        del metrics["methods"]["ddpm"]
        (run / "metrics.json").write_text(json.dumps(metrics))
    text = summarize_runs(runs)["markdown"]
    assert "| pixel_auprc | 0.200 ± 0.141 |" in text and "best in" not in text
