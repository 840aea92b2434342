"""A real PACS for the DICOMweb tests: Debian's Orthanc with its DICOMweb plugin, on a free
loopback port, its storage in a folder of the test's, basic auth with one user, no DICOM (DIMSE)
port, stopped by PID. Debian's package may also start a system Orthanc service: these tests
neither use nor touch it.

Install: ``apt-get install -y orthanc orthanc-dicomweb`` (``.ci/run`` does it as root). Without
it the tests skip, unless ``MEDDIFF_REQUIRE_ORTHANC`` is set (CI), where they fail instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import servers

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "meddiff", "pacs-secret-4411"


@dataclass(frozen=True)
class Pacs:
    port: int
    root: Path

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        """The DICOMweb root as meddiff takes it (``dicomweb://`` = http)."""
        return f"dicomweb://127.0.0.1:{self.port}/dicom-web"

    def series(self, study_uid: str, series_uid: str) -> str:
        return f"{self.dicomweb}/studies/{study_uid}/series/{series_uid}"

    def client(self, password: str = PASSWORD):
        import requests
        from dicomweb_client.api import DICOMwebClient

        session = requests.Session()
        session.auth = (USER, password)
        return DICOMwebClient(f"{self.http}/dicom-web", session=session, timeout=30)


def seg_voxels(seg, series: list, shape: tuple[int, int, int]) -> np.ndarray:
    """A SEG's segment on the (I, J, K) grid of the volume ``series`` was made from (slice k =
    instance k): bool ``shape``, each frame placed by the instance it references."""
    by_uid = {s.SOPInstanceUID: k for k, s in enumerate(series)}
    voxels = np.zeros(shape, bool)
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        ref = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        voxels[:, :, by_uid[ref]] |= frame.T.astype(bool)
    return voxels


def require_orthanc() -> None:
    """Skip (or, with MEDDIFF_REQUIRE_ORTHANC set, fail) when Orthanc is not installed."""
    if ORTHANC.is_file() and DICOMWEB_PLUGIN.is_file():
        return
    reason = (
        "Orthanc with its DICOMweb plugin not installed (apt-get install orthanc orthanc-dicomweb)"
    )
    if os.environ.get("MEDDIFF_REQUIRE_ORTHANC"):
        pytest.fail(reason)
    pytest.skip(reason)


@contextlib.contextmanager
def orthanc(root: Path) -> Iterator[Pacs]:
    """Orthanc on a free loopback HTTP port with DICOMweb at ``/dicom-web/``."""
    root.mkdir(parents=True, exist_ok=True)
    port = servers.free_port()
    config = {
        "Name": "meddiff-test-pacs",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "storage"),
        "HttpPort": port,
        "RemoteAccessAllowed": False,  # loopback only
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "DicomServerEnabled": False,  # no DIMSE port: DICOMweb only
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        "StorageCompression": False,
        "ConcurrentJobs": 1,
    }
    path = root / "orthanc.json"
    path.write_text(json.dumps(config, indent=2))
    log = root / "orthanc.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(ORTHANC), str(path)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    pacs = Pacs(port, root)
    try:
        servers._wait(lambda: _answers(pacs), "Orthanc", 60, proc, log)
        yield pacs
    finally:
        servers._stop(proc)


def _answers(pacs: Pacs) -> bool:
    import requests

    r = requests.get(f"{pacs.http}/dicom-web/studies", auth=(USER, PASSWORD), timeout=2)
    return r.status_code == 200
