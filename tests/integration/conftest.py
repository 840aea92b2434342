"""Integration tests share one embedded local Ray for the whole session (starting Ray costs
seconds; one instance keeps the suite fast). Tests that start their own cluster (``ray start``)
do so on separate ports and never touch this one."""

from __future__ import annotations

import pytest

from meddiff import runtime
from meddiff.config import RuntimeConfig


@pytest.fixture(scope="session", autouse=True)
def ray_session():
    runtime.connect(RuntimeConfig(num_cpus=2, object_store_memory_mb=1024, progress=False))
    yield
    runtime.shutdown()


@pytest.fixture(scope="module")
def pacs_with_series(tmp_path_factory):
    """A real Orthanc (tests/integration/pacs.py) holding a synthetic MR series of the bundled
    brain (oblique, flipped, 2.5 x 3 x 8 mm) with a drawn lesion and a planted patient name:
    (server, datasets, volume, lesion mask in the volume's grid). One per module: a module's
    results stored back stay its own."""
    import pacs

    from meddiff.data.volume_samples import mr_series
    from volume_helpers import PLANTED_ID, PLANTED_NAME, brain, draw_lesion

    pacs.require_orthanc()
    with pacs.orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        vol, lesion = draw_lesion(brain((2.5, 3.0, 8.0), flip=(True, False, False), degrees=15.0),
                                  radius_mm=16.0, factor=0.25)  # fmt: skip
        series = mr_series(vol, patient_name=PLANTED_NAME, patient_id=PLANTED_ID)
        server.client().store_instances(series)
        yield server, series, vol, lesion


@pytest.fixture
def password(monkeypatch):
    """The PACS user's password where meddiff reads it (data.dicom.password_env)."""
    import pacs

    monkeypatch.setenv("MEDDIFF_DICOMWEB_PASSWORD", pacs.PASSWORD)
