"""Sample MR volumes and DICOM series built from the bundled brain: what tests, benchmarks and
the docs' examples read from a folder or upload to a PACS.

:func:`brain_volume` is nilearn's MNI152 T1 template (skull-stripped, brain mask applied)
resampled to any voxel size and stored under any affine (voxel axes flipped or permuted, world
axes rotated: an oblique acquisition), so the same anatomy sits at the same world coordinates
whatever the storage; :func:`draw_lesion` blends a ball of known voxels into it.

:func:`mr_series` writes one MR Image Storage instance per slice along the volume's third axis
(or one Enhanced MR Image Storage instance with a frame per slice), with the geometry of the
volume's affine (Image Position/Orientation Patient, Pixel Spacing, Slice Thickness in LPS, as
DICOM PS3.3 C.7.6.2 defines them), one Frame of Reference, 12-bit unsigned pixels and the patient
and study attributes given. Reading it back (:func:`meddiff.data.dicom.series_from_datasets`)
gives the same voxels and affine, up to the slice order along the stack's normal.
"""

from __future__ import annotations

import datetime
import functools
from pathlib import Path
from typing import Any

import numpy as np

from meddiff.data.dicom import LPS_TO_RAS
from meddiff.data.volumes import Volume

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4.1"
BITS = 12


