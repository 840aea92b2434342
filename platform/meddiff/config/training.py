"""Settings every Ray Train loop shares (synthesis, THOR, the evaluation classifier).

Each loop's training section subclasses :class:`TrainingSection` and changes only the defaults, so
the workers, the step budget, the optimizer's learning rate and gradient clipping, ``strategy``,
``precision``, checkpoints, retries and the fault drill have one name and one meaning everywhere
(see :mod:`meddiff.training`). The loops that end in a registered model (THOR, synthesis) use
:class:`ModelTrainingSection`, which adds the registry name.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from meddiff.config.base import Section

Precision = Literal["auto", "fp32", "bf16", "fp16"]


class TrainingSection(Section):
    """Distribution, precision, checkpoints and failure handling of one training loop."""

    # The loop's row in meddiff.precision's table (what precision=auto gives on a CPU).
    precision_path: ClassVar[str] = "training"

    num_workers: int = Field(default=1, ge=1, description="Ray Train workers (data parallel).")
    use_gpu: bool | None = Field(
        default=None,
        description="One GPU per worker; None uses GPUs when the Ray cluster has them.",
    )
    cpus_per_worker: float = Field(default=1.0, gt=0, description="CPUs each worker reserves.")
    max_steps: int = Field(default=1000, ge=1, description="Optimizer steps of the whole run.")
    learning_rate: float = Field(default=1e-4, gt=0, description="The optimizer's peak rate.")
    max_grad_norm: float | None = Field(
        default=None,
        gt=0,
        description="Clip the global L2 norm of the gradients to this (None: no clipping).",
    )
    checkpoint_every: int = Field(default=1000, ge=1, description="Steps between checkpoints.")
    log_every: int = Field(default=50, ge=1, description="Steps between loss logs.")

    strategy: Literal["ddp", "deepspeed"] = Field(
        default="ddp", description="ddp: PyTorch DDP; deepspeed: DeepSpeed ZeRO (zero_stage)."
    )
    zero_stage: int = Field(
        default=1,
        ge=0,
        le=2,
        description="DeepSpeed ZeRO stage 0-2 (stage 3 would shard the weights themselves, which "
        "the EMA, the sample grids and the saved model read whole).",
    )
    precision: Precision = Field(
        default="fp32",
        description="fp32; bf16 (DDP: autocast over fp32 weights; DeepSpeed: bf16 weights with "
        "fp32 master copies); fp16 (GPU only, with loss scaling); auto: bf16 on GPU; on a CPU, bf16 "
        "where measured faster with native bf16 (THOR's loop, meddiff.precision), else fp32.",
    )
    keep_checkpoints: int = Field(default=2, ge=1, description="Newest checkpoints kept.")
    max_failures: int = Field(
        default=2,
        ge=-1,
        description="Worker-group restarts from the last checkpoint after a crash (-1: no "
        "limit). Errors in the input (meddiff's one-line errors) are never retried.",
    )
    fail_at_step: int | None = Field(
        default=None,
        ge=1,
        description="Fault drill: the rank fail_rank worker process is killed (SIGKILL) when it "
        "reaches this step, once per run directory, to exercise restart from checkpoint.",
    )
    fail_in_checkpoint: bool = Field(
        default=False,
        description="Fault drill: kill inside the checkpoint write at fail_at_step instead (the "
        "step must be a checkpoint step), leaving a half-written checkpoint behind.",
    )
    fail_rank: int = Field(default=0, ge=0, description="Fault drill: the rank that is killed.")

    @model_validator(mode="after")
    def _check_drill(self) -> TrainingSection:
        if self.fail_in_checkpoint and self.fail_at_step is None:
            raise ValueError("fail_in_checkpoint needs fail_at_step")
        return self


class ModelTrainingSection(TrainingSection):
    """A training loop whose final model is exported under ``OUT/model`` and registered."""

    registered_name: str | None = Field(
        default=None,
        description="MLflow registered model name of the final model (None: not registered).",
    )
