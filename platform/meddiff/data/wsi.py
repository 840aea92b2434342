"""Whole-slide images: open, find tissue, cut tiles at a magnification, keep provenance.

A slide is planned once on the driver (:func:`plan_slide`): its level-0 magnification is read from
the metadata, a pyramid level at or above the target magnification is chosen, a tissue mask is
computed from a low-resolution level, and the tiles of a regular grid that are mostly tissue are
listed with their level-0 origin. Marker ink (:mod:`meddiff.data.artefacts`) is not tissue: tiles
that are mostly ink are listed too, flagged, so the quality filter removes and counts them (it
also finds folds, bubbles and blur, which need full resolution). Reading (:func:`read_tiles`) then happens in Ray tasks, each over
a bounded chunk of the plan, so memory does not grow with the slide.

Tiles carry the provenance columns of :mod:`meddiff.data.shards`: ``source`` (slide path), ``index``
(grid position ``row * cols + col``, stable across runs), ``level`` (pyramid level read) and ``x``,
``y`` (tile origin in level-0 pixels), ``reader`` (``tiffslide`` or ``openslide``: the library that
decoded it), and ``artefact`` ("" for tissue, ``ink`` for a flagged tile).

Slides open through :func:`meddiff.data.slides.open_slide` (tiffslide or OpenSlide: vendor
formats, DICOM whole-slide images); the reader is chosen once per slide when it is planned, and
every tile names it in a ``reader`` column.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from meddiff.config.data import WsiConfig
from meddiff.data.artefacts import mask_artefacts
from meddiff.data.slides import Slide, dicom_instance, is_dicom_wsi, is_tiff, open_slide
from meddiff.errors import DataError

log = logging.getLogger(__name__)

# Pixels of one micrometre at 10x: the usual convention, 0.25 µm/px is "40x", 1 µm/px is "10x".
MPP_AT_10X = 1.0
# What slide scanners produce at level 0: about 0.1 µm/px (100x oil objectives) to 4 µm/px (2.5x
# overview scans), objectives 1x to 100x. Values far outside come from software that is not a
# scanner (an image editor's 72 dpi, or "1 pixel per cm"), never from a real slide, so they are
# refused with the override to use rather than read as a 0.03x slide.
PLAUSIBLE_MPP = (0.05, 10.0)
PLAUSIBLE_OBJECTIVE = (1.0, 150.0)
LABELS_FILE = "labels.csv"
# Codes of SlidePlan.kinds: "" is tissue.
TILE_KINDS = ("", "ink")


# --- planning -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlidePlan:
    """Where to cut a slide's tiles. ``tiles`` is int64 (m, 3): grid index, level-0 x, y;
    ``kinds`` int8 (m,) indexes :data:`TILE_KINDS` (0: tissue, else the artefact a tile mostly
    is: it is read flagged, for the quality filter to count and show)."""

    path: str
    label: int
    reader: str
    reader_version: str
    base_magnification: float
    magnification_source: str
    level: int
    level_downsample: float
    read_size: int
    tile_size: int
    cols: int
    rows: int
    tissue_threshold: float
    tiles: np.ndarray = field(repr=False)
    kinds: np.ndarray = field(repr=False)

    @property
    def magnification(self) -> float:
        """The magnification the tiles actually have (the grid step is whole level pixels)."""
        return self.base_magnification * self.tile_size / (self.read_size * self.level_downsample)

    def summary(self) -> dict[str, Any]:
        return {
            "slide": self.path,
            "label": self.label,
            "reader": self.reader_version,
            "base_magnification": round(self.base_magnification, 3),
            "magnification_from": self.magnification_source,
            "tile_magnification": round(self.magnification, 3),
            "level": self.level,
            "read_size": self.read_size,
            "grid": [self.rows, self.cols],
            "tissue_tiles": int((self.kinds == 0).sum()),
            "artefact_tiles": self.artefact_counts(),
            "tissue_threshold": round(self.tissue_threshold, 4),
        }

    def artefact_counts(self) -> dict[str, int]:
        """Tiles flagged per artefact kind (kinds with none left out)."""
        counts = np.bincount(self.kinds, minlength=len(TILE_KINDS))
        return {k: int(n) for k, n in zip(TILE_KINDS[1:], counts[1:], strict=True) if n}


def base_magnification(slide: Slide, cfg: WsiConfig) -> tuple[float, str]:
    """Level-0 magnification and where it came from: the config, objective power, or mpp.

    An explicit ``data.wsi.base_magnification`` wins over the file's metadata (headers written by
    non-scanner software are often wrong). Metadata outside what scanners produce
    (:data:`PLAUSIBLE_MPP` µm/px, :data:`PLAUSIBLE_OBJECTIVE`) is refused, naming the override.

    Raises:
        DataError: no magnification in the metadata nor the config, or an implausible value.
    """
    if cfg.base_magnification:
        return float(cfg.base_magnification), "data.wsi.base_magnification"
    power = _positive_float(slide.property("objective-power"))
    if power:
        _check_plausible(slide, "objective power", power, "x", PLAUSIBLE_OBJECTIVE)
        return power, "objective-power"
    mpp = _positive_float(slide.property("mpp-x"))
    if mpp:
        _check_plausible(slide, "pixel size", mpp, " µm", PLAUSIBLE_MPP)
        return 10.0 * MPP_AT_10X / mpp, "mpp"
    raise DataError(
        f"slide {slide.path}: magnification unknown (no objective power nor microns-per-pixel "
        "in its metadata); set data.wsi.base_magnification to the scanner's objective "
        "(e.g. --set data.wsi.base_magnification=20)"
    )


def _check_plausible(
    slide: Slide, what: str, value: float, unit: str, bounds: tuple[float, float]
) -> None:
    lo, hi = bounds
    if lo <= value <= hi:
        return
    raise DataError(
        f"slide {slide.path}: its metadata gives a level-0 {what} of {value:g}{unit}, outside "
        f"what slide scanners produce ({lo:g}-{hi:g}{unit}; tags written by other software, such "
        "as 72 dpi, are often wrong); set data.wsi.base_magnification to the scanner's objective "
        "(e.g. --set data.wsi.base_magnification=20)"
    )


def choose_level(
    slide: Slide, base: float, target: float, tolerance: float, shown: str
) -> tuple[int, float]:
    """The coarsest level at or above ``target``, and the read scale (level px per tile px)."""
    if target > base * (1 + tolerance):
        raise DataError(
            f"slide {shown}: magnification {target:g}x is not available; level 0 is {base:g}x "
            f"(highest available); choose data.wsi.magnification <= {base:g}"
        )
    best = 0
    for level, ds in enumerate(slide.level_downsamples):
        if base / ds >= target * (1 - tolerance):
            best = level if ds > slide.level_downsamples[best] else best
    scale = (base / slide.level_downsamples[best]) / target
    if abs(scale - 1) <= tolerance:
        scale = 1.0
    return best, scale


def plan_slide(path: str | Path, cfg: WsiConfig, label: int = -1) -> SlidePlan:
    """Open ``path``, choose the level, detect tissue and list the tiles to cut.

    Raises:
        DataError: missing file, not a readable slide, magnification unknown or not available,
            slide smaller than one tile, or no tissue.
    """
    with open_slide(path, cfg.reader) as slide:
        base, source = base_magnification(slide, cfg)
        level, scale = choose_level(
            slide, base, cfg.magnification, cfg.magnification_tolerance, str(slide.path)
        )
        read_size = max(1, round(cfg.tile_size * scale))
        width, height = slide.level_dimensions[level]
        cols, rows = width // read_size, height // read_size
        if cols == 0 or rows == 0:
            raise DataError(
                f"slide {slide.path} is {width}x{height} px at level {level}, smaller than one "
                f"{read_size}-px tile at {cfg.magnification:g}x"
            )
        fraction, artefacts, threshold = tissue_fraction(slide, level, read_size, cols, rows, cfg)
        kinds = tile_kinds(fraction, artefacts, cfg.min_tissue_fraction)
        keep = np.flatnonzero(kinds >= 0)
        if not (kinds == 0).any():
            raise DataError(
                f"slide {slide.path}: no tissue found (no tile is at least "
                f"{cfg.min_tissue_fraction:.0%} tissue at saturation > {threshold:.3f}); check "
                "the slide or lower data.wsi.min_tissue_fraction / data.wsi.tissue_saturation"
            )
        _warn_stripped(slide, level, read_size)
        ds = slide.level_downsamples[level]
        r, c = np.divmod(keep, cols)
        tiles = np.stack(
            [keep, np.round(c * read_size * ds), np.round(r * read_size * ds)], axis=1
        ).astype(np.int64)
        return SlidePlan(
            path=str(slide.path),
            label=int(label),
            reader=slide.reader,
            reader_version=slide.version,
            base_magnification=base,
            magnification_source=source,
            level=level,
            level_downsample=ds,
            read_size=read_size,
            tile_size=cfg.tile_size,
            cols=cols,
            rows=rows,
            tissue_threshold=threshold,
            tiles=tiles,
            kinds=kinds[keep].astype(np.int8),
        )


def tissue_fraction(
    slide: Slide, level: int, read_size: int, cols: int, rows: int, cfg: WsiConfig
) -> tuple[np.ndarray, dict[str, np.ndarray], float]:
    """Fraction of tissue in every grid tile, float (rows, cols), the fraction of each artefact
    kind found on the mask (``ink``: same shape; none when ``cfg.artefacts`` is off) and the
    saturation threshold.

    The mask is built on the coarsest level that still gives ``mask_pixels_per_tile`` pixels
    across a tile, read in bands so a slide without a small level cannot exhaust memory. Artefact
    pixels are taken out of the tissue after holes are filled (a stroke across tissue would
    otherwise be filled back in).
    """
    from scipy import ndimage

    m = cfg.mask_pixels_per_tile
    thumb = _grid_thumbnail(slide, level, read_size, cols, rows, m)
    rgb = thumb.astype(np.float32)
    vmax = rgb.max(axis=2)
    sat = (vmax - rgb.min(axis=2)) / np.maximum(vmax, 1.0)
    threshold = cfg.tissue_saturation or _otsu_threshold(sat)
    # Very dark pixels (pen marks, scanner edge) are not tissue whatever their saturation.
    stained = (sat > threshold) & (vmax > 0.15 * 255)
    # Drop isolated specks of dust, close small gaps, and fill what tissue encloses (pale stroma
    # and lumen are tissue even when their colour is as faint as glass).
    mask = ndimage.binary_opening(stained, np.ones((2, 2), bool))
    mask = ndimage.binary_closing(mask, np.ones((3, 3), bool), border_value=0)
    mask = ndimage.binary_fill_holes(mask)

    def per_tile(pixels: np.ndarray) -> np.ndarray:
        return pixels.reshape(rows, m, cols, m).mean(axis=(1, 3))

    if not cfg.artefacts:
        return per_tile(mask), {}, float(threshold)
    # Ink over tissue or on glass (a ring drawn around a lesion is saturated like tissue).
    ink = mask_artefacts(thumb) & (mask | stained)
    return per_tile(mask & ~ink), {"ink": per_tile(ink)}, float(threshold)


def tile_kinds(
    tissue: np.ndarray, artefacts: dict[str, np.ndarray], min_fraction: float
) -> np.ndarray:
    """Per grid tile (flattened): 0 for tissue (at least ``min_fraction`` clean tissue), the
    :data:`TILE_KINDS` code of the main artefact for a tile that is at least ``min_fraction``
    tissue and artefacts together, -1 for the rest (glass)."""
    floor = max(min_fraction, 1e-9)
    flat = tissue.reshape(-1)
    kinds = np.where(flat >= floor, 0, -1).astype(np.int64)
    if not artefacts:
        return kinds
    stack = np.stack([artefacts[k].reshape(-1) for k in TILE_KINDS[1:]])
    flagged = (kinds < 0) & (flat + stack.sum(axis=0) >= floor) & (stack.max(axis=0) > 0)
    kinds[flagged] = 1 + stack.argmax(axis=0)[flagged]
    return kinds


def _otsu_threshold(sat: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    if float(sat.max() - sat.min()) < 1e-6:
        return 0.04
    # Clipped: a slide that is all tissue (or all glass) has no background mode for Otsu to find.
    return float(np.clip(threshold_otsu(sat), 0.03, 0.1))


def _grid_thumbnail(
    slide: Slide, level: int, read_size: int, cols: int, rows: int, m: int
) -> np.ndarray:
    """RGB uint8 (rows*m, cols*m) of the tile grid, area-averaged from a coarse level."""
    from PIL import Image

    ds = slide.level_downsamples[level]
    step0 = read_size * ds  # tile edge in level-0 pixels
    # Coarsest level whose tile edge still spans >= m pixels.
    mask_level = level
    for lvl, lds in enumerate(slide.level_downsamples):
        if step0 / lds >= m and lds > slide.level_downsamples[mask_level]:
            mask_level = lvl
    mds = slide.level_downsamples[mask_level]
    step = step0 / mds  # tile edge in mask-level pixels
    lw, lh = slide.level_dimensions[mask_level]
    out = np.empty((rows * m, cols * m, 3), dtype=np.uint8)
    band = max(1, int(4096 // max(step, 1)))  # tile rows per read: bounded memory
    for i0 in range(0, rows, band):
        i1 = min(rows, i0 + band)
        y0 = int(np.floor(i0 * step))
        y1 = min(lh, int(np.ceil(i1 * step)))
        x1 = min(lw, int(np.ceil(cols * step)))
        region = slide.read(0, int(round(y0 * mds)), mask_level, x1, y1 - y0)
        img = Image.fromarray(region).resize((cols * m, (i1 - i0) * m), Image.Resampling.BOX)
        out[i0 * m : i1 * m] = np.asarray(img)
    return out


def _positive_float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) and number > 0 else None


# --- reading --------------------------------------------------------------------------------


def read_tiles(
    plan: SlidePlan,
    start: int = 0,
    stop: int | None = None,
    rows_per_block: int = 1024,
    *,
    whole_segments: bool | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Tiles ``plan.tiles[start:stop]`` in blocks of at most ``rows_per_block``.

    Each block: ``image`` uint8 (n, T, T, 3), ``label`` int64 (n,), ``artefact`` str (n,) ("" for
    tissue), ``reader`` str (n,) (the library that decoded the tiles, ``plan.reader``) and the
    provenance columns. Tiles are read in regions: consecutive tiles of one grid
    row (tiled slides), or, where the decoder must decode far more rows than a tile has (a
    stripped TIFF: one strip can be the whole image), whole grid rows, or every tile of the block
    at once for a single-strip image, so each strip is decoded once rather than once per tile.
    ``whole_segments`` forces one way or the other (None: decide from the file).
    """
    from meddiff.data.shards import provenance

    tiles = plan.tiles[start:stop]
    kinds = np.asarray(TILE_KINDS, dtype=object)[plan.kinds[start:stop]]
    t, r = plan.tile_size, plan.read_size
    with open_slide(plan.path, plan.reader) as slide:
        segment = slide.segment_rows(plan.level)
        if whole_segments is None:
            whole_segments = segment is not None and segment > 4 * r
        height = slide.level_dimensions[plan.level][1]
        for lo in range(0, len(tiles), rows_per_block):
            chunk = tiles[lo : lo + rows_per_block]
            images = np.empty((len(chunk), t, t, 3), dtype=np.uint8)
            if not whole_segments:
                groups = _runs(chunk[:, 0], plan.cols, max_len=32)
            elif segment is not None and segment >= height:
                groups = iter([(0, len(chunk))])  # a single strip: decode it once
            else:
                groups = _runs(chunk[:, 0], plan.cols, max_len=None, consecutive=False)
            for a, b in groups:
                _read_group(slide, plan, chunk[a:b], images[a:b])
            block = {
                "image": images,
                "label": np.full(len(chunk), plan.label, dtype=np.int64),
                "artefact": kinds[lo : lo + len(chunk)],
            }
            where = (plan.level, chunk[:, 1], chunk[:, 2])
            block.update(provenance(plan.path, chunk[:, 0], *where, reader=plan.reader))
            yield block


