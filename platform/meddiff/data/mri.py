"""NIfTI brain volumes to 2D axial slices in [0, 1], the input of anomaly detection.

Steps, each a function so tools and tests can use them alone:

1. ``read_volume``: read with nibabel and reorient to the closest canonical RAS orientation
   (voxel axes: +x toward patient Right, +y Anterior, +z Superior), whatever the file's own axes;
   keep the voxel sizes (mm) from the header, or from ``data.mri.voxel_size`` when set (an
   explicit setting wins over the header; sizes outside what scanners produce are refused).
2. ``brain_mask``: a given mask volume (non-zero = brain), else the head found by
   ``foreground`` (Otsu's threshold, the largest connected component, holes filled; then the
   voxels above the background's noise connected to it), so the noise around a scanner's head
   is neither sliced nor counted in the intensity window; a warning when most of the voxels
   above ``brain_threshold`` are such background.
3. ``normalize_intensity``: robust window from percentiles of the brain voxels (1st and 99th by
   default) mapped to [0, 1], clipped; voxels outside the brain are 0. One window per volume, so
   slices of a volume stay comparable.
4. ``axial_slices``: one (rows, cols) image per z, shown with anterior at the top and the
   patient's right on the image's right (neurological convention).
5. ``volume_to_slices``: keep slices whose brain area is at least ``min_brain_fraction`` of the
   largest, resample them to isotropic in-plane spacing when the voxels are anisotropic in the
   axial plane (or refuse, with ``resample: false``), crop every slice to one square box around
   the volume's brain (plus ``margin``), and resize to ``image_size`` (anti-aliased for images,
   nearest for masks).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meddiff.config.data import MriConfig
from meddiff.errors import DataError

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Voxel edges scanners produce, in mm: micro-CT/MRI reach about 0.01 mm, thick clinical slices
# about 10 mm. Outside, the header is wrong (zeros, or units lost), not the scan.
PLAUSIBLE_VOXEL_MM = (0.005, 30.0)
# Relative difference of the in-plane voxel sizes below which a volume counts as isotropic.
ANISOTROPY_TOLERANCE = 0.01
_TO_MM = {"mm": 1.0, "meter": 1000.0, "micron": 0.001, "unknown": 1.0}
# Voxels between the head and the background sample used to measure the noise level (partial
# volume at the head's edge is neither).
BACKGROUND_GAP = 3
# Warn when more than this share of the voxels above data.mri.brain_threshold is background.
BACKGROUND_WARNING = 0.5


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def load_volume(
    path: str | Path, voxel_size: tuple[float, float, float] | None = None
) -> np.ndarray:
    """A 3D NIfTI volume reoriented to canonical RAS, float32 (X, Y, Z) (see :func:`read_volume`)."""
    return read_volume(path, voxel_size)[0]


def read_volume(
    path: str | Path, voxel_size: tuple[float, float, float] | None = None
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A 3D NIfTI volume reoriented to canonical RAS, float32 (X, Y, Z), and its voxel sizes in
    mm along X, Y, Z. ``voxel_size`` (mm, along the file's own axes) replaces the header's.

    Raises:
        DataError: missing, unreadable, not 3D (a trailing singleton 4th axis is accepted),
            non-finite values, or implausible header voxel sizes (naming ``data.mri.voxel_size``).
    """
    import nibabel as nib

    path = Path(path)
    img = _open_header(path, voxel_size)
    try:
        canonical = nib.as_closest_canonical(img)
        data = np.asarray(canonical.dataobj, dtype=np.float32)
    except Exception as err:  # nibabel raises ImageFileError, EOFError, zlib errors, ...
        raise DataError(f"{path}: not a readable NIfTI volume ({err})") from None
    if data.ndim == 4:
        data = data[..., 0]
    if not np.isfinite(data).all():
        raise DataError(f"{path}: volume holds NaN or infinite values")
    # The canonical affine's column norms are the voxel sizes along X, Y, Z (file units).
    unit = _TO_MM[_space_unit(canonical)]
    spacing = np.linalg.norm(canonical.affine[:3, :3], axis=0) * unit
    return data, (float(spacing[0]), float(spacing[1]), float(spacing[2]))


