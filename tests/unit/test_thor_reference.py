"""Detection compares its images with the statistics the model recorded of its training slices:
real MRI slices of the bundled MNI152 brain, held-out slices of it, and the same slices turned,
cut in other planes, or read with the wrong bit depth."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from meddiff.config.data import MriConfig
from meddiff.data import mri
from meddiff.data.brain import mni152
from meddiff.thor.reference import FORMAT, check_images, reference_statistics


@pytest.fixture(scope="module")
def brain():
    """(training slices, held-out slices, sagittal slices, coronal slices), 64×64 in [0, 1]."""
    vol, mask = mni152()
    axial = mri.volume_to_slices("mni152", MriConfig(image_size=64), volume=vol, mask=mask)
    held_out = np.arange(len(axial.images)) % 4 == 0
    norm = mri.normalize_intensity(vol, mask)

    def plane(axis: int) -> np.ndarray:
        # Slices across `axis`, superior at the top, cut and sized as the axial ones are.
        imgs = np.moveaxis(norm, axis, 0).transpose(0, 2, 1)[:, ::-1]
        masks = np.moveaxis(mask, axis, 0).transpose(0, 2, 1)[:, ::-1]
        area = masks.sum(axis=(1, 2))
        keep = area >= 0.25 * area.max()
        box = mri.square_box(masks[keep], 0.05)
        return mri.resize_slices(mri.crop_square(imgs[keep], box), 64)[::4]

    return axial.images[~held_out], axial.images[held_out], plane(0), plane(1)


def _check(reference, images):
    names = [f"s{i:03d}.png" for i in range(len(images))]
    return check_images(reference, np.ascontiguousarray(images), names)


def test_held_out_slices_pass_and_the_reference_is_small_json(brain):
    train, test, _, _ = brain
    ref = reference_statistics(train)
    assert ref["format"] == FORMAT and ref["images"] == len(train)
    assert len(json.dumps(ref)) < 4000  # lives in thor_model.json
    unlike, summary = _check(ref, test)
    assert summary["checked"] and summary["warning"] is None and not any(unlike)
    # A few of them (small folders are judged by their medians too).
    assert _check(ref, test[::4])[1]["warning"] is None


@pytest.mark.parametrize(
    "turn, said",
    [
        (lambda x: x[:, ::-1], "turned upside down"),
        (lambda x: np.rot90(x, 1, axes=(1, 2)), "rotated 90° clockwise"),
        (lambda x: np.rot90(x, 2, axes=(1, 2)), "rotated 180°"),
    ],
)
def test_another_orientation_is_named(brain, turn, said, caplog):
    train, test, _, _ = brain
    with caplog.at_level(logging.WARNING):
        _, summary = _check(reference_statistics(train), turn(test))
    assert said in summary["warning"] and "another orientation" in summary["warning"]
    assert said in caplog.text


def test_another_plane_is_named(brain):
    train, _, sagittal, coronal = brain
    ref = reference_statistics(train)
    for slices in (sagittal, coronal):
        _, summary = _check(ref, slices)
        assert "another plane" in summary["warning"], summary["layout"]


def test_12_bit_data_read_as_16_bit_are_named_image_by_image(brain):
    train, test, _, _ = brain
    unlike, summary = _check(reference_statistics(train), test * 4095 / 65535)
    assert all("p99" in u for u in unlike) and summary["unlike_training"] == len(test)
    assert "data.images scaling" in summary["warning"]
    assert summary["medians"]["p99"] < 0.1 < summary["training_medians"]["p99"]


def test_a_model_without_a_reference_says_it_was_not_checked(brain):
    _, test, _, _ = brain
    unlike, summary = _check(None, test)
    assert unlike == [""] * len(test)
    assert summary["checked"] is False and summary["warning"] is None and "not" in summary["note"]
