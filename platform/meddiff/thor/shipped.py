"""The small THOR model that ships with meddiff, and the record of how it was made.

A DDPM cannot learn a brain in the few CPU minutes the demo has, so the demo evaluates a model that
``meddiff thor train`` produced on the same bundled data (nilearn's MNI152 template, through
``meddiff data sample-brain``), after training one briefly itself to show that training runs. The
shipped folder is an ordinary THOR model directory (:mod:`meddiff.thor.model`, weights in
safetensors) plus ``provenance.json`` (:mod:`meddiff.tracking.shipped`); its ``data`` is what
sample-brain wrote (its manifest's source, sizes, seed) and the SHA-256 of the training slices
(sorted names and bytes), its ``training`` the steps, final loss, seconds, noise and the
``thor.train`` config.

``meddiff thor ship --run RUN --data DATA --out DIR`` writes such a folder from a training run;
``register_shipped`` puts it into the local registry with the provenance as model-version tags.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from meddiff.config import Config
from meddiff.errors import DataError, ModelError
from meddiff.thor.model import CONFIG_FILE, load_model, read_model_config, save_model
from meddiff.tracking import shipped as common
from meddiff.tracking.shipped import PROVENANCE, version_tags
from meddiff.training import read_summary

__all__ = [
    "FORMAT", "PROVENANCE", "REGISTERED_NAME", "SHIPPED_DIR", "data_digest", "provenance",
    "register_shipped", "ship", "version_tags",
]  # fmt: skip

FORMAT = "meddiff-thor-provenance/1"
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
    run, data, out = Path(run), Path(data), Path(out)
    summary_file = run / "train_summary.json"
    if not summary_file.is_file() or not (run / "model" / CONFIG_FILE).is_file():
        raise ModelError(f"{run}: no finished training run (train_summary.json and model/)")
    summary = read_summary(summary_file)
    _, _, info = read_model_config(run / "model")
    manifest_file = data / "sample_brain.json"
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
    tags, params = common.run_record(summary.get("mlflow_run_id"))
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
            "loss": summary.get("final_loss"),
            "seconds": summary.get("seconds"),
            "noise": info.get("train_noise"),
            "max_timestep": info.get("max_timestep"),
            "config": {k: v for k, v in params.items() if k.startswith("thor.train.")},
        },
        "code_version": tags.get("meddiff.code_version"),
        "mlflow_run_id": summary.get("mlflow_run_id"),
    }
    unet_cfg, schedule_cfg, _ = read_model_config(run / "model")
    if not info.get("reference"):  # trained before runs recorded it: from the same slices
        info = {**info, "reference": training_reference(data / "train", info.get("intensity"))}
    # Re-saved rather than copied, so the weights are safetensors whatever the run wrote.
    unet = load_model(run / "model").unet
    common.write_shipped(out, lambda d: save_model(d, unet, unet_cfg, schedule_cfg, info), record)
    return record


def training_reference(folder: str | Path, intensity: dict | None) -> dict[str, Any]:
    """:func:`meddiff.thor.reference.reference_statistics` of a folder of training slices, read
    as the model read them (``info.intensity``, the ``data.images`` settings)."""
    from meddiff.config.data import ImageConfig
    from meddiff.data.images import load_folder
    from meddiff.thor.reference import REFERENCE_IMAGES, reference_statistics

    images = load_folder(folder, cfg=ImageConfig.model_validate(intensity or {})).images
    return reference_statistics(images[:REFERENCE_IMAGES])


def provenance(model_dir: str | Path = SHIPPED_DIR) -> dict[str, Any]:
    """The provenance record of a shipped model directory.

    Raises:
        ModelError: no (valid) ``provenance.json`` in ``model_dir``.
    """
    return common.read_provenance(model_dir, FORMAT, "THOR model (see `meddiff thor ship`)")


def register_shipped(cfg: Config, model_dir: str | Path = SHIPPED_DIR) -> str:
    """Register the shipped model (a new version of ``thor-ddpm-shipped``) with its provenance and
    its calibrated SEG thresholds (:mod:`meddiff.thor.calibrate`) as model-version tags; returns
    its ``models:/`` URI."""
    from meddiff.thor import calibrate

    return common.register_shipped(
        cfg,
        model_dir,
        provenance(model_dir),
        name=REGISTERED_NAME,
        job="thor-shipped",
        what="Shipped THOR model",
        tags=calibrate.version_tags(model_dir),
    )
