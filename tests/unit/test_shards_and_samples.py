from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from meddiff.data import pcam, shards
from meddiff.data.samples import SampleSizes, dab_density, sample_pcam
from meddiff.errors import DataError


def test_encode_decode_round_trip():
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (5, 8, 6, 3), dtype=np.uint8), "label": np.arange(5)}
    batch.update(shards.provenance("slide.tif", np.arange(5), level=1, x=np.arange(5) * 8, y=0))
    encoded = shards.encode_batch(batch)
    assert encoded["image"].dtype == object and len(encoded["image"][0]) == 8 * 6 * 3
    decoded = shards.decode_batch(encoded)
    np.testing.assert_array_equal(decoded["image"], batch["image"])
    assert list(decoded["x"]) == [0, 8, 16, 24, 32] and set(decoded["level"]) == {1}


def test_decode_rejects_mixed_shapes():
    a = shards.encode_batch({"image": np.zeros((1, 4, 4, 3), np.uint8)})
    b = shards.encode_batch({"image": np.zeros((1, 5, 5, 3), np.uint8)})
    mixed = {k: np.concatenate([a[k], b[k]]) for k in a}
    with pytest.raises(DataError, match="mixes image shapes"):
        shards.decode_batch(mixed)


def test_incomplete_shard_dir_is_refused(tmp_path: Path):
    (tmp_path / "part-0.parquet").write_bytes(b"")
    with pytest.raises(DataError, match="not a complete meddiff shard directory"):
        shards.read_manifest(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        shards.read_manifest(tmp_path / "nope")


def test_sample_pcam_is_real_tissue_with_content_labels(tmp_path: Path):
    counts = sample_pcam(tmp_path, SampleSizes(train=64, valid=16, test=0), seed=1)
    assert set(counts) == {"train", "valid"}
    assert counts["train"]["0"] > 10 and counts["train"]["1"] > 10  # roughly balanced
    split = pcam.open_pcam(tmp_path, "train")
    rows = pcam.read_rows(split, 0, split.num_rows)
    # The label follows the stain: DAB in the centre is higher for label 1 on average.
    centre = dab_density(rows["image"].reshape(-1, 96, 3)).reshape(-1, 96, 96)[:, 32:64, 32:64]
    dab = centre.mean(axis=(1, 2))
    assert dab[rows["label"] == 1].mean() > dab[rows["label"] == 0].mean()
    assert rows["image"].std() > 10  # tissue, not a flat image
    # Deterministic for a seed.
    again = tmp_path / "again"
    sample_pcam(again, SampleSizes(train=64, valid=0, test=0), seed=1)
    np.testing.assert_array_equal(
        pcam.read_rows(pcam.open_pcam(again, "train"), 0, 64)["image"], rows["image"]
    )


@pytest.mark.parametrize("scheme", ["local", "s3"])
def test_an_emptied_or_missing_shard_file_is_a_one_line_error(tmp_path, bucket, scheme):
    """A complete shard folder whose Parquet file was emptied afterwards: readers (and ``data
    inspect``'s check) name the file (its URI on an object store) instead of a traceback."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    root = bucket / "shards" if scheme == "s3" else tmp_path / "shards"
    path = "s3://bkt/shards" if scheme == "s3" else root
    root.mkdir()
    batch = shards.encode_batch({"image": np.zeros((3, 4, 4, 3), np.uint8), "label": np.arange(3)})
    for name in ("meddiff-a-0.parquet", "meddiff-a-1.parquet"):
        pq.write_table(pa.table({k: list(v) for k, v in batch.items()}), root / name)
    manifest = shards._describe(path, ["meddiff-a-0.parquet", "meddiff-a-1.parquet"], {}, 0.0)
    (root / shards.MANIFEST).write_text(json.dumps(manifest))
    assert len(shards.load_shards(path)["label"]) == 6
    (root / "meddiff-a-1.parquet").write_bytes(b"")
    want = rf"^{path}/meddiff-a-1\.parquet: 0 bytes, _meddiff_shards\.json says \d+"
    with pytest.raises(DataError, match=want):
        shards.check_files(path, shards.read_manifest(path))
    with pytest.raises(DataError, match=want):
        shards.load_shards(path)
    with pytest.raises(DataError, match=rf"^{path}/meddiff-a-1\.parquet: not a readable Parquet"):
        shards.read_file(path, "meddiff-a-1.parquet")
    (root / "meddiff-a-1.parquet").unlink()
    with pytest.raises(DataError, match="listed in _meddiff_shards.json but missing"):
        shards.check_files(path, shards.read_manifest(path))


def test_producer_run_is_the_run_id_the_writer_was_given(tmp_path):
    import json

    done = tmp_path / "pairs"
    done.mkdir()
    manifest = {"format": shards.FORMAT, "files": [], "mlflow_run_id": "0123abcd"}
    (done / shards.MANIFEST).write_text(json.dumps(manifest))
    assert shards.producer_run(done) == "0123abcd"
    # Written outside any run, not a shard directory, or not there: no run to follow.
    (done / shards.MANIFEST).write_text(json.dumps({**manifest, "mlflow_run_id": None}))
    assert shards.producer_run(done) is None
    (tmp_path / "pngs").mkdir()
    assert shards.producer_run(tmp_path / "pngs") is None
    assert shards.producer_run(tmp_path / "missing") is None
