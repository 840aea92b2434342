"""A real-MRI lesion benchmark built offline from nilearn's bundled MNI152 T1 template.

``sample_brain(out)`` slices the template (real T1 brain MRI, 197×233×189, skull-stripped, 1 mm)
with its brain mask (:mod:`meddiff.data.mri`), holds out every ``test_every``-th axial slice for
testing (so no test slice was seen in training; neighbouring slices are similar anatomy, which is
what a model trained on healthy brains should know), and writes:

    OUT/
      train/                healthy training slices, 16-bit PNG           mni152_z085.png ...
      test/images/          lesion and lesion-free held-out slices         lesion_000_z086.png,
                                                                           normal_000_z090.png ...
      test/masks/           same names; 255 = lesion pixel, 0 elsewhere (all 0 for normal_*)
      test/lesions.csv      one row per test image: kind, z, area, stratum, contrast, edge, ...
      sample_brain.json     what was made; written last (a folder without it is incomplete)

Synthetic lesions vary in size (one third each in the small, medium and large strata of the THOR
evaluation, scaled by area from 128×128 to the output size), shape (ellipses of random aspect and
angle, smooth or irregular outline from a smooth random field), edge (soft or sharp), and contrast
(hypo-intense like chronic stroke on T1, or hyper-intense), always inside the brain mask. A lesion
pixel is one where the lesion's blend weight is at least 0.5.

An independent test brain: ``test_volume=COLIN27`` cuts the test slices from Colin Holmes's
brain (the "Colin27" single-subject MNI template, an average of 27 T1 scans of one man, 1 mm,
skull-stripped; Holmes et al., J Comput Assist Tomogr 1998), which Debian ships in the
``mricron-data`` package as ``ch2bet.nii.gz``. It is in MNI space like the training template
but is not one of the ICBM subjects that template averages, so a model trained on the template
is judged on a subject it never saw.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from meddiff import storage
from meddiff.config.data import MriConfig
from meddiff.data.images import write_png
from meddiff.data.mri import MriSlices, volume_to_slices
from meddiff.errors import DataError

log = logging.getLogger(__name__)

FORMAT = "meddiff-brain-sample/1"
MANIFEST = "sample_brain.json"
# Target lesion areas (pixels at 128×128) per stratum; strata bounds are (3, 71], (71, 570], > 570.
TARGET_AREA_128 = {"small": (15.0, 65.0), "medium": (90.0, 520.0), "large": (650.0, 1800.0)}
STRATA_128 = (3.0, 71.0, 570.0)
# Colin27, skull-stripped, from Debian's mricron-data package (`apt-get install mricron-data`).
COLIN27 = Path("/usr/share/mricron/templates/ch2bet.nii.gz")


@dataclass(frozen=True)
class BrainSampleSizes:
    """How much to make. Defaults suit the demo (a few minutes of THOR on 2 CPU cores)."""

    lesion: int = 48
    normal: int = 16
    test_every: int = 4


def mni152() -> tuple[np.ndarray, np.ndarray]:
    """nilearn's MNI152 T1 template and brain mask at 1 mm, as canonical RAS arrays."""
    import nibabel as nib
    from nilearn import datasets

    img = nib.as_closest_canonical(datasets.load_mni152_template(resolution=1))
    mask = nib.as_closest_canonical(datasets.load_mni152_brain_mask(resolution=1))
    return np.asarray(img.dataobj, dtype=np.float32), np.asarray(mask.dataobj) != 0


def stratum(
    area: float, image_size: int, bounds_128: tuple[float, float, float] = STRATA_128
) -> str:
    """'small' (a, b], 'medium' (b, c], 'large' > c, 'none' ≤ a, with the bounds given at 128×128
    and scaled by area to ``image_size``."""
    a, b, c = (x * (image_size / 128.0) ** 2 for x in bounds_128)
    if area <= a:
        return "none"
    if area <= b:
        return "small"
    return "medium" if area <= c else "large"


def sample_brain(
    out_dir: str | Path | storage.OutputLocation,
    cfg: MriConfig = MriConfig(),
    sizes: BrainSampleSizes = BrainSampleSizes(),
    seed: int = 0,
    overwrite: bool = False,
    test_volume: str | Path | None = None,
    test_mask: str | Path | None = None,
) -> dict[str, Any]:
    """Write the training slices and the lesion benchmark under ``out_dir``; returns the manifest.

    With ``test_volume`` (a T1 NIfTI of another brain, skull-stripped or with ``test_mask``) the
    test slices come from that brain instead of the template's held-out slices (the training
    slices stay the template's, so a model is judged on a subject it never saw); same lesion
    generator, same strata, same layout, and, for a brain in MNI space such as :data:`COLIN27`,
    the same axial levels as the template's test slices.

    Raises:
        DataError: ``out_dir`` holds an output (and ``overwrite`` is False), sizes leave no data,
            or the test volume cannot be read (named).
    """
    with storage.OutputLocation.use(out_dir, overwrite=overwrite) as loc:
        return _sample_brain(loc, cfg, sizes, seed, test_volume, test_mask)


