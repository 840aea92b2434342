"""THOR end to end on the shared Ray: sample brain data → Ray Train (checkpoint, resume, registry)
→ detect and evaluate through the CLI → bad inputs end in one-line errors (exit 2)."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import time

import mlflow
import numpy as np
import pytest
from PIL import Image

from meddiff import precision as amp
from meddiff.cli import main
from meddiff.config.data import MriConfig
from meddiff.data.brain import BrainSampleSizes, sample_brain
from meddiff.data.images import write_png

SMALL = [
    "--preset", "tiny",
    "--set", "thor.model.image_size=32",
    "--set", "thor.model.channels=[16, 32]",
    "--set", "thor.model.attention_levels=[false, true]",
    "--set", "thor.model.num_head_channels=32",
    "--set", "thor.model.norm_groups=8",
    "--set", "thor.train.batch_size=4",
    "--set", "thor.train.checkpoint_every=2",
    "--set", "thor.train.sample_every=2",
    "--set", "thor.train.num_samples=2",
    "--set", "thor.train.log_every=1",
    "--set", "thor.train.epoch_images=32",
    "--set", "thor.train.registered_name=thor-test",
    "--set", "thor.infer.batch_size=8",
    "--set", "runtime.progress=false",
]  # fmt: skip
FAST = ["--stride", "50"]


def _bomb_png(path, side: int = 100_000):
    """A PNG whose header claims side x side pixels (far above Pillow's limit); no pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


@pytest.fixture(scope="module")
def brain(tmp_path_factory):
    out = tmp_path_factory.mktemp("thor") / "brain"
    sample_brain(out, MriConfig(image_size=32), BrainSampleSizes(lesion=6, normal=2), seed=0)
    return out


@pytest.fixture(scope="module")
def trained(brain, tmp_path_factory):
    """Train 2 steps, then run again with 4 steps: the second run resumes at step 2."""
    out = tmp_path_factory.mktemp("thor") / "run"
    args = ["thor", "train", "--data", str(brain / "train"), "--out", str(out), *SMALL]
    assert main([*args, "--set", "thor.train.max_steps=2"]) == 0
    first = json.loads((out / "train_summary.json").read_text())
    assert main([*args, "--set", "thor.train.max_steps=4"]) == 0
    second = json.loads((out / "train_summary.json").read_text())
    return out, first, second


def test_training_checkpoints_resumes_and_registers(trained):
    out, first, second = trained
    assert first["steps"] == 2 and second["steps"] == 4
    assert first["model_uri"] == "models:/thor-test/1"
    assert second["model_uri"] == "models:/thor-test/2"
    assert (out / "model" / "thor_model.json").is_file()
    info = json.loads((out / "model" / "thor_model.json").read_text())["info"]
    assert info["steps"] == 4
    assert info["intensity"] == {"scaling": "significant_bits", "significant_bits": None}
    assert info["reference"]["format"] == "meddiff-thor-reference/1"  # the training slices' stats
    client = mlflow.MlflowClient()
    resumed = client.get_metric_history(second["mlflow_run_id"], "resumed_from_step")
    assert [m.value for m in resumed] == [2.0]
    losses = client.get_metric_history(second["mlflow_run_id"], "loss")
    assert [m.step for m in losses] == [3, 4]  # only the new steps ran
    artifacts = [a.path for a in client.list_artifacts(second["mlflow_run_id"], "samples")]
    assert "samples/step_0000004.png" in artifacts


def test_detect_writes_maps_and_scores_from_a_registry_uri(trained, brain, tmp_path, capsys):
    out = tmp_path / "detect"
    rc = main(["thor", "detect", "--model", "models:/thor-test/2", "--images",
               str(brain / "test" / "images"), "--out", str(out), *FAST, *SMALL])  # fmt: skip
    assert rc == 0
    names = sorted(p.name for p in (brain / "test" / "images").glob("*.png"))
    assert sorted(p.name for p in (out / "maps").glob("*.png")) == names
    rows = list(csv.DictReader((out / "scores.csv").read_text().splitlines()))
    assert [r["name"] for r in rows] == names
    assert all(r["map_kind"] == "residual_x_lpips_vgg16_hed" for r in rows)  # the tiny default
    assert all(float(r["score"]) >= 0 for r in rows)
    summary = json.loads(capsys.readouterr().out)
    assert summary["residual_only"] is False and summary["forwards_per_image"] == 8
    # The precision the actors ran: auto resolved for this machine's CPU (meddiff.precision).
    assert summary["precision"] == amp.resolve("auto", "cpu", "thor-inference")
    assert summary["intensity"]["read_as"] == {"type: 16-bit / 65535": len(names)}
    # Held-out slices of the training brain look like the training slices: nothing to say.
    assert all(r["unlike_training"] == "" for r in rows)
    assert summary["data_check"]["checked"] is True and summary["data_check"]["warning"] is None


def test_detect_warns_when_the_images_look_unlike_the_training_data(
    trained, brain, tmp_path, capsys, caplog
):
    from meddiff.data.images import load_folder

    flipped = tmp_path / "flipped"
    test = load_folder(brain / "test" / "images")
    for name, img in zip(test.names, test.images, strict=True):
        write_png(flipped / name, img[::-1], bits=16)  # upside down
    with caplog.at_level("WARNING"):
        rc = main(["thor", "detect", "--model", str(trained[0] / "model"), "--images",
                   str(flipped), "--out", str(tmp_path / "out"), *FAST, *SMALL])  # fmt: skip
    assert rc == 0
    warning = json.loads(capsys.readouterr().out)["data_check"]["warning"]
    assert "unlike the model's training data" in warning and "upside down" in warning
    assert "upside down" in caplog.text  # in the log too
    saved = json.loads((tmp_path / "out" / "detect.json").read_text())
    assert saved["data_check"]["warning"] == warning


def test_evaluate_prints_metrics_and_writes_a_report(trained, brain, tmp_path, capsys):
    out = tmp_path / "eval"
    model = str(trained[0] / "model")
    rc = main(["thor", "evaluate", "--model", model, "--images", str(brain / "test" / "images"),
               "--masks", str(brain / "test" / "masks"), "--method", "thor", "--method", "ddpm",
               "--out", str(out), *FAST, *SMALL])  # fmt: skip
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["methods"]) == {"thor", "ddpm"}
    thor = summary["methods"]["thor"]
    assert thor["metrics"]["images"] == {"lesion": 6, "normal": 2}
    assert 0 <= thor["metrics"]["pixel"]["auprc"] <= 1
    masks = [np.asarray(Image.open(p)) > 0 for p in sorted((brain / "test" / "masks").glob("*"))]
    lesion = [m for m in masks if m.any()]
    chance = sum(m.sum() for m in lesion) / (len(lesion) * 32 * 32)  # the lesion pixel fraction
    assert thor["metrics"]["pixel"]["chance_auprc"] == pytest.approx(chance)
    assert thor["plan"]["data_check"]["checked"] is True
    assert thor["plan"]["harmonization_steps"] == [300, 150, 50]
    assert thor["plan"]["map_kind"] == "residual_x_lpips_vgg16_hed"
    assert thor["plan"]["precision"] == amp.resolve("auto", "cpu", "thor-inference")
    assert not any("residual-only" in n for n in summary["notes"])
    html = (out / "report.html").read_text()
    assert "residual_x_lpips_vgg16_hed" in html and html.count("<img") >= 4 * 6
    assert "pixel_auprc_chance" in html
    assert "scaled by data.images.scaling=significant_bits" in html
    assert model in html and "meddiff thor evaluate --model" in html  # what made the page
    assert 'href="report.html"' in (out / "index.html").read_text()
    assert json.loads((out / "metrics.json").read_text())["methods"].keys() == {"thor", "ddpm"}


