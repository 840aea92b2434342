"""The small Stable Diffusion model that ships with meddiff, and the record of how it was made.

The demo's few CPU minutes of ``synth train`` show that fine-tuning runs but leave a from-scratch
32-px model that generates colour blurs, so the demo generates its synthetic set (and serves
``/synthesis``) from a model that ``meddiff synth train`` produced on the same bundled data for
longer and at PCam's own 96 px, with a larger autoencoder warmed up with a perceptual loss (the
PCam-format patches of ``meddiff data sample-pcam``, ingested and captioned by ``prompts build``). The shipped folder is an ordinary diffusers pipeline directory (weights in
safetensors, plus the ``prompts.csv`` it was trained on) and ``provenance.json``
(:mod:`meddiff.tracking.shipped`); its ``data`` describes the pairs (rows, labels, prompts,
prompting strategy, the prompts run) with a SHA-256 over their content, its ``training`` the
steps, final loss, seconds and the ``synthesis.*`` config of the run.

``meddiff synth ship --run RUN --pairs PAIRS --out DIR --command ...`` writes such a folder from
a training run; ``register_shipped`` puts it into the local registry with the provenance as
model-version tags.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from meddiff.config import Config
from meddiff.errors import DataError, ModelError
from meddiff.tracking import shipped as common

FORMAT = "meddiff-synthesis-provenance/1"
# The model the demo generates from (the tiny preset's component types at PCam's 96 px, with a
# larger VAE; command and measurements in docs/synthesis.md).
SHIPPED_DIR = Path(__file__).parent / "pretrained" / "pcam-tiny"
REGISTERED_NAME = "meddiff-sd-shipped"
PROMPTS_FILE = "prompts.csv"
# Recorded config: what shapes the model (model.*) and how it was trained (train.*).
_CONFIG_PREFIXES = ("synthesis.model.", "synthesis.train.", "runtime.seed")


def pairs_digest(pairs: str | Path) -> str:
    """SHA-256 over the content of a pairs shard directory: each row's ``index``, ``label``,
    ``prompt`` and image bytes, rows in ``index`` order (so file names and row order, which a Ray
    Data write does not fix, do not change it).

    Raises:
        DataError: ``pairs`` is not a complete shard directory.
    """
    from meddiff.data import shards

    cols = ["index", "label", "prompt", "image"]
    tables = [
        shards.read_file(pairs, f, columns=cols) for f in shards.read_manifest(pairs)["files"]
    ]
    index = np.concatenate([t["index"].to_numpy() for t in tables])
    labels = np.concatenate([t["label"].to_numpy() for t in tables])
    prompts = [p for t in tables for p in t["prompt"].to_pylist()]
    images = [b for t in tables for b in t["image"].to_pylist()]
    h = hashlib.sha256()
    for i in np.argsort(index, kind="stable"):
        h.update(f"{index[i]}\0{labels[i]}\0{prompts[i]}\0".encode() + images[i] + b"\0")
    return h.hexdigest()


def ship(
    run: str | Path,
    pairs: str | Path,
    out: str | Path,
    command: str,
    source: str | None = None,
    memorization: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Copy the model of training run folder ``run`` (``meddiff synth train --out``) to ``out``
    with ``provenance.json``; ``pairs`` is the shard directory it trained on, ``source`` (free
    text) where their images came from; ``memorization`` the memorization audit of its samples
    (:func:`meddiff.evaluation.memorization.read_audit`), recorded as ``memorization`` (and as
    model-version tags when registered).

    Raises:
        ModelError: ``run`` has no finished model (``summary.json`` and a loadable ``model/``).
        DataError: ``pairs`` is not a complete shard directory; the audit judged another
            model's samples.
    """
    from meddiff.data import shards
    from meddiff.synthesis import components as C
    from meddiff.synthesis.train import pairs_table

    run, pairs = Path(run), Path(pairs)
    summary_file = run / "summary.json"
    model = run / "model"
    if not summary_file.is_file() or not (model / "model_index.json").is_file():
        raise ModelError(f"{run}: no finished synth train run (summary.json and model/)")
    if not (model / PROMPTS_FILE).is_file():
        raise ModelError(f"{model}: no {PROMPTS_FILE} (the prompts the model was trained on)")
    summary = json.loads(summary_file.read_text())
    _check_audit(memorization, model)
    manifest = shards.read_manifest(pairs)
    tags, params = common.run_record(summary.get("mlflow_run_id"))
    record = {
        "format": FORMAT,
        "command": command,
        "data": {
            "folder": str(pairs),
            "source": source,
            "sha256": pairs_digest(pairs),
            "rows": manifest.get("rows"),
            "labels": manifest.get("labels"),
            "prompts": len(pairs_table(pairs)),
            "strategy": manifest.get("strategy"),
            "prompts_run_id": manifest.get("mlflow_run_id"),
        },
        "training": {
            "steps": summary.get("steps"),
            "loss": summary.get("final_loss"),
            "seconds": summary.get("seconds"),
            "samples_per_s": summary.get("samples_per_s"),
            "config": {k: v for k, v in params.items() if k.startswith(_CONFIG_PREFIXES)},
        },
        "code_version": tags.get("meddiff.code_version"),
        "mlflow_run_id": summary.get("mlflow_run_id"),
    }
    if memorization is not None:
        record["memorization"] = memorization
    pipe = C.load_pipeline(model)  # ModelError when a component is missing or broken

    def write(folder: Path) -> None:
        # Re-saved rather than copied, so the weights are safetensors whatever the run wrote.
        pipe.save_pretrained(str(folder), safe_serialization=True)
        shutil.copy2(model / PROMPTS_FILE, folder / PROMPTS_FILE)

    common.write_shipped(out, write, record)
    return record


def _check_audit(audit: dict[str, Any] | None, model: Path) -> None:
    """An audit of samples from a model folder must be of this one (a registry version cannot
    be told apart here: it is recorded as given)."""
    judged = (audit or {}).get("model")
    if (
        judged
        and not str(judged).startswith("models:/")
        and Path(judged).resolve() != model.resolve()
    ):
        raise DataError(f"{audit['audit']}: the audit judged samples of {judged}, not of {model}")


def provenance(model_dir: str | Path = SHIPPED_DIR) -> dict[str, Any]:
    """The provenance record of a shipped synthesis model directory.

    Raises:
        ModelError: no (valid) ``provenance.json`` in ``model_dir``.
    """
    return common.read_provenance(model_dir, FORMAT, "synthesis model (see `meddiff synth ship`)")


def register_shipped(cfg: Config, model_dir: str | Path = SHIPPED_DIR) -> str:
    """Register the shipped model (a new version of ``meddiff-sd-shipped``) with its provenance
    as model-version tags; returns its ``models:/`` URI."""
    return common.register_shipped(
        cfg,
        model_dir,
        provenance(model_dir),
        name=REGISTERED_NAME,
        job="synthesis-shipped",
        what="Shipped Stable Diffusion model (tiny, 96 px)",
    )
