"""One interface over the libraries that read whole-slide images: tiffslide and OpenSlide.

:func:`open_slide` returns a :class:`Slide` whatever library reads the file; its ``reader`` names
that library and goes into every tile's provenance. Readers (``data.wsi.reader``):

- ``tiffslide`` (pure Python, tifffile + imagecodecs): Aperio SVS and generic TIFF, tiled or
  stripped (flat TIFFs from image editors, which OpenSlide does not open).
- ``openslide`` (``openslide-python`` with the OpenSlide 4 library of ``openslide-bin``):
  Hamamatsu NDPI/VMS/VMU, MIRAX MRXS, Leica SCN, Ventana BIF, Philips TIFF, Sakura SVSlide,
  Trestle, DICOM whole-slide images (VL Whole Slide Microscopy: a folder of the instances of one
  series), and SVS / generic tiled TIFF as well (https://openslide.org/formats/).
- ``auto``: tiffslide for what it reads in full (SVS, generic TIFF, a TIFF OpenSlide does not
  recognise), OpenSlide for every other format OpenSlide recognises.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from meddiff.errors import DataError

log = logging.getLogger(__name__)

ReaderName = Literal["auto", "tiffslide", "openslide"]
READERS: tuple[str, ...] = ("tiffslide", "openslide")
# OpenSlide's vendor names (openslide.OpenSlide.detect_format) that tiffslide reads in full.
TIFFSLIDE_VENDORS = ("aperio", "generic-tiff")
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# DICOM Part 10 files: a 128-byte preamble, then "DICM".
DICOM_MAGIC_OFFSET, DICOM_MAGIC = 128, b"DICM"
OPENSLIDE_PIP = "pip install openslide-python openslide-bin"
# VL Whole Slide Microscopy Image Storage (DICOM PS3.4 B.5).
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"


class Slide(ABC):
    """An open whole-slide image: a pyramid of levels, level 0 the full resolution.

    Attributes:
        path: what was opened (a file, or a folder of DICOM instances).
        reader: the library reading it (one of :data:`READERS`).
        level_dimensions: (width, height) in pixels of each level, finest first.
        level_downsamples: level-0 pixels per level pixel, 1.0 for level 0.
        properties: the library's metadata (``tiffslide.*`` or ``openslide.*`` keys, strings).
    """

    reader: str = ""
    _prefix: str = ""

    def __init__(self, path: Path, handle: Any):
        self.path = path
        self._handle = handle
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(
            (int(w), int(h)) for w, h in handle.level_dimensions
        )
        self.level_downsamples: tuple[float, ...] = tuple(
            float(d) for d in handle.level_downsamples
        )
        self.properties: Mapping[str, Any] = dict(handle.properties)
        if not self.level_dimensions or min(self.level_dimensions[0]) <= 0:
            handle.close()
            raise DataError(f"slide {path} has no image data")

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def version(self) -> str:
        """The reader and its library version, e.g. ``openslide 4.0.1``."""
        return self.reader

    def property(self, name: str) -> Any:
        """A standard property (``objective-power``, ``mpp-x``, ``vendor``), None if absent."""
        value = self.properties.get(f"{self._prefix}.{name}")
        return None if value in (None, "") else value

    def segment_rows(self, level: int) -> int | None:
        """Rows of pixels the decoder must decode together at ``level`` (a TIFF strip), or None
        when unknown or small (tiled formats)."""
        return None

    def read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 (height, width, 3) of the region whose origin is (x, y) in level-0 pixels.

        Raises:
            DataError: the decoder failed (a damaged file) or gave other than 8-bit RGB.
        """
        try:
            arr = np.asarray(self._region(x, y, level, width, height))
        except Exception as err:  # decoder errors of a damaged file
            raise DataError(
                f"slide {self.path}: cannot read level {level} region at ({x}, {y}) size "
                f"{width}x{height} with {self.reader} ({type(err).__name__}: {err})"
            ) from None
        if arr.ndim != 3 or arr.shape[2] < 3 or arr.dtype != np.uint8:
            raise DataError(
                f"slide {self.path}: expected 8-bit RGB pixels, got {arr.dtype} {arr.shape}"
            )
        return np.ascontiguousarray(arr[..., :3])

    @abstractmethod
    def _region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray: ...

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TiffSlideReader(Slide):
    """A slide read with tiffslide (TIFF family)."""

    reader = "tiffslide"
    _prefix = "tiffslide"

    @property
    def version(self) -> str:
        import tiffslide

        return f"tiffslide {tiffslide.__version__}"

    def segment_rows(self, level: int) -> int | None:
        """The tile height of a tiled TIFF page, the strip height of a stripped one (the whole
        image for a single strip)."""
        try:
            page = self._handle.ts_tifffile.series[0].levels[level].keyframe
        except (AttributeError, IndexError):
            return None
        rows = page.tilelength if page.is_tiled else page.rowsperstrip
        return int(min(rows or page.imagelength, page.imagelength)) or None

    def _region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        return self._handle.read_region((x, y), level, (width, height), as_array=True)


