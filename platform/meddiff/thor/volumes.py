"""THOR on whole volumes: a NIfTI file, a folder holding one DICOM series, or a series on a PACS
(DICOMweb) in; an anomaly-map volume in the input's own geometry, per-volume scores and, for
DICOM, a DICOM SEG and a Parametric Map out (stored back to the PACS when ``--out`` is one).

The volume is cut into the model's slices by :mod:`meddiff.data.mri`'s rules
(:func:`meddiff.data.volumes.slice_volume`), every slice goes through :class:`meddiff.thor.
detect.ThorStage` on Ray Data in batches, and the slice maps are put back voxel for voxel
(:func:`meddiff.data.volumes.unslice`). Output folder::

    anomaly_map.nii.gz   float32 map in [0, 1) on the input's voxel grid, the input's affine
    lesion_mask.nii.gz   uint8, map > the calibrated threshold (when one is known)
    slices.csv           per slice: name (z = canonical axial index), score
    scores.csv           per volume: score (mean of the slice scores), max slice score, lesion ml
    detect.json          the summary (settings, threshold, outputs, notes); written last
    dicom/seg.dcm        DICOM input only: binary SEG at the threshold, referencing the series
    dicom/anomaly_map.dcm                    Parametric Map of the map, referencing the series

File names are fixed: nothing of the patient's goes into a file name, a log line or MLflow (the
DICOM objects themselves carry the patient module, as the standard requires).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from meddiff import storage
from meddiff.config import Config
from meddiff.data import dicom, dicomweb
from meddiff.data.volumes import (
    SliceGeometry,
    Volume,
    nifti_bytes,
    read_nifti,
    slice_mask,
    slice_volume,
    unslice,
)
from meddiff.errors import ConfigError, DataError
from meddiff.files import write_json
from meddiff.thor.detect import FolderResult

if TYPE_CHECKING:
    from meddiff.tracking import RunLogger

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    """A volume input, read and checked. ``label`` names it in messages and summaries: the path
    given, or the PACS's base URL (never UIDs or patient attributes)."""

    volume: Volume
    label: str
    kind: str  # "nifti", "dicom" (a folder) or "dicomweb"
    series: dicom.DicomSeries | None = None
    canonical: tuple[np.ndarray, tuple[float, float, float]] | None = None


@dataclass
class VolumeResult:
    loaded: Loaded
    geometry: SliceGeometry
    result: FolderResult  # per kept slice, names "zNNNN" in axial order
    brain_threshold: float = 0.0  # data.mri.brain_threshold the slices were cut with

    def volume_map(self) -> np.ndarray:
        """float32 (I, J, K): the anomaly map on the input's voxel grid, 0 outside the brain
        (the slices' background was 0; resizing the map back would smear the brain's edge
        into it)."""
        return volume_map(self.loaded.volume, self.result.maps, self.geometry, self.brain_threshold)


def volume_map(
    volume: Volume, maps: np.ndarray, geometry: SliceGeometry, brain_threshold: float = 0.0
) -> np.ndarray:
    """Slice maps float32 (N, S, S) (one per slice of ``geometry``) as a float32 (I, J, K) map on
    ``volume``'s voxel grid, 0 outside the brain (voxels at or below ``brain_threshold``,
    ``data.mri.brain_threshold``)."""
    return unslice(maps, geometry) * (volume.data > brain_threshold)


def is_volume_input(source: Any) -> bool:
    """A DICOMweb location, a NIfTI file or a folder of DICOM files (not a PNG folder)."""
    from meddiff.data.mri import is_nifti

    if dicomweb.is_dicomweb(source):
        return True
    return is_nifti(source) or dicom.is_dicom_folder(source)


def input_label(source: Any) -> str:
    """How logs and MLflow name an input: a DICOMweb location by its server (no UIDs)."""
    if dicomweb.is_dicomweb(source):
        return dicomweb.server_of(str(source))
    return str(source)


def local_source(source: Any) -> Any:
    """``source`` readable here: a DICOMweb location as is, anything else through storage."""
    return source if dicomweb.is_dicomweb(source) else storage.local_input(source)


