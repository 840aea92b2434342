"""The anomaly service's DICOM side over a real (small, untrained) THOR model, without Ray: one
DICOM slice in, JSON or a DICOM SEG out by ``Accept``; bad DICOM as one 4xx line; the series
route's reference checks, its slice cap and a PACS that is down; the OpenAPI schema."""

from __future__ import annotations

import base64
import copy
import io
import socket

import numpy as np
import pydicom
import pytest
import torch
from fastapi.testclient import TestClient
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLossless

from meddiff.config import load_config
from meddiff.config.dicom import DicomConfig
from meddiff.config.thor import ScheduleConfig, UNetConfig
from meddiff.data import dicom_results, dicomweb
from meddiff.data.images import decode_png, encode_png
from meddiff.data.volume_samples import mr_series
from meddiff.serving import auth, clinical
from meddiff.serving.api import LocalBackend, ServiceOptions, build_anomaly_app
from meddiff.serving.runners import AnomalyRunner
from meddiff.thor.model import save_model
from meddiff.thor.unet import DiffusionUNet
from meddiff.thor.volumes import volume_map
from volume_helpers import brain

SIZE = 16
THRESHOLD = 0.3
TOKEN = "d" * 32
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DICOM = "application/dicom"
UNET = UNetConfig(
    image_size=SIZE, channels=(8, 16), attention_levels=(False, False), norm_groups=4,
    num_head_channels=8,
)  # fmt: skip
PLAN = ["thor.infer.stride=50", "thor.infer.noise_level=100", "thor.infer.harmonization_steps=[50]"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save_model(
        tmp_path_factory.mktemp("thor") / "model", DiffusionUNet(UNET), UNET, ScheduleConfig()
    )


@pytest.fixture(scope="module")
def runner(model_dir) -> AnomalyRunner:
    cfg = load_config("tiny", overrides=[*PLAN, f"data.dicom.seg_threshold={THRESHOLD}"])
    return AnomalyRunner(str(model_dir), cfg)


def app_for(backend, root, max_body_bytes=200_000, **settings) -> TestClient:
    (root / "token").write_text(TOKEN + "\n")
    creds = auth.Credentials(root / "token", root / "no-credentials.yaml")
    opts = ServiceOptions(credentials=creds, max_body_bytes=max_body_bytes)
    return TestClient(
        build_anomaly_app(backend, opts, SIZE, settings=clinical.Settings(**settings)),
        raise_server_exceptions=False,
    )


@pytest.fixture(scope="module")
def client(runner, tmp_path_factory) -> TestClient:
    return app_for(LocalBackend(runner), tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def series() -> list[pydicom.Dataset]:
    """An oblique (20° about the head-foot axis) axial MR series of the bundled brain."""
    return mr_series(brain((4.0, 4.5, 6.0), flip=(True, False, False), degrees=20.0))


def part10(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def post(client, body: bytes, ctype: str = DICOM, accept: str | None = None, **params):
    headers = {**AUTH, "Content-Type": ctype, **({"Accept": accept} if accept else {})}
    return client.post("/v1/anomaly", content=body, headers=headers, params=params)


def cut(runner, body: bytes) -> clinical.Instance:
    """The slice the service cuts from ``body`` (what the model sees)."""
    return clinical.prepare_instance(
        body, runner.cfg.data.mri.model_copy(update={"image_size": SIZE})
    )


def middle(series) -> pydicom.Dataset:
    return series[len(series) // 2]


def test_a_dicom_slice_answers_json_as_the_runner_on_its_cut_slice(client, runner, series):
    body = part10(middle(series))
    r = post(client, body, seed=7)
    assert r.status_code == 200, r.text
    out = r.json()
    inst = cut(runner, body)
    (want,) = runner.run([inst.image], [7])
    assert out["score"] == pytest.approx(want.score, rel=1e-6)
    got = decode_png(base64.b64decode(out["anomaly_map_png"]))
    assert got.shape == (SIZE, SIZE)
    assert np.abs(got - want.anomaly_map).max() <= 1 / 65535
    seen = decode_png(base64.b64decode(out["image_png"]))
    np.testing.assert_allclose(seen, inst.image, atol=1 / 65535)
    assert seen.max() > 0.5 and seen[0, 0] == 0  # a brain, in the window of data.mri
    assert out["model"]["seg_threshold"] == THRESHOLD and out["seed"] == 7
    assert r.headers["X-Seed"] == "7"


def test_accept_dicom_answers_a_seg_on_the_instance_referencing_it(client, runner, series):
    src = middle(series)
    body = part10(src)
    r = post(client, body, accept=DICOM, seed=3)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == DICOM and float(r.headers["X-Anomaly-Score"]) > 0
    seg = pydicom.dcmread(io.BytesIO(r.content))
    assert seg.Modality == "SEG" and (seg.Rows, seg.Columns) == (src.Rows, src.Columns)
    assert seg.FrameOfReferenceUID == src.FrameOfReferenceUID
    ref = seg.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == src.SeriesInstanceUID
    assert ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert seg.PatientName == src.PatientName  # the patient module the standard requires
    # The mask is the map above the model's threshold, put back on the instance's pixels.
    inst = cut(runner, body)
    (res,) = runner.run([inst.image], [3])
    amap = volume_map(inst.series.volume, res.anomaly_map[None], inst.geometry)
    want = inst.series.to_frames(amap)[0] > THRESHOLD
    got = dicom_results.seg_mask(seg, [src.SOPInstanceUID])[0]
    assert want.any() and np.array_equal(got, want)


def test_content_negotiation_and_its_refusals(client, series, tmp_path):
    png = encode_png(np.random.default_rng(0).random((SIZE, SIZE)).astype(np.float32), bits=8)
    r = post(client, png, ctype="image/png", accept=DICOM)
    assert r.status_code == 406 and "DICOM input" in r.json()["detail"]
    r = post(client, png, ctype="image/png", accept=f"{DICOM}, application/json;q=0.5", seed=1)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    r = post(client, part10(middle(series)), accept="image/png", seed=1)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert decode_png(r.content).shape == (SIZE, SIZE)
    r = post(client, part10(middle(series)), ctype="text/plain")
    assert r.status_code == 415
    assert r.json()["detail"] == (
        "Content-Type must be image/png or application/dicom, got 'text/plain'"
    )
    r = client.post("/v1/anomaly", content=part10(middle(series)), headers={"Content-Type": DICOM})
    assert r.status_code == 401
    small = app_for(LocalBackend(None), tmp_path, max_body_bytes=2048)
    assert post(small, part10(middle(series))).status_code == 413


def test_a_model_without_a_threshold_refuses_a_seg_but_answers_json(model_dir, series, tmp_path):
    runner = AnomalyRunner(str(model_dir), load_config("tiny", overrides=PLAN))
    client = app_for(LocalBackend(runner), tmp_path)
    body = part10(middle(series))
    r = post(client, body, accept=DICOM, seed=1)
    assert r.status_code == 406 and "no calibrated SEG threshold" in r.json()["detail"]
    assert post(client, body, seed=1).status_code == 200


def bad_dicom(series) -> dict[str, tuple[bytes, str]]:
    """Bodies that are not one analysable MR slice, with what the 422 must say."""
    src = middle(series)
    ct = copy.deepcopy(src)
    ct.Modality = "CT"
    jpeg = copy.deepcopy(src)
    jpeg.file_meta.TransferSyntaxUID = JPEGLossless
    jpeg.PixelData = encapsulate([b"\xff\xd8" + bytes(64) + b"\xff\xd9"])
    jpeg["PixelData"].VR = "OB"
    huge = copy.deepcopy(src)
    huge.Rows = huge.Columns = 8192
    sagittal = copy.deepcopy(src)
    sagittal.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    tilted = copy.deepcopy(src)
    tilted.ImageOrientationPatient = [1, 0, 0, 0, 1]
    (enhanced,) = mr_series(brain((8.0, 8.0, 8.0)), enhanced=True)
    whole = part10(src)
    return {
        "png": (encode_png(np.zeros((SIZE, SIZE), np.float32), 8), "not a DICOM Part 10 file"),
        "truncated": (whole[: len(whole) // 2], "body: "),
        "ct": (part10(ct), "body: Modality CT; this service's model analyses brain MR"),
        "jpeg-lossless": (part10(jpeg), "compressed as JPEG Lossless"),
        "bomb": (part10(huge), "8192x8192 pixels, more than the 4194304"),
        "sagittal": (part10(sagittal), "body: a sagittal slice"),
        "five-cosines": (part10(tilted), "Image Orientation (Patient) 6 finite numbers"),
        "enhanced": (part10(enhanced), "enhanced multi-frame instance (Enhanced MR Image Storage"),
        "empty": (b"", "body: empty"),
    }


def test_bad_dicom_is_one_422_line_naming_the_problem(client, series):
    for name, (body, says) in bad_dicom(series).items():
        r = post(client, body, seed=1)
        assert r.status_code == 422, (name, r.status_code, r.text)
        detail = r.json()["detail"]
        assert says in detail and "\n" not in detail, (name, detail)
    jpeg = bad_dicom(series)["jpeg-lossless"][0]
    assert "pylibjpeg-libjpeg" in post(client, jpeg).json()["detail"]


def series_post(client, body: dict | bytes):
    data = body if isinstance(body, bytes) else None
    return client.post("/v1/anomaly/series", content=data, json=None if data else body,
                       headers={**AUTH, **({"Content-Type": "application/json"})})  # fmt: skip


def test_the_series_route_takes_uids_of_the_configured_pacs_only(runner, tmp_path):
    bare = app_for(LocalBackend(runner), tmp_path)
    ok = {"study_uid": "1.2.3", "series_uid": "1.2.3.4"}
    assert series_post(bare, ok).status_code == 404  # no PACS configured: no such route
    assert "/v1/anomaly/series" not in bare.get("/openapi.json").json()["paths"]
    client = app_for(LocalBackend(runner), tmp_path, dicom=_pacs_at("http://127.0.0.1:9/x"))
    for bad in ({"study_uid": "1.2.3"}, {**ok, "series_uid": "../../admin"},
                {**ok, "url": "http://evil.example/dicom-web"}, {**ok, "study_uid": "1" * 65},
                {**ok, "seed": -1}):  # fmt: skip
        r = series_post(client, bad)
        assert r.status_code == 422, (bad, r.text)
        assert "evil" not in r.text
    assert series_post(client, b"{not json").status_code == 422


def _pacs_at(url: str, **kw) -> DicomConfig:
    return DicomConfig(url=url, retries=kw.pop("retries", 1), timeout_s=5, **kw)


def test_a_pacs_that_is_down_is_502_at_once_and_one_that_hangs_504(runner, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = app_for(LocalBackend(runner), tmp_path, dicom=_pacs_at(f"http://127.0.0.1:{port}/dw"))
    r = series_post(down, {"study_uid": "1.2.3", "series_uid": "1.2.3.4"})
    assert r.status_code == 502
    assert r.json()["detail"] == (
        f"series on http://127.0.0.1:{port}/dw: PACS not reachable after 1 attempts "
        "(connection refused)"
    )
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/dw"
        cfg = DicomConfig(url=url, retries=1, timeout_s=0.5)
        hangs = app_for(LocalBackend(runner), tmp_path, dicom=cfg)
        r = series_post(hangs, {"study_uid": "1.2.3", "series_uid": "1.2.3.4"})
    assert r.status_code == 504 and "timed out" in r.json()["detail"]


def test_a_series_over_the_slice_cap_is_413_before_any_pixel_moves(runner, tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(dicomweb, "count_instances", lambda loc, cfg, limit: limit + 1)
    monkeypatch.setattr(dicomweb, "retrieve_series", lambda *a: asked.append(a))
    client = app_for(LocalBackend(runner), tmp_path, dicom=_pacs_at("http://127.0.0.1:9/x"),
                     max_series_slices=20)  # fmt: skip
    r = series_post(client, {"study_uid": "1.2.3", "series_uid": "1.2.3.4"})
    assert r.status_code == 413 and "more than 20 instances" in r.json()["detail"]
    assert asked == []


def test_openapi_documents_png_and_dicom_and_the_series_route(runner, tmp_path):
    client = app_for(LocalBackend(runner), tmp_path, dicom=_pacs_at("http://127.0.0.1:9/x"))
    spec = client.get("/openapi.json").json()
    post_ = spec["paths"]["/v1/anomaly"]["post"]
    assert set(post_["requestBody"]["content"]) == {"image/png", DICOM}
    assert {"application/json", "image/png", DICOM} <= set(post_["responses"]["200"]["content"])
    assert "406" in post_["responses"]
    series = spec["paths"]["/v1/anomaly/series"]["post"]
    body = series["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["properties"]) == {"study_uid", "series_uid", "seed"}
    assert {"413", "422", "502", "504"} <= set(series["responses"])
