"""The anomaly service over real HTTP on the shared local Ray, deployed from the MLflow registry:
answers equal `meddiff thor detect`'s, batched or alone; every /v1 route needs the token;
promotion under load drops nothing and rollback switches back; overload answers 503.

One Serve application is shared by the module (a cold start costs 15-35 s here)."""

from __future__ import annotations

import base64
import copy
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import yaml

from meddiff.config import load_config
from meddiff.data.images import decode_png, read_png, write_png
from meddiff.serving.check import check_config
from meddiff.serving.launch import deploy, shutdown
from meddiff.thor.detect import detect_folder, image_seed
from meddiff.thor.model import save_model
from meddiff.thor.unet import DiffusionUNet
from meddiff.tracking import register_model, start_run
from meddiff.tracking.aliases import promote, rollback

ROOT = Path(__file__).resolve().parents[2]
NAME = "thor-serving-test"
PLAN = ["thor.infer.stride=50", "thor.infer.draws=1"]
N_IMAGES = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(tmp_path_factory, mlflow_store):
    root = tmp_path_factory.mktemp("serving")
    cfg = load_config("tiny", overrides=[*PLAN, f"tracking.uri={mlflow_store}"])
    # Two registered versions with different weights (so a switch is visible in the answers).
    for seed in (0, 1):
        torch.manual_seed(seed)
        unet = DiffusionUNet(cfg.thor.model)
        model = save_model(root / f"model{seed}", unet, cfg.thor.model, cfg.thor.schedule)
        with start_run(cfg, "test-register"):
            version = register_model(model, NAME)
    assert version == "2"
    promote(NAME, "1", "production", cfg.tracking)
    images = root / "images"
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        write_png(images / f"s{i}.png", rng.random((64, 64)).astype(np.float32), bits=16)
    detect_folder(cfg, f"models:/{NAME}/1", images, root / "detect")  # before Serve takes a CPU

    data = yaml.safe_load((ROOT / "serve" / "tiny.yaml").read_text())
    app = copy.deepcopy(data["applications"][0])
    app["args"] = {"preset": "tiny", "set": [*PLAN, f"tracking.uri={mlflow_store}"],
                   "token_file": str(root / "token")}  # fmt: skip
    model_dep = app["deployments"][0]
    model_dep["user_config"].update(model=f"models:/{NAME}@production", refresh_s=1)
    model_dep.pop("autoscaling_config")
    model_dep.update(num_replicas=1, max_ongoing_requests=4, max_queued_requests=4)
    data["applications"] = [app]
    data["http_options"]["port"] = free_port()
    path = root / "serve.yaml"
    path.write_text(yaml.safe_dump(data))
    (root / "token").write_text("s3cret-token-for-tests-0123456789\n")
    entries = check_config(path)
    assert entries[0]["version"] == "1"
    urls = deploy(data)
    yield {
        "url": urls["anomaly"],
        "auth": {"Authorization": "Bearer s3cret-token-for-tests-0123456789"},
        "images": images,
        "detect": root / "detect",
        "cfg": cfg,
    }
    shutdown()


def ask(service, name: str, seed: int | None = None, timeout: float = 120):
    body = (service["images"] / name).read_bytes()
    params = {} if seed is None else {"seed": seed}
    return requests.post(
        f"{service['url']}/v1/anomaly",
        data=body,
        params=params,
        headers={**service["auth"], "Content-Type": "image/png"},
        timeout=timeout,
    )


def check_equals_detect(service, name: str, out: dict) -> None:
    want = read_png(service["detect"] / "maps" / name)
    got = decode_png(base64.b64decode(out["anomaly_map_png"]))
    np.testing.assert_allclose(got, want, atol=1e-6)
    scores = (service["detect"] / "scores.csv").read_text().splitlines()
    row = next(r for r in scores if r.startswith(name + ","))
    assert out["score"] == pytest.approx(float(row.split(",")[1]), rel=1e-5)


