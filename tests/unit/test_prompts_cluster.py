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


# --- fewer distinct embeddings than k (issue 12, item 5) --------------------------------------


@pytest.fixture()
def copies():
    """48 patches that are copies of 6 images (8 each), shuffled."""
    rng = np.random.default_rng(3)
    base = rng.normal(size=(6, 16)).astype(np.float32)
    which = rng.permutation(np.repeat(np.arange(6), 8))
    return base[which], which


def test_fewer_distinct_embeddings_than_k_is_refused_by_default(copies):
    x, _ = copies
    cfg = ClusterConfig(k=33, n_init=2)
    with pytest.raises(
        DataError, match=r"k = 33 but the 48 patches .* only 6 distinct .*few_distinct"
    ):
        cluster.fit_exact(x, cfg)
    scale = cluster.MinMax()
    scale.update(x)
    with pytest.raises(DataError, match="only 6 distinct"):
        cluster.fit_streaming(
            [x[:20], x[20:]], cfg.model_copy(update={"mode": "streaming"}), 48, scale
        )


@pytest.mark.parametrize("mode", ["exact", "streaming"])
def test_lower_k_gives_distinct_centroids_and_one_type_per_image(copies, mode, caplog):
    x, which = copies
    cfg = ClusterConfig(k=33, n_init=2, few_distinct="lower_k", batch_size=16, init_size=48)
    with caplog.at_level("WARNING"):
        if mode == "exact":
            model, _, _ = cluster.fit_exact(x, cfg)
        else:
            scale = cluster.MinMax()
            scale.update(x)
            model, _ = cluster.fit_streaming([x[:20], x[20:]], cfg, 48, scale)
    assert "fitting k = 6 instead" in caplog.text and "42 of 48 patches duplicate" in caplog.text
    assert model.k == 6 == len(np.unique(model.centroids, axis=0))
    assert model.info["k_requested"] == 33
    assert model.info["distinct_embeddings"] == 6 and model.info["duplicate_patches"] == 42
    types = model.assign(x)
    for image in range(6):  # every copy of an image has one type, and images have their own
        assert len(set(types[which == image].tolist())) == 1
    assert len(set(types.tolist())) == 6


def test_duplicates_are_reported_when_k_fits(copies):
    x, _ = copies
    model, _, _ = cluster.fit_exact(x, ClusterConfig(k=4, n_init=2))
    assert model.k == 4 == len(np.unique(model.centroids, axis=0))
    assert model.info["duplicate_patches"] == 42 and "k_requested" not in model.info


def test_identical_rows_get_one_type_even_on_a_tie():
    # Two coincident centroids: a tie that rounding used to break differently row by row.
    model = cluster.MorphologyModel(
        np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]], np.float32), np.zeros(2), np.ones(2)
    )
    z = np.tile(np.array([[0.7, 0.2]], np.float32), (1000, 1))
    z = np.concatenate([np.random.default_rng(0).random((37, 2), dtype=np.float32), z])
    assert len(set(model.nearest(z)[37:].tolist())) == 1


def test_count_distinct_over_batches():
    a = np.arange(12, dtype=np.float32).reshape(4, 3)
    nan = np.full((1, 3), np.nan, np.float32)
    assert cluster.count_distinct([a, a[:2], nan]) == (4, 6)
    assert cluster.count_distinct([]) == (0, 0)


def test_the_fit_does_not_depend_on_how_rows_were_split_over_shard_files(tmp_path):
    """Which rows land in which shard file depends on how Ray spread the work over nodes; the
    morphology model fitted from the embedding pass must not."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.data.extensions import ArrowTensorArray  # the column type Ray Data writes

    from meddiff.config import load_config
    from meddiff.data.shards import FORMAT, MANIFEST
    from meddiff.morphology.fit import fit_model

    rng = np.random.default_rng(0)
    n = 90
    emb = (rng.normal(size=(n, 8)) + (np.arange(n) % 5)[:, None] * 0.8).astype(np.float32)

    def checked(name: str, order: np.ndarray, files: int):
        d = tmp_path / name
        d.mkdir()
        names = []
        for part, rows in enumerate(np.array_split(order, files)):
            table = pa.table({
                "source": [f"slide{r % 3}" for r in rows], "index": rows.astype(np.int64),
                "reject": [""] * len(rows), "embedding": ArrowTensorArray.from_numpy(emb[rows]),
            })  # fmt: skip
            pq.write_table(table, d / f"part-{part}.parquet")
            names.append(f"part-{part}.parquet")
        manifest = {"format": FORMAT, "rows": n, "files": names,
                    "columns": ["source", "index", "reject", "embedding"]}  # fmt: skip
        (d / MANIFEST).write_text(json.dumps(manifest))
        return d

    pcfg = load_config("tiny", overrides=["prompts.cluster.k=5", "prompts.cluster.n_init=1",
                                          "prompts.cluster.mode=exact"]).prompts  # fmt: skip
    one, _ = fit_model(pcfg, checked("one-node", np.arange(n), 1), n)
    two, _ = fit_model(pcfg, checked("two-nodes", rng.permutation(n), 3), n)
    np.testing.assert_array_equal(one.centroids, two.centroids)
