"""The anomaly service over real HTTP on the shared local Ray, deployed from the MLflow registry:
answers equal `meddiff thor detect`'s, batched or alone; every /v1 route needs the token;
promotion under load drops nothing and rollback switches back; overload answers 503.

One Serve application is shared by the module (a cold start costs 15-35 s here)."""

from __future__ import annotations

import base64
import copy
import io
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
from meddiff.prompts import PromptRow, write_prompt_table
from meddiff.serving.check import check_config, shipped_config
from meddiff.serving.launch import deploy, shutdown
from meddiff.synthesis import components as C
from meddiff.synthesis.generate import generate
from meddiff.thor.detect import detect_folder, image_seed
from meddiff.thor.model import save_model
from meddiff.thor.unet import DiffusionUNet
from meddiff.tracking import register_model, start_run
from meddiff.tracking.aliases import promote, rollback

NAME = "thor-serving-test"
SD_NAME = "sd-serving-test"
PLAN = ["thor.infer.stride=50", "thor.infer.draws=1"]
SD_PLAN = ["synthesis.model.arch.vae_warmup_steps=0", "synthesis.generate.images_per_prompt=2"]
N_IMAGES = 4
PROMPTS = [
    PromptRow("Histology image of cancer tissue, morphology type one", 1, 0, 5),
    PromptRow("Histology image of healthy tissue, morphology type two", 0, 1, 3),
]


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
    sd_cfg = load_config("tiny", overrides=[*SD_PLAN, f"tracking.uri={mlflow_store}"])
    sd = C.save_pipeline(
        C.build_components(sd_cfg.synthesis.model, [r.prompt for r in PROMPTS], seed=0),
        root / "sd",
    )
    write_prompt_table(sd / "prompts.csv", PROMPTS)
    with start_run(sd_cfg, "test-register"):
        register_model(sd, SD_NAME)
    promote(SD_NAME, "1", "production", sd_cfg.tracking)
    generate(sd_cfg, f"models:/{SD_NAME}/1", sd / "prompts.csv", root / "synthetic")

    data = yaml.safe_load(shipped_config("tiny").read_text())
    app = copy.deepcopy(data["applications"][0])
    app["args"] = {"preset": "tiny", "set": [*PLAN, f"tracking.uri={mlflow_store}"],
                   "token_file": str(root / "token")}  # fmt: skip
    model_dep = app["deployments"][0]
    # Batches of up to 4 (as tiny.yaml): the answers must not depend on them.
    model_dep["user_config"].update(
        model=f"models:/{NAME}@production", refresh_s=1, max_batch_size=4
    )
    model_dep.pop("autoscaling_config", None)
    model_dep.update(num_replicas=1, max_ongoing_requests=4, max_queued_requests=4)
    sd_app = data["applications"][1]
    sd_app["args"] = {"preset": "tiny", "set": [*SD_PLAN, f"tracking.uri={mlflow_store}"],
                      "token_file": str(root / "token"), "max_images": 4}  # fmt: skip
    sd_dep = sd_app["deployments"][0]
    sd_dep["user_config"].update(model=f"models:/{SD_NAME}@production")
    sd_dep.pop("autoscaling_config", None)
    sd_dep.update(num_replicas=1)
    data["applications"] = [app, sd_app]
    data["http_options"]["port"] = free_port()
    path = root / "serve.yaml"
    path.write_text(yaml.safe_dump(data))
    (root / "token").write_text("s3cret-token-for-tests-0123456789\n")
    entries = check_config(path)
    assert [e["version"] for e in entries] == ["1", "1"]
    urls = deploy(data)
    yield {
        "url": urls["anomaly"],
        "sd_url": urls["synthesis"],
        "synthetic": root / "synthetic",
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
    # Batched here or there: at most one 16-bit step in a few pixels (docs/serving.md, "Seeds").
    diff = np.abs(got - want)
    assert diff.max() <= 1.0001 / 65535 and np.mean(diff > 1e-7) < 0.01
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


def test_synthesis_equals_synth_generate(service):
    import h5py
    import pandas as pd
    from PIL import Image

    out = service["synthetic"]
    meta = pd.read_csv(out / "camelyonpatch_level_2_split_train_meta.csv")
    with h5py.File(out / "camelyonpatch_level_2_split_train_x.h5") as f:
        x = f["x"][:]
    auth = service["auth"]
    url = service["sd_url"]
    listed = requests.get(url + "/v1/synthesis/prompts", headers=auth, timeout=30).json()
    assert [p["prompt"] for p in listed["prompts"]] == [r.prompt for r in PROMPTS]
    # The first prompt's two images (seeds s, s+1) in one request of n=2.
    prompt, seed = meta["prompt"][0], int(meta["seed"][0])
    r = requests.post(
        url + "/v1/synthesis", json={"prompt": prompt, "n": 2, "seed": seed}, headers=auth,
        timeout=120,
    )  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert [im["seed"] for im in body["images"]] == [seed, seed + 1]
    assert body["model"]["version"] == "1" and r.headers["X-Model-Version"] == "1"
    for i, im in enumerate(body["images"]):
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(im["png"]))))
        assert got.shape == (96, 96, 3)
        np.testing.assert_array_equal(got, x[i])
    # label + cluster picks the same prompt.
    r2 = requests.post(
        url + "/v1/synthesis", json={"label": 1, "cluster": 0, "seed": seed}, headers=auth,
        timeout=120,
    )  # fmt: skip
    assert (
        r2.json()["prompt"] == prompt and r2.json()["images"][0]["png"] == body["images"][0]["png"]
    )