class OpenSlideReader(Slide):
    """A slide read with OpenSlide (vendor formats, DICOM-WSI, TIFF)."""

    reader = "openslide"
    _prefix = "openslide"

    @property
    def version(self) -> str:
        import openslide

        return f"openslide {openslide.__library_version__}"

    def _region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        from PIL import Image

        # OpenSlide answers RGBA, transparent outside the scanned area: that is glass, so white.
        rgba = self._handle.read_region((x, y), level, (width, height))
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))


def open_slide(path: str | Path, reader: ReaderName = "auto") -> Slide:
    """Open a slide file, or a folder holding the DICOM instances of one whole-slide image.

    Args:
        path: the slide.
        reader: ``auto`` (see the module docstring), ``tiffslide`` or ``openslide``.

    Raises:
        DataError: missing path, a format no reader opens, a damaged file, or OpenSlide needed
            and not installed (the message names the pip packages).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"slide {path} does not exist")
    if reader not in ("auto", *READERS):
        raise DataError(f"slide {path}: unknown reader {reader!r}; expected auto, {READERS}")
    target = dicom_instance(path) if path.is_dir() else path
    if target is None:
        raise DataError(
            f"slide {path} is a folder without VL Whole Slide Microscopy instances; a folder is "
            "read as one DICOM whole-slide image (the instances of one series)"
        )
    if not target.is_file():
        raise DataError(f"slide {path} is not a file")
    if reader == "auto":
        reader = choose_reader(target)
    if reader == "tiffslide":
        return TiffSlideReader(path, _open_tiffslide(target))
    return OpenSlideReader(path, _open_openslide(target))


def choose_reader(path: Path) -> str:
    """``tiffslide`` or ``openslide`` for a slide file, as ``reader: auto`` decides."""
    tiff = is_tiff(path)
    vendor = _detect_openslide(path, needed=not tiff)
    if tiff and (vendor is None or vendor in TIFFSLIDE_VENDORS):
        return "tiffslide"
    if vendor is None:
        raise DataError(
            f"slide {path} is not a whole-slide image tiffslide or OpenSlide reads (neither a "
            "TIFF nor a format OpenSlide recognises: https://openslide.org/formats/)"
        )
    return "openslide"


def dicom_instance(folder: Path) -> Path | None:
    """The first VL Whole Slide Microscopy instance of ``folder`` (sorted by name), or None:
    OpenSlide opens a DICOM whole-slide image from any one of its instances and finds the rest
    of its series beside it."""
    for p in sorted(folder.iterdir()):
        if p.is_file() and is_dicom_wsi(p):
            return p
    return None


def is_tiff(path: Path) -> bool:
    """Whether ``path`` starts like a TIFF or BigTIFF file (either byte order)."""
    try:
        return _head(path, 4) in TIFF_MAGIC
    except DataError:
        return False


def is_dicom_wsi(path: Path) -> bool:
    """Whether ``path`` is a DICOM Part 10 file of a VL Whole Slide Microscopy Image (not, say,
    an MR slice)."""
    if _head(path, DICOM_MAGIC_OFFSET + 4)[DICOM_MAGIC_OFFSET:] != DICOM_MAGIC:
        return False
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return False
    return str(ds.get("SOPClassUID", "")) == WSI_SOP_CLASS


def _head(path: Path, n: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as err:
        raise DataError(f"slide {path} cannot be read ({err.strerror})") from None


def _import_openslide(path: Path):
    try:
        import openslide
    except (ImportError, OSError) as err:
        # openslide-python without the OpenSlide library (openslide-bin) fails with OSError.
        raise DataError(
            f"slide {path}: this format needs OpenSlide, which is not installed ({OPENSLIDE_PIP}; "
            f"{type(err).__name__}: {err})"
        ) from None
    return openslide


def _detect_openslide(path: Path, needed: bool) -> str | None:
    """OpenSlide's vendor name for ``path`` (None: not recognised). Without OpenSlide: None for
    a TIFF (tiffslide reads it), else the missing-package error."""
    try:
        openslide = _import_openslide(path)
    except DataError:
        if needed:
            raise
        return None
    try:
        return openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError:
        return None


def _open_tiffslide(path: Path):
    import tifffile
    import tiffslide

    try:
        return tiffslide.TiffSlide(path)
    except tifffile.TiffFileError as err:
        raise DataError(f"slide {path} is not a TIFF whole-slide image ({err})") from None
    except (NotImplementedError, KeyError, ValueError, IndexError) as err:
        raise DataError(
            f"slide {path}: unsupported TIFF layout ({type(err).__name__}: {err}); "
            "expected a tiled RGB pyramid (SVS or generic pyramidal TIFF); try "
            "data.wsi.reader=openslide"
        ) from None


def _open_openslide(path: Path):
    openslide = _import_openslide(path)
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        raise DataError(
            f"slide {path}: not a format OpenSlide reads (https://openslide.org/formats/)"
        ) from None
    except openslide.OpenSlideError as err:
        raise DataError(f"slide {path}: OpenSlide cannot read it ({err})") from None
