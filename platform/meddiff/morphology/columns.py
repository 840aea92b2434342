"""A build's shard folders read one column at a time on the driver (no Ray tasks, no images):
embeddings for the fit, reject reasons, labels and clusters for the summary."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


def iter_column(
    shard_dir: Path, column: str, *, kept_only: bool = True, rows_per_batch: int = 8192
) -> Iterator[np.ndarray]:
    """Batches of one column of a shard directory, in file order (deterministic), on the driver.

    Embeddings come back as float32 (b, D); with ``kept_only`` rows with a ``reject`` reason are
    dropped. Only the requested columns are read (no images).
    """
    import pyarrow.parquet as pq
    import ray.data  # noqa: F401  (registers Ray's tensor column type with pyarrow before reading)

    from meddiff.data.shards import read_manifest

    manifest = read_manifest(shard_dir)
    want = [column, "reject"] if kept_only and column != "reject" else [column]
    for name in manifest["files"]:
        pf = pq.ParquetFile(shard_dir / name)
        for batch in pf.iter_batches(batch_size=rows_per_batch, columns=want):
            values = _to_numpy(batch.column(0))
            if kept_only and column != "reject":
                keep = np.asarray(batch.column(1).to_pylist(), dtype=object) == ""
                values = values[keep]
            yield values


def _to_numpy(array: Any) -> np.ndarray:
    """A pyarrow column as numpy; Ray's tensor columns (embeddings) become (n, ...) arrays."""
    import pyarrow as pa

    if isinstance(array.type, pa.ExtensionType):
        return np.asarray(array.to_numpy())
    return array.to_numpy(zero_copy_only=False)


def columns(shard_dir: Path, names: list[str]) -> list[np.ndarray]:
    """Whole columns ``names`` of a shard directory (every row), one array each."""
    out = []
    for name in names:
        parts = list(iter_column(shard_dir, name, kept_only=False))
        out.append(np.concatenate(parts) if parts else np.empty(0, np.int64))
    return out


def reject_counts(checked: Path) -> dict[str, int]:
    """Rows per ``reject`` value of a pass-1 directory ("" = kept)."""
    counts: dict[str, int] = {}
    for batch in iter_column(checked, "reject", kept_only=False):
        values, n = np.unique(batch.astype(str), return_counts=True)
        for v, c in zip(values.tolist(), n.tolist(), strict=True):
            counts[v] = counts.get(v, 0) + c
    return counts


def cluster_sizes(labels: np.ndarray, clusters: np.ndarray) -> dict[str, dict[str, int]]:
    """{cluster: {label: count, "total": count}} (JSON keys are strings)."""
    sizes: dict[str, dict[str, int]] = {}
    pairs, counts = np.unique(np.stack([clusters, labels], 1), axis=0, return_counts=True)
    for (c, lab), n in zip(pairs.tolist(), counts.tolist(), strict=True):
        cell = sizes.setdefault(str(c), {"total": 0})
        cell[str(lab)] = n
        cell["total"] += n
    return sizes
