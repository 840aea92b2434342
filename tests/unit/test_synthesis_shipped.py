"""The shipped synthesis model: provenance written by `synth ship`, registry tags, the bundled
folder (loads, generates an image of its resolution)."""

from __future__ import annotations

import io
import json

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from meddiff.config import load_config
from meddiff.data.shards import FORMAT, MANIFEST
from meddiff.errors import ModelError
from meddiff.prompts import prompt_table, write_prompt_table
from meddiff.synthesis import components as C
from meddiff.synthesis.shipped import (
    SHIPPED_DIR,
    pairs_digest,
    provenance,
    register_shipped,
    ship,
)

LABELS, CLUSTERS = [0, 0, 1], [0, 1, 0]


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _pairs(root, cfg, order=(0, 1, 2), seeds=(0, 1, 2)):
    """A pairs shard directory (no Ray): rows in ``order``, image i drawn with ``seeds[i]``."""
    prompts = [r.prompt for r in prompt_table(LABELS, CLUSTERS, cfg.prompts)]
    root.mkdir()
    rows = {
        "index": [i for i in order],
        "label": [LABELS[i] for i in order],
        "cluster": [CLUSTERS[i] for i in order],
        "prompt": [prompts[i] for i in order],
        "image": [_png(seeds[i]) for i in order],
    }
    pq.write_table(pa.table(rows), root / "part-0.parquet")
    manifest = {
        "format": FORMAT,
        "rows": 3,
        "files": ["part-0.parquet"],
        "columns": list(rows),
        "labels": {"0": 2, "1": 1},
        "strategy": "morphology",
    }
    (root / MANIFEST).write_text(json.dumps(manifest))
    return root, prompts


def _training_run(tmp_path):
    """A `synth train --out` folder as training leaves it: model/ (with prompts.csv), summary."""
    cfg = load_config("tiny")
    pairs, prompts = _pairs(tmp_path / "pairs", cfg)
    run = tmp_path / "run"
    comp = C.build_components(cfg.synthesis.model, prompts, seed=0)
    C.save_pipeline(comp, run / "model")
    write_prompt_table(
        run / "model" / "prompts.csv", prompt_table(LABELS, CLUSTERS, cfg.prompts), cfg.prompts
    )
    summary = {"steps": 7, "final_loss": 0.25, "seconds": 3.0, "mlflow_run_id": None}
    (run / "summary.json").write_text(json.dumps(summary))
    return run, pairs, comp


def test_ship_copies_the_model_with_its_provenance(tmp_path):
    run, pairs, comp = _training_run(tmp_path)
    out = tmp_path / "shipped"
    record = ship(run, pairs, out, "meddiff synth train ...", source="test patches")
    assert provenance(out) == record
    assert record["training"]["steps"] == 7 and record["training"]["loss"] == 0.25
    assert record["data"]["rows"] == 3 and record["data"]["prompts"] == 3
    assert record["data"]["sha256"] == pairs_digest(pairs)
    assert record["data"]["source"] == "test patches"
    weights = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.safetensors"))
    assert weights == [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    assert not list(out.rglob("*.bin")) and (out / "prompts.csv").is_file()
    loaded = C.load_pipeline(out)
    for name, p in comp.unet.state_dict().items():
        torch.testing.assert_close(loaded.unet.state_dict()[name], p)


def test_the_digest_follows_content_not_row_order(tmp_path):
    cfg = load_config("tiny")
    a, _ = _pairs(tmp_path / "a", cfg)
    b, _ = _pairs(tmp_path / "b", cfg, order=(2, 0, 1))
    c, _ = _pairs(tmp_path / "c", cfg, seeds=(0, 1, 9))
    assert pairs_digest(a) == pairs_digest(b) != pairs_digest(c)


def test_ship_and_provenance_refuse_what_is_not_there(tmp_path):
    with pytest.raises(ModelError, match="no finished synth train run"):
        ship(tmp_path, tmp_path, tmp_path / "out", "x")
    run, pairs, _ = _training_run(tmp_path)
    (run / "model" / "prompts.csv").unlink()
    with pytest.raises(ModelError, match=r"model: no prompts.csv"):
        ship(run, pairs, tmp_path / "out", "x")
    with pytest.raises(ModelError, match="has no provenance.json: not a shipped synthesis model"):
        provenance(run / "model")
    assert not (tmp_path / "out").exists()


def test_a_broken_model_folder_is_a_one_line_error(tmp_path):
    run, pairs, _ = _training_run(tmp_path)
    (run / "model" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    with pytest.raises(ModelError) as err:
        ship(run, pairs, tmp_path / "out", "x")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_register_shipped_puts_the_provenance_on_the_model_version(tmp_path, tiny_cfg):
    run, pairs, _ = _training_run(tmp_path)
    ship(run, pairs, tmp_path / "shipped", "meddiff synth train --pairs P --out R")
    uri = register_shipped(tiny_cfg, tmp_path / "shipped")
    name, version = uri.removeprefix("models:/").split("/")
    assert name == "meddiff-sd-shipped"
    mv = mlflow.MlflowClient().get_model_version(name, version)
    assert mv.tags["provenance.command"] == "meddiff synth train --pairs P --out R"
    assert mv.tags["provenance.steps"] == "7"
    assert mv.tags["provenance.data_sha256"] == pairs_digest(pairs)
    assert mv.tags["provenance.data_rows"] == "3"


@pytest.mark.skipif(not SHIPPED_DIR.is_dir(), reason="no shipped model in this checkout")
def test_the_bundled_model_loads_generates_and_says_how_it_was_made():
    record = provenance(SHIPPED_DIR)
    assert record["training"]["steps"] > 0 and "meddiff synth train" in record["command"]
    size = sum(f.stat().st_size for f in SHIPPED_DIR.rglob("*") if f.is_file())
    # "A few MB" in the package: the 96-px model (VAE 32/32/64/64 with 8 latent channels, the
    # part that keeps membranes and nuclei; docs/synthesis.md) is 8.1 MiB, the 32-px one was 7.0.
    assert size < 10 * 2**20
    assert not list(SHIPPED_DIR.rglob("*.bin"))  # safetensors only
    pipe = C.load_pipeline(SHIPPED_DIR)
    res = pipe.unet.config.sample_size * pipe.vae_scale_factor
    prompt = _first_prompt()
    image = pipe(
        prompt, num_inference_steps=3, height=res, width=res, output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    assert image.shape == (1, res, res, 3) and np.isfinite(image).all()
    assert image.std() > 0.01  # an image, not a constant


def _first_prompt() -> str:
    import csv

    with (SHIPPED_DIR / "prompts.csv").open(newline="") as f:
        return next(csv.DictReader(f))["prompt"]
