"""Fine-tune Stable Diffusion's UNet on (image, prompt) pairs with Ray Train.

Driver (:func:`train_synthesis`), in ``out``:

1. ``base/``: the model to start from. With ``model.source`` set it is that hub id or directory and
   nothing is written; with ``source: null`` (tiny) the components are built from config with a
   tokenizer over the pairs' prompts and saved here once.
2. ``cache/``: latents and text embeddings of the pairs (or the images, for on-the-fly encoding),
   built once by Ray Data stages (:mod:`meddiff.synthesis.cache`).
3. ``ray/train/``: Ray Train's run (``TorchTrainer``, DeepSpeed ZeRO or DDP); its checkpoints
   ``checkpoint_<step>/`` hold the pipeline in diffusers' ``save_pretrained`` layout (``model/``,
   UNet with EMA weights) plus what resuming needs (optimizer, LR schedule, EMA step, DeepSpeed
   partitions). A failed worker group is restarted from the last checkpoint Ray Train committed
   (``FailureConfig``); running the same command again continues the same run.
4. ``model/``: the final pipeline, registered in the MLflow model registry.

Every rank's randomness (batch rows, noise, timesteps, prompt dropout) is a function of
(seed, rank, step), so a resumed run repeats exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from meddiff.config import Config
from meddiff.errors import ConfigError, MeddiffError, ModelError
from meddiff.files import copy_tree, write_json
from meddiff.synthesis import cache as cache_mod
from meddiff.synthesis import components as C
from meddiff.synthesis.prompts import table_from_pairs, write_prompt_table

log = logging.getLogger(__name__)

CHECKPOINT_INFO = "meddiff_checkpoint.json"
RUN_NAME = "train"
FAULT_MARKER = "fault_drill.done"
ATTEMPTS = "attempts.jsonl"


# --- driver --------------------------------------------------------------------------------


def train_synthesis(cfg: Config, pairs: str | Path, out: str | Path) -> dict[str, Any]:
    """Fine-tune on the pairs shard directory ``pairs``; everything goes under ``out``.

    Returns a JSON-able summary: ``model`` (the final pipeline directory, ``out/model``),
    ``model_uri``/``version`` (registry), ``steps``, ``final_loss``, ``attempts`` (the step each
    worker-group attempt started from), ``checkpoint`` and timing.

    Raises:
        DataError: pairs missing, incomplete, without the prompt columns, or empty.
        ModelError: the model source cannot be loaded; a checkpoint cannot be resumed.
    """
    import mlflow

    from meddiff import runtime, tracking

    out = Path(out).resolve()
    pairs = Path(pairs).resolve()
    cache_mod.check_pairs(pairs)
    out.mkdir(parents=True, exist_ok=True)
    runtime.connect(cfg.runtime)
    tcfg = cfg.synthesis.train
    start = time.perf_counter()
    with tracking.start_run(cfg, "synthesis-train") as run:
        mlflow.log_params({"pairs": str(pairs), "out": str(out)})
        source = prepare_base_model(cfg, pairs, out / "base")
        t0 = time.perf_counter()
        info = cache_mod.build_cache(cfg, source, pairs, out / "cache")
        cache_s = time.perf_counter() - t0
        # Checked here, not only in the workers: Ray Train would retry a worker's error.
        cache_mod.batch_indices(
            int(info["rows"]), 0, world=tcfg.num_workers, rank=0, batch=tcfg.batch_size, seed=0
        )
        result = _fit(cfg, source, out, run.info.run_id, tracking.tracking_uri(cfg.tracking))
        if result.checkpoint is None:
            raise ModelError(f"training under {out / 'ray'} finished without a checkpoint")
        ckpt = Path(result.checkpoint.path)
        ckpt_info = read_checkpoint_info(ckpt)
        model_dir = export_model(ckpt, out / "model")
        # The prompts it was trained on travel with the model (the synthesis service lists them).
        write_prompt_table(model_dir / "prompts.csv", pairs_table(pairs))
        summary: dict[str, Any] = {
            "model": str(model_dir),
            "checkpoint": str(ckpt),
            "steps": ckpt_info["step"],
            "final_loss": (result.metrics or {}).get("loss"),
            "attempts": read_attempts(out),
            "strategy": tcfg.strategy,
            "zero_stage": tcfg.zero_stage if tcfg.strategy == "deepspeed" else None,
            "workers": tcfg.num_workers,
            "cache": {"dir": str(out / "cache"), "kind": info["kind"], "rows": info["rows"]},
            "cache_seconds": round(cache_s, 2),
            "samples_per_s": (result.metrics or {}).get("samples_per_s"),
            "mlflow_run_id": run.info.run_id,
            "registered_model": None,
            "version": None,
            "model_uri": None,
        }
        if tcfg.registered_name:
            version = tracking.register_model(model_dir, tcfg.registered_name)
            summary.update(
                registered_model=tcfg.registered_name,
                version=version,
                model_uri=f"models:/{tcfg.registered_name}/{version}",
            )
        summary["seconds"] = round(time.perf_counter() - start, 2)
        mlflow.log_metrics({"train_seconds": summary["seconds"], "cache_seconds": cache_s})
        mlflow.log_dict(summary, "summary.json")
    write_json(out / "summary.json", summary)
    return summary


def pairs_table(pairs: Path) -> list:
    """The prompt table of a pairs directory (prompt, label, cluster, count per prompt)."""
    import pyarrow.parquet as pq

    cols = ["prompt", "label", "cluster"]
    files = cache_mod.shards.read_manifest(pairs)["files"]
    tables = [pq.read_table(pairs / f, columns=cols) for f in files]
    return table_from_pairs(*(np.concatenate([t[c].to_numpy() for t in tables]) for c in cols))


def prepare_base_model(cfg: Config, pairs: Path, out: Path) -> str:
    """The model to fine-tune: ``model.source``, or for ``source: null`` a pipeline built from
    config and saved in ``out`` (reused when it was built for the same config and prompts)."""
    mcfg = cfg.synthesis.model
    if mcfg.source is not None:
        if C.is_local_source(mcfg.source):
            return str(C.check_model_dir(mcfg.source).resolve())
        return mcfg.source
    prompts = cache_mod.pair_prompts(pairs)
    key = {
        "model": mcfg.model_dump(mode="json"),
        "prompts": prompts,
        "seed": cfg.runtime.seed,
        "pairs": str(pairs),
    }
    info_path = out / C.BASE_INFO
    if info_path.is_file() and json.loads(info_path.read_text()) == key:
        return str(out)
    images = sample_pair_images(pairs, 1024) if mcfg.arch.vae_warmup_steps else None
    log.info(
        "building a %s-px model from config (random weights, %d prompts)",
        mcfg.resolution,
        len(prompts),
    )
    comp = C.build_components(mcfg, prompts, seed=cfg.runtime.seed, images=images)
    C.save_pipeline(comp, out, extra={C.BASE_INFO: key})
    return str(out)


def sample_pair_images(pairs: Path, n: int) -> np.ndarray:
    """Up to ``n`` images from the first shard files (for fitting a from-scratch VAE)."""
    import pyarrow.parquet as pq

    from meddiff.data import shards

    manifest = shards.read_manifest(pairs)
    batches, have = [], 0
    for name in manifest["files"]:
        table = pq.read_table(pairs / name, columns=["image", "height", "width", "channels"])
        cols = {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}
        batches.append(shards.decode_batch(cols)["image"])
        have += len(batches[-1])
        if have >= n:
            break
    return np.concatenate(batches)[:n]


def _fit(cfg: Config, source: str, out: Path, run_id: str, uri: str):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    tcfg = cfg.synthesis.train
    resources: dict[str, float] = {"CPU": tcfg.cpus_per_worker}
    if tcfg.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "source": source,
            "cache": str(out / "cache"),
            "run_dir": str(out / "ray" / RUN_NAME),
            "mlflow_uri": uri,
            "mlflow_run_id": run_id,
        },
        torch_config=TorchConfig(backend="nccl" if tcfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=tcfg.num_workers, use_gpu=tcfg.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=str(out / "ray"),
            failure_config=FailureConfig(max_failures=tcfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=tcfg.keep_checkpoints),
        ),
    )
    try:
        return trainer.fit()
    except Exception as err:
        user = _worker_user_error(err)
        if user is not None:
            raise user from None
        raise


def _worker_user_error(err: BaseException) -> MeddiffError | None:
    """A bad-input error raised inside a training worker (Ray Train wraps them per rank)."""
    from meddiff.cli import find_user_error

    for failure in (getattr(err, "worker_failures", None) or {}).values():
        found = find_user_error(failure)
        if found is not None:
            return found
    return find_user_error(err)


def export_model(checkpoint: Path, dst: Path) -> Path:
    """Copy the checkpoint's pipeline (``model/``) to ``dst``, all or nothing."""
    src = checkpoint / "model"
    C.check_model_dir(src)
    copy_tree(src, dst)
    return dst


