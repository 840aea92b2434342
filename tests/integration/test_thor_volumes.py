"""THOR on whole volumes through the CLI, on the shared Ray, with the shipped model: calibrate a
threshold into the registry, detect on a NIfTI volume and on a DICOM series (oblique, flipped,
anisotropic: 2.5 x 3 x 8 mm) with a lesion drawn at known voxels, find it at those voxels in the
output map, write a DICOM SEG and Parametric Map that reference the series, keep the planted
patient name out of every log, MLflow record and file name, evaluate a volume against a NIfTI
mask, and refuse bad input in one line."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from meddiff import precision as amp
from meddiff.cli import main
from meddiff.config import load_config
from meddiff.config.data import MriConfig
from meddiff.data.brain import BrainSampleSizes, sample_brain
from meddiff.data.volume_samples import mr_series, write_series
from meddiff.data.volumes import nifti_bytes
from meddiff.thor.shipped import SHIPPED_DIR, register_shipped
from volume_helpers import PLANTED_ID, PLANTED_NAME, brain, draw_lesion

# The fast setting at its cheapest (8 UNet passes a slice), so a volume takes seconds.
FAST = ["--preset", "tiny", "--stride", "50", "--set", "runtime.progress=false"]


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    root = tmp_path_factory.mktemp("volumes")
    base = brain((2.5, 3.0, 8.0), flip=(True, False, False), degrees=15.0)
    lesioned, lesion = draw_lesion(base, radius_mm=16.0, factor=0.25)
    for name, vol in {"lesion": lesioned, "control": base}.items():
        (root / f"{name}.nii.gz").write_bytes(nifti_bytes(vol.data, vol.affine))
    (root / "truth.nii.gz").write_bytes(nifti_bytes(lesion.astype(np.float32), base.affine))
    series = mr_series(lesioned, patient_name=PLANTED_NAME, patient_id=PLANTED_ID)
    write_series(series, root / "series")
    return root, lesioned, lesion


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The shipped model as a new registry version (its own calibrations become tags)."""
    copy = tmp_path_factory.mktemp("model") / "brain-tiny"
    shutil.copytree(SHIPPED_DIR, copy)
    return register_shipped(load_config("tiny"), copy)


@pytest.fixture(scope="module")
def calibrated(model, tmp_path_factory):
    healthy = tmp_path_factory.mktemp("healthy") / "brain"
    sample_brain(healthy, MriConfig(image_size=64), BrainSampleSizes(lesion=0, normal=6), seed=1)
    args = ["thor", "calibrate", "--model", model, "--images", str(healthy / "test" / "images")]
    assert main([*args, *FAST]) == 0
    return model


def run_json(capsys, args) -> dict:
    capsys.readouterr()
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)


def test_calibration_is_a_tag_of_the_model_version(calibrated):
    name, version = calibrated.removeprefix("models:/").split("/")
    tags = mlflow.MlflowClient().get_model_version(name, version).tags
    found = {k: json.loads(v) for k, v in tags.items() if k.startswith("thor.calibration.")}
    fast = [v for v in found.values() if v["plan"]["schedule"] == "fast DDIM, stride 50, eta 0"]
    assert len(fast) == 1 and 0 < fast[0]["threshold"] < 1
    assert fast[0]["healthy_slices"] == 6 and fast[0]["quantile"] == 0.95
    # The shipped model's own calibration (stride 25, 3 draws) came along at registration.
    assert any("mean of 3 draws" in v["plan"]["schedule"] for v in found.values())


def test_a_lesion_in_a_nifti_volume_is_found_at_its_voxels(volumes, calibrated, tmp_path, capsys):
    root, lesioned, lesion = volumes
    maps = {}
    for name in ("lesion", "control"):
        out = tmp_path / name
        args = ["thor", "detect", "--model", calibrated, "--images", str(root / f"{name}.nii.gz")]
        summary = run_json(capsys, [*args, "--out", str(out), *FAST])
        img = nib.load(str(out / "anomaly_map.nii.gz"))
        np.testing.assert_allclose(img.affine, lesioned.affine, atol=1e-4)
        assert img.shape == lesioned.data.shape
        maps[name] = np.asarray(img.dataobj)
        assert summary["threshold"]["source"].startswith("calibration ")
        assert summary["precision"] == amp.resolve("auto", "cpu", "thor-inference")
        assert (out / "lesion_mask.nii.gz").is_file() and summary["lesion_ml"] > 0
        assert summary["input_kind"] == "nifti" and summary["slices"] == len(
            (out / "slices.csv").read_text().splitlines()[1:]
        )
    # Same slices and noise seeds: the difference of the two maps is the lesion's doing, and it
    # peaks at the drawn lesion's voxels.
    diff = ndimage.gaussian_filter(maps["lesion"] - maps["control"], 1.0)
    peak = np.unravel_index(np.argmax(diff), diff.shape)
    assert ndimage.binary_dilation(lesion, iterations=1)[peak]
    brain_voxels = lesioned.data > 0
    assert maps["lesion"][lesion].mean() > 2 * maps["lesion"][brain_voxels & ~lesion].mean()
    assert maps["lesion"][lesion].mean() > 2 * maps["control"][lesion].mean()


