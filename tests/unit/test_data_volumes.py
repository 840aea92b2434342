"""Volumes sliced by data.mri's rules and put back: what is cut from a voxel comes back to that
voxel, whatever the file's axes, obliquity, flips and voxel sizes."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from meddiff.config.data import MriConfig
from meddiff.data.mri import volume_to_slices
from meddiff.data.volumes import (
    Volume,
    nifti_bytes,
    read_nifti,
    slice_mask,
    slice_volume,
    unslice,
)
from meddiff.errors import DataError
from volume_helpers import brain, draw_lesion

CFG = MriConfig(image_size=48)

STORAGES = {
    "ras-3mm": dict(voxel_mm=(3.0, 3.0, 3.0)),
    "lps-anisotropic": dict(voxel_mm=(2.0, 3.5, 5.0), flip=(True, True, False)),
    "oblique-flipped-permuted": dict(
        voxel_mm=(2.5, 4.0, 3.0), flip=(False, True, True), permute=(1, 2, 0), degrees=20.0
    ),
}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


@pytest.mark.parametrize("storage", list(STORAGES))
def test_a_lesion_cut_into_slices_comes_back_to_its_voxels(storage):
    vol, lesion = draw_lesion(brain(**STORAGES[storage]))
    slices, geometry = slice_volume(vol, CFG)
    assert slices.images.shape == (len(geometry.z), 48, 48)
    cut = slice_mask(lesion, geometry)
    assert cut.any()
    # The (hypo-intense) lesion is dark in the slices exactly where slice_mask puts it: the
    # mask's forward path agrees with data.mri's slicing of the image itself.
    assert slices.images[cut].mean() < slices.images[slices.brain & ~cut].mean() - 0.3
    back = unslice(cut.astype(np.float32), geometry) >= 0.5
    assert back.shape == vol.data.shape
    # Through a 48-pixel model size and back: most of the lesion returns, and nothing far away.
    assert dice(back, lesion) > 0.7
    world = lambda m: (vol.affine[:3, :3] @ np.argwhere(m).mean(axis=0)) + vol.affine[:3, 3]  # noqa: E731
    assert np.linalg.norm(world(back) - world(lesion)) < 2.0  # mm


def test_the_same_anatomy_in_any_storage_gives_the_same_slices():
    ras = slice_volume(brain(**STORAGES["ras-3mm"]), CFG)[0].images
    flipped = slice_volume(brain((3.0, 3.0, 3.0), flip=(True, True, True)), CFG)[0].images
    permuted = slice_volume(brain((3.0, 3.0, 3.0), permute=(2, 0, 1)), CFG)[0].images
    np.testing.assert_allclose(flipped, ras, atol=1e-5)
    np.testing.assert_allclose(permuted, ras, atol=1e-5)


def test_unslice_inverts_the_slicing_of_the_image_itself():
    vol = brain(**STORAGES["lps-anisotropic"])
    slices, geometry = slice_volume(vol, CFG)
    back = unslice(slices.images, geometry)
    kept = unslice(np.ones_like(slices.images), geometry) > 0.99
    inside = kept & (vol.data > 0)
    # The normalised image put back correlates with the raw volume voxel by voxel.
    r = np.corrcoef(back[inside], vol.data[inside])[0, 1]
    assert r > 0.9
    assert np.all(back[~kept & (vol.data == 0)] == 0)


def test_nifti_file_round_trip_keeps_the_affine_and_grid(tmp_path):
    vol = brain(**STORAGES["oblique-flipped-permuted"])
    path = tmp_path / "scan.nii.gz"
    path.write_bytes(nifti_bytes(vol.data, vol.affine))
    read, canonical, spacing = read_nifti(path, CFG)
    np.testing.assert_allclose(read.affine, vol.affine, atol=1e-5)
    np.testing.assert_array_equal(read.data, vol.data)
    a = slice_volume(read, CFG, data=canonical, spacing=spacing)[0].images
    b = slice_volume(vol, CFG)[0].images
    np.testing.assert_allclose(a, b, atol=1e-5)
    # data.mri reads the file the same way (the slices of the CLI's training path).
    c = volume_to_slices(path, CFG).images
    np.testing.assert_allclose(c, b, atol=1e-5)
    assert gzip.decompress(path.read_bytes())[:4] == (348).to_bytes(4, "little")
    img = nib.load(str(path))
    assert img.header.get_xyzt_units()[0] == "mm"


def test_masks_and_maps_of_the_wrong_shape_are_named():
    vol = brain()
    _, geometry = slice_volume(vol, CFG)
    with pytest.raises(DataError, match=r"lesion.nii.gz: mask has shape \(3, 3, 3\)"):
        slice_mask(np.zeros((3, 3, 3)), geometry, "lesion.nii.gz")
    with pytest.raises(DataError, match="maps have shape"):
        unslice(np.zeros((2, 48, 48), np.float32), geometry)
    with pytest.raises(DataError, match="expected 3D"):
        slice_volume(Volume(np.zeros((4, 4), np.float32), np.eye(4), "flat"), CFG)


def test_sample_volume_writes_the_same_volume_as_nifti_and_dicom(tmp_path):
    from meddiff.data.dicom import read_series
    from meddiff.data.volume_samples import sample_volume

    manifest = sample_volume(tmp_path / "sample", voxel_mm=(5.0, 5.0, 8.0), degrees=10.0)
    volume, _, _ = read_nifti(tmp_path / "sample" / "volume.nii.gz", CFG)
    lesion = np.asarray(nib.load(str(tmp_path / "sample" / "lesion_mask.nii.gz")).dataobj) > 0
    assert lesion.sum() == manifest["lesion_voxels"] > 0
    assert volume.data[lesion].mean() < 0.5 * volume.data[(volume.data > 0) & ~lesion].mean()
    series = read_series(tmp_path / "sample" / "dicom")
    # The same world grid (the series may run the other way along its normal).
    corners = np.array([[0, 0, 0, 1], [*np.array(volume.data.shape) - 1, 1]], float)
    world = corners @ volume.affine.T
    back = world @ np.linalg.inv(series.volume.affine).T
    assert {tuple(np.round(b[:3]).astype(int)) for b in back} <= {
        (i, j, k) for i in (0, volume.data.shape[0] - 1) for j in (0, volume.data.shape[1] - 1)
        for k in (0, volume.data.shape[2] - 1)
    }  # fmt: skip
    with pytest.raises(DataError, match="already exists"):
        sample_volume(tmp_path / "sample")