def read_checkpoint_info(path: str | Path) -> dict[str, Any]:
    """The step and layout of a complete checkpoint.

    Raises:
        ModelError: no ``meddiff_checkpoint.json`` (it is written last, so the checkpoint was not
            finished) or an unreadable one.
    """
    marker = Path(path) / CHECKPOINT_INFO
    if not marker.is_file():
        raise ModelError(
            f"checkpoint {path} is incomplete (no {CHECKPOINT_INFO}); it was not finished writing"
        )
    try:
        return json.loads(marker.read_text())
    except json.JSONDecodeError as err:
        raise ModelError(f"{marker}: corrupt ({err})") from None


def read_attempts(out: str | Path) -> list[int]:
    """The step each worker-group attempt of the run in ``out`` started from (0: from scratch)."""
    path = Path(out) / "ray" / RUN_NAME / ATTEMPTS
    if not path.is_file():
        return []
    return [json.loads(line)["start_step"] for line in path.read_text().splitlines() if line]


# --- workers ---------------------------------------------------------------------------------


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """The Ray Train worker function (every rank runs it)."""
    return _Worker(config).run()


class _Worker:
    def __init__(self, config: dict[str, Any]):
        import ray.train
        import torch

        self.cfg = Config.model_validate(config["cfg"])
        self.t = self.cfg.synthesis.train
        self.source: str = config["source"]
        self.run_dir = Path(config["run_dir"])
        self.cache_dir = Path(config["cache"])
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        if self.t.use_gpu and torch.cuda.is_available():
            import ray.train.torch

            self.device = ray.train.torch.get_device()
        else:
            self.device = torch.device("cpu")
        self.bf16 = self.t.precision == "bf16" or (
            self.t.precision == "auto" and self.device.type == "cuda"
        )
        self.dtype = torch.bfloat16 if self.bf16 else torch.float32
        self.logger = None
        if self.rank == 0 and config.get("mlflow_run_id"):
            from meddiff.tracking import RunLogger

            self.logger = RunLogger(config["mlflow_uri"], config["mlflow_run_id"])
        self._frozen: C.Components | None = None
        self._eval_unet = None

    # setup ----------------------------------------------------------------------------------

    def _build(self) -> None:
        import torch
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        t = self.t
        self.data = cache_mod.TrainingSet(self.cache_dir)
        online = self.data.kind == "images"
        parts = ("unet", "vae", "text_encoder", "tokenizer") if online else ("unet",)
        comp = C.load_components(
            self.source, revision=self.cfg.synthesis.model.revision, parts=parts, device=self.device
        )
        self.noise_scheduler = comp.noise_scheduler
        unet = comp.unet
        unet.train()
        if t.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.unet = unet
        self.ema = None
        if t.ema:
            self.ema = EMAModel(
                unet.parameters(),
                decay=t.ema_decay,
                use_ema_warmup=True,
                power=3 / 4,
                foreach=True,  # one fused update over all tensors instead of a Python loop
                model_cls=type(unet),
                model_config=unet.config,
            )
            # The average lives in fp32 even when training in bf16: updates of (1 - 0.9999)·Δ are
            # far below bf16's resolution and would vanish.
            self.ema.to(device=self.device, dtype=torch.float32)
        optimizer = torch.optim.AdamW(
            unet.parameters(),
            lr=t.learning_rate,
            betas=(t.adam_beta1, t.adam_beta2),
            weight_decay=t.weight_decay,
            eps=t.adam_epsilon,
            fused=self.device.type == "cuda",
        )
        lr_scheduler = get_scheduler(
            t.lr_schedule,
            optimizer,
            num_warmup_steps=t.warmup_steps,
            num_training_steps=t.max_steps,
        )
        if t.strategy == "deepspeed":
            self.strategy: _Strategy = _DeepSpeed(self, unet, optimizer, lr_scheduler)
        else:
            self.strategy = _DDP(self, unet, optimizer, lr_scheduler)
        if online:
            vae = comp.vae.to(self.dtype)
            text_encoder = comp.text_encoder.to(self.dtype)
            self.batches: Any = _online(self, vae, text_encoder, comp.tokenizer)
            self._frozen = comp
        else:
            scale = vae_scaling_factor(self.source, self.cfg.synthesis.model.revision)
            self.batches = _cached(self, scale)

    # loop -----------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        import ray.train
        import torch
        import torch.distributed as dist

        t = self.t
        self._build()
        start_step = 0
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                start_step = self._load(Path(d))
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / ATTEMPTS, "a") as f:
                f.write(json.dumps({"start_step": start_step, "time": time.time()}) + "\n")
            if self.logger:
                self.logger.log_metrics({"resumed_from_step": start_step}, step=start_step)
        # Summed on the device: reading the loss every step would stall a GPU on each step.
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        loss_n, t_last, step_last = 0, time.perf_counter(), start_step
        metrics: dict[str, Any] = {}
        for step in range(start_step, t.max_steps):
            self._fault_drill(step + 1, in_checkpoint=False)
            gen = _step_generator(self.cfg.runtime.seed, self.rank, step)
            idx = cache_mod.batch_indices(
                len(self.data),
                step,
                world=self.world,
                rank=self.rank,
                batch=t.batch_size,
                seed=self.cfg.runtime.seed,
            )
            latents, emb = self.batches(idx, gen)
            loss = self.strategy.step(latents, emb, gen)
            if self.ema is not None:
                self.ema.step(self.strategy.module.parameters())
            loss_sum += loss.double()
            loss_n += 1
            done = step + 1
            is_ckpt = done % t.checkpoint_every == 0 or done == t.max_steps
            if done % t.log_every == 0 or is_ckpt:
                mean = loss_sum / loss_n  # on the device: NCCL reduces GPU tensors only
                if dist.is_initialized():
                    dist.all_reduce(mean)
                    mean /= self.world
                seconds = time.perf_counter() - t_last
                metrics = {
                    "step": done,
                    "loss": float(mean),
                    "lr": self.strategy.lr(),
                    "samples_per_s": (done - step_last) * t.batch_size * self.world / seconds,
                    "epoch": step * t.batch_size * self.world // len(self.data),
                    "resumed_from_step": start_step,
                }
                loss_sum.zero_()
                loss_n, step_last = 0, done
                if self.logger:
                    self.logger.log_metrics(
                        {k: metrics[k] for k in ("loss", "lr", "samples_per_s")}, step=done
                    )
                if is_ckpt:
                    self._save_and_report(done, metrics)
                else:
                    ray.train.report(metrics)
            sample_due = done == t.max_steps or (t.sample_every and done % t.sample_every == 0)
            if self.rank == 0 and sample_due and self.logger:
                # The other ranks wait in the next step's collective meanwhile.
                self._log_samples(done)
            if step_last == done:
                # samples_per_s times training steps only, not checkpoints or sample grids.
                t_last = time.perf_counter()
        return {"rank": self.rank, "start_step": start_step, **metrics}

    # checkpoints ----------------------------------------------------------------------------

    def _save_and_report(self, step: int, metrics: dict[str, Any]) -> None:
        import ray.train
        from ray.train import Checkpoint

        tmp = Path(tempfile.mkdtemp(prefix=f"meddiff-ckpt-{step}-r{self.rank}-"))
        try:
            if self.rank == 0:
                C.save_pipeline(self._frozen_components(), tmp / "model", unet=self._ema_unet())
            self.strategy.save(tmp)
            self._fault_drill(step, in_checkpoint=True)
            if self.rank == 0:
                info = {
                    "step": step,
                    "strategy": self.t.strategy,
                    "zero_stage": self.t.zero_stage,
                    "world_size": self.world,
                    "ema": self.ema is not None,
                    "ema_state": self._ema_scalars(),
                    "time": time.time(),
                }
                # Written last: a checkpoint without it was interrupted while being written.
                write_json(tmp / CHECKPOINT_INFO, info)
            ray.train.report(
                metrics,
                checkpoint=Checkpoint.from_directory(str(tmp)),
                checkpoint_dir_name=f"checkpoint_{step:08d}",
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _load(self, d: Path) -> int:
        """Restore the training state from a committed checkpoint; returns its step."""
        import torch

        info = read_checkpoint_info(d)
        if info["strategy"] != self.t.strategy:
            raise ConfigError(
                f"checkpoint {d} was written with train.strategy={info['strategy']}; "
                f"resume with the same strategy (now {self.t.strategy})"
            )
        if self.t.strategy == "deepspeed" and (
            info["world_size"] != self.world or info["zero_stage"] != self.t.zero_stage
        ):
            raise ConfigError(
                f"checkpoint {d} holds ZeRO-{info['zero_stage']} optimizer partitions of "
                f"{info['world_size']} workers; resume with train.num_workers={info['world_size']} "
                f"and train.zero_stage={info['zero_stage']}"
            )
        self.strategy.load(d)
        if self.ema is not None:
            if not info.get("ema"):
                raise ConfigError(f"checkpoint {d} has no EMA weights; resume with train.ema=false")
            from diffusers import UNet2DConditionModel

            saved = UNet2DConditionModel.from_pretrained(str(d / "model" / "unet"))
            state = dict(info["ema_state"])
            state["shadow_params"] = [
                p.detach().to(self.device, torch.float32) for p in saved.parameters()
            ]
            self.ema.load_state_dict(state)
        log.info("rank %d resumed from %s (step %d)", self.rank, d, info["step"])
        return int(info["step"])

    def _ema_scalars(self) -> dict[str, Any] | None:
        if self.ema is None:
            return None
        state = self.ema.state_dict()
        return {k: v for k, v in state.items() if k != "shadow_params"}

    def _frozen_components(self) -> C.Components:
        if self._frozen is None:
            self._frozen = C.load_components(
                self.source,
                revision=self.cfg.synthesis.model.revision,
                parts=("vae", "text_encoder", "tokenizer"),
                device=self.device,
            )
        return self._frozen

    def _ema_unet(self):
        """A UNet holding the EMA weights (or the current ones without EMA), fp32, for saving
        and sampling; the training module itself is never touched."""
        import torch

        if self._eval_unet is None:
            from diffusers import UNet2DConditionModel

            self._eval_unet = UNet2DConditionModel.from_config(self.unet.config).to(self.device)
            self._eval_unet.eval().requires_grad_(False)
        if self.ema is not None:
            self.ema.copy_to(self._eval_unet.parameters())
        else:
            with torch.no_grad():
                for dst, src in zip(
                    self._eval_unet.parameters(), self.strategy.module.parameters(), strict=True
                ):
                    dst.copy_(src.float())
        return self._eval_unet

    # MLflow samples -------------------------------------------------------------------------

    def _log_samples(self, step: int) -> None:
        import torch

        from meddiff.grids import grid
        from meddiff.synthesis.stages import to_uint8

        t, g = self.t, self.cfg.synthesis.generate
        pipe = C.pipeline(self._frozen_components(), unet=self._ema_unet())
        pipe.scheduler = C.inference_scheduler(g.scheduler, pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        res = self.cfg.synthesis.model.resolution
        rows = []
        for prompt in [p for p in self.data.prompts if p][: t.sample_prompts]:
            gens = [torch.Generator().manual_seed(g.seed + i) for i in range(t.sample_images)]
            with torch.inference_mode():
                images = pipe(
                    [prompt] * t.sample_images,
                    height=res,
                    width=res,
                    num_inference_steps=t.sample_steps,
                    guidance_scale=g.guidance_scale,
                    generator=gens,
                    output_type="np",
                ).images
            rows.append(
                np.asarray(grid(to_uint8(images, g.output_size), prompt, cols=t.sample_images))
            )
        width = max(r.shape[1] for r in rows)
        sheet = np.concatenate(
            [
                np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255)
                for r in rows
            ]
        )
        with tempfile.TemporaryDirectory() as d:
            from PIL import Image

            path = Path(d) / f"samples_step_{step:08d}.png"
            Image.fromarray(sheet).save(path)
            self.logger.log_artifact(path, "samples")

    # fault drill ----------------------------------------------------------------------------

    def _fault_drill(self, step: int, *, in_checkpoint: bool) -> None:
        """Kill this worker process (SIGKILL: no cleanup, no exception) once per run directory,
        when train.fail_at_step says so; FailureConfig then restarts the worker group."""
        t = self.t
        if t.fail_at_step != step or t.fail_in_checkpoint != in_checkpoint:
            return
        if self.rank != t.fail_rank:
            return
        marker = self.run_dir / FAULT_MARKER
        if marker.exists():
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(
            json.dumps({"step": step, "rank": self.rank, "in_checkpoint": in_checkpoint})
        )
        where = "while writing the checkpoint of" if in_checkpoint else "before"
        log.warning(
            "fault drill: killing rank %d (pid %d) %s step %d", self.rank, os.getpid(), where, step
        )
        os.kill(os.getpid(), signal.SIGKILL)


def _step_generator(seed: int, rank: int, step: int):
    from meddiff.synthesis.diffusion import step_generator

    return step_generator(seed, rank, step)


def _cached(w: _Worker, scale: float):
    from meddiff.synthesis.diffusion import CachedBatches

    return CachedBatches(w.data, scale, w.t.prompt_dropout, w.device, w.dtype)


def _online(w: _Worker, vae, text_encoder, tokenizer):
    from meddiff.synthesis.diffusion import OnlineBatches

    return OnlineBatches(
        w.data,
        vae,
        text_encoder,
        tokenizer,
        resolution=w.cfg.synthesis.model.resolution,
        prompt_dropout=w.t.prompt_dropout,
        augment=w.t.augment,
        device=w.device,
        dtype=w.dtype,
    )


def vae_scaling_factor(source: str, revision: str | None = None) -> float:
    """The VAE's latent scaling factor, read from its config (no weights loaded)."""
    from diffusers import AutoencoderKL

    config = AutoencoderKL.load_config(source, subfolder="vae", revision=revision)
    return float(config["scaling_factor"])


# --- distribution strategies ------------------------------------------------------------------


def deepspeed_config(t, *, bf16: bool, cuda: bool) -> dict[str, Any]:
    """The DeepSpeed config of a :class:`~meddiff.config.synthesis.TrainConfig`."""
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": {
            "stage": t.zero_stage,
            # Overlapping the gradient reduction with backward needs CUDA streams.
            "overlap_comm": cuda,
            "contiguous_gradients": True,
        },
        "bf16": {"enabled": bf16},
        # The optimizer is torch's AdamW (fused on GPU), which DeepSpeed's ZeRO handles fine.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class _Strategy:
    """One optimisation step over the wrapped UNet, and its part of a checkpoint."""

    module: Any

    def step(self, latents, emb, gen):  # returns the (local) loss
        raise NotImplementedError

    def lr(self) -> float:
        raise NotImplementedError

    def save(self, d: Path) -> None:
        raise NotImplementedError

    def load(self, d: Path) -> None:
        raise NotImplementedError


