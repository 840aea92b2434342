"""Whole volumes in and out of slice-wise anomaly detection.

A model sees 2D axial slices cut by :mod:`meddiff.data.mri` (canonical RAS orientation, in-plane
isotropic resampling, one intensity window per volume, a square box around the brain, the model's
size). This module keeps how a given volume was cut (:class:`SliceGeometry`) and puts per-slice
results back into the **input's own voxel grid** (:func:`unslice`: resize to the box, uncrop,
undo the in-plane resampling, undo the axial view and the reorientation), so a map saved with the
input's affine lies on the input voxel for voxel. Masks in the input's grid go the other way
(:func:`slice_mask`), to be compared with maps slice by slice.

Everything here is a pure function of arrays (no files), so the CLI, a service route or a test
can call it alike; :func:`read_nifti` and :func:`nifti_bytes` are the file ends.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meddiff.config.data import MriConfig
from meddiff.data import mri
from meddiff.errors import DataError


@dataclass(frozen=True)
class Volume:
    """A 3D scan in its own voxel order.

    ``data`` float32 (I, J, K); ``affine`` float64 (4, 4): voxel (i, j, k, 1) → RAS+ millimetres
    (the NIfTI convention; DICOM's LPS is converted by :mod:`meddiff.data.dicom`). ``source`` is
    a label for messages (a path, never a patient identifier).
    """

    data: np.ndarray
    affine: np.ndarray
    source: str


@dataclass(frozen=True)
class SliceGeometry:
    """How :func:`slice_volume` cut a volume: enough to invert it exactly.

    ``shape`` (I, J, K) and ``affine`` are the input's; ``ornt`` is nibabel's orientation of the
    input's axes (``io_orientation``); ``canonical_shape`` (X, Y, Z) the reoriented grid; ``z``
    the canonical axial index of each kept slice; ``plane`` the (rows, cols) of a slice after
    in-plane resampling; ``box`` the square (row0, col0, side) cut from it; ``image_size`` the
    model's side.
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    ornt: np.ndarray
    canonical_shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    z: np.ndarray
    plane: tuple[int, int]
    box: tuple[int, int, int]
    image_size: int

    @property
    def voxel_mm3(self) -> float:
        """Volume of one input voxel in mm³."""
        return float(abs(np.linalg.det(self.affine[:3, :3])))


def read_nifti(path: str | Path, cfg: MriConfig) -> tuple[Volume, np.ndarray, tuple]:
    """A NIfTI file as a :class:`Volume` (its own voxel order and affine), plus its canonical RAS
    data and voxel sizes as :func:`meddiff.data.mri.read_volume` reads them (``cfg.voxel_size``
    wins over the header).

    Raises:
        DataError: as :func:`meddiff.data.mri.read_volume` (missing, unreadable, not 3D, bad
            voxel sizes), naming the file.
    """
    import nibabel as nib

    canonical, spacing = mri.read_volume(path, cfg.voxel_size)
    img = nib.load(str(path))
    shape = tuple(int(s) for s in img.shape[:3])
    data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    return Volume(data, np.asarray(img.affine, dtype=np.float64), str(path)), canonical, spacing


def canonical(volume: Volume) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    """``volume`` reoriented to the closest canonical RAS grid (nibabel), its voxel sizes (mm,
    along X, Y, Z) and the orientation of the input's axes (to undo it)."""
    import nibabel as nib

    ornt = _orientation(volume.affine)
    img = nib.Nifti1Image(volume.data, volume.affine)
    data = np.asarray(nib.orientations.apply_orientation(volume.data, ornt), dtype=np.float32)
    reoriented = img.affine @ nib.orientations.inv_ornt_aff(ornt, img.shape)
    spacing = np.linalg.norm(reoriented[:3, :3], axis=0)
    return data, (float(spacing[0]), float(spacing[1]), float(spacing[2])), ornt


def _orientation(affine: np.ndarray) -> np.ndarray:
    import nibabel as nib

    if np.any(np.linalg.norm(affine[:3, :3], axis=0) <= 0):
        raise DataError("the volume's affine has a zero-length axis; cannot orient it")
    return nib.orientations.io_orientation(affine)


def slice_volume(
    volume: Volume,
    cfg: MriConfig,
    *,
    data: np.ndarray | None = None,
    spacing: tuple[float, float, float] | None = None,
) -> tuple[mri.MriSlices, SliceGeometry]:
    """Cut ``volume`` into the model's slices by the rules of :func:`meddiff.data.mri.
    volume_to_slices`, and record how (to invert with :func:`unslice`). ``data``/``spacing``: the
    canonical grid when already read (:func:`read_nifti`), else computed here.

    Returns ``(slices, geometry)``: ``slices.images`` float32 (N, S, S) in [0, 1] with S =
    ``cfg.image_size``.

    Raises:
        DataError: not 3D, an empty brain, anisotropic voxels with ``resample: false``.
    """
    if volume.data.ndim != 3:
        raise DataError(f"{volume.source}: volume has shape {volume.data.shape}; expected 3D")
    ornt = _orientation(volume.affine)
    if data is None or spacing is None:
        data, spacing, ornt = canonical(volume)
    sl = mri.volume_to_slices(volume.source, cfg, volume=data, spacing=spacing)
    geometry = SliceGeometry(
        shape=tuple(int(s) for s in volume.data.shape),
        affine=np.asarray(volume.affine, dtype=np.float64),
        ornt=ornt,
        canonical_shape=tuple(int(s) for s in data.shape),
        spacing=tuple(float(s) for s in spacing),
        z=sl.z.copy(),
        plane=sl.plane,
        box=sl.box,
        image_size=cfg.image_size,
    )
    return sl, geometry


def unslice(maps: np.ndarray, geometry: SliceGeometry) -> np.ndarray:
    """Per-slice maps (N, S, S), one per kept slice in ``geometry.z`` order, as a float32 volume
    (I, J, K) in the input's voxel grid: resized to the crop box (linear), uncropped into the
    resampled plane, resampled back to the canonical voxel grid, placed at their axial index, and
    reoriented to the input's axes. Voxels of slices that were not kept, and outside the box,
    are 0.

    Raises:
        DataError: ``maps`` do not match the geometry (count or size).
    """
    from skimage.transform import resize

    n, size = len(geometry.z), geometry.image_size
    if maps.shape != (n, size, size):
        raise DataError(f"maps have shape {maps.shape}; this volume's slices are {(n, size, size)}")
    r0, c0, side = geometry.box
    rows, cols = geometry.plane
    boxed = resize(maps.astype(np.float32), (n, side, side), order=1, anti_aliasing=side < size)
    plane = np.zeros((n, rows, cols), dtype=np.float32)
    # The box may reach past the plane (crop_square padded it): keep the overlap only.
    pr0, pc0 = max(r0, 0), max(c0, 0)
    pr1, pc1 = min(r0 + side, rows), min(c0 + side, cols)
    plane[:, pr0:pr1, pc0:pc1] = boxed[:, pr0 - r0 : pr1 - r0, pc0 - c0 : pc1 - c0]
    nx, ny, nz = geometry.canonical_shape
    if (rows, cols) != (ny, nx):  # undo isotropic_in_plane
        plane = resize(plane, (n, ny, nx), order=1, anti_aliasing=False).astype(np.float32)
    ras = np.zeros((nx, ny, nz), dtype=np.float32)
    # Undo axial_slices: rows ran anterior → posterior (Y reversed), columns along X.
    ras[:, :, geometry.z] = np.transpose(plane[:, ::-1, :], (2, 1, 0))
    return _from_canonical(ras, geometry)


def slice_mask(mask: np.ndarray, geometry: SliceGeometry, source: str = "mask") -> np.ndarray:
    """A mask (I, J, K) in the input's grid (non-zero = lesion) cut like the volume's slices:
    bool (N, S, S), one per kept slice (the forward path of :func:`unslice`, nearest-neighbour
    in effect: resampled linearly and thresholded at 0.5, as :mod:`meddiff.data.mri` does).

    Raises:
        DataError: the mask's shape is not the volume's (naming ``source``).
    """
    if tuple(mask.shape) != geometry.shape:
        raise DataError(
            f"{source}: mask has shape {tuple(mask.shape)} but the volume has {geometry.shape}; "
            "masks must be in the volume's own voxel grid"
        )
    import nibabel as nib

    ras = nib.orientations.apply_orientation(np.asarray(mask) != 0, geometry.ornt)
    slices = mri.axial_slices(ras)[geometry.z]
    slices = mri.isotropic_in_plane(slices.astype(bool), geometry.spacing)
    cropped = mri.crop_square(slices, geometry.box)
    return mri.resize_slices(cropped, geometry.image_size, order=0)


def _from_canonical(ras: np.ndarray, geometry: SliceGeometry) -> np.ndarray:
    import nibabel as nib

    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), geometry.ornt)
    out = np.ascontiguousarray(nib.orientations.apply_orientation(ras, back), dtype=np.float32)
    if out.shape != geometry.shape:  # a bug, not bad input
        raise AssertionError(f"unslice gave {out.shape}, expected {geometry.shape}")
    return out


def nifti_bytes(data: np.ndarray, affine: np.ndarray, description: str = "") -> bytes:
    """A gzipped NIfTI-1 file (bytes) holding float32 ``data`` with ``affine`` (sform and qform,
    scanner space, mm)."""
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm")
    if description:
        img.header["descrip"] = description[:79].encode()
    return gzip.compress(img.to_bytes(), mtime=0)
