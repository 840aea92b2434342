"""Parquet shards of (image, label, provenance) that later stages stream.

Every patch source (PCam HDF5, whole-slide tiles, PNG folders) becomes the same in-memory batch,
a dict of numpy arrays:

    image    uint8 (n, H, W, C)
    label    int64 (n,)  -1 where unknown
    source   str   (n,)  the file the patch came from
    index    int64 (n,)  row in that file, or tile number in that slide
    level    int64 (n,)  pyramid level of a whole-slide tile, else -1
    x, y     int64 (n,)  tile origin in level-0 pixels, else -1

plus any columns a stage adds (``cluster``, ``prompt``, ...). On disk the image is stored as raw
bytes with its ``height``/``width``/``channels``, so any Parquet reader can decode it with numpy.
A directory is complete only when its manifest (``_meddiff_shards.json``) exists: it is written
last, after the files moved into place, so an interrupted write never looks finished.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from meddiff import storage
from meddiff.errors import DataError

if TYPE_CHECKING:
    import ray.data

MANIFEST = "_meddiff_shards.json"
FORMAT = "meddiff-shards/1"
PROVENANCE = ("source", "index", "level", "x", "y", "reader")
T = TypeVar("T")


def provenance(
    source: str, index: np.ndarray, level=-1, x=-1, y=-1, reader: str = ""
) -> dict[str, np.ndarray]:
    """Provenance columns for ``len(index)`` patches of one source (scalars are broadcast):
    ``reader`` names what decoded them (``"h5py"`` for PCam, ``"tiffslide"``/``"openslide"`` for
    slides), so shards of several sources share one schema and can be concatenated."""
    n = len(index)
    return {
        "reader": np.full(n, reader, dtype=object),
        "source": np.full(n, source, dtype=object),
        "index": np.asarray(index, dtype=np.int64),
        "level": np.broadcast_to(np.asarray(level, dtype=np.int64), (n,)).copy(),
        "x": np.broadcast_to(np.asarray(x, dtype=np.int64), (n,)).copy(),
        "y": np.broadcast_to(np.asarray(y, dtype=np.int64), (n,)).copy(),
    }


def encode_batch(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """In-memory batch → on-disk columns (image as raw bytes plus its shape)."""
    images = np.ascontiguousarray(batch["image"])
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(
            f"shard images must be uint8 (n, H, W, C), got {images.dtype} {images.shape}"
        )
    n, h, w, c = images.shape
    out = {k: v for k, v in batch.items() if k != "image"}
    flat = images.reshape(n, -1)
    out["image"] = np.array([row.tobytes() for row in flat], dtype=object)
    out["height"] = np.full(n, h, dtype=np.int32)
    out["width"] = np.full(n, w, dtype=np.int32)
    out["channels"] = np.full(n, c, dtype=np.int32)
    return out


def decode_batch(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """On-disk columns → in-memory batch. All images of one batch must share a shape."""
    out = {k: v for k, v in batch.items() if k not in ("image", "height", "width", "channels")}
    n = len(batch["image"])
    shapes = {
        (int(h), int(w), int(c))
        for h, w, c in zip(batch["height"], batch["width"], batch["channels"], strict=True)
    }
    if len(shapes) > 1:
        raise DataError(f"shard batch mixes image shapes {sorted(shapes)}; resize before sharding")
    shape = shapes.pop() if shapes else (0, 0, 0)
    buf = b"".join(batch["image"])
    out["image"] = np.frombuffer(buf, dtype=np.uint8).reshape(n, *shape)
    return out


def write_shards(
    ds: ray.data.Dataset,
    out_dir: str | Path,
    *,
    rows_per_file: int,
    info: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    run_id: str | None = None,
) -> dict[str, Any]:
    """Stream ``ds`` (in-memory patch batches) to Parquet shards under ``out_dir`` (a path or an
    :class:`~meddiff.storage.OutputLocation`), all or nothing; returns the manifest.

    The Ray workers write the files where every node reaches them: beside a local ``out_dir``
    (``<out_dir>.partial``, put in place when every block is written), or straight under an
    object-store prefix (which has no directory rename). The manifest goes in last: until then a
    reader refuses the output as incomplete. The files are named ``meddiff-<token>-...``, so the
    leftovers of an interrupted write are told from anything else there; a rewrite removes the
    old manifest (first) and the files it lists, never a file meddiff did not write.

    ``run_id``, the MLflow run writing the shards (its handle's ``run_id``), goes in the manifest
    as ``mlflow_run_id``: lineage follows it from a dataset back to that run (and through the
    run's own inputs, to the source files).

    Raises:
        DataError: ``out_dir`` already holds an output and ``overwrite`` is False; it is a
            bucket root or a file.
    """
    info = {**(info or {}), **({"mlflow_run_id": run_id} if run_id else {})}
    with storage.OutputLocation.use(out_dir, overwrite=overwrite, marker=None) as loc:
        loc.clear()  # what --overwrite replaces, or an interrupted write's leftovers
        partial = loc.staging.with_name(loc.staging.name + ".partial")
        where = loc.shared(partial)  # the prefix itself for an object store
        if where == partial:
            storage.delete_dir(partial)  # an interrupted local write's leftovers
        start = time.perf_counter()
        encoded = ds.map_batches(encode_batch, batch_format="numpy", zero_copy_batch=True)
        tokens: list[str] = []

        def write() -> str:
            # A fresh token per attempt: what a failed attempt wrote is told apart, and removed.
            tokens.append(storage.write_token())
            fs, inner = storage.filesystem(where)
            encoded.write_parquet(
                inner,
                filesystem=fs,
                min_rows_per_file=rows_per_file,
                filename_provider=_Names(tokens[-1]),
            )
            return tokens[-1]

        token = storage.retry(str(loc.target), write, only_transient=True)
        written = storage.list_files(where, recursive=False)
        files = [n for n in written if n.startswith(token)]
        storage.delete_files(where, [n for n in written if n.startswith(tuple(tokens[:-1]))])
        if not files:
            raise DataError(f"nothing to write to {loc.target}: the input produced no patches")
        manifest = _describe(where, files, info, time.perf_counter() - start)
        loc.install(where)
        storage.write_text(
            storage.join(loc.shared(loc.staging), MANIFEST), json.dumps(manifest, indent=2)
        )
    return manifest


class _Names:
    """Ray Data file names for one write: ``<token><write uuid>_<task>-<i>.parquet``."""

    def __init__(self, token: str):
        self.token = token

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"{self.token}{write_uuid}_{task_index:06}"


def concat_shards(
    dirs: list[str | Path],
    out_dir: str | Path,
    *,
    rows_per_file: int,
    info: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    run_id: str | None = None,
) -> dict[str, Any]:
    """One shard directory with the rows of every directory in ``dirs`` (e.g. PCam pairs and
    slide-tile pairs to train on together), written like :func:`write_shards`.

    Raises:
        DataError: a directory is incomplete, or its columns differ from the first one's.
    """
    manifests = [read_manifest(d) for d in dirs]
    if not manifests:
        raise DataError("concat_shards needs at least one shard directory")
    want = sorted(manifests[0]["columns"])
    for d, m in zip(dirs[1:], manifests[1:], strict=True):
        if sorted(m["columns"]) != want:
            raise DataError(
                f"{d}: columns {sorted(m['columns'])} differ from {dirs[0]}'s {want}; "
                "only shards of the same kind can be combined"
            )
    ds = read_shards(dirs[0])
    if len(dirs) > 1:
        ds = ds.union(*(read_shards(d) for d in dirs[1:]))
    return write_shards(
        ds, out_dir, rows_per_file=rows_per_file, info=info, overwrite=overwrite, run_id=run_id
    )


def producer_run(path: str | Path) -> str | None:
    """The MLflow run that wrote the shard directory ``path`` (its manifest's ``mlflow_run_id``);
    None when ``path`` is not a complete shard directory or no run wrote it."""
    try:
        return read_manifest(path).get("mlflow_run_id") or None
    except Exception:  # not a shard directory (a file, PNGs, PCam): no producing run to follow
        return None


def _describe(
    root: Path | str, files: list[str], info: Mapping[str, Any] | None, seconds: float
) -> dict[str, Any]:
    import pyarrow.parquet as pq

    fs, inner = storage.filesystem(root)
    sizes = storage.file_sizes(root, recursive=False)
    rows = 0
    schema = None
    labels: dict[str, int] = {}
    for name in files:
        path = f"{inner}/{name}"
        meta = _parquet(root, name, lambda p=path: pq.read_metadata(p, filesystem=fs))
        rows += meta.num_rows
        schema = schema or meta.schema.to_arrow_schema()
        if "label" in schema.names:
            table = _parquet(
                root, name, lambda p=path: pq.read_table(p, columns=["label"], filesystem=fs)
            )
            values, counts = np.unique(table["label"], return_counts=True)
            for value, count in zip(values.tolist(), counts.tolist(), strict=True):
                labels[str(value)] = labels.get(str(value), 0) + count
    return {
        "format": FORMAT,
        "rows": rows,
        "files": files,
        "sizes": {name: sizes[name] for name in files},
        "columns": schema.names if schema is not None else [],
        "labels": dict(sorted(labels.items())),
        "write_seconds": round(seconds, 3),
        **(info or {}),
    }


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a complete shard directory (or object-store prefix).

    Raises:
        DataError: not a directory, or no manifest (never written, or the write was interrupted).
    """
    kind = storage.noun(path)
    target = storage.join(path, MANIFEST)
    if not storage.is_file(target):
        if not storage.is_dir(path):
            raise DataError(f"shard {kind} {path} does not exist")
        raise DataError(
            f"{path} is not a complete meddiff shard {kind} (no {MANIFEST}; was the write "
            "interrupted?)"
        )
    try:
        data = json.loads(storage.read_text(target))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{target}: corrupt JSON ({err})") from None
    found = data.get("format") if isinstance(data, dict) else None
    if found != FORMAT:
        raise DataError(f"{target}: format {found!r}, expected {FORMAT!r}")
    return data


# The smallest Parquet file: "PAR1", a footer length and "PAR1" again.
PARQUET_MIN_BYTES = 12


def check_files(path: str | Path, manifest: Mapping[str, Any]) -> None:
    """Every file the manifest of ``path`` lists is there, with the size the manifest recorded
    (older manifests: at least a Parquet file's): one listing, no file read.

    Raises:
        DataError: naming the first missing, emptied or replaced file (its URI for a prefix).
    """
    found = storage.file_sizes(path, recursive=False)
    sizes = manifest.get("sizes") or {}
    for name in manifest["files"]:
        got, want = found.get(name), sizes.get(name)
        where = storage.join(path, name)
        if got is None:
            raise DataError(
                f"{where}: listed in {MANIFEST} but missing (deleted after the write?); "
                "write the shards again"
            )
        if (want is not None and got != want) or got < PARQUET_MIN_BYTES:
            expected = f"{MANIFEST} says {want}" if want is not None else "not a Parquet file"
            raise DataError(
                f"{where}: {got} bytes, {expected} (emptied or replaced after the write?); "
                "write the shards again"
            )


def _parquet(path: str | Path, name: str, read: Callable[[], T]) -> T:
    """``read()`` of the Parquet file ``name`` under ``path`` (all of them for ""), retried on
    transient errors; an unreadable file is a DataError naming it, not a traceback."""
    import pyarrow as pa

    where = str(storage.join(path, name)) if name else str(path)
    try:
        return storage.retry(where, read)
    except pa.ArrowException as err:
        raise DataError(
            f"{where}: not a readable Parquet file ({storage.first_line(err)})"
        ) from None


def is_shard_dir(path: str | Path) -> bool:
    return storage.is_file(storage.join(path, MANIFEST))


def read_shards(path: str | Path, columns: list[str] | None = None) -> ray.data.Dataset:
    """A Ray dataset of in-memory patch batches from a complete shard directory."""
    import ray.data

    manifest = read_manifest(path)
    if columns is not None:
        missing = sorted(set(columns) - set(manifest["columns"]) - {"image"})
        if missing:
            raise DataError(
                f"{path}: shards have no column(s) {missing}; have {manifest['columns']}"
            )
        columns = sorted({*columns, "image", "height", "width", "channels"})
    check_files(path, manifest)
    fs, inner = storage.filesystem(path)
    files = [f"{inner}/{name}" for name in manifest["files"]]
    ds = ray.data.read_parquet(files, columns=columns, filesystem=fs)
    return ds.map_batches(decode_batch, batch_format="numpy", zero_copy_batch=True)


def read_file(path: str | Path, name: str, columns: list[str] | None = None):
    """One shard file of a directory or object prefix as a pyarrow Table (``columns`` only)."""
    import pyarrow.parquet as pq

    fs, inner = storage.filesystem(path)
    target = f"{inner}/{name}"
    return _parquet(path, name, lambda: pq.read_table(target, columns=columns, filesystem=fs))


def load_shards(path: str | Path) -> dict[str, np.ndarray]:
    """Read a whole shard directory into memory without Ray (small sets, tests, tools)."""
    import pyarrow.parquet as pq

    manifest = read_manifest(path)
    check_files(path, manifest)
    fs, inner = storage.filesystem(path)
    files = [f"{inner}/{name}" for name in manifest["files"]]
    table = _parquet(path, "", lambda: pq.read_table(files, filesystem=fs))
    return decode_batch(
        {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}
    )
