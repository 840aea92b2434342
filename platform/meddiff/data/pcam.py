"""PCam-format HDF5: validated reading by row range, and an all-or-nothing writer.

The format (README, section Data), kept exact because other tools read it:
``camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5`` (or ``.h5.gz``); dataset ``x`` is uint8
(N, 96, 96, 3), dataset ``y`` is uint8 (N, 1, 1, 1) with 1 = tumour in the centre 32×32 patch.

Synthetic sets use the same layout plus a ``..._meta.csv`` sidecar with one row per image (prompt,
cluster, seed, ...), so every tool that reads PCam reads them too.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import os
import shutil
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from meddiff import storage
from meddiff.errors import DataError

SPLITS = ("train", "valid", "test")
PREFIX = "camelyonpatch_level_2_split"


def pcam_filename(split: str, kind: str) -> str:
    """``camelyonpatch_level_2_split_{split}_{kind}.h5`` for kind in x, y."""
    return f"{PREFIX}_{split}_{kind}.h5"


def meta_filename(split: str) -> str:
    return f"{PREFIX}_{split}_meta.csv"


@dataclass(frozen=True)
class PCamSplit:
    """One validated split. ``x_path``/``y_path`` are readable HDF5 files (decompressed if the
    originals were ``.h5.gz``); ``x_source`` is the file the user named, for messages."""

    split: str
    x_path: Path
    y_path: Path
    x_source: Path | str
    num_rows: int
    patch_size: int
    # For a split in object storage: the objects and the filesystem that reads them (pickled into
    # Ray read tasks, which fetch their own node-local copy; see storage.cached_file).
    x_uri: str | None = None
    y_uri: str | None = None
    fs: Any = None
    cache_dir: str | None = None

    @property
    def source(self) -> str:
        """The x file as the user named it (a URI for object storage), for provenance."""
        return self.x_uri or str(self.x_source)

    def local_paths(self) -> tuple[Path, Path]:
        """Readable local x and y files (fetched and decompressed once per node if remote)."""
        if not self.x_uri:
            return self.x_path, self.y_path
        return tuple(
            materialize(storage.cached_file(u, fs=self.fs), self.cache_dir)
            for u in (self.x_uri, self.y_uri)
        )


def find_split_files(root: Path | str, split: str) -> tuple[Path | str, Path | str]:
    """The x and y files of ``split`` under ``root`` (``.h5`` preferred over ``.h5.gz``), a
    local folder or an object-store prefix."""
    if split not in SPLITS:
        raise DataError(f"unknown PCam split '{split}'; expected one of {', '.join(SPLITS)}")
    names = set(storage.list_files(root, recursive=False))
    if not names and not storage.is_dir(root):
        raise DataError(f"PCam directory {root} does not exist")
    found = []
    for kind in ("x", "y"):
        plain = pcam_filename(split, kind)
        for name in (plain, plain + ".gz"):
            if name in names:
                found.append(storage.join(root, name))
                break
        else:
            raise DataError(f"{root}: missing {plain} (or {plain}.gz) for split '{split}'")
    return found[0], found[1]


def available_splits(root: Path | str) -> list[str]:
    """Splits of ``root`` (a directory or an object-store prefix) whose x file exists."""
    if not storage.is_dir(root):
        return []
    names = set(storage.list_files(root, recursive=False))
    return [s for s in SPLITS if {pcam_filename(s, "x"), pcam_filename(s, "x") + ".gz"} & names]


def open_pcam(
    root: str | Path,
    split: str,
    patch_size: int | None = 96,
    cache_dir: str | Path | None = None,
) -> PCamSplit:
    """Validate one split and return where to read it.

    Checks: both files exist and are HDF5 (not truncated, not another format), ``x`` is uint8
    (N, S, S, 3) with S = ``patch_size`` (any S if None), ``y`` is uint8 (N, 1, 1, 1) with values
    in {0, 1}, and the two lengths agree. Every error names the file and the problem.
    """
    x_src, y_src = find_split_files(root, split)
    # Where Ray read tasks read it: the files and the filesystem that serves them (pickled, with
    # an object store's endpoint and credentials; each task fetches its node-local copy).
    fs, _ = storage.filesystem(root)
    cache = str(cache_dir) if cache_dir else None
    remote = {"x_uri": str(x_src), "y_uri": str(y_src), "fs": fs, "cache_dir": cache}
    x_path = materialize(storage.cached_file(x_src), cache_dir)
    y_path = materialize(storage.cached_file(y_src), cache_dir)
    with _open_h5(x_path, x_src) as fx, _open_h5(y_path, y_src) as fy:
        x = _dataset(fx, "x", x_src)
        y = _dataset(fy, "y", y_src)
        _check_x(x, x_src, patch_size)
        _check_y(y, y_src)
        if x.shape[0] != y.shape[0]:
            raise DataError(
                f"{storage.name(x_src)} has {x.shape[0]} patches but {storage.name(y_src)} has "
                f"{y.shape[0]} labels"
            )
        _check_complete(x, x_src)
        labels = _read(y, 0, y.shape[0], y_src)
        bad = np.flatnonzero(labels > 1)
        if bad.size:
            raise DataError(
                f"{y_src}: label {int(labels.flat[bad[0]])} at row {int(bad[0])}; labels must be 0 or 1"
            )
        return PCamSplit(split, x_path, y_path, x_src, int(x.shape[0]), int(x.shape[1]), **remote)


def read_rows(split: PCamSplit, start: int, stop: int) -> dict[str, np.ndarray]:
    """Rows ``[start, stop)`` as one block (see :func:`iter_blocks`)."""
    return next(iter_blocks(split, start, stop, max(1, stop - start)))


def iter_blocks(
    split: PCamSplit, start: int, stop: int, rows: int
) -> Iterator[dict[str, np.ndarray]]:
    """Rows ``[start, stop)`` in blocks of at most ``rows``: ``image`` uint8 (n, S, S, 3), ``label``
    int64 (n,) and the row ``index``. One open file handle serves the whole range (reopening per
    block costs more than the read)."""
    x_path, y_path = split.local_paths()
    with _open_h5(x_path, split.x_source) as fx, _open_h5(y_path, split.y_path) as fy:
        for lo in range(start, stop, rows):
            hi = min(lo + rows, stop)
            yield {
                "image": _read(fx["x"], lo, hi, split.x_source),
                "label": _read(fy["y"], lo, hi, split.y_path).reshape(-1).astype(np.int64),
                "index": np.arange(lo, hi, dtype=np.int64),
            }


def materialize(path: Path, cache_dir: str | Path | None = None) -> Path:
    """``path`` itself, or for ``.h5.gz`` a decompressed copy made once in the cache.

    The copy is keyed by the file's absolute path, size and mtime, and written to a temporary name
    then renamed, so an interrupted decompression never leaves a file that looks complete.
    """
    if path.suffix != ".gz":
        return path
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    root = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "meddiff" / "pcam"
    out = root / f"{key[:16]}-{path.name[:-3]}"
    if out.is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".partial-{os.getpid()}")
    try:
        with gzip.open(path, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, length=16 * 2**20)
        os.replace(tmp, out)
    except (OSError, EOFError, zlib.error) as err:
        tmp.unlink(missing_ok=True)
        raise DataError(f"{path}: cannot decompress ({err}); is it a complete .gz file?") from None
    return out


class PCamWriter:
    """Write one split in the PCam layout, all or nothing.

    Batches are appended to ``*.partial`` files that are renamed to their final names only when
    the context exits without error; on error they are deleted, so a crash never leaves a split
    that looks complete. Optional per-image metadata columns go to ``..._meta.csv``.

    >>> with PCamWriter(out_dir, "train") as w:
    ...     w.write(images, labels, meta={"prompt": prompts, "seed": seeds})
    """

    def __init__(self, root: str | Path, split: str, patch_size: int = 96, chunk_rows: int = 256):
        if split not in SPLITS:
            raise DataError(f"unknown PCam split '{split}'; expected one of {', '.join(SPLITS)}")
        self.root = Path(root)
        self.split = split
        self.patch_size = patch_size
        self.chunk_rows = chunk_rows
        self.num_rows = 0
        self._meta: dict[str, list] = {}
        self._final = [self.root / pcam_filename(split, k) for k in ("x", "y")]
        self._final.append(self.root / meta_filename(split))
        self._partial = [p.with_name(p.name + ".partial") for p in self._final]

    def __enter__(self) -> PCamWriter:
        self.root.mkdir(parents=True, exist_ok=True)
        s = self.patch_size
        self._fx = h5py.File(self._partial[0], "w")
        self._fy = h5py.File(self._partial[1], "w")
        self._x = self._fx.create_dataset(
            "x",
            (0, s, s, 3),
            maxshape=(None, s, s, 3),
            dtype="u1",
            chunks=(self.chunk_rows, s, s, 3),
        )
        self._y = self._fy.create_dataset(
            "y", (0, 1, 1, 1), maxshape=(None, 1, 1, 1), dtype="u1", chunks=(4096, 1, 1, 1)
        )
        return self

    def write(
        self,
        images: np.ndarray,
        labels: np.ndarray | Sequence[int],
        meta: Mapping[str, Sequence] | None = None,
    ) -> None:
        """Append ``images`` uint8 (n, S, S, 3) with ``labels`` in {0, 1} and optional metadata."""
        images = np.asarray(images)
        labels = np.asarray(labels).reshape(-1)
        s = self.patch_size
        if images.dtype != np.uint8 or images.shape[1:] != (s, s, 3):
            raise DataError(
                f"PCamWriter({self.root}, {self.split}): images must be uint8 (n, {s}, {s}, 3), "
                f"got {images.dtype} {images.shape}"
            )
        if len(labels) != len(images) or (len(labels) and not np.isin(labels, (0, 1)).all()):
            raise DataError(
                f"PCamWriter({self.root}, {self.split}): need one 0/1 label per image, "
                f"got {len(labels)} labels for {len(images)} images"
            )
        n0, n = self.num_rows, len(images)
        self._x.resize(n0 + n, axis=0)
        self._y.resize(n0 + n, axis=0)
        self._x[n0:] = images
        self._y[n0:] = labels.astype(np.uint8).reshape(-1, 1, 1, 1)
        self.num_rows += n
        self._append_meta(meta or {}, n)

    def _append_meta(self, meta: Mapping[str, Sequence], n: int) -> None:
        if self.num_rows > n and set(meta) != set(self._meta):
            raise DataError(f"PCamWriter: metadata columns changed to {sorted(meta)}")
        for key, values in meta.items():
            if len(values) != n:
                raise DataError(
                    f"PCamWriter: metadata '{key}' has {len(values)} values for {n} images"
                )
            self._meta.setdefault(key, []).extend(np.asarray(values).tolist())

    def __exit__(self, exc_type, exc, tb) -> None:
        self._fx.close()
        self._fy.close()
        if exc_type is None and self._meta:
            with open(self._partial[2], "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["index", *self._meta])
                writer.writerows(zip(range(self.num_rows), *self._meta.values(), strict=True))
        if exc_type is not None:
            for p in self._partial:
                p.unlink(missing_ok=True)
            return
        for partial, final in zip(self._partial, self._final, strict=True):
            if partial.exists():
                os.replace(partial, final)


def write_pcam(
    root: str | Path,
    split: str,
    images: np.ndarray,
    labels: np.ndarray,
    meta: Mapping[str, Sequence] | None = None,
) -> Path:
    """Write a whole split at once (see :class:`PCamWriter`); returns the x file's path."""
    with PCamWriter(root, split, patch_size=int(images.shape[1])) as w:
        w.write(images, labels, meta)
    return Path(root) / pcam_filename(split, "x")


