"""Jobs read and write object storage (s3:// on a real SeaweedFS on loopback) through the shared
local Ray, all or nothing, with one-line errors for bad URIs and credentials."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import servers

from meddiff import storage
from meddiff.cli import main
from meddiff.config import StorageConfig, load_config
from meddiff.data.ingest import ingest
from meddiff.data.shards import MANIFEST, load_shards, read_manifest
from meddiff.errors import DataError

BUCKET = "meddiff-data"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """SeaweedFS with a bucket; credentials in the AWS variables, the endpoint in config only."""
    with servers.seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as s3:
        saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        env = s3.env()
        os.environ["AWS_ACCESS_KEY_ID"] = env["AWS_ACCESS_KEY_ID"]
        os.environ["AWS_SECRET_ACCESS_KEY"] = env["AWS_SECRET_ACCESS_KEY"]
        s3.create_bucket(BUCKET)
        yield s3
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        os.environ.pop("AWS_ENDPOINT_URL", None)  # storage.configure exported it
        storage._settings = None


def _cfg(store, *overrides: str):
    cfg = load_config(
        "tiny",
        overrides=["runtime.progress=false", f"storage.endpoint_url={store.endpoint}", *overrides],
    )
    storage.configure(cfg.storage)
    return cfg


@pytest.fixture(scope="module")
def pcam_uri(store, sample_pcam_dir):
    client = store.client()
    for path in sorted(Path(sample_pcam_dir).iterdir()):
        client.upload_file(str(path), BUCKET, f"pcam/{path.name}")
    return f"s3://{BUCKET}/pcam"


@pytest.mark.slow
def test_ingest_pcam_from_s3_into_s3_shards_matches_local(
    store, pcam_uri, sample_pcam_dir, tmp_path
):
    cfg = _cfg(store)
    out = f"s3://{BUCKET}/shards/pcam-train"
    manifest = ingest(cfg, pcam_uri, out)
    assert manifest["rows"] == 128
    assert storage.is_file(f"{out}/{MANIFEST}")
    assert read_manifest(out)["files"] == manifest["files"]
    remote = load_shards(out)
    local_manifest = ingest(cfg, sample_pcam_dir, tmp_path / "local")
    local = load_shards(tmp_path / "local")
    assert local_manifest["labels"] == manifest["labels"]
    order_r, order_l = np.argsort(remote["index"]), np.argsort(local["index"])
    np.testing.assert_array_equal(remote["image"][order_r], local["image"][order_l])
    np.testing.assert_array_equal(remote["label"][order_r], local["label"][order_l])
    # Provenance names the object the patches came from, not a node-local cached copy.
    assert set(remote["source"]) == {f"{pcam_uri}/camelyonpatch_level_2_split_train_x.h5"}

    # The shards stream back through Ray Data's native Parquet reader with the S3 filesystem,
    # and a second ingest reads the s3:// shard prefix as its input.
    again = ingest(cfg, out, f"s3://{BUCKET}/shards/copy")
    assert again["rows"] == 128 and again["labels"] == manifest["labels"]


def test_incomplete_or_existing_prefix_is_refused(store, pcam_uri):
    cfg = _cfg(store)
    out = f"s3://{BUCKET}/shards/interrupted"
    ingest(cfg, pcam_uri, out, split="valid")
    with pytest.raises(DataError, match="already exists"):
        ingest(cfg, pcam_uri, out, split="valid")
    # An interrupted write: Parquet objects there, manifest never written.
    store.client().delete_object(Bucket=BUCKET, Key=f"shards/interrupted/{MANIFEST}")
    with pytest.raises(DataError, match="not a complete meddiff shard prefix"):
        read_manifest(out)
    with pytest.raises(DataError, match="neither a PCam prefix"):
        ingest(cfg, out, f"s3://{BUCKET}/shards/other")
    # A new write over the leftovers replaces them; the manifest lists only the new files.
    manifest = ingest(cfg, pcam_uri, out, split="valid")
    names = storage.list_files(out)
    assert sorted(names) == sorted([*manifest["files"], MANIFEST])


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    # (MLflow may log its own lines to stderr the first time it creates the session's store.)
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("meddiff: ")]
    assert len(errors) == 1 and errors[0].startswith("meddiff: error: "), errors
    return errors[0]


def test_bad_uris_and_credentials_give_one_line_errors(store, pcam_uri, capsys, monkeypatch):
    common = ["--preset", "tiny", "--set", "runtime.progress=false"]
    common += ["--set", f"storage.endpoint_url={store.endpoint}"]
    err = _one_line_error(
        capsys, ["data", "ingest", "--input", "s3://no-such-bucket/pcam", "--out", "x", *common]
    )
    assert "s3://no-such-bucket/pcam" in err and "no such bucket" in err
    err = _one_line_error(
        capsys, ["data", "ingest", "--input", f"s3://{BUCKET}/nothing", "--out", "x", *common]
    )
    assert f"s3://{BUCKET}/nothing does not exist" in err
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    err = _one_line_error(capsys, ["data", "ingest", "--input", pcam_uri, "--out", "x", *common])
    assert pcam_uri in err and "AWS_SECRET_ACCESS_KEY" in err


def test_unreachable_endpoint_is_retried_with_attempts_logged(store, caplog):
    port = servers.free_port()  # nothing listens there
    storage.configure(StorageConfig(endpoint_url=f"http://127.0.0.1:{port}", retries=3))
    try:
        with (
            caplog.at_level(logging.WARNING, logger="meddiff.storage"),
            pytest.raises(DataError, match=r"unreachable.*after 3 attempts"),
        ):
            storage.read_bytes(f"s3://{BUCKET}/pcam/x.h5")
        attempts = [r.getMessage() for r in caplog.records if "attempt" in r.getMessage()]
        assert len(attempts) == 2 and "attempt 1 of 3" in attempts[0]
    finally:
        _cfg(store)


def test_directory_outputs_upload_with_marker_last(store, tmp_path):
    _cfg(store)
    uri = f"s3://{BUCKET}/outputs/report"
    with storage.local_output(uri) as out:
        (out / "report.html").write_text("<html></html>")
        (out / "sub").mkdir()
        (out / "sub" / "a.json").write_text("{}")
        assert not storage.exists(uri)  # nothing is uploaded until the block ends
    assert storage.is_complete(uri)
    local = storage.local_input(uri)
    assert (local / "sub" / "a.json").read_text() == "{}"
    with pytest.raises(RuntimeError), storage.local_output(f"s3://{BUCKET}/outputs/failed") as out:
        (out / "half.txt").write_text("x")
        raise RuntimeError("job failed")
    assert not storage.exists(f"s3://{BUCKET}/outputs/failed")
    store.client().delete_object(Bucket=BUCKET, Key=f"outputs/report/{storage.COMPLETE}")
    with pytest.raises(DataError, match="incomplete"):
        storage.local_input(uri, cache=tmp_path / "cache")


def test_prompt_pairs_on_s3_feed_the_synthesis_readers(store, tmp_path):
    import ray.data

    from meddiff.data.shards import provenance, write_shards
    from meddiff.synthesis.cache import check_pairs, pair_prompts
    from meddiff.synthesis.train import sample_pair_images

    _cfg(store)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (12, 16, 16, 3), dtype=np.uint8)
    prompts = np.array([f"type {i % 3}" for i in range(12)], dtype=object)
    batch = {"image": images, "label": np.zeros(12, np.int64), "prompt": prompts}
    batch["cluster"] = np.arange(12, dtype=np.int64) % 3
    batch.update(provenance("synthetic", np.arange(12)))
    pairs = f"s3://{BUCKET}/prompts/pairs"
    write_shards(
        ray.data.from_items([{"b": 0}]).map_batches(lambda _: batch), pairs, rows_per_file=5
    )
    assert check_pairs(pairs)["rows"] == 12
    assert pair_prompts(pairs) == ["type 0", "type 1", "type 2"]
    got = sample_pair_images(pairs, 12)
    assert got.shape == (12, 16, 16, 3)
    assert sorted(map(bytes, got)) == sorted(map(bytes, images))
