"""Jobs tracked by a team's MLflow server (`meddiff tracking server`: PostgreSQL backend, artifacts
proxied to a real S3 server), a registered model fetched by alias from another process, and its
lineage printed back to the PCam objects."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import servers

from meddiff import storage
from meddiff.cli import main
from meddiff.config import load_config
from meddiff.data.ingest import ingest
from meddiff.morphology.pipeline import build_prompts
from meddiff.tracking.lineage import dataset_digest

pytestmark = pytest.mark.slow

BUCKET = "meddiff-team"
MODEL = "meddiff-morphology"
PLATFORM = Path(__file__).resolve().parents[2] / "platform"


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """SeaweedFS + PostgreSQL + `meddiff tracking server` (its own process, stopped by PID)."""
    root = tmp_path_factory.mktemp("team")
    with servers.seaweedfs(root / "s3") as store, servers.postgres(root / "pg") as pg:
        store.create_bucket(BUCKET)
        saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        creds = {k: v for k, v in store.env().items() if k in saved}
        os.environ.update(creds)
        port = servers.free_port()
        env = {
            **os.environ,
            "PYTHONPATH": f"{PLATFORM}{os.pathsep}" + os.environ.get("PYTHONPATH", ""),
        }
        cmd = [
            sys.executable, "-m", "meddiff.cli", "tracking", "server",
            "--backend-store-uri", pg,
            "--artifacts-destination", f"s3://{BUCKET}/mlflow",
            "--port", str(port), "--workers", "1", "--wait-s", "500",
            "--log", str(root / "mlflow.log"),
            "--set", f"storage.endpoint_url={store.endpoint}",
        ]  # fmt: skip
        start = time.monotonic()
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True
        )
        try:
            line = proc.stdout.readline()  # printed once /health answers
            assert line.startswith("MLflow server at"), (line, (root / "mlflow.log").read_text())
            print(f"tracking server up in {time.monotonic() - start:.1f} s")
            yield {"uri": f"http://127.0.0.1:{port}", "store": store, "root": root}
        finally:
            os.killpg(proc.pid, signal.SIGTERM)  # the CLI stops the server it started
            proc.wait(timeout=60)
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            os.environ.pop("AWS_ENDPOINT_URL", None)
            storage._settings = None
            # MLflow's process-wide URI (and MLFLOW_TRACKING_URI) now name this stopped server:
            # tests/conftest.py points them back at the session store after this module.


def _cfg(team, *overrides: str):
    cfg = load_config(
        "tiny",
        overrides=[
            "runtime.progress=false",
            f"tracking.uri={team['uri']}",
            f"storage.endpoint_url={team['store'].endpoint}",
            *overrides,
        ],
    )
    storage.configure(cfg.storage)
    return cfg


def test_jobs_track_over_http_and_models_come_back_by_alias(team, sample_pcam_dir, tmp_path):
    import mlflow

    store = team["store"]
    client = store.client()
    for path in sorted(Path(sample_pcam_dir).iterdir()):
        client.upload_file(str(path), BUCKET, f"data/pcam/{path.name}")
    pcam_uri = f"s3://{BUCKET}/data/pcam"
    shards_uri = f"s3://{BUCKET}/data/shards/pcam-train"
    cfg = _cfg(team)

    ingest(cfg, pcam_uri, shards_uri, limit=48)  # 48 patches keep the embedding pass short
    summary = build_prompts(cfg, shards_uri, tmp_path / "prompts")
    assert summary["registered_model"] == f"models:/{MODEL}/1"

    tracker = mlflow.MlflowClient(team["uri"])
    runs = {
        r.data.tags["meddiff.job"]: r
        for r in tracker.search_runs([tracker.get_experiment_by_name("meddiff").experiment_id])
    }
    ingest_run, prompts_run = runs["ingest"], runs["prompts"]
    assert ingest_run.data.params["input"] == pcam_uri
    assert ingest_run.data.metrics["rows"] == 48
    assert prompts_run.data.metrics["rows_in"] == 48
    # Artifacts went through the server (mlflow-artifacts:) into the bucket.
    assert ingest_run.info.artifact_uri.startswith("mlflow-artifacts:")
    keys = [
        o["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix="mlflow/"
        )
        for o in page.get("Contents", [])
    ]
    assert any(k.endswith("shards_manifest.json") for k in keys)
    assert any("/morphology_model/" in k for k in keys)

    tracker.set_registered_model_alias(MODEL, "champion", "1")
    # Another process, which knows only the server's URL, fetches the model by alias.
    fetch = (
        "import sys; from meddiff.config import TrackingConfig; "
        "from meddiff.tracking import fetch_model; "
        "print(fetch_model(sys.argv[1], TrackingConfig(uri=sys.argv[2]), dst=sys.argv[3]))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["PYTHONPATH"] = str(PLATFORM)
    out = subprocess.run(
        [sys.executable, "-c", fetch, f"models:/{MODEL}@champion", team["uri"], str(tmp_path / "f")],
        env=env, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    fetched = Path(out.stdout.strip().splitlines()[-1])
    local = tmp_path / "prompts" / "morphology_model"
    names = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert names and names == sorted(
        p.relative_to(fetched).as_posix() for p in fetched.rglob("*") if p.is_file()
    )
    for name in names:
        assert (fetched / name).read_bytes() == (local / name).read_bytes()

    # Lineage: model -> prompts run -> shards (-> the ingest run that wrote them) -> PCam objects.
    version = tracker.get_model_version(MODEL, "1")
    assert version.tags["meddiff.training_run"] == prompts_run.info.run_id
    assert version.tags["meddiff.code_version"]


def test_lineage_prints_the_chain_to_the_source_files(team, capsys):
    argv = ["lineage", f"models:/{MODEL}/1", "--set", f"tracking.uri={team['uri']}"]
    assert main([*argv, "--json"]) == 0
    chain = json.loads(capsys.readouterr().out)
    run = chain["run"]
    assert run["job"] == "prompts" and run["code_version"]
    (shards_in,) = run["inputs"]
    assert shards_in["uri"] == f"s3://{BUCKET}/data/shards/pcam-train"
    producer = shards_in["produced_by"]
    assert producer["job"] == "ingest"
    (pcam_in,) = producer["inputs"]
    assert pcam_in["uri"] == f"s3://{BUCKET}/data/pcam" and pcam_in["produced_by"] is None
    _cfg(team)
    assert pcam_in["digest"] == dataset_digest(pcam_in["uri"])[0]
    assert pcam_in["digest_kind"] == "content"
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert f"model {MODEL} version 1 (aliases: champion)" in text
    assert "job=prompts" in text and "job=ingest" in text
    assert f"s3://{BUCKET}/data/pcam" in text and "source files" in text


def _errors(capsys) -> list[str]:
    """meddiff's own stderr lines (MLflow and Ray may log theirs there too)."""
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("meddiff: ")]


