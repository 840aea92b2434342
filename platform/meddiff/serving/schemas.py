"""Request and response bodies of the HTTP services (they make the OpenAPI schema at /docs)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# One seed range everywhere (`?seed=`, synthesis seeds + i, content seeds, thor detect): the
# non-negative int32 range, what torch.Generator.manual_seed and numpy take on every platform.
SEED_MAX = 2**31 - 1


class ModelInfo(BaseModel):
    """The model a service answers with, pinned to a version when it was loaded."""

    kind: str = Field(description="anomaly or synthesis")
    ref: str = Field(description="the configured reference (models:/NAME@ALIAS, ...)")
    uri: str = Field(description="what was loaded (models:/NAME/VERSION or a directory)")
    name: str | None = None
    alias: str | None = None
    version: str | None = None
    run_id: str | None = None
    code_version: str | None = None
    plan: dict[str, Any] = Field(description="the inference plan (deployment config)")
    seg_threshold: float | None = Field(
        default=None,
        description="anomaly: the map value above which a pixel goes into a DICOM SEG (the "
        "version's calibration for this plan, or data.dicom.seg_threshold); null: no SEG",
    )


class Models(BaseModel):
    models: list[ModelInfo]


class AnomalyResponse(BaseModel):
    score: float = Field(description="image score: the mean of the anomaly map")
    anomaly_map_png: str = Field(
        description="base64 16-bit grayscale PNG, value/65535 = anomaly map in [0, 0.999] "
        "(the encoding `meddiff thor detect` writes)"
    )
    reconstruction_png: str | None = Field(
        default=None, description="base64 16-bit PNG of the pseudo-healthy reconstruction"
    )
    seed: int = Field(description="the noise seed used (given, or derived from the image)")
    image_png: str | None = Field(
        default=None,
        description="DICOM input only: base64 16-bit PNG of the slice as the model saw it (cut "
        "and scaled by the rules of data.mri); the maps are on its grid",
    )
    model: ModelInfo


_UID = r"^[0-9]+(\.[0-9]+)*$"


class SeriesRequest(BaseModel):
    """A series on the service's PACS (``data.dicom.url``): UIDs only, never a URL."""

    model_config = ConfigDict(extra="forbid")

    study_uid: str = Field(min_length=1, max_length=64, pattern=_UID,
                           description="Study Instance UID")  # fmt: skip
    series_uid: str = Field(min_length=1, max_length=64, pattern=_UID,
                            description="Series Instance UID")  # fmt: skip
    seed: int | None = Field(
        default=None,
        ge=0,
        le=SEED_MAX,
        description="base seed: slice zNNNN gets image_seed('zNNNN', seed), as `thor detect` "
        "with runtime.seed = seed; default the service's runtime.seed",
    )


class StoredObject(BaseModel):
    series_uid: str = Field(description="Series Instance UID of the new series")
    sop_instance_uid: str = Field(description="SOP Instance UID of the stored instance")


class SeriesResponse(BaseModel):
    study_uid: str
    series_uid: str = Field(description="the source series")
    slices: int = Field(description="axial slices the model analysed")
    score: float = Field(description="volume score: the mean of the slice scores")
    max_slice_score: float
    lesion_ml: float = Field(description="volume of the SEG (map > seg_threshold), millilitres")
    seg_threshold: float
    seg: StoredObject = Field(description="the DICOM SEG stored on the PACS")
    parametric_map: StoredObject = Field(description="the Parametric Map stored on the PACS")
    seed: int = Field(description="the base seed")
    model: ModelInfo


class SynthesisRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(
        default=None, min_length=1, max_length=1000, description="a prompt the model knows"
    )
    label: int | None = Field(default=None, ge=0, le=1, description="with cluster: pick a prompt")
    cluster: int | None = Field(default=None, ge=0, description="morphology type")
    n: int = Field(default=1, ge=1, description="images to generate (bounded by the service)")
    seed: int | None = Field(
        default=None, ge=0, le=SEED_MAX, description="image i gets seed + i; default 0"
    )


class SynthesisImage(BaseModel):
    seed: int
    png: str = Field(description="base64 RGB PNG, PCam-sized")


class SynthesisResponse(BaseModel):
    prompt: str
    images: list[SynthesisImage]
    model: ModelInfo


class PromptEntry(BaseModel):
    prompt: str
    label: int
    cluster: int
    count: int


class Prompts(BaseModel):
    prompts: list[PromptEntry]


class Problem(BaseModel):
    detail: str | list[Any]
