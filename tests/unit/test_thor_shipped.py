"""The shipped THOR model: provenance written by `thor ship`, registry tags, the bundled folder."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import torch

from meddiff.config.thor import ScheduleConfig, UNetConfig
from meddiff.data.images import write_png
from meddiff.errors import ModelError
from meddiff.thor.model import WEIGHTS_FILE, load_model, save_model
from meddiff.thor.shipped import (
    SHIPPED_DIR,
    data_digest,
    provenance,
    register_shipped,
    ship,
    training_reference,
)
from meddiff.thor.unet import DiffusionUNet

SMALL = UNetConfig(
    image_size=16, channels=(16, 16), attention_levels=(False, True), num_head_channels=16,
    norm_groups=8,
)  # fmt: skip


def _training_run(tmp_path):
    run, data = tmp_path / "run", tmp_path / "brain"
    net = DiffusionUNet(SMALL).to(memory_format=torch.channels_last)  # as train.py saves it
    save_model(run / "model", net, SMALL, ScheduleConfig(), {"steps": 7, "train_noise": "gaussian"})
    (run / "train_summary.json").write_text(json.dumps({"steps": 7, "loss": 0.5, "seconds": 3.0}))
    rng = np.random.default_rng(0)
    for i in range(3):
        write_png(data / "train" / f"s{i}.png", rng.random((16, 16)).astype(np.float32), 16)
    (data / "sample_brain.json").write_text(json.dumps({"source": "test", "image_size": 16}))
    return run, data, net


def test_ship_copies_the_model_with_its_provenance(tmp_path):
    run, data, net = _training_run(tmp_path)
    record = ship(run, data, tmp_path / "shipped", "meddiff thor train ...")
    out = tmp_path / "shipped"
    assert (out / WEIGHTS_FILE).is_file()  # safetensors, not a pickle
    assert provenance(out) == record
    # A run from before models recorded their training slices' statistics gets them from its data.
    info = load_model(out).info
    assert info["reference"] == training_reference(data / "train", None)
    assert info["reference"]["images"] == 3 and info["steps"] == 7
    assert record["training"]["steps"] == 7 and record["data"]["slices"] == 3
    assert record["data"]["sha256"] == data_digest(data / "train")
    x, t = torch.randn(1, 1, 16, 16), torch.tensor([3])
    torch.testing.assert_close(load_model(out).unet(x, t), net.eval()(x, t))
    # The digest follows the slices' bytes.
    write_png(data / "train" / "s0.png", np.zeros((16, 16), np.float32), 16)
    assert data_digest(data / "train") != record["data"]["sha256"]


def test_ship_converts_a_torch_save_model_to_safetensors(tmp_path):
    run, data, net = _training_run(tmp_path)
    (run / "model" / WEIGHTS_FILE).unlink()  # as written by versions before safetensors
    torch.save(net.state_dict(), run / "model" / "thor_unet.pt")
    ship(run, data, tmp_path / "shipped", "x")
    assert sorted(f.name for f in (tmp_path / "shipped").iterdir()) == [
        "provenance.json",
        "thor_model.json",
        WEIGHTS_FILE,
    ]


def test_ship_and_provenance_refuse_what_is_not_there(tmp_path):
    with pytest.raises(ModelError, match="no finished training run"):
        ship(tmp_path, tmp_path, tmp_path / "out", "x")
    run, _, _ = _training_run(tmp_path)
    with pytest.raises(ModelError, match="has no provenance.json"):
        provenance(run / "model")


def test_register_shipped_puts_the_provenance_on_the_model_version(tmp_path, tiny_cfg):
    run, data, _ = _training_run(tmp_path)
    ship(run, data, tmp_path / "shipped", "meddiff thor train --data D --out R")
    uri = register_shipped(tiny_cfg, tmp_path / "shipped")
    name, version = uri.removeprefix("models:/").split("/")
    mv = mlflow.MlflowClient().get_model_version(name, version)
    assert mv.tags["provenance.command"] == "meddiff thor train --data D --out R"
    assert mv.tags["provenance.steps"] == "7"
    assert mv.tags["provenance.data_sha256"] == data_digest(data / "train")


@pytest.mark.skipif(not SHIPPED_DIR.is_dir(), reason="no shipped model in this checkout")
def test_the_bundled_model_loads_and_says_how_it_was_made(tmp_path):
    from meddiff.config import load_config
    from meddiff.data.brain import sample_brain

    record = provenance(SHIPPED_DIR)
    assert record["training"]["steps"] > 0 and "meddiff thor train" in record["command"]
    cfg = load_config("tiny")
    model = load_model(SHIPPED_DIR)
    assert model.image_size == cfg.thor.model.image_size
    size = sum(f.stat().st_size for f in SHIPPED_DIR.iterdir())
    assert size < 8 * 2**20  # "a few MB"
    # The training data it records is what `sample-brain --preset tiny` writes here, byte for byte.
    sample_brain(tmp_path / "brain", cfg.data.mri, seed=record["data"]["seed"])
    assert data_digest(tmp_path / "brain" / "train") == record["data"]["sha256"]
    # Its training-image statistics (detection compares images with them) are those slices'.
    reference = training_reference(tmp_path / "brain" / "train", model.info.get("intensity"))
    assert model.info["reference"] == json.loads(json.dumps(reference))
