"""The shipped tiny.yaml as an operator runs it, on the shared local Ray, from the MLflow registry:
every deployment reaches RUNNING on 2 CPUs; metrics are scraped from their own loopback port
and every request has an audit line; a killed model replica costs no 5xx; a canary splits the
traffic by version, then a promotion moves it all; a served version deleted from the registry
turns readiness off until the alias names a version again; SIGTERM of `meddiff serve run`
answers every request in flight before it exits."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
import torch
import yaml

from meddiff.config import load_config
from meddiff.data.images import encode_png
from meddiff.prompts import PromptRow, write_prompt_table
from meddiff.serving.check import shipped_config
from meddiff.serving.launch import deploy, metrics_urls, shutdown
from meddiff.synthesis import components as C
from meddiff.thor.model import save_model
from meddiff.thor.unet import DiffusionUNet
from meddiff.tracking import register_model, start_run
from meddiff.tracking.aliases import promote, set_canary

# A cold start of the three tiny models takes 1-2 minutes on a quiet machine, 15 or more under a
# load average of 60 (other jobs on 2 cores): the module's first test gets the room.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

PLAN = ["thor.infer.stride=50", "thor.infer.draws=1"]  # fast answers; the resources are tiny.yaml's
TOKEN = "ops-token-for-tests-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_config(root: Path, store: str, plan: list[str]) -> dict:
    """The shipped tiny.yaml with this test's token, audit file, ports and registry (resources,
    replicas and models as shipped)."""
    data = yaml.safe_load(shipped_config("tiny").read_text())
    for app in data["applications"]:
        args = app["args"]
        args.update(token_file=str(root / "token"), audit_log=str(root / "audit.jsonl"),
                    metrics_port=0)  # fmt: skip
        args["set"] = [*args["set"], *(plan if app["name"] == "anomaly" else []),
                       f"tracking.uri={store}"]  # fmt: skip
    data["applications"][0]["deployments"][0]["user_config"]["refresh_s"] = 1
    data["http_options"]["port"] = free_port()
    return data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, mlflow_store):
    root = tmp_path_factory.mktemp("ops")
    (root / "token").write_text(TOKEN + "\n")
    cfg = load_config("tiny", overrides=[*PLAN, f"tracking.uri={mlflow_store}"])
    versions = []
    for seed in (0, 1):  # two versions of the name tiny.yaml serves, with different weights
        torch.manual_seed(seed)
        model = save_model(root / f"thor{seed}", DiffusionUNet(cfg.thor.model), cfg.thor.model,
                           cfg.thor.schedule)  # fmt: skip
        with start_run(cfg, "test-ops"):
            versions.append(register_model(model, "thor-ddpm"))
    promote("thor-ddpm", versions[0], "production", cfg.tracking)
    rows = [PromptRow("Histology image of cancer tissue", 1, 0, 2)]
    sd_cfg = load_config("tiny", overrides=["synthesis.model.arch.vae_warmup_steps=0"])
    sd = C.save_pipeline(C.build_components(sd_cfg.synthesis.model, [rows[0].prompt], seed=0),
                         root / "sd")  # fmt: skip
    write_prompt_table(sd / "prompts.csv", rows)
    with start_run(sd_cfg, "test-ops"):
        promote("meddiff-sd-shipped", register_model(sd, "meddiff-sd-shipped"), "production",
                cfg.tracking)  # fmt: skip
    data = tiny_config(root, mlflow_store, PLAN)
    urls = deploy(data, timeout_s=1200)  # a cold start of three models on a busy machine
    png = encode_png(np.random.default_rng(0).random((64, 64)).astype(np.float32), bits=16)
    yield {"url": urls["anomaly"], "data": data, "root": root, "cfg": cfg, "versions": versions,
           "png": png, "store": mlflow_store}  # fmt: skip
    shutdown()


def ask(tiny, seed: int = 1, timeout: float = 120) -> requests.Response:
    return requests.post(f"{tiny['url']}/v1/anomaly", data=tiny["png"], params={"seed": seed},
                         headers={**AUTH, "Content-Type": "image/png"}, timeout=timeout)  # fmt: skip


def replica_states() -> dict[str, dict[str, dict[str, int]]]:
    from ray import serve

    return {
        app: {name: {getattr(k, "value", str(k)): n for k, n in d.replica_states.items()}
              for name, d in st.deployments.items()}
        for app, st in serve.status().applications.items()
    }  # fmt: skip


def wait_replicas(app: str, name: str, n: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while replica_states().get(app, {}).get(name) != {"RUNNING": n}:
        assert time.monotonic() < deadline, replica_states()
        time.sleep(0.5)


def test_every_deployment_of_tiny_yaml_reaches_running(tiny):
    states = replica_states()
    for app in tiny["data"]["applications"]:
        for dep in app["deployments"]:
            assert states[app["name"]][dep["name"]] == {"RUNNING": dep.get("num_replicas", 1)}
        assert states[app["name"]]["Monitor"] == {"RUNNING": 1}
    assert states["anomaly"]["AnomalyModel"] == {"RUNNING": 2}


def test_ray_metrics_exporter_is_not_listening():
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    listening = {
        c.laddr.port
        for p in [psutil.Process(), *psutil.Process().children(recursive=True)]
        for c in _listening(p)
    }
    assert port is None or port <= 0 or port not in listening


def _listening(proc):
    try:
        return [c for c in proc.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        return []


def test_metrics_scrape_and_audit_lines(tiny):
    v1 = tiny["versions"][0]
    assert ask(tiny, seed=11).status_code == 200
    assert requests.get(f"{tiny['url']}/v1/models", timeout=30).status_code == 401
    time.sleep(3)  # replicas report to the Monitor once a second
    url = metrics_urls(["anomaly"])["anomaly"]
    assert url.startswith("http://127.0.0.1:")
    text = requests.get(url, timeout=30).text
    assert (f'meddiff_serve_requests_total{{model_version="{v1}",route="/v1/anomaly",'
            'service="anomaly",status="200"}') in text  # fmt: skip
    assert 'route="/v1/models",service="anomaly",status="401"}' in text
    for name in ("meddiff_serve_request_duration_seconds_bucket", "meddiff_serve_batch_size_count",
                 "meddiff_serve_queue_depth", f'meddiff_serve_anomaly_score_count{{model_version="{v1}"}}',
                 'meddiff_serve_model_events_total{event="load"'):  # fmt: skip
        assert name in text, name
    # Loopback only: the machine's other address does not answer on the metrics port.
    from ray.util import get_node_ip_address

    ip, port = get_node_ip_address(), int(url.rsplit(":", 1)[1].split("/")[0])
    if ip != "127.0.0.1":
        with pytest.raises(OSError), socket.create_connection((ip, port), timeout=5):
            pass
    lines = [json.loads(x) for x in (tiny["root"] / "audit.jsonl").read_text().splitlines()]
    mine = [x for x in lines if x["seed"] == 11]
    assert mine and mine[-1]["token"] == "default" and mine[-1]["model_version"] == v1
    assert mine[-1]["route"] == "/v1/anomaly" and mine[-1]["status"] == 200
    assert {x["status"] for x in lines if x["token"] is None} == {401}
    assert TOKEN not in (tiny["root"] / "audit.jsonl").read_text()


def _load(tiny, clients: int = 3) -> tuple[list, threading.Event]:
    """Clients posting in a loop until the returned event is set; results: (time, status or
    the exception's name, version)."""
    stop, results = threading.Event(), []

    def client(i: int) -> None:
        while not stop.is_set():
            try:
                r = ask(tiny, seed=i)
                results.append((time.monotonic(), r.status_code, r.headers.get("X-Model-Version")))
            except requests.RequestException as err:
                results.append((time.monotonic(), type(err).__name__, None))

    for i in range(clients):
        threading.Thread(target=client, args=(i,), daemon=True).start()
    return results, stop


def test_a_killed_model_replica_costs_no_5xx(tiny):
    results, stop = _load(tiny)
    try:
        time.sleep(3)
        (victim,) = [
            p for p in psutil.Process().children(recursive=True)
            if "ServeReplica:anomaly:AnomalyModel" in " ".join(p.cmdline())
        ][:1]  # fmt: skip
        killed_at = time.monotonic()
        victim.kill()  # a replica this test's Ray started, by PID
        time.sleep(12)
    finally:
        stop.set()
    time.sleep(1)
    codes = [c for _, c, _ in results]
    assert set(codes) <= {200, 503}, codes
    assert any(t > killed_at and c == 200 for t, c, _ in results)
    wait_replicas("anomaly", "AnomalyModel", 2)  # Serve replaces it


def test_canary_splits_by_version_then_promotion_and_deletion(tiny):
    import mlflow

    v1, v2 = tiny["versions"]
    tracking = tiny["cfg"].tracking
    set_canary("thor-ddpm", v2, 50, "production", tracking)
    results, stop = _load(tiny, clients=2)
    try:
        deadline = time.monotonic() + 90
        while {v for _, _, v in results[-20:]} != {v1, v2}:
            assert time.monotonic() < deadline, results[-10:]
            time.sleep(0.5)
        promote("thor-ddpm", v2, "production", tracking)  # ends the canary
        deadline = time.monotonic() + 90
        while len(results) < 6 or {v for _, _, v in results[-6:]} != {v2}:
            assert time.monotonic() < deadline, results[-10:]
            time.sleep(0.5)
    finally:
        stop.set()
    assert {c for _, c, _ in results} == {200}
    time.sleep(3)
    text = requests.get(metrics_urls(["anomaly"])["anomaly"], timeout=30).text
    for v in (v1, v2):
        assert f'model_version="{v}",route="/v1/anomaly",service="anomaly",status="200"' in text
    assert 'event="canary_on"' in text
    # The served version is deleted from the registry: still served, but not ready.
    mlflow.MlflowClient().delete_model_version("thor-ddpm", v2)
    deadline = time.monotonic() + 60
    while (r := requests.get(f"{tiny['url']}/readyz", timeout=30)).status_code == 200:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert r.status_code == 503 and f"version {v2} of thor-ddpm was deleted" in r.json()["detail"]
    assert ask(tiny).status_code == 200
    promote("thor-ddpm", v1, "production", tracking)
    deadline = time.monotonic() + 90
    while (r := requests.get(f"{tiny['url']}/readyz", timeout=30)).status_code != 200:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.5)
    assert r.json()["version"] == v1


