"""K-means morphology model: determinism for a seed, min-max scaling, streaming, save/load."""

from __future__ import annotations

import numpy as np
import pytest

from meddiff.config.prompts import ClusterConfig
from meddiff.errors import DataError, ModelError
from meddiff.morphology import cluster


@pytest.fixture(scope="module")
def blobs() -> np.ndarray:
    """600 points in 24-d from 6 well-separated Gaussian blobs, on very different feature scales."""
    rng = np.random.default_rng(1)
    centres = rng.normal(0, 5, (6, 24))
    x = centres[rng.integers(0, 6, 600)] + rng.normal(0, 0.5, (600, 24))
    return (x * np.geomspace(0.01, 100, 24)).astype(np.float32)


def test_exact_fit_is_deterministic_for_a_seed(blobs):
    cfg = ClusterConfig(k=6, n_init=3, seed=7)
    m1, l1, i1 = cluster.fit_exact(blobs, cfg)
    m2, l2, i2 = cluster.fit_exact(blobs, cfg)
    assert np.array_equal(l1, l2) and i1 == i2
    assert np.array_equal(m1.centroids, m2.centroids)
    assert np.array_equal(m1.assign(blobs), l1)  # the saved model reproduces the fit's labels
    # Another seed may label clusters differently but finds the same partition of clear blobs.
    _, l3, _ = cluster.fit_exact(blobs, ClusterConfig(k=6, n_init=3, seed=8))
    pairs = {(a, b) for a, b in zip(l1.tolist(), l3.tolist(), strict=True)}
    assert len(pairs) == 6


def test_minmax_matches_sklearn(blobs):
    from sklearn.preprocessing import MinMaxScaler

    model, _, _ = cluster.fit_exact(blobs, ClusterConfig(k=3, n_init=1))
    ref = MinMaxScaler().fit_transform(blobs)
    assert np.allclose(model.normalise(blobs), ref, atol=1e-5)
    const = np.ones((5, 3), np.float32)
    assert np.array_equal(cluster.minmax_scale(const, const.min(0), const.max(0)), np.zeros((5, 3)))


def test_streaming_fit_is_deterministic_and_agrees_with_exact(blobs):
    cfg = ClusterConfig(k=6, n_init=3, seed=3, batch_size=64, epochs=2, init_size=200)
    batches = [blobs[i : i + 50] for i in range(0, len(blobs), 50)]
    scale = cluster.MinMax()
    for b in batches:
        scale.update(b)
    m1, _ = cluster.fit_streaming(lambda: iter(batches), cfg, len(blobs), scale)
    m2, _ = cluster.fit_streaming(lambda: iter(batches), cfg, len(blobs), scale)
    assert np.array_equal(m1.centroids, m2.centroids)
    _, exact_labels, _ = cluster.fit_exact(blobs, ClusterConfig(k=6, n_init=3, seed=3))
    stream_labels = m1.assign(blobs)
    # Same partition up to renaming of the clusters.
    assert len(set(zip(exact_labels.tolist(), stream_labels.tolist(), strict=True))) == 6
    assert cluster.inertia(m1, batches) > 0


def test_k_larger_than_data_is_an_error(blobs):
    with pytest.raises(DataError, match=r"prompts\.cluster\.k = 33 .* \(10\)"):
        cluster.fit_exact(blobs[:10], ClusterConfig(k=33))


def test_save_load_roundtrip(tmp_path, blobs):
    model, labels, _ = cluster.fit_exact(blobs, ClusterConfig(k=4, n_init=1))
    model.info["note"] = "x"
    loaded = cluster.MorphologyModel.load(model.save(tmp_path / "m"))
    assert loaded.k == 4 and loaded.info["note"] == "x"
    assert np.array_equal(loaded.assign(blobs), labels)
    with pytest.raises(DataError, match="dimension 24"):
        loaded.assign(blobs[:, :5])
    with pytest.raises(ModelError, match="not a morphology model"):
        cluster.MorphologyModel.load(tmp_path)


def test_mode_choice_and_silhouette(blobs):
    cfg = ClusterConfig(max_exact_memory_mb=1)
    assert cluster.choose_mode(cfg, 100, 768) == "exact"
    assert cluster.choose_mode(cfg, 10_000, 768) == "streaming"
    model, labels, _ = cluster.fit_exact(blobs, ClusterConfig(k=6, n_init=2))
    score = cluster.silhouette(model.normalise(blobs), labels, 300, 0)
    assert 0.5 < score <= 1.0  # well-separated blobs
    assert cluster.silhouette(blobs[:3], np.zeros(3, int), 10, 0) is None