def test_a_dicom_series_gets_a_seg_and_a_map_and_no_identifier_leaks(
    volumes, calibrated, tmp_path, capfd, caplog
):
    root, lesioned, lesion = volumes
    out = tmp_path / "detect"
    rc = main(["thor", "detect", "--model", calibrated, "--images", str(root / "series"),
               "--out", str(out), *FAST])  # fmt: skip
    assert rc == 0
    summary = json.loads((out / "detect.json").read_text())
    source = [pydicom.dcmread(p) for p in sorted((root / "series").iterdir())]
    seg = pydicom.dcmread(out / "dicom" / "seg.dcm")
    pm = pydicom.dcmread(out / "dicom" / "anomaly_map.dcm")
    for obj in (seg, pm):
        assert obj.FrameOfReferenceUID == source[0].FrameOfReferenceUID
        assert obj.ReferencedSeriesSequence[0].SeriesInstanceUID == source[0].SeriesInstanceUID
        assert obj.SeriesInstanceUID != source[0].SeriesInstanceUID
    # Each SEG frame lies on the source slice it names; the SEG covers the lesion far more than
    # the rest of the brain.
    by_uid = {s.SOPInstanceUID: k for k, s in enumerate(source)}
    voxels = np.zeros(lesioned.data.shape, bool)  # the SEG on the input's (I, J, K) grid
    for frame, item in zip(seg.pixel_array.reshape(-1, seg.Rows, seg.Columns),
                           seg.PerFrameFunctionalGroupsSequence, strict=True):  # fmt: skip
        k = by_uid[item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        pos = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float)
        np.testing.assert_allclose(
            pos, np.asarray(source[k].ImagePositionPatient, float), atol=1e-3
        )
        voxels[:, :, k] |= frame.T.astype(bool)
    inside = voxels[lesion].mean()
    elsewhere = voxels[(lesioned.data > 0) & ~lesion].mean()
    assert inside > 3 * elsewhere, (inside, elsewhere)
    assert summary["lesion_ml"] > 0 and summary["input_kind"] == "dicom"
    _assert_nothing_carries(PLANTED_NAME, PLANTED_ID, out, capfd, caplog)


def _assert_nothing_carries(name: str, pid: str, out: Path, capfd, caplog) -> None:
    """The planted patient name and id: in the DICOM outputs only (where the standard puts
    them), never in logs, MLflow's store (params, tags, metrics, registry) or its artifacts,
    nor any file name or other output file."""
    words = [name, name.replace("^", " "), pid]
    captured = capfd.readouterr()
    text = captured.out + captured.err + caplog.text
    assert not any(w in text for w in words)
    for path in out.rglob("*"):
        assert not any(w in path.name for w in words)
        if path.is_file() and path.suffix != ".dcm":
            assert not any(w.encode() in path.read_bytes() for w in words), path
    db = mlflow.get_tracking_uri().removeprefix("sqlite:///")
    con = sqlite3.connect(db)
    for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'"):
        for row in con.execute(f"SELECT * FROM {table}"):  # noqa: S608
            assert not any(w in str(row) for w in words), table
    client = mlflow.MlflowClient()
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id]):
            local = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id))
            for path in local.rglob("*"):
                assert not any(w in path.name for w in words)
                if path.is_file():
                    assert not any(w.encode() in path.read_bytes() for w in words), path


def test_evaluate_a_volume_against_a_nifti_mask(volumes, calibrated, tmp_path, capsys):
    root, _, _ = volumes
    summary = run_json(capsys, ["thor", "evaluate", "--model", calibrated,
                                "--images", str(root / "lesion.nii.gz"),
                                "--masks", str(root / "truth.nii.gz"), *FAST])  # fmt: skip
    metrics = summary["methods"]["thor"]["metrics"]
    assert metrics["pixel"]["auroc"] > 0.7
    assert summary["methods"]["thor"]["plan"]["volume"]["kind"] == "nifti"


def test_bad_volume_inputs_are_one_line(volumes, calibrated, tmp_path, capsys):
    root, _, _ = volumes
    mixed = tmp_path / "mixed"
    shutil.copytree(root / "series", mixed)
    other = mr_series(brain((6.0, 6.0, 8.0)))
    write_series(other[:1], tmp_path / "other")
    shutil.copy(tmp_path / "other" / "IMG_0001.dcm", mixed / "OTHER_0001.dcm")
    wrong = tmp_path / "wrong.nii.gz"
    wrong.write_bytes(nifti_bytes(np.zeros((4, 4, 4), np.float32), np.eye(4)))

    def fails(args, expected):
        capsys.readouterr()
        assert main(args) == 2
        # (MLflow's artifact-download progress bar may come first, from fetching the model)
        lines = capsys.readouterr().err.strip().splitlines()
        errors = [line for line in lines if line.startswith("meddiff: error: ")]
        assert len(errors) == 1 and lines[-1] == errors[0], lines
        assert expected in errors[0], errors[0]

    detect = ["thor", "detect", "--model", calibrated, "--out", str(tmp_path / "o"), *FAST]
    fails([*detect, "--images", str(mixed)], f"{mixed}: holds instances of more than one series")
    fails([*detect, "--images", str(root / "series"), "--stride", "40"],
          "no calibrated SEG threshold for these inference settings")  # fmt: skip
    fails(["thor", "evaluate", "--model", calibrated, "--images", str(root / "lesion.nii.gz"),
           "--masks", str(wrong), *FAST], f"{wrong}: mask has shape (4, 4, 4)")  # fmt: skip
    fails([*detect, "--images", str(root / "lesion.nii.gz"), "--out", "dicomweb://127.0.0.1:1/x"],
          "storing to a PACS needs a DICOM input")  # fmt: skip
    assert not (tmp_path / "o").exists()
