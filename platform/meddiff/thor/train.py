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
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meddiff import storage, training
from meddiff.config import Config
from meddiff.errors import DataError, ModelError
from meddiff.files import copy_tree

log = logging.getLogger(__name__)

RUN_NAME = "thor-train"
MODEL_DIR = "model"
SUMMARY = "train_summary.json"  # written last: the run finished (and registered)
FRESH = "rerun with --fresh to start over"


def train_thor(
    cfg: Config,
    data: str | Path,
    out: str | Path | storage.OutputLocation,
    *,
    fresh: bool = False,
) -> dict[str, Any]:
    """Train (or resume training) and return a summary: model dir, steps, loss, registry version.

    ``out`` is the command's :class:`~meddiff.storage.OutputLocation` (or a path, opened here):
    Ray Train's checkpoints go straight to its ``ray/`` (for an object store, from every node),
    which a rerun resumes from; the rest is written to its staging folder.

    Raises:
        DataError: the training data cannot be read (named file).
        ConfigError: impossible settings (fp16 without GPUs, DeepSpeed without its package, ...);
            a checkpoint in ``out`` written with another strategy or architecture.
    """
    with storage.OutputLocation.use(out, keep=("ray",), resume=True) as loc:
        return _train_thor(cfg, data, loc, fresh=fresh)


