"""Typed settings of the HTTP services (``meddiff.serving``), as written in a Serve config file.

An application's ``args`` validate as :class:`AppArgs`; a model deployment's ``user_config`` as
:class:`ModelUserConfig`. Both forbid unknown keys, which Ray's own Serve schema does not check.
"""

from __future__ import annotations

from pydantic import Field

from meddiff.config.base import Section


class AppArgs(Section):
    """The ``args`` of an anomaly or synthesis application (passed to its builder)."""

    preset: str | None = Field(
        default=None, description="meddiff config preset the service starts from (e.g. tiny)."
    )
    set: tuple[str, ...] = Field(
        default=(),
        description="meddiff config overrides 'a.b=value': the inference plan (thor.infer.*, "
        "synthesis.generate.*) is deployment config, never per request.",
    )
    token_file: str | None = Field(
        default=None,
        description="File holding one plain bearer token, name 'default' (default "
        "~/.meddiff/serve_token); re-read when it changes.",
    )
    credentials_file: str | None = Field(
        default=None,
        description="YAML of token name: sha256:<hex> (default "
        "~/.meddiff/serve_credentials.yaml; `meddiff serve token`); re-read when it changes.",
    )
    metrics_host: str = Field(
        default="127.0.0.1",
        description="Interface of the Prometheus metrics server (0.0.0.0: every interface).",
    )
    metrics_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Port of the Prometheus metrics server; 0, or a port already taken: a free "
        "one (logged, and printed by `meddiff serve run`).",
    )
    audit_log: str | None = Field(
        default=None,
        description="File the audit lines (one JSON line per request) are appended to; they "
        "always go to the ingress replica's log too.",
    )
    ready_timeout_s: float = Field(
        default=1.0, gt=0, le=30, description="How long /readyz waits for a model replica."
    )
    retry_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="How long the one retry of a request whose model replica died may take "
        "(else 503 + Retry-After).",
    )
    drain_grace_s: float = Field(
        default=30.0,
        ge=0,
        description="On SIGTERM, how long `meddiff serve run` lets requests in flight finish "
        "(new ones get 503 + Retry-After) before it stops the services.",
    )
    max_body_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, description="Largest request body accepted (else 413)."
    )
    max_series_slices: int = Field(
        default=300,
        ge=1,
        le=4096,
        description="Anomaly: most slices (instances, or frames) of a series that "
        "POST /v1/anomaly/series takes (else 413, before its pixel data are retrieved).",
    )
    max_images: int = Field(
        default=8, ge=1, le=64, description="Synthesis: largest n (images per request)."
    )
    retry_after_s: int = Field(
        default=2, ge=1, description="Retry-After of a 503 when the model's queue is full."
    )


class ModelUserConfig(Section):
    """A model deployment's ``user_config``: changing it reloads the model in place (load the
    new one, then swap), so no request is dropped."""

    model: str = Field(description="models:/NAME@ALIAS, models:/NAME/VERSION or a model directory.")
    max_batch_size: int = Field(default=4, ge=1, le=256, description="@serve.batch size.")
    batch_wait_timeout_s: float = Field(
        default=0.02, ge=0, le=10, description="How long a batch waits to fill."
    )
    refresh_s: float = Field(
        default=5.0,
        ge=0,
        description="How often an alias is re-resolved; a new version is loaded, then swapped "
        "in (0: never).",
    )
