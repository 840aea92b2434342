"""Fine-tune Stable Diffusion's UNet on (image, prompt) pairs with Ray Train.

Driver (:func:`train_synthesis`), in ``out``:

1. ``base/``: the model to start from. With ``model.source`` set it is that hub id or directory and
   nothing is written; with ``source: null`` (tiny) the components are built from config with a
   tokenizer over the pairs' prompts and saved here once.
2. ``cache/``: latents and text embeddings of the pairs (or the images, for on-the-fly encoding),
   built once by Ray Data stages (:mod:`meddiff.synthesis.cache`).
3. ``ray/train/``: Ray Train's run through the training core (:mod:`meddiff.training`: DeepSpeed
   ZeRO or DDP, fp32/bf16/fp16); its checkpoints ``checkpoint_<step>/`` hold the pipeline in
   diffusers' ``save_pretrained`` layout (``model/``, UNet with EMA weights) plus the strategy's
   state and the core's marker (with the EMA step). A failed worker group is restarted from the
   last checkpoint Ray Train committed; running the same command again continues the same run,
   after the driver checked that the checkpoint fits (strategy, ZeRO layout, model settings).
4. ``model/``: the final pipeline, registered in the MLflow model registry.

Every rank's randomness (batch rows, noise, timesteps, prompt dropout) is a function of
(seed, rank, step), so a resumed run repeats exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from meddiff import storage, training
from meddiff.config import Config
from meddiff.errors import ConfigError
from meddiff.files import copy_tree
from meddiff.prompts import check_training_prompts, table_from_pairs, write_prompt_table
from meddiff.synthesis import cache as cache_mod
from meddiff.synthesis import components as C
from meddiff.training.checkpoints import MARKER as CHECKPOINT_INFO
from meddiff.training.context import FAULT_MARKER

log = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_INFO", "FAULT_MARKER", "train_synthesis"]

RUN_NAME = "train"
ATTEMPTS = "attempts.jsonl"


# --- driver --------------------------------------------------------------------------------


def train_synthesis(
    cfg: Config,
    pairs: str | Path,
    out: str | Path | storage.OutputLocation,
    *,
    fresh: bool = False,
) -> dict[str, Any]:
    """Fine-tune on the pairs shard directory ``pairs``; everything goes under ``out``.

    ``out`` is the command's :class:`~meddiff.storage.OutputLocation` (or a path, opened here).
    What Ray Train's workers write or read goes to the location itself: the checkpoints
    (``out/ray``, from every node; a rerun resumes from them), the base model built from config
    and the training cache (``base/``, ``cache/``: for an object store uploaded before training
    and reused by a rerun); the rest is written to its staging folder. ``fresh``: first delete
    what meddiff wrote there (checkpoints included) and start over.

    Returns the summary (:mod:`meddiff.training.task` lists its keys); synthesis adds
    ``attempts`` (the step each worker-group attempt started from), ``cache`` (folder, kind,
    rows), ``cache_seconds`` and ``samples_per_s``.

    Raises:
        DataError: pairs missing, incomplete, without the prompt columns, or empty.
        ModelError: the model source cannot be loaded; a checkpoint cannot be resumed.
    """
    with storage.OutputLocation.use(out, keep=("ray",), resume=True) as loc:
        task = SynthesisTraining(cfg, storage.resolve(pairs))
        return training.run_task(task, loc, fresh=fresh)


class SynthesisTraining(training.TrainingTask):
    """Stable Diffusion's UNet fine-tuned on (image, prompt) pairs: a diffusers pipeline out."""

    section, model_section = "synthesis.train", "synthesis.model"
    run_name, mlflow_name = RUN_NAME, "synthesis-train"
    summary_name = "summary.json"

    def __init__(self, cfg: Config, pairs: str | Path):
        super().__init__(cfg)
        self.pairs = pairs
        self.cache: dict[str, Any] = {}
        self.cache_seconds = 0.0

    @staticmethod
    def loop(config: dict[str, Any]) -> dict[str, Any]:
        return train_loop_per_worker(config)

    def check(self) -> None:
        cache_mod.check_pairs(self.pairs)  # an object-store prefix is read in place

    def prepare(self, run, loc, use_gpu):
        from meddiff.data.shards import producer_run

        cfg, pairs, tcfg = self.cfg, self.pairs, self.settings
        out = loc.staging.resolve()
        run.log_params({"pairs": str(pairs), "out": str(out)})
        run.log_input(pairs, context="training", producer_run=producer_run(pairs))
        for part in ("base", "cache"):  # a rerun reuses them (the checkpoints were made on them)
            _fetch_previous(loc.join(part), out / part)
        source = prepare_base_model(cfg, pairs, out / "base")
        check_training_prompts(cfg, pairs, source)  # truncation must not merge prompts
        t0 = time.perf_counter()
        info = cache_mod.build_cache(cfg, source, pairs, out / "cache")
        seconds = round(time.perf_counter() - t0, 2)
        run.log_metrics({"cache_seconds": seconds})
        self.cache = {"dir": str(out / "cache"), "kind": info["kind"], "rows": info["rows"]}
        self.cache_seconds = seconds
        # Checked here, not only in the workers: Ray Train would retry a worker's error.
        cache_mod.batch_indices(
            int(info["rows"]), 0, world=tcfg.num_workers, rank=0, batch=tcfg.batch_size, seed=0
        )
        return _share_inputs(out, loc, source), None

    def export(self, checkpoint: Path, model_dir: Path) -> None:
        export_model(checkpoint, model_dir)
        # The prompts it was trained on travel with the model (the synthesis service lists them).
        write_prompt_table(model_dir / "prompts.csv", pairs_table(self.pairs), self.cfg.prompts)

    def summary(self, result, run_dir: str) -> dict[str, Any]:
        return {
            "attempts": read_attempts(run_dir),
            "cache": self.cache,
            "cache_seconds": self.cache_seconds,
            "samples_per_s": (result.metrics or {}).get("samples_per_s"),
        }