def test_unreachable_server_is_one_line_after_bounded_retries(team, capsys, tmp_path):
    dead = f"http://127.0.0.1:{servers.free_port()}"
    start = time.monotonic()
    argv = ["data", "ingest", "--input", "x", "--out", str(tmp_path / "o"), "--preset", "tiny"]
    assert main([*argv, "--set", f"tracking.uri={dead}"]) == 2
    (err,) = _errors(capsys)
    assert err.startswith(f"meddiff: error: MLflow server {dead} unreachable")
    assert "after 3 attempts" in err
    assert time.monotonic() - start < 60
    # A server that answers is reached, and a bad reference is refused in one line.
    assert main(["lineage", "models:/no-such-model/1", "--set", f"tracking.uri={team['uri']}"]) == 2
    (err,) = _errors(capsys)
    assert "models:/no-such-model/1" in err
    with urllib.request.urlopen(f"{team['uri']}/health", timeout=10) as resp:
        assert resp.status == 200


def test_concurrent_promotions_on_the_server_keep_the_history(team, tmp_path):
    """Four `meddiff serve promote` processes at once against the team's server (PostgreSQL
    registry): all four moves are in the alias history, in the order they happened."""
    import mlflow

    from meddiff.tracking import register_model, start_run
    from meddiff.tracking.aliases import promote, rollback

    cfg = _cfg(team)
    (tmp_path / "w.txt").write_text("w")
    versions = []
    for _ in range(5):
        with start_run(cfg, "test-race"):
            versions.append(register_model(tmp_path, "race-server"))
    promote("race-server", versions[0], "production", cfg.tracking)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["PYTHONPATH"] = str(PLATFORM)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meddiff.cli",
                "serve",
                "promote",
                "race-server",
                v,
                "--set",
                f"tracking.uri={team['uri']}",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for v in versions[1:]
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [e[-500:] for _, e in outs]
    replaced = {}
    for out, _ in outs:
        before, after = out.strip().splitlines()[-1].split(": ", 1)[1].split(" -> ")
        replaced[after] = before
    tags = mlflow.MlflowClient(team["uri"]).get_registered_model("race-server").tags
    history = tags["meddiff.alias.production.history"].split(",")
    assert history[0] == versions[0] and sorted(history[1:]) == sorted(versions[1:])
    assert [replaced[v] for v in history[1:]] == history[:-1]
    assert rollback("race-server", "production", cfg.tracking) == (history[-1], history[-2])