def test_bad_inputs_are_one_line_errors(trained, brain, tmp_path, capsys):
    model = str(trained[0] / "model")
    images, masks = brain / "test" / "images", brain / "test" / "masks"

    def run(*args: str) -> str:
        rc = main(["thor", "evaluate", "--model", model, *args, *FAST, *SMALL])
        assert rc == 2
        return capsys.readouterr().err

    bad = tmp_path / "bad"
    write_png(bad / "tiny.png", np.zeros((16, 16)))
    assert "tiny.png: image is 16x16 pixels; expected 32x32" in run(
        "--images", str(bad), "--masks", str(bad)
    )
    wrong_masks = tmp_path / "masks"
    shutil.copytree(masks, wrong_masks)
    first = sorted(wrong_masks.glob("*.png"))[0]
    write_png(first, np.zeros((20, 32), dtype=bool))
    err = run("--images", str(images), "--masks", str(wrong_masks))
    assert f"{first.name}: mask is 32x20 pixels but its image is 32x32" in err
    (tmp_path / "empty").mkdir()
    assert "is empty" in run("--images", str(tmp_path / "empty"), "--masks", str(masks))
    err = run(
        "--images", str(images), "--masks", str(masks), "--set", "thor.infer.noise_level=1000"
    )
    assert "T=1000" in err and "last step is 999" in err
    err = run("--images", str(images), "--masks", str(masks),
              "--set", "thor.infer.harmonization_steps=[400, 50]")  # fmt: skip
    assert "step 400, above the noise level T=350" in err
    err = run("--images", str(images), "--masks", str(masks),
              "--set", "data.images.scaling=percentiles")  # fmt: skip
    assert "trained on images read with" in err and "data.images.scaling=significant_bits" in err
    # A PNG whose header claims 100 000 x 100 000 pixels, in evaluate's and detect's folders.
    bombs = tmp_path / "bombs"
    shutil.copytree(images, bombs)
    _bomb_png(bombs / "huge.png")
    bomb_masks = tmp_path / "bomb-masks"  # with a mask of its own, the header check is what fails
    shutil.copytree(masks, bomb_masks)
    shutil.copy(sorted(masks.glob("*.png"))[0], bomb_masks / "huge.png")
    err = run("--images", str(bombs), "--masks", str(bomb_masks))
    assert err.count("huge.png: refused as a decompression bomb") == 1 and "Traceback" not in err
    rc = main(["thor", "detect", "--model", model, "--images", str(bombs),
               "--out", str(tmp_path / "bomb-out"), *FAST, *SMALL])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().splitlines()[-1].startswith("meddiff: error: ")
    assert "huge.png: refused as a decompression bomb" in err and "Traceback" not in err