def pairs_table(pairs: str | Path) -> list:
    """The prompt table of a pairs directory or object prefix (prompt, label, cluster, count)."""
    shards = cache_mod.shards
    cols = ["prompt", "label", "cluster"]
    files = shards.read_manifest(pairs)["files"]
    tables = [shards.read_file(pairs, f, columns=cols) for f in files]
    return table_from_pairs(*(np.concatenate([t[c].to_numpy() for t in tables]) for c in cols))


def prepare_base_model(cfg: Config, pairs: str | Path, out: Path) -> str:
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
    # The warm-up saves itself beside base/ and a rerun of the command continues it.
    state = out.with_name(out.name + "-vae-warmup.pt")
    warmup = {"state": state, "key": key, "on_log": _log_warmup}
    comp = C.build_components(mcfg, prompts, seed=cfg.runtime.seed, images=images, warmup=warmup)
    C.save_pipeline(comp, out, extra={C.BASE_INFO: key})
    state.unlink(missing_ok=True)
    return str(out)


def _log_warmup(step: int, metrics: dict[str, float]) -> None:
    """The VAE warm-up's loss terms, to the log and to the active MLflow run."""
    from meddiff import tracking

    log.info("VAE warm-up step %d: %s", step, {k: round(v, 5) for k, v in metrics.items()})
    run = tracking.active_run()
    if run is not None:
        run.log_metrics(metrics, step=step)


def sample_pair_images(pairs: str | Path, n: int) -> np.ndarray:
    """Up to ``n`` images from the first shard files (for fitting a from-scratch VAE)."""
    from meddiff.data import shards

    manifest = shards.read_manifest(pairs)
    batches, have = [], 0
    for name in manifest["files"]:
        table = shards.read_file(pairs, name, columns=["image", "height", "width", "channels"])
        cols = {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}
        batches.append(shards.decode_batch(cols)["image"])
        have += len(batches[-1])
        if have >= n:
            break
    return np.concatenate(batches)[:n]


def _fetch_previous(uri: str | Path, dst: Path) -> None:
    """Copy what an earlier attempt uploaded to ``uri`` (base model, cache) into ``dst``
    (nothing to do when ``uri`` is ``dst``: a local run keeps them in place)."""
    if str(uri) != str(dst) and storage.is_dir(uri):
        copy_tree(storage.local_input(uri), dst)


