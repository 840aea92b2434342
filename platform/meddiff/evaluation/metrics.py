"""Fidelity and diversity metrics on feature vectors: Fréchet distance, KID, and the k-NN metrics
precision/recall (Kynkäänniemi et al.) and density/coverage (Naeem et al.), with bootstrap CIs.

Everything here works on float features (n, d) and is independent of the network that made them.
Numerics:

- Means and covariances are accumulated in float64 over row chunks (a float32 covariance of 50,000
  rows loses the digits that the Fréchet distance's cancellation needs), so memory stays at one
  chunk plus d×d. (BLAS ``dsyrk``, one triangle, was measured slower than ``gemm`` in OpenBLAS.)
- ``Tr sqrt(Σ1 Σ2)`` is computed from symmetric eigendecompositions: with ``S = Σ1^½``, the
  eigenvalues of ``Σ1 Σ2`` equal those of the symmetric PSD ``S Σ2 S``, so the trace is
  ``Σ sqrt(λ_i)``. Two ``eigh`` of d×d are much cheaper and steadier than a general ``sqrtm``;
  tiny negative eigenvalues from rounding (or rank deficiency when n < d) are clipped to 0.
- k-NN distances are computed in row chunks so memory stays bounded (never an n×n matrix).

Confidence intervals are bootstrap percentile intervals; the Fréchet distance's is corrected for
the bootstrap's bias (:func:`fd_interval`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from meddiff.errors import DataError

_CHUNK_ELEMS = 1 << 22  # pairwise-distance chunk: 4M float64 = 32 MiB
_SMALL_DIM = 512


def blas_threads(dim: int):
    """One BLAS thread for small matrices: a multi-threaded ``eigh`` of 192×192 was measured 7×
    slower than a single thread on a busy 2-core machine (threads spin waiting for a core)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1 if dim <= _SMALL_DIM else None, user_api="blas")


def _as_2d(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise DataError(f"{what}: features must be 2-D (n, d), got shape {x.shape}")
    if len(x) == 0:
        raise DataError(f"{what}: the set is empty")
    if not np.isfinite(x).all():
        raise DataError(f"{what}: features contain NaN or infinity")
    return x


def _check_pair(real: np.ndarray, fake: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    real = _as_2d(real, "real")
    fake = _as_2d(fake, "synthetic")
    if real.shape[1] != fake.shape[1]:
        raise DataError(
            f"feature dimensions differ: real {real.shape[1]}, synthetic {fake.shape[1]}"
        )
    return real, fake


# --- Fréchet distance -----------------------------------------------------------------------


def feature_stats(
    x: np.ndarray, weights: np.ndarray | None = None, chunk: int = 8192
) -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and unbiased covariance (d, d), both float64, of features x (n, d).

    ``weights`` (n,) are non-negative integer counts (a bootstrap resample); the covariance is
    then that of the resampled set: Σ w (x-μ)(x-μ)ᵀ / (Σ w - 1).
    """
    x = _as_2d(x, "features")
    n, d = x.shape
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    total = float(w.sum())
    if total < 2:
        raise DataError(f"a covariance needs at least 2 samples, got {total:g}")
    mu = np.zeros(d)
    for lo in range(0, n, chunk):
        mu += w[lo : lo + chunk] @ x[lo : lo + chunk].astype(np.float64)
    mu /= total
    scatter = np.zeros((d, d))
    for lo in range(0, n, chunk):
        c = x[lo : lo + chunk].astype(np.float64) - mu
        if weights is not None:
            c *= np.sqrt(w[lo : lo + chunk])[:, None]
        scatter += c.T @ c
    scatter = (scatter + scatter.T) / 2  # exact symmetry for the eigensolver
    return mu, scatter / (total - 1)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """‖μ1−μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½) between two Gaussians (mean (d,), cov (d, d))."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise DataError(f"statistics differ in shape: {mu1.shape} vs {mu2.shape}")
    trace_sqrt = _trace_sqrt_product(sigma1, sigma2)
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)
    return max(value, 0.0)  # rounding can leave -1e-12 for identical sets


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    from scipy.linalg import eigh
    from threadpoolctl import threadpool_limits

    # The symmetric eigensolver is dominated by memory-bound tridiagonalisation that OpenBLAS
    # threads poorly: on a shared 2-core machine one thread was measured 5-15× faster than two.
    # Divide and conquer ('evd') was ~2.5× faster than the default ('evr') for all eigenvectors
    # at d = 2048.
    with threadpool_limits(1, user_api="blas"):
        lam, vec = eigh(sigma1, driver="evd", check_finite=False)
        root = (vec * np.sqrt(np.clip(lam, 0, None))) @ vec.T
        m = root @ sigma2 @ root
        m = (m + m.T) / 2  # exact symmetry for eigh; rounding breaks it slightly
        ev = eigh(m, eigvals_only=True, driver="evd", overwrite_a=True, check_finite=False)
    return float(np.sqrt(np.clip(ev, 0, None)).sum())


