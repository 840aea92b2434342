"""Fine-tuning (Ray Train, 2 CPU workers, DeepSpeed and DDP), crash and resume, registration, and
generation into the PCam layout, on the tiny preset.

The pairs are built here from the sample PCam set the way the morphology-prompts stage shapes them
(image, label, cluster, prompt + provenance); the clusters are a brightness split, not DINO.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest

from meddiff.config import load_config
from meddiff.data.datasets import patch_dataset
from meddiff.data.pcam import open_pcam, read_meta, read_rows
from meddiff.data.shards import load_shards, write_shards
from meddiff.prompts import read_prompt_table, table_from_pairs, write_prompt_table
from meddiff.synthesis import components as C
from meddiff.synthesis.generate import generate
from meddiff.synthesis.train import FAULT_MARKER, read_checkpoint_info, train_synthesis

TRAIN = [
    "runtime.progress=false",
    "synthesis.model.arch.vae_warmup_steps=0",
    "synthesis.train.checkpoint_every=2",
    "synthesis.train.log_every=1",
    "synthesis.train.registered_name=synth-test",
]
GENERATE = [
    "runtime.progress=false",
    "synthesis.generate.images_per_prompt=2",
    "synthesis.generate.steps=3",
    "synthesis.generate.batch_size=4",
    "synthesis.generate.scheduler=ddim",
]


@pytest.fixture(scope="module")
def pairs(sample_pcam_dir, tiny_cfg, tmp_path_factory) -> tuple[Path, Path]:
    def add_prompts(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Defined here so Ray ships it by value (workers cannot import test modules).
        bright = batch["image"].reshape(len(batch["image"]), -1).mean(1) > 180
        batch["cluster"] = bright.astype(np.int64)
        words = ("zero", "one")
        batch["prompt"] = np.array(
            [
                f"Histology image of {'cancer' if lab else 'healthy'} tissue, "
                f"morphology type {words[c]}"
                for lab, c in zip(batch["label"], batch["cluster"], strict=True)
            ],
            dtype=object,
        )
        return batch

    root = tmp_path_factory.mktemp("synth-pairs")
    ds = patch_dataset(sample_pcam_dir, tiny_cfg.data).map_batches(
        add_prompts, batch_format="numpy"
    )
    write_shards(ds, root / "pairs", rows_per_file=64)
    data = load_shards(root / "pairs")
    table = write_prompt_table(
        root / "prompts.csv", table_from_pairs(data["prompt"], data["label"], data["cluster"])
    )
    return root / "pairs", table


@pytest.fixture(scope="module")
def deepspeed_run(pairs, tmp_path_factory) -> tuple[dict, Path]:
    """ZeRO-2 for 6 steps; rank 1 is killed while the step-4 checkpoint is being written."""
    out = tmp_path_factory.mktemp("synth-ds") / "run"
    cfg = load_config(
        "tiny",
        overrides=[
            *TRAIN,
            "synthesis.train.strategy=deepspeed",
            "synthesis.train.zero_stage=2",
            "synthesis.train.max_steps=6",
            "synthesis.train.fail_at_step=4",
            "synthesis.train.fail_in_checkpoint=true",
        ],
    )
    return train_synthesis(cfg, pairs[0], out), out


def _history(run_id: str, key: str) -> list[tuple[int, float]]:
    hist = mlflow.MlflowClient().get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in hist)


def test_crash_resumes_from_the_last_committed_checkpoint(deepspeed_run):
    summary, out = deepspeed_run
    run_dir = out / "ray" / "train"
    assert json.loads((run_dir / FAULT_MARKER).read_text())["step"] == 4  # the kill happened
    # The restart began at step 2 (the first checkpoint), not at 0 and not at the step-4
    # checkpoint that was half written when rank 1 died.
    assert summary["attempts"] == [0, 2]
    assert summary["steps"] == 6
    assert read_checkpoint_info(summary["checkpoint"])["step"] == 6
    losses = _history(summary["mlflow_run_id"], "loss")
    steps = [s for s, _ in losses]
    assert steps.count(1) == steps.count(2) == 1  # never redone: not restarted from zero
    assert steps.count(3) == 2 and steps.count(5) == steps.count(6) == 1
    # Steps 3 (and 4 when it was logged before the kill) ran twice with the same numbers: the
    # resumed run restored weights, optimizer, EMA and data position exactly.
    again = [v for s, v in losses if s == 3]
    assert again[0] == pytest.approx(again[1], rel=1e-6)
    assert losses[-1][1] < losses[0][1]


def test_final_model_is_a_registered_pipeline(deepspeed_run):
    summary, out = deepspeed_run
    model = Path(summary["model"])
    assert model == out / "model"
    C.check_model_dir(model)
    assert summary["model_uri"] == f"models:/synth-test/{summary['version']}"
    versions = mlflow.MlflowClient().search_model_versions("name='synth-test'")
    assert summary["version"] in {str(v.version) for v in versions}
    # The checkpoint holds ZeRO partitions of both ranks next to the diffusers pipeline.
    state = Path(summary["checkpoint"]) / "deepspeed" / "state"
    assert len(list(state.glob("zero_pp_rank_*_optim_states.pt"))) == 2
    client = mlflow.MlflowClient()
    sheets = [a.path for a in client.list_artifacts(summary["mlflow_run_id"], "samples")]
    assert sheets == ["samples/samples_step_00000006.png"]
    assert "config.yaml" in {a.path for a in client.list_artifacts(summary["mlflow_run_id"])}


def test_ddp_encoding_on_the_fly_trains_the_same_model(deepspeed_run, pairs, tmp_path):
    ds_summary, ds_out = deepspeed_run
    out = tmp_path / "ddp"
    out.mkdir()
    shutil.copytree(ds_out / "base", out / "base")  # same initial weights (reused, not rebuilt)
    cfg = load_config(
        "tiny",
        overrides=[
            *TRAIN,
            "synthesis.train.strategy=ddp",
            "synthesis.train.max_steps=2",
            "synthesis.train.cache_latents=false",
        ],
    )
    summary = train_synthesis(cfg, pairs[0], out)
    assert summary["attempts"] == [0] and summary["steps"] == 2
    assert summary["cache"]["kind"] == "images"
    assert (out / "base" / C.BASE_INFO).read_text() == (ds_out / "base" / C.BASE_INFO).read_text()
    ddp = dict(_history(summary["mlflow_run_id"], "loss"))
    ds = dict(_history(ds_summary["mlflow_run_id"], "loss"))
    # Same rows, noise and initial weights: DDP encoding every batch through the VAE and text
    # encoder matches ZeRO-2 trained from the cache up to the cache's fp16 rounding.
    assert ddp[1] == pytest.approx(ds[1], rel=1e-2)
    assert ddp[2] == pytest.approx(ds[2], rel=1e-2)


def test_generate_from_directory_and_from_registry(deepspeed_run, pairs, tmp_path):
    summary, _ = deepspeed_run
    cfg = load_config("tiny", overrides=GENERATE)
    table = pairs[1]
    n_prompts = len(read_prompt_table(table))
    a = generate(cfg, summary["model"], table, tmp_path / "from-dir")
    assert a["images"] == 2 * n_prompts
    split = open_pcam(tmp_path / "from-dir", "train")  # the PCam reader validates the layout
    assert split.num_rows == a["images"] and split.patch_size == 96
    rows = read_rows(split, 0, split.num_rows)
    meta = read_meta(tmp_path / "from-dir", "train")
    assert [int(m["seed"]) for m in meta] == list(range(a["images"]))
    assert {m["prompt"] for m in meta} == {r.prompt for r in read_prompt_table(table)}
    labels = [1 if "cancer" in m["prompt"] else 0 for m in meta]
    assert rows["label"].tolist() == labels
    assert {int(m["cluster"]) for m in meta} <= {0, 1}
    grids = json.loads((tmp_path / "from-dir" / "grids" / "index.json").read_text())["grids"]
    assert len(grids) == n_prompts
    assert all((tmp_path / "from-dir" / "grids" / g["file"]).is_file() for g in grids)

    # From the registry, through an alias pointing at the version training registered.
    client = mlflow.MlflowClient()
    client.set_registered_model_alias("synth-test", "champion", summary["version"])
    b = generate(cfg, "models:/synth-test@champion", table, tmp_path / "from-registry")
    other = read_rows(open_pcam(tmp_path / "from-registry", "train"), 0, b["images"])
    # The registered model is the saved one: same seeds, same images.
    assert np.array_equal(other["image"], rows["image"])


def test_resume_errors_are_one_line_and_never_retried(deepspeed_run, pairs, capsys, caplog):
    """Runs last: it breaks the run's newest checkpoint. Another architecture is refused on the
    driver before any worker starts, as a one-line error with exit code 2; a newest checkpoint
    without its DeepSpeed state is skipped for the newest readable one."""
    from meddiff.cli import main
    from meddiff.training import WorkerContext

    summary, out = deepspeed_run
    run_dir = out / "ray" / "train"
    starts = WorkerContext.starts(run_dir)
    args = ["synth", "train", "--pairs", str(pairs[0]), "--out", str(out), "--preset", "tiny"]
    for s in (*TRAIN, "synthesis.train.max_steps=8"):
        args += ["--set", s]
    capsys.readouterr()

    assert main([*args, "--set", "synthesis.model.arch.unet_layers_per_block=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("meddiff: error: checkpoint") and "unet_layers_per_block" in err
    assert "rerun with --fresh to start over" in err
    assert WorkerContext.starts(run_dir) == starts

    newest = Path(summary["checkpoint"])
    shutil.rmtree(newest / "deepspeed")  # a checkpoint copied in part
    # Skipped with a warning for the newest readable one, which the run goes on from
    # (docs/training.md, "A damaged checkpoint is skipped").
    with caplog.at_level(logging.WARNING, logger="meddiff.training.checkpoints"):
        assert main(args) == 0
    assert f"{newest} is damaged" in caplog.text
    printed = capsys.readouterr().out
    again, _ = json.JSONDecoder().raw_decode(printed[printed.index("{") :])
    assert again["steps"] == 8 and again["attempts"][-1] in (2, 4)  # not from the damaged 6
    assert WorkerContext.starts(run_dir) == starts + 1

    # --fresh: the other architecture is accepted by starting over (checkpoints, model gone).
    fresh = [*args, "--fresh", "--set", "synthesis.model.arch.unet_layers_per_block=2"]
    assert main([*fresh, "--set", "synthesis.train.max_steps=2"]) == 0
    printed = capsys.readouterr().out
    over, _ = json.JSONDecoder().raw_decode(printed[printed.index("{") :])
    assert over["steps"] == 2 and over["attempts"] == [0]
    kept = sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert kept == ["checkpoint_00000002"]  # the old run's checkpoints went with it
