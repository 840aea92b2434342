"""What an operator relies on, without Ray: the token and body caps before any body is read,
no 500 on hostile input, named credentials (rotate, revoke, audit), offline docs, the bearer
scheme, metrics, readiness, drain, the retry of a call whose replica died, and the model
replica's registry state and canary arms."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import urllib.request

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from meddiff.data.images import encode_png
from meddiff.serving import auth
from meddiff.serving.api import (
    IngressState,
    ServiceOptions,
    Unavailable,
    build_anomaly_app,
)
from meddiff.serving.metrics import Metrics, Recorder, serve_metrics

SIZE = 8
TOKEN = "k" * 32


class FakeBackend:
    """Answers like a model deployment (a zero map, a fixed version), or fails as told."""

    def __init__(self, version="7", fail=None, info_delay=0.0, problem=None):
        self.version, self.fail, self.info_delay, self.problem = version, fail, info_delay, problem

    async def info(self):
        await asyncio.sleep(self.info_delay)
        return {"kind": "anomaly", "ref": "models:/m@production", "uri": "models:/m/7",
                "version": self.version, "plan": {"image_size": SIZE}, "problem": self.problem}  # fmt: skip

    async def detect(self, image, seed, u=0.0):
        if self.fail is not None:
            raise self.fail
        z = np.zeros((SIZE, SIZE), np.float32)
        return {"score": 0.25, "anomaly_map": z, "reconstruction": z, "seed": seed,
                "model": await self.info(), "canary": False}  # fmt: skip


def make(tmp_path, backend=None, **kw):
    (tmp_path / "token").write_text(TOKEN)
    metrics = Metrics("anomaly")
    opts = ServiceOptions(
        credentials=auth.Credentials(tmp_path / "token", tmp_path / "creds.yaml"),
        recorder=Recorder(metrics),
        **{"max_body_bytes": 4096, **kw},
    )
    app = build_anomaly_app(backend or FakeBackend(), opts, SIZE)
    return app, opts, metrics


def slice_png() -> bytes:
    return encode_png(np.random.default_rng(0).random((SIZE, SIZE)).astype(np.float32), bits=8)


def call(app, path, headers, chunks, max_pulls=None):
    """Drive the ASGI app directly; ``chunks`` is an iterator of body chunks. Returns (status,
    body, how many chunks the app pulled)."""
    pulled, sent = [0], {"status": None, "body": b""}

    async def receive():
        pulled[0] += 1
        chunk = next(chunks, None)
        return {"type": "http.request", "body": chunk or b"", "more_body": chunk is not None}

    async def send(message):
        if message["type"] == "http.response.start":
            sent["status"] = message["status"]
        elif message["type"] == "http.response.body":
            sent["body"] += message.get("body", b"")

    scope = {"type": "http", "method": "POST", "path": path, "root_path": "", "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "http_version": "1.1", "scheme": "http", "server": ("t", 80), "client": ("c", 1)}  # fmt: skip
    asyncio.run(app(scope, receive, send))
    return sent["status"], sent["body"], pulled[0]


def endless(size=1 << 20):
    while True:
        yield b"{" * size


def test_no_token_is_401_before_any_body_is_read(tmp_path):
    app, _, _ = make(tmp_path)
    for path in ("/v1/anomaly", "/v1/models", "/v1/nope"):
        status, _, pulled = call(app, path, {"content-type": "image/png"}, endless())
        assert (status, pulled) == (401, 0), path


def test_declared_and_chunked_bodies_over_the_cap_are_413_unread(tmp_path):
    app, _, _ = make(tmp_path)
    auth_h = {"authorization": f"Bearer {TOKEN}", "content-type": "image/png"}
    status, _, pulled = call(app, "/v1/anomaly", {**auth_h, "content-length": str(400 << 20)},
                             endless())  # fmt: skip
    assert (status, pulled) == (413, 0)
    # A chunked body (no Content-Length) of "400 MiB": refused after the first MiB chunk.
    status, body, pulled = call(app, "/v1/anomaly", auth_h, endless())
    assert status == 413 and pulled == 1, (status, pulled)
    assert b"exceeds 4096 bytes" in body


def test_hostile_numbers_and_reprs_are_422_not_500(tmp_path):
    app, _, _ = make(tmp_path)
    c = TestClient(app)
    h = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "image/png"}
    for seed in ("NaN", "Infinity", "1e400", "-1", str(2**31), "x" * 5000):
        r = c.post("/v1/anomaly", content=slice_png(), headers=h, params={"seed": seed})
        assert r.status_code == 422, seed
        assert "x" * 100 not in r.text and "seed" in r.text
    r = c.post("/v1/anomaly", content=b"\x89PNG\r\n\x1a\n", headers=h)
    assert r.status_code == 422 and "object at 0x" not in r.text, r.text


def test_named_tokens_rotate_and_revoke_without_restart(tmp_path, caplog):
    app, opts, _ = make(tmp_path)
    opts.credentials.check_every_s = 0  # re-read at every request (1 s when deployed)
    c = TestClient(app)
    cred, tokens = tmp_path / "creds.yaml", tmp_path / "tokens"
    path = auth.set_token("alice", cred, tokens)
    alice = path.read_text().strip()
    assert path.stat().st_mode & 0o777 == 0o600 and alice not in cred.read_text()

    def models(token):
        return c.get("/v1/models", headers={"Authorization": f"bearer {token}"}).status_code

    with caplog.at_level(logging.INFO, logger="meddiff.serving.audit"):
        assert models(alice) == 200 and models(TOKEN) == 200
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name.endswith("audit")]
    assert [x["token"] for x in lines] == ["alice", "default"]
    assert lines[0]["route"] == "/v1/models" and lines[0]["status"] == 200
    assert lines[0]["model_version"] == "7" and lines[0]["request_id"]
    assert all(alice not in r.getMessage() for r in caplog.records)
    auth.set_token("alice", cred, tokens, rotate=True)
    assert models(alice) == 401 and models(path.read_text().strip()) == 200
    auth.revoke("alice", cred)
    assert models(path.read_text().strip()) == 401 and models(TOKEN) == 200
    assert auth.parse_credentials(cred.read_text(), "c") == {}  # the last name revoked
    cred.write_text("alice: not-a-hash\n")  # a broken file lets none of its names in
    assert models(path.read_text().strip()) == 401 and models(TOKEN) == 200


def test_credentials_are_refused_when_malformed_or_absent(tmp_path, monkeypatch):
    from meddiff.errors import ConfigError

    monkeypatch.delenv(auth.ENV, raising=False)
    with pytest.raises(ConfigError, match="no serve token"):
        auth.Credentials(tmp_path / "none", tmp_path / "none.yaml")
    (tmp_path / "c.yaml").write_text("bob: sha256:1234\n")
    with pytest.raises(ConfigError, match="'bob' is not sha256") as err:
        auth.Credentials(tmp_path / "none", tmp_path / "c.yaml")
    assert "1234" not in str(err.value)
    monkeypatch.setenv(auth.ENV, "short")
    with pytest.raises(ConfigError, match="shorter than 16"):
        auth.Credentials(tmp_path / "none", tmp_path / "none.yaml")


def test_ensure_token_never_returns_the_token(tmp_path, monkeypatch):
    monkeypatch.delenv(auth.ENV, raising=False)
    monkeypatch.delenv(auth.CREDENTIALS_ENV, raising=False)
    where = auth.ensure_token(tmp_path / "tok", tmp_path / "creds.yaml")
    token = (tmp_path / "tok").read_text().strip()
    assert where == str(tmp_path / "tok") and token not in where and len(token) >= 32
    assert (tmp_path / "tok").stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv(auth.ENV, "e" * 20)
    assert auth.ensure_token(tmp_path / "tok").startswith(f"${auth.ENV}")


def test_openapi_declares_bearer_and_docs_are_offline(tmp_path):
    c = TestClient(make(tmp_path)[0])
    schema = c.get("/openapi.json").json()
    (scheme,) = schema["components"]["securitySchemes"].values()
    assert scheme == {**scheme, "type": "http", "scheme": "bearer"}
    assert schema["paths"]["/v1/anomaly"]["post"]["security"]
    assert "security" not in schema["paths"]["/healthz"]["get"]
    page = c.get("/docs").text
    assert "http://" not in page and "https://" not in page.replace("https://swagger.io", "")
    for asset in ("/docs-static/swagger-ui-bundle.js", "/docs-static/swagger-ui.css"):
        assert asset in page
        r = c.get(asset)
        assert r.status_code == 200 and len(r.content) > 100_000


def test_metrics_per_route_status_version_and_scrape(tmp_path):
    app, _, metrics = make(tmp_path)
    c = TestClient(app)
    h = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "image/png"}
    assert (
        c.post("/v1/anomaly", content=slice_png(), headers=h, params={"seed": 3}).status_code == 200
    )
    c.post("/v1/anomaly", content=slice_png(), headers={"Content-Type": "image/png"})
    metrics.apply([("batch", "7", 3), ("queue", "r1", 2), ("event", "swap", "7"),
                   ("in_registry", "r1", False)])  # fmt: skip
    port = serve_metrics(metrics, "127.0.0.1", 0)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert ('meddiff_serve_requests_total{model_version="7",route="/v1/anomaly",'
            'service="anomaly",status="200"} 1.0') in text  # fmt: skip
    assert 'route="/v1/anomaly",service="anomaly",status="401"} 1.0' in text
    assert 'meddiff_serve_anomaly_score_count{model_version="7"} 1.0' in text
    assert 'meddiff_serve_request_duration_seconds_count{route="/v1/anomaly"' in text
    assert 'meddiff_serve_batch_size_sum{model_version="7",service="anomaly"} 3.0' in text
    assert 'meddiff_serve_queue_depth{replica="r1",service="anomaly"} 2.0' in text
    assert 'meddiff_serve_model_in_registry{replica="r1",service="anomaly"} 0.0' in text
    # A taken port falls back to a free one instead of failing the replica.
    assert serve_metrics(metrics, "127.0.0.1", port) not in (port, 0)


def test_readiness_times_out_and_reports_registry_problems(tmp_path):
    slow = TestClient(make(tmp_path, FakeBackend(info_delay=5), ready_timeout_s=0.2)[0])
    r = slow.get("/readyz")
    assert r.status_code == 503 and "within 0.2 s" in r.json()["detail"]
    gone = FakeBackend(problem="version 7 of m was deleted from the registry")
    r = TestClient(make(tmp_path, gone)[0]).get("/readyz")
    assert r.status_code == 503 and "deleted" in r.json()["detail"]
    assert TestClient(make(tmp_path)[0]).get("/readyz").json()["version"] == "7"


def test_draining_answers_503_with_retry_after(tmp_path):
    state = IngressState()
    c = TestClient(make(tmp_path, state=state, retry_after_s=3)[0])
    h = {"Authorization": f"Bearer {TOKEN}"}
    assert c.get("/v1/models", headers=h).status_code == 200
    state.draining = True
    r = c.get("/v1/models", headers=h)
    assert r.status_code == 503 and r.headers["Retry-After"] == "3"
    assert r.headers["Connection"] == "close"
    assert c.get("/readyz").status_code == 503 and c.get("/healthz").status_code == 200
    assert state.inflight == 0


def test_dead_replica_is_503_with_retry_after(tmp_path):
    c = TestClient(make(tmp_path, FakeBackend(fail=Unavailable("the retry failed too")))[0])
    h = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "image/png"}
    r = c.post("/v1/anomaly", content=slice_png(), headers=h)
    assert r.status_code == 503 and r.headers["Retry-After"] == "2"


class FakeResponse:
    def __init__(self, outcome):
        self.outcome = outcome
        self.cancelled = False

    def __await__(self):
        async def run():
            if isinstance(self.outcome, BaseException):
                raise self.outcome
            return self.outcome

        return run().__await__()

    def cancel(self):
        self.cancelled = True


class FakeHandle:
    """A deployment handle whose calls meet the given outcomes in turn."""

    def __init__(self, outcomes):
        self.outcomes, self.calls = list(outcomes), 0

    def __getattr__(self, method):
        handle = self

        class Method:
            def remote(self, *args):
                handle.calls += 1
                return FakeResponse(handle.outcomes.pop(0))

        return Method()


def test_a_call_whose_replica_died_is_retried_once():
    from ray.exceptions import ActorDiedError

    from meddiff.serving.deployments import HandleBackend

    handle = FakeHandle([ActorDiedError(), {"ok": 1}])
    assert asyncio.run(HandleBackend(handle).info()) == {"ok": 1} and handle.calls == 2
    handle = FakeHandle([ActorDiedError(), ActorDiedError()])
    with pytest.raises(Unavailable, match="retry failed too"):
        asyncio.run(HandleBackend(handle).info())
    assert handle.calls == 2
    handle = FakeHandle([ValueError("a bug")])
    with pytest.raises(ValueError):
        asyncio.run(HandleBackend(handle).info())
    assert handle.calls == 1  # only a dead replica is retried


def test_canary_arms_split_by_the_draw():
    from types import SimpleNamespace

    from meddiff.serving.deployments import _ModelHolder

    h = _ModelHolder.__new__(_ModelHolder)
    h.runner, h.candidate, h.canary_percent = "stable", None, 0.0
    assert h._arms([0.1, 0.9]) == [("stable", [0, 1])]
    h.candidate, h.canary_percent = SimpleNamespace(), 25.0
    assert h._arms([0.1, 0.9, 0.24, 0.25]) == [("stable", [1, 3]), (h.candidate, [0, 2])]
    h.canary_percent = 100.0
    assert h._arms([0.99]) == [(h.candidate, [0])]


def test_png_helpers_keep_messages_clean():
    from meddiff.serving.api import clean

    buf = io.BytesIO()
    Image.new("L", (2, 2)).save(buf, format="PNG")
    assert clean(f"cannot identify image file {io.BytesIO()!r}") == (
        "cannot identify image file <object>"
    )
    assert len(clean("x" * 10_000)) == 400


def test_replica_follows_the_registry_and_says_when_its_version_is_gone(tmp_path):
    """The model replica's registry loop on a real registry and real (tiny) THOR models: a
    canary is loaded beside the alias's version and dropped; a served version deleted from the
    registry makes it not ready (problem, metric, event); a new promotion is followed."""
    import mlflow
    import torch

    from meddiff.config import load_config
    from meddiff.config.serving import ModelUserConfig
    from meddiff.config.thor import ScheduleConfig, UNetConfig
    from meddiff.serving.deployments import _ModelHolder
    from meddiff.thor.model import save_model
    from meddiff.thor.unet import DiffusionUNet
    from meddiff.tracking import register_model, start_run
    from meddiff.tracking.aliases import end_canary, promote, set_canary

    plan = ["thor.infer.stride=50", "thor.infer.noise_level=100",
            "thor.infer.harmonization_steps=[50]"]  # fmt: skip
    cfg = load_config("tiny", overrides=plan)
    unet = UNetConfig(image_size=16, channels=(8, 16), attention_levels=(False, False),
                      norm_groups=4, num_head_channels=8)  # fmt: skip
    torch.manual_seed(0)
    model = save_model(tmp_path / "m", DiffusionUNet(unet), unet, ScheduleConfig())
    for _ in range(3):
        with start_run(cfg, "test-holder"):
            register_model(model, "holder-test")
    promote("holder-test", "1", "production", cfg.tracking)

    class Holder(_ModelHolder):
        kind = "anomaly"

    h = Holder({"preset": "tiny", "set": plan})
    h.user = ModelUserConfig(model="models:/holder-test@production", refresh_s=1)

    async def scenario():
        await h._load(h.user.model)
        await h._check_registry()
        assert (h.runner.model.version, h.problem, h.candidate) == ("1", None, None)
        set_canary("holder-test", "2", 50, "production", cfg.tracking)
        await h._check_registry()
        assert h.candidate.model.version == "2" and h.canary_percent == 50
        assert (await h.info())["canary"] == {"version": "2", "percent": 50.0}
        end_canary("holder-test", "production", cfg.tracking)
        await h._check_registry()
        assert h.candidate is None
        mlflow.MlflowClient().delete_model_version("holder-test", "1")
        await h._check_registry()
        assert "version 1 of holder-test was deleted" in h.problem
        assert (await h.info())["problem"] == h.problem and h.runner.model.version == "1"
        promote("holder-test", "3", "production", cfg.tracking)
        await h._check_registry()
        assert (h.runner.model.version, h.problem) == ("3", None)

    asyncio.run(scenario())
    events = h.recorder.take()
    assert ("in_registry", "local", False) in events and ("in_registry", "local", True) in events
    kinds = [e[1] for e in events if e[0] == "event"]
    assert kinds == ["load", "canary_on", "canary_off", "registry_missing", "swap"]
