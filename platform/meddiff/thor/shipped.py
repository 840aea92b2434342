"""The small THOR model that ships with meddiff, and the record of how it was made.

A DDPM cannot learn a brain in the few CPU minutes the demo has, so the demo evaluates a model that
``meddiff thor train`` produced on the same bundled data (nilearn's MNI152 template, through
``meddiff data sample-brain``), after training one briefly itself to show that training runs. The
shipped folder is an ordinary THOR model directory (:mod:`meddiff.thor.model`, weights in
safetensors) plus ``provenance.json``::

    {"format": "meddiff-thor-provenance/1",
     "command": "...",            the commands that made the data and the model
     "data": {...},                what sample-brain wrote (its manifest's source, sizes, seed) and
                                   the SHA-256 of the training slices (sorted names and bytes)
     "training": {...},            steps, final loss, seconds, config section thor.train
     "code_version": "...",        meddiff's version (git describe) in the training run
     "mlflow_run_id": "..."}       the training run in the store it was made in

``meddiff thor ship --run RUN --data DATA --out DIR`` writes such a folder from a training run;
``register_shipped`` puts it into the local registry with the provenance as model-version tags.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from meddiff.config import Config
from meddiff.errors import DataError, ModelError
from meddiff.files import read_format_json, write_json
from meddiff.thor.model import CONFIG_FILE, load_model, read_model_config, save_model

FORMAT = "meddiff-thor-provenance/1"
PROVENANCE = "provenance.json"
# The model the demo evaluates (64×64, the tiny preset's UNet; see docs/thor.md for its command).
SHIPPED_DIR = Path(__file__).parent / "pretrained" / "brain-tiny"
REGISTERED_NAME = "thor-ddpm-shipped"


def data_digest(folder: str | Path) -> str:
    """SHA-256 over the sorted PNG names and bytes of ``folder`` (what the model trained on)."""
    files = sorted(Path(folder).glob("*.png"))
    if not files:
        raise DataError(f"{folder}: no PNG slices to fingerprint")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def ship(run: str | Path, data: str | Path, out: str | Path, command: str) -> dict[str, Any]:
    """Copy the model of training run folder ``run`` (``meddiff thor train --out``) to ``out`` with
    ``provenance.json``; ``data`` is the ``sample-brain`` folder it trained on (its ``train/``).

    Raises:
        ModelError: ``run`` has no finished model (``train_summary.json`` and ``model/``).
        DataError: ``data`` has no training slices.
    """
    import mlflow

    run, data, out = Path(run), Path(data), Path(out)
    summary_file = run / "train_summary.json"
    if not summary_file.is_file() or not (run / "model" / CONFIG_FILE).is_file():
        raise ModelError(f"{run}: no finished training run (train_summary.json and model/)")
    summary = json.loads(summary_file.read_text())
    _, _, info = read_model_config(run / "model")
    manifest_file = data / "sample_brain.json"
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
    tags, params = _run_record(mlflow.MlflowClient(), summary.get("run_id"))
    record = {
        "format": FORMAT,
        "command": command,
        "data": {
            "folder": str(data / "train"),
            "source": manifest.get("source"),
            "sha256": data_digest(data / "train"),
            "slices": len(list((data / "train").glob("*.png"))),
            "image_size": manifest.get("image_size"),
            "seed": manifest.get("seed"),
        },
        "training": {
            "steps": info.get("steps", summary.get("steps")),
            "loss": summary.get("loss"),
            "seconds": summary.get("seconds"),
            "noise": info.get("train_noise"),
            "max_timestep": info.get("max_timestep"),
            "config": {k: v for k, v in params.items() if k.startswith("thor.train.")},
        },
        "code_version": tags.get("meddiff.code_version"),
        "mlflow_run_id": summary.get("run_id"),
    }
    tmp = out.with_name(out.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    # Re-saved rather than copied, so the weights are safetensors whatever the run wrote.
    unet_cfg, schedule_cfg, _ = read_model_config(run / "model")
    save_model(tmp, load_model(run / "model").unet, unet_cfg, schedule_cfg, info)
    write_json(tmp / PROVENANCE, record)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return record


def _run_record(client, run_id: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """The training run's tags and params, or empty where the store no longer has it."""
    import mlflow

    if not run_id:
        return {}, {}
    try:
        data = client.get_run(run_id).data
    except mlflow.exceptions.MlflowException:
        return {}, {}
    return dict(data.tags), dict(data.params)


def provenance(model_dir: str | Path = SHIPPED_DIR) -> dict[str, Any]:
    """The provenance record of a shipped model directory.

    Raises:
        ModelError: no (valid) ``provenance.json`` in ``model_dir``.
    """
    path = Path(model_dir) / PROVENANCE
    missing = f"{model_dir} has no {PROVENANCE}: not a shipped THOR model (see `meddiff thor ship`)"
    return read_format_json(path, FORMAT, ModelError, missing)


def version_tags(record: dict[str, Any]) -> dict[str, str]:
    """Flat ``provenance.*`` tags for a registry model version (MLflow tags are strings)."""
    d, t = record.get("data", {}), record.get("training", {})
    return {
        "provenance.command": record.get("command", ""),
        "provenance.code_version": str(record.get("code_version")),
        "provenance.data_source": str(d.get("source")),
        "provenance.data_sha256": str(d.get("sha256")),
        "provenance.data_slices": str(d.get("slices")),
        "provenance.steps": str(t.get("steps")),
        "provenance.loss": str(t.get("loss")),
        "provenance.train_seconds": str(t.get("seconds")),
        "provenance.mlflow_run_id": str(record.get("mlflow_run_id")),
    }


def register_shipped(cfg: Config, model_dir: str | Path = SHIPPED_DIR) -> str:
    """Register the shipped model (a new version of ``thor-ddpm-shipped``) with its provenance as
    model-version tags; returns its ``models:/`` URI."""
    import mlflow

    from meddiff import tracking

    record = provenance(model_dir)
    with tracking.start_run(cfg, "thor-shipped", nested=mlflow.active_run() is not None):
        mlflow.log_dict(record, PROVENANCE)
        version = tracking.register_model(
            model_dir,
            REGISTERED_NAME,
            tags=version_tags(record),
            description=f"Shipped THOR model, made by: {record.get('command', '')}",
        )
    return f"models:/{REGISTERED_NAME}/{version}"
