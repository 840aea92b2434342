"""DICOM series in, checked, as one volume; synthetic MR series out (tests, benchmarks, demos).

A series is a stack of parallel slices sharing one Frame of Reference: single-frame instances
(MR Image Storage, one slice each) or an enhanced multi-frame instance (Enhanced MR Image Storage,
its frames' positions in the per-frame functional groups). :func:`series_from_datasets` orders
the slices along the normal of their orientation (Image Orientation Patient), checks that they
form one regular grid, applies each slice's rescale, and returns a :class:`DicomSeries`: a
:class:`meddiff.data.volumes.Volume` (data (columns, rows, slices) with the affine converted from
DICOM's LPS to the RAS+ convention of NIfTI) plus the source instances in slice order, which the
DICOM results (:mod:`meddiff.data.dicom_results`) reference.

Bad series are refused with one line naming the file and the problem (DataError): instances of
two series, a gap in the slice positions (a missing slice), steps or pixel spacings that differ,
two slices at one position, mixed orientations or sizes, colour data, and compressed pixel data
that no installed decoder reads (naming the transfer syntax and the packages that decode it).
Localizers (scouts) mixed into the series are excluded, each with a logged note: an instance
whose Image Type says LOCALIZER, or a few whose orientation differs from the rest of the stack.

Everything takes and returns pydicom datasets and arrays, so a CLI, a DICOMweb client and a
service route share it; :func:`read_folder` is the file end.

Geometry follows DICOM PS3.3 C.7.6.2 (Image Plane Module): the first three values of Image
Orientation Patient are the direction of a row (increasing column index), the last three the
direction of a column; Pixel Spacing is (between rows, between columns) in mm.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from meddiff.data.volumes import Volume
from meddiff.errors import DataError

log = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Two orientations within this (direction cosines) are the same plane.
ORIENTATION_TOLERANCE = 1e-3
# At most this many instances of another orientation are taken for localizers and excluded.
MAX_LOCALIZERS = 3


@dataclass
class _Slice:
    name: str  # file name, "#N" appended for frame N (1-based) of a multi-frame instance
    dataset: Any  # pydicom Dataset
    frame: int | None  # 0-based frame of a multi-frame instance
    position: np.ndarray  # (3,) Image Position Patient, mm (LPS)
    orientation: np.ndarray  # (6,) Image Orientation Patient
    spacing: tuple[float, float]  # Pixel Spacing: between rows, between columns (mm)
    rescale: tuple[float, float]  # slope, intercept


@dataclass
class DicomSeries:
    """One checked series as a volume.

    ``volume.data`` float32 (columns, rows, slices), rescaled values; ``volume.affine`` RAS+ mm.
    ``sources`` are the instances the slices came from, in slice order (one per slice, or the one
    multi-frame instance); ``frames[k]`` is the index of slice k among the sources' frames (the
    source's frame order, which DICOM results must follow). ``notes`` say what was excluded.
    """

    volume: Volume
    sources: list[Any]
    frames: np.ndarray
    notes: list[str] = field(default_factory=list)

    @property
    def study_uid(self) -> str:
        return str(self.sources[0].StudyInstanceUID)

    @property
    def series_uid(self) -> str:
        return str(self.sources[0].SeriesInstanceUID)

    @property
    def frame_of_reference_uid(self) -> str:
        return str(self.sources[0].FrameOfReferenceUID)

    def to_frames(self, volume: np.ndarray) -> np.ndarray:
        """A volume (columns, rows, slices) in this series' grid as frames (n, rows, columns) in
        the sources' frame order (what a SEG or parametric map of these sources holds)."""
        slices = np.transpose(volume, (2, 1, 0))
        out = np.empty_like(slices)
        out[self.frames] = slices
        return out


