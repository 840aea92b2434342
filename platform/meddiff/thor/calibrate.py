"""The anomaly-map threshold of a model, calibrated on healthy slices: what a binary lesion mask
(the DICOM SEG of ``thor detect``) is cut at.

``calibrate`` runs detection on a folder of healthy slices and takes the ``quantile`` (0.95) of
the map over their brain pixels: the value that at most 5 % of healthy brain pixels exceed, the
false-positive rate THOR's box protocol also fixes (Bercea et al., arXiv 2403.08464, evaluation:
threshold at 5 % FPR on healthy data). Brain pixels are those with a non-zero input (the MRI
slicing sets the background to 0). A threshold only holds for the inference settings it was
measured with (method, T, schedule, draws, map kind, image size), so each is stored under a key
of those settings:

- in the model directory, ``thor_calibration.json`` (``{"format": "meddiff-thor-calibration/1",
  "calibrations": {KEY: {...}}}``), when the model is a directory; and
- on the registry's model version, as the tag ``thor.calibration.KEY`` (JSON), when the model is
  ``models:/NAME/VERSION`` or ``@ALIAS`` (registered artifacts cannot change; tags can).

:func:`lookup` finds the threshold for a run's settings: the registry tag first, then the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from meddiff.config import Config
from meddiff.errors import DataError
from meddiff.files import write_json

log = logging.getLogger(__name__)

FORMAT = "meddiff-thor-calibration/1"
CALIBRATION_FILE = "thor_calibration.json"
TAG_PREFIX = "thor.calibration."
# The plan fields that change the map's values (meddiff.thor.detect.plan_for).
_KEY_FIELDS = ("method", "noise", "noise_level", "harmonization_steps", "map_steps", "schedule",
               "draws", "map_kind", "image_size")  # fmt: skip


def plan_key(plan: dict[str, Any]) -> str:
    """A 12-hex key of the inference settings a threshold depends on."""
    settings = {k: plan.get(k) for k in _KEY_FIELDS}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def healthy_threshold(maps: np.ndarray, images: np.ndarray, quantile: float) -> tuple[float, int]:
    """The ``quantile`` of ``maps`` (N, H, W) over the pixels where ``images`` > 0, and how many
    pixels that was.

    Raises:
        DataError: no such pixel (all-black slices).
    """
    values = maps[images > 0]
    if values.size == 0:
        raise DataError("the healthy slices have no non-zero pixel to calibrate on")
    # "higher": a value of the data at or above the quantile, so at most 1 - quantile of the
    # pixels lie strictly above it (linear interpolation could leave up to one pixel more).
    return float(np.quantile(values, quantile, method="higher")), int(values.size)


def calibrate(
    cfg: Config, model_ref: str, healthy: str | Path, quantile: float = 0.95, command: str = ""
) -> dict[str, Any]:
    """Measure the threshold on the healthy PNG slices of ``healthy`` with ``cfg``'s inference
    settings and store it with the model (module docstring); returns the record.

    Raises:
        DataError / ModelError: as detection does; ``quantile`` outside (0, 1).
    """
    from meddiff.thor.detect import run_folder

    if not 0 < quantile < 1:
        raise DataError(f"--quantile {quantile}: must lie in (0, 1)")
    result = run_folder(cfg, model_ref, healthy)
    threshold, pixels = healthy_threshold(result.maps, result.images, quantile)
    plan = result.plan
    record = {
        "threshold": round(threshold, 6),
        "quantile": quantile,
        "healthy_slices": len(result.names),
        "healthy_pixels": pixels,
        "data": str(healthy),
        "plan": {k: plan.get(k) for k in _KEY_FIELDS},
        "command": command,
    }
    key = plan_key(plan)
    where = _store(model_ref, cfg, key, record)
    log.info("threshold %.4g at the %g quantile of %d healthy pixels, stored in %s",
             threshold, quantile, pixels, where)  # fmt: skip
    return {"key": key, **record, "stored": where}


def _store(model_ref: str, cfg: Config, key: str, record: dict[str, Any]) -> str:
    from meddiff.tracking.aliases import model_version, parse_ref

    if parse_ref(str(model_ref)) is not None:
        from meddiff.tracking import set_version_tags

        mv = model_version(str(model_ref), cfg.tracking)
        tag = {TAG_PREFIX + key: json.dumps(record, sort_keys=True)}
        set_version_tags(mv.name, mv.version, tag, cfg.tracking)
        return f"models:/{mv.name}/{mv.version} (tag {TAG_PREFIX}{key})"
    path = Path(model_ref) / CALIBRATION_FILE
    data = read_file(Path(model_ref))
    data["calibrations"][key] = record
    write_json(path, data)
    return str(path)


def read_file(model_dir: Path) -> dict[str, Any]:
    """The calibrations stored in a model directory (an empty record when there are none)."""
    path = Path(model_dir) / CALIBRATION_FILE
    if not path.is_file():
        return {"format": FORMAT, "calibrations": {}}
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if data.get("format") != FORMAT or not isinstance(data.get("calibrations"), dict):
        raise DataError(f"{path}: not a {FORMAT} file")
    return data


def version_tags(model_dir: str | Path) -> dict[str, str]:
    """The calibrations of a model directory as registry tags (when it is registered)."""
    calibrations = read_file(Path(model_dir))["calibrations"]
    return {TAG_PREFIX + k: json.dumps(v, sort_keys=True) for k, v in calibrations.items()}


def lookup(cfg: Config, model_ref: str, local_dir: str | Path, plan: dict[str, Any]):
    """The calibration record for ``plan`` (a dict with ``threshold``), or None: the model
    version's tag when ``model_ref`` is a registry reference, else (or failing that) the model
    directory's file ``local_dir``."""
    from meddiff.tracking.aliases import model_version, parse_ref

    key = plan_key(plan)
    if parse_ref(str(model_ref)) is not None:
        tags = model_version(str(model_ref), cfg.tracking).tags or {}
        if TAG_PREFIX + key in tags:
            return {"key": key, **json.loads(tags[TAG_PREFIX + key])}
    found = read_file(Path(local_dir))["calibrations"].get(key)
    return None if found is None else {"key": key, **found}