def _read_group(slide: Slide, plan: SlidePlan, tiles: np.ndarray, out: np.ndarray) -> None:
    """Read the bounding region of ``tiles`` (grid index, x, y) once and cut them into ``out``."""
    r = plan.read_size
    rows, cols = np.divmod(tiles[:, 0], plan.cols)
    r0, c0 = int(rows.min()), int(cols.min())
    x0, y0 = int(tiles[:, 1].min()), int(tiles[:, 2].min())  # the origin of grid cell (r0, c0)
    region = slide.read(
        x0, y0, plan.level, r * (int(cols.max()) - c0 + 1), r * (int(rows.max()) - r0 + 1)
    )
    for k, (row, col) in enumerate(zip(rows - r0, cols - c0, strict=True)):
        out[k] = _fit(region[row * r : (row + 1) * r, col * r : (col + 1) * r], plan.tile_size)


def _runs(
    index: np.ndarray, cols: int, max_len: int | None, consecutive: bool = True
) -> Iterator[tuple[int, int]]:
    """[a, b) ranges of grid positions within one grid row: consecutive ones (at most
    ``max_len``), or with ``consecutive`` off every position of the row."""
    a = 0
    n = len(index)
    while a < n:
        b = a + 1
        while (
            b < n
            and (max_len is None or b - a < max_len)
            and (not consecutive or index[b] == index[b - 1] + 1)
            and index[b] // cols == index[a] // cols
        ):
            b += 1
        yield a, b
        a = b


