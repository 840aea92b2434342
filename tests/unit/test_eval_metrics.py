"""Metrics on cases with known answers, and against well-kept libraries on the same features."""

from __future__ import annotations

import numpy as np
import pytest

from meddiff.config.evaluation import MetricsConfig
from meddiff.errors import DataError
from meddiff.evaluation import metrics as M
from meddiff.evaluation.features import FeatureSet, metric_prefix
from meddiff.evaluation.fidelity import compute_metrics, evaluate_sets


def gaussian(n: int, d: int, shift: float = 0.0, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)) + shift


# --- Fréchet distance -------------------------------------------------------------------------


def test_fd_identical_sets_is_zero():
    x = gaussian(500, 32)
    assert M.fd(x, x) == pytest.approx(0.0, abs=1e-8)


def test_fd_closed_form_for_commuting_covariances():
    # Σ1 = Q diag(a) Qᵀ, Σ2 = Q diag(b) Qᵀ commute: FD = ‖μ1−μ2‖² + Σ (√a − √b)².
    rng = np.random.default_rng(1)
    d = 40
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = rng.uniform(0.1, 4, d), rng.uniform(0.1, 4, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = M.frechet_distance(mu1, q * a @ q.T, mu2, q * b @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)


def test_fd_shifted_gaussians_measures_the_shift():
    d, shift = 16, 0.5
    x, y = gaussian(20_000, d, 0.0, 1), gaussian(20_000, d, shift, 2)
    # Same covariance: FD ≈ ‖δ‖² = d·shift²; sampling noise is small at 20k samples.
    assert M.fd(x, y) == pytest.approx(d * shift**2, rel=0.05)


def test_fd_matches_pytorch_fid():
    from pytorch_fid.fid_score import calculate_frechet_distance

    x = gaussian(800, 64, 0.0, 3)
    y = gaussian(700, 64, 0.2, 4) * np.linspace(0.5, 1.5, 64)
    ours = M.fd(x, y)
    ref = calculate_frechet_distance(
        x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
    )
    assert ours == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("n, m, d", [(30, 20, 64), (64, 64, 64), (200, 150, 256)])
def test_fd_from_rows_equals_the_covariance_route(n, m, d):
    # The route fd() takes when no set has more rows than dimensions (Inception features of up
    # to 2048 patches), with and without bootstrap weights.
    rng = np.random.default_rng(n)
    x, y = np.abs(rng.normal(size=(n, d))), np.abs(rng.normal(size=(m, d))) * 1.2 + 0.1
    expected = M.frechet_distance(*M.feature_stats(x), *M.feature_stats(y))
    assert M.fd_from_rows(x, y) == pytest.approx(expected, rel=1e-7)
    assert M.fd(x, y) == pytest.approx(expected, rel=1e-7)
    wx, wy = rng.multinomial(n, np.full(n, 1 / n)), rng.multinomial(m, np.full(m, 1 / m))
    weighted = M.frechet_distance(*M.feature_stats(x, wx), *M.feature_stats(y, wy))
    assert M.fd_from_rows(x, y, wx, wy) == pytest.approx(weighted, rel=1e-7)
    assert M.fd_from_rows(x, x) == pytest.approx(0.0, abs=1e-9)


def test_fd_rank_deficient_matches_pytorch_fid():
    # Fewer samples than dimensions (as in small strata): singular covariances.
    from pytorch_fid.fid_score import calculate_frechet_distance

    x, y = gaussian(30, 64, 0.0, 5), gaussian(40, 64, 0.3, 6)
    ref = calculate_frechet_distance(
        x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
    )
    assert M.fd(x, y) == pytest.approx(ref, rel=1e-4)


def test_feature_stats_weighted_equals_repeated_rows():
    x = gaussian(300, 8, 0.0, 7)
    w = np.random.default_rng(0).multinomial(300, np.full(300, 1 / 300))
    mu, sigma = M.feature_stats(x, w, chunk=64)
    rep = np.repeat(x, w, axis=0)
    np.testing.assert_allclose(mu, rep.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(rep, rowvar=False), rtol=1e-9, atol=1e-12)


# --- KID --------------------------------------------------------------------------------------


def test_kid_matches_torch_fidelity():
    import torch
    from torch_fidelity.metric_kid import kid_features_to_metric

    x, y = gaussian(400, 32, 0.0, 8), gaussian(300, 32, 0.2, 9)
    ours = M.kid_subsets(x, y, subsets=10, subset_size=150, seed=123)
    ref = kid_features_to_metric(
        torch.from_numpy(x),
        torch.from_numpy(y),
        kid_subsets=10,
        kid_subset_size=150,
        rng_seed=123,
        verbose=False,
    )
    assert ours.mean() == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-9)
    assert ours.std() == pytest.approx(ref["kernel_inception_distance_std"], rel=1e-6)