def load(source: Any, cfg: Config) -> Loaded:
    """Read and check a volume input (see :func:`is_volume_input`).

    Raises:
        DataError: one line naming the file (or the PACS) and the problem.
    """
    from meddiff.data.mri import is_nifti

    tolerance = cfg.data.dicom.spacing_tolerance
    if dicomweb.is_dicomweb(source):
        location = dicomweb.parse(str(source), cfg.data.dicom)
        items = dicomweb.retrieve_series(location, cfg.data.dicom)
        series = dicom.series_from_datasets(items, f"series on {location}", tolerance)
        return Loaded(series.volume, location.base_url, "dicomweb", series)
    if is_nifti(source):
        volume, data, spacing = read_nifti(source, cfg.data.mri)
        return Loaded(volume, str(source), "nifti", canonical=(data, spacing))
    series = dicom.read_series(source, tolerance)
    return Loaded(series.volume, str(source), "dicom", series)


def read_mask(path: Any, geometry: SliceGeometry) -> np.ndarray:
    """A lesion mask NIfTI in the volume's grid, cut like its slices: bool (N, S, S).

    Raises:
        DataError: unreadable, another shape, or another affine (naming the mask).
    """
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
    except Exception as err:
        raise DataError(f"{path}: not a readable NIfTI mask ({err})") from None
    data = data.reshape(data.shape[:3]) if data.ndim == 4 and data.shape[3] == 1 else data
    if data.shape == geometry.shape and not np.allclose(img.affine, geometry.affine, atol=1e-3):
        raise DataError(
            f"{path}: the mask's affine differs from the volume's; masks must be in the volume's "
            "own voxel grid"
        )
    return slice_mask(data, geometry, str(path))


def run_volume(cfg: Config, model_ref: str, source: Any, masks: Any = None) -> VolumeResult:
    """Slice ``source``, run THOR on every slice through Ray Data, results in memory."""
    from meddiff.thor.detect import driver_model, infer_items, plan_for, used_precision

    model_ref = driver_model(cfg, model_ref)
    plan = plan_for(cfg, model_ref)
    if plan["image_size"] != cfg.data.mri.image_size:
        # The slices must be the model's size; data.mri.image_size follows the model.
        cfg = _with_image_size(cfg, plan["image_size"])
    loaded = load(source, cfg)
    canonical = loaded.canonical or (None, None)
    slices, geometry = slice_volume(
        loaded.volume, cfg.data.mri, data=canonical[0], spacing=canonical[1]
    )
    mask_slices = read_mask(masks, geometry) if masks is not None else None
    names = [f"z{int(z):04d}" for z in geometry.z]
    items: list[dict[str, Any]] = [
        {"name": n, "image": img} for n, img in zip(names, slices.images, strict=True)
    ]
    if mask_slices is not None:
        for item, m in zip(items, mask_slices, strict=True):
            item["mask"] = m
    plan["volume"] = {"kind": loaded.kind, "slices": len(names), "shape": list(geometry.shape)}
    merged, seconds = infer_items(cfg, model_ref, items)
    plan["precision"] = used_precision(merged)
    order = np.argsort(merged["name"].astype(str), kind="stable")
    result = FolderResult(
        names=[str(n) for n in merged["name"][order]],
        scores=merged["score"][order],
        maps=merged["anomaly_map"][order],
        reconstructions=merged["reconstruction"][order],
        images=merged["image"][order],
        masks=merged["mask"][order] if "mask" in merged else None,
        plan=plan,
        seconds=seconds,
    )
    return VolumeResult(loaded, geometry, result, cfg.data.mri.brain_threshold)


def run_input(cfg: Config, model_ref: str, images: Any, masks: Any = None) -> FolderResult:
    """Detection on a PNG folder (:func:`meddiff.thor.detect.run_folder`) or a volume input
    (:func:`run_volume`: its slices), whichever ``images`` is."""
    from meddiff.thor.detect import run_folder

    if is_volume_input(images):
        return run_volume(cfg, model_ref, images, masks).result
    return run_folder(cfg, model_ref, images, masks)


def _with_image_size(cfg: Config, size: int) -> Config:
    data = cfg.model_dump(mode="json")
    data["data"]["mri"]["image_size"] = size
    return Config.model_validate(data)


def threshold_for(cfg: Config, model_ref: str) -> dict[str, Any] | None:
    """The SEG threshold for this run: ``data.dicom.seg_threshold`` when set, else the model's
    calibration for these inference settings (:mod:`meddiff.thor.calibrate`), else None."""
    from meddiff.thor.detect import plan_for
    from meddiff.tracking import fetch_model

    if cfg.data.dicom.seg_threshold is not None:
        return seg_threshold(cfg, model_ref, None, {})
    local = fetch_model(model_ref, cfg.tracking)
    return seg_threshold(cfg, model_ref, local, plan_for(cfg, str(local)))


