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


# --- voxel sizes from the header ----------------------------------------------------------------


def physical_phantom(spacing: tuple[float, float, float]) -> np.ndarray:
    """A RAS ellipsoid brain 120 mm wide (x), 148 mm long (y), 100 mm high (z): width/height
    0.81 in an axial slice, sampled on voxels of ``spacing`` mm."""
    shape = [int(round(160 / s)) for s in spacing]
    x, y, z = ((np.arange(n) + 0.5) * s - 80 for n, s in zip(shape, spacing, strict=True))
    inside = (x[:, None, None] / 60) ** 2 + (y[None, :, None] / 74) ** 2 + (
        z[None, None] / 50
    ) ** 2 <= 1
    return np.where(inside, 150.0 + z[None, None], 0.0).astype(np.float32)


def brain_aspect(sl) -> float:
    """Width / height of the brain in the middle kept slice."""
    rows, cols = np.nonzero(sl.brain[len(sl.brain) // 2])
    return (cols.max() - cols.min() + 1) / (rows.max() - rows.min() + 1)


def test_anisotropic_voxels_are_resampled_not_squashed(tmp_path):
    cfg = MriConfig(image_size=64, min_brain_fraction=0.5)
    save(physical_phantom((1, 1, 1)), np.diag([1.0, 1, 1, 1]), tmp_path / "iso.nii.gz")
    save(physical_phantom((3, 1, 1)), np.diag([3.0, 1, 1, 1]), tmp_path / "aniso.nii.gz")
    iso = volume_to_slices(tmp_path / "iso.nii.gz", cfg)
    aniso = volume_to_slices(tmp_path / "aniso.nii.gz", cfg)
    assert brain_aspect(iso) == pytest.approx(120 / 148, abs=0.04)
    assert brain_aspect(aniso) == pytest.approx(120 / 148, abs=0.04)  # not 0.28
    with pytest.raises(
        DataError, match=r"aniso\.nii\.gz: voxels are 3 x 1 mm.*data\.mri\.resample"
    ):
        volume_to_slices(tmp_path / "aniso.nii.gz", cfg.model_copy(update={"resample": False}))
    # Isotropic volumes pass either way.
    volume_to_slices(tmp_path / "iso.nii.gz", cfg.model_copy(update={"resample": False}))


def test_pir_and_lps_files_give_the_slices_of_the_ras_file_with_anisotropic_voxels(tmp_path):
    """Orientation and voxel sizes travel together: the 3 mm axis is the file's k axis here."""
    cfg = MriConfig(image_size=32, min_brain_fraction=0.5)
    ras = physical_phantom((3, 1, 1))
    ras[60:62, 100:110, 70:80] = 300  # an asymmetric marker (right, anterior, superior)
    save(ras, np.diag([3.0, 1, 1, 1]), tmp_path / "ras.nii")
    # PIR: voxel axes i -> posterior, j -> inferior, k -> right (3 mm).
    pir = ras.transpose(1, 2, 0)[::-1, ::-1, :].copy()
    pir_affine = np.array([[0, 0, 3.0, 0], [-1.0, 0, 0, 0], [0, -1.0, 0, 0], [0, 0, 0, 1]])
    save(pir, pir_affine, tmp_path / "pir.nii")
    save(ras[::-1, ::-1, :].copy(), np.diag([-3.0, -1, 1, 1]), tmp_path / "lps.nii")
    ref = volume_to_slices(tmp_path / "ras.nii", cfg)
    for name in ("pir.nii", "lps.nii"):
        other = volume_to_slices(tmp_path / name, cfg)
        np.testing.assert_array_equal(other.images, ref.images)


def test_implausible_voxel_sizes_are_named_and_the_setting_wins(tmp_path):
    from meddiff.data.mri import read_volume

    vol = physical_phantom((2, 2, 2))
    save(vol, np.diag([2000.0, 2000, 2000, 1]), tmp_path / "units.nii")  # metres written as mm
    with pytest.raises(
        DataError,
        match=r"units\.nii: its header gives voxel sizes \(2000, 2000, 2000\) mm.*data\.mri\.voxel_size",
    ):
        read_volume(tmp_path / "units.nii")
    data, spacing = read_volume(tmp_path / "units.nii", voxel_size=(2, 2, 2))
    assert spacing == pytest.approx((2, 2, 2)) and data.shape == vol.shape
    # A plausible header is overridden too: the explicit setting wins.
    save(vol, np.diag([2.0, 2, 2, 1]), tmp_path / "v.nii")
    assert read_volume(tmp_path / "v.nii", voxel_size=(2, 6, 2))[1] == pytest.approx((2, 6, 2))


# --- MRI as scanners write it: background noise, a single slice -------------------------------


def test_background_noise_is_not_sliced_or_normalised_as_head(tmp_path, caplog):
    """The MNI152 brain as a scanner's int16 magnitude image: Rician noise everywhere (the air
    around the head included). Sliced without a mask it gives the clean volume's slices at the
    clean volume's intensity, and says most of the volume is background."""
    from meddiff.data.brain import mni152

    vol, _ = mni152()
    clean = np.round(vol / vol.max() * 1000).astype(np.int16)
    rng = np.random.default_rng(0)
    sigma = 20.0  # 2 % of the brightest tissue, a typical 3 T background
    noisy = np.abs(clean + rng.normal(0, sigma, vol.shape) + 1j * rng.normal(0, sigma, vol.shape))
    save(clean, np.eye(4), tmp_path / "clean.nii.gz")
    save(np.round(noisy).astype(np.int16), np.eye(4), tmp_path / "noisy.nii.gz")
    cfg = MriConfig(image_size=32)
    expected = volume_to_slices(tmp_path / "clean.nii.gz", cfg)
    with caplog.at_level("WARNING"):
        got = volume_to_slices(tmp_path / "noisy.nii.gz", cfg)
    assert len(expected.z) == 121  # the clean brain's slices (the template's own mask gives 121)
    assert abs(len(got.z) - len(expected.z)) <= 1  # not 189: the noise-only slices are dropped
    assert got.images.mean() == pytest.approx(expected.images.mean(), rel=0.05)  # not halved
    assert "noisy.nii.gz" in caplog.text and "background" in caplog.text
    assert "clean.nii.gz" not in caplog.text


def test_a_single_slice_volume_is_refused_for_training(tmp_path):
    from meddiff.thor.data import check_slice_count

    one = ras_phantom()[:, :, 15:16]
    save(one, np.eye(4), tmp_path / "one.nii.gz")
    slices = volume_to_slices(tmp_path / "one.nii.gz", MriConfig(image_size=32))
    assert len(slices.images) == 1
    with pytest.raises(DataError, match=r"1 slice, fewer than thor\.train\.min_images=16.*4096"):
        check_slice_count(len(slices.images), 4096, 16)
    check_slice_count(16, 4096, 16)  # at the minimum: fine
