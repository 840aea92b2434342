"""What a Ray Train worker knows about itself: rank, world size, device, its MLflow logger, and
the one seeding rule every loop uses."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from meddiff import storage

if TYPE_CHECKING:
    import torch

    from meddiff.config.training import TrainingSection
    from meddiff.tracking import RunLogger

log = logging.getLogger(__name__)

FAULT_MARKER = "fault_drill.done"
STARTS = "worker_starts.jsonl"


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """A CPU generator for one rank's step: every random draw of that step (noise, timesteps,
    augmentation, dropout) comes from it, so a resumed run repeats an uninterrupted one's draws.

    The three integers are mixed by NumPy's ``SeedSequence`` (no two (seed, rank, step) triples
    share a stream in practice, unlike sums such as ``seed + 1000 * rank``).
    """
    import torch

    state = np.random.SeedSequence([int(seed), int(rank), int(step)]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


@dataclass
class WorkerContext:
    """One training worker: ``rank`` of ``world``, the ``device`` it computes on, rank 0's
    ``logger`` into the driver's MLflow run (None elsewhere) and the run directory (a local
    path every node sees, or an object-store URI)."""

    rank: int
    world: int
    device: torch.device
    run_dir: str | Path
    seed: int
    logger: RunLogger | None = None

    @classmethod
    def from_ray(
        cls,
        *,
        use_gpu: bool,
        run_dir: str | Path,
        seed: int,
        tracking: dict[str, str] | None = None,
        torch_threads: int | None = None,
    ) -> WorkerContext:
        """The context of the calling Ray Train worker. ``tracking`` holds the driver's
        ``uri`` and ``run_id`` (rank 0 logs into that run); ``torch_threads`` caps intra-op
        threads (None: Ray's default)."""
        import ray.train
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        if use_gpu and torch.cuda.is_available():
            import ray.train.torch

            device = ray.train.torch.get_device()
        else:
            device = torch.device("cpu")
        logger = None
        if rank == 0 and tracking and tracking.get("run_id"):
            from meddiff.tracking import RunLogger

            logger = RunLogger(tracking["uri"], tracking["run_id"])
        ctx = cls(rank, world, device, storage.path_arg(str(run_dir)), seed, logger)
        if rank == 0:
            # One line per worker-group start: restarts after crashes show here, and a user error
            # (never retried) leaves exactly one.
            line = json.dumps({"time": time.time(), "pid": os.getpid(), "world": world})
            storage.append_line(storage.join(ctx.run_dir, STARTS), line)
        return ctx

    @staticmethod
    def starts(run_dir: str | Path) -> int:
        """How many times a worker group of the run in ``run_dir`` started."""
        path = storage.join(run_dir, STARTS)
        return len(storage.read_text(path).splitlines()) if storage.is_file(path) else 0

    def generator(self, step: int) -> torch.Generator:
        """This rank's generator for ``step`` (see :func:`step_generator`)."""
        return step_generator(self.seed, self.rank, step)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.logger is not None:
            self.logger.log_metrics(metrics, step=step)

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar tensor over all ranks (on the device: NCCL reduces GPU tensors
        only)."""
        import torch.distributed as dist

        value = value.detach().to(self.device, copy=True)
        if self.world > 1 and dist.is_initialized():
            dist.all_reduce(value)
            value /= self.world
        return float(value)

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank (workers must stop at the same step)."""
        import torch
        import torch.distributed as dist

        if self.world == 1 or not dist.is_initialized():
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.broadcast(t, src=0)
        return bool(t.item())

    def barrier(self) -> None:
        """Wait until every rank gets here (a no-op for one worker)."""
        import torch.distributed as dist

        if self.world > 1 and dist.is_initialized():
            dist.barrier()

    def fault_drill(self, t: TrainingSection, step: int, *, in_checkpoint: bool) -> None:
        """Kill this worker process (SIGKILL: no cleanup, no exception) once per run directory
        when ``t.fail_at_step`` says so; Ray Train then restarts the worker group from the last
        committed checkpoint (``max_failures``)."""
        if t.fail_at_step != step or t.fail_in_checkpoint != in_checkpoint:
            return
        if self.rank != t.fail_rank:
            return
        marker = storage.join(self.run_dir, FAULT_MARKER)
        if storage.is_file(marker):
            return
        info: dict[str, Any] = {"step": step, "rank": self.rank, "in_checkpoint": in_checkpoint}
        storage.write_text(marker, json.dumps(info))
        where = "while writing the checkpoint of" if in_checkpoint else "before"
        log.warning(
            "fault drill: killing rank %d (pid %d) %s step %d", self.rank, os.getpid(), where, step
        )
        os.kill(os.getpid(), signal.SIGKILL)