def seg_threshold(
    cfg: Config, model_ref: str, local: Path | None, plan: dict[str, Any]
) -> dict[str, Any] | None:
    """:func:`threshold_for` of a model already fetched to ``local`` with inference ``plan``
    (what a service replica holds): ``{"threshold": float in (0, 1), "source": str, ...}``."""
    from meddiff.thor.calibrate import lookup

    if cfg.data.dicom.seg_threshold is not None:
        return {"threshold": cfg.data.dicom.seg_threshold, "source": "data.dicom.seg_threshold"}
    found = lookup(cfg, model_ref, local, plan)
    if found is not None:
        found["source"] = f"calibration {found['key']} of {model_ref}"
    return found


def detect(
    cfg: Config, model_ref: str, images: Any, out: Any, overwrite: bool = False
) -> dict[str, Any]:
    """``thor detect`` on a volume input, or with a PACS as ``out``: the whole job (module
    docstring). ``out`` is a folder, an object-store prefix, or a DICOMweb server; with a server
    the results are written to a local folder first, kept there, and stored with STOW-RS.
    An existing output at ``out`` is refused unless ``overwrite`` (the rule of every command:
    only what meddiff wrote there is replaced).

    Raises:
        DataError: bad input (one line); a store the PACS rejected names the local folder.
        ConfigError: DICOM results asked for without a threshold.
    """
    if dicomweb.is_dicomweb(out):
        target = dicomweb.parse(str(out), cfg.data.dicom)
        local = (
            storage.cache_dir() / "dicomweb-results" / time.strftime(f"%Y%m%d-%H%M%S-{os.getpid()}")
        )
        return detect_volume(cfg, model_ref, local_source(images), local, store=target.base_url)
    with storage.OutputLocation.open(out, overwrite=overwrite) as loc:
        return loc.rebase(detect_volume(cfg, model_ref, local_source(images), loc))


def detect_volume(
    cfg: Config,
    model_ref: str,
    source: Any,
    out_dir: str | Path | storage.OutputLocation,
    store: str | None = None,
) -> dict[str, Any]:
    """Write the outputs of the module docstring for one volume into ``out_dir`` (assembled under
    a temporary name, renamed when complete); with ``store`` (a DICOMweb base URL) also store the
    SEG and the map there. Returns the summary (``detect.json``)."""
    from meddiff import tracking

    if store is not None and not (dicomweb.is_dicomweb(source) or dicom.is_dicom_folder(source)):
        raise DataError(
            f"--out {store}: storing to a PACS needs a DICOM input (the SEG references its series)"
        )
    with (
        storage.OutputLocation.use(out_dir) as loc,
        tracking.start_run(cfg, "thor-detect") as run,  # nested under an active run
    ):
        wants_dicom = dicomweb.is_dicomweb(source) or dicom.is_dicom_folder(source)
        threshold = threshold_for(cfg, model_ref)
        if wants_dicom and threshold is None:
            raise ConfigError(
                "no calibrated SEG threshold for these inference settings: run `meddiff thor "
                "calibrate --model M --images HEALTHY_SLICES` with the same settings, or set "
                "data.dicom.seg_threshold"
            )
        res = run_volume(cfg, model_ref, source)
        summary = _write(res, loc, model_ref, threshold)
        if store is not None:
            summary["stored"] = _store(loc.staging, store, cfg)
            write_json(loc.staging / "detect.json", summary)
        _track(run, summary)
    return summary


