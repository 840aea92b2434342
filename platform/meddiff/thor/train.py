"""Train THOR's DDPM on healthy slices with Ray Train (DDP or DeepSpeed), tracked in MLflow.

The driver (``train_thor``) builds the Ray Data pipeline (read → slice → repeat → augment), starts a
``TorchTrainer`` and, when it finishes, writes the final model directory and registers it. Each
worker (``train_loop``) runs the ε-prediction loop: x0 in [-1, 1], t ~ U{0..999}, x_t = q(x0, ε, t),
loss = ‖UNet(x_t, t) - ε‖². Rank 0 logs the loss, checkpoints and sample reconstructions.

Recovery: checkpoints (weights, optimizer, step) go to ``OUT/ray/thor-train`` every
``checkpoint_every`` steps. A failed worker is restarted from the latest one (``max_failures``), and
running the same command again with the same ``--out`` resumes from it (Ray Train restores the
run's checkpoint state from storage).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meddiff.config import Config
from meddiff.errors import ClusterError, ConfigError, DataError, ModelError, find_user_error

log = logging.getLogger(__name__)

RUN_NAME = "thor-train"
STATE_FILE = "train_state.pt"
MODEL_DIR = "model"
DS_TAG = "deepspeed"


def train_thor(
    cfg: Config, data: str | Path, out: str | Path, *, fresh: bool = False
) -> dict[str, Any]:
    """Train (or resume training) and return a summary: model dir, steps, loss, registry version.

    Raises:
        DataError: the training data cannot be read (named file).
        ConfigError: impossible settings (fp16 without GPUs, DeepSpeed without its package, ...).
    """
    import mlflow
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from meddiff import runtime, tracking
    from meddiff.thor.data import augment_batch_task, healthy_dataset, repeat_dataset

    tc = cfg.thor.train
    out = Path(out).resolve()
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    runtime.connect(cfg.runtime)
    use_gpu = tc.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    if tc.precision == "fp16" and not use_gpu:
        raise ConfigError("thor.train.precision=fp16 needs GPUs; use fp32 or bf16 on CPU")

    with tracking.start_run(cfg, "thor-train", nested=mlflow.active_run() is not None) as run:
        mlflow.log_params({"thor.data": str(data), "thor.out": str(out), "thor.use_gpu": use_gpu})
        base = healthy_dataset(data, cfg.thor.model.image_size, cfg.data.mri, cfg.data.images)
        repeated, epoch_rows = repeat_dataset(base, tc.epoch_images)
        if epoch_rows < tc.batch_size:
            raise DataError(
                f"{data}: an epoch has {epoch_rows} slices, fewer than one batch of "
                f"{tc.batch_size}; raise thor.train.epoch_images or lower thor.train.batch_size"
            )
        # Reconstruction grids show slices spread over the (first 512 of the) training set.
        pool = [r["image"] for r in base.take(512)]
        pick = np.linspace(0, len(pool) - 1, min(tc.num_samples, len(pool))).round().astype(int)
        samples = np.stack([pool[i] for i in pick])
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
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={
                "cfg": cfg.model_dump(mode="json"),
                "run_id": run.info.run_id,
                "tracking_uri": tracking.tracking_uri(cfg.tracking),
                "samples": samples,
                "epoch_rows": epoch_rows,
            },
            scaling_config=ray.train.ScalingConfig(
                num_workers=_worker_count(tc),
                use_gpu=use_gpu,
                resources_per_worker={
                    "CPU": tc.cpus_per_worker,
                    **({"GPU": 1} if use_gpu else {}),
                    **tc.resources_per_worker,
                },
            ),
            run_config=ray.train.RunConfig(
                name=RUN_NAME,
                storage_path=str(out / "ray"),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.keep_checkpoints),
                failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            ),
            datasets={"train": ds},
        )
        start = time.perf_counter()
        result = _fit(trainer, out, tc.max_failures)
        seconds = time.perf_counter() - start
        if result.checkpoint is None:
            raise ModelError(f"training in {out} finished without a checkpoint")
        model_dir = out / MODEL_DIR
        with result.checkpoint.as_directory() as ckpt:
            tmp = out / f".{MODEL_DIR}.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(Path(ckpt) / MODEL_DIR, tmp)
            if model_dir.exists():
                shutil.rmtree(model_dir)
            tmp.rename(model_dir)
        metrics = dict(result.metrics or {})
        summary: dict[str, Any] = {
            "model": str(model_dir),
            "steps": int(metrics.get("step", tc.steps)),
            "loss": metrics.get("loss"),
            "seconds": round(seconds, 1),
            "epoch_rows": epoch_rows,
            "run_id": run.info.run_id,
        }
        mlflow.log_metric("train_seconds", seconds)
        if tc.register_as:
            summary["registered"] = f"models:/{tc.register_as}/" + tracking.register_model(
                model_dir, tc.register_as
            )
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
        mlflow.log_dict(summary, "train_summary.json")
    return summary


def _fit(trainer, out: Path, max_failures: int):
    """``trainer.fit()``; a run that Ray Train gave up on (a node lost beyond ``max_failures``
    restarts) becomes one clear error. Nothing final has been written at that point: the model
    directory, train_summary.json and the registry entry come only after a finished run."""
    import ray.train

    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as err:
        failures = [err, *(getattr(err, "worker_failures", None) or {}).values()]
        user_error = next(filter(None, map(find_user_error, failures)), None)
        if user_error is not None:
            raise user_error from err  # bad input a worker found: its own message
        raise ClusterError(
            f"training in {out} failed after thor.train.max_failures={max_failures} restarts "
            f"({_failure_reason(err)}); its checkpoints stay in {out / 'ray' / RUN_NAME}: "
            "run the same command again to resume"
        ) from err


def _failure_reason(err: Exception) -> str:
    """One line: the first failed worker's (or the controller's) exception."""
    failures = getattr(err, "worker_failures", None) or {}
    cause = failures[min(failures)] if failures else getattr(err, "controller_failure", err)
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    prefix = f"worker {min(failures)}: " if failures else ""
    return f"{prefix}{type(cause).__name__}: {lines[0] if lines else ''}"


def _worker_count(tc) -> int | tuple[int, int]:
    """Ray Train's num_workers: fixed, or (min, max) for elastic training, which resumes from the
    latest checkpoint with the workers that still fit after a node is lost."""
    if tc.min_workers is None or tc.min_workers == tc.num_workers:
        return tc.num_workers
    return (tc.min_workers, tc.num_workers)


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker. ``config``: cfg (model_dump), run_id, tracking_uri, samples."""
    import ray.train
    import ray.train.torch

    from meddiff.thor.model import save_model
    from meddiff.thor.noise import make_noise
    from meddiff.thor.schedule import DDPMSchedule
    from meddiff.thor.unet import DiffusionUNet

    cfg = Config.model_validate(config["cfg"])
    tc = cfg.thor.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if tc.torch_threads:
        torch.set_num_threads(tc.torch_threads)
    torch.manual_seed(cfg.runtime.seed * 1000 + rank)
    device = ray.train.torch.get_device()
    schedule = DDPMSchedule(cfg.thor.schedule)
    unet = DiffusionUNet(cfg.thor.model).to(device)
    # mkldnn convolutions run markedly faster on channels-last tensors on CPU; DeepSpeed needs
    # contiguous parameters (it views them as bytes to broadcast them).
    channels_last = device.type == "cpu" and tc.strategy != "deepspeed"
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(unet.parameters(), lr=tc.lr)

    step = 0
    restored = ray.train.get_checkpoint()
    engine = None
    if tc.strategy == "deepspeed":
        engine = _deepspeed_engine(unet, optimizer, cfg, world)
        if restored:
            with restored.as_directory() as d:
                _check_strategy(Path(d), tc.strategy)
                _, client = engine.load_checkpoint(d, tag=DS_TAG)
                step = int(client["step"])
        model = engine
    else:
        if restored:
            with restored.as_directory() as d:
                _check_strategy(Path(d), tc.strategy)
                state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
            unet.load_state_dict(state["unet"])
            optimizer.load_state_dict(state["optimizer"])
            step = int(state["step"])
        model = ray.train.torch.prepare_model(unet) if world > 1 else unet
    if restored:
        log.info("rank %d resumed at step %d", rank, step)

    logger = _RankZeroLogger(config["run_id"], config["tracking_uri"]) if rank == 0 else None
    if logger:
        logger.metrics({"resumed_from_step": step}, step)
    autocast = _autocast(tc.precision, device, deepspeed=engine is not None)
    t_max = min(tc.max_timestep or schedule.num_steps, schedule.num_steps)
    shard = ray.train.get_dataset_shard("train")
    per_worker = tc.batch_size // world
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
            x0 = batch["image"][:, None] * 2 - 1
            t = torch.randint(0, t_max, (x0.shape[0],), device=device)
            eps = make_noise(tc.noise, tuple(x0.shape), schedule.num_steps, cfg.thor.simplex).to(
                device
            )
            x_t = schedule.add_noise(x0, eps, t)
            if channels_last:
                x_t = x_t.contiguous(memory_format=torch.channels_last)
            with autocast:
                pred = model(x_t, t)
            loss = torch.nn.functional.mse_loss(pred.float(), eps)
            if engine is not None:
                engine.backward(loss)
                engine.step()
            else:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if tc.grad_clip:
                    torch.nn.utils.clip_grad_norm_(unet.parameters(), tc.grad_clip)
                optimizer.step()
            step += 1
            losses.append(float(loss.detach()))
            if logger and step % tc.log_every == 0:
                elapsed = time.perf_counter() - tick
                logger.metrics(
                    {
                        "loss": float(np.mean(losses[-tc.log_every :])),
                        "images_per_s": tc.log_every * tc.batch_size / max(elapsed, 1e-9),
                    },
                    step,
                )
            if limit_s is not None and step % tc.log_every == 0:
                stop = _agree(time.perf_counter() - started > limit_s, world, device)
            last = step >= tc.steps or stop
            if logger and tc.sample_every and (step % tc.sample_every == 0 or last):
                logger.image(_sample_grid(unet, schedule, cfg, config["samples"]), step)
            if step % tc.checkpoint_every == 0 or last:
                metrics = {"step": step, "loss": float(np.mean(losses[-tc.log_every :]))}
                _checkpoint(metrics, unet, optimizer, engine, cfg, rank, save_model)
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