def _share_inputs(out: Path, loc: storage.OutputLocation, source: str) -> dict[str, str]:
    """The training cache (and a base model built under ``out``) where the workers read them:
    beside the run at the location, each uploaded with its completion marker when the location
    is an object store (workers on any node fetch them); their paths or URIs."""
    cache = loc.join("cache")
    _upload_changed(out / "cache", cache, cache_mod.INFO)
    if Path(source) == out / "base":
        source = str(loc.join("base"))
        _upload_changed(out / "base", source, C.BASE_INFO)
    return {"source": str(source), "cache": str(cache)}


def _upload_changed(local: Path, uri: str | Path, info: str) -> None:
    """Upload ``local`` to ``uri`` unless it is ``local`` itself, or a complete copy with the
    same ``info`` file (the inputs it was built from) is there already, as after a rerun that
    reused it."""
    if str(local) == str(uri):
        return
    same = storage.is_complete(uri) and storage.is_file(storage.join(uri, info))
    if not (same and storage.read_text(storage.join(uri, info)) == (local / info).read_text()):
        storage.upload_dir(local, str(uri))


def export_model(checkpoint: Path, dst: Path) -> Path:
    """Copy the checkpoint's pipeline (``model/``) to ``dst``, all or nothing."""
    src = checkpoint / "model"
    C.check_model_dir(src)
    copy_tree(src, dst)
    return dst


def read_checkpoint_info(path: str | Path) -> dict[str, Any]:
    """The marker of a complete checkpoint (:func:`meddiff.training.read_marker`)."""
    return training.read_marker(path)


def read_attempts(run_dir: str | Path) -> list[int]:
    """The step each worker-group attempt of the run in ``run_dir`` (``OUT/ray/train``, local or
    a URI) started from (0: from scratch)."""
    path = storage.join(run_dir, ATTEMPTS)
    if not storage.is_file(path):
        return []
    text = storage.read_text(path)
    return [json.loads(line)["start_step"] for line in text.splitlines() if line]


# --- workers ---------------------------------------------------------------------------------


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """The Ray Train worker function (every rank runs it)."""
    return _Worker(config).run()


