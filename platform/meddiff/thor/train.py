"""Train THOR's DDPM on healthy slices with Ray Train (DDP or DeepSpeed), tracked in MLflow.

The driver (``train_thor``) checks the run (precision, DeepSpeed, an existing checkpoint's
strategy and architecture), builds the Ray Data pipeline (read → slice → repeat → augment), starts
the workers through the training core (:mod:`meddiff.training`) and, when they finish, writes the
final model directory and registers it. Each worker (``train_loop``) runs the ε-prediction loop:
x0 in [-1, 1], t ~ U{0..T-1}, x_t = q(x0, ε, t), loss = ‖UNet(x_t, t) - ε‖², with t and ε drawn
from the step's generator. Rank 0 logs the loss, checkpoints and sample reconstructions.

Recovery: checkpoints (the core's format: strategy state, the model directory, a marker written
last) go to ``OUT/ray/thor-train`` every ``checkpoint_every`` steps. A failed worker is restarted
from the latest one (``max_failures``), and running the same command again with the same ``--out``
resumes from it (Ray Train restores the run's checkpoint state from storage). With an
object-store ``--out`` the checkpoints go to ``OUT/ray`` in the bucket, written from each worker's
node, so neither needs a shared filesystem.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meddiff import storage, training
from meddiff.config import Config
from meddiff.errors import DataError
from meddiff.files import copy_tree

log = logging.getLogger(__name__)

RUN_NAME = "thor-train"
MODEL_DIR = training.MODEL_DIR
SUMMARY = "train_summary.json"  # written last: the run finished (and registered)


def train_thor(
    cfg: Config,
    data: str | Path,
    out: str | Path | storage.OutputLocation,
    *,
    fresh: bool = False,
) -> dict[str, Any]:
    """Train (or resume training) and return the summary (:mod:`meddiff.training.task` lists its
    keys; THOR adds ``epoch_rows``, the slices of one data epoch).

    ``out`` is the command's :class:`~meddiff.storage.OutputLocation` (or a path, opened here):
    Ray Train's checkpoints go straight to its ``ray/`` (for an object store, from every node),
    which a rerun resumes from; the rest is written to its staging folder.

    Raises:
        DataError: the training data cannot be read (named file).
        ConfigError: impossible settings (fp16 without GPUs, DeepSpeed without its package, ...);
            a checkpoint in ``out`` written with another strategy or architecture.
    """
    with storage.OutputLocation.use(out, keep=("ray",), resume=True) as loc:
        return training.run_task(ThorTraining(cfg, data), loc, fresh=fresh)


class ThorTraining(training.TrainingTask):
    """THOR's DDPM as a training task: healthy slices in, ``thor_model`` folder out."""

    section, model_section = "thor.train", "thor.model"
    run_name = mlflow_name = RUN_NAME
    summary_name = SUMMARY

    def __init__(self, cfg: Config, data: str | Path):
        super().__init__(cfg)
        self.data = data
        self.epoch_rows = 0

    @staticmethod
    def loop(config: dict[str, Any]) -> None:
        train_loop(config)

    def scaling(self) -> dict[str, Any]:
        tc = self.settings
        return {"min_workers": tc.min_workers, "resources_per_worker": tc.resources_per_worker}

    def prepare(self, run, loc, use_gpu):
        from meddiff.data.shards import producer_run
        from meddiff.thor.data import augment_batch_task

        cfg, tc, data = self.cfg, self.settings, self.data
        run.log_params(
            {
                "thor.data": str(data),
                "thor.out": str(loc.staging.resolve()),
                "thor.use_gpu": use_gpu,
            }
        )
        run.log_input(data, context="training", producer_run=producer_run(data))
        repeated, samples, reference = self._read_data()
        # Augmentation runs as tasks: an actor pool would be restarted at every epoch.
        ds = repeated.map_batches(
            augment_batch_task,
            fn_kwargs={"cfg": cfg.thor.augment.model_dump(mode="json")},
            batch_size=64,
            num_cpus=0.5,
        )
        log.info(
            "training on %s: %d slices per epoch (repeated), %d steps",
            data,
            self.epoch_rows,
            tc.max_steps,
        )
        extra = {"samples": samples, "epoch_rows": self.epoch_rows, "reference": reference}
        return extra, {"train": ds}

    def _read_data(self):
        """The repeated training set, the slices of the reconstruction grids and the statistics
        detection compares its images with (:mod:`meddiff.thor.reference`)."""
        from meddiff.thor.data import healthy_dataset, repeat_dataset
        from meddiff.thor.reference import REFERENCE_IMAGES, reference_statistics

        cfg, tc, data = self.cfg, self.settings, self.data
        base = healthy_dataset(data, cfg.thor.model.image_size, cfg.data.mri, cfg.data.images)
        repeated, self.epoch_rows = repeat_dataset(base, tc.epoch_images, tc.min_images)
        if self.epoch_rows < tc.batch_size:
            raise DataError(
                f"{data}: an epoch has {self.epoch_rows} slices, fewer than one batch of "
                f"{tc.batch_size}; raise thor.train.epoch_images or lower thor.train.batch_size"
            )
        # Reconstruction grids show slices spread over the (first 512 of the) training set; the
        # statistics detection compares its images with come from the first 1024.
        pool = np.stack([r["image"] for r in base.take(REFERENCE_IMAGES)])
        reference = reference_statistics(pool)
        pool = pool[:512]
        pick = np.linspace(0, len(pool) - 1, min(tc.num_samples, len(pool))).round().astype(int)
        return repeated, pool[pick], reference

    def export(self, checkpoint: Path, model_dir: Path) -> None:
        copy_tree(checkpoint / MODEL_DIR, model_dir)

    def summary(self, result, run_dir: str) -> dict[str, Any]:
        return {"epoch_rows": self.epoch_rows}


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker. ``config``: cfg (model_dump), tracking (uri, run_id), run_dir,
    use_gpu, samples (reconstruction-grid slices), epoch_rows, reference (the training slices'
    statistics, saved with the model)."""
    _ThorWorker(config).run()


class _ThorWorker:
    """One rank's DDPM, optimizer and strategy (resumed from the newest checkpoint) and its
    ε-prediction loop; rank 0 also logs, draws the sample grids and writes the model."""

    def __init__(self, config: dict[str, Any]):
        from meddiff.thor.schedule import DDPMSchedule
        from meddiff.thor.unet import DiffusionUNet

        self.config = config
        self.cfg = cfg = Config.model_validate(config["cfg"])
        self.tc = tc = cfg.thor.train
        self.ctx = ctx = training.WorkerContext.from_ray(
            use_gpu=config["use_gpu"],
            run_dir=config["run_dir"],
            seed=cfg.runtime.seed,
            tracking=config["tracking"],
            torch_threads=tc.torch_threads,
        )
        self.schedule = DDPMSchedule(cfg.thor.schedule)
        torch.manual_seed(cfg.runtime.seed)  # the same initial weights on every rank
        unet = DiffusionUNet(cfg.thor.model).to(ctx.device)
        # mkldnn convolutions run markedly faster on channels-last tensors on CPU; DeepSpeed needs
        # contiguous parameters (it views them as bytes to broadcast them).
        if ctx.device.type == "cpu" and tc.strategy != "deepspeed":
            unet = unet.to(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(unet.parameters(), lr=tc.learning_rate)
        self.per_worker = tc.batch_size // ctx.world
        self.strategy = training.make_strategy(
            tc, ctx, unet, optimizer, micro_batch=self.per_worker, grad_clip=tc.max_grad_norm
        )
        cuda = ctx.device.type == "cuda"
        self.info = training.marker_info(
            tc,
            world=ctx.world,
            precision=training.resolve_precision(tc.precision, cuda, tc.precision_path),
            model_config=cfg.thor.model.model_dump(mode="json"),
        )
        num_steps = self.schedule.num_steps
        self.t_max = min(tc.max_timestep or num_steps, num_steps)
        self.losses: list[float] = []

    def run(self) -> None:
        import ray.train

        tc, ctx = self.tc, self.ctx
        step = 0
        with training.restored(ctx.run_dir) as d:
            if d is not None:
                self.strategy.load(d)
                step = int(training.read_marker(d)["step"])
                log.info("rank %d resumed at step %d", ctx.rank, step)
        ctx.log_metrics({"resumed_from_step": step}, step)
        shard = ray.train.get_dataset_shard("train")
        self.tick = self.started = time.perf_counter()
        stop = False
        while step < tc.max_steps and not stop:
            epoch_start = step
            step, stop = self._epoch(shard, step)
            if step == epoch_start:
                raise DataError(
                    f"an epoch of {self.config['epoch_rows']} training slices gives no full batch "
                    f"of {self.per_worker} per worker; raise thor.train.epoch_images or lower the "
                    "batch size"
                )

    def _epoch(self, shard, step: int) -> tuple[int, bool]:
        """One pass over the shard (or until the last step); returns (step, stopped early)."""
        tc = self.tc
        for batch in shard.iter_torch_batches(
            batch_size=self.per_worker,
            drop_last=True,
            local_shuffle_buffer_size=min(256, int(self.config["epoch_rows"])),
            dtypes=torch.float32,
            device=self.ctx.device,
        ):
            self.ctx.fault_drill(tc, step + 1, in_checkpoint=False)
            loss = self._loss(batch, self.ctx.generator(step))
            self.strategy.step(loss)
            step += 1
            self.losses.append(float(loss.detach()))
            stop = self._after_step(step)
            if step >= tc.max_steps or stop:
                if stop:
                    log.info("time limit of %s min reached at step %d", tc.time_limit_min, step)
                return step, stop
        return step, False

    def _loss(self, batch: dict[str, torch.Tensor], gen: torch.Generator) -> torch.Tensor:
        """ε-prediction: x0 in [-1, 1], t ~ U{0..t_max-1}, loss = ‖UNet(x_t, t) − ε‖²."""
        from meddiff.thor.noise import make_noise

        cfg, device = self.cfg, self.ctx.device
        x0 = batch["image"][:, None] * 2 - 1
        t = torch.randint(0, self.t_max, (x0.shape[0],), generator=gen).to(device)
        eps = make_noise(
            self.tc.noise, tuple(x0.shape), self.schedule.num_steps, cfg.thor.simplex, gen
        ).to(device)
        x_t = self.schedule.add_noise(x0, eps, t)
        with self.strategy.autocast():
            pred = self.strategy.model(x_t, t)
        return torch.nn.functional.mse_loss(pred.float(), eps)

    def _after_step(self, step: int) -> bool:
        """Loss log, time limit, sample grid and checkpoint after ``step``; True: stop now (the
        time limit, agreed by every rank)."""
        tc, ctx = self.tc, self.ctx
        recent = float(np.mean(self.losses[-tc.log_every :]))
        stop = False
        if step % tc.log_every == 0:
            elapsed = time.perf_counter() - self.tick
            images_per_s = tc.log_every * tc.batch_size / max(elapsed, 1e-9)
            ctx.log_metrics({"loss": recent, "images_per_s": images_per_s}, step)
            if tc.time_limit_min:
                stop = ctx.agree(time.perf_counter() - self.started > tc.time_limit_min * 60)
        last = step >= tc.max_steps or stop
        if ctx.logger and tc.sample_every and (step % tc.sample_every == 0 or last):
            unet = _fp32(self.strategy.module)
            grid = _sample_grid(unet, self.schedule, self.cfg, self.config["samples"], ctx.device)
            ctx.logger.log_image(grid, f"samples/step_{step:07d}.png")
        if step % tc.checkpoint_every == 0 or last:
            metrics = {"step": step, "loss": recent}
            reference = self.config.get("reference")
            _checkpoint(ctx, self.strategy, self.cfg, step, metrics, self.info, reference)
        if step % tc.log_every == 0:
            self.tick = time.perf_counter()  # images_per_s times training steps, not saving
        return stop


def _fp32(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` itself when its weights are fp32, else an fp32 copy (a bf16/fp16 DeepSpeed
    module): sampling and the saved model always use fp32 weights."""
    if all(p.dtype == torch.float32 for p in module.parameters()):
        return module
    return copy.deepcopy(module).float()