def _warn_stripped(slide: Slide, level: int, read_size: int) -> None:
    """Log how a stripped (not tiled) TIFF level will be read: each strip once, in bands."""
    segment = slide.segment_rows(level)
    if segment is None or segment <= 4 * read_size:
        return
    width, height = slide.level_dimensions[level]
    band = height if segment >= height else segment
    log.warning(
        "slide %s is not tiled (level %d is stored in strips of %d rows): its tiles are read in "
        "regions of whole strips, holding up to %.0f MiB per read task; convert it to a tiled "
        "pyramid (e.g. with vips tiffsave --tile --pyramid) to read it faster",
        slide.path,
        level,
        segment,
        band * width * 3 / 2**20,
    )


def _fit(tile: np.ndarray, size: int) -> np.ndarray:
    if tile.shape[0] == size and tile.shape[1] == size:
        return tile
    from PIL import Image

    # Area averaging when reducing (no aliasing of nuclei); Lanczos when the level is a bit small.
    method = Image.Resampling.BOX if tile.shape[0] > size else Image.Resampling.LANCZOS
    return np.asarray(Image.fromarray(np.ascontiguousarray(tile)).resize((size, size), method))


# --- slide collections ----------------------------------------------------------------------


def is_slide_input(path: str | Path, cfg: WsiConfig) -> bool:
    """Whether ``path`` is a slide file, a DICOM whole-slide image (an instance or a folder of
    them), or a directory holding slides (and no PCam files)."""
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() in slide_suffixes(cfg) or is_tiff(path) or is_dicom_wsi(path)
    return path.is_dir() and bool(slide_files(path, cfg))


