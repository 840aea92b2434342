"""Small brain volumes for the volume and DICOM tests: nilearn's bundled MNI152 T1 template,
resampled coarse (fast), stored under any affine (oblique, flipped, anisotropic), with a
synthetic lesion drawn at known voxels."""

from __future__ import annotations

import functools

import numpy as np

from meddiff.data.volumes import Volume

PLANTED_NAME = "Planted^Patient^Zq7"  # searched for in logs, MLflow and file names
PLANTED_ID = "PID-ZQ7-0042"


@functools.lru_cache(maxsize=4)
def _template(voxel_mm: tuple[float, float, float]) -> np.ndarray:
    from scipy import ndimage

    from meddiff.data.brain import mni152

    vol, mask = mni152()  # canonical RAS, 1 mm
    vol = np.where(mask, vol, 0.0)
    out = ndimage.zoom(vol, [1.0 / v for v in voxel_mm], order=1)
    return np.clip(out, 0, None).astype(np.float32)


def rotation(degrees: float, axis: int = 2) -> np.ndarray:
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def brain(
    voxel_mm: tuple[float, float, float] = (3.0, 3.0, 3.0),
    *,
    flip: tuple[bool, bool, bool] = (False, False, False),
    permute: tuple[int, int, int] = (0, 1, 2),
    degrees: float = 0.0,
) -> Volume:
    """The template at ``voxel_mm`` (RAS axes), its voxel axes then flipped/permuted and its
    world axes rotated by ``degrees`` about the superior axis; the affine says so, so the anatomy
    in world space is the same whatever the storage."""
    ras = _template(tuple(voxel_mm))
    affine = np.diag([*voxel_mm, 1.0])
    affine[:3, 3] = -np.asarray(ras.shape) * np.asarray(voxel_mm) / 2
    data = ras
    for axis, f in enumerate(flip):
        if f:
            data = np.flip(data, axis)
            affine = affine @ _flip_affine(axis, ras.shape[axis])
    data = np.transpose(data, permute)
    perm = np.eye(4)
    perm[:3, :3] = np.eye(3)[:, list(permute)]
    affine = affine @ perm
    rot = np.eye(4)
    rot[:3, :3] = rotation(degrees)
    return Volume(np.ascontiguousarray(data), rot @ affine, "template")


def _flip_affine(axis: int, n: int) -> np.ndarray:
    f = np.eye(4)
    f[axis, axis] = -1.0
    f[axis, 3] = n - 1
    return f


def draw_lesion(
    volume: Volume, radius_mm: float = 12.0, offset_mm=(18.0, 10.0, 12.0), factor: float = 1.8
) -> tuple[Volume, np.ndarray]:
    """A bright ball (``factor`` × the local intensity) of ``radius_mm`` at ``offset_mm`` from
    the brain's centre of mass (world mm), inside the brain; returns the new volume and the
    lesion's voxel mask (I, J, K) on its grid."""
    data = volume.data
    ijk = np.indices(data.shape).reshape(3, -1).T
    world = (volume.affine[:3, :3] @ ijk.T).T + volume.affine[:3, 3]
    inside = data.reshape(-1) > 0
    centre = world[inside].mean(axis=0) + np.asarray(offset_mm)
    ball = (np.linalg.norm(world - centre, axis=1) <= radius_mm) & inside
    mask = ball.reshape(data.shape)
    out = data.copy()
    out[mask] = np.clip(out[mask] * factor, 0, data.max())
    return Volume(out, volume.affine, volume.source), mask
