"""The driver side of every training loop: checks before any worker starts, the ``TorchTrainer``,
and one mapping of worker exceptions.

A meddiff error raised inside a worker (bad data, a checkpoint that does not fit the run) is a
fault in the input, not a crash: retrying it would fail the same way. :class:`StopOnUserError`
(a Ray Train callback in the controller) turns it into a controller error, which Ray Train never
retries, and :func:`fit` re-raises it on the driver as the same one-line error (exit code 2).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from meddiff import storage as meddiff_storage
from meddiff.errors import ClusterError, ConfigError, MeddiffError
from meddiff.training.checkpoints import latest_checkpoint, read_marker
from meddiff.training.strategy import resolve_precision

log = logging.getLogger(__name__)

# Keys of summaries written before the loops shared one schema (THOR's), read under their new names.
LEGACY_KEYS = {"loss": "final_loss", "run_id": "mlflow_run_id"}


def check_training(t, *, use_gpu: bool, section: str) -> str:
    """Refuse impossible settings of the training section ``t`` (named ``section`` in messages,
    e.g. ``thor.train``) before any worker starts; returns the precision resolved for the
    device (fp32/bf16/fp16).

    Raises:
        ConfigError: fp16 without GPUs; DeepSpeed without the deepspeed package.
    """
    precision = resolve_precision(t.precision, use_gpu, t.precision_path)
    if precision == "fp16" and not use_gpu:
        raise ConfigError(
            f"{section}.precision=fp16 needs GPUs (fp16 autocast and loss scaling run on CUDA); "
            "use fp32 or bf16 on CPU"
        )
    if t.strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            f"{section}.strategy=deepspeed but the deepspeed package is not installed; "
            f"install it or set {section}.strategy=ddp"
        )
    return precision


def check_run(
    run_dir: str | Path,
    t,
    *,
    use_gpu: bool,
    section: str,
    model_section: str,
    model_config: dict[str, Any],
    fresh: str,
) -> str:
    """Everything a loop checks on the driver before its workers start: :func:`check_training`,
    then :func:`check_resume` against the newest checkpoint under ``run_dir`` (``t.num_workers``
    workers); returns the resolved precision.

    Raises:
        ConfigError: as the two checks do.
    """
    precision = check_training(t, use_gpu=use_gpu, section=section)
    check_resume(
        run_dir,
        t,
        section=section,
        model_section=model_section,
        model_config=model_config,
        world=t.num_workers,
        precision=precision,
        fresh=fresh,
    )
    return precision


def finished_run(summary: str | Path, run_dir: str | Path, steps: int) -> dict[str, Any] | None:
    """The summary of a training run that already finished in this output, or None: its
    summary file ``summary`` is there (written after registration, last) and its newest
    checkpoint under ``run_dir`` reached ``steps``. A rerun then trains and registers nothing
    (it registered the same weights again as a new version); a rerun with more ``steps``
    goes on training from that checkpoint.
    """
    if not meddiff_storage.is_file(summary):
        return None
    ckpt = latest_checkpoint(run_dir)
    reached = int(read_marker(ckpt).get("step", 0)) if ckpt is not None else 0
    if reached < steps:
        return None
    try:
        record = read_summary(summary)
    except json.JSONDecodeError:
        return None
    log.info(
        "%s: training already complete (step %d of %d); nothing trained or registered",
        run_dir,
        reached,
        steps,
    )
    return {**record, "already_complete": True}


def read_summary(path: str | Path) -> dict[str, Any]:
    """A training summary (local path or URI), with the keys of older summaries renamed.

    Raises:
        json.JSONDecodeError: the file is not JSON.
    """
    record = json.loads(meddiff_storage.read_text(path))
    for old, new in LEGACY_KEYS.items():
        if old in record and new not in record:
            record[new] = record.pop(old)
    registered = record.pop("registered", None)  # THOR's "models:/<name>/<version>"
    if registered and not record.get("model_uri"):
        name, _, version = registered.removeprefix("models:/").rpartition("/")
        record.update(model_uri=registered, registered_model=name, version=version)
    return record


def marker_info(t, *, world: int, precision: str, model_config: dict[str, Any]) -> dict:
    """What a checkpoint records about the run that wrote it (checked by :func:`check_resume`)."""
    return {
        "strategy": t.strategy,
        "zero_stage": t.zero_stage if t.strategy == "deepspeed" else None,
        "precision": precision,
        "world_size": world,
        "model_config": model_config,
    }


def _differences(old: Any, new: Any, prefix: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{prefix}.{key}")
        return out
    return [] if old == new else [f"{prefix}={old!r} (this run: {new!r})"]


def check_resume(
    run_dir: str | Path,
    t,
    *,
    section: str,
    model_section: str,
    model_config: dict[str, Any],
    world: int,
    precision: str,
    fresh: str,
) -> Path | None:
    """Compare the newest complete checkpoint under ``run_dir`` (the one a rerun resumes from)
    with this run, on the driver, before any worker starts; returns it (None: a fresh start).

    ``model_config`` is this run's model section as JSON (``model_section`` names it);
    ``fresh`` says how to start over instead (``"rerun with --fresh"``).

    Raises:
        ConfigError: the checkpoint was written with another strategy, another ZeRO layout
            (stage, workers, precision) or another architecture, naming the settings that differ.
    """
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return None
    info = read_marker(ckpt)
    if info.get("strategy") != t.strategy:
        raise ConfigError(
            f"checkpoint {ckpt} was written with {section}.strategy={info.get('strategy')}, "
            f"this run uses {t.strategy}; resume with the same strategy, or {fresh}"
        )
    if t.strategy == "deepspeed":
        wrote = (info.get("zero_stage"), info.get("world_size"), info.get("precision"))
        if wrote != (t.zero_stage, world, precision):
            raise ConfigError(
                f"checkpoint {ckpt} holds ZeRO-{wrote[0]} {wrote[2]} partitions of {wrote[1]} "
                f"workers; resume with {section}.zero_stage={wrote[0]}, {wrote[1]} workers and "
                f"precision {wrote[2]} (this run: ZeRO-{t.zero_stage}, {world}, {precision}), "
                f"or {fresh}"
            )
    # Through JSON, as the marker was: tuples and lists compare equal.
    diff = _differences(
        info.get("model_config"), json.loads(json.dumps(model_config)), model_section
    )
    if diff:
        raise ConfigError(
            f"checkpoint {ckpt} holds another architecture: {'; '.join(diff[:3])}; resume with "
            f"the checkpoint's model settings, or {fresh}"
        )
    return ckpt


def worker_user_error(err: BaseException) -> MeddiffError | None:
    """The meddiff error behind a Ray Train failure (the controller's, a worker group's, or one
    worker's wrapped exception), or None for a genuine crash."""
    seen: set[int] = set()
    todo: list[Any] = [err]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, MeddiffError):
            cause = getattr(e, "cause", None)  # RayTaskError(DataError) carries the original
            return cause if isinstance(cause, MeddiffError) else e
        todo += list((getattr(e, "worker_failures", None) or {}).values())
        todo += [
            getattr(e, name, None)
            for name in ("controller_failure", "_base_exc", "cause", "__cause__", "__context__")
        ]
    return None


