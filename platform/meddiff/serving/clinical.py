"""The anomaly service's DICOM side: one instance in, a DICOM SEG out, and a whole series on the
service's PACS.

- ``POST /v1/anomaly`` with ``Content-Type: application/dicom``: one single-frame MR slice (a
  DICOM Part 10 file) is cut and scaled by the rules of ``thor detect`` on a volume
  (:func:`meddiff.data.dicom.instance_series`, :func:`meddiff.data.volumes.slice_volume`: brain
  window, square box, the model's size) and goes through the same batcher as a PNG; with
  ``Accept: application/dicom`` the answer is a DICOM SEG of the map above the model's calibrated
  threshold, on the instance's own pixel grid, referencing it (:func:`seg_bytes`).
- ``POST /v1/anomaly/series`` (only where ``data.dicom.url`` is set): a study and series UID on
  the PACS configured on the deployment (a request names UIDs, never a URL, so a client cannot make the service
  fetch from anywhere else). The series is counted (QIDO-RS) and refused over
  ``args.max_series_slices`` before any pixel data moves, retrieved (WADO-RS), checked and cut
  like ``thor detect``'s volume input, every slice runs on the model deployment's batcher, and
  the SEG and Parametric Map are stored back (STOW-RS) (:func:`run_series`).

PACS failures are the gateway's, not the client's: a PACS down or erroring after the bounded
retries of :mod:`meddiff.data.dicomweb` is 502 (504 when it timed out), credentials it refuses
502, a store it rejects 502; a series it does not hold is 422 (a bad reference). Study and series
UIDs and patient attributes appear only in the answers and the DICOM objects, never in log lines
or metrics.
"""

from __future__ import annotations

import asyncio
import io
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from fastapi import HTTPException

from meddiff.config import Config
from meddiff.config.data import MriConfig
from meddiff.config.dicom import DicomConfig
from meddiff.data import dicom, dicomweb
from meddiff.data.volumes import SliceGeometry, slice_volume
from meddiff.errors import DataError
from meddiff.serving import schemas as S

log = logging.getLogger(__name__)
T = TypeVar("T")

DICOM = "application/dicom"
# What the model was trained on: brain MR slices. Another modality's intensities mean nothing to
# it (a CT slice would get a map, but a meaningless one).
MODALITIES = ("MR",)
# Rows x Columns decoded at most: a compressed body of a few bytes can declare a huge image.
# 2048² is four times a 1024² MR slice; 512² CT and 256² MR slices are far below.
MAX_PIXELS = 2048 * 2048
# Slices of one series in flight to the model deployment at once: two batches of the default
# max_batch_size (4), one running while the next fills, without filling the deployment's queue
# (max_queued_requests) for other clients.
SERIES_WINDOW = 8


@dataclass(frozen=True)
class Settings:
    """What the DICOM routes need of the service's config."""

    mri: MriConfig = field(default_factory=MriConfig)
    dicom: DicomConfig = field(default_factory=DicomConfig)
    seed: int = 0  # runtime.seed: the series' base seed unless the request gives one
    max_series_slices: int = 300

    @classmethod
    def from_config(cls, cfg: Config, max_series_slices: int) -> Settings:
        return cls(cfg.data.mri, cfg.data.dicom, cfg.runtime.seed, max_series_slices)

    def mri_for(self, image_size: int) -> MriConfig:
        return self.mri.model_copy(update={"image_size": int(image_size)})


@dataclass
class Instance:
    """One DICOM slice, read, checked and cut: ``image`` float32 (S, S) in [0, 1] as the model
    takes it; ``geometry`` how it was cut from the instance (to put maps back)."""

    series: dicom.DicomSeries
    image: np.ndarray
    geometry: SliceGeometry


