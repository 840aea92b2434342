"""DICOM series in (checked, stacked as a volume on the right grid), DICOM SEG and Parametric
Map out (highdicom, referencing the source series), and bad clinical input as one line each."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEGLossless

from meddiff.data import dicom, dicom_results
from meddiff.data.volume_samples import mr_series, write_series
from meddiff.data.volumes import Volume
from meddiff.errors import DataError
from volume_helpers import PLANTED_ID, PLANTED_NAME, brain

ALGORITHM = dicom_results.Algorithm("brain-tiny", "brain-tiny (meddiff test)", 0.3)


def small(degrees: float = 0.0) -> Volume:
    """An oblique, flipped, anisotropic brain: 4 x 4.5 mm in plane, 6 mm slices."""
    return brain((4.0, 4.5, 6.0), flip=(True, False, False), degrees=degrees)


def items(datasets) -> list[tuple[str, pydicom.Dataset]]:
    return [(f"IMG_{k + 1:04d}.dcm", ds) for k, ds in enumerate(datasets)]


@pytest.mark.parametrize("enhanced", [False, True], ids=["single-frame", "enhanced-multiframe"])
def test_a_series_reads_back_as_the_volume_on_its_world_grid(tmp_path, enhanced):
    vol = small(degrees=25.0)
    write_series(mr_series(vol, enhanced=enhanced), tmp_path)
    series = dicom.read_series(tmp_path)
    assert series.volume.data.shape == vol.data.shape
    # The same voxel is the same world point: the stack may come back in reverse slice order
    # (sorted along the orientation's normal), with the affine saying so.
    ijk = np.array([[3, 5, 2], [10, 20, 7], [1, 1, 1]], dtype=float)
    world = (vol.affine[:3, :3] @ ijk.T).T + vol.affine[:3, 3]
    back = (np.linalg.inv(series.volume.affine) @ np.c_[world, np.ones(3)].T).T[:, :3]
    idx = np.round(back).astype(int)
    np.testing.assert_allclose(back, idx, atol=1e-4)
    scale = 4095.0 / vol.data.max()
    for (i, j, k), (a, b, c) in zip(ijk.astype(int), idx, strict=True):
        assert abs(series.volume.data[a, b, c] - round(vol.data[i, j, k] * scale)) <= 1
    assert len(series.sources) == (1 if enhanced else vol.data.shape[2])


@pytest.mark.parametrize("enhanced", [False, True], ids=["single-frame", "enhanced-multiframe"])
def test_seg_and_parametric_map_reference_the_source_series(tmp_path, enhanced):
    write_series(mr_series(small(), patient_name=PLANTED_NAME, patient_id=PLANTED_ID,
                           enhanced=enhanced), tmp_path)  # fmt: skip
    series = dicom.read_series(tmp_path)
    lesion = np.zeros(series.volume.data.shape, bool)
    lesion[10:16, 12:18, 8:11] = True
    values = np.where(lesion, 0.8, 0.1).astype(np.float32)
    seg = dicom_results.segmentation(series.sources, series.to_frames(lesion), ALGORITHM)
    pm = dicom_results.parametric_map(series.sources, series.to_frames(values), ALGORITHM)
    for obj in (seg, pm):
        assert obj.FrameOfReferenceUID == series.frame_of_reference_uid
        assert obj.StudyInstanceUID == series.study_uid
        assert obj.SeriesInstanceUID != series.series_uid
        assert obj.SOPInstanceUID not in {str(s.SOPInstanceUID) for s in series.sources}
        ref = obj.ReferencedSeriesSequence[0]
        assert ref.SeriesInstanceUID == series.series_uid
        # The standard needs the patient module copied: it is, and only there.
        assert str(obj.PatientName) == PLANTED_NAME and obj.PatientID == PLANTED_ID
    assert seg.SegmentSequence[0].SegmentAlgorithmName == "meddiff THOR"
    assert int(seg.NumberOfFrames) == 3  # empty frames omitted: the lesion spans 3 slices
    if not enhanced:
        order = [str(s.SOPInstanceUID) for s in series.sources]
        back = dicom_results.seg_mask(seg, order)
        np.testing.assert_array_equal(back, series.to_frames(lesion))
    # A viewer places every frame where its source frame lies (highdicom sorts the map's frames
    # by position): each frame holds the values of the source frame at its position.
    src = (
        [s.ImagePositionPatient for s in series.sources]
        if not enhanced
        else [f.PlanePositionSequence[0].ImagePositionPatient
              for f in series.sources[0].PerFrameFunctionalGroupsSequence]
    )  # fmt: skip
    src = np.asarray(src, float)
    expected = series.to_frames(values)
    assert int(pm.NumberOfFrames) == len(src)
    for frame, item in zip(pm.pixel_array, pm.PerFrameFunctionalGroupsSequence, strict=True):
        pos = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float)
        match = np.flatnonzero(np.abs(src - pos).max(axis=1) < 1e-3)
        assert len(match) == 1
        np.testing.assert_allclose(frame, expected[match[0]], atol=1e-6)


def test_a_localizer_is_excluded_with_a_note(tmp_path):
    datasets = mr_series(small())
    scout = mr_series(small(degrees=90.0))[0]  # another orientation, same series
    scout.SeriesInstanceUID = datasets[0].SeriesInstanceUID
    scout.FrameOfReferenceUID = datasets[0].FrameOfReferenceUID
    tagged = mr_series(small())[3]
    tagged.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    tagged.SeriesInstanceUID = datasets[0].SeriesInstanceUID
    series = dicom.series_from_datasets(items([*datasets, scout, tagged]), "folder")
    assert series.volume.data.shape == small().data.shape
    n = len(datasets)
    assert series.notes == [
        f"IMG_{n + 2:04d}.dcm: a localizer (Image Type LOCALIZER); excluded",
        f"IMG_{n + 1:04d}.dcm: orientation differs from the other {n} slices' (a localizer?); "
        "excluded",
    ]


def test_bad_series_are_one_line_naming_the_file(tmp_path):
    def check(datasets, pattern):
        with pytest.raises(DataError, match=pattern) as info:
            dicom.series_from_datasets(items(datasets), "folder")
        assert "\n" not in str(info.value)

    base = mr_series(small())
    other = mr_series(small())
    check([*base[:5], *other[5:8]], r"folder: holds instances of more than one series "
          r"\(IMG_0001.dcm and IMG_0006.dcm differ")  # fmt: skip
    check([*base[:5], *base[6:]], r"IMG_0005.dcm, IMG_0006.dcm: missing slice between them: a gap "
          r"of 12.00 mm where the series' slices are 6.00 mm apart \(1 slice missing\)")  # fmt: skip
    shifted = mr_series(small())
    for ds in shifted[6:]:
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], ds.ImagePositionPatient[2] + 2.5]
    check(
        shifted,
        r"IMG_0006.dcm, IMG_0007.dcm: inconsistent spacing: neighbouring slices "
        r"8.50 mm apart",
    )
    spacing = mr_series(small())
    spacing[4].PixelSpacing = [4.5, 5.0]
    check(spacing, r"IMG_0005.dcm: inconsistent spacing: Pixel Spacing 4.5 x 5 mm but "
          r"IMG_0001.dcm has 4.5 x 4 mm")  # fmt: skip
    dup = mr_series(small())
    dup[3].ImagePositionPatient = dup[2].ImagePositionPatient
    check(dup, r"IMG_0003.dcm, IMG_0004.dcm: two slices at the same position")
    nogeo = mr_series(small())
    del nogeo[2].ImagePositionPatient
    check(nogeo, r"IMG_0003.dcm: no usable Image Position/Orientation")


def test_an_undecodable_transfer_syntax_names_it_and_its_decoders(tmp_path):
    from pydicom.encaps import encapsulate

    datasets = mr_series(small())
    ds = datasets[2]
    # JPEG Lossless (process 14): pydicom decodes it only with pylibjpeg-libjpeg or GDCM, which
    # meddiff does not install; the bytes are never decoded, so any frame content will do.
    ds.file_meta.TransferSyntaxUID = JPEGLossless
    ds.PixelData = encapsulate([b"\xff\xd8" + bytes(64) + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    with pytest.raises(DataError) as info:
        dicom.series_from_datasets(items(datasets), "folder")
    msg = str(info.value)
    assert msg.startswith("IMG_0003.dcm: pixel data are compressed as JPEG Lossless")
    assert "1.2.840.10008.1.2.4.57" in msg or JPEGLossless in msg
    assert "pylibjpeg-libjpeg" in msg and "\n" not in msg


def test_a_folder_with_a_non_dicom_file_names_it(tmp_path):
    write_series(mr_series(small())[:4], tmp_path)
    (tmp_path / "notes.txt").write_text("not an image")
    assert dicom.is_dicom_folder(tmp_path)
    with pytest.raises(DataError, match=r"notes.txt: not a readable DICOM file"):
        dicom.read_series(tmp_path)
    assert not dicom.is_dicom_folder(tmp_path / "missing")