def _agree(flag: bool, world: int, device: torch.device) -> bool:
    """Rank 0's decision, on every rank (workers must stop at the same step)."""
    if world == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


class _RankZeroLogger:
    """MLflow logging from inside a Ray worker, into the driver's run (by id)."""

    def __init__(self, run_id: str, uri: str):
        import mlflow

        self.client = mlflow.MlflowClient(tracking_uri=uri)
        self.run_id = run_id

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()]
        )

    def image(self, grid: np.ndarray, step: int) -> None:
        self.client.log_image(self.run_id, grid, artifact_file=f"samples/step_{step:07d}.png")


def _sample_grid(unet: torch.nn.Module, schedule, cfg: Config, samples: np.ndarray) -> np.ndarray:
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
    det = inferer(unet, x, seeds=range(len(x)))
    unet.train(was_training)
    rows = [x[:, 0], det.reconstruction[:, 0], (det.reconstruction - x).abs()[:, 0]]
    grid = torch.cat([torch.cat(list(r), dim=1) for r in rows], dim=0)
    return (grid.clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def _checkpoint(metrics, unet, optimizer, engine, cfg: Config, rank: int, save_model) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        if engine is not None:
            engine.save_checkpoint(d, tag=DS_TAG, client_state={"step": metrics["step"]})
        if rank == 0:
            if engine is None:
                torch.save(
                    {
                        "unet": unet.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "step": metrics["step"],
                    },
                    Path(d) / STATE_FILE,
                )
            save_model(
                Path(d) / MODEL_DIR,
                unet,
                cfg.thor.model,
                cfg.thor.schedule,
                {
                    "steps": metrics["step"],
                    "loss": metrics["loss"],
                    "train_noise": cfg.thor.train.noise,
                    # Inference refuses a T the model never saw (see detect.plan_for).
                    "max_timestep": cfg.thor.train.max_timestep,
                    "intensity": cfg.data.images.reading(),  # detection must read the same way
                },
            )
        has_files = engine is not None or rank == 0
        ckpt = ray.train.Checkpoint.from_directory(d) if has_files else None
        ray.train.report(metrics, checkpoint=ckpt)


def _check_strategy(checkpoint: Path, strategy: str) -> None:
    """A checkpoint resumes only under the strategy that wrote it (different state layouts)."""
    wrote = "deepspeed" if (checkpoint / DS_TAG).is_dir() else "ddp"
    if wrote != strategy:
        raise ConfigError(
            f"the checkpoint {checkpoint.name} was written with thor.train.strategy={wrote}, "
            f"this run uses {strategy}; resume with the same strategy or start over with --fresh"
        )


def _deepspeed_engine(unet: torch.nn.Module, optimizer, cfg: Config, world: int):
    try:
        import deepspeed
    except ImportError as err:
        raise ConfigError(
            f"thor.train.strategy=deepspeed but deepspeed cannot be imported ({err})"
        ) from None
    tc = cfg.thor.train
    ds_config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": tc.batch_size // world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": tc.zero_stage},
        "bf16": {"enabled": tc.precision == "bf16"},
        "fp16": {"enabled": tc.precision == "fp16"},
    }
    if tc.grad_clip:
        ds_config["gradient_clipping"] = tc.grad_clip
    engine, *_ = deepspeed.initialize(
        model=unet, optimizer=optimizer, config=ds_config, dist_init_required=False
    )
    return engine


def _autocast(precision: str, device: torch.device, deepspeed: bool):
    import contextlib

    if precision == "fp32" or deepspeed:  # DeepSpeed casts the model itself
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