def test_synthesis_bad_input(service):
    url, auth = service["sd_url"] + "/v1/synthesis", service["auth"]
    assert requests.post(url, json={"prompt": "x"}, timeout=30).status_code == 401
    r = requests.post(url, json={"prompt": PROMPTS[0].prompt, "n": 5}, headers=auth, timeout=30)
    assert r.status_code == 422 and "n: over" in r.json()["detail"]
    r = requests.post(url, json={"prompt": "word " * 40}, headers=auth, timeout=30)
    assert r.status_code == 422 and "tokens" in r.json()["detail"]
    r = requests.post(url, json={"label": 1, "cluster": 9}, headers=auth, timeout=30)
    assert r.status_code == 422 and "no such prompt" in r.json()["detail"]
    r = requests.post(url, data="x", headers={**auth, "Content-Type": "text/plain"}, timeout=30)
    assert r.status_code in (415, 422)


def fuzz(url: str, auth: dict, examples: int = 25) -> int:
    """Schemathesis over the running service's OpenAPI schema: no 5xx, only documented status
    codes and content types, bodies that match the schema. Returns the number of cases sent."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    sent = 0
    for result in schema.get_all_operations():
        op = result.ok()

        @settings(max_examples=examples, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(case=op.as_strategy())
        def run(case):
            nonlocal sent
            sent += 1
            case.call_and_validate(base_url=url, headers=auth, checks=checks, timeout=120)

        run()
    return sent


@pytest.mark.slow
def test_fuzz_both_services_no_5xx_only_documented(service):
    assert fuzz(service["url"], service["auth"]) > 20
    assert fuzz(service["sd_url"], service["auth"], examples=10) > 10


class Chromium:
    """Debian's headless chromium driven over the DevTools protocol (no downloaded browser)."""

    def __init__(self, tmp: Path):
        import json
        import shutil
        import subprocess

        from websockets.sync.client import connect

        exe = shutil.which("chromium") or shutil.which("chromium-browser")
        if exe is None:
            pytest.skip("chromium is not installed (.ci/run installs Debian's chromium package)")
        port = free_port()
        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--remote-debugging-port={port}", f"--user-data-dir={tmp / 'profile'}",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            try:
                targets = requests.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json()
                page = next(t for t in targets if t["type"] == "page")
                break
            except (requests.ConnectionError, StopIteration):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=2**26)
        self.next_id = 0
        self.json = json

    def send(self, method: str, **params):
        self.next_id += 1
        self.ws.send(self.json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = self.json.loads(self.ws.recv(timeout=120))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def js(self, expression: str):
        out = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return out["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 180):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.25)
        error = self.js("document.getElementById('error').textContent")
        raise AssertionError(f"timed out waiting for {expression}; page error: {error}")

    def close(self):
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.mark.slow
def test_anomaly_page_in_a_real_browser(service, tmp_path):
    """Upload a slice through the page and see the overlay and the score the API gives."""
    name = "s2.png"
    api = ask(service, name).json()  # no seed: the page's request gets the same content seed
    browser = Chromium(tmp_path)
    try:
        browser.send("Page.enable")
        browser.send("Page.navigate", url=service["url"] + "/")
        browser.wait_for("document.readyState === 'complete' && !!document.getElementById('file')")
        token = service["auth"]["Authorization"].split()[1]
        browser.js(f"document.getElementById('token').value = {token!r}")
        root = browser.send("DOM.getDocument")["root"]["nodeId"]
        node = browser.send("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
        browser.send("DOM.setFileInputFiles", nodeId=node, files=[str(service["images"] / name)])
        browser.wait_for("document.body.dataset.state === 'done'")
        score = float(browser.js("document.getElementById('score').textContent"))
        assert score == pytest.approx(api["score"], abs=1e-5)
        # The overlay canvas holds the map: red where anomalous, its alpha the map's value.
        alpha = browser.js(
            "(() => { const c = document.getElementById('overlay');"
            " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            " let s = 0; for (let i = 3; i < d.length; i += 4) s += d[i]; return s / (d.length / 4); })()"
        )  # fmt: skip
        assert 0 < alpha / 255 < 1
        assert alpha / 255 == pytest.approx(api["score"], abs=0.05)
        assert browser.js("document.getElementById('reconstruction').naturalWidth") == 64
        assert "v1" in browser.js("document.getElementById('model').textContent")
        shot = browser.send("Page.captureScreenshot")["data"]
        (tmp_path / "anomaly_page.png").write_bytes(base64.b64decode(shot))
    finally:
        browser.close()


@pytest.mark.slow
def test_demo_serve_step_answers_over_http(service, tmp_path, capsys):
    """The demo's last step on this module's registered models (last here: it redeploys and
    shuts Serve down)."""
    from meddiff.demo.serve_step import serve_demo

    shutdown()
    out = serve_demo(
        service["cfg"], tmp_path / "serve", f"models:/{NAME}/2", f"models:/{SD_NAME}/1",
        service["images"] / "s0.png", PROMPTS[1].prompt,
    )  # fmt: skip
    assert out["anomaly"]["model"] == f"models:/{NAME}/2"
    assert 0 < out["anomaly"]["score"] < 1
    assert out["synthesis"]["seeds"] == [0, 1]
    assert all(Path(p).is_file() for p in out["synthesis"]["images"])
    assert decode_png((tmp_path / "serve" / "anomaly_map.png").read_bytes()).shape == (64, 64)
    printed = capsys.readouterr().out
    assert "POST /anomaly/v1/anomaly -> score" in printed and "2 patches" in printed