def read_meta(root: str | Path, split: str) -> list[dict[str, str]] | None:
    """The ``..._meta.csv`` rows of a split, or None when it has none (a real PCam set)."""
    path = Path(root) / meta_filename(split)
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- validation helpers ---------------------------------------------------------------------


def _open_h5(path: Path, shown: Path) -> h5py.File:
    if not path.is_file():
        raise DataError(f"{shown}: file does not exist")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise DataError(f"{shown}: not a readable HDF5 file ({_h5_reason(err)})") from None


def _h5_reason(err: OSError) -> str:
    text = str(err)
    if "truncated" in text:
        return "the file is truncated"
    if "signature" in text:
        return "no HDF5 signature: not an HDF5 file"
    return text


def _dataset(f: h5py.File, name: str, shown: Path) -> h5py.Dataset:
    obj = f.get(name)
    if not isinstance(obj, h5py.Dataset):
        raise DataError(f"{shown}: no dataset '{name}' (found: {', '.join(f.keys()) or 'nothing'})")
    return obj


def _check_x(x: h5py.Dataset, shown: Path, patch_size: int | None) -> None:
    shape_ok = x.ndim == 4 and x.shape[3] == 3 and x.shape[1] == x.shape[2]
    if shape_ok and patch_size is not None:
        shape_ok = x.shape[1] == patch_size
    if not shape_ok:
        size = patch_size or "S"
        raise DataError(
            f"{shown}: dataset 'x' has shape {x.shape}; expected (N, {size}, {size}, 3)"
        )
    if x.dtype != np.uint8:
        raise DataError(f"{shown}: dataset 'x' has dtype {x.dtype}; expected uint8")
    if x.shape[0] == 0:
        raise DataError(f"{shown}: dataset 'x' is empty")