class _DDP(_Strategy):
    """PyTorch DDP (gloo on CPU, NCCL on GPU); bf16 by autocast over fp32 weights."""

    def __init__(self, w: _Worker, unet, optimizer, lr_scheduler):
        import torch
        import torch.distributed as dist

        self.w, self.module, self.optimizer, self.lr_scheduler = w, unet, optimizer, lr_scheduler
        self.model = unet
        if dist.is_initialized() and w.world > 1:
            ids = [w.device.index] if w.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(unet, device_ids=ids)

    def step(self, latents, emb, gen):
        import torch

        from meddiff.synthesis.diffusion import diffusion_loss

        w = self.w
        with torch.autocast(w.device.type, dtype=torch.bfloat16, enabled=w.bf16):
            loss = diffusion_loss(self.model, w.noise_scheduler, latents, emb, gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), w.t.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def lr(self) -> float:
        return float(self.lr_scheduler.get_last_lr()[0])

    def save(self, d: Path) -> None:
        import torch

        if self.w.rank != 0:
            return
        state = {
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
        }
        torch.save(state, d / "trainer_state.pt")
        if self.w.ema is not None:  # model/unet holds the EMA weights; keep the raw ones too
            self.module.save_pretrained(str(d / "unet"), safe_serialization=True)

    def load(self, d: Path) -> None:
        import torch
        from safetensors.torch import load_file

        raw = d / "unet" if (d / "unet").is_dir() else d / "model" / "unet"
        weights = load_file(
            str(raw / "diffusion_pytorch_model.safetensors"), device=str(self.w.device)
        )
        self.module.load_state_dict(weights)
        state = torch.load(d / "trainer_state.pt", map_location=self.w.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])


