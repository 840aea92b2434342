"""The synthesis service's HTTP layer over a real tiny pipeline, without Ray."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from meddiff.config import load_config
from meddiff.prompts import PromptRow, write_prompt_table
from meddiff.serving import auth
from meddiff.serving.api import LocalBackend, ServiceOptions, build_synthesis_app
from meddiff.serving.runners import SynthesisRunner
from meddiff.serving.schemas import SEED_MAX
from meddiff.synthesis import components as C

TOKEN = "s" * 32
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROWS = [
    PromptRow("Histology image of cancer tissue", 1, 0, 4),
    PromptRow("healthy tissue", 0, 1, 2),
]


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    cfg = load_config("tiny", overrides=["synthesis.model.arch.vae_warmup_steps=0",
                                         "synthesis.generate.steps=2"])  # fmt: skip
    comp = C.build_components(cfg.synthesis.model, [r.prompt for r in ROWS], seed=0)
    model = C.save_pipeline(comp, tmp_path_factory.mktemp("sd") / "model")
    write_prompt_table(model / "prompts.csv", ROWS)
    return SynthesisRunner(str(model), cfg)


@pytest.fixture(scope="module")
def client(runner, tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    (root / "token").write_text(TOKEN)
    opts = ServiceOptions(auth.Credentials(root / "token", root / "none.yaml"), 64 * 1024)
    return TestClient(build_synthesis_app(LocalBackend(runner), opts, max_images=3))


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def test_prompts_and_generation_match_the_runner(client, runner):
    listed = client.get("/v1/synthesis/prompts", headers=AUTH).json()["prompts"]
    assert [p["prompt"] for p in listed] == [r.prompt for r in ROWS]
    r = client.post(
        "/v1/synthesis", json={"label": 0, "cluster": 1, "n": 2, "seed": 5}, headers=AUTH
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["prompt"] == "healthy tissue" and [i["seed"] for i in body["images"]] == [5, 6]
    direct = runner.run(["healthy tissue"], [6])[0]
    np.testing.assert_array_equal(decode(body["images"][1]["png"]), direct)
    assert direct.shape == (96, 96, 3)


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [({"prompt": "x", "n": 4}, "n: over"), ({"prompt": "tissue " * 30}, "tokens"),
     ({"label": 1}, "prompt: required"), ({"label": 1, "cluster": 7}, "no such prompt"),
     ({"prompt": "x", "label": 1, "cluster": 0}, "not both"), ({"prompt": "x", "n": 0}, "n"),
     ({"prompt": "x", "steps": 3}, "steps"), ({"prompt": "x", "seed": -1}, "seed")],
)  # fmt: skip
def test_bad_requests_are_422_naming_the_field(client, payload, fragment):
    r = client.post("/v1/synthesis", json=payload, headers=AUTH)
    assert r.status_code == 422, r.text
    assert fragment in str(r.json()["detail"])


def test_token_required(client):
    assert client.post("/v1/synthesis", json={"prompt": "x"}).status_code == 401
    assert client.get("/v1/synthesis/prompts").status_code == 401
    assert client.get("/").status_code == 200


@pytest.mark.parametrize(
    "raw",
    ['{"prompt": "x", "seed": NaN}', '{"prompt": "x", "n": Infinity}',
     '{"prompt": "x", "seed": 1e400}', '{"prompt": NaN}', '{"prompt": "x", "seed": -Infinity}',
     '{"prompt": "x", "seed": 1' + "0" * 5000 + "}", "[1, 2", '{"prompt": "x", "n": 1.5}'],
)  # fmt: skip
def test_non_finite_or_broken_json_is_422_never_500(client, raw):
    r = client.post(
        "/v1/synthesis", content=raw, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert r.status_code == 422, r.text
    assert "0" * 100 not in r.text


def test_errors_name_the_field_without_echoing_it(client):
    long = "tissue " * 5000  # 35 kB: under the body cap, over the field's limit
    r = client.post("/v1/synthesis", json={"prompt": long}, headers=AUTH)
    assert r.status_code == 422 and "prompt" in r.text and len(r.text) < 1000
    assert "tissue tissue" not in r.text
    r = client.post("/v1/synthesis", json={"prompt": "x", "stepz": "secret-value"}, headers=AUTH)
    assert r.status_code == 422 and "stepz" in r.text and "secret-value" not in r.text


def test_chunked_or_unauthenticated_bodies_are_refused_unread(client):
    def chunks():
        for _ in range(400):  # "400 MiB" of JSON, never read: 401 / 413 first
            yield b" " * (1 << 20)

    r = client.post("/v1/synthesis", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 401
    r = client.post("/v1/synthesis", content=chunks(),
                    headers={**AUTH, "Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == 413


def test_one_seed_range_everywhere(client):
    """Image i gets seed + i, so seed + n - 1 must be a seed `?seed=` accepts too."""
    ok = client.post("/v1/synthesis", json={"label": 0, "cluster": 1, "seed": SEED_MAX},
                     headers=AUTH)  # fmt: skip
    assert ok.status_code == 200 and ok.json()["images"][0]["seed"] == SEED_MAX
    r = client.post("/v1/synthesis", json={"label": 0, "cluster": 1, "seed": SEED_MAX, "n": 2},
                    headers=AUTH)  # fmt: skip
    assert r.status_code == 422 and "seed + n - 1" in r.text