def is_dicom_file(path: str | Path) -> bool:
    """True when ``path`` is a DICOM Part 10 file (``DICM`` after the 128-byte preamble)."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_folder(path: str | Path) -> bool:
    """True when ``path`` is a folder whose files include a DICOM file (first ones checked)."""
    root = Path(path)
    if not root.is_dir():
        return False
    files = [p for p in sorted(root.iterdir()) if p.is_file() and not p.name.startswith(".")]
    return any(p.suffix.lower() == ".dcm" or is_dicom_file(p) for p in files[:16])


def read_folder(folder: str | Path) -> list[tuple[str, Any]]:
    """(file name, dataset) of every non-hidden file of ``folder``, sorted by name.

    Raises:
        DataError: no such folder, no files, or a file that is not DICOM (named).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"DICOM folder {root} does not exist")
    files = [p for p in sorted(root.iterdir()) if p.is_file() and not p.name.startswith(".")]
    if not files:
        raise DataError(f"{root}: no DICOM files")
    out = []
    for p in files:
        try:
            out.append((p.name, pydicom.dcmread(p)))
        except (InvalidDicomError, OSError, ValueError, EOFError) as err:
            raise DataError(f"{p}: not a readable DICOM file ({_first_line(err)})") from None
    return out


def series_from_datasets(
    items: Sequence[tuple[str, Any]], source: str, tolerance: float = 0.05
) -> DicomSeries:
    """Check ``items`` ((name, dataset) pairs, the instances of one series) and stack them into a
    volume (module docstring). ``source`` names the folder or location in messages; ``tolerance``
    is ``data.dicom.spacing_tolerance``.

    Raises:
        DataError: one line naming the instance and the problem (module docstring).
    """
    if not items:
        raise DataError(f"{source}: no DICOM instances")
    notes: list[str] = []
    slices: list[_Slice] = []
    for name, ds in items:
        if _is_localizer(ds):
            notes.append(f"{name}: a localizer (Image Type LOCALIZER); excluded")
            continue
        slices.extend(_slices(name, ds))
    if not slices:
        raise DataError(f"{source}: only localizers, no image slices")
    _check_one_series(slices, source)
    slices, more = _drop_stray_orientations(slices, source)
    notes += more
    _check_grid(slices, tolerance)
    ordered, steps = _order(slices, tolerance)
    for note in notes:
        log.warning("%s", note)
    return _stack(ordered, steps, source, notes)


def _slices(name: str, ds: Any) -> list[_Slice]:
    """The slices of one instance (one, or one per frame of a multi-frame instance)."""
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise DataError(f"{name}: not an image (no pixel data; SOP class {_sop_name(ds)})")
    if int(getattr(ds, "SamplesPerPixel", 1)) != 1:
        raise DataError(f"{name}: colour image ({ds.SamplesPerPixel} samples per pixel)")
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1 or "PerFrameFunctionalGroupsSequence" in ds:
        return [_frame_slice(name, ds, f) for f in range(frames)]
    try:
        position = np.asarray(ds.ImagePositionPatient, dtype=float)
        orientation = np.asarray(ds.ImageOrientationPatient, dtype=float)
        spacing = tuple(float(v) for v in ds.PixelSpacing)
    except (AttributeError, ValueError, TypeError):
        raise DataError(
            f"{name}: no usable Image Position/Orientation (Patient) or Pixel Spacing; "
            "cannot place it in a volume"
        ) from None
    rescale = (
        float(getattr(ds, "RescaleSlope", 1) or 1),
        float(getattr(ds, "RescaleIntercept", 0)),
    )
    return [_Slice(name, ds, None, position, orientation, _spacing(name, spacing), rescale)]


