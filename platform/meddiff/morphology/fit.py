"""Pass 2 of a prompts build, on the driver: the morphology model, fitted on pass 1's kept
embeddings (min-max range and K-means, exact in memory or streaming mini-batch, reading only the
embedding column), or a registered model reused with the embedder it was fitted with."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from meddiff.config import Config, PromptsConfig
from meddiff.config.prompts import EmbedConfig
from meddiff.errors import ConfigError
from meddiff.morphology.cluster import MorphologyModel
from meddiff.morphology.columns import iter_column
from meddiff.morphology.layout import EMBEDDER_WEIGHTS, Workspace
from meddiff.morphology.stages import EMBED_SCHEDULING

log = logging.getLogger(__name__)


def morphology_model(
    cfg: Config,
    ws: Workspace,
    kept: int,
    embed_cfg: EmbedConfig,
    reused: MorphologyModel | None,
) -> tuple[MorphologyModel, dict[str, Any]]:
    """The build's model, saved (with its embedder weights, if it has its own) to
    ``ws.model_dir`` so the output is self-contained and can be reused again: ``reused`` as it
    is, or one fitted on pass 1 (:func:`fit_model`). Returns it and its fit statistics."""
    if reused is not None:
        shutil.copytree(reused.info["path"], ws.model_dir, dirs_exist_ok=True)
        return reused, {"mode": "reused", "model": cfg.prompts.cluster.model}
    model, stats = fit_model(cfg.prompts, ws.checked, kept)
    model.info["embedder"] = embed_cfg.model_dump(mode="json")
    model.info["seed"] = cfg.runtime.seed
    model.save(ws.model_dir)
    if embed_cfg.weights is None:
        save_random_weights(embed_cfg, cfg.runtime.seed, ws.model_dir)
    return model, stats


def _row_order(checked: Path) -> np.ndarray:
    """The kept rows' order by (source, index): which rows land in which shard file depends on
    how Ray spread the work over nodes, and K-means (its initialisation) on the rows in another
    order gives other clusters; sorted, one machine and a cluster fit the same model."""
    sources = [b.astype(str) for b in iter_column(checked, "source")]
    indices = list(iter_column(checked, "index"))
    if not sources:
        return np.zeros(0, dtype=np.int64)
    return np.lexsort((np.concatenate(indices), np.concatenate(sources)))


def fit_model(
    pcfg: PromptsConfig, checked: Path, kept: int
) -> tuple[MorphologyModel, dict[str, Any]]:
    """Fit the morphology model on the kept embeddings of pass 1 (the shard folder ``checked``,
    ``kept`` rows without a reject reason); returns it and fit statistics (mode, inertia,
    silhouette, duplicates).

    Raises:
        DataError: ``k`` larger than the number of kept patches.
    """
    from meddiff.morphology import cluster

    ccfg = pcfg.cluster
    cluster.check_k(ccfg, kept)
    first = next(iter_column(checked, "embedding"), None)
    dim = int(first.shape[1]) if first is not None and first.ndim == 2 else 0
    mode = cluster.choose_mode(ccfg, kept, dim)
    log.info("fitting K-means (k=%d, %s) on %d embeddings of dimension %d", ccfg.k, mode, kept, dim)
    fit = _fit_exact if mode == "exact" else _fit_streaming
    model, z, labels, inertia = fit(pcfg, checked, kept, dim)
    sil = cluster.silhouette(z, labels, ccfg.silhouette_sample, ccfg.seed)
    model.info.update({"k": model.k, "n_init": ccfg.n_init, "cluster_seed": ccfg.seed})
    stats = {
        "mode": mode,
        "inertia": round(float(inertia), 4),
        "silhouette": None if sil is None else round(sil, 4),
        **{
            key: model.info[key]
            for key in ("distinct_embeddings", "duplicate_patches", "k_requested")
            if key in model.info
        },
    }
    model.info["silhouette"] = stats["silhouette"]
    return model, stats


def _fit_exact(
    pcfg: PromptsConfig, checked: Path, kept: int, dim: int
) -> tuple[MorphologyModel, np.ndarray, np.ndarray, float]:
    """K-means on every kept embedding in memory; returns the model, a silhouette sample of
    normalised embeddings with their labels, and the inertia."""
    from meddiff.morphology import cluster

    ccfg = pcfg.cluster
    # Filled in place: a list of batches plus their concatenation would hold two copies.
    x = np.empty((kept, dim), dtype=np.float32)
    at = 0
    for batch in iter_column(checked, "embedding"):
        x[at : at + len(batch)] = batch
        at += len(batch)
    x = x[:at][_row_order(checked)]
    model, labels, inertia = cluster.fit_exact(x, ccfg)
    pick = np.sort(np.random.default_rng(ccfg.seed).permutation(at)[: ccfg.silhouette_sample])
    return model, model.normalise(x[pick]), labels[pick], inertia


def _fit_streaming(
    pcfg: PromptsConfig, checked: Path, kept: int, dim: int
) -> tuple[MorphologyModel, np.ndarray, np.ndarray, float]:
    """Mini-batch K-means over the embedding column read again per epoch; returns what
    :func:`_fit_exact` does (the sample is the one the streaming fit keeps)."""
    from meddiff.morphology import cluster

    scale = cluster.MinMax()
    for batch in iter_column(checked, "embedding"):
        scale.update(batch)
    model, z = cluster.fit_streaming(
        lambda: iter_column(checked, "embedding"), pcfg.cluster, scale.count, scale
    )
    inertia = cluster.inertia(model, iter_column(checked, "embedding"))
    model.info["inertia"] = inertia
    return model, z, model.nearest(z), inertia


def load_reused_model(cfg: Config) -> MorphologyModel:
    """The model ``prompts.cluster.model`` names (a folder or registry URI), fetched; its local
    folder is recorded in ``info["path"]``."""
    from meddiff.tracking import fetch_model

    path = fetch_model(cfg.prompts.cluster.model, cfg.tracking)
    model = MorphologyModel.load(path)
    model.info["path"] = str(path)
    return model


def embedder_config(pcfg: PromptsConfig, reused: MorphologyModel | None) -> EmbedConfig:
    """The embedder to run: the config's, or for a reused model the one that model was fitted
    with (its architecture and weights; scheduling still comes from the config).

    Raises:
        ConfigError: the reused model records no embedder, or was fitted on a random-weight
            embedder whose weights it lacks.
    """
    if reused is None:
        return pcfg.embed
    saved = reused.info.get("embedder")
    if not saved:
        raise ConfigError(
            f"morphology model {pcfg.cluster.model} does not record its embedder; refit it"
        )
    scheduling = {k: v for k, v in pcfg.embed.model_dump().items() if k in EMBED_SCHEDULING}
    merged = {**saved, **scheduling}
    if saved.get("weights") is None:
        local = Path(reused.info["path"]) / EMBEDDER_WEIGHTS
        if not local.is_file():
            raise ConfigError(
                f"morphology model {pcfg.cluster.model} was fitted on a random-weight embedder "
                f"but has no {EMBEDDER_WEIGHTS}"
            )
        merged["weights"] = str(local)
    return EmbedConfig.model_validate(merged)


def save_random_weights(cfg: EmbedConfig, seed: int, model_dir: Path) -> None:
    """A random-weight embedder is part of the model: save it so assignment later is exact."""
    from safetensors.torch import save_file

    from meddiff.morphology.embed import build_network

    state = {k: v.contiguous() for k, v in build_network(cfg, seed).state_dict().items()}
    save_file(state, str(model_dir / EMBEDDER_WEIGHTS))