def prepare_instance(body: bytes, mri: MriConfig) -> Instance:
    """A DICOM body as the model's slice (module docstring).

    Raises:
        DataError: one line naming the problem (answered 422): not a DICOM file, corrupt, a
            modality other than MR, several frames, too many pixels, an undecodable transfer
            syntax (named with the packages that decode it), colour, no geometry, not axial, no
            brain in it.
    """
    ds = dicom.read_instance(body, "body")
    check_header(ds)
    series = dicom.instance_series("body", ds)
    slices, geometry = slice_volume(series.volume, mri)
    return Instance(series, slices.images[0], geometry)


def check_header(ds: Any) -> None:
    """Refuse what this route does not analyse, from the header alone (nothing decoded yet)."""
    modality = str(getattr(ds, "Modality", "") or "none")
    if modality not in MODALITIES:
        raise DataError(
            f"body: Modality {modality[:16]}; this service's model analyses brain MR slices "
            f"(Modality {', '.join(MODALITIES)})"
        )
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        sop = getattr(ds.get("SOPClassUID"), "name", "multi-frame")
        raise DataError(
            f"body: an enhanced multi-frame instance ({sop}, {frames} frames); this route takes "
            "one single-frame slice: store the series on the PACS and use /v1/anomaly/series"
        )
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        raise DataError("body: no Rows and Columns; not an image") from None
    if rows * cols > MAX_PIXELS:
        raise DataError(
            f"body: {cols}x{rows} pixels, more than the {MAX_PIXELS} this service decodes "
            "(refused from the header, never decoded)"
        )


def seg_bytes(
    inst: Instance, anomaly_map: np.ndarray, model: dict[str, Any], brain_threshold: float
) -> bytes:
    """The DICOM SEG (Part 10 bytes) of ``anomaly_map`` float32 (S, S) > ``model``'s
    ``seg_threshold``, put back on the instance's pixel grid and referencing it."""
    from meddiff.thor.volumes import dicom_objects, volume_map

    amap = volume_map(inst.series.volume, anomaly_map[None], inst.geometry, brain_threshold)
    seg, _ = dicom_objects(
        inst.series, amap, str(model["uri"]), float(model["seg_threshold"]), with_map=False
    )
    buf = io.BytesIO()
    seg.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def require_threshold(model: dict[str, Any], status: int) -> float:
    """The model's ``seg_threshold``, else ``status`` (406 when the client may ask for JSON
    instead) naming how an operator gets one."""
    threshold = model.get("seg_threshold")
    if threshold is None:
        raise HTTPException(
            status,
            f"model version {model.get('version')} has no calibrated SEG threshold for this "
            "service's plan: run `meddiff thor calibrate` with the same settings, or set "
            "data.dicom.seg_threshold in the service's args",
        )
    return float(threshold)


