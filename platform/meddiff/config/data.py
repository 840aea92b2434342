"""Data-layer configuration: PCam reading, Parquet shards, whole-slide tiling, MRI slicing."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from meddiff.config.base import Section
from meddiff.config.dicom import DicomConfig


class PCamConfig(Section):
    """Reading PCam-format HDF5 (README, Data: x uint8 (N, 96, 96, 3), y uint8 (N, 1, 1, 1))."""

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
    """Cutting tiles from whole-slide images (SVS, vendor formats, DICOM-WSI: ``reader``).

    A slide's magnification is ``base_magnification`` when set (an explicit setting wins over
    the file's metadata), else its objective power, else its pixel size (10 µm / mpp: 0.25 mpp is
    40x); metadata outside what scanners produce is refused with this override named. Tiles are cut on a grid at
    ``magnification`` from the nearest pyramid level at or above it (resized when no level matches)
    and kept when at least ``min_tissue_fraction`` of their area is tissue on a low-resolution mask;
    marker ink on that mask is not tissue (``artefacts``).
    """

    tile_size: int = Field(default=96, ge=8, description="Tile edge in pixels at the target mag.")
    magnification: float = Field(
        default=10.0, gt=0, description="Target objective magnification (PCam is about 10x)."
    )
    base_magnification: float | None = Field(
        default=None,
        gt=0,
        description="Level-0 magnification of every slide; when set it wins over the slides' "
        "objective power and mpp metadata (null: read them from the metadata).",
    )
    magnification_tolerance: float = Field(
        default=0.05, ge=0, lt=1, description="Relative slack when matching a pyramid level."
    )
    min_tissue_fraction: float = Field(
        default=0.5, ge=0, le=1, description="Keep a tile when this fraction of it is tissue."
    )
    tissue_saturation: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="HSV saturation (0-1) above which a mask pixel is tissue; null: Otsu's "
        "threshold on the slide, clipped to [0.03, 0.1].",
    )
    mask_pixels_per_tile: int = Field(
        default=8, ge=1, description="Tissue-mask resolution: mask pixels across one tile."
    )
    tiles_per_task: int = Field(
        default=1024, ge=1, description="Tiles per Ray read task (bounds memory per task)."
    )
    artefacts: bool = Field(
        default=True,
        description="Find marker ink on the tissue mask: it is not tissue; tiles that are "
        "mostly ink are read flagged (artefact column) for the quality filter to remove.",
    )
    extensions: list[str] = Field(
        default=[".svs", ".tif", ".tiff", ".ndpi", ".vms", ".scn", ".bif", ".mrxs", ".svslide"],
        description="Files in a slide directory that are read as slides (sub-folders holding a "
        "DICOM whole-slide image are read as well).",
    )
    reader: Literal["auto", "tiffslide", "openslide"] = Field(
        default="auto",
        description="Library that reads slides (the tiles' reader column). auto: tiffslide for "
        "SVS and generic TIFF, OpenSlide for other vendor formats and DICOM whole-slide images.",
    )
    labels_csv: str | None = Field(
        default=None,
        description="CSV with columns slide,label (slide file name) giving every tile of a slide "
        "its label; slides not listed get -1. Default: labels.csv beside the slides, if present.",
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
    resample: bool = Field(
        default=True,
        description="Resample axial slices to isotropic in-plane spacing when the header's voxel "
        "sizes differ in the axial plane; false: refuse such volumes.",
    )
    voxel_size: tuple[float, float, float] | None = Field(
        default=None,
        description="Voxel sizes in mm along the file's own axes (i, j, k); when set, wins over "
        "the header's (null: read them from the header).",
    )

    @model_validator(mode="after")
    def _check(self) -> MriConfig:
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"percentiles {self.percentiles} must satisfy 0 <= low < high <= 100")
        if self.voxel_size is not None and min(self.voxel_size) <= 0:
            raise ValueError(f"voxel_size {self.voxel_size} must be positive (mm)")
        return self


class ImageConfig(Section):
    """How grayscale PNGs (anomaly detection: training slices and test images alike) map to [0, 1].

    ``scaling``:

    - ``significant_bits`` (default): value / (2**b - 1), where b is ``significant_bits`` when set
      (an explicit setting wins over the file), else the PNG's sBIT chunk, else 12 for a 16-bit
      PNG whose values all fit in 12 bits (scanners store 12-bit data unscaled in 16-bit PNGs,
      often without sBIT; read over 0..65535 they would be near-black), else the type's depth
      (8 or 16). Data left-shifted to the full depth, as the PNG standard asks, are shifted back
      first.
    - ``type_range``: value / 255 or / 65535, whatever the file says.
    - ``observed_range``: each image's own minimum..maximum to 0..1.
    - ``percentiles``: each image's ``percentiles`` to 0 and 1, clipped.
    """

    scaling: Literal["significant_bits", "type_range", "observed_range", "percentiles"] = Field(
        default="significant_bits", description="How stored values map to [0, 1] (see above)."
    )
    significant_bits: int | None = Field(
        default=None,
        ge=1,
        le=16,
        description="Bits that hold data (e.g. 12 for a 12-bit scanner); wins over the PNG's "
        "sBIT chunk. null: sBIT when present, else 12 for 16-bit values that fit in 12 bits, "
        "else the type's depth.",
    )
    percentiles: tuple[float, float] = Field(
        default=(0.5, 99.5), description="Per-image window for scaling=percentiles."
    )
    low_range_warning: float = Field(
        default=0.125,
        ge=0,
        le=1,
        description="Warn when an image's largest value is below this share of the range it is "
        "divided by (12-bit data read as 16-bit use 1/16 of it).",
    )

    @model_validator(mode="after")
    def _check(self) -> ImageConfig:
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"percentiles {self.percentiles} must satisfy 0 <= low < high <= 100")
        return self

    def reading(self) -> dict:
        """The settings that decide pixel values (what training and detection must share)."""
        out: dict = {"scaling": self.scaling}
        if self.scaling == "significant_bits":
            out["significant_bits"] = self.significant_bits
        if self.scaling == "percentiles":
            out["percentiles"] = list(self.percentiles)
        return out


class DataConfig(Section):
    read_concurrency: int | None = Field(
        default=None,
        ge=1,
        description="Patch read tasks running at once (None: as many as Ray schedules). On a "
        "small machine 1 leaves the other cores to the consumer.",
    )
    pcam: PCamConfig = PCamConfig()
    shards: ShardConfig = ShardConfig()
    wsi: WsiConfig = WsiConfig()
    mri: MriConfig = MriConfig()
    images: ImageConfig = ImageConfig()
    dicom: DicomConfig = DicomConfig()


TINY: dict = {
    "read_concurrency": 1,
    "pcam": {"rows_per_block": 256},
    "shards": {"rows_per_file": 1024},
    "mri": {"image_size": 64},
}
