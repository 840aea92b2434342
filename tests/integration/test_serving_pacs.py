"""The anomaly service speaks DICOM, over real HTTP on the shared local Ray, next to a real PACS
(Orthanc, tests/integration/pacs.py): ``POST /v1/anomaly/series`` names a series by its UIDs,
the service retrieves it from the PACS configured on the deployment, runs every slice on the
model deployment's batcher and stores the SEG and the map back, where they lie on the drawn
lesion; one DICOM slice answers a SEG referencing it; a series the PACS lacks is 422; neither the
audit lines nor the replicas' logs name the patient or the series.

The shipped THOR model, served from its folder, residual maps (LPIPS off, DDIM stride 50, one
draw: about a second a slice here) and a fixed SEG threshold (0.3: the residual maps have no
calibration shipped)."""

from __future__ import annotations

import copy
import io
import time
from pathlib import Path

import pacs
import pydicom
import pytest
import requests
import yaml

from meddiff.serving.check import shipped_config
from meddiff.serving.launch import deploy, shutdown
from meddiff.thor.shipped import SHIPPED_DIR
from volume_helpers import PLANTED_NAME

TOKEN = "pacs-serving-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
THRESHOLD = 0.3
PLAN = ["thor.infer.stride=50", "thor.infer.draws=1", "thor.infer.lpips=off",
        f"data.dicom.seg_threshold={THRESHOLD}"]  # fmt: skip


@pytest.fixture(scope="module")
def service(pacs_with_series, tmp_path_factory, mlflow_store):
    server = pacs_with_series[0]
    root = tmp_path_factory.mktemp("serving-pacs")
    (root / "token").write_text(TOKEN + "\n")
    data = yaml.safe_load(shipped_config("tiny").read_text())
    app = copy.deepcopy(data["applications"][0])
    app["args"].update(
        set=[*PLAN, f"data.dicom.url={server.http}/dicom-web", f"data.dicom.username={pacs.USER}",
             f"tracking.uri={mlflow_store}"],
        token_file=str(root / "token"), audit_log=str(root / "audit.jsonl"), metrics_port=0,
        max_series_slices=40,
    )  # fmt: skip
    # The PACS password reaches the ingress replica through its environment, as on a cluster.
    app["runtime_env"] = {"env_vars": {"MEDDIFF_DICOMWEB_PASSWORD": pacs.PASSWORD}}
    model = app["deployments"][0]
    model["user_config"].update(model=str(SHIPPED_DIR), max_batch_size=4)
    model.update(num_replicas=1)
    data["applications"] = [app]
    data["http_options"]["port"] = pacs.servers.free_port()
    urls = deploy(data, timeout_s=600)
    yield {"url": urls["anomaly"], "root": root}
    shutdown()