async def pacs(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` (a blocking DICOMweb call) in a thread, its failures as HTTP answers
    (module docstring)."""
    try:
        return await asyncio.to_thread(fn, *args)
    except dicomweb.NotOnPacs as err:
        raise HTTPException(422, f"study_uid, series_uid: {_clean(err)}") from None
    except dicomweb.PacsUnavailable as err:
        raise HTTPException(504 if err.timed_out else 502, _clean(err)) from None
    except DataError as err:  # refused credentials, a rejected store, a PACS answering nonsense
        raise HTTPException(502, _clean(err)) from None


def _clean(err: Exception) -> str:
    from meddiff.serving.api import clean

    return clean(err)


async def run_series(
    req: S.SeriesRequest, backend: Any, settings: Settings, image_size: int
) -> dict[str, Any]:
    """The series route's work (module docstring); returns the :class:`S.SeriesResponse` fields.

    Raises:
        HTTPException: 413 over ``max_series_slices``; 422 a
            series the PACS does not hold; 502/504 the PACS failing.
        DataError: a series that is not one regular stack (answered 422).
        HTTPException: 503 when the answering model has no SEG threshold.
    """
    base = str(settings.dicom.url)
    require_threshold(await backend.info(), 503)  # before any slice moves
    location = dicomweb.Location(base.rstrip("/"), req.study_uid, req.series_uid)
    limit = settings.max_series_slices
    if await pacs(dicomweb.count_instances, location, settings.dicom, limit) > limit:
        raise HTTPException(413, f"the series has more than {limit} instances (max_series_slices)")
    items = await pacs(dicomweb.retrieve_series, location, settings.dicom)
    series = await asyncio.to_thread(
        dicom.series_from_datasets,
        items,
        f"series on {location}",
        settings.dicom.spacing_tolerance,
    )
    if len(series.frames) > limit:
        raise HTTPException(413, f"the series has {len(series.frames)} slices, more than {limit}")
    slices, geometry = await asyncio.to_thread(
        slice_volume, series.volume, settings.mri_for(image_size)
    )
    base_seed = settings.seed if req.seed is None else req.seed
    outs = await _detect_all(backend, slices.images, geometry.z, base_seed)
    model = outs[-1]["model"]
    threshold = require_threshold(model, 503)
    seg_ds, pm_ds, ml = await asyncio.to_thread(
        _results, series, geometry, outs, model, threshold, settings.mri.brain_threshold
    )
    seg_uid, pm_uid = await pacs(dicomweb.store, location.base_url, [seg_ds, pm_ds], settings.dicom)
    scores = np.array([o["score"] for o in outs], dtype=np.float64)
    log.info("series of %d slices analysed; SEG and map stored on %s", len(outs), location)
    return {
        "study_uid": req.study_uid,
        "series_uid": req.series_uid,
        "slices": len(outs),
        "score": float(scores.mean()),
        "max_slice_score": float(scores.max()),
        "lesion_ml": ml,
        "seg_threshold": threshold,
        "seg": {"series_uid": str(seg_ds.SeriesInstanceUID), "sop_instance_uid": seg_uid},
        "parametric_map": {"series_uid": str(pm_ds.SeriesInstanceUID), "sop_instance_uid": pm_uid},
        "seed": base_seed,
        "model": model,
        "canary": any(o.get("canary", False) for o in outs),
    }


async def _detect_all(
    backend: Any, images: np.ndarray, z: np.ndarray, base_seed: int
) -> list[dict[str, Any]]:
    """Every slice through the backend's batcher, :data:`SERIES_WINDOW` at a time, seeded as
    ``thor detect`` seeds slice ``zNNNN``; all from one model version (one canary draw)."""
    from meddiff.thor.detect import image_seed

    window, u = asyncio.Semaphore(SERIES_WINDOW), random.random()

    async def one(image: np.ndarray, k: int) -> dict[str, Any]:
        async with window:
            return await backend.detect(image, image_seed(f"z{int(k):04d}", base_seed), u)

    outs = await asyncio.gather(*(one(img, k) for img, k in zip(images, z, strict=True)))
    if len({o["model"].get("version") for o in outs}) > 1:
        # A promotion landed mid-series: one volume's map must come from one model.
        raise HTTPException(503, "the model changed while the series ran; retry it",
                            headers={"Retry-After": "1"})  # fmt: skip
    return list(outs)


def _results(
    series: dicom.DicomSeries,
    geometry: SliceGeometry,
    outs: list[dict[str, Any]],
    model: dict[str, Any],
    threshold: float,
    brain_threshold: float,
) -> tuple[Any, Any, float]:
    """The SEG and Parametric Map datasets of the series, and the SEG's volume (ml)."""
    from meddiff.thor.volumes import dicom_objects, volume_map

    maps = np.stack([o["anomaly_map"] for o in outs]).astype(np.float32)
    amap = volume_map(series.volume, maps, geometry, brain_threshold)
    seg, pm = dicom_objects(series, amap, str(model["uri"]), threshold)
    return seg, pm, float((amap > threshold).sum() * geometry.voxel_mm3 / 1000.0)
