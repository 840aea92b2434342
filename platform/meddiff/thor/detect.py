"""Anomaly detection over folders of PNG images, at scale with Ray Data.

``ThorStage`` is the Ray Data stage: its ``__init__`` loads the model (directory or registry URI)
and the LPIPS module once per actor; ``__call__`` reads a batch of PNGs (and masks), runs the
inferer on the whole batch and returns maps, reconstructions and scores. ``detect_folder`` writes
one map PNG per image and a CSV of image scores; ``run_folder`` returns everything in memory for
evaluation.

Each image's noise is seeded from its file name (and ``runtime.seed``), so an image gets the same
map whatever batch or worker it lands in.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from meddiff import storage
from meddiff.config import Config
from meddiff.data.images import (
    check_headers,
    intensity_summary,
    list_pngs,
    mask_paths,
    read_mask,
    read_png,
    write_png,
)
from meddiff.errors import ConfigError
from meddiff.thor.reference import check_images

log = logging.getLogger(__name__)


def image_seed(name: str, base: int) -> int:
    return (zlib.crc32(name.encode()) ^ (base * 0x9E3779B1)) & 0x7FFFFFFF


class ThorStage:
    """Ray Data stage: ``{"path", ["mask_path"]}`` batches (or in-memory ``{"name", "image",
    ["mask"]}`` slices) → maps, reconstructions and scores.

    Output columns: ``name``, ``score`` float, ``anomaly_map`` and ``reconstruction`` float32
    (n, H, W), ``image`` float32 (n, H, W), ``precision`` (the networks' autocast: fp32 or bf16)
    and, with masks, ``mask`` bool (n, H, W).
    """

    def __init__(self, model_ref: str, cfg: dict[str, Any]):
        import torch

        from meddiff.thor.inferer import ThorInferer
        from meddiff.thor.model import resolve_model

        # Workers print no artifact-download progress bars into the job log.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        self.cfg = Config.model_validate(cfg)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = resolve_model(model_ref, self.cfg.tracking, device)
        if device == "cpu":
            # mkldnn convolutions are markedly faster on channels-last tensors on CPU.
            self.model.unet.to(memory_format=torch.channels_last)
        self.inferer = ThorInferer.from_config(
            self.model.schedule, self.cfg.thor.infer, self.cfg.thor.simplex
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        size = self.model.image_size
        if "image" in batch:  # slices cut from a volume (meddiff.thor.volumes), already in [0, 1]
            images = np.stack(list(batch["image"])).astype(np.float32)
            names = [str(n) for n in batch["name"]]
        else:
            paths = [str(p) for p in batch["path"]]
            images = np.stack([read_png(p, size, self.cfg.data.images) for p in paths])
            names = [Path(p).name for p in paths]
        seeds = [image_seed(n, self.cfg.runtime.seed) for n in names]
        det = self.inferer(
            self.model.unet,
            torch.from_numpy(images)[:, None],
            seeds=seeds,
            image_shape=self.model.image_shape,
            device=self.model.device,
        )
        out = {
            "name": np.array(names, dtype=object),
            "score": det.score.numpy().astype(np.float64),
            "anomaly_map": det.anomaly_map[:, 0].numpy(),
            "reconstruction": det.reconstruction[:, 0].numpy(),
            "image": images,
            "precision": np.array([det.precision] * len(names), dtype=object),
        }
        if "mask" in batch:
            out["mask"] = np.stack(list(batch["mask"])).astype(bool)
        elif "mask_path" in batch:
            out["mask"] = np.stack(
                [read_mask(m, img.shape) for m, img in zip(batch["mask_path"], images, strict=True)]
            )
        return out


@dataclass
class FolderResult:
    """Detection results for a folder, in file-name order."""

    names: list[str]
    scores: np.ndarray  # (N,)
    maps: np.ndarray  # float32 (N, H, W)
    reconstructions: np.ndarray  # float32 (N, H, W)
    images: np.ndarray  # float32 (N, H, W)
    masks: np.ndarray | None  # bool (N, H, W)
    plan: dict[str, Any]
    seconds: float
    # Per image: why it looks unlike the model's training data ("" when it does not).
    unlike: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return len(self.names) / max(self.seconds, 1e-9)


def plan_for(cfg: Config, model_ref: str) -> dict[str, Any]:
    """The inferer's plan (method, T, steps, map kind) without running it; validates the config
    against the model's schedule (T, harmonization steps) before any work starts."""
    from meddiff.thor.inferer import ThorInferer
    from meddiff.thor.model import read_model_config
    from meddiff.thor.perceptual import map_kind, min_image_size
    from meddiff.thor.schedule import DDPMSchedule
    from meddiff.tracking import fetch_model

    unet_cfg, schedule_cfg, info = read_model_config(fetch_model(model_ref, cfg.tracking))
    inferer = ThorInferer(DDPMSchedule(schedule_cfg), cfg.thor.infer, cfg.thor.simplex)
    trained_below = info.get("max_timestep")
    if trained_below is not None and inferer.level >= trained_below:
        raise ConfigError(
            f"thor.infer.noise_level T={inferer.level}: the model {model_ref} was trained on "
            f"timesteps below {trained_below} only (thor.train.max_timestep); use T < {trained_below}"
        )
    trained = info.get("intensity")
    if trained is not None and trained != cfg.data.images.reading():
        setting = " ".join(
            f"--set data.images.{k}={'null' if v is None else v}" for k, v in trained.items()
        )
        raise ConfigError(
            f"data.images: the model {model_ref} was trained on images read with {trained}, "
            f"this run reads them with {cfg.data.images.reading()}; detection must read images "
            f"as training did: {setting}"
        )
    plan = {**inferer.describe(), "image_size": unet_cfg.image_size}
    smallest = min_image_size(cfg.thor.infer.lpips)
    if cfg.thor.infer.method == "thor" and unet_cfg.image_size < smallest:
        raise ConfigError(
            f"thor.infer.lpips={cfg.thor.infer.lpips} needs images of at least {smallest}x"
            f"{smallest} pixels; the model {model_ref} takes {unet_cfg.image_size}x"
            f"{unet_cfg.image_size} (set thor.infer.lpips=off for residual-only maps)"
        )
    if cfg.thor.infer.method == "thor":
        plan["map_kind"] = map_kind(cfg.thor.infer.lpips)
        plan["residual_only"] = cfg.thor.infer.lpips == "off"
    return plan


def driver_model(cfg: Config, model_ref: str) -> str:
    """``model_ref`` as the Ray workers should get it: a model folder or object-store prefix is
    fetched here, where the storage settings and credentials are (as `synth generate` fetches a
    registry model), and the workers get the local copy; a registry URI stays as it is."""
    if str(model_ref).startswith(("models:/", "runs:/")):
        return str(model_ref)
    from meddiff.tracking import fetch_model

    return str(fetch_model(model_ref, cfg.tracking))


def run_folder(
    cfg: Config, model_ref: str, images_dir: str | Path, masks_dir: str | Path | None = None
) -> FolderResult:
    """Run detection on every PNG of ``images_dir`` through Ray Data; results in memory."""
    files = list_pngs(images_dir)
    masks = mask_paths(files, masks_dir) if masks_dir is not None else None
    model_ref = driver_model(cfg, model_ref)
    plan = plan_for(cfg, model_ref)
    check_headers(files, plan["image_size"], masks)
    plan["intensity"] = intensity_summary(files, cfg.data.images)
    items = [{"path": str(f)} for f in files]
    if masks is not None:
        for item, m in zip(items, masks, strict=True):
            item["mask_path"] = str(m)
    merged, seconds = infer_items(cfg, str(model_ref), items)
    plan["precision"] = used_precision(merged)
    order = np.argsort(merged["name"].astype(str), kind="stable")
    names = [str(n) for n in merged["name"][order]]
    images = merged["image"][order]
    unlike, plan["data_check"] = check_images(model_reference(cfg, model_ref), images, names)
    return FolderResult(
        names=names,
        scores=merged["score"][order],
        maps=merged["anomaly_map"][order],
        reconstructions=merged["reconstruction"][order],
        images=images,
        masks=merged["mask"][order] if "mask" in merged else None,
        plan=plan,
        seconds=seconds,
        unlike=unlike,
    )


def infer_items(
    cfg: Config, model_ref: str, items: list[dict[str, Any]]
) -> tuple[dict[str, np.ndarray], float]:
    """Run :class:`ThorStage` over ``items`` (rows of PNG paths or in-memory slices) on Ray Data;
    returns its output columns, concatenated in no particular order, and the seconds taken."""
    import ray
    import ray.data

    from meddiff import runtime

    runtime.connect(cfg.runtime)
    ic = cfg.thor.infer
    # Asked of the cluster, not the driver: on a cluster the head has no GPU, the workers do.
    gpus = ic.num_gpus
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    start = time.perf_counter()
    # One block per batch, so several actors (thor.infer.concurrency) share the work; Ray Data
    # would put a few dozen small rows in one block.
    blocks = -(-len(items) // ic.batch_size)
    ds = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        ThorStage,
        fn_constructor_args=(str(model_ref), cfg.model_dump(mode="json")),
        batch_size=ic.batch_size,
        compute=ray.data.ActorPoolStrategy(size=ic.concurrency),
        num_gpus=gpus,
    )
    # A batch of the full schedule on a CPU (hundreds of UNet passes per image) can outlast Ray
    # Data's no-progress window (30 min) without anything being wrong; it would kill the run.
    ds.context.execution_no_progress_timeout_s = -1
    rows: dict[str, list] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k, v in batch.items():
            rows.setdefault(k, []).append(v)
    seconds = time.perf_counter() - start
    return {k: np.concatenate(v) for k, v in rows.items()}, seconds


def used_precision(merged: dict[str, np.ndarray]) -> str:
    """The precision the inference actors reported (``meddiff.precision``): ``fp32``, ``bf16``, or
    both comma-separated when actors on different CPUs chose differently."""
    return ", ".join(sorted({str(p) for p in merged["precision"]}))


def model_reference(cfg: Config, model_ref: str) -> dict[str, Any] | None:
    """The training-image statistics a model recorded (``info.reference``), or None."""
    from meddiff.thor.model import read_model_config
    from meddiff.tracking import fetch_model

    return read_model_config(fetch_model(model_ref, cfg.tracking))[2].get("reference")


def detect_folder(
    cfg: Config,
    model_ref: str,
    images_dir: str | Path,
    out_dir: str | Path | storage.OutputLocation,
) -> dict[str, Any]:
    """Write ``OUT/maps/<name>.png`` (16-bit, value = anomaly map in [0, 1)),
    ``OUT/reconstructions/<name>.png``, ``OUT/scores.csv`` and ``OUT/detect.json``.

    ``out_dir`` is the command's :class:`~meddiff.storage.OutputLocation` (or a path, opened
    here). The folder is assembled under a temporary name and put in place when complete.
    """
    with storage.OutputLocation.use(out_dir) as loc:
        return _detect_folder(cfg, model_ref, images_dir, loc)


def _detect_folder(
    cfg: Config, model_ref: str, images_dir: str | Path, loc: storage.OutputLocation
) -> dict[str, Any]:
    from meddiff import tracking

    out = loc.staging
    with tracking.start_run(cfg, "thor-detect") as run:  # nested under an active run
        result = run_folder(cfg, model_ref, images_dir)
        plan = result.plan
        tmp = out.with_name(out.name + f".partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "maps").mkdir(parents=True)
        for name, amap, rec in zip(result.names, result.maps, result.reconstructions, strict=True):
            write_png(tmp / "maps" / name, amap, bits=16)
            write_png(tmp / "reconstructions" / name, rec, bits=16)
        with open(tmp / "scores.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["name", "score", "method", "map_kind", "unlike_training"])
            for name, score, unlike in zip(result.names, result.scores, result.unlike, strict=True):
                writer.writerow([name, f"{score:.6g}", plan["method"], plan["map_kind"], unlike])
        summary = {
            "images": len(result.names),
            "model": str(model_ref),
            "input": str(images_dir),
            "seconds": round(result.seconds, 2),
            "images_per_s": round(result.images_per_s, 4),
            **plan,
            "outputs": {
                "maps": "maps/<name>.png, 16-bit grayscale, value/65535 = anomaly map",
                "reconstructions": "reconstructions/<name>.png, pseudo-healthy image",
                "scores": "scores.csv: name, score (mean of the map), method, map_kind, "
                "unlike_training (why the image looks unlike the model's training data; empty "
                "when it does not)",
            },
        }
        (tmp / "detect.json").write_text(json.dumps(summary, indent=2))
        loc.install(tmp)
        run.set_tags({"thor.map_kind": plan["map_kind"], "thor.method": plan["method"]})
        run.log_metrics(
            {
                "images": len(result.names),
                "images_per_s": result.images_per_s,
                "unlike_training": sum(bool(u) for u in result.unlike),
            }
        )
        run.log_artifact(str(out / "scores.csv"))
        run.log_dict(summary, "detect.json")
    return summary