def slide_files(path: str | Path, cfg: WsiConfig) -> list[Path]:
    """The slides of a directory, sorted, not recursive: files ending in ``cfg.extensions`` and
    sub-folders holding a DICOM whole-slide image; ``[path]`` for a file or for a folder that is
    itself one DICOM whole-slide image."""
    path = Path(path)
    if path.is_file() or dicom_instance(path) is not None:
        return [path]
    suffixes = slide_suffixes(cfg)
    return sorted(
        p
        for p in path.iterdir()
        if (p.is_file() and p.suffix.lower() in suffixes)
        or (p.is_dir() and dicom_instance(p) is not None)
    )


def slide_labels(path: str | Path, slides: Sequence[Path], cfg: WsiConfig) -> dict[str, int]:
    """Slide file name → label, from ``cfg.labels_csv`` or a ``labels.csv`` beside the slides."""
    path = Path(path)
    csv_path = Path(cfg.labels_csv) if cfg.labels_csv else None
    if csv_path is None:
        beside = (path if path.is_dir() else path.parent) / LABELS_FILE
        csv_path = beside if beside.is_file() else None
    if csv_path is None:
        return {}
    if not csv_path.is_file():
        raise DataError(f"slide labels file {csv_path} (data.wsi.labels_csv) does not exist")
    labels: dict[str, int] = {}
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"slide", "label"} <= set(reader.fieldnames):
            raise DataError(
                f"{csv_path}: expected a header with columns slide,label, got {reader.fieldnames}"
            )
        for line, row in enumerate(reader, start=2):
            try:
                labels[Path(row["slide"]).name] = int(row["label"])
            except (TypeError, ValueError):
                raise DataError(
                    f"{csv_path} line {line}: label {row['label']!r} is not an integer"
                ) from None
    return labels