def check_volume(path: str | Path, voxel_size: tuple[float, float, float] | None = None) -> None:
    """Validate a NIfTI file from its header alone (shape, voxel sizes): cheap, so a bad volume
    fails on the driver before any Ray task starts.

    Raises:
        DataError: as :func:`read_volume` for everything the header tells.
    """
    _open_header(Path(path), voxel_size)


def _open_header(path: Path, voxel_size: tuple[float, float, float] | None):
    """The nibabel image (data not read) with checked shape and voxel sizes; ``voxel_size`` (mm,
    file axes) is written into its affine so reorientation carries it along."""
    import nibabel as nib

    if not path.is_file():
        raise DataError(f"NIfTI volume {path} does not exist")
    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
    except Exception as err:
        raise DataError(f"{path}: not a readable NIfTI volume ({err})") from None
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
        raise DataError(f"{path}: volume has shape {shape}; expected a 3D volume")
    unit = _TO_MM[_space_unit(img)]
    axes = np.linalg.norm(img.affine[:3, :3], axis=0)
    if voxel_size is not None:
        # Keep the direction of each axis, replace its length: the explicit setting wins.
        scale = np.asarray(voxel_size, dtype=float) / unit / np.where(axes > 0, axes, 1.0)
        affine = img.affine.copy()
        affine[:3, :3] = affine[:3, :3] * scale
        if np.any(axes <= 0):
            affine[:3, :3] = np.diag(np.asarray(voxel_size, dtype=float) / unit)
        return nib.Nifti1Image(img.dataobj, affine, img.header)
    lo, hi = PLAUSIBLE_VOXEL_MM
    mm = axes * unit
    if not (np.isfinite(mm).all() and (mm >= lo).all() and (mm <= hi).all()):
        shown = ", ".join(f"{v:g}" for v in mm)
        raise DataError(
            f"{path}: its header gives voxel sizes ({shown}) mm, outside what scanners produce "
            f"({lo:g}-{hi:g} mm); set data.mri.voxel_size to the true sizes along the file's "
            "axes (e.g. --set data.mri.voxel_size=[1,1,1])"
        )
    return img


def _space_unit(img) -> str:
    try:
        unit = img.header.get_xyzt_units()[0]
    except Exception:  # headers of other formats have no units: millimetres by convention
        return "mm"
    return unit if unit in _TO_MM else "mm"


def brain_mask(
    volume: np.ndarray, mask: np.ndarray | None = None, threshold: float = 0.0
) -> np.ndarray:
    """Boolean brain mask (X, Y, Z): ``mask != 0`` if given, else :func:`foreground`."""
    if mask is not None:
        if mask.shape != volume.shape:
            raise DataError(f"brain mask has shape {mask.shape} but the volume has {volume.shape}")
        return mask != 0
    return foreground(volume, threshold)