def test_kid_same_distribution_near_zero_and_shift_positive():
    x, y = gaussian(600, 16, 0.0, 10), gaussian(600, 16, 0.0, 11)
    same = M.kid_subsets(x, y, subsets=20, subset_size=300).mean()
    shifted = M.kid_subsets(x, y + 1.0, subsets=20, subset_size=300).mean()
    assert abs(same) < 0.05 * shifted
    assert shifted > 0.1


# --- k-NN metrics -----------------------------------------------------------------------------


def test_knn_radii_match_sklearn():
    from sklearn.neighbors import NearestNeighbors

    x = gaussian(257, 12, 0.0, 12)
    dist, _ = NearestNeighbors(n_neighbors=4).fit(x).kneighbors(x)
    np.testing.assert_allclose(M.knn_radii(x, 3), dist[:, 3], rtol=1e-9)


def test_prdc_matches_prdc_package():
    from prdc import compute_prdc

    x, y = gaussian(400, 20, 0.0, 13), gaussian(350, 20, 0.4, 14)
    ours = M.prdc(x, y, k=5)
    ref = compute_prdc(x, y, nearest_k=5)
    for name in ("precision", "recall", "density", "coverage"):
        assert ours[name] == pytest.approx(float(ref[name]), abs=1e-12), name


def test_prdc_identical_and_disjoint_sets():
    x = gaussian(300, 10, 0.0, 15)
    same = M.prdc(x, x, k=5)
    assert same["precision"] == 1.0 and same["recall"] == 1.0 and same["coverage"] == 1.0
    far = M.prdc(x, x + 100.0, k=5)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_prdc_chunked_equals_unchunked(monkeypatch):
    x, y = gaussian(120, 6, 0.0, 16), gaussian(90, 6, 0.3, 17)
    whole = M.prdc(x, y, k=3)
    monkeypatch.setattr(M, "_CHUNK_ELEMS", 500)  # forces many row chunks
    assert M.prdc(x, y, k=3) == whole


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "real,fake,match",
    [
        (np.zeros((0, 4)), np.ones((5, 4)), "empty"),
        (np.ones((5, 4)), np.ones((5, 3)), "dimensions differ"),
        (np.ones((5, 4)) * np.nan, np.ones((5, 4)), "NaN"),
    ],
)
def test_bad_feature_sets_are_clear_errors(real, fake, match):
    with pytest.raises(DataError, match=match):
        M.fd(real, fake)


def test_too_few_samples_for_knn_is_a_clear_error():
    cfg = MetricsConfig(nearest_k=5, bootstrap=0, kid_subsets=2, kid_subset_size=4)
    with pytest.raises(DataError, match="synthetic set has 5 images.*k=5"):
        compute_metrics(gaussian(50, 4), gaussian(5, 4), cfg, "dino")


# --- reports: names, CIs, strata --------------------------------------------------------------


def test_metric_names_never_pose_as_fid():
    assert metric_prefix("inception") == ("fid", "kid")
    assert metric_prefix("dino") == ("fd_dino", "kd_dino")
    assert metric_prefix("inception_random") == ("fd_inception_random", "kd_inception_random")


def test_compute_metrics_cis_bracket_the_values():
    cfg = MetricsConfig(nearest_k=3, bootstrap=30, kid_subsets=10, kid_subset_size=100)
    out = compute_metrics(gaussian(200, 8, 0, 18), gaussian(150, 8, 0.5, 19), cfg, "dino")
    assert {"fd_dino", "kd_dino", "precision", "recall", "density", "coverage"} <= set(out)
    for name in ("kd_dino", "precision", "recall", "density", "coverage"):
        lo, hi = out[name]["ci"]
        assert lo <= out[name]["value"] <= hi, name
    lo, hi = out["fd_dino"]["ci"]
    assert lo <= out["fd_dino"]["value"] <= hi and lo < hi
    assert out["fd_dino"]["bootstrap_bias"] > 0  # resampling adds to the FD's upward bias


# --- the Fréchet distance's bias-aware interval ----------------------------------------------


def _fd_ci(x, y, resamples=60, seed=0):
    value = M.fd(x, y)
    boot = M.bootstrap_fd(x, y, resamples, seed)
    return value, boot, M.fd_interval(value, boot, 0.95)["ci"]