def _stop_callback():
    from ray.train import UserCallback

    class StopOnUserError(UserCallback):
        """Raised in the controller, a worker's meddiff error becomes a controller error, which
        Ray Train's failure policy raises at once instead of restarting the worker group."""

        def after_exception(self, run_context, worker_exceptions):
            for exc in worker_exceptions.values():
                found = worker_user_error(exc)
                if found is not None:
                    raise found

    return StopOnUserError()


def _log_settings() -> dict[str, Any]:
    """Ray Train's console in a quiet run (off a terminal: :func:`meddiff.runtime.quiet`): its
    INFO lines (each report, checkpoint and worker-group start) only in its log files, and no
    tqdm bars in the workers; the loops log their own progress every ``log_every`` steps."""
    from ray.train import LoggingConfig

    from meddiff import runtime

    if not runtime.quiet():
        return {}
    return {
        "logging_config": LoggingConfig(log_level="WARNING"),
        "worker_runtime_env": {"env_vars": dict(runtime.QUIET_WORKER_ENV)},
    }


def fit(
    loop,
    config: dict[str, Any],
    t,
    *,
    num_workers: int,
    use_gpu: bool,
    cpus_per_worker: float,
    storage: str | Path | meddiff_storage.Location,
    name: str,
    section: str,
    datasets: dict[str, Any] | None = None,
    min_workers: int | None = None,
    resources_per_worker: dict[str, float] | None = None,
):
    """Run ``loop(config)`` on ``num_workers`` Ray Train workers and return the ``Result``.

    ``section`` is the loop's config section (e.g. ``thor.train``), named in errors.
    Checkpoints go to ``storage/name``: a :class:`~meddiff.storage.Location` (or its path), a
    local folder every node sees or an object-store prefix (``s3://bucket/run/ray``), which each
    worker's node writes to with the location's filesystem (no shared filesystem needed); every
    worker activates the location first. Ray Train keeps ``t.keep_checkpoints`` of them and
    restarts a crashed worker group up to ``t.max_failures`` times from the newest one. With
    ``min_workers`` below ``num_workers`` training is elastic: after a node is lost it resumes from
    the newest checkpoint with the workers that still fit. ``resources_per_worker`` (e.g. a custom
    resource a node advertises) steers workers to nodes.

    Raises:
        MeddiffError: the one a worker raised (bad data, a checkpoint that does not fit), never
            retried.
        ClusterError: Ray Train gave up after ``t.max_failures`` restarts (e.g. nodes lost); the
            checkpoints stay, and running the same command again resumes.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources: dict[str, float] = {"CPU": cpus_per_worker, **(resources_per_worker or {})}
    if use_gpu:
        resources["GPU"] = 1
    workers = num_workers
    if min_workers is not None and min_workers != num_workers:
        workers = (min_workers, num_workers)  # elastic: Ray Train's (min, max)
    where = meddiff_storage.Location.of(storage)
    # The workers open the run's bucket with the driver's filesystem (endpoint, credentials).
    loop = functools.partial(_in_location, loop, where)
    trainer = TorchTrainer(
        loop,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            **where.ray_storage(),
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            callbacks=[_stop_callback()],
            **_log_settings(),
        ),
        datasets=datasets,
    )
    try:
        return trainer.fit()
    except Exception as err:
        mapped = training_error(err, t.max_failures, section, where.join(name))
        if mapped is None:
            raise
        raise mapped from None  # one line for the CLI; Ray's traceback is in the job log


def _in_location(loop, where: meddiff_storage.Location, config: dict[str, Any]):
    """Run ``loop(config)`` in a worker that reaches ``where`` as the driver does."""
    where.activate()
    return loop(config)


def training_error(
    err: Exception, max_failures: int, section: str, run_dir: str | Path
) -> MeddiffError | None:
    """What the user sees for a failed ``trainer.fit()``: the meddiff error a worker raised (bad
    input: its own message), a one-line :class:`ClusterError` for a run Ray Train gave up on
    (nodes lost beyond ``max_failures`` restarts; the checkpoints in ``run_dir`` stay), or None
    (re-raise as is)."""
    import ray.train

    user = worker_user_error(err)
    if user is not None:
        return user
    store = meddiff_storage.explain_error(err)
    if store is not None:  # Ray Train's own checkpoint upload failed: the store stopped answering
        return type(store)(
            f"{store}; the complete checkpoints stay in {run_dir}: run the same command again "
            "to resume once it answers"
        )
    if isinstance(err, ray.train.TrainingFailedError):
        return ClusterError(
            f"training failed after {section}.max_failures={max_failures} restarts "
            f"({_failure_reason(err)}); its checkpoints stay in {run_dir}: run the same command "
            "again to resume"
        )
    return None


def _failure_reason(err: Exception) -> str:
    """One line: the first failed worker's (or the controller's) exception."""
    failures = getattr(err, "worker_failures", None) or {}
    cause = failures[min(failures)] if failures else getattr(err, "controller_failure", err)
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    prefix = f"worker {min(failures)}: " if failures else ""
    return f"{prefix}{type(cause).__name__}: {lines[0] if lines else ''}"
