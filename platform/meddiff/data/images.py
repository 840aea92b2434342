"""Folders of grayscale PNG images, and same-named masks, as anomaly detection reads them.

The format (DESIGN.md), kept exact because other tools write it:

- an image folder holds ``*.png`` files, 8- or 16-bit grayscale, one image each; intensities are
  read as floats in [0, 1] (divided by 255 or 65535);
- a mask folder holds PNGs with the same file names and sizes; a non-zero pixel is anomalous.

Hidden files (``.DS_Store``, ...) are ignored; anything else that is not a PNG is an error, as are
an empty folder, a colour image, and a mask whose size differs from its image. Every message names
the file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meddiff.errors import DataError

# Pillow modes of single-channel images: 1-bit, 8-bit, 16-bit (several byte orders), 32-bit int
# (how some writers store 16-bit data).
_GRAY_MODES = {"1", "L", "I;16", "I;16B", "I;16L", "I;16N", "I"}
_CHANNELS = {"LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4, "YCbCr": 3, "LAB": 3, "HSV": 3, "PA": 2}


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


def read_png(path: str | Path, size: int | None = None) -> np.ndarray:
    """A grayscale PNG as float32 (H, W) in [0, 1].

    Raises:
        DataError: not a readable PNG, more than one channel, or not ``size``×``size``.
    """
    return _to_unit(_read_gray(Path(path), "image"), path, size)


def _to_unit(arr: np.ndarray, path, size: int | None) -> np.ndarray:
    if arr.dtype == np.uint8:
        out = arr.astype(np.float32) / 255.0
    elif arr.dtype == bool:
        out = arr.astype(np.float32)
    else:
        if arr.max(initial=0) > 65535 or arr.min(initial=0) < 0:
            raise DataError(f"{path}: pixel values outside 0..65535; expected 8- or 16-bit gray")
        out = arr.astype(np.float32) / 65535.0
    if size is not None and out.shape != (size, size):
        raise DataError(
            f"{path}: image is {out.shape[1]}x{out.shape[0]} pixels; expected {size}x{size} "
            "(the model's image size)"
        )
    return out


def decode_png(data: bytes, name: str = "image", size: int | None = None) -> np.ndarray:
    """PNG bytes (an HTTP upload) as float32 (H, W) in [0, 1], by the rules of :func:`read_png`.

    Raises:
        DataError: not a readable PNG, more than one channel, or not ``size``×``size``; the
            message names ``name``.
    """
    import io

    from PIL import Image, UnidentifiedImageError

    if size is not None:
        # The header alone first: a wrong-sized (or decompression-bomb) PNG is refused before
        # any pixel is decoded.
        try:
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise DataError(f"{name}: not a readable PNG ({err})") from None
        except Image.DecompressionBombError as err:
            raise DataError(f"{name}: refused as a decompression bomb ({err})") from None
        if (h, w) != (size, size):
            raise DataError(
                f"{name}: image is {w}x{h} pixels; expected {size}x{size} (the model's image size)"
            )
    return _to_unit(_decode_gray(io.BytesIO(data), name, "image"), name, size)


def encode_png(image: np.ndarray, bits: int = 8) -> bytes:
    """(H, W) data as grayscale PNG bytes, encoded as :func:`write_png` writes them."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_png_array(image, bits, "image")).save(buf, format="PNG")
    return buf.getvalue()


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
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: not a readable PNG ({err})") from None


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


def _read_gray(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist")
    return _decode_gray(path, path, what)


def _decode_gray(source, path, what: str) -> np.ndarray:
    """Decode a grayscale PNG from a path or a binary file object; messages name ``path``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as img:
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
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: not a readable PNG ({err})") from None
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
    images: str | Path, masks: str | Path | None = None, size: int | None = None
) -> ImageSet:
    """Read a whole image folder (and its masks) into memory; small sets, tests, reports."""
    files = list_pngs(images)
    read = [read_png(f, size) for f in files]
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
