"""One checkpoint format for every training loop.

A checkpoint is a folder ``checkpoint_<step:08d>/`` under the run directory (``OUT/ray/<run>``)
holding what the strategy saves (``trainer_state.pt`` with DDP: model, optimizer, LR schedule,
loss scaler; ``deepspeed/state/`` with DeepSpeed: every rank's ZeRO partition), whatever the loop
adds (a model directory, EMA weights) and, written last by rank 0, ``meddiff_checkpoint.json``::

    {"step": 40, "strategy": "ddp", "zero_stage": 1, "precision": "fp32", "world_size": 2,
     "model_config": {...}, "time": ..., ...loop extras}

Every rank also writes ``meddiff_rank<r>.json`` once its own part is stored, with the size of
each of its files (``{"step": 40, "sizes": {"trainer_state.pt": 123456, ...}}``). A folder
without the marker, or without every rank's file, was interrupted while being written and is
never used; one whose files no longer have their recorded sizes (truncated or replaced since) is
skipped with a warning, and the newest good checkpoint is resumed from.
Ray Train commits a checkpoint once every rank has reported it and keeps the newest
``keep_checkpoints``. Its controller learns of a report asynchronously, so a worker killed just
after reporting can leave a complete checkpoint on storage that Ray never committed:
:func:`restored` resumes from the newest good one on storage, committed or not, so a restart
loses at most one interval.

The run directory is a local path on a filesystem every node sees, or an object-store URI
(``s3://bucket/run/ray/thor-train``): Ray Train then uploads each checkpoint from the worker's
node, and every function here reads it through :mod:`meddiff.storage`, so a rerun on any node
(or after the driver is gone) resumes from the bucket.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from meddiff import storage
from meddiff.errors import DataError, ModelError

log = logging.getLogger(__name__)

MARKER = "meddiff_checkpoint.json"
PREFIX = "checkpoint_"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def read_marker(path: str | Path) -> dict[str, Any]:
    """The marker of a complete checkpoint (a local folder or an object-store prefix).

    Raises:
        ModelError: no marker (the checkpoint was not finished) or an unreadable one.
    """
    marker = storage.join(path, MARKER)
    try:
        text = storage.read_text(marker)
    except DataError:
        raise ModelError(
            f"checkpoint {path} is incomplete (no {MARKER}); it was not finished writing"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ModelError(f"{marker}: corrupt ({err})") from None


def _rank_file(rank: int) -> str:
    return f"meddiff_rank{rank}.json"


def complete_step(path: str | Path, files: set[str] | None = None) -> int | None:
    """The step of a complete checkpoint folder (marker and every rank's part), else None.
    ``files``: the names under ``path`` when already listed (saves a request per file on an
    object store)."""

    def has(name: str) -> bool:
        return name in files if files is not None else storage.is_file(storage.join(path, name))

    if not has(MARKER):
        return None
    try:
        marker = read_marker(path)
        world = int(marker.get("world_size") or 1)
        step = int(marker["step"])
    except (ModelError, KeyError, TypeError, ValueError):
        return None
    return step if all(has(_rank_file(r)) for r in range(world)) else None


def latest_checkpoint(run_dir: str | Path) -> str | Path | None:
    """The newest complete, undamaged checkpoint under ``run_dir`` (a local folder or an
    object-store URI: then a URI too), or None.

    Complete: see :func:`complete_step`. Undamaged: every file has the size its rank recorded
    when it stored it (a file truncated or replaced since would fail the load on every restart):
    a damaged newer checkpoint is skipped with a warning, and the newest good one is used.

    Raises:
        DataError: ``run_dir`` is in a bucket that does not exist (or cannot be reached).
    """
    listed: dict[str, dict[str, int]] = {}
    for name, size in storage.file_sizes(run_dir).items():  # one listing for every checkpoint
        top, _, rest = name.partition("/")
        if top.startswith(PREFIX) and rest:
            listed.setdefault(top, {})[rest] = size
    found = [
        (step, top)
        for top, files in listed.items()
        if (step := complete_step(storage.join(run_dir, top), set(files)))
    ]
    for _, top in sorted(found, reverse=True):
        path = storage.join(run_dir, top)
        problem = _damage(path, listed[top])
        if problem is None:
            return path
        log.warning(
            "checkpoint %s is damaged (%s): skipped, resuming from an older one", path, problem
        )
    return None


def _damage(path: str | Path, files: dict[str, int]) -> str | None:
    """What is wrong with the files of the complete checkpoint ``path`` (name: size, as listed)
    against the sizes each rank recorded in its rank file; None when nothing is (or a rank
    file records no sizes: written by an older meddiff)."""
    world = int(read_marker(path).get("world_size") or 1)
    for rank in range(world):
        try:
            recorded = json.loads(storage.read_text(storage.join(path, _rank_file(rank))))
        except (DataError, json.JSONDecodeError):
            return f"{_rank_file(rank)} unreadable"
        for name, size in (recorded.get("sizes") or {}).items():
            if files.get(name) != size:
                got = "missing" if files.get(name) is None else f"{files[name]} bytes"
                return f"{name} is {got}, rank {rank} stored {size} bytes"
    return None


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
    folder, which every rank reports (Ray Train uploads each rank's folder into the same
    checkpoint under ``ctx.run_dir``). Then each rank waits until its files are all there with
    their sizes and writes its rank file, and rank 0 the marker holding ``info`` plus the step
    and time: on an object store Ray's upload can return before every object is stored, and a
    worker killed then would otherwise leave a marked checkpoint with files missing. Every rank
    returns only once the marker is written (a barrier). ``drill``
    is the loop's training section: its fault drill may kill the worker before the report,
    leaving a folder without its rank file behind.

    Raises:
        ModelError: this rank's files did not all appear in storage within ``PERSIST_TIMEOUT_S``.
    """
    import ray.train

    tmp = Path(tempfile.mkdtemp(prefix=f"meddiff-ckpt-{step}-r{ctx.rank}-"))
    try:
        write(tmp)
        if drill is not None:
            ctx.fault_drill(drill, step, in_checkpoint=True)
        sizes = {
            p.relative_to(tmp).as_posix(): p.stat().st_size for p in tmp.rglob("*") if p.is_file()
        }
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
            checkpoint_dir_name=checkpoint_name(step),
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stored = storage.join(ctx.run_dir, checkpoint_name(step))
    _wait_stored(stored, sizes)
    record = {"step": step, "sizes": sizes}  # checked by latest_checkpoint before a resume
    storage.write_text(storage.join(stored, _rank_file(ctx.rank)), json.dumps(record))
    if ctx.rank == 0:
        marker = {**info, "step": step, "time": time.time()}
        storage.write_text(storage.join(stored, MARKER), json.dumps(marker, indent=2))
    # No rank trains on before the checkpoint is complete: a rank that failed in the next step
    # would otherwise bring the group down while rank 0 still writes the marker, and the restart
    # would lose the checkpoint just reported (found by a 2-worker kill test on object storage).
    ctx.barrier()


# How long a rank waits for its checkpoint files to appear in storage after Ray's upload.
PERSIST_TIMEOUT_S = 120.0


def _wait_stored(stored: str | Path, sizes: dict[str, int]) -> None:
    """Return once every file of ``sizes`` (name relative to ``stored``: bytes) is in storage."""
    deadline = time.monotonic() + PERSIST_TIMEOUT_S
    while True:
        found = storage.file_sizes(stored)
        missing = [name for name, size in sizes.items() if found.get(name) != size]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise ModelError(
                f"checkpoint {stored}: {len(missing)} file(s) not in storage "
                f"{PERSIST_TIMEOUT_S:.0f} s after the upload (e.g. {missing[0]})"
            )
        time.sleep(0.5)


@contextmanager
def restored(run_dir: str | Path) -> Iterator[Path | None]:
    """The checkpoint to resume from, as a local folder: the newest complete one under
    ``run_dir`` (on an object store: downloaded for the block's duration); None when the run
    starts from scratch.

    Ray Train hands a restarted worker the newest checkpoint it committed
    (``ray.train.get_checkpoint``), but its controller learns of a report asynchronously, so a
    worker killed just after reporting can leave a newer complete one on storage: the listing
    sees both, and a committed one without every rank's file is never used. Each rank fetches
    its own copy: Ray's download (``as_directory``) shares one folder between the ranks of a
    node, which the first rank done with it may delete while another still loads.
    """
    found = latest_checkpoint(run_dir)
    if found is None:
        yield None
        return
    with _local(found) as d:
        yield d


def _local(path: str | Path):
    """``path`` itself when local; a downloaded copy of an object-store checkpoint otherwise."""
    return storage.local_copy(path)
