"""The anomaly service's HTTP layer over a real (small, untrained) THOR model, without Ray:
token, body cap, content types, PNG checks, seeds, and that the answer is the inferer's."""

from __future__ import annotations

import base64
import io
import zlib

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from meddiff import precision as amp
from meddiff.config import load_config
from meddiff.config.thor import ScheduleConfig, UNetConfig
from meddiff.data.images import decode_png, encode_png
from meddiff.serving import auth
from meddiff.serving.api import LocalBackend, ServiceOptions, build_anomaly_app
from meddiff.serving.runners import AnomalyRunner, content_seed
from meddiff.thor.model import save_model
from meddiff.thor.unet import DiffusionUNet

SIZE = 16
TOKEN = "t" * 32
AUTH = {"Authorization": f"Bearer {TOKEN}"}
UNET = UNetConfig(
    image_size=SIZE, channels=(8, 16), attention_levels=(False, False), norm_groups=4,
    num_head_channels=8,
)  # fmt: skip


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> AnomalyRunner:
    torch.manual_seed(0)
    model = save_model(
        tmp_path_factory.mktemp("thor") / "model", DiffusionUNet(UNET), UNET, ScheduleConfig()
    )
    cfg = load_config(
        "tiny", overrides=["thor.infer.stride=50", "thor.infer.noise_level=100",
                           "thor.infer.harmonization_steps=[50]"],
    )  # fmt: skip
    return AnomalyRunner(str(model), cfg)


def options(root, **kw) -> ServiceOptions:
    """Options whose one token (name 'default') is TOKEN, in a token file under ``root``."""
    (root / "token").write_text(TOKEN + "\n")
    creds = auth.Credentials(root / "token", root / "no-credentials.yaml")
    return ServiceOptions(credentials=creds, **kw)


@pytest.fixture(scope="module")
def client(runner, tmp_path_factory) -> TestClient:
    opts = options(tmp_path_factory.mktemp("tok"), max_body_bytes=20_000)
    return TestClient(build_anomaly_app(LocalBackend(runner), opts, SIZE))


def png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def slice_png(seed: int = 0, bits: int = 8) -> bytes:
    rng = np.random.default_rng(seed)
    return encode_png(rng.random((SIZE, SIZE)).astype(np.float32), bits=bits)


def post(client, body: bytes, ctype: str = "image/png", headers=None, **params):
    h = {**AUTH, "Content-Type": ctype, **(headers or {})}
    return client.post("/v1/anomaly", content=body, headers=h, params=params)


def test_answer_is_the_inferers_for_the_same_seed(client, runner):
    body = slice_png(1, bits=16)
    r = post(client, body, seed=123)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["seed"] == 123
    image = decode_png(body, size=SIZE)
    (direct,) = runner.run([image], [123])
    amap = decode_png(base64.b64decode(out["anomaly_map_png"]))
    np.testing.assert_allclose(amap, np.round(direct.anomaly_map * 65535) / 65535, atol=1e-6)
    assert out["score"] == pytest.approx(direct.score, abs=1e-7)
    assert out["reconstruction_png"] is not None
    assert out["model"]["kind"] == "anomaly" and out["model"]["plan"]["method"] == "thor"
    # The tiny preset's perceptual term, LPIPS over HED's VGG16, named in the answer.
    assert out["model"]["plan"]["map_kind"] == "residual_x_lpips_vgg16_hed"
    # ... and the networks' precision, as meddiff.precision resolves auto on this machine's CPU.
    assert out["model"]["plan"]["precision"] == amp.resolve("auto", "cpu", "thor-inference")
    assert r.headers["X-Model-Version"] == "None"  # a directory has no registry version


def test_seed_from_content_is_stable_and_batch_independent(client, runner):
    a, b = slice_png(2), slice_png(3)
    first = post(client, a).json()
    assert first["seed"] == content_seed(decode_png(a, size=SIZE))
    assert post(client, a).json()["anomaly_map_png"] == first["anomaly_map_png"]
    # The same image inside a batch of two gets the same map as alone.
    imgs = [decode_png(b, size=SIZE), decode_png(a, size=SIZE)]
    batched = runner.run(imgs, [content_seed(i) for i in imgs])[1]
    alone = decode_png(base64.b64decode(first["anomaly_map_png"]))
    # docs/serving.md, "Seeds": the noise never depends on the batch, the arithmetic may, by at
    # most one 16-bit step in a few pixels.
    diff = np.abs(np.round(batched.anomaly_map * 65535) / 65535 - alone)
    assert diff.max() <= 1.0001 / 65535 and np.mean(diff > 1e-7) < 0.01