@pytest.mark.slow
def test_deepspeed_strategy_trains_and_checkpoints(brain, tmp_path):
    out = tmp_path / "ds"
    rc = main(["thor", "train", "--data", str(brain / "train"), "--out", str(out), *SMALL,
               "--set", "thor.train.strategy=deepspeed", "--set", "thor.train.max_steps=2",
               "--set", "thor.train.registered_name=null"])  # fmt: skip
    assert rc == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 2 and "registered" not in summary
    # Ray also writes checkpoint_manager_snapshot.json there: keep the checkpoint folders only.
    ckpts = sorted(p for p in (out / "ray" / "thor-train").glob("checkpoint_*") if p.is_dir())
    assert ckpts and (ckpts[-1] / "deepspeed").is_dir() and (ckpts[-1] / "model").is_dir()


def test_an_error_inside_a_ray_data_stage_prints_once(trained, brain, tmp_path, capfd):
    """A PNG whose header is fine but whose pixels are cut off fails inside the detection stage
    (a Ray Data actor); the terminal shows meddiff's one line and no traceback."""
    images = tmp_path / "images"
    shutil.copytree(brain / "test" / "images", images)
    broken = sorted(images.glob("*.png"))[0]
    broken.write_bytes(broken.read_bytes()[:120])  # header intact, image data truncated
    capfd.readouterr()
    rc = main(["thor", "detect", "--model", str(trained[0] / "model"), "--images", str(images),
               "--out", str(tmp_path / "out"), *FAST, *SMALL])  # fmt: skip
    err = capfd.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    assert err.count(f"{broken.name}: not a readable PNG") == 1
    assert err.strip().splitlines()[-1].startswith("meddiff: error: ")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_killed_worker_resumes_from_the_last_checkpoint(brain, tmp_path, capfd):
    """The worker is killed (SIGKILL) before step 3; Ray Train restarts it from the step-2
    checkpoint, losing at most one checkpoint interval, and the run ends at step 4. Off a
    terminal (the session's Ray is quiet) the console gets the workers' warnings but none of
    Ray Train's or Ray Data's INFO lines and no progress bars."""
    from meddiff.training import WorkerContext
    from meddiff.training.context import FAULT_MARKER

    capfd.readouterr()
    out = tmp_path / "killed"
    rc = main(["thor", "train", "--data", str(brain / "train"), "--out", str(out), *SMALL,
               "--set", "thor.train.max_steps=4", "--set", "thor.train.fail_at_step=3",
               "--set", "thor.train.registered_name=null"])  # fmt: skip
    assert rc == 0
    run_dir = out / "ray" / "thor-train"
    assert json.loads((run_dir / FAULT_MARKER).read_text())["step"] == 3  # the kill happened
    assert WorkerContext.starts(run_dir) == 2
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 4
    client = mlflow.MlflowClient()
    resumed = [
        m.value for m in client.get_metric_history(summary["mlflow_run_id"], "resumed_from_step")
    ]
    assert resumed == [0.0, 2.0]  # restarted at the step-2 checkpoint: 3 - 2 <= one interval
    steps = sorted(m.step for m in client.get_metric_history(summary["mlflow_run_id"], "loss"))
    assert steps == [1, 2, 3, 4]
    console = _console_after(capfd, "fault drill: killing rank 0")  # a worker's WARNING arrived
    for chatter in ("Reporting training result", "Checkpoint successfully created",
                    "Starting execution of Dataset", "State API", "\r"):  # fmt: skip
        assert chatter not in console, chatter


