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
