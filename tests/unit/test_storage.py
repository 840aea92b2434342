"""meddiff.storage on local paths, the tracking server's command line, lineage digests and text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meddiff import storage
from meddiff.errors import ConfigError, DataError
from meddiff.tracking import server
from meddiff.tracking.lineage import dataset_digest, format_lineage


def test_uris_and_local_paths_are_told_apart():
    assert (
        storage.is_uri("s3://b/k") and storage.is_uri("gs://b/k") and storage.is_uri("abfs://c/k")
    )
    assert not storage.is_uri("/data/pcam") and not storage.is_uri(Path("s3:/b"))
    assert storage.path_arg("s3://b/k") == "s3://b/k"  # not folded to s3:/b/k
    assert storage.path_arg("runs/x") == Path("runs/x")
    assert storage.join("s3://b/p/", "a", "m.json") == "s3://b/p/a/m.json"
    assert storage.join(Path("/x"), "y") == Path("/x/y")
    assert storage.name("s3://b/p/shards/") == "shards"
    assert storage.filesystem_path("s3://b/p/q/") == "b/p/q"


def test_local_read_write_list_and_marker_roundtrip(tmp_path):
    storage.write_text(tmp_path / "x.txt", "hi")
    assert storage.read_text(tmp_path / "x.txt") == "hi"
    assert storage.is_file(tmp_path / "x.txt") and storage.is_dir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "y.bin").write_bytes(b"\0\1")
    assert storage.list_files(tmp_path) == ["sub/y.bin", "x.txt"]
    with pytest.raises(DataError, match="missing.txt"):
        storage.read_bytes(tmp_path / "missing.txt")
    with storage.local_output(tmp_path / "out") as out:
        assert out == tmp_path / "out" and not out.exists()  # the job's to create
        out.mkdir()
        (out / "r.html").write_text("<p>")
    assert (tmp_path / "out" / "r.html").is_file()
    assert storage.local_input(tmp_path / "out") == tmp_path / "out"


def test_digest_follows_content_and_names(tmp_path):
    (tmp_path / "a.h5").write_bytes(b"abc")
    first, kind = dataset_digest(tmp_path)
    assert kind == "content" and first.startswith("sha256:")
    assert dataset_digest(tmp_path) == (first, kind)
    (tmp_path / "a.h5").write_bytes(b"abd")  # same size, other bytes
    assert dataset_digest(tmp_path)[0] != first
    assert dataset_digest(tmp_path / "a.h5")[0] != dataset_digest(tmp_path)[0]
    with pytest.raises(DataError):
        dataset_digest(tmp_path / "nothing")


def test_transient_errors_are_retried_and_permanent_ones_are_not(monkeypatch):
    from meddiff.config import StorageConfig

    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    storage.configure(StorageConfig(retries=3))
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("AWS Error NETWORK_CONNECTION during GetObject: curlCode: 7")
        return "ok"

    assert storage.retry("s3://b/k", flaky) == "ok" and len(calls) == 3
    calls.clear()

    def denied():
        calls.append(1)
        raise OSError("AWS Error ACCESS_DENIED during HeadObject operation: No response body.")

    with pytest.raises(DataError, match=r"^s3://b/k: access denied"):
        storage.retry("s3://b/k", denied)
    assert len(calls) == 1
    storage._settings = None


def test_server_command_and_backends(tmp_path):
    cmd = server.server_command("sqlite:///x.db", "s3://b/mlflow", port=5123, workers=1)
    assert cmd[1] == "server" and "--serve-artifacts" in cmd
    assert cmd[cmd.index("--artifacts-destination") + 1] == "s3://b/mlflow"
    assert cmd[cmd.index("--port") + 1] == "5123"
    assert server.check_backend("postgresql://u:p@h:5432/db").startswith("postgresql")
    db = tmp_path / "new" / "mlruns.db"
    assert server.check_backend(f"sqlite:///{db}") and db.parent.is_dir()
    with pytest.raises(ConfigError, match="backend store 'mongodb://x'"):
        server.check_backend("mongodb://x")
    assert server.artifacts_location(str(tmp_path / "art")) == (tmp_path / "art").as_uri()
    assert server._redact("postgresql://u:secret@h/db") == "postgresql://u:***@h/db"
    env = server.server_env("s3://b/m", "http://127.0.0.1:8333")
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://127.0.0.1:8333"
    server.check_reachable("sqlite:///x.db")  # not a server: nothing to check


def test_lineage_text_walks_the_chain():
    source = {
        "name": "pcam",
        "uri": "s3://lab/pcam",
        "digest": "sha256:aa",
        "digest_kind": "content",
        "context": "source",
        "produced_by": None,
    }
    ingest = {
        "run_id": "r1", "job": "ingest", "code_version": "0.1", "status": "FINISHED",
        "config": "runs:/r1/config.yaml", "inputs": [source],
    }  # fmt: skip
    shards = {**source, "uri": "s3://lab/shards", "context": "input", "produced_by": ingest}
    prompts = {**ingest, "run_id": "r2", "job": "prompts", "inputs": [shards]}
    chain = {"name": "m", "version": "3", "aliases": ["champion"], "tags": {}, "run": prompts}
    text = format_lineage(chain)
    lines = text.splitlines()
    assert lines[0] == "model m version 3 (aliases: champion)"
    assert [ln.strip().split()[1] for ln in lines if ln.strip().startswith("run ")] == ["r2", "r1"]
    assert text.index("s3://lab/shards") < text.index("s3://lab/pcam")
    assert lines[-1].strip() == "(source files: no meddiff run produced them)"
    json.dumps(chain)  # the --json form


@pytest.mark.parametrize(
    ("argv", "dest"),
    [
        (["prompts", "build", "--input", "s3://b/shards", "--out", "s3://b/p"], "out"),
        (["prompts", "assign", "--input", "x", "--out", "s3://b/p", "--model", "s3://b/m"], "out"),
        (["synth", "train", "--pairs", "s3://b/p/pairs", "--out", "s3://b/s"], "out"),
        (
            [
                "synth",
                "generate",
                "--model",
                "s3://b/m",
                "--prompts",
                "s3://b/p.csv",
                "--out",
                "s3://b/g",
            ],
            "prompts",
        ),  # fmt: skip
        (["thor", "train", "--data", "s3://b/brain/train", "--out", "s3://b/t"], "data"),
        (
            ["thor", "detect", "--model", "s3://b/m", "--images", "s3://b/i", "--out", "s3://b/d"],
            "images",
        ),  # fmt: skip
        (
            [
                "thor",
                "evaluate",
                "--model",
                "m",
                "--images",
                "i",
                "--masks",
                "s3://b/k",
                "--out",
                "s3://b/e",
            ],
            "masks",
        ),  # fmt: skip
        (
            [
                "eval",
                "fidelity",
                "--real",
                "s3://b/r",
                "--synthetic",
                "s=s3://b/g",
                "--out",
                "s3://b/f",
            ],
            "real",
        ),  # fmt: skip
        (
            ["eval", "classifier", "--real", "r", "--synthetic", "s3://b/g", "--out", "s3://b/c"],
            "synthetic",
        ),  # fmt: skip
        (
            [
                "eval",
                "reader-study",
                "export",
                "--real",
                "r",
                "--synthetic",
                "g",
                "--out",
                "s3://b/rs",
            ],
            "out",
        ),  # fmt: skip
        (["eval", "compare-prompting", "--data", "s3://b/pcam", "--out", "s3://b/cmp"], "data"),
    ],
)
def test_job_paths_accept_uris_unfolded(argv, dest):
    """Every job's input and output options keep an s3:// URI as given (``Path`` would make
    ``s3:/b``), and a local path stays a ``Path``."""
    from meddiff.cli import build_parser

    args = build_parser().parse_args(argv)
    assert getattr(args, dest) == argv[argv.index(f"--{dest}") + 1]
    assert args.out.startswith("s3://b/")
    local = build_parser().parse_args([a if a != args.out else "runs/x" for a in argv])
    assert local.out == Path("runs/x")


def test_rebase_names_the_upload_and_local_input_passes_local_paths(tmp_path):
    local = tmp_path / "model"
    summary = {"model": str(local / "unet"), "n": 3, "files": [str(local), "elsewhere"]}
    assert storage.rebase(summary, local, "s3://b/run/") == {
        "model": "s3://b/run/unet",
        "n": 3,
        "files": ["s3://b/run", "elsewhere"],
    }
    assert storage.rebase(summary, local, tmp_path / "x") is summary  # local out: unchanged
    assert storage.rebase({"p": str(tmp_path / "modelx")}, local, "s3://b/r") == {
        "p": str(tmp_path / "modelx")
    }  # a sibling that shares the prefix is not under the folder
    assert storage.local_input(tmp_path) == tmp_path


def test_azure_and_gcs_uris_map_to_paths_inside_their_filesystems(monkeypatch):
    from meddiff.config import StorageConfig

    long = "abfss://data@acct.dfs.core.windows.net/runs/r1/"
    assert storage.filesystem_path(long) == "data/runs/r1"
    assert storage.filesystem_path("abfs://data/runs/r1") == "data/runs/r1"
    assert storage.filesystem_path("gs://bkt/a/b") == "bkt/a/b"
    assert storage.join(long, "model") == "abfss://data@acct.dfs.core.windows.net/runs/r1/model"
    for var in (
        "AZURE_STORAGE_ACCOUNT_NAME",
        "AZURE_STORAGE_ACCOUNT",
        "AZURE_STORAGE_SERVICE_ENDPOINT",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(storage, "_settings", StorageConfig())
    with pytest.raises(DataError, match=r"^abfs://data/x: no Azure storage account"):
        storage.filesystem("abfs://data/x")
    # Building the filesystem sends nothing: the account may come from the URI alone.
    fs, inner = storage.filesystem(long)
    assert type(fs).__name__ == "AzureFileSystem" and inner == "data/runs/r1"
    fs, inner = storage.filesystem("gs://bkt/a")
    assert type(fs).__name__ == "GcsFileSystem" and inner == "bkt/a"


@pytest.mark.parametrize(
    "value",
    ["127.0.0.1:10000", "ftp://h:1", "http://h:1/acct/extra", "http:// h"],
)
def test_object_store_endpoints_are_checked_urls(value):
    from meddiff.config import StorageConfig

    with pytest.raises(ValueError, match="azure_endpoint"):
        StorageConfig(azure_endpoint=value)
    assert StorageConfig(azure_endpoint="http://127.0.0.1:10000/devstoreaccount1").azure_endpoint
    with pytest.raises(ValueError, match="gcs_endpoint"):
        StorageConfig(gcs_endpoint="http://h:1/path")


def test_azure_and_gcs_errors_read_as_one_line(monkeypatch):
    from meddiff.config import StorageConfig

    monkeypatch.setattr(storage, "_settings", None)  # restored after the test
    monkeypatch.setenv("AZURE_STORAGE_SERVICE_ENDPOINT", "http://127.0.0.1:9")
    storage.configure(StorageConfig(azure_endpoint="http://127.0.0.1:9", retries=1))
    cases = {
        "GetProperties failed. Azure Error: [ContainerNotFound] 404 The specified container "
        "does not exist.\nRequestId:1": "no such container",
        "ListBlobsByHierarchy failed. Azure Error: [AuthorizationFailure] 403 Server failed to "
        "authenticate the request.": "credentials refused (check AZURE_STORAGE_ACCOUNT_KEY)",
        "Check for Hierarchical Namespace support on 'http://127.0.0.1:9/a/c' failed. Azure "
        "Error: [] Fail to get a new connection for: http://127.0.0.1:9. Could not connect to "
        "server": "object store at http://127.0.0.1:9 unreachable (Could not connect)",
        "google::cloud::Status(PERMISSION_DENIED: Permanent error)": "access denied (check the "
        "Google credential's role)",
    }
    for message, meaning in cases.items():
        with pytest.raises(DataError) as err:
            storage.retry("abfs://c/k", lambda m=message: (_ for _ in ()).throw(OSError(m)))
        assert str(err.value) == f"abfs://c/k: {meaning}"


@pytest.mark.parametrize(
    ("endpoint", "uri", "want"),
    [
        # Azurite, account in the endpoint's path: path-style on that host.
        ("http://127.0.0.1:10000/devstoreaccount1", "abfs://c/k",
         ("devstoreaccount1", "127.0.0.1:10000", "127.0.0.1:10000", "http")),
        # Another Azure cloud's suffix: the account stays a host prefix.
        ("https://acct.blob.core.chinacloudapi.cn", "abfs://c/k",
         ("acct", ".blob.core.chinacloudapi.cn", ".dfs.core.chinacloudapi.cn", "https")),
        # No endpoint: Azure itself (pyarrow's defaults); the account from the URI.
        (None, "abfs://c@other.dfs.core.windows.net/k", ("other", "", "", "")),
    ],
)  # fmt: skip
def test_azure_endpoint_forms(monkeypatch, endpoint, uri, want):
    from meddiff.config import StorageConfig

    monkeypatch.delenv("AZURE_STORAGE_SERVICE_ENDPOINT", raising=False)
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_KEY", "a2V5")
    monkeypatch.setattr(storage, "_settings", StorageConfig(azure_endpoint=endpoint))
    fs, _ = storage.filesystem(uri)
    options = fs.__reduce__()[1][0]  # what the pickle Ray ships to a worker carries
    got = (
        options["account_name"],
        options["blob_storage_authority"],
        options["dfs_storage_authority"],
        options["blob_storage_scheme"],
    )
    assert got[0] == want[0] and options["account_key"] == "a2V5"
    if endpoint:
        assert got == want


def test_an_upload_keeps_what_the_job_wrote_to_the_bucket_itself(bucket, tmp_path):
    """Ray Train's checkpoints under ``ray/`` survive the end-of-job upload, which replaces the
    rest (an old model) and writes the completion marker last."""
    (bucket / "run" / "ray" / "train").mkdir(parents=True)
    (bucket / "run" / "ray" / "train" / "ckpt.pt").write_bytes(b"state")
    (bucket / "run" / "old-model.bin").write_bytes(b"old")  # an earlier upload's, listed:
    (bucket / "run" / storage.COMPLETE).write_text(json.dumps({"files": ["old-model.bin"]}))
    with storage.local_output("s3://bkt/run", keep=("ray",)) as out:
        (out / "model.bin").write_bytes(b"new")
    assert storage.list_files("s3://bkt/run") == [
        storage.COMPLETE, "model.bin", "ray/train/ckpt.pt"
    ]  # fmt: skip
    assert json.loads(storage.read_text(f"s3://bkt/run/{storage.COMPLETE}"))["files"] == [
        "model.bin"
    ]
    storage.delete_dir("s3://bkt/run")  # without keep: all of it
    assert storage.list_files("s3://bkt/run") == []


def test_append_line_adds_to_a_file_or_an_object(bucket, tmp_path):
    (bucket / "a").mkdir()  # the local stand-in needs the folder an object store does not
    for path in (tmp_path / "a" / "log.jsonl", "s3://bkt/a/log.jsonl"):
        storage.append_line(path, "one")
        storage.append_line(path, "two")
        assert storage.read_text(path) == "one\ntwo\n"


def test_only_the_storage_package_asks_whether_a_path_is_remote():
    """Jobs, Ray workers and the training core take locations and paths: no module outside
    ``meddiff.storage`` branches on ``is_uri`` (it did in 17 files, 26 times)."""
    root = Path(__file__).resolve().parents[2]
    package = root / "platform" / "meddiff" / "storage"
    sources = [*(root / "platform").rglob("*.py"), *(root / "jobs").rglob("*.py")]
    found = [
        f"{p.relative_to(root)}:{n}"
        for p in sources
        if not p.is_relative_to(package)
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if "is_uri(" in line
    ]
    assert sources and not found, found


def _write(root: Path, *names: str) -> None:
    for n in names:
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        (root / n).write_text(n)


@pytest.mark.parametrize("scheme", ["local", "s3"])
def test_an_existing_output_is_refused_and_overwrite_replaces_only_meddiffs_files(
    bucket, tmp_path, scheme
):
    """The rule on every scheme: an earlier output is refused without --overwrite (one line
    naming it and the flag); --overwrite removes the files its marker lists, never a foreign
    one; a foreign file the new output would replace stops the job before anything changes."""
    root = bucket / "out" if scheme == "s3" else tmp_path / "out"
    out = "s3://bkt/out" if scheme == "s3" else root
    with storage.OutputLocation.open(out) as loc:
        _write(loc.staging, "report.html", "maps/a.png", "maps/b.png")
    listed = json.loads((root / storage.COMPLETE).read_text())["files"]
    assert listed == ["maps/a.png", "maps/b.png", "report.html"]
    _write(root, "notes.txt", "maps/mine.png")  # the user's own files beside the output

    with pytest.raises(DataError) as err:
        storage.OutputLocation.open(out).__enter__()
    assert str(err.value).startswith(f"{out} already exists") and "--overwrite" in str(err.value)
    assert "meddiff did not write, e.g. maps/mine.png" in str(err.value)

    with storage.OutputLocation.open(out, overwrite=True) as loc:
        _write(loc.staging, "report.html", "maps/c.png")
    assert storage.list_files(out) == sorted(
        [storage.COMPLETE, "maps/c.png", "maps/mine.png", "notes.txt", "report.html"]
    )
    assert (root / "notes.txt").read_text() == "notes.txt"
    assert json.loads((root / storage.COMPLETE).read_text())["files"] == [
        "maps/c.png",
        "report.html",
    ]

    clash = pytest.raises(DataError, match=r"notes\.txt was not written by meddiff")
    with clash, storage.OutputLocation.open(out, overwrite=True) as loc:
        _write(loc.staging, "notes.txt")
    assert (root / "notes.txt").read_text() == "notes.txt"  # the user's file, untouched


def test_bucket_roots_and_objects_are_not_outputs(bucket):
    (bucket / "file.bin").write_bytes(b"x")
    for uri in ("s3://bkt", "s3://bkt/"):
        with pytest.raises(DataError, match=r"^s3://bkt: a bucket or container root"):
            storage.OutputLocation.open(uri, overwrite=True).__enter__()
    with pytest.raises(DataError, match=r"^s3://bkt/file\.bin is a file \(an object\)"):
        storage.OutputLocation.open("s3://bkt/file.bin", overwrite=True).__enter__()
    assert (bucket / "file.bin").read_bytes() == b"x"


def test_a_failed_local_job_leaves_nothing_and_a_killed_ones_files_are_known(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), storage.OutputLocation.open(out) as loc:
        _write(loc.staging, "half.png")
        raise RuntimeError("job failed")
    assert not out.exists() and not list(tmp_path.iterdir())
    # A job killed mid-way (no exception, no commit) leaves its files and its claim beside
    # them; the next run replaces them without --overwrite, and nothing else.
    loc = storage.OutputLocation.prepare(out)
    _write(out, "half.png")
    assert Path(f"{out}.meddiff-pending.json").is_file()
    _write(tmp_path, "sibling.txt")
    with storage.OutputLocation.open(out) as loc:
        assert not (out / "half.png").exists()
        _write(loc.staging, "full.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "sibling.txt"]
    assert storage.list_files(out) == [storage.COMPLETE, "full.png"]


def test_resumable_outputs_keep_their_checkpoints_and_fresh_removes_only_meddiffs(bucket):
    """A training location resumes there (no refusal); --fresh (start_over) removes what
    meddiff wrote, checkpoints included, and leaves a foreign file."""
    _write(bucket, "run/ray/train/ckpt.pt", "run/README.txt")
    with storage.OutputLocation.open("s3://bkt/run", keep=("ray",), resume=True) as loc:
        _write(loc.staging, "model/w.bin")
    record = json.loads((bucket / "run" / storage.COMPLETE).read_text())
    assert record == {"files": ["model/w.bin"], "folders": ["ray"]}
    with storage.OutputLocation.open("s3://bkt/run", keep=("ray",), resume=True) as loc:
        loc.start_over()
        assert storage.list_files("s3://bkt/run") == ["README.txt"]
        _write(loc.staging, "model/w.bin")
    assert storage.list_files("s3://bkt/run") == sorted(
        [storage.COMPLETE, "README.txt", "model/w.bin"]
    )


def test_shard_leftovers_are_meddiffs_by_name(bucket):
    """A write interrupted before its manifest leaves files named meddiff-<token>-...: the
    next write replaces them without --overwrite; a foreign Parquet file stays."""
    token = storage.write_token()
    _write(bucket, f"shards/{token}abc_000000-0.parquet", "shards/theirs.parquet")
    with pytest.raises(DataError, match="already exists"):
        storage.OutputLocation.open("s3://bkt/shards").__enter__()
    (bucket / "shards" / "theirs.parquet").unlink()
    loc = storage.OutputLocation.prepare("s3://bkt/shards", marker=None)
    loc.clear()
    assert storage.list_files("s3://bkt/shards") == []


# Every printable ASCII character but the separator: S3 allows each in a key (some only with
# the URL-encoding its clients do, which is why keys must never be URL-parsed here).
KEY_CHARS = [chr(c) for c in range(0x20, 0x7F) if chr(c) != "/"]


def test_keys_are_keys_on_a_filesystem_bucket(bucket, tmp_path):
    """``#``, ``?``, ``%``, spaces and every other printable character stay in the key: write,
    read, list, upload, download and delete round-trip (``urlparse`` cut ``#``/``?``)."""
    assert (
        storage.filesystem_path("s3://bkt/scan#7/run?x=1/100%/a b") == "bkt/scan#7/run?x=1/100%/a b"
    )
    assert storage.filesystem_path("abfs://c@acct.dfs.core.windows.net/a#b") == "c/a#b"
    assert storage.is_uri("s3://bkt/a#b") and not storage.is_uri("s3:/bkt/a")
    base = "s3://bkt/scan#7/run?x=1/100% done"
    names = [f"f{c}x.txt" for c in KEY_CHARS]
    for n in names:
        storage.write_text(f"{base}/{n}", n)
    assert storage.list_files(base) == sorted(names)
    assert all(storage.read_text(f"{base}/{n}") == n for n in names)
    src = tmp_path / "src"
    for n in names:
        _write(src, n)
    assert storage.upload_dir(src, f"{base}/up") == sorted(names)
    got = storage.download_dir(f"{base}/up", tmp_path / "down")
    assert sorted(p.name for p in got.iterdir()) == sorted(names)
    assert storage.local_input(f"{base}/up/f#x.txt").read_text() == "f#x.txt"
    storage.write_text("s3://bkt/run#1/x", "one")
    storage.write_text("s3://bkt/run#2/x", "two")
    assert (bucket / "run#1" / "x").read_text() == "one" and storage.read_text(
        "s3://bkt/run#2/x"
    ) == "two"
    with storage.OutputLocation.open(base, overwrite=True) as loc:
        _write(loc.staging, "new?.txt")
    assert storage.list_files(base) == sorted([storage.COMPLETE, "new?.txt", *names])
    storage.delete_files(base, names)
    assert storage.list_files(base) == [storage.COMPLETE, "new?.txt"]


def test_errors_about_an_object_name_its_uri_not_the_local_copy(
    bucket, tmp_path, capsys, monkeypatch
):
    """``data inspect`` of a corrupt slide object: the slide library reads meddiff's local copy,
    and the one-line error names the object."""
    from meddiff.cli import main

    monkeypatch.setenv("MEDDIFF_CACHE", str(tmp_path / "cache"))
    (bucket / "slides").mkdir()
    (bucket / "slides" / "case#1.svs").write_bytes(b"not a slide at all")
    assert main(["data", "inspect", "s3://bkt/slides/case#1.svs"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("meddiff: error: ") and "cache" not in err, err
    assert "slide s3://bkt/slides/case#1.svs is not a whole-slide image" in err


def test_demo_fresh_and_ship_never_delete_a_folder_meddiff_did_not_make(tmp_path):
    from meddiff.config import load_config
    from meddiff.demo.run import run_demo
    from meddiff.tracking.shipped import write_shipped

    _write(tmp_path / "mine", "thesis.tex")
    with pytest.raises(DataError, match="not a meddiff demo folder"):
        run_demo(load_config("tiny"), tmp_path / "mine", fresh=True)
    with pytest.raises(DataError, match="not a shipped model folder"):
        write_shipped(tmp_path / "mine", lambda d: (d / "w.bin").write_bytes(b"w"), {})
    assert storage.list_files(tmp_path / "mine") == ["thesis.tex"]
    write_shipped(tmp_path / "model", lambda d: (d / "w.bin").write_bytes(b"w"), {})
    write_shipped(tmp_path / "model", lambda d: (d / "w.bin").write_bytes(b"v"), {})  # re-ship
    assert (tmp_path / "model" / "w.bin").read_bytes() == b"v"