def _console_after(capfd, line: str, timeout_s: float = 30.0) -> str:
    """What reached stdout/stderr once ``line`` did: Ray streams workers' output to the driver
    a moment after it was written, so a check for what must be absent waits for what must not."""
    seen = ""
    deadline = time.monotonic() + timeout_s
    while line not in seen and time.monotonic() < deadline:
        time.sleep(0.5)
        out, err = capfd.readouterr()
        seen += out + err
    assert line in seen, seen[-2000:]
    return seen


@pytest.mark.slow
def test_resume_errors_are_one_line_and_never_retried(brain, tmp_path, capsys, caplog):
    """A changed architecture or strategy is refused on the driver as a one-line error; a
    checkpoint whose state is missing is skipped with a warning."""
    from meddiff.training import WorkerContext

    out = tmp_path / "resume"
    args = ["thor", "train", "--data", str(brain / "train"), "--out", str(out), *SMALL,
            "--set", "thor.train.registered_name=null"]  # fmt: skip
    assert main([*args, "--set", "thor.train.max_steps=2"]) == 0
    run_dir = out / "ray" / "thor-train"
    capsys.readouterr()

    rc = main([*args, "--set", "thor.train.max_steps=4", "--set", "thor.model.channels=[16, 64]"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and err.startswith("meddiff: error: checkpoint")
    assert "thor.model.channels=[16, 32] (this run: [16, 64])" in err and "--fresh" in err
    assert WorkerContext.starts(run_dir) == 1  # no worker started

    rc = main([*args, "--set", "thor.train.max_steps=4", "--set", "thor.train.strategy=deepspeed"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "strategy=ddp, this run uses deepspeed" in err

    ckpt = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())[-1]
    (ckpt / "trainer_state.pt").unlink()  # a checkpoint copied in part
    # Skipped with a warning (docs/training.md, "A damaged checkpoint is skipped"); it was the
    # only one, so training starts over and reaches the steps asked for.
    with caplog.at_level(logging.WARNING, logger="meddiff.training.checkpoints"):
        rc = main([*args, "--set", "thor.train.max_steps=4"])
    assert rc == 0 and f"{ckpt} is damaged" in caplog.text and "trainer_state.pt" in caplog.text
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 4
    assert WorkerContext.starts(run_dir) == 2  # one more start, no retries


def test_detect_over_several_actors_gives_the_same_maps(trained, brain, tmp_path):
    """Batches of 2 (one block each) shared by two actors equal one batch on one actor: every
    image's noise is seeded from its name, not from where it ran."""
    images = str(brain / "test" / "images")
    args = ["thor", "detect", "--model", str(trained[0] / "model"), "--images", images, *FAST]
    assert main([*args, "--out", str(tmp_path / "one"), *SMALL]) == 0
    shared = ["--set", "thor.infer.batch_size=2", "--set", "thor.infer.concurrency=2"]
    assert main([*args, "--out", str(tmp_path / "two"), *SMALL, *shared]) == 0
    one, two = ((tmp_path / d / "scores.csv").read_text() for d in ("one", "two"))
    assert len(one.splitlines()) == 9 and one == two
