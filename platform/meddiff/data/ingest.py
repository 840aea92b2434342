"""Ingest: stream a patch source through Ray Data into Parquet shards, recorded in MLflow."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from meddiff import runtime, storage, tracking
from meddiff.config import Config
from meddiff.data.datasets import patch_dataset
from meddiff.data.shards import producer_run, write_shards

log = logging.getLogger(__name__)


def ingest(
    cfg: Config,
    source: str | Path,
    out: str | Path | storage.OutputLocation,
    *,
    split: str = "train",
    limit: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``source`` (PCam directory or shard directory) as shards under ``out`` (a path or
    the command's :class:`~meddiff.storage.OutputLocation`).

    Returns the shard manifest (rows, files, label counts, ...), which is also logged.
    """
    runtime.connect(cfg.runtime)
    with tracking.start_run(cfg, "ingest") as run:
        run.log_params({"input": str(source), "split": split, "out": str(out), "limit": limit})
        run.log_input(source, context="source", producer_run=producer_run(source))
        start = time.perf_counter()
        ds = patch_dataset(source, cfg.data, split=split, limit=limit)
        manifest = write_shards(
            ds,
            out,
            rows_per_file=cfg.data.shards.rows_per_file,
            info={"source": str(source), "split": split},
            overwrite=overwrite,
            run_id=run.run_id,
        )
        seconds = time.perf_counter() - start
        run.log_metrics(
            {
                "rows": manifest["rows"],
                "files": len(manifest["files"]),
                "patches_per_s": manifest["rows"] / seconds,
            }
        )
        run.log_dict(manifest, "shards_manifest.json")
    log.info("wrote %d patches to %s in %.1f s", manifest["rows"], out, seconds)
    return manifest