def fd(real: np.ndarray, fake: np.ndarray) -> float:
    """Fréchet distance between two feature sets (n, d) and (m, d).

    With no more rows than dimensions in either set (e.g. 1,024 patches of 2048-d Inception
    features) it is computed from the rows (:func:`fd_from_rows`, the same value); otherwise from
    the d × d covariances (:func:`frechet_distance`).
    """
    real, fake = _check_pair(real, fake)
    if max(len(real), len(fake)) <= real.shape[1]:
        return fd_from_rows(real, fake)
    return frechet_distance(*feature_stats(real), *feature_stats(fake))


def fd_from_rows(
    x: np.ndarray,
    y: np.ndarray,
    wx: np.ndarray | None = None,
    wy: np.ndarray | None = None,
) -> float:
    """The Fréchet distance of the (weighted) sets x (n, d) and y (m, d), from the rows: exactly
    :func:`frechet_distance` of their :func:`feature_stats`, at O(n·m·d) instead of O(d³).

    With A the deviations from the mean scaled so that Σx = AᵀA (rows √(w_i / (Σw − 1)) (x_i − μ)),
    and B likewise for y, the non-zero eigenvalues of ΣxΣy = AᵀABᵀB are those of
    (ABᵀ)(ABᵀ)ᵀ, so Tr (ΣxΣy)^½ is the sum of the singular values of the n × m matrix ABᵀ, and
    Tr Σx = ‖A‖². Rows of weight 0 (not drawn by a bootstrap) are left out.
    """
    mx, a = _scaled_deviations(x, wx)
    my, b = _scaled_deviations(y, wy)
    from scipy.linalg import svdvals

    trace_sqrt = float(svdvals(a @ b.T, check_finite=False).sum())
    diff = mx - my
    value = float(diff @ diff + np.einsum("ij,ij->", a, a) + np.einsum("ij,ij->", b, b))
    return max(value - 2.0 * trace_sqrt, 0.0)


