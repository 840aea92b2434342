"""FID on the installed TF-FID Inception: its defining properties on real PCam patches.

The features of a few real patches and of their blurred and JPEG-compressed versions are
extracted once for the module (the Inception at 299 px is what costs time on a CPU).
The degradations are applied to the same images, so FID measures the degradation and not the
sampling difference of two small sets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from meddiff.data import pcam
from meddiff.evaluation import metrics as M
from meddiff.evaluation.degradations import blur, jpeg
from meddiff.evaluation.features import inception_features

pytestmark = (
    pytest.mark.slow
)  # minutes on a loaded 2-core CPU (Inception at 299 px, FD at d = 2048)

N = 24
SIGMAS = (1.0, 2.0, 4.0)
QUALITIES = (50, 20, 5)


@pytest.fixture(scope="module")
def feats(sample_pcam_dir: Path) -> dict[str, np.ndarray]:
    def rows(split: str) -> np.ndarray:
        return pcam.read_rows(pcam.open_pcam(sample_pcam_dir, split, patch_size=None), 0, N)[
            "image"
        ]

    train, test = rows("train"), rows("test")
    sets = {"train": train, "test": test}
    sets.update({f"blur{s:g}": blur(train, s) for s in SIGMAS})
    sets.update({f"jpeg{q}": jpeg(train, q) for q in QUALITIES})
    names = list(sets)
    # One call: the batches mix sets, as a pipeline would.
    out = inception_features(np.concatenate([sets[n] for n in names]), batch_size=32)
    return {n: out[i * N : (i + 1) * N] for i, n in enumerate(names)}


def test_fid_of_a_set_against_itself_is_zero(feats, sample_pcam_dir):
    assert M.fid(feats["train"], feats["train"]) == pytest.approx(0.0, abs=1e-6)
    # The same images extracted again, in other batches: still 0 up to float noise.
    again = inception_features(
        pcam.read_rows(pcam.open_pcam(sample_pcam_dir, "train", patch_size=None), 0, N)["image"],
        batch_size=5,
    )
    assert M.fid(feats["train"], again) < 0.05
    assert M.fid(feats["train"], feats["test"]) > 10  # other real patches are far from 0


def test_fid_grows_with_blur(feats):
    values = [M.fid(feats["train"], feats[f"blur{s:g}"]) for s in SIGMAS]
    assert 0 < values[0] < values[1] < values[2], values


def test_fid_grows_as_jpeg_quality_drops(feats):
    values = [M.fid(feats["train"], feats[f"jpeg{q}"]) for q in QUALITIES]
    assert 0 < values[0] < values[1] < values[2], values


def test_fid_equals_an_independent_frechet_computation(feats):
    from pytorch_fid.fid_score import calculate_frechet_distance

    # fid() on 24 rows of 2048-d features goes through the rows (an SVD of the 24 × 24 cross
    # matrix). The independent computation is pytorch-fid's (np.cov, scipy.linalg.sqrtm) on the
    # coordinates of the features in an orthonormal basis Q of the span of both sets' deviations
    # from their means and of the mean difference (rank ≤ 2·24 − 1): both covariances and the mean
    # difference lie in that span, so ‖μ1 − μ2‖², Tr Σ and the nonzero eigenvalues of Σ1Σ2 are
    # those of the 2048-d sets, and the Fréchet distance is the same number (sqrtm of a
    # 2048 × 2048 product itself takes minutes on this CPU).
    x, y = feats["train"].astype(np.float64), feats["blur2"].astype(np.float64)
    mx, my = x.mean(0), y.mean(0)
    q, _ = np.linalg.qr(np.concatenate([x - mx, y - my, (mx - my)[None]]).T)
    px, py = x @ q, y @ q
    ref = calculate_frechet_distance(
        px.mean(0), np.cov(px, rowvar=False), py.mean(0), np.cov(py, rowvar=False)
    )
    assert M.fid(feats["train"], feats["blur2"]) == pytest.approx(ref, rel=1e-4)
    # meddiff's covariance route (d × d float64 covariances, two symmetric eigendecompositions)
    # gives it too.
    by_covariances = M.frechet_distance(*M.feature_stats(x), *M.feature_stats(y))
    assert by_covariances == pytest.approx(ref, rel=1e-4)


def test_fid_needs_inception_features():
    from meddiff.errors import DataError

    with pytest.raises(DataError, match="2048-d Inception pool features, got 128-d"):
        M.fid(np.ones((4, 128)), np.ones((4, 128)))
