"""The DICOMweb client's failure modes, against small loopback HTTP servers: a PACS that is down,
one that never answers, one that refuses the credentials, one that rejects a store (the results
kept locally, their folder named). The real round trip on Orthanc is in
tests/integration/test_thor_pacs.py."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from meddiff.config import load_config
from meddiff.config.dicom import DicomConfig
from meddiff.data import dicom, dicom_results, dicomweb
from meddiff.data.volume_samples import mr_series, write_series
from meddiff.errors import DataError
from volume_helpers import brain

FAST = DicomConfig(timeout_s=1.0, retries=2)
SERIES = "studies/1.2.3/series/4.5.6"


@contextlib.contextmanager
def http_server(status: int, delay: float = 0.0):
    """A loopback server answering every request with ``status`` (after ``delay`` s); yields
    its port and the list of request lines it saw."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self):
            seen.append(f"{self.command} {self.path} auth={self.headers.get('Authorization')}")
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            time.sleep(delay)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = _answer

        def log_message(self, *args):  # keep test output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_locations_name_server_study_and_series():
    loc = dicomweb.parse("dicomweb://pacs:8042/dicom-web/studies/1.2.3/series/4.5.6", FAST)
    assert loc == dicomweb.Location("http://pacs:8042/dicom-web", "1.2.3", "4.5.6")
    assert str(loc) == "http://pacs:8042/dicom-web"  # messages never show the UIDs
    assert dicomweb.parse("dicomwebs://pacs/dicom-web", FAST).base_url == "https://pacs/dicom-web"
    hostless = dicomweb.parse(f"dicomweb:///{SERIES}", DicomConfig(url="http://h:1/web"))
    assert hostless == dicomweb.Location("http://h:1/web", "1.2.3", "4.5.6")
    assert dicomweb.server_of(f"dicomweb://h:1/web/{SERIES}") == "dicomweb://h:1/web"
    with pytest.raises(DataError, match="names no server; give dicomweb://HOST:PORT/... or data"):
        dicomweb.parse(f"dicomweb:///{SERIES}", FAST)
    with pytest.raises(DataError, match=r"credentials do not go in the location; set data.dicom"):
        dicomweb.parse("dicomweb://u:secret@pacs/dicom-web", FAST)
    with pytest.raises(DataError, match=r"expected .../studies/STUDY_UID\[/series/SERIES_UID\]"):
        dicomweb.parse("dicomweb://pacs/dicom-web/studies/abc", FAST)
    assert dicomweb.is_dicomweb("dicomweb://x/y") and not dicomweb.is_dicomweb("s3://b/k")


def test_a_pacs_that_is_down_fails_after_bounded_retries(caplog):
    loc = dicomweb.parse(f"dicomweb://127.0.0.1:{closed_port()}/dicom-web/{SERIES}", FAST)
    start = time.monotonic()
    with pytest.raises(DataError) as info:
        dicomweb.retrieve_series(loc, FAST)
    assert time.monotonic() - start < 10
    assert str(info.value) == (
        f"series on {loc.base_url}: PACS not reachable after 2 attempts (connection refused)"
    )
    assert "attempt 1 of 2, retrying" in caplog.text
    assert "1.2.3" not in caplog.text  # no UIDs in the log


def test_a_pacs_that_never_answers_times_out():
    with http_server(200, delay=5.0) as (port, seen):
        loc = dicomweb.parse(f"dicomweb://127.0.0.1:{port}/dicom-web/{SERIES}", FAST)
        start = time.monotonic()
        with pytest.raises(DataError, match=r"PACS timed out after 2 attempts"):
            dicomweb.retrieve_series(loc, FAST)
        assert time.monotonic() - start < 6
    assert len(seen) == 2


def test_refused_credentials_are_named_and_not_retried(monkeypatch):
    monkeypatch.setenv("PACS_PW", "wrong")
    cfg = DicomConfig(username="meddiff", password_env="PACS_PW", retries=3)
    with http_server(401) as (port, seen):
        loc = dicomweb.parse(f"dicomweb://127.0.0.1:{port}/dicom-web/{SERIES}", cfg)
        with pytest.raises(DataError) as info:
            dicomweb.retrieve_series(loc, cfg)
    assert str(info.value) == (
        f"series on http://127.0.0.1:{port}/dicom-web: the PACS refused the credentials "
        "(HTTP 401); set data.dicom.username (or MEDDIFF_DICOMWEB_USER) and the password in "
        "$PACS_PW"
    )
    assert len(seen) == 1 and "auth=Basic " in seen[0]  # sent, once


def test_a_server_error_is_retried_then_named():
    with http_server(503) as (port, seen):
        loc = dicomweb.parse(f"dicomweb://127.0.0.1:{port}/dicom-web/{SERIES}", FAST)
        with pytest.raises(DataError, match=r"the PACS answered HTTP 503 after 2 attempts"):
            dicomweb.retrieve_series(loc, FAST)
    assert len(seen) == 2


def test_a_rejected_store_keeps_the_results_and_names_their_folder(tmp_path):
    from meddiff.thor import volumes

    write_series(mr_series(brain((6.0, 6.0, 8.0))), tmp_path / "series")
    series = dicom.read_series(tmp_path / "series")
    out = tmp_path / "results"
    (out / "dicom").mkdir(parents=True)
    algorithm = dicom_results.Algorithm("m", "v", 0.5)
    mask = series.to_frames(series.volume.data > np.percentile(series.volume.data, 99))
    dicom_results.segmentation(series.sources, mask, algorithm).save_as(out / "dicom" / "seg.dcm")
    values = series.to_frames(np.zeros(series.volume.data.shape, np.float32))
    dicom_results.parametric_map(series.sources, values, algorithm).save_as(
        out / "dicom" / "anomaly_map.dcm"
    )
    cfg = load_config("tiny", None, ["data.dicom.retries=2"])
    with http_server(409) as (port, seen):
        base = f"http://127.0.0.1:{port}/dicom-web"
        with pytest.raises(dicomweb.StoreRejected) as info:
            volumes._store(out, base, cfg)
    assert str(info.value) == (
        f"store on {base}: the PACS rejected the store (HTTP 409); the results are kept in {out}"
    )
    assert len(seen) == 1 and seen[0].startswith("POST /dicom-web/studies")
    assert sorted(p.name for p in (out / "dicom").iterdir()) == ["anomaly_map.dcm", "seg.dcm"]