def _train_thor(cfg: Config, data: str | Path, loc: storage.OutputLocation, *, fresh: bool):
    import ray

    from meddiff import runtime, tracking
    from meddiff.data.shards import producer_run
    from meddiff.thor.data import augment_batch_task, healthy_dataset, repeat_dataset
    from meddiff.thor.reference import REFERENCE_IMAGES, reference_statistics

    tc = cfg.thor.train
    if fresh:
        loc.start_over()  # all meddiff wrote: an old model must not outlive its checkpoints
    out = loc.staging.resolve()
    out.mkdir(parents=True, exist_ok=True)
    ray_storage = loc.sub("ray")
    run_dir = ray_storage.join(RUN_NAME)
    done = training.finished_run(loc.join(SUMMARY), run_dir, tc.steps)
    if done is not None:
        return {**done, "model": str(loc.join(MODEL_DIR))}
    runtime.connect(cfg.runtime)
    use_gpu = tc.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    precision = training.check_run(
        run_dir,
        tc,
        use_gpu=use_gpu,
        section="thor.train",
        model_section="thor.model",
        model_config=cfg.thor.model.model_dump(mode="json"),
        fresh=FRESH,
    )

    with tracking.start_run(cfg, "thor-train") as run:  # nested under an active run
        run.log_params({"thor.data": str(data), "thor.out": str(out), "thor.use_gpu": use_gpu})
        run.log_input(data, context="training", producer_run=producer_run(data))
        base = healthy_dataset(data, cfg.thor.model.image_size, cfg.data.mri, cfg.data.images)
        repeated, epoch_rows = repeat_dataset(base, tc.epoch_images, tc.min_images)
        if epoch_rows < tc.batch_size:
            raise DataError(
                f"{data}: an epoch has {epoch_rows} slices, fewer than one batch of "
                f"{tc.batch_size}; raise thor.train.epoch_images or lower thor.train.batch_size"
            )
        # Reconstruction grids show slices spread over the (first 512 of the) training set; the
        # statistics detection compares its images with come from the first 1024.
        pool = np.stack([r["image"] for r in base.take(REFERENCE_IMAGES)])
        reference = reference_statistics(pool)
        pool = pool[:512]
        pick = np.linspace(0, len(pool) - 1, min(tc.num_samples, len(pool))).round().astype(int)
        samples = pool[pick]
        # Augmentation runs as tasks: an actor pool would be restarted at every epoch.
        ds = repeated.map_batches(
            augment_batch_task,
            fn_kwargs={"cfg": cfg.thor.augment.model_dump(mode="json")},
            batch_size=64,
            num_cpus=0.5,
        )
        log.info(
            "training on %s: %d slices per epoch (repeated), %d steps", data, epoch_rows, tc.steps
        )
        start = time.perf_counter()
        result = training.fit(
            train_loop,
            {
                "cfg": cfg.model_dump(mode="json"),
                "tracking": {"uri": tracking.tracking_uri(cfg.tracking), "run_id": run.run_id},
                "run_dir": str(run_dir),
                "use_gpu": use_gpu,
                "samples": samples,
                "epoch_rows": epoch_rows,
                "reference": reference,
            },
            tc,
            num_workers=tc.num_workers,
            use_gpu=use_gpu,
            cpus_per_worker=tc.cpus_per_worker,
            storage=ray_storage,
            name=RUN_NAME,
            datasets={"train": ds},
            min_workers=tc.min_workers,
            resources_per_worker=tc.resources_per_worker,
            section="thor.train",
        )
        seconds = time.perf_counter() - start
        if result.checkpoint is None:
            raise ModelError(f"training in {out} finished without a checkpoint")
        model_dir = out / MODEL_DIR
        with result.checkpoint.as_directory() as ckpt:
            copy_tree(Path(ckpt) / MODEL_DIR, model_dir)
        metrics = dict(result.metrics or {})
        summary: dict[str, Any] = {
            "model": str(model_dir),
            "steps": int(metrics.get("step", tc.steps)),
            "loss": metrics.get("loss"),
            "seconds": round(seconds, 1),
            "epoch_rows": epoch_rows,
            "precision": precision,
            "run_id": run.run_id,
        }
        run.log_metrics({"train_seconds": seconds})
        if tc.register_as:
            summary["registered"] = f"models:/{tc.register_as}/" + tracking.register_model(
                model_dir, tc.register_as
            )
        (out / SUMMARY).write_text(json.dumps(summary, indent=2))
        run.log_dict(summary, SUMMARY)
    return summary


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker. ``config``: cfg (model_dump), tracking (uri, run_id), run_dir,
    use_gpu, samples (reconstruction-grid slices), epoch_rows, reference (the training slices'
    statistics, saved with the model)."""
    import ray.train

    from meddiff.thor.noise import make_noise
    from meddiff.thor.schedule import DDPMSchedule
    from meddiff.thor.unet import DiffusionUNet

    cfg = Config.model_validate(config["cfg"])
    tc = cfg.thor.train
    ctx = training.WorkerContext.from_ray(
        use_gpu=config["use_gpu"],
        run_dir=config["run_dir"],
        seed=cfg.runtime.seed,
        tracking=config["tracking"],
        torch_threads=tc.torch_threads,
    )
    device = ctx.device
    schedule = DDPMSchedule(cfg.thor.schedule)
    torch.manual_seed(cfg.runtime.seed)  # the same initial weights on every rank
    unet = DiffusionUNet(cfg.thor.model).to(device)
    # mkldnn convolutions run markedly faster on channels-last tensors on CPU; DeepSpeed needs
    # contiguous parameters (it views them as bytes to broadcast them).
    channels_last = device.type == "cpu" and tc.strategy != "deepspeed"
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(unet.parameters(), lr=tc.lr)
    per_worker = tc.batch_size // ctx.world
    strategy = training.make_strategy(
        tc, ctx, unet, optimizer, micro_batch=per_worker, grad_clip=tc.grad_clip
    )
    precision = training.resolve_precision(tc.precision, device.type == "cuda", tc.precision_path)
    info = training.marker_info(
        tc,
        world=ctx.world,
        precision=precision,
        model_config=cfg.thor.model.model_dump(mode="json"),
    )

    step = 0
    with training.restored(ctx.run_dir) as d:
        if d is not None:
            strategy.load(d)
            step = int(training.read_marker(d)["step"])
            log.info("rank %d resumed at step %d", ctx.rank, step)
    ctx.log_metrics({"resumed_from_step": step}, step)
    t_max = min(tc.max_timestep or schedule.num_steps, schedule.num_steps)
    shard = ray.train.get_dataset_shard("train")
    losses: list[float] = []
    tick = started = time.perf_counter()
    limit_s = tc.time_limit_min * 60 if tc.time_limit_min else None
    stop = False
    while step < tc.steps and not stop:
        epoch_start = step
        for batch in shard.iter_torch_batches(
            batch_size=per_worker,
            drop_last=True,
            local_shuffle_buffer_size=min(256, int(config["epoch_rows"])),
            dtypes=torch.float32,
            device=device,
        ):
            ctx.fault_drill(tc, step + 1, in_checkpoint=False)
            gen = ctx.generator(step)
            x0 = batch["image"][:, None] * 2 - 1
            t = torch.randint(0, t_max, (x0.shape[0],), generator=gen).to(device)
            eps = make_noise(
                tc.noise, tuple(x0.shape), schedule.num_steps, cfg.thor.simplex, gen
            ).to(device)
            x_t = schedule.add_noise(x0, eps, t)
            with strategy.autocast():
                pred = strategy.model(x_t, t)
            loss = torch.nn.functional.mse_loss(pred.float(), eps)
            strategy.step(loss)
            step += 1
            losses.append(float(loss.detach()))
            if step % tc.log_every == 0:
                elapsed = time.perf_counter() - tick
                ctx.log_metrics(
                    {
                        "loss": float(np.mean(losses[-tc.log_every :])),
                        "images_per_s": tc.log_every * tc.batch_size / max(elapsed, 1e-9),
                    },
                    step,
                )
            if limit_s is not None and step % tc.log_every == 0:
                stop = ctx.agree(time.perf_counter() - started > limit_s)
            last = step >= tc.steps or stop
            if ctx.logger and tc.sample_every and (step % tc.sample_every == 0 or last):
                grid = _sample_grid(
                    _fp32(strategy.module), schedule, cfg, config["samples"], device
                )
                ctx.logger.log_image(grid, f"samples/step_{step:07d}.png")
            if step % tc.checkpoint_every == 0 or last:
                metrics = {"step": step, "loss": float(np.mean(losses[-tc.log_every :]))}
                _checkpoint(ctx, strategy, cfg, step, metrics, info, config.get("reference"))
            if step % tc.log_every == 0:
                tick = time.perf_counter()  # images_per_s times training steps, not saving
            if last:
                if stop:
                    log.info("time limit of %s min reached at step %d", tc.time_limit_min, step)
                break
        if step == epoch_start:
            raise DataError(
                f"an epoch of {config['epoch_rows']} training slices gives no full batch of "
                f"{per_worker} per worker; raise thor.train.epoch_images or lower the batch size"
            )


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