class _Worker:
    def __init__(self, config: dict[str, Any]):
        self.cfg = Config.model_validate(config["cfg"])
        self.t = self.cfg.synthesis.train
        # URIs (an object-store --out) are fetched once per node into the local cache.
        self.source: str = str(storage.localize(config["source"]))
        self.cache_dir = storage.local_input(config["cache"])
        self.ctx = training.WorkerContext.from_ray(
            use_gpu=self.t.use_gpu,
            run_dir=config["run_dir"],
            seed=self.cfg.runtime.seed,
            tracking=config.get("tracking"),
        )
        self.rank, self.world, self.device = self.ctx.rank, self.ctx.world, self.ctx.device
        self.precision = training.resolve_precision(self.t.precision, self.device.type == "cuda")
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
            # The average lives in fp32 whatever the training precision: updates of
            # (1 - 0.9999)·Δ are far below bf16's resolution and would vanish.
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
        self.strategy = training.make_strategy(
            t,
            self.ctx,
            unet,
            optimizer,
            lr_scheduler,
            micro_batch=t.batch_size,
            grad_clip=t.max_grad_norm,
        )
        if online:
            # The frozen encoders run in bf16 when training does; batches reach the strategy in
            # fp32, which autocasts (DDP) or casts them to the engine's dtype (DeepSpeed).
            enc = torch.bfloat16 if self.precision == "bf16" else torch.float32
            self.batches: Any = _online(
                self, comp.vae.to(enc), comp.text_encoder.to(enc), comp.tokenizer
            )
            self._frozen = comp
        else:
            scale = vae_scaling_factor(self.source, self.cfg.synthesis.model.revision)
            self.batches = _cached(self, scale)

    # loop -----------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        import torch

        from meddiff.synthesis.diffusion import diffusion_loss

        t, ctx = self.t, self.ctx
        self._build()
        start_step = 0
        with training.restored(ctx.run_dir) as d:
            if d is not None:
                start_step = self._load(d)
        if self.rank == 0:
            line = json.dumps({"start_step": start_step, "time": time.time()})
            storage.append_line(storage.join(ctx.run_dir, ATTEMPTS), line)
            ctx.log_metrics({"resumed_from_step": start_step}, step=start_step)
        # Summed on the device: reading the loss every step would stall a GPU on each step.
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        loss_n, t_last, step_last = 0, time.perf_counter(), start_step
        metrics: dict[str, Any] = {}
        for step in range(start_step, t.max_steps):
            ctx.fault_drill(t, step + 1, in_checkpoint=False)
            gen = ctx.generator(step)
            idx = cache_mod.batch_indices(
                len(self.data),
                step,
                world=self.world,
                rank=self.rank,
                batch=t.batch_size,
                seed=self.cfg.runtime.seed,
            )
            latents, emb = self.batches(idx, gen)
            with self.strategy.autocast():
                loss = diffusion_loss(self.strategy.model, self.noise_scheduler, latents, emb, gen)
            self.strategy.step(loss)
            if self.ema is not None:
                self.ema.step(self.strategy.module.parameters())
            loss_sum += loss.detach().double()
            loss_n += 1
            done = step + 1
            is_ckpt = done % t.checkpoint_every == 0 or done == t.max_steps
            if done % t.log_every == 0 or is_ckpt:
                seconds = time.perf_counter() - t_last
                metrics = {
                    "step": done,
                    "loss": ctx.mean(loss_sum / loss_n),
                    "lr": self.strategy.lr(),
                    "samples_per_s": (done - step_last) * t.batch_size * self.world / seconds,
                    "epoch": step * t.batch_size * self.world // len(self.data),
                    "resumed_from_step": start_step,
                }
                loss_sum.zero_()
                loss_n, step_last = 0, done
                ctx.log_metrics({k: metrics[k] for k in ("loss", "lr", "samples_per_s")}, done)
                if is_ckpt:
                    self._save_and_report(done, metrics)
                else:
                    import ray.train

                    ray.train.report(metrics)
            sample_due = done == t.max_steps or (t.sample_every and done % t.sample_every == 0)
            if sample_due and ctx.logger is not None:
                # The other ranks wait in the next step's collective meanwhile.
                self._log_samples(done)
            if step_last == done:
                # samples_per_s times training steps only, not checkpoints or sample grids.
                t_last = time.perf_counter()
        return {"rank": self.rank, "start_step": start_step, **metrics}

    # checkpoints ----------------------------------------------------------------------------

    def _save_and_report(self, step: int, metrics: dict[str, Any]) -> None:
        def write(tmp: Path) -> None:
            if self.rank == 0:
                C.save_pipeline(self._frozen_components(), tmp / "model", unet=self._ema_unet())
            self.strategy.save(tmp, self.rank)

        info = training.marker_info(
            self.t,
            world=self.world,
            precision=self.precision,
            model_config=self.cfg.synthesis.model.model_dump(mode="json"),
        )
        info.update(ema=self.ema is not None, ema_state=self._ema_scalars())
        training.save_and_report(self.ctx, step, metrics, write, info, drill=self.t)

    def _load(self, d: Path) -> int:
        """Restore the training state from a committed checkpoint; returns its step."""
        import torch

        info = read_checkpoint_info(d)
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

            config = self.strategy.module.config
            self._eval_unet = UNet2DConditionModel.from_config(config).to(self.device)
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
        frozen = self._frozen_components()
        if frozen.vae.dtype != torch.float32:  # encoders in bf16 for training: sample in fp32
            frozen = self._frozen = C.load_components(
                self.source,
                revision=self.cfg.synthesis.model.revision,
                parts=("vae", "text_encoder", "tokenizer"),
                device=self.device,
            )
        pipe = C.pipeline(frozen, unet=self._ema_unet())
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
            self.ctx.logger.log_artifact(path, "samples")


def _cached(w: _Worker, scale: float):
    import torch

    from meddiff.synthesis.diffusion import CachedBatches

    return CachedBatches(w.data, scale, w.t.prompt_dropout, w.device, torch.float32)


def _online(w: _Worker, vae, text_encoder, tokenizer):
    import torch

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
        dtype=torch.float32,
    )


def vae_scaling_factor(source: str, revision: str | None = None) -> float:
    """The VAE's latent scaling factor, read from its config (no weights loaded)."""
    from diffusers import AutoencoderKL

    config = AutoencoderKL.load_config(source, subfolder="vae", revision=revision)
    return float(config["scaling_factor"])