def slide_suffixes(cfg: WsiConfig) -> set[str]:
    """The configured slide file suffixes, lower case with their dot (``{".svs", ".tif"}``)."""
    return {s.lower() if s.startswith(".") else "." + s.lower() for s in cfg.extensions}


# --- writing (sample slides, tests) ---------------------------------------------------------


def _pyramid(rgb: np.ndarray, min_size: int) -> list[np.ndarray]:
    """``rgb`` uint8 (H, W, 3) and its halvings, each the 2x2 area average of the one before
    (what scanners' pyramids hold, no aliasing; an odd last row or column is dropped), until the
    shorter side of the next would be below ``min_size``."""
    levels = [rgb]
    while min(levels[-1].shape[:2]) // 2 >= min_size:
        prev = levels[-1]
        h, w = prev.shape[0] // 2 * 2, prev.shape[1] // 2 * 2
        levels.append(
            prev[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)
        )
    return levels


def write_pyramid_tiff(
    path: str | Path,
    rgb: np.ndarray,
    *,
    mpp: float | None,
    magnification: float | None,
    tile: int = 256,
    min_size: int = 256,
    quality: int = 90,
    title: str = "meddiff slide",
) -> Path:
    """Write ``rgb`` uint8 (H, W, 3) as a tiled, JPEG-compressed pyramid in the SVS layout.

    Pages: level 0, a thumbnail, then levels halved until the shorter side is below
    ``min_size``, which tiffslide and OpenSlide both read as one pyramid. The description carries
    ``AppMag`` and ``MPP`` (read as objective power and pixel size) when given; the resolution
    tags carry the pixel size as well. Written to a temporary name, then renamed.
    """
    import tifffile
    from PIL import Image

    rgb = np.ascontiguousarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise DataError(
            f"write_pyramid_tiff: expected uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    levels = _pyramid(rgb, min_size)
    thumb = Image.fromarray(levels[-1])
    thumb.thumbnail((768, 768))
    fields = [f"{title}"]
    if magnification:
        fields.append(f"AppMag = {magnification:g}")
    if mpp:
        fields.append(f"MPP = {mpp:g}")
    tmp = path.with_name(path.name + f".partial-{os.getpid()}")
    try:
        with tifffile.TiffWriter(tmp, bigtiff=rgb.nbytes > 2**31) as tif:
            for i, level in enumerate(levels):
                h, w = level.shape[:2]
                head = (
                    f"Aperio Image Library meddiff\r\n{rgb.shape[1]}x{rgb.shape[0]} "
                    f"[0,0 {rgb.shape[1]}x{rgb.shape[0]}] ({tile}x{tile}) JPEG/RGB Q={quality}"
                )
                desc = "|".join([head if i == 0 else f"{head} -> {w}x{h}", *fields])
                extra = {}
                if mpp:
                    ds = rgb.shape[1] / w
                    extra = {"resolution": (1e4 / (mpp * ds),) * 2, "resolutionunit": "CENTIMETER"}
                tif.write(
                    level,
                    tile=(tile, tile),
                    compression="jpeg",
                    compressionargs={"level": quality},
                    photometric="rgb",
                    description=desc,
                    # 0 on every level: SVS readers stop the pyramid at a "reduced" page.
                    subfiletype=0,
                    metadata=None,
                    **extra,
                )
                if i == 0:
                    tif.write(
                        np.asarray(thumb),
                        photometric="rgb",
                        description=f"{head} -> thumbnail",
                        metadata=None,
                    )
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path
