"""Training run again into its own --out: a finished run is complete (nothing trained, nothing
registered again); a newest checkpoint with a truncated file is skipped for the newest good one
instead of failing every restart (and the advised rerun) the same way."""

from __future__ import annotations

import json
import logging

from meddiff.cli import main
from meddiff.config.data import MriConfig
from meddiff.data.brain import BrainSampleSizes, sample_brain
from meddiff.training import latest_checkpoint

NAME = "thor-reruns"
SMALL = [
    "thor.model.image_size=32",
    "thor.model.channels=[16, 32]",
    "thor.model.attention_levels=[false, true]",
    "thor.model.num_head_channels=32",
    "thor.model.norm_groups=8",
    "thor.train.batch_size=4",
    "thor.train.max_steps=2",
    "thor.train.checkpoint_every=1",
    "thor.train.sample_every=0",
    "thor.train.epoch_images=16",
    "thor.train.log_every=1",
    f"thor.train.registered_name={NAME}",
]


def _summary(capsys) -> dict:
    printed = capsys.readouterr().out
    return json.JSONDecoder().raw_decode(printed[printed.index("{") :])[0]


def test_a_finished_run_is_complete_and_a_damaged_checkpoint_is_skipped(tmp_path, capsys, caplog):
    import mlflow

    brain = tmp_path / "brain"
    sample_brain(brain, MriConfig(image_size=32), BrainSampleSizes(lesion=2, normal=1), seed=0)
    out = tmp_path / "run"
    argv = ["thor", "train", "--data", str(brain / "train"), "--out", str(out), "--preset", "tiny",
            "--set", "runtime.progress=false", *[a for s in SMALL for a in ("--set", s)]]  # fmt: skip
    assert main(argv) == 0
    first = _summary(capsys)
    client = mlflow.MlflowClient()
    assert len(client.search_model_versions(f"name='{NAME}'")) == 1

    assert main(argv) == 0  # the same command again: already complete
    again = _summary(capsys)
    assert again["already_complete"] is True and again["model_uri"] == first["model_uri"]
    assert len(client.search_model_versions(f"name='{NAME}'")) == 1  # nothing registered

    run_dir = out / "ray" / "thor-train"
    newest = latest_checkpoint(run_dir)
    assert newest.name == "checkpoint_00000002"
    state = next(p for p in newest.rglob("*.pt") if p.stat().st_size > 100)
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # truncated since
    with caplog.at_level(logging.WARNING, logger="meddiff.training.checkpoints"):
        assert main([*argv, "--set", "thor.train.max_steps=3"]) == 0  # one more step
    assert f"{newest} is damaged" in caplog.text
    more = _summary(capsys)
    assert more["steps"] == 3 and not more.get("already_complete")
    resumed = client.get_metric_history(more["mlflow_run_id"], "resumed_from_step")
    assert [m.value for m in resumed] == [1.0]  # from the newest good checkpoint
    assert len(client.search_model_versions(f"name='{NAME}'")) == 2  # new weights, new version
