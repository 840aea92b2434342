"""Models that ship inside the package, and the record of how each was made.

Some stages cannot learn anything useful in the few CPU minutes the demo has (THOR's DDPM, the
tiny Stable Diffusion), so meddiff ships a small model that its own training command produced on
the bundled data, and the demo registers and uses it after training one briefly itself. Every
shipped model is an ordinary model directory (weights in safetensors) plus ``provenance.json``::

    {"format": "meddiff-<kind>-provenance/1",
     "command": "...",            the commands that made the data and the model
     "data": {...},                where the data came from and a SHA-256 of what was trained on
     "training": {...},            steps, final loss, seconds, the training config section
     "code_version": "...",        meddiff's version (git describe) in the training run
     "mlflow_run_id": "..."}       the training run in the store it was made in

This module holds what every kind shares: writing the folder, reading the record back, the
record as model-version tags, and registering the folder with them. The kinds
(:mod:`meddiff.thor.shipped`, :mod:`meddiff.synthesis.shipped`) say what their data and model are.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meddiff.config import Config
from meddiff.errors import DataError, ModelError
from meddiff.files import read_format_json, write_json
from meddiff.tracking.audits import memorization_tags

PROVENANCE = "provenance.json"


def run_record(run_id: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """Tags and params of training run ``run_id`` in the configured MLflow store, or empty dicts
    where there is no id or the store no longer has it."""
    import mlflow

    if not run_id:
        return {}, {}
    try:
        data = mlflow.MlflowClient().get_run(run_id).data
    except mlflow.exceptions.MlflowException:
        return {}, {}
    return dict(data.tags), dict(data.params)


def write_shipped(out: str | Path, write_model: Callable[[Path], None], record: dict) -> None:
    """Write a shipped model folder at ``out``, all or nothing: ``write_model(tmp)`` writes the
    model into a temporary folder, ``record`` goes beside it as ``provenance.json``, then the
    folder is renamed over ``out``, an earlier shipped model (one with ``provenance.json``);
    any other folder that holds files is refused (DataError), never deleted."""
    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not (out / PROVENANCE).is_file():
        raise DataError(
            f"{out} holds files and is not a shipped model folder (no {PROVENANCE}); meddiff "
            "replaces only its own: choose another --out"
        )
    tmp = out.with_name(out.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_model(tmp)
    write_json(tmp / PROVENANCE, record)
    # Readable by all: the folder is package data (some writers create their files 0600).
    for path in tmp.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def read_provenance(model_dir: str | Path, fmt: str, kind: str) -> dict[str, Any]:
    """The provenance record of a shipped model directory, which must be of format ``fmt``.

    Raises:
        ModelError: no (valid) ``provenance.json`` in ``model_dir``; ``kind`` names the command
            that writes one (e.g. ``"THOR model (see `meddiff thor ship`)"``).
    """
    path = Path(model_dir) / PROVENANCE
    missing = f"{model_dir} has no {PROVENANCE}: not a shipped {kind}"
    return read_format_json(path, fmt, ModelError, missing)


def version_tags(record: dict[str, Any]) -> dict[str, str]:
    """Flat ``provenance.*`` tags for a registry model version (MLflow tags are strings): the
    command, code version and training run, every scalar of ``data`` as ``provenance.data_<key>``,
    and the training's steps, loss and seconds."""
    t = record.get("training", {})
    tags = {
        "provenance.command": record.get("command", ""),
        "provenance.code_version": str(record.get("code_version")),
        "provenance.mlflow_run_id": str(record.get("mlflow_run_id")),
        "provenance.steps": str(t.get("steps")),
        "provenance.loss": str(t.get("loss")),
        "provenance.train_seconds": str(t.get("seconds")),
    }
    for key, value in record.get("data", {}).items():
        if not isinstance(value, dict | list):
            tags[f"provenance.data_{key}"] = str(value)
    if record.get("memorization"):  # a synthesis model's audit, for `serve promote`'s check
        tags.update(memorization_tags(record["memorization"]))
    return tags


def register_shipped(
    cfg: Config,
    model_dir: str | Path,
    record: dict[str, Any],
    *,
    name: str,
    job: str,
    what: str,
    tags: dict[str, str] | None = None,
) -> str:
    """Register ``model_dir`` as a new version of ``name`` with ``record`` (its provenance) as
    model-version tags and as an artifact of the registering run (MLflow job ``job``, nested
    under an active run); returns its ``models:/`` URI. ``what`` starts the version's
    description (e.g. ``"Shipped THOR model"``); ``tags`` are further model-version tags (a THOR
    model's calibrated thresholds)."""
    import mlflow

    from meddiff import tracking

    with tracking.start_run(cfg, job, nested=mlflow.active_run() is not None):
        mlflow.log_dict(record, PROVENANCE)
        version = tracking.register_model(
            model_dir,
            name,
            tags={**version_tags(record), **(tags or {})},
            description=f"{what}, made by: {record.get('command', '')}",
        )
    return f"models:/{name}/{version}"