def test_accept_png_returns_the_map_with_score_header(client):
    r = post(client, slice_png(4), headers={"Accept": "image/png"}, seed=5)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    amap = decode_png(r.content)
    assert amap.shape == (SIZE, SIZE)
    assert float(r.headers["X-Anomaly-Score"]) == pytest.approx(amap.mean(), abs=1e-4)


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
     {"Authorization": TOKEN}],
)  # fmt: skip
def test_v1_needs_the_token(client, headers):
    for method, path in [("post", "/v1/anomaly"), ("get", "/v1/models")]:
        r = getattr(client, method)(path, headers=headers)
        assert r.status_code == 401, (path, headers)
        assert r.headers["WWW-Authenticate"] == "Bearer"


def test_open_routes(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "v1/anomaly" in page.text
    schema = client.get("/openapi.json").json()
    assert "image/png" in schema["paths"]["/v1/anomaly"]["post"]["requestBody"]["content"]


def test_models_route(client):
    r = client.get("/v1/models", headers=AUTH)
    (m,) = r.json()["models"]
    assert m["kind"] == "anomaly" and m["plan"]["forwards_per_image"] > 0


def test_body_cap_is_413(client):
    big = png(np.zeros((SIZE, SIZE), np.uint8)) + b"\0" * 30_000
    assert post(client, big).status_code == 413


@pytest.mark.parametrize("ctype", ["image/jpeg", "text/plain", "application/json", ""])
def test_wrong_content_type_is_415(client, ctype):
    assert post(client, slice_png(), ctype=ctype).status_code == 415


def test_jpeg_bytes_labelled_png_is_415(client):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(buf, format="JPEG")
    assert post(client, buf.getvalue()).status_code == 415


def test_bad_pngs_are_422_naming_the_problem(client):
    rgb = post(client, png(np.zeros((SIZE, SIZE, 3), np.uint8)))
    assert rgb.status_code == 422 and "3 channels" in rgb.json()["detail"]
    wrong = post(client, png(np.zeros((SIZE * 2, SIZE), np.uint8)))
    assert wrong.status_code == 422 and f"expected {SIZE}x{SIZE}" in wrong.json()["detail"]
    good = slice_png()
    truncated = post(client, good[: len(good) // 2])
    assert truncated.status_code == 422 and "not a readable PNG" in truncated.json()["detail"]
    assert post(client, b"").status_code == 422
    assert post(client, slice_png(), seed=-1).status_code == 422
    assert post(client, slice_png(), seed=2**31).status_code == 422


def bomb_png(side: int) -> bytes:
    """A valid PNG header declaring side×side 8-bit gray, with a tiny compressed body."""
    import struct

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    row = b"\0" * (side + 1)
    body = zlib.compress(row * 64, 9)  # only a few rows: decoding would need side² bytes
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_before_decoding(client):
    huge = post(client, bomb_png(60_000))  # over Pillow's limit: refused from the header
    assert huge.status_code == 422 and "decompression bomb" in huge.json()["detail"]
    big = post(client, bomb_png(12_000))  # under it: refused by size, never decoded
    assert big.status_code == 422 and "expected 16x16" in big.json()["detail"]


def test_a_promotion_to_another_image_size_is_followed(runner, tmp_path):
    """The app starts believing the model takes 8 px slices (as if a 16 px model was promoted
    since): a 16 px slice is judged again with the backend's size, and an 8 px one is refused."""
    app = build_anomaly_app(
        LocalBackend(runner), options(tmp_path, max_body_bytes=20_000), SIZE // 2
    )
    client = TestClient(app)
    assert post(client, slice_png(2), seed=1).status_code == 200
    small = encode_png(np.zeros((SIZE // 2, SIZE // 2), np.float32), bits=8)
    r = post(client, small, seed=1)
    assert r.status_code == 422 and f"expected {SIZE}x{SIZE}" in r.json()["detail"]