def _check_y(y: h5py.Dataset, shown: Path) -> None:
    if y.ndim != 4 or y.shape[1:] != (1, 1, 1):
        raise DataError(f"{shown}: dataset 'y' has shape {y.shape}; expected (N, 1, 1, 1)")
    if y.dtype != np.uint8:
        raise DataError(f"{shown}: dataset 'y' has dtype {y.dtype}; expected uint8")


def _check_complete(dset: h5py.Dataset, shown: Path) -> None:
    """Catch a file cut short after its header: every byte the dataset owns must be in the file."""
    size = os.path.getsize(dset.file.filename)
    if dset.chunks is None:
        offset = dset.id.get_offset()
        end = (offset or 0) + dset.id.get_storage_size()
    else:
        # Chunk addresses are spread through the file; a sample of them (always the last) is
        # enough to catch a truncated copy without walking millions of chunks.
        n = dset.id.get_num_chunks()
        picks = [*range(0, n, max(1, n // 4096)), n - 1] if n else []
        end = max((c.byte_offset + c.size for c in map(dset.id.get_chunk_info, picks)), default=0)
    if end > size:
        raise DataError(
            f"{shown}: the file is truncated ({size} bytes, but dataset '{dset.name.lstrip('/')}' "
            f"needs {end})"
        )


def _read(dset: h5py.Dataset, start: int, stop: int, shown: Path) -> np.ndarray:
    try:
        return dset[start:stop]
    except (OSError, ValueError) as err:
        raise DataError(
            f"{shown}: cannot read rows {start}..{stop} of '{dset.name}' ({err})"
        ) from None
