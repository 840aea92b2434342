"""Sections shared by every job: where Ray runs and where runs are tracked."""

from __future__ import annotations

import sys

from pydantic import Field, field_validator

from meddiff.config.base import Section


def on_terminal() -> bool:
    """Whether both stdout and stderr are terminals (progress bars are for people watching, not
    for `> log`, CI or `ray job submit` logs, where each redraw becomes a line)."""
    return all(getattr(s, "isatty", lambda: False)() for s in (sys.stdout, sys.stderr))


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
    progress: bool | None = Field(
        default=None,
        validate_default=True,
        description="Progress bars on long work: true, false, or null (the default) for bars on "
        "a terminal only; off a terminal each stage logs one line at its start and end instead.",
    )

    @field_validator("progress", mode="after")
    @classmethod
    def _resolve_progress(cls, value: bool | None) -> bool:
        # Resolved where the config is loaded (the driver): workers receive the decision.
        return on_terminal() if value is None else value


class TrackingConfig(Section):
    """Where runs are recorded (MLflow)."""

    uri: str | None = Field(
        default=None,
        description="MLflow tracking URI; None uses MLFLOW_TRACKING_URI, else a local SQLite "
        "store ./mlruns.db with artifacts under ./mlartifacts.",
    )
    experiment: str = Field(default="meddiff", min_length=1)


class StorageConfig(Section):
    """Object storage for paths given as URIs (``s3://``, ``gs://``, ``abfs://``).

    Credentials are never config: for S3 they come from the usual AWS sources (environment
    variables ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, a profile, an instance role), for
    Azure from ``AZURE_STORAGE_ACCOUNT_KEY`` (or ``AZURE_STORAGE_SAS_TOKEN``, or a service
    principal / managed identity); see docs/storage.md.
    """

    endpoint_url: str | None = Field(
        default=None,
        description="S3-compatible endpoint, e.g. 'http://127.0.0.1:8333' (SeaweedFS, MinIO); "
        "None uses AWS_ENDPOINT_URL, else AWS itself.",
    )
    region: str | None = Field(
        default=None, description="S3 region; None uses AWS_REGION, else us-east-1."
    )
    azure_endpoint: str | None = Field(
        default=None,
        description="Azure Blob endpoint for abfs:// URIs as 'http[s]://host[:port][/account]', "
        "e.g. 'http://127.0.0.1:10000/devstoreaccount1' (Azurite); None uses "
        "AZURE_STORAGE_SERVICE_ENDPOINT, else Azure itself (https://ACCOUNT.blob.core.windows.net).",
        pattern=r"^https?://[^/\s]+(/[^/\s]+)?/?$",
    )
    gcs_endpoint: str | None = Field(
        default=None,
        description="Google Cloud Storage endpoint for gs:// URIs as 'http[s]://host[:port]', e.g. "
        "'http://127.0.0.1:9023' (an emulator); None uses STORAGE_EMULATOR_HOST, else Google "
        "itself.",
        pattern=r"^https?://[^/\s]+/?$",
    )
    retries: int = Field(
        default=4, ge=1, le=20, description="Attempts for a transient object-store error."
    )
    timeout_s: float = Field(
        default=20.0, gt=0, description="Connect and request timeout of one attempt, seconds."
    )
