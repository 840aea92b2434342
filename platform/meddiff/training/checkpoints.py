"""One checkpoint format for every training loop.

A checkpoint is a folder ``checkpoint_<step:08d>/`` under the run directory (``OUT/ray/<run>``)
holding what the strategy saves (``trainer_state.pt`` with DDP: model, optimizer, LR schedule,
loss scaler; ``deepspeed/state/`` with DeepSpeed: every rank's ZeRO partition), whatever the loop
adds (a model directory, EMA weights) and, written last by rank 0, ``meddiff_checkpoint.json``::

    {"step": 40, "strategy": "ddp", "zero_stage": 1, "precision": "fp32", "world_size": 2,
     "model_config": {...}, "time": ..., ...loop extras}

A folder without that marker was interrupted while being written and is never used. Ray Train
commits a checkpoint once every rank has reported it, keeps the newest ``keep_checkpoints`` and
hands the newest committed one to restarted workers (``ray.train.get_checkpoint``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from meddiff.errors import ModelError
from meddiff.files import write_json

MARKER = "meddiff_checkpoint.json"
PREFIX = "checkpoint_"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def read_marker(path: str | Path) -> dict[str, Any]:
    """The marker of a complete checkpoint.

    Raises:
        ModelError: no marker (the checkpoint was not finished) or an unreadable one.
    """
    marker = Path(path) / MARKER
    if not marker.is_file():
        raise ModelError(
            f"checkpoint {path} is incomplete (no {MARKER}); it was not finished writing"
        )
    try:
        return json.loads(marker.read_text())
    except json.JSONDecodeError as err:
        raise ModelError(f"{marker}: corrupt ({err})") from None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (highest step with a marker) under ``run_dir``, or None."""
    found = []
    for d in Path(run_dir).glob(f"{PREFIX}*"):
        if (d / MARKER).is_file():
            try:
                found.append((int(read_marker(d)["step"]), d))
            except (ModelError, KeyError, TypeError, ValueError):
                continue
    return max(found)[1] if found else None


def save_and_report(
    ctx,
    step: int,
    metrics: dict[str, Any],
    write: Callable[[Path], None],
    info: dict[str, Any],
    *,
    drill=None,
) -> None:
    """Write this rank's part of the step-``step`` checkpoint and report it to Ray Train.

    ``write(tmp)`` saves this rank's files (the strategy's state, the loop's model) into a fresh
    folder; then rank 0 writes the marker holding ``info`` plus the step and time, and every rank
    reports (Ray Train merges the ranks' folders). ``drill`` is the loop's training section: its
    fault drill may kill the worker between the two, leaving an unmarked folder behind.
    """
    import ray.train

    tmp = Path(tempfile.mkdtemp(prefix=f"meddiff-ckpt-{step}-r{ctx.rank}-"))
    try:
        write(tmp)
        if drill is not None:
            ctx.fault_drill(drill, step, in_checkpoint=True)
        if ctx.rank == 0:
            # Written last: a checkpoint without it was interrupted while being written.
            write_json(tmp / MARKER, {**info, "step": step, "time": time.time()})
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
            checkpoint_dir_name=checkpoint_name(step),
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def restored() -> Iterator[Path | None]:
    """The folder of the checkpoint Ray Train hands this worker (the newest committed one), or
    None when the run starts from scratch."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        yield None
        return
    with ckpt.as_directory() as d:
        yield Path(d)
