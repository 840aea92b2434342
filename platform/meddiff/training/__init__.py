"""The one training core under every Ray Train loop (synthesis, THOR, the evaluation classifier).

- :mod:`~meddiff.training.context`: the worker's rank, world size, device, rank-0 MLflow logger,
  the seeding rule (a generator per (seed, rank, step)) and the fault drill;
- :mod:`~meddiff.training.strategy`: DDP and DeepSpeed behind one interface, precision
  fp32/bf16/fp16, the DeepSpeed config;
- :mod:`~meddiff.training.checkpoints`: the checkpoint format (state + a marker written last);
- :mod:`~meddiff.training.driver`: checks before workers start (precision, DeepSpeed, resuming a
  checkpoint of another strategy or architecture), the ``TorchTrainer`` and the mapping of
  worker errors to meddiff's one-line errors without retries;
- :mod:`~meddiff.training.task`: the one driver of the loops that end in a model
  (:func:`run_task`): ``--fresh``, a finished run recognised, the MLflow run, ``fit``, export,
  registration and one summary schema; a loop supplies a :class:`TrainingTask`.

Each loop keeps only what is its own: the model, the batch, the loss, the samples it logs.
Nothing here imports a model family.
"""

from meddiff.training.checkpoints import latest_checkpoint, read_marker, restored, save_and_report
from meddiff.training.context import WorkerContext, step_generator
from meddiff.training.driver import (
    check_resume,
    check_run,
    check_training,
    finished_run,
    fit,
    marker_info,
    read_summary,
)
from meddiff.training.strategy import deepspeed_config, make_strategy, resolve_precision
from meddiff.training.task import MODEL_DIR, TrainingTask, run_task, wants_gpu

__all__ = [
    "MODEL_DIR",
    "TrainingTask",
    "WorkerContext",
    "check_resume",
    "check_run",
    "check_training",
    "deepspeed_config",
    "finished_run",
    "fit",
    "latest_checkpoint",
    "make_strategy",
    "marker_info",
    "read_marker",
    "read_summary",
    "resolve_precision",
    "restored",
    "run_task",
    "save_and_report",
    "step_generator",
    "wants_gpu",
]
