"""THOR's map arithmetic against hand-computed values and scipy (what the official code uses)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage, stats

from meddiff.thor import maps


def t(a) -> torch.Tensor:
    """(H, W) or (B, H, W) nested lists → (B, 1, H, W) float tensor."""
    x = torch.tensor(a, dtype=torch.float32)
    return x[None, None] if x.ndim == 2 else x[:, None]


def test_residual_map_is_normalised_by_each_images_own_maximum():
    x0 = t([[[0.2, 0.8], [0.5, 0.5]], [[0.1, 0.1], [0.1, 0.3]]])
    x = t([[[0.0, 0.4], [0.5, 1.0]], [[0.1, 0.2], [0.1, 0.1]]])
    # |x0 - x| = [[.2, .4], [0, .5]] (max .5) and [[0, .1], [0, .2]] (max .2)
    expected = t([[[0.4, 0.8], [0.0, 1.0]], [[0.0, 0.5], [0.0, 1.0]]])
    torch.testing.assert_close(maps.anomaly_map(x0, x), expected, atol=1e-6, rtol=0)


def test_perceptual_factor_is_clipped_then_multiplied_before_normalising():
    x0 = t([[0.5, 0.9], [0.3, 0.0]])
    x = t([[0.1, 0.1], [0.1, 0.0]])  # residual [[.4, .8], [.2, 0]]
    lp = t([[0.5, 2.0], [1.0, 0.7]])  # clipped to [[.5, 1], [1, .7]]
    # product [[.2, .8], [.2, 0]] → / .8
    expected = t([[0.25, 1.0], [0.25, 0.0]])
    got = maps.anomaly_map(x0, x, lp, sigma=0.0)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_harmonize_blends_by_mask():
    x0 = t([[0.9, 0.9], [0.9, 0.2]])
    x = t([[0.1, 0.5], [0.3, 0.6]])
    m = t([[1.0, 0.0], [0.5, 0.25]])
    # m*x0 + (1-m)*x = [[.9, .5], [.6, .25*.2 + .75*.6]]
    expected = t([[0.9, 0.5], [0.6, 0.5]])
    torch.testing.assert_close(maps.harmonize(x0, x, m), expected, atol=1e-6, rtol=0)


def test_harmonize_keeps_the_input_exactly_where_the_mask_is_zero():
    g = torch.Generator().manual_seed(0)
    x0, x = torch.rand(2, 1, 8, 8, generator=g), torch.rand(2, 1, 8, 8, generator=g)
    m = torch.zeros(2, 1, 8, 8)
    m[:, :, 2:4, 2:4] = 1.0
    out = maps.harmonize(x0, x, m)
    keep = m == 0
    assert torch.equal(out[keep], x[keep])
    assert torch.equal(out[~keep], x0[~keep])


def test_harmonization_mask_by_hand():
    # Two detections one pixel apart on a 1x7 strip, with a 3-wide window:
    m = t([[0.0, 0.0, 1.0, 0.0, 0.6, 0.0, 0.0]])
    # closing (dilate then erode, edges replicated) fills the gap between them:
    #   dilate: [0, 1, 1, 1, .6, .6, 0]; erode: [0, 0, 1, .6, .6, 0, 0]
    # dilate again: [0, 1, 1, 1, .6, .6, 0]; (that + m) / 2:
    expected = t([[0.0, 0.5, 1.0, 0.5, 0.6, 0.3, 0.0]])
    got = maps.harmonization_mask(m, size=3)
    # The window is square: on a single row it acts along the row only.
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", [13, 3, 4])
def test_morphology_matches_scipy_nearest_mode(size):
    rng = np.random.default_rng(size)
    a = rng.random((2, 1, 21, 17)).astype(np.float32)
    m = torch.from_numpy(a)
    footprint = (1, 1, size, size)
    closed = ndimage.grey_closing(a, size=footprint, mode="nearest")
    refined = np.clip((ndimage.grey_dilation(closed, size=footprint, mode="nearest") + a) / 2, 0, 1)
    np.testing.assert_allclose(maps.grey_closing(m, size).numpy(), closed, atol=1e-7)
    np.testing.assert_allclose(maps.harmonization_mask(m, size).numpy(), refined, atol=1e-7)


def test_closing_removes_small_holes_and_dilation_grows_regions():
    m = torch.zeros(1, 1, 30, 30)
    m[..., 10:20, 10:20] = 1.0
    m[..., 14, 14] = 0.0  # a one-pixel hole inside a detection
    refined = maps.harmonization_mask(m, size=5)
    assert refined[0, 0, 14, 14] == pytest.approx(0.5)  # hole closed: (1 + 0) / 2
    assert refined[0, 0, 8, 15] == pytest.approx(0.5)  # grown 2 px beyond the region
    assert refined[0, 0, 7, 15] == 0.0
    assert refined[0, 0, 12, 12] == 1.0


def test_harmonic_mean_by_hand_and_zero_pixels():
    maps_k = torch.tensor([[0.5, 0.2, 0.0], [1.0, 0.2, 0.9], [0.25, 0.2, 0.9]]).reshape(
        3, 1, 1, 1, 3
    )
    got = maps.harmonic_mean(maps_k).reshape(-1)
    # 3 / (2 + 1 + 4) = 3/7; all equal → 0.2; any zero → 0
    torch.testing.assert_close(got, torch.tensor([3 / 7, 0.2, 0.0]), atol=1e-6, rtol=0)


def test_harmonic_mean_matches_scipy():
    rng = np.random.default_rng(1)
    a = rng.random((6, 2, 1, 5, 5)).astype(np.float32) + 0.01
    np.testing.assert_allclose(
        maps.harmonic_mean(torch.from_numpy(a)).numpy(), stats.hmean(a, axis=0), rtol=1e-5
    )


@pytest.mark.parametrize("sigma", [2.0, 0.8])
def test_blur_matches_scipy_gaussian_filter_per_image(sigma):
    rng = np.random.default_rng(2)
    a = rng.random((3, 1, 16, 12)).astype(np.float32)
    expected = np.stack([ndimage.gaussian_filter(img[0], sigma=sigma) for img in a])[:, None]
    np.testing.assert_allclose(
        maps.gaussian_blur(torch.from_numpy(a), sigma).numpy(), expected, atol=1e-6
    )