def _sample_brain(
    loc: storage.OutputLocation,
    cfg: MriConfig,
    sizes: BrainSampleSizes,
    seed: int,
    test_volume: str | Path | None,
    test_mask: str | Path | None,
) -> dict[str, Any]:
    out = loc.staging
    if sizes.test_every < 2:
        raise DataError(f"test_every={sizes.test_every}: need at least 2 to keep training slices")
    if sizes.lesion < 1 and sizes.normal < 1:
        raise DataError("nothing to make: lesion and normal counts are both 0")
    rng = np.random.default_rng(seed)
    volume, mask = mni152()
    sl = volume_to_slices("nilearn:MNI152-T1-1mm", cfg, volume=volume, mask=mask.astype(np.uint8))
    size = cfg.image_size
    held = np.arange(len(sl.z)) % sizes.test_every == sizes.test_every // 2
    train_idx, test_idx = np.flatnonzero(~held), np.flatnonzero(held)
    test_sl, test_source = sl, "template: held-out slices"
    if test_volume is not None:
        test_sl, test_source = volume_to_slices(test_volume, cfg, test_mask), str(test_volume)
        test_idx = _test_levels(test_sl, sl.z[test_idx], sizes.test_every)

    tmp = out.with_name(out.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    bits = cfg.png_bits
    for i in train_idx:
        write_png(tmp / "train" / f"mni152_z{sl.z[i]:03d}.png", sl.images[i], bits)
    rows = _write_test_set(tmp / "test", test_sl, test_idx, sizes, cfg, rng)
    strata: dict[str, int] = {}
    for r in rows:
        strata[r["stratum"]] = strata.get(r["stratum"], 0) + 1
    manifest = {
        "format": FORMAT,
        "source": "nilearn MNI152 T1 template, 1 mm (load_mni152_template(resolution=1)) "
        "with its brain mask",
        "image_size": size,
        "png_bits": bits,
        "train": len(train_idx),
        "test_lesion": sizes.lesion,
        "test_normal": sizes.normal,
        "strata": dict(sorted(strata.items())),
        "test_source": test_source,
        "train_z": [int(z) for z in sl.z[train_idx]],
        "test_z": [int(z) for z in test_sl.z[test_idx]],
        "sizes": asdict(sizes),
        "seed": seed,
        "mri": cfg.model_dump(mode="json"),
        "layout": {
            "train": "healthy slices (PNG)",
            "test/images": "lesion_* and normal_* slices (PNG)",
            "test/masks": "same names; non-zero = lesion",
            "test/lesions.csv": "per-image lesion description",
        },
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    loc.install(tmp)
    return manifest


def _test_levels(test_sl: MriSlices, template_z: np.ndarray, test_every: int) -> np.ndarray:
    """Indices of the test brain's slices to test on: the template's held-out levels
    ``template_z`` where the other brain has them (both in MNI space: the same z is the same
    anatomical level), so the two test sets differ only in the subject; for a brain not in MNI
    space, every ``test_every``-th of its own slices instead."""
    test_idx = np.flatnonzero(np.isin(test_sl.z, template_z))
    if len(test_idx) == 0:
        test_idx = np.arange(len(test_sl.z))[test_every // 2 :: test_every]
    return test_idx


def _write_test_set(
    out: Path,
    test_sl: MriSlices,
    test_idx: np.ndarray,
    sizes: BrainSampleSizes,
    cfg: MriConfig,
    rng: np.random.Generator,
) -> list[dict[str, Any]]:
    """Write the lesion benchmark under ``out`` (``images/``, ``masks/``, ``lesions.csv``) from
    the slices ``test_idx`` of ``test_sl``: ``sizes.lesion`` slices with a drawn lesion, cycling
    through the small/medium/large strata, and ``sizes.normal`` lesion-free ones; returns the
    rows of ``lesions.csv``."""
    size, bits = cfg.image_size, cfg.png_bits
    # Lesions go on held-out slices with enough brain for a large lesion.
    area = test_sl.brain[test_idx].sum(axis=(1, 2))
    roomy = test_idx[area >= 0.5 * area.max()]
    rows: list[dict[str, Any]] = []
    strata_cycle = ["small", "medium", "large"]
    for n in range(sizes.lesion):
        i = roomy[n % len(roomy)]
        target = strata_cycle[n % 3]
        # Redraw until the lesion's final pixel count lands in the intended stratum (outlines and
        # the brain mask change the area from its target).
        for _ in range(50):
            image, lesion_mask, info = add_lesion(test_sl.images[i], test_sl.brain[i], target, rng)
            if stratum(int(lesion_mask.sum()), size) == target:
                break
        name = f"lesion_{n:03d}_z{test_sl.z[i]:03d}.png"
        area_px = int(lesion_mask.sum())
        if stratum(area_px, size) != target:  # kept: lesions.csv records both strata
            log.warning("%s: no %s lesion in 50 draws; kept one of %d px", name, target, area_px)
        write_png(out / "images" / name, image, bits)
        write_png(out / "masks" / name, lesion_mask)
        rows.append(
            {"name": name, "kind": "lesion", "z": int(test_sl.z[i]), "area": area_px,
             "stratum": stratum(area_px, size), **info}
        )  # fmt: skip
    for n in range(sizes.normal):
        i = test_idx[(n * 7) % len(test_idx)]  # spread over the held-out range
        name = f"normal_{n:03d}_z{test_sl.z[i]:03d}.png"
        write_png(out / "images" / name, test_sl.images[i], bits)
        write_png(out / "masks" / name, np.zeros((size, size), dtype=bool))
        rows.append(
            {"name": name, "kind": "normal", "z": int(test_sl.z[i]), "area": 0, "stratum": "none"}
        )

    fields = ["name", "kind", "z", "area", "stratum", "target_stratum", "contrast", "edge",
              "shape", "intensity_change"]  # fmt: skip
    with open(out / "lesions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return rows


def is_complete(out_dir: str | Path) -> bool:
    return (Path(out_dir) / MANIFEST).is_file()


def add_lesion(
    image: np.ndarray, brain: np.ndarray, target: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Blend one synthetic lesion into ``image`` (S, S) inside ``brain`` (S, S).

    ``target`` is the size stratum to aim for. Returns (image with lesion, lesion mask, info).
    """
    from scipy import ndimage

    size = image.shape[0]
    scale = (size / 128.0) ** 2
    lo, hi = TARGET_AREA_128[target]
    area = float(np.exp(rng.uniform(np.log(lo * scale), np.log(hi * scale))))
    aspect = rng.uniform(1.0, 2.2)
    a = np.sqrt(area / np.pi * aspect)
    b = np.sqrt(area / np.pi / aspect)
    theta = rng.uniform(0, np.pi)
    irregular = bool(rng.random() < 0.5)
    soft = bool(rng.random() < 0.5)
    hyper = bool(rng.random() < 0.35)

    # Centre: a brain pixel deep enough for the lesion's short axis to stay inside.
    depth = ndimage.distance_transform_edt(brain)
    ok = np.argwhere(depth >= max(1.5, 0.9 * b))
    if len(ok) == 0:
        ok = np.argwhere(depth >= depth.max() * 0.8)
    cy, cx = ok[rng.integers(len(ok))]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
    d = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    if irregular:
        field = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma=max(1.0, b / 2))
        field /= field.std() + 1e-8
        d = d + rng.uniform(0.15, 0.35) * field
    shape = (d < 1.0).astype(np.float64)
    alpha = ndimage.gaussian_filter(shape, sigma=rng.uniform(0.8, 1.6) if soft else 0.35)
    alpha = np.clip(alpha, 0.0, 1.0) * brain

    inside = alpha >= 0.5
    local = float(image[inside].mean()) if inside.any() else float(image[brain].mean())
    if hyper and local + 0.15 > 1.0:
        hyper = False  # no headroom for a bright lesion in bright tissue: make it dark instead
    level = min(1.0, local + rng.uniform(0.2, 0.45)) if hyper else local * rng.uniform(0.15, 0.55)
    texture = level + ndimage.gaussian_filter(rng.standard_normal((size, size)), 1.0) * 0.03
    out = np.clip((1 - alpha) * image + alpha * texture, 0.0, 1.0).astype(np.float32)
    info = {
        "target_stratum": target,
        "contrast": "hyper" if hyper else "hypo",
        "edge": "soft" if soft else "sharp",
        "shape": "irregular" if irregular else "ellipse",
        "intensity_change": round(level - local, 3),
    }
    return out, inside, info
