"""The Ray Data stages of a prompts build, run by workers on any node.

- **Pass 1, check + embed** (:func:`check_and_embed`): the quality filter
  (:class:`~meddiff.morphology.quality.QualityFilter`, tasks fused with the read) flags every
  patch; for the morphology strategy the frozen network
  (:class:`~meddiff.morphology.embed.PatchEmbedder`, an actor pool: one model load per actor, GPUs
  on a cluster) embeds the kept ones.
- **Pass 3, assign prompts** (:func:`write_pairs`): nearest centroid and prompt text per kept
  patch (:class:`AssignPrompts`), written as the ``pairs`` shard set.

Each reads and writes shard folders given as local paths or object-store URIs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from meddiff.config import Config, PromptsConfig
from meddiff.config.prompts import EmbedConfig
from meddiff.errors import ConfigError
from meddiff.morphology.cluster import MorphologyModel
from meddiff.prompts import prompts_for

log = logging.getLogger(__name__)

# The embedder settings that say how it is scheduled, not what it computes: a rerun that changes
# only these resumes pass 1, and a reused model takes them from the config.
EMBED_SCHEDULING = frozenset(
    {"batch_size", "num_gpus", "num_cpus", "threads", "concurrency", "max_concurrency"}
)


# --- pass 1: check + embed ------------------------------------------------------------------


def resolve_embed(cfg: EmbedConfig, embedded_ray: bool) -> EmbedConfig:
    """Fill ``num_gpus``/``concurrency`` left to auto from the cluster: one actor per GPU when
    it has GPUs, else one CPU actor.

    Raises:
        ConfigError: GPUs requested from an embedded local Ray that has none (the actors would
            wait forever; a cluster may still get GPUs from its autoscaler).
    """
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0
    num_gpus = cfg.num_gpus if cfg.num_gpus is not None else (1.0 if gpus else 0.0)
    if num_gpus > 0 and gpus == 0:
        if embedded_ray:
            raise ConfigError(
                f"prompts.embed.num_gpus={num_gpus:g} but this machine's Ray has no GPU; set "
                "prompts.embed.num_gpus=0 (or null) to embed on CPU"
            )
        log.warning("no GPU in the cluster yet; embedding actors wait for the autoscaler")
    concurrency = cfg.concurrency or (max(1, int(gpus // num_gpus)) if num_gpus else 1)
    return cfg.model_copy(update={"num_gpus": num_gpus, "concurrency": concurrency})


def preflight(cfg: EmbedConfig, seed: int) -> None:
    """Fail before any Ray work when the embedder weights cannot be loaded (missing file, no hub);
    for hub weights this also fills the download cache that actors on this node then use."""
    from meddiff.morphology.embed import build_network

    if cfg.weights is None:
        return
    build_network(cfg, seed)


def check_and_embed(
    cfg: Config,
    ds: Any,
    out_dir: str | Path,
    embed_cfg: EmbedConfig | None,
    info: Mapping[str, Any] | None = None,
    run_id: str | None = None,
) -> dict[str, Any]:
    """Pass 1: quality-flag every patch of ``ds`` and (if ``embed_cfg``) embed the kept ones;
    write all rows (with ``reject`` and ``embedding``) as shards under ``out_dir`` (a local
    folder or an object-store URI, written by the workers) for the MLflow run ``run_id``."""
    from ray.data import ActorPoolStrategy

    from meddiff.data.shards import write_shards
    from meddiff.morphology.embed import PatchEmbedder
    from meddiff.morphology.quality import QualityFilter

    pcfg = cfg.prompts
    # On CPU, Ray Data fuses this task-based stage into the embedding actor (same resources), so
    # it runs in the actor's process before each forward pass (~10% of the tiny model's time,
    # <1% of ViT-B/8's). Giving it other resources to keep it apart deadlocks a 2-CPU machine:
    # a back-pressured read task and the actor hold both CPUs and the filter never runs.
    ds = ds.map_batches(
        QualityFilter(pcfg.filter, pcfg.patch_size),
        batch_format="numpy",
        udf_modifying_row_count=False,
    )
    if embed_cfg is not None:
        from meddiff.runtime import ray_address

        ecfg = resolve_embed(embed_cfg, embedded_ray=ray_address(cfg.runtime) is None)
        size = ecfg.concurrency or 1
        pool = ActorPoolStrategy(min_size=size, max_size=max(size, ecfg.max_concurrency or size))
        ds = ds.map_batches(
            PatchEmbedder,
            fn_constructor_kwargs={"cfg": ecfg.model_dump(), "seed": cfg.runtime.seed},
            batch_size=ecfg.batch_size,
            batch_format="numpy",
            compute=pool,
            num_gpus=ecfg.num_gpus or None,
            num_cpus=ecfg.num_cpus,
            udf_modifying_row_count=False,
        )
    return write_shards(
        ds,
        out_dir,
        rows_per_file=cfg.data.shards.rows_per_file,
        info=info,
        overwrite=True,
        run_id=run_id,
    )


# --- pass 3: assign prompts -----------------------------------------------------------------


class AssignPrompts:
    """Ray Data stage (run as tasks): drop rejected rows, add ``cluster`` and ``prompt``, drop
    the pass-1 columns. ``model`` None gives cluster -1 (baseline)."""

    def __init__(self, pcfg: PromptsConfig, model: MorphologyModel | None):
        self.pcfg = pcfg
        self.model = model

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keep = np.asarray([r == "" for r in batch["reject"]], dtype=bool)
        out = {k: np.asarray(v)[keep] for k, v in batch.items() if k not in ("reject", "embedding")}
        n = int(keep.sum())
        if self.model is not None and n:
            out["cluster"] = self.model.assign(np.asarray(batch["embedding"])[keep])
        else:
            out["cluster"] = np.full(n, -1, dtype=np.int64)
        out["prompt"] = prompts_for(out["label"], out["cluster"], self.pcfg)
        return out


def write_pairs(
    cfg: Config,
    checked: str | Path,
    out_dir: str | Path,
    model: MorphologyModel | None,
    run_id: str | None = None,
) -> dict[str, Any]:
    """Pass 3: the kept rows of pass 1's shards ``checked`` with their cluster and prompt, as
    the pairs shard set ``out_dir`` (each a local folder or an object-store URI, read and
    written by the workers) for the MLflow run ``run_id``; returns its manifest."""
    from meddiff.data.shards import read_shards, write_shards

    ds = read_shards(checked).map_batches(
        AssignPrompts(cfg.prompts, model), batch_format="numpy", zero_copy_batch=True
    )
    info = {"strategy": cfg.prompts.strategy, "stage": "prompts"}
    return write_shards(
        ds,
        out_dir,
        rows_per_file=cfg.data.shards.rows_per_file,
        info=info,
        overwrite=True,
        run_id=run_id,
    )