def test_anomaly_equals_thor_detect_alone_and_batched(service):
    base = service["cfg"].runtime.seed
    names = [f"s{i}.png" for i in range(N_IMAGES)]
    alone = ask(service, names[0], image_seed(names[0], base))
    assert alone.status_code == 200, alone.text
    assert alone.headers["X-Model-Version"] == "1"
    check_equals_detect(service, names[0], alone.json())
    with ThreadPoolExecutor(N_IMAGES) as pool:
        answers = list(pool.map(lambda n: ask(service, n, image_seed(n, base)), names))
    for name, r in zip(names, answers, strict=True):
        assert r.status_code == 200, r.text
        check_equals_detect(service, name, r.json())
    # Without a seed the map is a function of the image alone.
    a, b = ask(service, names[1]).json(), ask(service, names[1]).json()
    assert a["anomaly_map_png"] == b["anomaly_map_png"] and a["seed"] == b["seed"]


def test_every_v1_route_needs_the_token(service):
    url = service["url"]
    for method, path in [("get", "/v1/models"), ("post", "/v1/anomaly")]:
        r = requests.request(method, url + path, timeout=30)
        assert r.status_code == 401, path
        r = requests.request(method, url + path, headers={"Authorization": "Bearer x"}, timeout=30)
        assert r.status_code == 401, path
    assert requests.get(url + "/healthz", timeout=30).status_code == 200
    ready = requests.get(url + "/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json()["version"] == "1"
    models = requests.get(url + "/v1/models", headers=service["auth"], timeout=30).json()
    (m,) = models["models"]
    assert (m["name"], m["alias"], m["version"]) == (NAME, "production", "1")
    assert m["run_id"] and m["plan"]["method"] == "thor"


def test_bad_input_is_4xx_over_http(service):
    url, auth = service["url"] + "/v1/anomaly", service["auth"]
    r = requests.post(
        url, data=b"hello", headers={**auth, "Content-Type": "text/plain"}, timeout=30
    )
    assert r.status_code == 415
    r = requests.post(
        url, data=b"\x89PNG\r\n\x1a\nxx", headers={**auth, "Content-Type": "image/png"}, timeout=30
    )
    assert r.status_code == 422 and "not a readable PNG" in r.json()["detail"]
    big = b"\x89PNG\r\n\x1a\n" + b"\0" * (5 * 2**20)
    r = requests.post(url, data=big, headers={**auth, "Content-Type": "image/png"}, timeout=30)
    assert r.status_code == 413


@pytest.mark.slow
def test_promotion_under_load_then_rollback(service):
    cfg = service["cfg"]
    stop = threading.Event()
    results: list[tuple[int, str | None]] = []

    def client(i: int) -> None:
        name = f"s{i % N_IMAGES}.png"
        while not stop.is_set():
            r = ask(service, name, seed=7)
            results.append((r.status_code, r.headers.get("X-Model-Version")))

    def wait_for(version: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if results and results[-1][1] == version:
                return
            time.sleep(0.2)
        raise AssertionError(f"service never answered with version {version}: {results[-5:]}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        assert promote(NAME, "2", "production", cfg.tracking) == "1"
        wait_for("2")
        time.sleep(2)
        assert rollback(NAME, "production", cfg.tracking) == ("2", "1")
        wait_for("1")
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    codes = {c for c, _ in results}
    versions = [v for _, v in results]
    assert codes == {200}, f"non-2xx during promotion: {codes}"
    assert "2" in versions and versions[-1] == "1"
    first2, last2 = versions.index("2"), len(versions) - 1 - versions[::-1].index("2")
    assert set(versions[first2 : last2 + 1]) <= {"1", "2"}


@pytest.mark.slow
def test_overload_gives_503_not_5xx(service):
    def one(i: int) -> requests.Response:
        return ask(service, f"s{i % N_IMAGES}.png", seed=i)

    with ThreadPoolExecutor(40) as pool:
        answers = list(pool.map(one, range(40)))
    codes = [r.status_code for r in answers]
    assert 503 in codes and 200 in codes, codes
    assert set(codes) <= {200, 503}, codes
    assert all(r.headers.get("Retry-After") for r in answers if r.status_code == 503)