def foreground(volume: np.ndarray, threshold: float = 0.0) -> np.ndarray:
    """The head of a volume without a mask (X, Y, Z) → bool (X, Y, Z): voxels above
    ``threshold`` and above the background's noise, connected to the head.

    Scanners' magnitude images carry noise in the air around the head (Rician, a few per cent of
    tissue intensity), so "above 0" is the whole volume there. The head: voxels above Otsu's
    threshold (skimage) of the volume, its largest connected component, holes filled (scipy).
    The noise level: the 99.9th percentile of the voxels more than :data:`BACKGROUND_GAP` voxels
    from the head (0 for a skull-stripped volume, whose background is exactly 0). The mask: the
    voxels above max(``threshold``, noise level) in connected components that touch the head
    (hysteresis, so dark tissue at the head's edge, such as CSF below Otsu's threshold, stays).
    On a clean skull-stripped volume this is ``volume > threshold`` less stray islands.
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    if not (volume > threshold).any():
        return np.zeros(volume.shape, dtype=bool)
    head = _largest_component(volume > threshold_otsu(volume))
    head = ndimage.binary_fill_holes(head)
    near = ndimage.binary_dilation(head, iterations=BACKGROUND_GAP)
    outside = volume[~near]
    noise = float(np.percentile(outside, 99.9)) if outside.size else threshold
    above = volume > max(threshold, noise)
    labels, _ = ndimage.label(above)
    touching = np.unique(labels[head & above])
    return np.isin(labels, touching[touching > 0])


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def background_share(volume: np.ndarray, brain: np.ndarray, threshold: float = 0.0) -> float:
    """The share of the voxels above ``threshold`` that lie outside ``brain`` (0 when none is
    above it): background that "above the threshold" alone would have taken for the head."""
    above = volume > threshold
    n = int(above.sum())
    return float((above & ~brain).sum() / n) if n else 0.0


def normalize_intensity(
    volume: np.ndarray, brain: np.ndarray, percentiles: tuple[float, float] = (1.0, 99.0)
) -> np.ndarray:
    """Map the ``percentiles`` of the brain voxels to [0, 1] (clipped); outside the brain is 0."""
    values = volume[brain]
    if values.size == 0:
        raise DataError("the brain mask is empty: nothing to normalise")
    lo, hi = np.percentile(values, percentiles)
    if hi <= lo:
        raise DataError(
            f"brain intensities are constant between the {percentiles} percentiles ({lo}); "
            "cannot normalise"
        )
    out = np.clip((volume - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    out[~brain] = 0.0
    return out


def axial_slices(volume: np.ndarray) -> np.ndarray:
    """(X, Y, Z) RAS volume → (Z, Y, X) slices with anterior at the top (rows run anterior to
    posterior) and the patient's right on the right (columns run left to right)."""
    return np.ascontiguousarray(np.transpose(volume, (2, 1, 0))[:, ::-1, :])


def square_box(brain: np.ndarray, margin: float) -> tuple[int, int, int]:
    """(row0, col0, side): a square around the union of brain pixels of (N, H, W) slices, grown by
    ``margin`` of its side. The box may extend past the slice (padded with zeros when cut)."""
    any_brain = brain.any(axis=0)
    rows = np.flatnonzero(any_brain.any(axis=1))
    cols = np.flatnonzero(any_brain.any(axis=0))
    if rows.size == 0:
        raise DataError("no brain voxels in any slice")
    h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    side = int(np.ceil(max(h, w) * (1 + 2 * margin)))
    r0 = int(rows[0] + h / 2 - side / 2)
    c0 = int(cols[0] + w / 2 - side / 2)
    return r0, c0, side


def crop_square(slices: np.ndarray, box: tuple[int, int, int]) -> np.ndarray:
    """Cut the square ``box`` from (N, H, W) slices, padding with zeros outside them."""
    r0, c0, side = box
    n, h, w = slices.shape
    pad = max(0, -r0, -c0, r0 + side - h, c0 + side - w)
    padded = np.pad(slices, ((0, 0), (pad, pad), (pad, pad)))
    return padded[:, r0 + pad : r0 + pad + side, c0 + pad : c0 + pad + side]


def isotropic_in_plane(
    slices: np.ndarray, spacing: tuple[float, float, float], order: int = 1
) -> np.ndarray:
    """(N, rows, cols) axial slices of a volume with RAS voxel sizes ``spacing`` (X, Y, Z mm),
    resampled so a pixel is square: the coarser in-plane axis is interpolated to the finer one's
    spacing (scipy, linear for images; masks thresholded at 0.5). Unchanged when isotropic."""
    from scipy import ndimage

    sx, sy = spacing[0], spacing[1]  # columns run along X, rows along Y
    fine = min(sx, sy)
    if abs(sx - sy) <= ANISOTROPY_TOLERANCE * fine:
        return slices
    factors = (1.0, sy / fine, sx / fine)
    if slices.dtype == bool:
        mask = slices.astype(np.float32)
        return ndimage.zoom(mask, factors, order=1, grid_mode=True, mode="grid-constant") >= 0.5
    out = ndimage.zoom(slices, factors, order=order, grid_mode=True, mode="grid-constant")
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def resize_slices(slices: np.ndarray, size: int, order: int = 1) -> np.ndarray:
    """Resize (N, S, S) to (N, size, size); order 1 anti-aliased for images, 0 for masks."""
    from skimage.transform import resize

    if slices.shape[1:] == (size, size):
        return slices.copy()
    if order == 0:
        out = resize(
            slices.astype(np.float32), (len(slices), size, size), order=1, anti_aliasing=False
        )
        return out >= 0.5
    out = resize(slices, (len(slices), size, size), order=order, anti_aliasing=True)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


