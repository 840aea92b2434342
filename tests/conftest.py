"""Fixtures shared by every test tier.

The whole session records to one throwaway MLflow store (creating a SQLite store costs seconds, so
it is made once), and never to the developer's ./mlruns.db.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from meddiff.config import Config, load_config


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlruns.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    yield uri
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(scope="module", autouse=True)
def mlflow_store_restored(mlflow_store: str):
    """After each module, point MLflow back at the session store.

    ``mlflow.set_tracking_uri`` also writes ``MLFLOW_TRACKING_URI`` (so child processes inherit
    it); a module whose jobs tracked to a server it has since stopped would otherwise leave every
    later test retrying that dead server for minutes.
    """
    yield
    if os.environ.get("MLFLOW_TRACKING_URI") != mlflow_store:
        import mlflow

        mlflow.set_tracking_uri(mlflow_store)


@pytest.fixture(scope="session")
def tiny_cfg() -> Config:
    return load_config("tiny")


@pytest.fixture(scope="session")
def sample_pcam_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small PCam-format set cut from real IHC tissue (train 128, valid 32, test 32)."""
    from meddiff.data.samples import SampleSizes, sample_pcam

    root = tmp_path_factory.mktemp("pcam")
    sample_pcam(root, SampleSizes(train=128, valid=32, test=32), seed=0)
    return root


@pytest.fixture
def bucket(tmp_path: Path) -> Iterator[Path]:
    """``s3://bkt/...`` served from a local folder (returned): meddiff's object-store code
    paths without a server; tests/integration runs them against a real one (SeaweedFS)."""
    import pyarrow.fs as pafs

    from meddiff import storage

    root = tmp_path / "store"
    (root / "bkt").mkdir(parents=True)
    storage.use_filesystem("s3://bkt", pafs.SubTreeFileSystem(str(root), pafs.LocalFileSystem()))
    yield root / "bkt"
    storage._shipped.clear()