class _DeepSpeed(_Strategy):
    """DeepSpeed ZeRO stage 0-2 over the process group Ray Train set up (gloo on CPU, NCCL on
    GPU); bf16 weights with fp32 master copies on GPU, fp32 on CPU."""

    def __init__(self, w: _Worker, unet, optimizer, lr_scheduler):
        import deepspeed

        if w.device.type == "cpu":
            # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce kernel when its
            # comm backend starts (minutes with a C++ toolchain, a failure without one). It serves
            # only inference all-reduce, never training, so it is switched off; gloo does the rest.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        config = deepspeed_config(w.t, bf16=w.bf16, cuda=w.device.type == "cuda")
        self.w = w
        self.engine, self.optimizer, _, self.lr_scheduler = deepspeed.initialize(
            model=unet,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            config=config,
            dist_init_required=False,
        )
        self.module = self.engine.module

    def step(self, latents, emb, gen):
        from meddiff.synthesis.diffusion import diffusion_loss

        loss = diffusion_loss(self.engine, self.w.noise_scheduler, latents, emb, gen)
        self.engine.backward(loss)
        self.engine.step()  # clips, steps the optimizer and the LR schedule, zeroes gradients
        return loss.detach()

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def save(self, d: Path) -> None:
        # Every rank writes its ZeRO partition; Ray Train merges the ranks' folders.
        self.engine.save_checkpoint(str(d / "deepspeed"), tag="state", save_latest=False)

    def load(self, d: Path) -> None:
        path, _ = self.engine.load_checkpoint(
            str(d / "deepspeed"),
            tag="state",
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if path is None:
            raise ModelError(f"checkpoint {d} has no DeepSpeed state under deepspeed/state")
