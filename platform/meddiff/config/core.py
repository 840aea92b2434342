"""Sections shared by every job: where Ray runs and where runs are tracked."""

from __future__ import annotations

from pydantic import Field

from meddiff.config.base import Section


class RuntimeConfig(Section):
    """Where jobs run.

    With no ``address`` (and no ``RAY_ADDRESS`` in the environment) meddiff starts an embedded
    local Ray sized by ``num_cpus``/``object_store_memory_mb``; with one, it joins that cluster and
    those two fields are ignored (the cluster's own resources apply).
    """

    address: str | None = Field(
        default=None, description="Ray cluster address, e.g. 'ray://head:10001' or 'auto'."
    )
    num_cpus: int | None = Field(default=None, ge=1, description="Embedded Ray only: CPUs.")
    num_gpus: int | None = Field(default=None, ge=0, description="Embedded Ray only: GPUs.")
    object_store_memory_mb: int | None = Field(
        default=None, ge=64, description="Embedded Ray only: object store size in MiB."
    )
    data_memory_mb: int | None = Field(
        default=None,
        ge=16,
        description="Ray Data's object-store budget for blocks in flight, in MiB (None: Ray's "
        "default, a share of the object store). Read tasks wait when it is full, so memory stays "
        "bounded whatever the input's length.",
    )
    start_timeout_s: float = Field(
        default=180.0,
        gt=0,
        description="Embedded Ray only: how long to keep retrying its start (with backoff) on a "
        "loaded machine before giving up with a one-line error. Ray's own bound per try is 30 s.",
    )
    seed: int = Field(default=0, description="Seed for sampling, shuffles and initialisation.")
    progress: bool = Field(default=True, description="Show progress bars on long work.")


class TrackingConfig(Section):
    """Where runs are recorded (MLflow)."""

    uri: str | None = Field(
        default=None,
        description="MLflow tracking URI; None uses MLFLOW_TRACKING_URI, else a local SQLite "
        "store ./mlruns.db with artifacts under ./mlartifacts.",
    )
    experiment: str = Field(default="meddiff", min_length=1)