def test_fd_interval_of_a_set_against_itself_contains_zero():
    x = gaussian(150, 12, seed=30)
    value, boot, (lo, hi) = _fd_ci(x, x)
    assert value == pytest.approx(0.0, abs=1e-8)
    # The plain percentile interval excludes the value it is about (the bug this replaces) ...
    assert M.percentile_ci(boot, 0.95)[0] > 0.05
    # ... the bias-corrected one contains it.
    assert lo == 0.0 and hi > 0


@pytest.mark.parametrize(
    "make_y",
    [
        lambda x: x + np.random.default_rng(31).normal(scale=0.05, size=x.shape),  # jittered copy
        lambda x: gaussian(len(x), x.shape[1], seed=32),  # another sample of the same Gaussian
    ],
    ids=["jittered-copy", "same-distribution"],
)
def test_fd_interval_contains_the_estimate_on_near_identical_sets(make_y):
    x = gaussian(150, 12, seed=30)
    y = make_y(x)
    value, boot, (lo, hi) = _fd_ci(x, y)
    assert lo <= value <= hi
    # The plain percentile interval sits above the estimate here too.
    assert M.percentile_ci(boot, 0.95)[0] > value


def test_fd_interval_still_separates_different_sets():
    x = gaussian(150, 12, seed=30)
    _, _, same = _fd_ci(x, gaussian(150, 12, seed=32))
    value, _, (lo, hi) = _fd_ci(x, gaussian(150, 12, shift=0.5, seed=33))  # FD ≈ 12 · 0.25 = 3
    assert lo <= value <= hi
    assert lo > same[1]  # disjoint from the same-distribution interval, above it


def _fs(x, labels, prompts=None, network="dino"):
    return FeatureSet(x, np.asarray(labels), np.arange(len(x)), network, "mem", prompts)


def test_strata_per_label_and_prompt_with_small_strata_skipped():
    cfg = MetricsConfig(nearest_k=3, bootstrap=0, kid_subsets=5, kid_subset_size=20, min_stratum=10)
    real = gaussian(120, 6, 0, 20)
    labels = np.r_[np.zeros(60), np.ones(60)].astype(int)
    fake = real.copy()
    fake[60:] += 3.0  # label 1 is off, label 0 is perfect
    prompts = ["p0"] * 60 + ["p1"] * 55 + ["rare"] * 5
    rep = evaluate_sets(_fs(real, labels, prompts), _fs(fake, labels, prompts), cfg)
    by_label = rep["by_label"]
    assert by_label["0"]["fd_dino"]["value"] == pytest.approx(0.0, abs=1e-8)
    assert by_label["1"]["fd_dino"]["value"] > 10
    assert by_label["0"]["precision"]["value"] == 1.0
    assert "skipped" in rep["by_prompt"]["rare"] and rep["by_prompt"]["rare"]["n_real"] == 5
    assert rep["by_prompt"]["p0"]["coverage"]["value"] == 1.0
    assert rep["is_fid"] is False and rep["fd_metric"] == "fd_dino"


def test_prompt_strata_skipped_when_real_set_has_no_prompts():
    cfg = MetricsConfig(nearest_k=3, bootstrap=0, kid_subsets=2, kid_subset_size=10)
    x = gaussian(40, 4)
    rep = evaluate_sets(_fs(x, np.zeros(40, int)), _fs(x, np.zeros(40, int), ["p"] * 40), cfg)
    assert "real set has no prompt" in rep["by_prompt"]["skipped"]


def test_kid_subsets_differ_on_small_sets():
    # Subsets of at most half the smaller set: their spread is not an artefact of reusing all rows.
    x, y = gaussian(40, 4, 0.0, 21), gaussian(30, 4, 0.5, 22)
    values = M.kid_subsets(x, y, subsets=10, subset_size=1000)
    assert M.kid_subset_size(1000, 40, 30) == 15
    assert values.std() > 0


def test_frechet_distance_on_fewer_samples_than_dimensions_is_flagged(caplog):
    cfg = MetricsConfig(nearest_k=3, bootstrap=0, kid_subsets=2, kid_subset_size=8)
    with caplog.at_level("WARNING"):
        few = compute_metrics(gaussian(40, 64), gaussian(30, 64, seed=1), cfg, "dino")
    assert few["fd_dino"]["reliable"] is False
    assert "30 samples of 64-dimensional features" in few["fd_dino"]["warning"]
    assert "unreliable" in caplog.text
    from meddiff.reports import fmt

    assert "(unreliable: fewer samples than feature dimensions)" in fmt(few["fd_dino"])
    enough = compute_metrics(gaussian(40, 4), gaussian(30, 4, seed=1), cfg, "dino")
    assert enough["fd_dino"] == {**enough["fd_dino"], "reliable": True}
    assert "warning" not in enough["fd_dino"]
