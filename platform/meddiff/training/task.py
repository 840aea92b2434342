"""One driver for every training loop that ends in a model (THOR's DDPM, the synthesis pipeline).

:func:`run_task` owns what the loops used to write each for themselves: starting over
(``--fresh``), recognising a run that already finished in the output, the checks before any
worker starts (:func:`~meddiff.training.driver.check_run`), the MLflow run, Ray Train's ``fit``,
copying the final model out of the last checkpoint, registration and the summary. A loop supplies
a :class:`TrainingTask`: its settings, its model settings, its worker function, what its workers
need (:meth:`TrainingTask.prepare`), how a checkpoint becomes a model folder
(:meth:`TrainingTask.export`) and its own summary fields.

The summary (``OUT/<summary_name>``, also logged to the MLflow run) has the same keys for every
loop, plus the loop's own:

``model``           the final model folder (``OUT/model``)
``checkpoint``      the checkpoint it came from
``steps``           the optimizer step that checkpoint reached
``final_loss``      the loss the workers last reported
``seconds``         wall seconds of the whole run (preparing, training, export, registration)
``precision``       what ``precision`` resolved to on this device (fp32/bf16/fp16)
``strategy``, ``zero_stage``, ``workers``
``mlflow_run_id``   the training run in the configured MLflow store
``registered_model``, ``version``, ``model_uri``   the registry entry (None when not registered)
"""

from __future__ import annotations

import abc
import functools
import logging
import time
from pathlib import Path
from typing import Any, ClassVar

from meddiff import storage
from meddiff.errors import ModelError
from meddiff.files import write_json
from meddiff.training.checkpoints import read_marker
from meddiff.training.driver import check_run, finished_run, fit

log = logging.getLogger(__name__)

MODEL_DIR = "model"
FRESH = "rerun with --fresh to start over"