@dataclass
class MriSlices:
    """Axial slices of one volume."""

    source: str
    images: np.ndarray  # float32 (N, S, S) in [0, 1]
    brain: np.ndarray  # bool (N, S, S)
    z: np.ndarray  # int64 (N,) index of each slice along the canonical superior axis
    # How the slices were cut, so maps can be put back (meddiff.data.volumes): the square box
    # (row0, col0, side) in the in-plane-isotropic slices, whose (rows, cols) is ``plane``.
    box: tuple[int, int, int] = (0, 0, 0)
    plane: tuple[int, int] = (0, 0)


def volume_to_slices(
    path: str | Path,
    cfg: MriConfig,
    mask_path: str | Path | None = None,
    *,
    volume: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> MriSlices:
    """Slice a NIfTI volume (or an already loaded RAS ``volume`` with voxel sizes ``spacing``)
    into normalised square slices, in-plane isotropic (see :func:`isotropic_in_plane`).

    Raises:
        DataError: unreadable or implausible volume, empty brain, or voxels anisotropic in the
            axial plane while ``cfg.resample`` is false.
    """
    if volume is None:
        vol, spacing = read_volume(path, cfg.voxel_size)
    else:
        vol = volume
    sx, sy = spacing[0], spacing[1]
    if not cfg.resample and abs(sx - sy) > ANISOTROPY_TOLERANCE * min(sx, sy):
        raise DataError(
            f"{path}: voxels are {sx:g} x {sy:g} mm in the axial plane; slicing them unresampled "
            "would squash the anatomy; set data.mri.resample=true to resample them to "
            "isotropic spacing"
        )
    if mask is None and mask_path is not None:
        mask = load_volume(mask_path, cfg.voxel_size)
        if mask.shape != vol.shape:
            raise DataError(
                f"{mask_path}: brain mask has shape {mask.shape} but {path} has {vol.shape}"
            )
    brain = brain_mask(vol, mask, cfg.brain_threshold)
    if mask is None:
        share = background_share(vol, brain, cfg.brain_threshold)
        if share > BACKGROUND_WARNING:
            log.warning(
                "%s: %.0f%% of the voxels above data.mri.brain_threshold=%g are background "
                "(noise around the head), not head; slices are chosen and normalised over the "
                "head found in it (%d voxels). Give a brain mask volume if that is wrong",
                path, 100 * share, cfg.brain_threshold, int(brain.sum()),
            )  # fmt: skip
    norm = normalize_intensity(vol, brain, cfg.percentiles)
    images, brains = axial_slices(norm), axial_slices(brain)
    area = brains.sum(axis=(1, 2))
    keep = np.flatnonzero(area >= max(1, cfg.min_brain_fraction * area.max()))
    images = isotropic_in_plane(images[keep], spacing)
    brains = isotropic_in_plane(brains[keep], spacing)
    box = square_box(brains, cfg.margin)
    return MriSlices(
        source=str(path),
        images=resize_slices(crop_square(images, box), cfg.image_size),
        brain=resize_slices(crop_square(brains, box), cfg.image_size, order=0),
        z=keep.astype(np.int64),
        box=box,
        plane=(int(images.shape[1]), int(images.shape[2])),
    )


class NiftiSlicer:
    """Ray Data stage: rows ``{"path": str}`` of NIfTI files → rows of slices.

    Output columns: ``image`` float32 (S, S), ``source`` str, ``index`` int64 (z). Used with
    ``flat_map`` so one volume becomes many rows.
    """

    def __init__(self, cfg: MriConfig):
        self.cfg = cfg

    def __call__(self, row: dict) -> list[dict]:
        sl = volume_to_slices(row["path"], self.cfg)
        return [
            {"image": img, "source": sl.source, "index": int(z)}
            for img, z in zip(sl.images, sl.z, strict=True)
        ]
