"""abfs:// on a real Azurite (Azure Blob Storage's emulator) and gs:// on gcp-storage-emulator, both
on loopback: the same storage round trip as s3:// (tests/integration/test_object_storage.py), the
one-line errors, and one real job (PCam ingest) from and to abfs://.

Credentials come from the Azure environment variables only; endpoints from config only.
Without Azurite (npm, installed by .ci/run) the abfs tests skip, unless MEDDIFF_REQUIRE_AZURITE
is set (CI), where they fail instead.
"""

from __future__ import annotations

import logging
import os
import pickle

import h5py
import numpy as np
import pytest
import servers
from test_object_storage import _one_line_error  # the s3 tests' check, same rule

from meddiff import storage
from meddiff.config import StorageConfig, load_config
from meddiff.errors import DataError

CONTAINER = "meddiff-data"
AZURE_VARS = ("AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY")
EXPORTED = ("AZURE_STORAGE_SERVICE_ENDPOINT", "STORAGE_EMULATOR_HOST")  # storage.configure's


@pytest.fixture(autouse=True)
def _fresh_settings():
    """Each test configures storage itself; none leaks its endpoints into the next module."""
    yield
    storage._settings = None
    for key in EXPORTED:
        os.environ.pop(key, None)


@pytest.fixture(scope="module")
def azure(tmp_path_factory):
    """Azurite with one container; the account and key in the Azure variables, as a user has."""
    if servers.azurite_binary() is None:
        reason = f"Azurite not installed (npm install azurite@{servers.AZURITE_VERSION})"
        if os.environ.get("MEDDIFF_REQUIRE_AZURITE"):
            pytest.fail(reason)
        pytest.skip(reason)
    with servers.azurite(tmp_path_factory.mktemp("azurite")) as store:
        saved = {k: os.environ.get(k) for k in AZURE_VARS}
        os.environ.update(store.env())
        store.create_container(CONTAINER)
        yield store
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    if servers.gcs_emulator_binary() is None:
        pytest.skip("gcp-storage-emulator (PyPI, the dev extra) not installed")
    with servers.gcs_emulator(tmp_path_factory.mktemp("gcs")) as store:
        store.create_bucket(CONTAINER)
        yield store


@pytest.fixture(params=["abfs", "gs"])
def remote(request):
    """(base URI, the settings that reach its server) for each emulated store."""
    if request.param == "abfs":
        store = request.getfixturevalue("azure")
        cfg = StorageConfig(azure_endpoint=store.endpoint, retries=2)
    else:
        store = request.getfixturevalue("gcs")
        cfg = StorageConfig(gcs_endpoint=store.endpoint, retries=2)
    storage.configure(cfg)
    return f"{request.param}://{CONTAINER}", cfg


def test_round_trip_with_completion_marker(remote, tmp_path):
    base, _ = remote
    storage.write_bytes(f"{base}/one/a.bin", b"\x00\x01\x02")
    assert storage.read_bytes(f"{base}/one/a.bin") == b"\x00\x01\x02"
    assert storage.is_file(f"{base}/one/a.bin") and storage.is_dir(f"{base}/one")
    assert not storage.exists(f"{base}/one/none")

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "r.html").write_text("<p>")
    (src / "sub" / "x.json").write_text('{"k": 1}')
    up = f"{base}/runs/r1"
    assert storage.upload_dir(src, up) == ["r.html", "sub/x.json"]
    assert storage.is_complete(up)
    assert storage.list_files(up) == [storage.COMPLETE, "r.html", "sub/x.json"]
    assert storage.list_files(up, recursive=False) == [storage.COMPLETE, "r.html"]
    got = storage.download_dir(up, tmp_path / "dl")
    assert sorted(p.relative_to(got).as_posix() for p in got.rglob("*") if p.is_file()) == [
        "r.html",
        "sub/x.json",
    ]
    assert (got / "sub" / "x.json").read_text() == '{"k": 1}'
    # A folder inside a complete upload is vouched for by the upload's marker.
    inner = storage.local_input(f"{up}/sub", cache=tmp_path / "cache")
    assert (inner / "x.json").read_text() == '{"k": 1}'

    # The filesystem Ray ships to a worker carries endpoint and credentials (pickled).
    fs, path = storage.filesystem(f"{up}/r.html")
    with pickle.loads(pickle.dumps(fs)).open_input_stream(path) as f:
        assert f.read() == b"<p>"

    # An interrupted upload (marker gone) is refused; a deleted prefix no longer exists.
    storage.delete_dir(up)
    assert not storage.exists(up)
    storage.write_text(f"{up}/r.html", "<p>")
    assert not storage.is_complete(up)
    with pytest.raises(DataError, match=f"^{up} is incomplete .*{storage.COMPLETE}"):
        storage.download_dir(up, tmp_path / "dl2")
    with pytest.raises(DataError, match="incomplete"):
        storage.local_input(up, cache=tmp_path / "cache")
    assert not (tmp_path / "dl2").exists()
    with pytest.raises(DataError, match=f"^{base}/runs/none does not exist$"):
        storage.download_dir(f"{base}/runs/none", tmp_path / "dl3")


def test_missing_container_or_object_is_a_one_line_error(remote):
    base, _ = remote
    scheme = base.split("://")[0]
    word = "container" if scheme == "abfs" else "bucket"
    for call in (storage.read_bytes, storage.list_files, storage.is_file):
        with pytest.raises(DataError) as err:
            call(f"{scheme}://no-such-{word}/x/y.bin")
        assert (
            str(err.value) == f"{scheme}://no-such-{word}/x/y.bin: no such {word} 'no-such-{word}'"
        )
    with pytest.raises(DataError, match=f"^{base}/nothing.bin: no such file or object$"):
        storage.read_bytes(f"{base}/nothing.bin")