def _frame_slice(name: str, ds: Any, frame: int) -> _Slice:
    """Frame ``frame`` (0-based) of an enhanced multi-frame instance: its geometry from the
    per-frame functional group, else the shared one (PS3.3 C.7.6.16)."""
    label = f"{name}#{frame + 1}"
    try:
        position = np.asarray(
            _group(ds, frame, "PlanePositionSequence").ImagePositionPatient, dtype=float
        )
        orientation = np.asarray(
            _group(ds, frame, "PlaneOrientationSequence").ImageOrientationPatient, dtype=float
        )
        spacing = tuple(float(v) for v in _group(ds, frame, "PixelMeasuresSequence").PixelSpacing)
    except (AttributeError, ValueError, TypeError, IndexError):
        raise DataError(
            f"{label}: no plane position, orientation or pixel spacing in the functional groups; "
            "cannot place the frame in a volume"
        ) from None
    try:
        t = _group(ds, frame, "PixelValueTransformationSequence")
        rescale = (float(t.RescaleSlope), float(t.RescaleIntercept))
    except (AttributeError, ValueError, TypeError, IndexError):
        rescale = (1.0, 0.0)
    return _Slice(label, ds, frame, position, orientation, _spacing(label, spacing), rescale)


def _group(ds: Any, frame: int, sequence: str) -> Any:
    """The first item of functional-group ``sequence`` for ``frame``: per-frame, else shared."""
    per_frame = getattr(ds, "PerFrameFunctionalGroupsSequence", None)
    if per_frame is not None and frame < len(per_frame) and sequence in per_frame[frame]:
        return per_frame[frame][sequence][0]
    shared = getattr(ds, "SharedFunctionalGroupsSequence", None)
    if shared and sequence in shared[0]:
        return shared[0][sequence][0]
    raise AttributeError(sequence)


def _spacing(name: str, spacing: tuple[float, ...]) -> tuple[float, float]:
    if len(spacing) != 2 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise DataError(f"{name}: Pixel Spacing {list(spacing)} is not two positive numbers (mm)")
    return float(spacing[0]), float(spacing[1])


def _is_localizer(ds: Any) -> bool:
    image_type = [str(v).upper() for v in (getattr(ds, "ImageType", None) or [])]
    return "LOCALIZER" in image_type


def _check_one_series(slices: list[_Slice], source: str) -> None:
    first = slices[0]
    for s in slices[1:]:
        if s.dataset.get("SeriesInstanceUID") != first.dataset.get("SeriesInstanceUID"):
            raise DataError(
                f"{source}: holds instances of more than one series ({first.name} and {s.name} "
                "differ in Series Instance UID); give one series per folder"
            )
        if s.dataset.get("FrameOfReferenceUID") != first.dataset.get("FrameOfReferenceUID"):
            raise DataError(
                f"{s.name}: Frame of Reference differs from {first.name}'s within one series; "
                "its slices cannot be placed in one volume"
            )


def _drop_stray_orientations(slices: list[_Slice], source: str) -> tuple[list[_Slice], list[str]]:
    """Exclude a few slices whose orientation differs from the stack's (untagged localizers);
    refuse a series whose orientations are genuinely mixed."""
    keys = [tuple(np.round(s.orientation, 3)) for s in slices]
    common, count = Counter(keys).most_common(1)[0]
    ref = np.asarray(common)
    odd = [s for s in slices if np.abs(s.orientation - ref).max() > ORIENTATION_TOLERANCE * 10]
    if not odd:
        return slices, []
    if len(odd) > MAX_LOCALIZERS or count <= len(odd):
        raise DataError(
            f"{odd[0].name}: its Image Orientation Patient differs from {slices[keys.index(common)].name}'s "
            f"({len(odd)} of {len(slices)} slices do); a series must be one stack of parallel slices"
        )
    notes = [
        f"{s.name}: orientation differs from the other {count} slices' (a localizer?); excluded"
        for s in odd
    ]
    return [s for s in slices if s not in odd], notes


def _check_grid(slices: list[_Slice], tolerance: float) -> None:
    first = slices[0]
    rows, cols = _shape(first)
    for s in slices[1:]:
        if _shape(s) != (rows, cols):
            r, c = _shape(s)
            raise DataError(f"{s.name}: is {c}x{r} pixels but {first.name} is {cols}x{rows}")
        a, b = np.asarray(s.spacing), np.asarray(first.spacing)
        if np.abs(a - b).max() > tolerance * b.min():
            raise DataError(
                f"{s.name}: inconsistent spacing: Pixel Spacing {a[0]:g} x {a[1]:g} mm but "
                f"{first.name} has {b[0]:g} x {b[1]:g} mm"
            )


