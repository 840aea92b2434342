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
from meddiff.serving.schemas import SEED_MAX
from meddiff.serving.runners import SynthesisRunner
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
