"""A real PACS over DICOMweb: Orthanc (Debian's package and its DICOMweb plugin, tests/integration/
pacs.py) holds a synthetic MR series with a drawn lesion; ``thor detect`` retrieves it (WADO-RS),
runs THOR on the shared Ray and stores the SEG and the map back (STOW-RS); the SEG read back from
Orthanc lies on the series' geometry and on the lesion. A PACS that refuses the credentials or
is down is one line, without a hang. The PACS fixtures are in conftest.py."""

from __future__ import annotations

import json
import socket
import time

import numpy as np
import pacs

from meddiff.cli import main
from meddiff.thor.shipped import SHIPPED_DIR

FAST = ["--preset", "tiny", "--stride", "50", "--set", "runtime.progress=false",
        "--set", "data.dicom.username=" + pacs.USER]  # fmt: skip
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
PARAMETRIC_MAP_CLASS = "1.2.840.10008.5.1.4.1.1.30"


def test_detect_reads_the_series_from_the_pacs_and_stores_seg_and_map_back(
    pacs_with_series, password, tmp_path, capsys, monkeypatch
):
    server, series, vol, lesion = pacs_with_series
    monkeypatch.setenv("MEDDIFF_CACHE", str(tmp_path / "cache"))
    study, uid = series[0].StudyInstanceUID, series[0].SeriesInstanceUID
    args = ["thor", "detect", "--model", str(SHIPPED_DIR), "--images", server.series(study, uid),
            "--out", server.dicomweb, "--set", "data.dicom.seg_threshold=0.36", *FAST]  # fmt: skip
    capsys.readouterr()
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["input_kind"] == "dicomweb" and summary["input"] == f"{server.http}/dicom-web"
    stored = summary["stored"]
    assert (tmp_path / "cache").as_posix() in stored["local"]  # the local copy is kept

    web = server.client()
    found = web.search_for_series(study, search_filters={"Modality": "SEG"})
    assert len(found) == 1
    seg_series = found[0]["0020000E"]["Value"][0]
    (seg,) = web.retrieve_series(study, seg_series)
    assert seg.SOPClassUID == SEG_CLASS and seg.SOPInstanceUID == stored["uids"]["seg"]
    pm = web.retrieve_instance(study, _series_of(web, study, stored["uids"]["parametric_map"]),
                               stored["uids"]["parametric_map"])  # fmt: skip
    assert pm.SOPClassUID == PARAMETRIC_MAP_CLASS
    # Geometry: the source's frame of reference and series; each frame on its source slice.
    by_uid = {s.SOPInstanceUID: k for k, s in enumerate(series)}
    for obj in (seg, pm):
        assert obj.FrameOfReferenceUID == series[0].FrameOfReferenceUID
        assert obj.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
        for item in obj.PerFrameFunctionalGroupsSequence:
            ref = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            pos = item.PlanePositionSequence[0].ImagePositionPatient
            np.testing.assert_allclose(np.asarray(pos, float),
                                       np.asarray(series[by_uid[ref]].ImagePositionPatient, float),
                                       atol=1e-3)  # fmt: skip
    # Lesion overlap, on the series' own (I, J, K) grid.
    voxels = pacs.seg_voxels(seg, series, vol.data.shape)
    inside, elsewhere = voxels[lesion].mean(), voxels[(vol.data > 0) & ~lesion].mean()
    assert inside > 3 * elsewhere, (inside, elsewhere)


def _series_of(web, study: str, sop_uid: str) -> str:
    (hit,) = web.search_for_instances(study, search_filters={"SOPInstanceUID": sop_uid})
    return hit["0020000E"]["Value"][0]


def test_refused_credentials_and_a_pacs_that_is_down_are_one_line(
    pacs_with_series, monkeypatch, tmp_path, capsys
):
    server, series, _, _ = pacs_with_series
    location = server.series(series[0].StudyInstanceUID, series[0].SeriesInstanceUID)
    monkeypatch.setenv("MEDDIFF_DICOMWEB_PASSWORD", "wrong")
    base = ["thor", "detect", "--model", str(SHIPPED_DIR), "--out", str(tmp_path / "out"),
            "--set", "data.dicom.seg_threshold=0.36", *FAST]  # fmt: skip
    capsys.readouterr()
    assert main([*base, "--images", location]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"meddiff: error: series on {server.http}/dicom-web: the PACS refused the credentials "
        "(HTTP 401); set data.dicom.username (or MEDDIFF_DICOMWEB_USER) and the password in "
        "$MEDDIFF_DICOMWEB_PASSWORD"
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = location.replace(f":{server.port}/", f":{port}/")
    start = time.monotonic()
    assert main([*base, "--images", down, "--set", "data.dicom.retries=2"]) == 2
    assert time.monotonic() - start < 60
    err = capsys.readouterr().err.strip()
    assert err == (
        f"meddiff: error: series on http://127.0.0.1:{port}/dicom-web: PACS not reachable after "
        "2 attempts (connection refused)"
    )
    assert not (tmp_path / "out").exists()
