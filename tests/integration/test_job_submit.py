"""A real head node (``ray start --head``) and a real ``ray job submit``, with token auth on.

The head runs with ``--block`` in a subprocess on ports chosen here, so terminating the subprocess
stops exactly this cluster (``ray stop`` would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pytest

from meddiff.data import shards

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def ray_head():
    # A short temp dir: Ray's unix socket paths must stay under ~107 characters.
    tmp = Path(tempfile.mkdtemp(prefix="mdh", dir="/tmp"))
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {
        **os.environ,
        # The job's `python` must be this environment's, as on a cluster whose nodes put the
        # meddiff venv first on PATH (cluster.yaml).
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_ADDRESS": "",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    gcs, dash, client, agent, agent_grpc, env_agent, metrics, node, obj = _free_ports(9)
    cmd = [
        RAY, "start", "--head", "--block", "--disable-usage-stats",
        f"--port={gcs}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
        f"--metrics-export-port={metrics}", f"--node-manager-port={node}",
        f"--object-manager-port={obj}", "--num-cpus=2", "--object-store-memory=500000000",
        f"--temp-dir={tmp}",
    ]  # fmt: skip
    head = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_jobs_api(address, env, head)
        yield address, env
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_for_jobs_api(address: str, env: dict[str, str], head: subprocess.Popen) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}")
        probe = subprocess.run(
            [RAY, "job", "list", "--address", address], env=env, capture_output=True
        )
        if probe.returncode == 0:
            return
        time.sleep(2)
    raise TimeoutError(f"Ray jobs API at {address} did not come up")


@pytest.mark.slow
def test_ingest_job_through_ray_job_submit(ray_head, sample_pcam_dir: Path, tmp_path: Path):
    address, env = ray_head
    out = tmp_path / "job-shards"
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]}}
    submit = [
        RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT),
        "--runtime-env-json", json.dumps(runtime_env), "--",
        "python", "jobs/ingest.py", "--preset", "tiny", "--input", str(sample_pcam_dir),
        "--split", "valid", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout + done.stderr
    assert shards.read_manifest(out)["rows"] == 32

    # The job recorded its run in the same MLflow store, with the resolved config.
    runs = mlflow.search_runs(experiment_names=["meddiff"], filter_string=f"params.out = '{out}'")
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"
    assert runs.iloc[0]["params.runtime.num_cpus"] == "2"


@pytest.mark.slow
def test_job_api_requires_the_token(ray_head):
    address, env = ray_head
    no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    no_token["HOME"] = tempfile.mkdtemp()  # no ~/.ray/auth_token to fall back on
    done = subprocess.run(
        [RAY, "job", "list", "--address", address], env=no_token, capture_output=True, text=True
    )
    assert done.returncode != 0
    assert "auth" in (done.stdout + done.stderr).lower()