def _shape(s: _Slice) -> tuple[int, int]:
    return int(s.dataset.Rows), int(s.dataset.Columns)


def _order(slices: list[_Slice], tolerance: float) -> tuple[list[_Slice], float]:
    """Slices sorted along the stack's normal, and the slice step (mm); refuses duplicates, gaps
    (a step a whole multiple of the usual one: missing slices) and irregular steps."""
    normal = np.cross(slices[0].orientation[:3], slices[0].orientation[3:])
    depth = np.array([float(s.position @ normal) for s in slices])
    order = np.argsort(depth, kind="stable")
    ordered, depth = [slices[i] for i in order], depth[order]
    if len(ordered) < 2:
        raise DataError(f"{ordered[0].name}: a single slice is not a volume")
    steps = np.diff(depth)
    step = float(np.median(steps))
    for k in np.flatnonzero(steps <= tolerance * max(step, 1e-6)):
        a, b = sorted((ordered[k].name, ordered[k + 1].name))
        raise DataError(f"{a}, {b}: two slices at the same position ({depth[k]:.2f} mm)")
    for k, d in enumerate(steps):
        a, b = sorted((ordered[k].name, ordered[k + 1].name))
        if abs(d - step) <= tolerance * step:
            continue
        missing = round(d / step) - 1
        if missing >= 1 and abs(d - (missing + 1) * step) <= tolerance * step:
            raise DataError(
                f"{a}, {b}: missing slice between them: a gap of {d:.2f} mm where the series' slices are "
                f"{step:.2f} mm apart ({missing} slice{'s' if missing > 1 else ''} missing)"
            )
        raise DataError(
            f"{a}, {b}: inconsistent spacing: neighbouring slices {d:.2f} mm apart where the series' "
            f"others are {step:.2f} mm apart; meddiff needs a regular grid"
        )
    return ordered, step


def _stack(ordered: list[_Slice], step: float, source: str, notes: list[str]) -> DicomSeries:
    pixels = _decode(ordered)
    first = ordered[0]
    row_dir, col_dir = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row_dir, col_dir)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * first.spacing[1]  # along i: columns, Pixel Spacing's second value
    lps[:3, 1] = col_dir * first.spacing[0]  # along j: rows
    # The mean step vector, so a tilted stack (positions not along the normal) keeps its shear.
    span = ordered[-1].position - first.position
    lps[:3, 2] = span / (len(ordered) - 1) if np.linalg.norm(span) > 0 else normal * step
    lps[:3, 3] = first.position
    data = np.ascontiguousarray(np.transpose(pixels, (2, 1, 0)), dtype=np.float32)
    sources: list[Any] = []
    frames = np.empty(len(ordered), dtype=np.int64)
    multi = first.frame is not None
    if multi:
        sources = [first.dataset]
        frames[:] = [s.frame for s in ordered]
        if any(s.dataset is not first.dataset for s in ordered):
            raise DataError(f"{source}: frames of several multi-frame instances; give one")
    else:
        sources = [s.dataset for s in ordered]
        frames[:] = np.arange(len(ordered))
    return DicomSeries(Volume(data, LPS_TO_RAS @ lps, source), sources, frames, notes)


def _decode(ordered: list[_Slice]) -> np.ndarray:
    """float32 (n, rows, cols) rescaled pixel values of the slices, each instance decoded once."""
    cache: dict[int, np.ndarray] = {}
    out = []
    for s in ordered:
        key = id(s.dataset)
        if key not in cache:
            cache[key] = _pixel_array(s.name.split("#")[0], s.dataset)
        arr = cache[key]
        frame = arr[s.frame] if s.frame is not None and arr.ndim == 3 else arr
        slope, intercept = s.rescale
        out.append(frame.astype(np.float32) * slope + intercept)
    return np.stack(out)