def test_sigterm_drains_requests_in_flight(tiny, tmp_path):
    """`meddiff serve run` (its own embedded Ray) with 4 requests in flight gets SIGTERM: each
    is answered 200, later ones 503 or a refused connection, and it exits 0."""
    data = tiny_config(tmp_path, tiny["store"], [])  # tiny.yaml's own plan: slower answers
    data["applications"] = data["applications"][:1]
    data["applications"][0]["args"]["drain_grace_s"] = 240  # a busy machine's slow answers
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(data))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "meddiff.cli", "serve", "run", "--config", str(tmp_path / "serve.yaml"),
         "--timeout-s", "1200"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    out: list[str] = []
    threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True).start()
    try:
        deadline = time.monotonic() + 1300
        while not any("SIGTERM drains" in line for line in out):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(out[-30:])
            time.sleep(0.5)
        url = next(line.split()[1] for line in out if line.startswith("anomaly: http"))
        svc = {**tiny, "url": url}
        assert ask(svc).status_code == 200  # warm
        with ThreadPoolExecutor(5) as pool:
            inflight = [pool.submit(ask, svc, i, 300) for i in range(4)]
            time.sleep(1.0)
            proc.send_signal(signal.SIGTERM)
            time.sleep(1.5)
            late = pool.submit(ask, svc, 9, 300)
            codes = [f.result().status_code for f in inflight]
            try:
                late_code = late.result().status_code
            except requests.ConnectionError:
                late_code = "refused"
        assert codes == [200] * 4, codes
        assert late_code in (503, "refused")
        assert proc.wait(timeout=300) == 0, "".join(out[-30:])
        assert any("drained in" in line for line in out), "".join(out[-30:])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
