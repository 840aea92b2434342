"""Data-layer configuration: PCam reading, Parquet shards, whole-slide tiling, MRI slicing."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from meddiff.config.base import Section


class PCamConfig(Section):
    """Reading PCam-format HDF5 (DESIGN.md: x uint8 (N, 96, 96, 3), y uint8 (N, 1, 1, 1))."""

    patch_size: int = Field(default=96, ge=8, description="Expected patch height and width.")
    rows_per_block: int = Field(
        default=1024, ge=1, description="Rows per Ray Data block; bounds memory per read task."
    )
    cache_dir: str | None = Field(
        default=None,
        description="Where .h5.gz files are decompressed once; None uses ~/.cache/meddiff.",
    )


class ShardConfig(Section):
    """Parquet shards of (image, label, provenance)."""

    rows_per_file: int = Field(default=4096, ge=1)


class WsiConfig(Section):
    """Cutting tiles from whole-slide images."""

    tile_size: int = Field(default=96, ge=8, description="Tile edge in pixels at the target mag.")
    magnification: float = Field(
        default=10.0, gt=0, description="Target objective magnification (PCam is about 10x)."
    )


class MriConfig(Section):
    """Slicing NIfTI volumes into 2D images (axial slices in a canonical orientation)."""

    image_size: int = Field(default=128, ge=8, description="Output slice height and width.")
    percentiles: tuple[float, float] = Field(
        default=(1.0, 99.0),
        description="Intensity window: these percentiles of the brain voxels map to 0 and 1.",
    )
    min_brain_fraction: float = Field(
        default=0.25,
        ge=0,
        le=1,
        description="Keep axial slices whose brain area is at least this share of the largest.",
    )
    margin: float = Field(
        default=0.05, ge=0, le=1, description="Border around the brain's in-plane box (share)."
    )
    brain_threshold: float = Field(
        default=0.0, description="Without a mask, voxels above this are brain (skull-stripped)."
    )
    png_bits: Literal[8, 16] = Field(default=16, description="Bit depth of written PNG slices.")

    @model_validator(mode="after")
    def _check(self) -> MriConfig:
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"percentiles {self.percentiles} must satisfy 0 <= low < high <= 100")
        return self


class DataConfig(Section):
    pcam: PCamConfig = PCamConfig()
    shards: ShardConfig = ShardConfig()
    wsi: WsiConfig = WsiConfig()
    mri: MriConfig = MriConfig()


TINY: dict = {
    "pcam": {"rows_per_block": 256},
    "shards": {"rows_per_file": 1024},
    "mri": {"image_size": 64},
}
