"""Healthy training slices for the DDPM, streamed through Ray Data, with THOR's brain augmentation.

``healthy_dataset(path)`` accepts a folder of PNG slices, one NIfTI volume, or a folder of NIfTI
volumes (sliced with :mod:`meddiff.data.mri`) and yields rows with an ``image`` column, float32
(S, S) in [0, 1]. ``BrainAugment`` is the Ray Data stage that applies a random affine (rotation
±10°, translation ±10 %, zoom 0.9-1.1) and a left-right flip to every image of a batch at once.
Stages are plain callables (no Ray import), so tests call them directly.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from meddiff.config.data import ImageConfig, MriConfig
from meddiff.config.thor import AugmentConfig
from meddiff.data.images import intensity_summary, list_pngs, read_png
from meddiff.data.mri import NiftiSlicer, check_volume, is_nifti
from meddiff.errors import DataError

if TYPE_CHECKING:
    import ray.data


def augment_batch(
    images: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random affine + flip of (B, C, H, W) images; background (outside the field) is 0."""
    b = images.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=generator, dtype=torch.float64)

    angle = uniform(-cfg.rotate_deg, cfg.rotate_deg) * math.pi / 180.0
    zoom = uniform(*cfg.scale)
    shift = torch.stack([uniform(-cfg.translate, cfg.translate) for _ in range(2)], dim=1) * 2
    flip = torch.ones(b, dtype=torch.float64)
    if cfg.hflip:
        flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0).double()
    # affine_grid maps output to input coordinates, so the inverse transform goes in: a zoom z
    # samples the input at 1/z. Translation is in normalised units (2 = the whole image).
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = cos * flip
    theta[:, 0, 1] = -sin
    theta[:, 1, 0] = sin * flip
    theta[:, 1, 1] = cos
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.float(), list(images.shape), align_corners=False)
    out = F.grid_sample(
        images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return out.clamp(0.0, 1.0)


class BrainAugment:
    """Ray Data stage: ``{"image": (n, S, S) float32}`` → the same, randomly augmented.

    Each call draws fresh randomness (OS entropy unless ``seed`` is given), so every pass over a
    repeated dataset sees different augmentations.
    """

    def __init__(self, cfg: AugmentConfig, seed: int | None = None):
        self.cfg = cfg
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            images = torch.from_numpy(np.array(batch["image"], dtype=np.float32))[:, None]
            out = augment_batch(images, self.cfg, self.generator)[:, 0].numpy()
        return {**batch, "image": out}


def augment_batch_task(batch: dict[str, np.ndarray], cfg: dict) -> dict[str, np.ndarray]:
    """``BrainAugment`` as a plain function for Ray Data tasks (no actor to start each epoch)."""
    return BrainAugment(AugmentConfig.model_validate(cfg))(batch)


class ReadPng:
    """Ray Data stage: ``{"path": [...]}`` → ``{"image": (n, S, S) float32, "path": [...]}``,
    scaled by ``images`` exactly as detection reads them (:func:`meddiff.data.images.read_png`)."""

    def __init__(self, size: int | None, images: ImageConfig | None = None):
        self.size = size
        self.images = images or ImageConfig()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = np.stack([read_png(p, self.size, self.images) for p in batch["path"]])
        return {"path": batch["path"], "image": images}


def find_inputs(path: str | Path) -> tuple[str, list[Path]]:
    """('png' | 'nifti', files) for a PNG folder, a NIfTI file, or a folder of NIfTI volumes.

    Raises:
        DataError: missing path, empty folder, non-PNG files in a PNG folder, or a folder that
            mixes PNG and NIfTI files.
    """
    p = Path(path)
    if p.is_file():
        if is_nifti(p):
            return "nifti", [p]
        raise DataError(f"{p}: expected a NIfTI volume (.nii, .nii.gz) or a folder of PNG slices")
    if not p.is_dir():
        raise DataError(f"training data {p} does not exist")
    visible = [e for e in p.iterdir() if not e.name.startswith(".")]
    volumes = sorted(e for e in visible if e.is_file() and is_nifti(e))
    if volumes:
        others = sorted(e for e in visible if e not in volumes)
        if others:
            raise DataError(
                f"{others[0]}: the folder {p} holds NIfTI volumes, so it must hold only NIfTI "
                "volumes (.nii, .nii.gz)"
            )
        return "nifti", volumes
    return "png", list_pngs(p, "training image")


def healthy_dataset(
    path: str | Path, image_size: int, mri: MriConfig, images: ImageConfig | None = None
) -> ray.data.Dataset:
    """A Ray dataset of healthy slices (column ``image`` float32 (S, S) in [0, 1]).

    NIfTI volumes are sliced at ``image_size`` with ``mri``'s orientation and normalisation;
    PNGs must already be ``image_size`` square (an error names any that is not) and are scaled
    by ``images`` (``data.images``), as detection scales them; a warning is logged here, once,
    when they use a small part of their range.
    """
    import ray.data

    kind, files = find_inputs(path)
    images = images or ImageConfig()
    # Checks here, on the driver: a bad volume or image is one line, not a failed Ray task.
    if kind == "nifti":
        for f in files:
            check_volume(f, mri.voxel_size)
    else:
        intensity_summary(files, images)
    ds = ray.data.from_items([{"path": str(f)} for f in files])
    if kind == "nifti":
        slicer_cfg = mri.model_copy(update={"image_size": image_size})
        return ds.flat_map(NiftiSlicer(slicer_cfg)).select_columns(["image"])
    return ds.map_batches(ReadPng(image_size, images), batch_size=64).select_columns(["image"])


def check_slice_count(n: int, epoch_images: int, min_images: int) -> None:
    """Refuse a training set of ``n`` slices below ``min_images`` (``thor.train.min_images``).

    Raises:
        DataError: no slices, or fewer than ``min_images`` (the message says how often each
            would be repeated per epoch of ``epoch_images``).
    """
    if n == 0:
        raise DataError("the training data produced no slices")
    if n < min_images:
        them = "them" if n > 1 else "it"
        raise DataError(
            f"the training data gave {n} slice{'s' if n > 1 else ''}, fewer than "
            f"thor.train.min_images={min_images}: each would be repeated "
            f"{math.ceil(epoch_images / n)} times per epoch and the model would learn {them}, "
            "not healthy anatomy; give more slices (or, knowingly, lower thor.train.min_images)"
        )


def repeat_dataset(
    ds: ray.data.Dataset, min_rows: int, min_images: int = 1
) -> tuple[ray.data.Dataset, int]:
    """``ds`` read once and, if smaller than ``min_rows``, repeated until an epoch has at least
    ``min_rows`` rows. Returns (dataset, rows per epoch).

    A large set is only materialised. A small one (repeated) is gathered and tiled in memory,
    which costs at most ``min_rows`` images; each repeat still gets its own augmentation
    downstream, and the pipeline restarts once per ``min_rows`` rows rather than per pass.

    Raises:
        DataError: fewer than ``min_images`` slices (``thor.train.min_images``).
    """
    import ray.data

    base = ds.materialize()
    n = base.count()
    check_slice_count(n, min_rows, min_images)
    reps = max(1, math.ceil(min_rows / n))
    if reps == 1:
        return base, n
    images = np.concatenate(
        [b["image"] for b in base.iter_batches(batch_size=None, batch_format="numpy")]
    )
    tiled = ray.data.from_numpy(np.tile(images, (reps, 1, 1)))
    return tiled.rename_columns({"data": "image"}), n * reps
