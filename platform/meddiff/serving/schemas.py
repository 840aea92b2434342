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