def test_a_series_on_the_pacs_gets_its_seg_and_map_stored_back_on_the_lesion(
    service, pacs_with_series
):
    server, series, vol, lesion = pacs_with_series
    study, uid = str(series[0].StudyInstanceUID), str(series[0].SeriesInstanceUID)
    r = requests.post(f"{service['url']}/v1/anomaly/series", headers=AUTH, timeout=300,
                      json={"study_uid": study, "series_uid": uid})  # fmt: skip
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["study_uid"] == study and out["series_uid"] == uid
    assert 5 <= out["slices"] <= len(series) and out["seg_threshold"] == THRESHOLD
    assert 0 < out["score"] <= out["max_slice_score"] and out["lesion_ml"] > 0
    assert out["model"]["uri"] == str(SHIPPED_DIR) and r.headers["X-Model-Version"]

    web = server.client()
    (seg,) = web.retrieve_series(study, out["seg"]["series_uid"])
    assert seg.Modality == "SEG" and seg.SOPInstanceUID == out["seg"]["sop_instance_uid"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    assert seg.FrameOfReferenceUID == series[0].FrameOfReferenceUID
    (pm,) = web.retrieve_series(study, out["parametric_map"]["series_uid"])
    assert pm.SOPInstanceUID == out["parametric_map"]["sop_instance_uid"]
    voxels = pacs.seg_voxels(seg, series, vol.data.shape)
    inside, elsewhere = voxels[lesion].mean(), voxels[(vol.data > 0) & ~lesion].mean()
    assert inside > 3 * elsewhere, (inside, elsewhere)

    private = (PLANTED_NAME, study, uid)
    audit = (service["root"] / "audit.jsonl").read_text()
    assert '"route": "/v1/anomaly/series"' in audit
    assert not [p for p in private if p in audit]
    for log in _serve_logs():
        text = log.read_text(errors="replace")
        assert not [p for p in private if p in text], log


def _serve_logs() -> list[Path]:
    """The log files of this Ray session's Serve replicas (ingress and model)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    found = [p for p in logs.glob("*.log") if "Anomaly" in p.name]
    assert found, logs
    return found


def test_one_dicom_slice_over_http_answers_a_seg_referencing_it(service, pacs_with_series):
    src = pacs_with_series[1][len(pacs_with_series[1]) // 2]
    buf = io.BytesIO()
    src.save_as(buf, enforce_file_format=True)
    r = requests.post(f"{service['url']}/v1/anomaly", data=buf.getvalue(), timeout=120,
                      headers={**AUTH, "Content-Type": "application/dicom",
                               "Accept": "application/dicom"})  # fmt: skip
    assert r.status_code == 200, r.text
    seg = pydicom.dcmread(io.BytesIO(r.content))
    ref = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
    assert seg.Modality == "SEG" and ref.ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert (seg.Rows, seg.Columns) == (src.Rows, src.Columns)


def test_a_series_the_pacs_lacks_is_422_naming_the_pacs_not_the_uids(service, pacs_with_series):
    server = pacs_with_series[0]
    r = requests.post(f"{service['url']}/v1/anomaly/series", headers=AUTH, timeout=120,
                      json={"study_uid": "1.2.3.999", "series_uid": "1.2.3.999.1"})  # fmt: skip
    assert r.status_code == 422
    assert r.json()["detail"] == (
        f"study_uid, series_uid: series on {server.http}/dicom-web: no such series on the PACS "
        "(no instances found)"
    )


def test_the_page_takes_a_dicom_file(service, pacs_with_series, tmp_path):
    """The page sends a .dcm file as application/dicom and shows the slice the model saw under
    the map, with the score the API gives for it."""
    from browser import Browser, find_chromium

    binary = find_chromium()
    if binary is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium package)")
    src = pacs_with_series[1][len(pacs_with_series[1]) // 2]
    path = tmp_path / "slice.dcm"
    src.save_as(path, enforce_file_format=True)
    api = requests.post(f"{service['url']}/v1/anomaly", data=path.read_bytes(), timeout=120,
                        headers={**AUTH, "Content-Type": "application/dicom"}).json()  # fmt: skip
    browser = Browser(binary)
    try:
        browser.call("Page.navigate", url=service["url"] + "/")
        wait_for(browser, "document.readyState === 'complete' && !!document.getElementById('file')")
        browser.call("Runtime.evaluate", expression=f"document.getElementById('token').value = "
                     f"{TOKEN!r}")  # fmt: skip
        root = browser.call("DOM.getDocument")["root"]["nodeId"]
        node = browser.call("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
        browser.call("DOM.setFileInputFiles", nodeId=node, files=[str(path)])
        wait_for(browser, "document.body.dataset.state === 'done'")
        score = float(evaluate(browser, "document.getElementById('score').textContent"))
        assert score == pytest.approx(api["score"], abs=1e-5)  # no seed: the same content seed
        assert evaluate(browser, "document.getElementById('input').naturalWidth") == 64
        assert evaluate(browser, "document.getElementById('input').src").startswith(
            "data:image/png;base64,"
        )
        browser.screenshot(tmp_path / "anomaly_page_dicom.png", full_page=False)
    finally:
        browser.close()


def evaluate(browser, expression: str):
    out = browser.call("Runtime.evaluate", expression=expression, returnByValue=True)
    return out["result"].get("value")


def wait_for(browser, expression: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not evaluate(browser, expression):
        if time.monotonic() > deadline:
            error = evaluate(browser, "document.getElementById('error').textContent")
            raise AssertionError(f"timed out waiting for {expression}; page error: {error}")
        time.sleep(0.2)
