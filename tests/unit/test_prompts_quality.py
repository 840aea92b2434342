"""Quality filter: real tissue passes, background / dark / blurred / off-colour patches do not."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from meddiff.config.prompts import QualityConfig
from meddiff.data.samples import ihc_tissue
from meddiff.errors import DataError
from meddiff.morphology.quality import (
    QualityFilter,
    count_contours,
    grey,
    hsv,
    laplacian_variance,
    reject_reasons,
)


@pytest.fixture(scope="module")
def tissue() -> np.ndarray:
    """16 real 96×96 patches from the IHC image, on a grid over its tissue."""
    img = ihc_tissue()
    return np.stack(
        [img[r : r + 96, c : c + 96] for r in range(0, 384, 96) for c in range(0, 384, 96)]
    )


def test_hsv_and_grey_are_pil_scales():
    px = np.array([[[[255, 0, 0], [0, 255, 0], [128, 128, 128], [0, 0, 255]]]], np.uint8)
    h, s, v = hsv(px)
    assert v.tolist() == [[[255, 255, 128, 255]]]
    assert s.tolist() == [[[255, 255, 0, 255]]]
    assert h.tolist() == [[[0, 85, 0, 170]]]  # red, green (120°), grey, blue (240°) on 0-255
    assert grey(px).tolist() == [[[76, 150, 128, 29]]]


def test_contours_and_laplacian_on_known_shapes():
    img = np.zeros((1, 40, 40), np.uint8)
    img[0, 5:15, 5:15] = 255  # a solid square: one contour
    img[0, 20:35, 20:35] = 255
    img[0, 25:30, 25:30] = 0  # a square ring: outer + hole
    assert count_contours(img, 150).tolist() == [3]
    flat = np.full((1, 16, 16), 100, np.uint8)
    assert laplacian_variance(flat).tolist() == [0.0]
    assert laplacian_variance(img)[0] > 1000


def test_real_tissue_is_kept(tissue):
    reasons = reject_reasons(tissue, QualityConfig())
    assert (reasons == "").mean() >= 0.8, reasons


def test_outliers_are_removed_with_reasons(tissue):
    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal(236, 2, (3, 96, 96, 3)), 0, 255).astype(np.uint8)
    dark = np.clip(rng.normal(30, 8, (3, 96, 96, 3)), 0, 255).astype(np.uint8)
    blurred = np.stack([ndimage.gaussian_filter(t, (5, 5, 0)) for t in tissue[:3]])
    green = tissue[:3].copy()
    green[..., 0] //= 3
    green[..., 2] //= 3
    cfg = QualityConfig()
    assert set(reject_reasons(glass, cfg)) <= {"flat", "grey", "blurry", "few_contours"}
    assert list(reject_reasons(dark, cfg)) == ["dark"] * 3
    assert list(reject_reasons(blurred, cfg)) == ["blurry"] * 3
    assert list(reject_reasons(green, cfg)) == ["ink"] * 3  # a green cast: no stain absorbs red
    # Green ink: with the earlier tests switched off, the hue test alone must catch it.
    only_hue = QualityConfig(
        max_ink_fraction=None,
        max_fold_fraction=None,
        min_bubble_rim_pixels=None,
        min_mean_value=None,
        min_mean_saturation=None,
        min_std_value=None,
        min_std_saturation=None,
        min_std_hue=None,
        min_laplacian_var=None,
        min_contours=None,
    )
    assert list(reject_reasons(green, only_hue)) == ["off_colour"] * 3
    assert list(reject_reasons(tissue[:3], only_hue)) == [""] * 3
    assert list(reject_reasons(glass, QualityConfig(enabled=False))) == [""] * 3


def test_stage_adds_reasons_and_checks_patch_size(tissue):
    stage = QualityFilter(QualityConfig().model_dump(), patch_size=96)
    glass = np.full((2, 96, 96, 3), 240, np.uint8)
    batch = {"image": np.concatenate([tissue[:2], glass]), "label": np.zeros(4, np.int64)}
    out = stage(batch)
    assert list(out["reject"][2:]) != ["", ""] and len(out["reject"]) == 4
    small = {
        "image": tissue[:2, :64, :64],
        "source": np.array(["a.h5", "a.h5"]),
        "index": np.arange(2),
    }
    with pytest.raises(DataError, match=r"a\.h5.*64, 64, 3.*96x96"):
        stage(small)
    assert "reject" in QualityFilter(QualityConfig(), patch_size=None)(small)
