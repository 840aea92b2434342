"""NIfTI volumes to axial slices: orientation, normalisation, selection, resizing, errors."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from meddiff.config.data import MriConfig
from meddiff.data.mri import (
    axial_slices,
    crop_square,
    load_volume,
    normalize_intensity,
    square_box,
    volume_to_slices,
)
from meddiff.errors import DataError


def ras_phantom() -> np.ndarray:
    """A 40x48x30 RAS volume: an ellipsoid 'brain' with a bright marker on the anterior right."""
    x, y, z = np.mgrid[0:40, 0:48, 0:30].astype(float)
    inside = ((x - 20) / 15) ** 2 + ((y - 24) / 18) ** 2 + ((z - 15) / 12) ** 2 <= 1
    vol = np.where(inside, 100.0 + z, 0.0)  # intensity rises towards superior
    vol[28:32, 34:38, 13:17] = 500.0  # patient right (+x), anterior (+y)
    return vol.astype(np.float32)


def save(vol: np.ndarray, affine: np.ndarray, path) -> None:
    nib.save(nib.Nifti1Image(vol, affine), str(path))


def test_lps_file_is_reoriented_to_ras(tmp_path):
    ras = ras_phantom()
    # The same anatomy stored left-posterior-superior: x and y axes flipped in voxel order.
    lps_affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    save(ras[::-1, ::-1, :].copy(), lps_affine, tmp_path / "lps.nii.gz")
    save(ras, np.eye(4), tmp_path / "ras.nii")
    np.testing.assert_array_equal(
        load_volume(tmp_path / "lps.nii.gz"), load_volume(tmp_path / "ras.nii")
    )


def test_axial_slices_show_anterior_up_and_right_on_the_right():
    slices = axial_slices(ras_phantom())
    assert slices.shape == (30, 48, 40)  # (z, rows, cols)
    rows, cols = np.nonzero(slices[15] == 500)
    assert rows.max() < 24 and cols.min() > 20  # top half (anterior), right half (patient right)


def test_normalisation_uses_brain_percentiles():
    vol = ras_phantom()
    brain = vol > 0
    out = normalize_intensity(vol, brain, (1.0, 99.0))
    lo, hi = np.percentile(vol[brain], (1.0, 99.0))
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    inside = brain & (vol > lo) & (vol < hi)
    np.testing.assert_allclose(out[inside], (vol[inside] - lo) / (hi - lo), rtol=1e-5)
    assert (out[~brain] == 0).all()


def test_volume_to_slices_selects_resizes_and_keeps_one_box(tmp_path):
    save(ras_phantom(), np.eye(4), tmp_path / "v.nii.gz")
    cfg = MriConfig(image_size=32, min_brain_fraction=0.5)
    sl = volume_to_slices(tmp_path / "v.nii.gz", cfg)
    area = (axial_slices(ras_phantom()) > 0).sum(axis=(1, 2))
    expected = np.flatnonzero(area >= 0.5 * area.max())
    np.testing.assert_array_equal(sl.z, expected)
    assert sl.images.shape == (len(expected), 32, 32) and sl.images.dtype == np.float32
    assert sl.images.min() >= 0 and sl.images.max() <= 1
    assert sl.brain.dtype == bool and sl.brain[len(expected) // 2].mean() > 0.3
    # The brain is centred in the square box with the configured margin around it.
    assert not sl.brain[:, 0, :].any() and not sl.brain[:, :, -1].any()


def test_crop_square_pads_outside_the_slice():
    slices = np.ones((1, 4, 6))
    out = crop_square(slices, (-1, 1, 6))
    assert out.shape == (1, 6, 6)
    assert out[0, 0].sum() == 0 and out[0, 1, :5].sum() == 5 and out[0, 1, 5] == 0
    assert square_box(slices > 0, 0.0) == (-1, 0, 6)


def test_bad_volumes_are_named(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_volume(tmp_path / "missing.nii.gz")
    (tmp_path / "junk.nii.gz").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"junk\.nii\.gz: not a readable NIfTI"):
        load_volume(tmp_path / "junk.nii.gz")
    save(np.zeros((4, 4, 3, 2), dtype=np.float32), np.eye(4), tmp_path / "4d.nii")
    with pytest.raises(DataError, match=r"4d\.nii: volume has shape \(4, 4, 3, 2\)"):
        load_volume(tmp_path / "4d.nii")
    save(np.zeros((8, 8, 8), dtype=np.float32), np.eye(4), tmp_path / "empty.nii")
    with pytest.raises(DataError, match="brain mask is empty"):
        volume_to_slices(tmp_path / "empty.nii", MriConfig(image_size=8))