def brain_volume(
    voxel_mm: tuple[float, float, float] = (3.0, 3.0, 3.0),
    *,
    flip: tuple[bool, bool, bool] = (False, False, False),
    permute: tuple[int, int, int] = (0, 1, 2),
    degrees: float = 0.0,
) -> Volume:
    """The template at ``voxel_mm`` (linear resampling from 1 mm), its voxel axes then flipped and
    permuted, its world axes rotated by ``degrees`` about the superior axis; the affine records
    all of it, centred on the volume. float32, 0 outside the brain."""
    ras = _template(tuple(float(v) for v in voxel_mm))
    affine = np.diag([*voxel_mm, 1.0])
    affine[:3, 3] = -np.asarray(ras.shape) * np.asarray(voxel_mm) / 2
    data = ras
    for axis, flipped in enumerate(flip):
        if flipped:
            data = np.flip(data, axis)
            mirror = np.eye(4)
            mirror[axis, axis], mirror[axis, 3] = -1.0, ras.shape[axis] - 1
            affine = affine @ mirror
    data = np.transpose(data, permute)
    perm = np.eye(4)
    perm[:3, :3] = np.eye(3)[:, list(permute)]
    rotation = np.eye(4)
    t = np.deg2rad(degrees)
    rotation[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return Volume(np.ascontiguousarray(data), rotation @ affine @ perm, "MNI152 template")


@functools.lru_cache(maxsize=4)
def _template(voxel_mm: tuple[float, float, float]) -> np.ndarray:
    from scipy import ndimage

    from meddiff.data.brain import mni152

    vol, mask = mni152()  # canonical RAS, 1 mm
    out = ndimage.zoom(np.where(mask, vol, 0.0), [1.0 / v for v in voxel_mm], order=1)
    return np.clip(out, 0, None).astype(np.float32)


def draw_lesion(
    volume: Volume,
    radius_mm: float = 16.0,
    offset_mm: tuple[float, float, float] = (18.0, 10.0, 12.0),
    factor: float = 0.25,
) -> tuple[Volume, np.ndarray]:
    """A ball of ``radius_mm`` at ``offset_mm`` (world, RAS) from the brain's centre of mass,
    inside the brain, its intensity multiplied by ``factor`` (below 1: hypo-intense, as chronic
    stroke on T1). Returns the new volume and the lesion's bool voxel mask on its grid."""
    data = volume.data
    ijk = np.indices(data.shape).reshape(3, -1).T
    world = ijk @ volume.affine[:3, :3].T + volume.affine[:3, 3]
    inside = data.reshape(-1) > 0
    centre = world[inside].mean(axis=0) + np.asarray(offset_mm)
    mask = ((np.linalg.norm(world - centre, axis=1) <= radius_mm) & inside).reshape(data.shape)
    out = data.copy()
    out[mask] = np.clip(out[mask] * factor, 0, data.max())
    return Volume(out, volume.affine, volume.source), mask


def mr_series(
    volume: Volume,
    *,
    patient_name: str = "Synthetic^Brain",
    patient_id: str = "MEDDIFF-0001",
    series_description: str = "T1 synthetic",
    enhanced: bool = False,
    study_uid: str | None = None,
) -> list[Any]:
    """A synthetic MR series of ``volume`` (data (I, J, K), RAS affine): one pydicom Dataset per
    slice k, or one multi-frame Dataset with ``enhanced``. Values are scaled to 0..4095.

    The affine's first two columns must be orthogonal (DICOM's row and column directions are)."""
    from pydicom.uid import generate_uid

    lps = np.linalg.inv(LPS_TO_RAS) @ np.asarray(volume.affine, dtype=float)
    col_step, row_step = lps[:3, 0], lps[:3, 1]
    spacing = [float(np.linalg.norm(row_step)), float(np.linalg.norm(col_step))]
    orientation = [*(col_step / spacing[1]), *(row_step / spacing[0])]
    data = np.asarray(volume.data, dtype=np.float64)
    lo, hi = float(data.min()), float(data.max())
    pixels = np.round((data - lo) / max(hi - lo, 1e-12) * (2**BITS - 1)).astype(np.uint16)
    common = {
        "patient_name": patient_name,
        "patient_id": patient_id,
        "study_uid": study_uid or generate_uid(),
        "series_uid": generate_uid(),
        "frame_of_reference_uid": generate_uid(),
        "series_description": series_description,
        "thickness": float(np.linalg.norm(lps[:3, 2])),
    }
    positions = [lps[:3, 3] + k * lps[:3, 2] for k in range(data.shape[2])]
    frames = [np.ascontiguousarray(pixels[:, :, k].T) for k in range(data.shape[2])]
    if enhanced:
        return [_enhanced(frames, positions, orientation, spacing, common)]
    return [
        _single(frame, pos, orientation, spacing, k + 1, common)
        for k, (frame, pos) in enumerate(zip(frames, positions, strict=True))
    ]


def write_series(datasets: list[Any], folder: str | Path) -> list[Path]:
    """Save each dataset as ``folder/IMG_NNNN.dcm`` (Part 10 files); returns the paths."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, ds in enumerate(datasets):
        path = out / f"IMG_{n + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _base(sop_class: str, common: dict[str, Any], rows: int, cols: int) -> Any:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128  # a Part 10 file however it is written (dcmwrite, STOW-RS)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    today = datetime.date.today().strftime("%Y%m%d")
    ds.PatientName = common["patient_name"]
    ds.PatientID = common["patient_id"]
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = common["study_uid"]
    ds.StudyDate, ds.StudyTime = today, "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.SeriesInstanceUID = common["series_uid"]
    ds.SeriesNumber = 1
    ds.SeriesDescription = common["series_description"]
    ds.Modality = "MR"
    ds.Manufacturer = "meddiff synthetic"
    ds.FrameOfReferenceUID = common["frame_of_reference_uid"]
    ds.PositionReferenceIndicator = ""
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, BITS, BITS - 1
    ds.PixelRepresentation = 0
    ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "GR", "SP", ""
    ds.MRAcquisitionType = "3D"
    ds.ContentDate, ds.ContentTime = today, "120000"
    return ds


def _single(frame, position, orientation, spacing, number: int, common: dict[str, Any]) -> Any:
    ds = _base(MR_IMAGE, common, *frame.shape)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = spacing
    ds.SliceThickness = common["thickness"]
    ds.SpacingBetweenSlices = common["thickness"]
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.PixelData = frame.tobytes()
    return ds


def _enhanced(frames, positions, orientation, spacing, common: dict[str, Any]) -> Any:
    from pydicom.dataset import Dataset

    ds = _base(ENHANCED_MR_IMAGE, common, *frames[0].shape)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.InstanceNumber = 1
    ds.NumberOfFrames = len(frames)
    shared = Dataset()
    measures, plane = Dataset(), Dataset()
    measures.PixelSpacing = spacing
    measures.SliceThickness = common["thickness"]
    measures.SpacingBetweenSlices = common["thickness"]
    plane.ImageOrientationPatient = [float(v) for v in orientation]
    transform = Dataset()
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 1, 0, "US"
    shared.PixelMeasuresSequence = [measures]
    shared.PlaneOrientationSequence = [plane]
    shared.PixelValueTransformationSequence = [transform]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for k, pos in enumerate(positions):
        item, position, content = Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = [float(v) for v in pos]
        content.DimensionIndexValues = [k + 1]
        content.StackID, content.InStackPositionNumber = "1", k + 1
        item.PlanePositionSequence = [position]
        item.FrameContentSequence = [content]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    organization, index = Dataset(), Dataset()
    organization.DimensionOrganizationUID = _uid()
    index.DimensionOrganizationUID = organization.DimensionOrganizationUID
    index.DimensionIndexPointer = 0x00209057  # In-Stack Position Number
    index.FunctionalGroupPointer = 0x00209111  # Frame Content Sequence
    ds.DimensionOrganizationSequence = [organization]
    ds.DimensionIndexSequence = [index]
    ds.PixelData = np.stack(frames).tobytes()
    return ds


def _uid() -> str:
    from pydicom.uid import generate_uid

    return generate_uid()


def sample_volume(
    out: str | Path,
    voxel_mm: tuple[float, float, float] = (2.5, 3.0, 8.0),
    degrees: float = 15.0,
    lesion_radius_mm: float = 16.0,
    enhanced: bool = False,
) -> dict[str, Any]:
    """Write a sample volume to try volume detection on: ``OUT/volume.nii.gz`` (the template,
    oblique by ``degrees``, x axis flipped, ``voxel_mm`` voxels, a hypo-intense lesion of
    ``lesion_radius_mm``; 0: none), ``OUT/lesion_mask.nii.gz`` (its voxels), ``OUT/dicom/``
    (the same volume as a synthetic MR series, patient "Synthetic^Brain") and
    ``OUT/sample_volume.json`` (written last). Returns that manifest.

    Raises:
        DataError: ``out`` exists.
    """
    from meddiff.data.volumes import nifti_bytes
    from meddiff.errors import DataError
    from meddiff.files import write_json

    root = Path(out)
    if root.exists():
        raise DataError(f"{root} already exists; choose another folder")
    volume = brain_volume(voxel_mm, flip=(True, False, False), degrees=degrees)
    mask = np.zeros(volume.data.shape, bool)
    if lesion_radius_mm > 0:
        volume, mask = draw_lesion(volume, radius_mm=lesion_radius_mm)
    root.mkdir(parents=True)
    (root / "volume.nii.gz").write_bytes(nifti_bytes(volume.data, volume.affine))
    (root / "lesion_mask.nii.gz").write_bytes(nifti_bytes(mask.astype(np.float32), volume.affine))
    write_series(mr_series(volume, enhanced=enhanced), root / "dicom")
    manifest = {
        "source": "nilearn MNI152 T1 template, brain mask applied",
        "shape": list(volume.data.shape),
        "voxel_mm": list(voxel_mm),
        "oblique_degrees": degrees,
        "lesion_voxels": int(mask.sum()),
        "lesion_radius_mm": lesion_radius_mm,
        "dicom": "enhanced multi-frame" if enhanced else "one instance per slice",
        "files": ["volume.nii.gz", "lesion_mask.nii.gz", "dicom/"],
    }
    write_json(root / "sample_volume.json", manifest)
    return manifest