def test_abfs_uri_forms_and_account_from_the_environment(azure, monkeypatch):
    storage.configure(StorageConfig(azure_endpoint=azure.endpoint))
    storage.write_text(f"abfs://{CONTAINER}/forms/a.txt", "same object")
    # The account in the URI (ADLS Gen2 form) wins over AZURE_STORAGE_ACCOUNT_NAME...
    long = f"abfs://{CONTAINER}@{servers.AZURE_ACCOUNT}.dfs.core.windows.net/forms/a.txt"
    assert storage.filesystem_path(long) == f"{CONTAINER}/forms/a.txt"
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_NAME", "someone-else")
    assert storage.read_text(long) == "same object"
    # ... and the one in the endpoint's path too (the az CLI's form, as in a connection string).
    storage.configure(StorageConfig(azure_endpoint=f"{azure.endpoint}/{servers.AZURE_ACCOUNT}"))
    assert storage.read_text(f"abfss://{CONTAINER}/forms/a.txt") == "same object"
    monkeypatch.delenv("AZURE_STORAGE_ACCOUNT_NAME")
    storage.configure(StorageConfig(azure_endpoint=azure.endpoint))
    with pytest.raises(DataError, match=r"^abfs://c/x: no Azure storage account \(set AZURE_STO"):
        storage.read_bytes("abfs://c/x")


def test_abfs_bad_container_and_wrong_key_at_the_command_line(azure, capsys, monkeypatch, tmp_path):
    common = ["--preset", "tiny", "--set", "runtime.progress=false",
              "--set", f"storage.azure_endpoint={azure.endpoint}"]  # fmt: skip
    out = str(tmp_path / "x")
    err = _one_line_error(capsys, ["data", "inspect", "abfs://no-such-container/pcam", *common])
    assert "abfs://no-such-container/pcam" in err and "no such container" in err
    storage.write_text(f"abfs://{CONTAINER}/keyed/a.txt", "x")
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_KEY", "bm90LXRoZS1rZXk=")  # base64, but not its key
    with pytest.raises(DataError) as found:
        storage.read_bytes(f"abfs://{CONTAINER}/keyed/a.txt")
    assert str(found.value) == (
        f"abfs://{CONTAINER}/keyed/a.txt: credentials refused (check AZURE_STORAGE_ACCOUNT_KEY)"
    )
    err = _one_line_error(
        capsys, ["data", "ingest", "--input", f"abfs://{CONTAINER}/pcam", "--out", out, *common]
    )
    assert f"abfs://{CONTAINER}/pcam" in err and "AZURE_STORAGE_ACCOUNT_KEY" in err
    assert not os.path.exists(out)


def test_abfs_unreachable_endpoint_is_retried_with_attempts_logged(azure, caplog):
    port = servers.free_port()  # nothing listens there
    storage.configure(StorageConfig(azure_endpoint=f"http://127.0.0.1:{port}", retries=2))
    with (
        caplog.at_level(logging.WARNING, logger="meddiff.storage"),
        pytest.raises(DataError, match=r"unreachable \(Could not connect\) \(after 2 attempts\)"),
    ):
        storage.read_bytes(f"abfs://{CONTAINER}/x.bin")
    attempts = [r.getMessage() for r in caplog.records if "attempt" in r.getMessage()]
    assert len(attempts) == 1 and "attempt 1 of 2" in attempts[0]


def test_ingest_pcam_from_abfs_into_abfs_shards(azure, sample_pcam_dir):
    """The real job path: PCam HDF5 read from abfs:// (fetched once per node), shards written by
    Ray Data's native Parquet writer onto abfs:// with the Azure filesystem, manifest last; the
    shards read back equal the source patches."""
    from meddiff.data.ingest import ingest
    from meddiff.data.shards import MANIFEST, load_shards, read_manifest

    cfg = load_config(
        "tiny",
        overrides=["runtime.progress=false", f"storage.azure_endpoint={azure.endpoint}"],
    )
    storage.configure(cfg.storage)
    pcam = f"abfs://{CONTAINER}/pcam"
    storage.upload_dir(sample_pcam_dir, pcam, marker=None)
    out = f"abfs://{CONTAINER}/shards/pcam-valid"
    manifest = ingest(cfg, pcam, out, split="valid")
    assert manifest["rows"] == 32
    assert storage.is_file(f"{out}/{MANIFEST}") and read_manifest(out)["rows"] == 32
    assert sorted(storage.list_files(out)) == sorted([*manifest["files"], MANIFEST])
    shards = load_shards(out)
    with (
        h5py.File(sample_pcam_dir / "camelyonpatch_level_2_split_valid_x.h5") as fx,
        h5py.File(sample_pcam_dir / "camelyonpatch_level_2_split_valid_y.h5") as fy,
    ):
        want_x, want_y = fx["x"][:], fy["y"][:].reshape(-1)
    order = np.argsort(shards["index"])
    np.testing.assert_array_equal(shards["image"][order], want_x)
    np.testing.assert_array_equal(shards["label"][order], want_y)
    assert set(shards["source"]) == {f"{pcam}/camelyonpatch_level_2_split_valid_x.h5"}
    # Lineage: the run records the abfs:// input (MLflow itself knows only abfss://).
    import mlflow

    run = mlflow.get_run(read_manifest(out)["mlflow_run_id"])
    tags = [{t.key: t.value for t in d.tags} for d in run.inputs.dataset_inputs]
    assert [t["meddiff.uri"] for t in tags] == [pcam] and tags[0]["meddiff.digest"]
    with pytest.raises(DataError, match="already exists"):
        ingest(cfg, pcam, out, split="valid")