def _pixel_array(name: str, ds: Any) -> np.ndarray:
    """The stored values; a compressed syntax without a decoder is named with what decodes it."""
    from pydicom.pixels import get_decoder

    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    try:
        return np.asarray(ds.pixel_array)
    except Exception as err:  # pydicom raises RuntimeError, ValueError, NotImplementedError, ...
        if syntax is not None and syntax.is_compressed:
            try:
                decoder = get_decoder(syntax)
            except NotImplementedError:
                decoder = None
            if decoder is None or not decoder.is_available:
                needs = "; ".join(decoder.missing_dependencies) if decoder else "no known decoder"
                raise DataError(
                    f"{name}: pixel data are compressed as {syntax.name} ({syntax}), which no "
                    f"installed decoder reads; install one of: {needs}"
                ) from None
        raise DataError(f"{name}: cannot decode its pixel data ({_first_line(err)})") from None


def _sop_name(ds: Any) -> str:
    uid = ds.get("SOPClassUID")
    return getattr(uid, "name", str(uid))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def read_instance(data: bytes, name: str = "body") -> Any:
    """One DICOM Part 10 file held in memory (e.g. an HTTP body) as a pydicom dataset; its pixel
    data are decoded later, when used.

    Raises:
        DataError: empty, no ``DICM`` prefix after the 128-byte preamble (not a Part 10 file),
            or unreadable (truncated, corrupt), naming ``name``.
    """
    import io

    import pydicom

    if not data:
        raise DataError(f"{name}: empty; expected a DICOM file")
    if data[128:132] != b"DICM":
        raise DataError(f"{name}: not a DICOM Part 10 file (no 'DICM' after the 128-byte preamble)")
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.ensure_file_meta()
        _ = ds.get("PixelData"), ds.get("Rows")  # reading a truncated element fails here
    except Exception as err:  # pydicom raises many kinds on corrupt bytes
        raise DataError(f"{name}: not a readable DICOM file ({_first_line(err)})") from None
    return ds


def instance_series(name: str, ds: Any) -> DicomSeries:
    """One image instance (a single slice: single-frame, or a multi-frame instance of one frame)
    as a one-slice :class:`DicomSeries`, its third voxel axis along the slice normal (Spacing
    Between Slices, else Slice Thickness, else the pixel spacing: only the plane matters).

    Raises:
        DataError: a localizer, several frames, no usable geometry or pixel data (as
            :func:`series_from_datasets`), or a slice that is not axial (its normal closest to
            the head-foot axis): :mod:`meddiff.data.mri` cuts axial slices, and one sagittal or
            coronal slice holds none.
    """
    if _is_localizer(ds):
        raise DataError(f"{name}: a localizer (Image Type LOCALIZER), not a slice to analyse")
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DataError(f"{name}: a multi-frame instance of {frames} frames; expected one slice")
    (one,) = _slices(name, ds)
    geometry = np.concatenate([one.position.ravel(), one.orientation.ravel()])
    if (
        one.position.shape != (3,)
        or one.orientation.shape != (6,)
        or not np.isfinite(geometry).all()
    ):
        raise DataError(
            f"{name}: Image Position (Patient) must be 3 and Image Orientation (Patient) 6 finite "
            "numbers; cannot place the slice"
        )
    normal = np.cross(one.orientation[:3], one.orientation[3:])
    plane = ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(normal)))]
    if plane != "axial":
        raise DataError(
            f"{name}: a {plane} slice; one slice is analysed as an axial slice of the head "
            "(send an axial slice, or the whole series)"
        )
    step = 0.0
    for key in ("SpacingBetweenSlices", "SliceThickness"):
        try:
            step = float(getattr(ds, key, 0) or 0)
        except (TypeError, ValueError):
            step = 0.0
        if np.isfinite(step) and step > 0:
            break
    step = step if np.isfinite(step) and step > 0 else min(one.spacing)
    return _stack([one], step, name, [])


def read_series(folder: str | Path, tolerance: float = 0.05) -> DicomSeries:
    """The checked series of the DICOM files in ``folder`` (see :func:`series_from_datasets`)."""
    return series_from_datasets(read_folder(folder), str(folder), tolerance)
