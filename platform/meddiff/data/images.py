"""Folders of grayscale PNG images, and same-named masks, as anomaly detection reads them.

The format (README, section Data; docs/thor.md), kept exact because other tools write it:

- an image folder holds ``*.png`` files, 8- or 16-bit grayscale, one image each; intensities are
  read as floats in [0, 1] as ``data.images`` says (:class:`meddiff.config.data.ImageConfig`):
  by default divided by 2**b - 1 for b significant bits (the PNG's sBIT chunk; else 12 for a
  16-bit PNG whose values all fit in 12 bits; else 8 or 16), so 12-bit scanner data stored in
  16-bit PNGs read over their own range;
- a mask folder holds PNGs with the same file names and sizes; a non-zero pixel is anomalous.

Hidden files (``.DS_Store``, ...) are ignored; anything else that is not a PNG is an error, as are
an empty folder, a colour image, and a mask whose size differs from its image. Every message names
the file.
"""

from __future__ import annotations

import io
import logging
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meddiff.config.data import ImageConfig
from meddiff.errors import DataError

log = logging.getLogger(__name__)

# Pillow modes of single-channel images: 1-bit, 8-bit, 16-bit (several byte orders), 32-bit int
# (how some writers store 16-bit data).
_GRAY_MODES = {"1", "L", "I;16", "I;16B", "I;16L", "I;16N", "I"}
_CHANNELS = {"LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4, "YCbCr": 3, "LAB": 3, "HSV": 3, "PA": 2}
# CT and MR scanners store 12 bits per pixel (DICOM BitsStored 12, the usual value), and 16-bit
# PNGs exported from them keep the values unscaled: a 16-bit PNG without sBIT whose values all fit
# in 12 bits is read as 12-bit (a 16-bit image using only 1/16 of its range would read near-black
# anyway). How each image was read is in the outputs; a folder that mixes the two is warned about.
SCANNER_BITS = 12
INFERRED = f"no sBIT, values fit in {SCANNER_BITS} bits"


def list_pngs(folder: str | Path, what: str = "image") -> list[Path]:
    """The PNG files of ``folder``, sorted by name.

    Raises:
        DataError: the folder is missing, holds a non-PNG entry, or holds no PNG.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{what} folder {root} does not exist")
    files = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            raise DataError(
                f"{entry}: a folder inside the {what} folder {root}; expected only PNG files"
            )
        if entry.suffix.lower() != ".png":
            raise DataError(
                f"{entry}: not a PNG file; the {what} folder {root} must hold only PNGs"
            )
        files.append(entry)
    if not files:
        raise DataError(f"{what} folder {root} is empty: no PNG files")
    return files


def read_png(
    path: str | Path, size: int | None = None, cfg: ImageConfig | None = None
) -> np.ndarray:
    """A grayscale PNG as float32 (H, W) in [0, 1], scaled as ``cfg`` says (default: by its
    significant bits, see :class:`~meddiff.config.data.ImageConfig`).

    Raises:
        DataError: not a readable PNG, more than one channel, not ``size``×``size``, or values
            that do not fit the significant bits its sBIT chunk or the config declares.
    """
    out, _ = read_scaled(path, cfg or ImageConfig())
    if size is not None and out.shape != (size, size):
        raise DataError(
            f"{path}: image is {out.shape[1]}x{out.shape[0]} pixels; expected {size}x{size} "
            "(the model's image size)"
        )
    return out


@dataclass(frozen=True)
class Scaling:
    """How one image was mapped to [0, 1]: ``how`` names the rule, ``warning`` says when the image
    uses a small part of the range it was divided by (or is None)."""

    how: str
    warning: str | None = None


def read_scaled(
    path: str | Path, cfg: ImageConfig, data: bytes | None = None
) -> tuple[np.ndarray, Scaling]:
    """A grayscale PNG as float32 (H, W) in [0, 1] and how it was scaled (no size check).
    With ``data`` the PNG is those bytes (an HTTP upload) and ``path`` only names it."""
    path = Path(path)
    arr = _read_gray(path, "image", data)
    if arr.dtype == bool:
        return arr.astype(np.float32), Scaling("1-bit")
    depth = 8 if arr.dtype == np.uint8 else 16
    if arr.max(initial=0) > 65535 or arr.min(initial=0) < 0:
        raise DataError(f"{path}: pixel values outside 0..65535; expected 8- or 16-bit gray")
    values = arr.astype(np.int64)
    if cfg.scaling in ("observed_range", "percentiles"):
        q = (0.0, 100.0) if cfg.scaling == "observed_range" else cfg.percentiles
        lo, hi = (float(v) for v in np.percentile(values, q))
        out = np.clip((values - lo) / max(hi - lo, 1e-12), 0.0, 1.0).astype(np.float32)
        return out, Scaling(f"{cfg.scaling} {q[0]:g}-{q[1]:g}%")
    if cfg.scaling == "type_range":
        bits, how = depth, f"type_range: {depth}-bit / {2**depth - 1}"
    else:
        values, bits, how = _significant(path, values, depth, cfg.significant_bits, data)
    top = 2**bits - 1
    out = (values / top).astype(np.float32)
    peak = int(values.max(initial=0))
    warning = None
    if 0 < peak < cfg.low_range_warning * top:
        bits_hint = max(peak.bit_length(), 8)
        fix = (
            f"if it holds {bits_hint}-bit data set data.images.significant_bits={bits_hint} (or "
            "data.images.scaling=percentiles)"
            if bits_hint < bits
            else "set data.images.scaling=percentiles or observed_range to stretch it"
        )
        warning = (
            f"{path}: largest value {peak} is {peak / top:.1%} of the {top} it is divided by "
            f"({how}), so it reads nearly black; {fix}"
        )
    return out, Scaling(how, warning)


def _significant(
    path: Path, values: np.ndarray, depth: int, explicit: int | None, data: bytes | None = None
) -> tuple[np.ndarray, int, str]:
    """(values, significant bits, description): the explicit setting, else sBIT, else depth."""
    if explicit is not None:
        bits, source = explicit, "data.images.significant_bits"
        if bits > depth:
            raise DataError(
                f"{path}: data.images.significant_bits={bits} but the image is {depth}-bit"
            )
    else:
        sbit = png_significant_bits(path, data)
        bits, source = (sbit, "sBIT") if sbit is not None else (depth, "type")
        if sbit is None and depth == 16 and int(values.max(initial=0)) <= 2**SCANNER_BITS - 1:
            bits, source = SCANNER_BITS, INFERRED
        if not 1 <= bits <= depth:
            raise DataError(
                f"{path}: its sBIT chunk declares {bits} significant bits in a {depth}-bit image; "
                "override it with --set data.images.significant_bits=N or "
                "data.images.scaling=type_range"
            )
    if bits < depth and source != INFERRED:  # inferred: the values are unscaled by definition
        shift = depth - bits
        if _left_shifted(values, bits, shift):
            # Stored as the PNG standard asks: scaled up to the full depth. Undo the shift.
            return values >> shift, bits, f"{source} {bits} of {depth} bits (shifted back)"
        if int(values.max(initial=0)) > 2**bits - 1:
            fix = (
                "check it or set data.images.significant_bits"
                if source == "data.images.significant_bits"
                else "override it with --set data.images.scaling=type_range"
            )
            raise DataError(
                f"{path}: {source} says {bits} significant bits but values reach "
                f"{int(values.max())} (> {2**bits - 1}); {fix}"
            )
    return values, bits, f"{source}: {bits}-bit / {2**bits - 1}"


def _left_shifted(values: np.ndarray, bits: int, shift: int) -> bool:
    """Whether ``bits``-bit data were scaled to the full depth by a left shift, with zeros or
    with the top bits replicated into the low ones (the two ways the PNG standard allows)."""
    if not values.any():
        return False
    high = values >> shift
    low = values & ((1 << shift) - 1)
    replicated = (high >> max(bits - shift, 0)) if bits >= shift else None
    return bool((low == 0).all() or (replicated is not None and (low == replicated).all()))


def png_significant_bits(path: str | Path, data: bytes | None = None) -> int | None:
    """The gray sample's significant bits from a PNG's sBIT chunk, or None when it has none.

    Reads the chunks before the image data only (PNG specification, section 11.3.3.4: for
    grayscale, sBIT holds one byte). Chunks other than IHDR and sBIT are skipped unread.
    """
    with io.BytesIO(data) if data is not None else open(path, "rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        color_type = None
        while True:
            head = f.read(8)
            if len(head) < 8:
                return None
            length, kind = struct.unpack(">I4s", head)
            if kind in (b"IDAT", b"IEND"):
                return None
            data = f.read(length)
            f.seek(4, os.SEEK_CUR)  # CRC
            if kind == b"IHDR" and len(data) >= 10:
                color_type = data[9]
            elif kind == b"sBIT" and data and color_type in (0, 4):  # gray, gray + alpha
                return int(data[0])


def intensity_summary(files: Sequence[Path], cfg: ImageConfig, sample: int = 16) -> dict:
    """How a folder's images are scaled, from up to ``sample`` files spread over it; logs the
    first warning (an image using a small part of its range) once, on the caller's process.

    Returns ``{"scaling": ..., "read_as": {description: files}, "warning": str | None}``.
    """
    picks = np.unique(np.linspace(0, len(files) - 1, min(sample, len(files))).round().astype(int))
    read_as: dict[str, int] = {}
    warning = None
    for i in picks:
        _, scaling = read_scaled(files[i], cfg)
        read_as[scaling.how] = read_as.get(scaling.how, 0) + 1
        warning = warning or scaling.warning
    inferred = sum(n for how, n in read_as.items() if how.startswith(INFERRED))
    if inferred and inferred < sum(read_as.values()):
        warning = warning or (
            f"{Path(files[0]).parent}: {inferred} of {len(picks)} sampled 16-bit images without "
            f"sBIT have values that fit in {SCANNER_BITS} bits and were read as {SCANNER_BITS}-"
            "bit, the others were not: set data.images.significant_bits (12 or 16) so all are "
            "read alike"
        )
    elif inferred:
        log.info("%s: read as %d-bit (%s)", Path(files[0]).parent, SCANNER_BITS, INFERRED)
    if warning:
        log.warning("%s", warning)
    return {**cfg.reading(), "read_as": read_as, "warning": warning}


def read_mask(path: str | Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A mask PNG as bool (H, W): True where the pixel is non-zero (anomalous).

    Raises:
        DataError: unreadable, more than one channel, or a shape other than its image's ``shape``.
    """
    arr = _read_gray(Path(path), "mask")
    if shape is not None and arr.shape != tuple(shape):
        raise DataError(
            f"{path}: mask is {arr.shape[1]}x{arr.shape[0]} pixels but its image is "
            f"{shape[1]}x{shape[0]}; a mask must match its image"
        )
    return arr != 0


def _reason(err: Exception) -> str:
    """Why Pillow could not read an image, without the object repr Pillow puts in the message of
    an in-memory file ("cannot identify image file <_io.BytesIO object at 0x…>")."""
    from PIL import UnidentifiedImageError

    if isinstance(err, UnidentifiedImageError):
        return "not an image format Pillow can identify"
    return str(err)


def png_header(path: str | Path, what: str = "image") -> tuple[int, int]:
    """(height, width) of a grayscale PNG from its header alone (no pixel decoding).

    Raises:
        DataError: unreadable, not a PNG, or more than one channel.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as img:
            if img.format != "PNG":
                raise DataError(f"{path}: a {img.format} file, not a PNG")
            if img.mode not in _GRAY_MODES and img.mode != "P":
                channels = _CHANNELS.get(img.mode, len(img.getbands()))
                raise DataError(
                    f"{path}: {what} has {channels} channels (mode {img.mode}); expected 1-channel "
                    "grayscale (8- or 16-bit)"
                )
            return img.height, img.width
    except DataError:
        raise  # already names the file; a DataError is a ValueError, so not caught below
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: not a readable PNG ({_reason(err)})") from None
    except Image.DecompressionBombError as err:  # Pillow checks the header's size on open
        raise DataError(f"{path}: refused as a decompression bomb ({err})") from None


def check_headers(
    images: Sequence[Path], size: int | None = None, masks: Sequence[Path] | None = None
) -> None:
    """Validate a folder up front from the PNG headers: grayscale, ``size``×``size`` images,
    masks of their images' size. Cheap (no decoding), so bad input fails before any work."""
    for i, f in enumerate(images):
        h, w = png_header(f)
        if size is not None and (h, w) != (size, size):
            raise DataError(
                f"{f}: image is {w}x{h} pixels; expected {size}x{size} (the model's image size)"
            )
        if masks is not None:
            mh, mw = png_header(masks[i], "mask")
            if (mh, mw) != (h, w):
                raise DataError(
                    f"{masks[i]}: mask is {mw}x{mh} pixels but its image is {w}x{h}; a mask "
                    "must match its image"
                )


def _read_gray(path: Path, what: str, data: bytes | None = None) -> np.ndarray:
    """Decode a grayscale PNG file (or its ``data`` bytes; ``path`` then only names it)."""
    from PIL import Image, UnidentifiedImageError

    if data is None and not path.is_file():
        raise DataError(f"{what} {path} does not exist")
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as img:
            if img.format != "PNG":
                raise DataError(f"{path}: a {img.format} file, not a PNG")
            mode = img.mode
            if mode == "P":  # palette images: gray only if the palette is gray
                img = img.convert("RGB")
                rgb = np.asarray(img)
                if not (
                    np.array_equal(rgb[..., 0], rgb[..., 1])
                    and np.array_equal(rgb[..., 0], rgb[..., 2])
                ):
                    raise DataError(
                        f"{path}: {what} is a colour palette PNG; expected 1-channel grayscale "
                        "(8- or 16-bit)"
                    )
                return rgb[..., 0].copy()
            if mode not in _GRAY_MODES:
                channels = _CHANNELS.get(mode, len(img.getbands()))
                raise DataError(
                    f"{path}: {what} has {channels} channels (mode {mode}); expected 1-channel "
                    "grayscale (8- or 16-bit)"
                )
            arr = np.asarray(img)
    except DataError:
        raise  # already names the file; a DataError is a ValueError, so not caught below
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: not a readable PNG ({_reason(err)})") from None
    except Image.DecompressionBombError as err:
        raise DataError(f"{path}: refused as a decompression bomb ({err})") from None
    if arr.ndim != 2:
        raise DataError(f"{path}: {what} has shape {arr.shape}; expected a 2D grayscale image")
    if arr.dtype not in (np.uint8, bool):
        arr = arr.astype(np.int64)
    return arr


def write_png(path: str | Path, image: np.ndarray, bits: int = 8) -> Path:
    """Write (H, W) data as a grayscale PNG, atomically (temporary name, then rename).

    Floats are taken as [0, 1] intensities (clipped) and stored with ``bits`` 8 or 16; bools
    become 0/255 (8-bit) so a mask is visible in any viewer.
    """
    from PIL import Image

    path = Path(path)
    out = _png_array(image, bits, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    Image.fromarray(out).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def _png_array(image: np.ndarray, bits: int, path) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 2:
        raise DataError(f"{path}: cannot write shape {arr.shape} as a grayscale PNG")
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if bits == 8:
        return np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8)
    if bits == 16:
        return np.round(np.clip(arr, 0, 1) * 65535).astype(np.uint16)
    raise ValueError(f"bits must be 8 or 16, got {bits}")


def encode_png(image: np.ndarray, bits: int = 8) -> bytes:
    """(H, W) data as grayscale PNG bytes, encoded as :func:`write_png` writes them."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_png_array(image, bits, "image")).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(
    data: bytes, name: str = "image", size: int | None = None, cfg: ImageConfig | None = None
) -> np.ndarray:
    """PNG bytes (an HTTP upload) as float32 (H, W) in [0, 1], by the rules of :func:`read_png`
    (``cfg`` = ``data.images``); the size is checked from the header before any decoding, so a
    wrong-sized image or a decompression bomb is refused without decoding it.

    Raises:
        DataError: not a readable PNG, more than one channel, not ``size``×``size``, a
            decompression bomb; the message names ``name``.
    """
    from PIL import Image, UnidentifiedImageError

    if size is not None:
        try:
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise DataError(f"{name}: not a readable PNG ({_reason(err)})") from None
        except Image.DecompressionBombError as err:
            raise DataError(f"{name}: refused as a decompression bomb ({err})") from None
        if (h, w) != (size, size):
            raise DataError(
                f"{name}: image is {w}x{h} pixels; expected {size}x{size} (the model's image size)"
            )
    out, _ = read_scaled(name, cfg or ImageConfig(), data)
    return out


@dataclass
class ImageSet:
    """A folder of images (and optionally masks) loaded into memory."""

    names: list[str]
    images: np.ndarray  # float32 (N, H, W) in [0, 1]
    masks: np.ndarray | None = None  # bool (N, H, W)


def mask_paths(image_files: Sequence[Path], mask_folder: str | Path) -> list[Path]:
    """The mask of each image (same file name) in ``mask_folder``.

    Raises:
        DataError: the folder is missing or empty, or an image has no mask (named).
    """
    listed = {p.name: p for p in list_pngs(mask_folder, "mask")}
    out = []
    for f in image_files:
        if f.name not in listed:
            raise DataError(
                f"no mask for image {f}: expected {Path(mask_folder) / f.name} (masks must have "
                "the same file names as their images)"
            )
        out.append(listed[f.name])
    return out


def load_folder(
    images: str | Path,
    masks: str | Path | None = None,
    size: int | None = None,
    cfg: ImageConfig | None = None,
) -> ImageSet:
    """Read a whole image folder (and its masks) into memory, scaled by ``cfg`` (``data.images``);
    small sets, tests, reports."""
    files = list_pngs(images)
    read = [read_png(f, size, cfg) for f in files]
    for f, a in zip(files, read, strict=True):
        if a.shape != read[0].shape:
            raise DataError(
                f"{f}: image is {a.shape[1]}x{a.shape[0]} pixels but {files[0].name} is "
                f"{read[0].shape[1]}x{read[0].shape[0]}; all images of a folder must share a size"
            )
    arrays = np.stack(read)
    mask_arr = None
    if masks is not None:
        mask_arr = np.stack(
            [read_mask(m, a.shape) for m, a in zip(mask_paths(files, masks), arrays, strict=True)]
        )
    return ImageSet([f.name for f in files], arrays, mask_arr)
