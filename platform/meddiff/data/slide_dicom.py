"""Write a whole-slide image as DICOM (VL Whole Slide Microscopy Image instances, one per level).

What a PACS or a DICOM-WSI viewer stores: one instance per pyramid level, each a TILED_FULL
multi-frame image of JPEG baseline tiles (DICOM PS3.3 A.32.8, "VL Whole Slide Microscopy Image
IOD"; tiles in row-major order, edge tiles padded). The levels are the source slide's own, re-encoded
from its decoded pixels, so a JPEG source is compressed twice: the sample slide's pixels agree with
the TIFF's within a few grey levels (docs/wsi.md, "Measured").

Used to give tests and users a DICOM whole-slide image of the sample slide
(``meddiff data sample-wsi --format dicom``); :func:`meddiff.data.slides.open_slide` reads it with
OpenSlide. No patient data: the Patient and Study modules' type-2 attributes are written empty.
"""

from __future__ import annotations

import datetime
import io
import os
import shutil
from pathlib import Path

import numpy as np

from meddiff.data.slides import WSI_SOP_CLASS, ReaderName, Slide, open_slide
from meddiff.errors import DataError

# Image orientation of the total pixel matrix on the slide (PS3.3 C.8.12.4.1.4): rows run along the
# slide's -Y axis, columns along -X, the usual label-left layout scanners write.
ORIENTATION = [0, -1, 0, -1, 0, 0]


def write_dicom_wsi(
    source: str | Path,
    out_dir: str | Path,
    *,
    reader: ReaderName = "auto",
    tile: int = 256,
    quality: int = 95,
) -> Path:
    """Convert the slide ``source`` into ``out_dir/level-<i>.dcm``, one instance per level.

    Args:
        source: any slide :func:`open_slide` reads; its level-0 pixel size (``mpp-x``) is needed.
        out_dir: a folder that does not exist yet or is empty (never overwritten).
        reader: the reader of ``source``.
        tile: frame edge in pixels (Rows = Columns).
        quality: JPEG quality (Pillow / libjpeg scale, 1-100) of the re-encoded frames.

    Returns:
        ``out_dir``, written under a temporary name then renamed.

    Raises:
        DataError: the source is not readable or has no pixel size, or ``out_dir`` holds files.
    """
    from pydicom.uid import generate_uid

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} exists and is not an empty folder; choose a new folder")
    tmp = out.with_name(out.name + f".partial-{os.getpid()}")
    uids = {k: generate_uid() for k in ("study", "series", "frame_of_reference")}
    try:
        tmp.mkdir(parents=True)
        with open_slide(source, reader) as slide:
            mpp = _pixel_size(slide)
            for level in range(slide.level_count):
                ds = _instance(slide, level, mpp, tile, quality, uids)
                ds.save_as(tmp / f"level-{level}.dcm", enforce_file_format=True)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _pixel_size(slide: Slide) -> float:
    try:
        mpp = float(slide.property("mpp-x"))
    except (TypeError, ValueError):
        mpp = float("nan")
    if not np.isfinite(mpp) or mpp <= 0:
        raise DataError(
            f"slide {slide.path}: no pixel size (mpp) in its metadata; DICOM whole-slide "
            "images need one"
        )
    return mpp


def _frames(slide: Slide, level: int, tile: int, quality: int) -> list[bytes]:
    """JPEG frames of ``level`` in TILED_FULL order, read one row of frames at a time; edge
    frames padded with white (glass), which readers crop at the total pixel matrix."""
    from PIL import Image

    width, height = slide.level_dimensions[level]
    ds = slide.level_downsamples[level]
    cols = -(-width // tile)
    frames = []
    for y in range(0, height, tile):
        h = min(tile, height - y)
        band = np.full((tile, cols * tile, 3), 255, dtype=np.uint8)
        band[:h, :width] = slide.read(0, round(y * ds), level, width, h)
        for x in range(0, width, tile):
            buf = io.BytesIO()
            # 4:2:0 chroma subsampling (Pillow's default): PhotometricInterpretation YBR_FULL_422.
            Image.fromarray(band[:, x : x + tile]).save(buf, "JPEG", quality=quality)
            frames.append(buf.getvalue())
    return frames


def _code(value: str, scheme: str, meaning: str):
    from pydicom import Dataset

    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _instance(slide: Slide, level: int, mpp: float, tile: int, quality: int, uids: dict):
    """The dataset of one level: the modules of the VL WSI IOD that readers and the standard
    require (type 2 attributes empty where meddiff knows nothing)."""
    from pydicom import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit, generate_uid

    width, height = slide.level_dimensions[level]
    frames = _frames(slide, level, tile, quality)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = WSI_SOP_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids["series"]
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = uids["frame_of_reference"], ""
    for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate"):
        setattr(ds, key, "")
    ds.StudyTime = ds.ReferringPhysicianName = ds.StudyID = ds.AccessionNumber = ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "SM", 1, level + 1
    ds.Manufacturer, ds.ManufacturerModelName = "meddiff", "meddiff slide_dicom"
    # Type 1 in the Enhanced General Equipment and Specimen modules: fixed values, never a name
    # taken from the user's files (file names can carry patient identifiers).
    ds.DeviceSerialNumber, ds.SoftwareVersions = "none", "meddiff"
    now = datetime.datetime.now()
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.ImageType = (
        ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
        if level == 0
        else ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
    )
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
    ds.Rows = ds.Columns = tile
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.NumberOfFrames, ds.TotalPixelMatrixFocalPlanes = len(frames), 1
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = width, height
    ds.DimensionOrganizationType, ds.ImageOrientationSlide = "TILED_FULL", ORIENTATION
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem = origin.YOffsetInSlideCoordinateSystem = 0
    ds.TotalPixelMatrixOriginSequence = [origin]
    spacing = mpp * slide.level_downsamples[level] / 1000  # mm
    ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = width * spacing, height * spacing
    ds.ImagedVolumeDepth = 0.0
    measures = Dataset()
    measures.PixelSpacing, measures.SliceThickness = [spacing, spacing], 0.0
    frame_type = Dataset()
    frame_type.FrameType = list(ds.ImageType)
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    shared.WholeSlideMicroscopyImageFrameTypeSequence = [frame_type]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.VolumetricProperties, ds.SpecimenLabelInImage, ds.BurnedInAnnotation = "VOLUME", "NO", "NO"
    ds.FocusMethod, ds.ExtendedDepthOfField = "AUTO", "NO"
    ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_10918_1"
    ds.ContainerIdentifier, ds.IssuerOfTheContainerIdentifierSequence = "1", []
    ds.ContainerTypeCodeSequence = [_code("433466003", "SCT", "Microscope slide")]
    specimen = Dataset()
    specimen.SpecimenIdentifier, specimen.SpecimenUID = "1", generate_uid()
    specimen.IssuerOfTheSpecimenIdentifierSequence = []
    specimen.SpecimenPreparationSequence = []
    ds.SpecimenDescriptionSequence = [specimen]
    path = Dataset()
    path.OpticalPathIdentifier = "1"
    path.IlluminationTypeCodeSequence = [_code("111744", "DCM", "Brightfield illumination")]
    path.IlluminationColorCodeSequence = [_code("414298005", "SCT", "Full Spectrum")]
    ds.OpticalPathSequence, ds.NumberOfOpticalPaths = [path], 1
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    return ds