def _sample_grid(
    unet: torch.nn.Module, schedule, cfg: Config, samples: np.ndarray, device: torch.device
) -> np.ndarray:
    """uint8 grid: rows input, reconstruction from T (fast DDIM), |difference|."""
    from meddiff.thor.inferer import ThorInferer

    tc = cfg.thor.train
    infer_cfg = cfg.thor.infer.model_copy(
        update={
            "method": "ddpm",
            "noise": None,
            "harmonization_steps": None,
            "noise_level": min(tc.sample_noise_level, (tc.max_timestep or schedule.num_steps) - 1),
            "stride": tc.sample_stride,
        }
    )
    inferer = ThorInferer(schedule, infer_cfg, cfg.thor.simplex)
    was_training = unet.training
    unet.eval()
    x = torch.from_numpy(np.array(samples, dtype=np.float32))[:, None]
    size = cfg.thor.model.image_size
    shape = (cfg.thor.model.in_channels, size, size)
    det = inferer(unet, x, seeds=range(len(x)), image_shape=shape, device=device)
    unet.train(was_training)
    rows = [x[:, 0], det.reconstruction[:, 0], (det.reconstruction - x).abs()[:, 0]]
    grid = torch.cat([torch.cat(list(r), dim=1) for r in rows], dim=0)
    return (grid.clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def _checkpoint(
    ctx, strategy, cfg: Config, step: int, metrics: dict, info: dict, reference: dict | None
) -> None:
    from meddiff.thor.model import save_model

    def write(tmp: Path) -> None:
        strategy.save(tmp, ctx.rank)
        if ctx.rank == 0:
            save_model(
                tmp / MODEL_DIR,
                _fp32(strategy.module),
                cfg.thor.model,
                cfg.thor.schedule,
                {
                    "steps": step,
                    "loss": metrics["loss"],
                    "train_noise": cfg.thor.train.noise,
                    # Inference refuses a T the model never saw (see detect.plan_for).
                    "max_timestep": cfg.thor.train.max_timestep,
                    "intensity": cfg.data.images.reading(),  # detection must read the same way
                    # What the training slices look like: detection warns when its images differ.
                    "reference": reference,
                },
            )

    training.save_and_report(ctx, step, metrics, write, info, drill=cfg.thor.train)