def _write(
    res: VolumeResult, loc: storage.OutputLocation, model_ref: str, threshold: dict | None
) -> dict[str, Any]:
    g, r = res.geometry, res.result
    amap = res.volume_map()
    out = loc.staging
    tmp = out.with_name(out.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "anomaly_map.nii.gz").write_bytes(
        nifti_bytes(amap, g.affine, "meddiff THOR anomaly map")
    )
    outputs = {"anomaly_map": "anomaly_map.nii.gz: float32 anomaly map on the input's voxel grid"}
    lesion_ml = None
    if threshold is not None:
        mask = amap > threshold["threshold"]
        lesion_ml = float(mask.sum() * g.voxel_mm3 / 1000.0)
        (tmp / "lesion_mask.nii.gz").write_bytes(nifti_bytes(mask.astype(np.float32), g.affine))
        outputs["lesion_mask"] = "lesion_mask.nii.gz: 1 where the map exceeds the threshold"
    with open(tmp / "slices.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "z", "score"])
        w.writerows([n, int(z), f"{s:.6g}"] for n, z, s in zip(r.names, g.z, r.scores, strict=True))
    score, top = float(np.mean(r.scores)), float(np.max(r.scores))
    with open(tmp / "scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "score", "max_slice_score", "lesion_ml", "method", "map_kind"])
        ml = "" if lesion_ml is None else f"{lesion_ml:.4g}"
        w.writerow(
            ["volume", f"{score:.6g}", f"{top:.6g}", ml, r.plan["method"], r.plan["map_kind"]]
        )
    if res.loaded.series is not None:
        _write_dicom(res, amap, tmp / "dicom", model_ref, threshold)
        outputs["seg"] = "dicom/seg.dcm: DICOM SEG, binary, map > threshold"
        outputs["parametric_map"] = "dicom/anomaly_map.dcm: DICOM Parametric Map of the map"
    summary = {
        "input": res.loaded.label,
        "input_kind": res.loaded.kind,
        "model": str(model_ref),
        "shape": list(g.shape),
        "slices": len(r.names),
        "score": round(score, 6),
        "max_slice_score": round(top, 6),
        "threshold": threshold,
        "lesion_ml": None if lesion_ml is None else round(lesion_ml, 4),
        "seconds": round(r.seconds, 2),
        "images_per_s": round(r.images_per_s, 4),
        **r.plan,
        "notes": list(res.loaded.series.notes) if res.loaded.series is not None else [],
        "outputs": outputs,
    }
    write_json(tmp / "detect.json", summary)
    loc.install(tmp)
    return summary


def _write_dicom(res: VolumeResult, amap: np.ndarray, folder: Path, model_ref: str, threshold):
    seg, pm = dicom_objects(res.loaded.series, amap, model_ref, float(threshold["threshold"]))
    folder.mkdir(parents=True)
    seg.save_as(folder / "seg.dcm", enforce_file_format=True)
    pm.save_as(folder / "anomaly_map.dcm", enforce_file_format=True)


def dicom_objects(
    series: dicom.DicomSeries,
    amap: np.ndarray,
    model_ref: str,
    threshold: float,
    with_map: bool = True,
) -> tuple[Any, Any]:
    """The DICOM SEG (binary, ``amap`` > ``threshold``) and Parametric Map of ``amap`` (float32
    (I, J, K) on the series' voxel grid, in [0, 1]; None unless ``with_map``), both referencing
    ``series``'s instances: highdicom datasets, not yet written."""
    from meddiff import __version__
    from meddiff.data import dicom_results

    algorithm = dicom_results.Algorithm(
        model=str(model_ref)[-64:],
        version=f"{_model_name(str(model_ref))} (meddiff {__version__})"[:64],
        threshold=float(threshold),
    )
    frames = series.to_frames(amap)
    seg = dicom_results.segmentation(series.sources, frames > algorithm.threshold, algorithm)
    pm = dicom_results.parametric_map(series.sources, frames, algorithm) if with_map else None
    return seg, pm


def _model_name(ref: str) -> str:
    """``NAME/VERSION`` of a registry reference, else the model folder's name."""
    return ref.removeprefix("models:/") if ref.startswith("models:/") else Path(ref).name


def _store(out: Path, base_url: str, cfg: Config) -> dict:
    """STOW-RS the SEG and map written in ``out/dicom``; any failure names ``out``, which keeps
    them."""
    import pydicom

    datasets = [pydicom.dcmread(out / "dicom" / n) for n in ("seg.dcm", "anomaly_map.dcm")]
    try:
        uids = dicomweb.store(base_url, datasets, cfg.data.dicom)
    except dicomweb.StoreRejected as err:
        raise dicomweb.StoreRejected(f"{err}; the results are kept in {out}") from None
    except DataError as err:
        raise DataError(f"{err}; the results are kept in {out}") from None
    return {
        "pacs": base_url,
        "uids": {"seg": uids[0], "parametric_map": uids[1]},
        "local": str(out),
    }


def _track(run: RunLogger, summary: dict[str, Any]) -> None:
    """MLflow gets the summary without any UID (UIDs identify a patient's study to a PACS)."""
    tracked = json.loads(json.dumps(summary, default=str))
    if isinstance(tracked.get("stored"), dict):
        tracked["stored"].pop("uids", None)
    run.set_tags({"thor.map_kind": summary["map_kind"], "thor.method": summary["method"]})
    run.log_metrics({"slices": summary["slices"], "volume_score": summary["score"],
                        "images_per_s": summary["images_per_s"]})  # fmt: skip
    run.log_dict(tracked, "detect.json")
