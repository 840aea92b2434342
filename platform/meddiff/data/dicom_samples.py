"""Synthetic MR series built with pydicom from a volume (the bundled brain): what tests,
benchmarks and the docs' examples upload to a PACS or read from a folder.

:func:`mr_series` writes one MR Image Storage instance per slice along the volume's third axis
(or one Enhanced MR Image Storage instance with a frame per slice), with the geometry of the
volume's affine (Image Position/Orientation Patient, Pixel Spacing, Slice Thickness in LPS, as
DICOM PS3.3 C.7.6.2 defines them), one Frame of Reference, 12-bit unsigned pixels and the patient
and study attributes given. Reading it back (:func:`meddiff.data.dicom.series_from_datasets`)
gives the same voxels and affine, up to the slice order along the stack's normal.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import numpy as np

from meddiff.data.dicom import LPS_TO_RAS
from meddiff.data.volumes import Volume

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4.1"
BITS = 12


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
