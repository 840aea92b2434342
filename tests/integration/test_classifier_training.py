"""The evaluation classifier on the training core: a killed worker resumes from the last
checkpoint; resuming with another architecture, or from a checkpoint whose state is missing, is a
one-line error (exit 2) that Ray Train never retries; a damaged newest checkpoint is skipped for
the newest readable one."""

from __future__ import annotations

import json
import logging

import mlflow
import pytest

from meddiff.cli import main
from meddiff.training import WorkerContext
from meddiff.training.context import FAULT_MARKER

BASE = ["--preset", "tiny", "--set", "runtime.progress=false",
        "--set", "evaluation.classifier.max_steps=16",
        "--set", "evaluation.classifier.checkpoint_every=4"]  # fmt: skip


def _run(sample_pcam_dir, out, *sets: str) -> int:
    args = ["eval", "classifier", "--real", str(sample_pcam_dir), "--arms", "real",
            "--out", str(out), "--json", str(out / "result.json"), *BASE]  # fmt: skip
    for s in sets:
        args += ["--set", s]
    return main(args)


@pytest.mark.slow
def test_killed_worker_resumes_from_the_last_checkpoint(sample_pcam_dir, tmp_path):
    out = tmp_path / "killed"
    assert _run(sample_pcam_dir, out, "evaluation.classifier.fail_at_step=10") == 0
    run_dir = out / "ray_train" / "classifier"
    assert json.loads((run_dir / FAULT_MARKER).read_text())["step"] == 10
    assert WorkerContext.starts(run_dir) == 2
    arm = json.loads((out / "result.json").read_text())["arms"]["real"]
    assert arm["steps"] == 16 and 0.0 <= arm["auc"] <= 1.0
    runs = mlflow.search_runs(
        filter_string="tags.`meddiff.job` = 'eval-classifier'", order_by=["start_time DESC"]
    )
    hist = mlflow.MlflowClient().get_metric_history(runs.iloc[0].run_id, "resumed_from_step")
    # Killed before step 10: restarted at the step-8 checkpoint, less than one interval lost.
    assert sorted(m.value for m in hist) == [0.0, 8.0]


@pytest.mark.slow
def test_resume_errors_are_one_line_and_never_retried(sample_pcam_dir, tmp_path, capsys, caplog):
    out = tmp_path / "broken"
    # Killed before step 10 with no restarts allowed: the run fails with the step-8 checkpoint.
    # A crash, not bad input: Ray Train gave up, said in one line (exit 2) that names the
    # restarts allowed and where the checkpoints stay.
    rc = _run(sample_pcam_dir, out, "evaluation.classifier.fail_at_step=10",
              "evaluation.classifier.max_failures=0")  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "evaluation.classifier.max_failures=0 restarts" in err
    assert "run the same command again to resume" in err
    run_dir = out / "ray_train" / "classifier"
    assert WorkerContext.starts(run_dir) == 1
    capsys.readouterr()

    rc = _run(sample_pcam_dir, out, "evaluation.classifier.channels=[8, 16]")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and err.startswith("meddiff: error: checkpoint")
    assert "evaluation.classifier.channels=[8, 16, 32] (this run: [8, 16])" in err
    assert WorkerContext.starts(run_dir) == 1  # refused before any worker started

    ckpt = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())[-1]
    (ckpt / "trainer_state.pt").unlink()  # a checkpoint copied in part
    # The damaged newest checkpoint is skipped with a warning; the newest readable one (step 4)
    # is used and the run finishes (docs/training.md, "A damaged checkpoint is skipped").
    with caplog.at_level(logging.WARNING, logger="meddiff.training.checkpoints"):
        rc = _run(sample_pcam_dir, out)
    assert rc == 0
    assert f"{ckpt} is damaged" in caplog.text and "trainer_state.pt" in caplog.text
    assert json.loads((out / "result.json").read_text())["arms"]["real"]["steps"] == 16
    runs = mlflow.search_runs(
        filter_string="tags.`meddiff.job` = 'eval-classifier'", order_by=["start_time DESC"]
    )
    hist = mlflow.MlflowClient().get_metric_history(runs.iloc[0].run_id, "resumed_from_step")
    assert [m.value for m in hist] == [4.0]
    assert WorkerContext.starts(run_dir) == 2  # one more start, no retries
