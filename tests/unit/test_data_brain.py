"""The lesion benchmark built from the bundled MNI152 brain."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from meddiff.config.data import MriConfig
from meddiff.data.brain import (
    COLIN27,
    MANIFEST,
    BrainSampleSizes,
    add_lesion,
    sample_brain,
    stratum,
)
from meddiff.data.images import list_pngs, load_folder
from meddiff.errors import DataError


@pytest.fixture(scope="module")
def brain_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("brain") / "sample"
    sample_brain(out, MriConfig(image_size=32), BrainSampleSizes(lesion=6, normal=3), seed=1)
    return out


def test_layout_manifest_and_split(brain_dir):
    manifest = json.loads((brain_dir / MANIFEST).read_text())
    train = list_pngs(brain_dir / "train")
    assert manifest["train"] == len(train) > 50
    test = load_folder(brain_dir / "test" / "images", brain_dir / "test" / "masks", size=32)
    assert len(test.names) == 9
    # Test slices are held out: none of their z positions is a training slice.
    assert not set(manifest["train_z"]) & set(manifest["test_z"])
    rows = list(csv.DictReader((brain_dir / "test" / "lesions.csv").read_text().splitlines()))
    by_name = {r["name"]: r for r in rows}
    for name, mask in zip(test.names, test.masks, strict=True):
        assert int(by_name[name]["area"]) == mask.sum()
        assert (by_name[name]["kind"] == "normal") == (mask.sum() == 0)
        assert int(by_name[name]["z"]) in manifest["test_z"]
    lesion_strata = [r["stratum"] for r in rows if r["kind"] == "lesion"]
    assert sorted(set(lesion_strata)) == ["large", "medium", "small"]
    with pytest.raises(DataError, match="already exists"):
        sample_brain(brain_dir, MriConfig(image_size=32), BrainSampleSizes(lesion=1, normal=1))


def test_lesions_lie_inside_the_brain_and_change_intensity():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64]
    brain = (yy - 32) ** 2 + (xx - 32) ** 2 < 26**2
    image = np.where(brain, 0.6, 0.0).astype(np.float32)
    for target in ("small", "medium", "large"):
        for _ in range(3):
            out, mask, info = add_lesion(image, brain, target, rng)
            assert mask.any() and not (mask & ~brain).any()
            change = out[mask].mean() - 0.6
            assert (change > 0.1) if info["contrast"] == "hyper" else (change < -0.1)
            assert np.array_equal(out[~brain], image[~brain])  # nothing outside the brain
    assert (
        stratum(10, 64) == "small" and stratum(100, 64) == "medium" and stratum(200, 64) == "large"
    )
    assert stratum(0, 64) == "none"


def test_test_slices_can_come_from_another_brain(tmp_path):
    import nibabel as nib

    # Another "brain": the template shrunk to 80 % (other size, other slices) in a NIfTI file.
    from scipy import ndimage

    from meddiff.data.brain import mni152

    volume, mask = mni152()
    other = ndimage.zoom(volume * mask, 0.8, order=1)
    path = tmp_path / "other.nii.gz"
    nib.save(nib.Nifti1Image(other.astype(np.float32), np.diag([1.25, 1.25, 1.25, 1])), path)
    out = tmp_path / "sample"
    cfg = MriConfig(image_size=32)
    sample_brain(out, cfg, BrainSampleSizes(lesion=3, normal=2), test_volume=path)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["test_source"] == str(path)
    assert len(list_pngs(out / "test" / "images")) == 5
    assert manifest["train"] == len(list_pngs(out / "train"))  # training stays the template's
    assert max(manifest["test_z"]) < other.shape[2]  # z positions of the other volume
    with pytest.raises(DataError, match="missing.nii"):
        sample_brain(tmp_path / "x", cfg, test_volume=tmp_path / "missing.nii")


@pytest.mark.skipif(not COLIN27.is_file(), reason="Colin27 needs Debian's mricron-data package")
def test_colin27_is_another_subject_at_the_same_levels(tmp_path):
    from meddiff.data.brain import mni152
    from meddiff.data.mri import volume_to_slices

    cfg = MriConfig(image_size=32)
    volume, mask = mni152()
    mni = volume_to_slices("mni", cfg, volume=volume, mask=mask.astype(np.uint8))
    colin = volume_to_slices(COLIN27, cfg)
    at = {int(z): i for i, z in enumerate(mni.z)}
    shared = [i for i, z in enumerate(colin.z) if int(z) in at and int(z) + 1 in at]
    assert len(shared) > 100
    for i in shared[::10]:
        j = at[int(colin.z[i])]  # both in MNI space: the same z is the same anatomical level
        # Colin's slice differs from the template's at that level by more than the template's
        # own neighbouring slices differ: another brain, not a copy of the training one.
        assert (
            np.abs(colin.images[i] - mni.images[j]).mean()
            > 1.5 * np.abs(mni.images[j + 1] - mni.images[j]).mean()
        )
        assert 0.5 < colin.brain[i].mean() / mni.brain[j].mean() < 1.5  # but a brain of like size
    sample_brain(tmp_path / "s", cfg, BrainSampleSizes(lesion=3, normal=1), test_volume=COLIN27)
    manifest = json.loads((tmp_path / "s" / MANIFEST).read_text())
    assert manifest["test_source"] == str(COLIN27)
    assert len(list_pngs(tmp_path / "s" / "test" / "images")) == 4
    # The same axial levels as the template's test set (the volumes share MNI space).
    sample_brain(tmp_path / "t", cfg, BrainSampleSizes(lesion=3, normal=1))
    template_z = json.loads((tmp_path / "t" / MANIFEST).read_text())["test_z"]
    assert set(manifest["test_z"]) <= set(template_z)
    assert len(manifest["test_z"]) >= len(template_z) - 2  # Colin's volume ends 2 mm lower
