"""DICOM input and output: series checks and the PACS reached over DICOMweb (``data.dicom``)."""

from __future__ import annotations

from pydantic import Field

from meddiff.config.base import Section


class DicomConfig(Section):
    """Reading DICOM series and talking to a PACS over DICOMweb (WADO-RS, QIDO-RS, STOW-RS).

    Passwords are never config: the password is read from the environment variable named by
    ``password_env`` (as storage credentials are; see docs/thor.md).
    """

    url: str | None = Field(
        default=None,
        description="DICOMweb base URL, e.g. 'http://pacs:8042/dicom-web'; used by locations "
        "without a host ('dicomweb:///studies/UID/series/UID'). null: locations name their host.",
        pattern=r"^https?://[^/\s]+(/\S*)?$",
    )
    username: str | None = Field(
        default=None,
        description="HTTP basic-auth user for the PACS (null: MEDDIFF_DICOMWEB_USER, else none).",
    )
    password_env: str = Field(
        default="MEDDIFF_DICOMWEB_PASSWORD",
        min_length=1,
        description="Environment variable holding the PACS user's password.",
    )
    timeout_s: float = Field(
        default=30.0, gt=0, description="Connect and read timeout of one HTTP request, seconds."
    )
    retries: int = Field(
        default=3,
        ge=1,
        le=10,
        description="Attempts for a transient PACS error (refused or reset connection, timeout, "
        "HTTP 429/5xx); refused credentials and other 4xx are not retried.",
    )
    spacing_tolerance: float = Field(
        default=0.05,
        gt=0,
        lt=1,
        description="Largest relative difference between a series' slice steps (and between "
        "its instances' pixel spacings) that still counts as one regular grid.",
    )
    seg_threshold: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="Anomaly-map value above which a voxel goes into the DICOM SEG. null: the "
        "model's calibrated threshold for these inference settings (`meddiff thor calibrate`).",
    )