class TrainingTask(abc.ABC):
    """What one loop supplies to :func:`run_task`; ``cfg`` is the whole validated config."""

    section: ClassVar[str]  # the settings' config section, named in errors: "thor.train"
    model_section: ClassVar[str]  # the model settings' section: "thor.model"
    run_name: ClassVar[str]  # Ray Train's run folder under OUT/ray
    mlflow_name: ClassVar[str]  # the MLflow run's name
    summary_name: ClassVar[str] = "train_summary.json"

    def __init__(self, cfg):
        self.cfg = cfg

    @property
    def settings(self):
        """The loop's :class:`~meddiff.config.training.ModelTrainingSection` (``section``)."""
        return _section(self.cfg, self.section)

    def model_config(self) -> dict[str, Any]:
        """The model settings (``model_section``) as JSON; a checkpoint of other settings is not
        resumed."""
        return _section(self.cfg, self.model_section).model_dump(mode="json")

    @staticmethod
    @abc.abstractmethod
    def loop(config: dict[str, Any]) -> Any:
        """The Ray Train worker function. ``config`` holds ``cfg`` (the config as JSON),
        ``tracking`` (MLflow URI and run id), ``run_dir``, ``use_gpu`` and what
        :meth:`prepare` returned."""

    def check(self) -> None:
        """Check the inputs before anything is written or started (default: nothing)."""
        return None

    @abc.abstractmethod
    def prepare(
        self, run, loc: storage.OutputLocation, use_gpu: bool
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Inside the MLflow run ``run``: log the inputs, build what the workers read; returns
        (entries added to the worker config, Ray datasets by name or None)."""

    @abc.abstractmethod
    def export(self, checkpoint: Path, model_dir: Path) -> None:
        """Write the final model folder ``model_dir`` from a local copy of the last checkpoint."""

    def scaling(self) -> dict[str, Any]:
        """Extra keyword arguments of :func:`~meddiff.training.driver.fit` (elastic workers,
        custom resources); default none."""
        return {}

    def summary(self, result, run_dir: str) -> dict[str, Any]:
        """The loop's own summary fields, from Ray Train's ``result`` (default none)."""
        return {}


def wants_gpu(t) -> bool:
    """``t.use_gpu``, where None means: GPUs when the connected Ray cluster has one."""
    if t.use_gpu is not None:
        return bool(t.use_gpu)
    import ray

    return ray.cluster_resources().get("GPU", 0) >= 1


def _section(cfg, dotted: str):
    """The config section at ``dotted`` ("thor.train") of ``cfg``."""
    return functools.reduce(getattr, dotted.split("."), cfg)


def run_task(
    task: TrainingTask, loc: storage.OutputLocation, *, fresh: bool = False
) -> dict[str, Any]:
    """Train ``task`` into the output location ``loc`` (or resume it from ``loc``'s newest
    checkpoint) and return the summary (the module docstring lists its keys). A run that already
    finished there returns its summary with ``already_complete: true`` and trains nothing.

    Raises:
        ConfigError: impossible settings; a checkpoint in ``loc`` written with another strategy,
            ZeRO layout or model (the message says to rerun with ``--fresh``).
        ModelError: training ended without a checkpoint.
        MeddiffError: what the task's checks or its workers raised (bad data), never retried.
    """
    from meddiff import runtime

    t = task.settings
    if fresh:
        loc.start_over()  # all meddiff wrote: a model must not outlive its checkpoints
    task.check()
    run_dir = loc.join("ray", task.run_name)
    done = finished_run(loc.join(task.summary_name), run_dir, t.max_steps)
    if done is not None:
        return {**done, "model": str(loc.join(MODEL_DIR))}
    runtime.connect(task.cfg.runtime)
    use_gpu = wants_gpu(t)
    precision = check_run(
        run_dir,
        t,
        use_gpu=use_gpu,
        section=task.section,
        model_section=task.model_section,
        model_config=task.model_config(),
        fresh=FRESH,
    )
    loc.staging.mkdir(parents=True, exist_ok=True)
    return _train(task, loc, use_gpu=use_gpu, precision=precision)


def _train(
    task: TrainingTask, loc: storage.OutputLocation, *, use_gpu: bool, precision: str
) -> dict[str, Any]:
    from meddiff import tracking

    t, out = task.settings, loc.staging.resolve()
    run_dir = str(loc.join("ray", task.run_name))
    start = time.perf_counter()
    with tracking.start_run(task.cfg, task.mlflow_name) as run:  # nested under an active run
        extra, datasets = task.prepare(run, loc, use_gpu)
        config = {
            "cfg": task.cfg.model_dump(mode="json"),
            "tracking": {"uri": tracking.tracking_uri(task.cfg.tracking), "run_id": run.run_id},
            "run_dir": run_dir,
            "use_gpu": use_gpu,
            **extra,
        }
        result = fit(
            task.loop,
            config,
            t,
            num_workers=t.num_workers,
            use_gpu=use_gpu,
            cpus_per_worker=t.cpus_per_worker,
            storage=loc.sub("ray"),
            name=task.run_name,
            datasets=datasets,
            section=task.section,
            **task.scaling(),
        )
        if result.checkpoint is None:
            raise ModelError(f"training under {run_dir} finished without a checkpoint")
        model_dir = out / MODEL_DIR
        with result.checkpoint.as_directory() as ckpt:
            step = int(read_marker(ckpt)["step"])
            task.export(Path(ckpt), model_dir)
        summary: dict[str, Any] = {
            "model": str(model_dir),
            "checkpoint": str(storage.join(run_dir, storage.name(result.checkpoint.path))),
            "steps": step,
            "final_loss": (result.metrics or {}).get("loss"),
            "precision": precision,
            "strategy": t.strategy,
            "zero_stage": t.zero_stage if t.strategy == "deepspeed" else None,
            "workers": t.num_workers,
            "mlflow_run_id": run.run_id,
            **_register(model_dir, t.registered_name),
            **task.summary(result, run_dir),
        }
        summary["seconds"] = round(time.perf_counter() - start, 2)
        run.log_metrics({"train_seconds": summary["seconds"]})
        write_json(out / task.summary_name, summary)
        run.log_dict(summary, task.summary_name)
    log.info("%s: %d steps, final loss %s", task.section, step, summary["final_loss"])
    return summary


def _register(model_dir: Path, name: str | None) -> dict[str, Any]:
    """Register ``model_dir`` as a new version of ``name``; the summary's registry fields."""
    from meddiff import tracking

    if not name:
        return {"registered_model": None, "version": None, "model_uri": None}
    version = tracking.register_model(model_dir, name)
    return {"registered_model": name, "version": version, "model_uri": f"models:/{name}/{version}"}