def _scaled_deviations(x: np.ndarray, w: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(mean (d,), rows (n', d)) with rows √(w_i / (Σw − 1)) (x_i − mean), float64."""
    x = np.asarray(x, dtype=np.float64)
    w = np.ones(len(x)) if w is None else np.asarray(w, dtype=np.float64)
    keep = w > 0
    x, w = x[keep], w[keep]
    total = float(w.sum())
    if total < 2:
        raise DataError(f"a covariance needs at least 2 samples, got {total:g}")
    mu = (w @ x) / total
    return mu, (x - mu) * np.sqrt(w / (total - 1))[:, None]


def fid(real_features: np.ndarray, synthetic_features: np.ndarray) -> float:
    """FID (Heusel et al. 2017): the Fréchet distance of TF-FID Inception-v3 pool features,
    float (n, 2048) and (m, 2048), e.g. from
    :func:`meddiff.evaluation.features.inception_features`. Lower is closer; 0 for one set
    against itself. Biased upward at small n (Chong & Forsyth 2020): compare values at equal set
    sizes only.

    Raises:
        DataError: features that are not 2048-d (not Inception pool features), empty, or not
            finite.
    """
    real, fake = _check_pair(real_features, synthetic_features)
    if real.shape[1] != 2048:
        raise DataError(
            f"FID needs 2048-d Inception pool features, got {real.shape[1]}-d (use fd() for "
            "other networks' features)"
        )
    return fd(real, fake)


# --- KID ------------------------------------------------------------------------------------


def kid_subsets(
    real: np.ndarray,
    fake: np.ndarray,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> np.ndarray:
    """Unbiased MMD² with the cubic polynomial kernel k(x, y) = (xᵀy/d + 1)³ on ``subsets``
    random subsets of ``subset_size`` rows of each set (without replacement); returns (subsets,).

    ``subset_size`` is capped at half the smaller set (at least 2), so that subsets differ and
    their spread means something; MMD² is unbiased at any subset size.
    """
    real, fake = _check_pair(real, fake)
    m = kid_subset_size(subset_size, len(real), len(fake))
    if min(len(real), len(fake)) < 2:
        raise DataError(f"KID needs at least 2 samples per set, got {len(real)} and {len(fake)}")
    d = real.shape[1]
    rng = np.random.RandomState(seed)
    out = np.empty(subsets)
    for s in range(subsets):
        x = real[rng.choice(len(real), m, replace=False)].astype(np.float64)
        y = fake[rng.choice(len(fake), m, replace=False)].astype(np.float64)
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        out[s] = (
            (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
            + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * kxy.sum() / (m * m)
        )
    return out


def kid_subset_size(subset_size: int, n_real: int, n_fake: int) -> int:
    """The subset size KID uses: ``subset_size``, at most half the smaller set, at least 2."""
    return max(2, min(subset_size, min(n_real, n_fake) // 2))


# --- k-NN metrics ---------------------------------------------------------------------------


def _sq_norms(x: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", x, x)


def _distances(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    d2 = _sq_norms(a)[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)
    return np.sqrt(np.clip(d2, 0, None))


def knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    """Distance of each row of x (n, d) to its k-th nearest other row, (n,) float64."""
    x = np.asarray(x, np.float64)
    n = len(x)
    if n <= k:
        raise DataError(f"k-NN metrics need more than k={k} samples per set, got {n}")
    x_sq = _sq_norms(x)
    rows = max(1, _CHUNK_ELEMS // n)
    out = np.empty(n)
    for lo in range(0, n, rows):
        dist = _distances(x[lo : lo + rows], x, x_sq)
        # Position k counts the row itself (distance 0) as the 0-th neighbour.
        out[lo : lo + rows] = np.partition(dist, k, axis=1)[:, k]
    return out


@dataclass
class PrdcSamples:
    """Per-sample terms whose means are the four k-NN metrics (the bootstrap resamples these).

    ``precision`` (m,) bool per synthetic sample: inside some real k-NN ball;
    ``density`` (m,) float per synthetic sample: number of real balls containing it / k;
    ``recall`` (n,) bool per real sample: inside some synthetic k-NN ball;
    ``coverage`` (n,) bool per real sample: its own ball holds some synthetic sample.
    """

    precision: np.ndarray
    recall: np.ndarray
    density: np.ndarray
    coverage: np.ndarray

    def means(self) -> dict[str, float]:
        return {
            "precision": float(self.precision.mean()),
            "recall": float(self.recall.mean()),
            "density": float(self.density.mean()),
            "coverage": float(self.coverage.mean()),
        }


def prdc_samples(real: np.ndarray, fake: np.ndarray, k: int = 5) -> PrdcSamples:
    """Per-sample precision, recall, density and coverage terms of real (n, d) vs fake (m, d)."""
    real, fake = _check_pair(real, fake)
    real = real.astype(np.float64)
    fake = fake.astype(np.float64)
    r_rad = knn_radii(real, k)
    f_rad = knn_radii(fake, k)
    f_sq = _sq_norms(fake)
    n, m = len(real), len(fake)
    inside = np.zeros(m, dtype=np.int64)  # real balls holding each fake sample
    recall = np.zeros(n, dtype=bool)
    coverage = np.zeros(n, dtype=bool)
    rows = max(1, _CHUNK_ELEMS // m)
    for lo in range(0, n, rows):
        dist = _distances(real[lo : lo + rows], fake, f_sq)  # (rows, m)
        in_real_ball = dist < r_rad[lo : lo + rows, None]
        inside += in_real_ball.sum(axis=0)
        recall[lo : lo + rows] = (dist < f_rad[None, :]).any(axis=1)
        coverage[lo : lo + rows] = in_real_ball.any(axis=1)
    return PrdcSamples(
        precision=inside > 0, recall=recall, density=inside / float(k), coverage=coverage
    )


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage of real (n, d) vs fake (m, d)."""
    return prdc_samples(real, fake, k).means()


# --- bootstrap ------------------------------------------------------------------------------


def percentile_ci(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """The central ``confidence`` interval of bootstrap values."""
    values = np.asarray(values, dtype=np.float64)
    lo = (1 - confidence) / 2
    return float(np.quantile(values, lo)), float(np.quantile(values, 1 - lo))


def bootstrap_fd(real: np.ndarray, fake: np.ndarray, resamples: int, seed: int = 0) -> np.ndarray:
    """FD of ``resamples`` bootstrap resamples (both sets resampled with replacement)."""
    rng = np.random.default_rng(seed)
    rows = max(len(real), len(fake)) <= np.shape(real)[1]  # the route fd() takes
    out = np.empty(resamples)
    for b in range(resamples):
        wr = rng.multinomial(len(real), np.full(len(real), 1 / len(real)))
        wf = rng.multinomial(len(fake), np.full(len(fake), 1 / len(fake)))
        if rows:
            out[b] = fd_from_rows(real, fake, wr, wf)
        else:
            out[b] = frechet_distance(*feature_stats(real, wr), *feature_stats(fake, wf))
    return out


def fd_interval(value: float, boot: np.ndarray, confidence: float) -> dict[str, object]:
    """A bias-corrected percentile interval for a Fréchet distance ``value`` from its bootstrap
    values ``boot`` (:func:`bootstrap_fd`): ``{"ci": [lo, hi], "bootstrap_bias": b,
    "ci_method": ...}``.

    Why not the plain percentile interval: the sample FD is biased upward, by roughly a constant
    over n (Chong & Forsyth 2020, "Effectively Unbiased FID and Inception Score and where to find
    them", CVPR), and a bootstrap resample (about 63 % distinct rows) is biased further. The
    bootstrap values therefore sit above ``value``: for a set against itself (FD 0) every one is
    positive, so the percentile interval excludes the value it is about. The bootstrap estimates
    that extra bias as ``b = mean(boot) - value`` (Efron & Tibshirani 1993, "An Introduction to
    the Bootstrap", ch. 10); the interval is the percentile interval of ``boot - b`` (ch. 13),
    clipped at 0 (an FD is never negative). It describes the spread of the FD at these set
    sizes around the measured value; it is not an interval for the FD of infinitely many images
    (which Chong & Forsyth extrapolate from several n).

    Efron's BC interval (z0 from the share of ``boot`` below ``value``) cannot be used here: at
    ``value`` 0 that share is 0 and the interval degenerates.
    """
    boot = np.asarray(boot, dtype=np.float64)
    bias = float(boot.mean() - value)
    lo, hi = percentile_ci(boot - bias, confidence)
    return {
        "ci": [max(lo, 0.0), max(hi, 0.0)],
        "bootstrap_bias": bias,
        "ci_method": "bootstrap percentile, bias-corrected (mean shift)",
    }


def bootstrap_means(
    values: np.ndarray, resamples: int, seed: int = 0, stat: Callable = np.mean
) -> np.ndarray:
    """``stat`` of ``resamples`` with-replacement resamples of a 1-D array."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(resamples, len(values)))
    return np.array([stat(values[i]) for i in idx])
