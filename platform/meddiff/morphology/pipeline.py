"""``build_prompts``: labelled patches → (image, prompt) pairs, with Ray Data and MLflow.

Passes over the data (each streamed, memory bounded by block size, not by dataset size):

1. **check + embed** (Ray Data): read the source, flag outliers (:class:`QualityFilter`, run as
   tasks fused with the read) and, for the morphology strategy, embed the kept patches with the
   frozen network (:class:`PatchEmbedder`, an actor pool: one model load per actor, GPUs on a
   cluster). Every row is written to ``<out>.partial/_work/checked`` with its ``reject`` reason and
   embedding. This is the expensive pass and the checkpoint: a rerun with the same source and
   settings resumes after it.
2. **fit** (driver): the min-max range and K-means, exact in memory or streaming mini-batch,
   reading only the embedding column.
3. **assign + write** (Ray Data): nearest centroid and prompt text per kept patch, written as the
   ``pairs`` shard directory.

Everything is built under ``<out>.partial`` and renamed to ``<out>`` at the end, so a directory
named ``out`` is always complete. For an object-store output location the stages Ray workers
write (1 and 3) go straight under the URI from whichever node runs them and are downloaded into
``<out>.partial`` for the driver's passes, so no node needs a shared filesystem.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from meddiff import storage
from meddiff.config import Config, PromptsConfig
from meddiff.config.prompts import EmbedConfig
from meddiff.data.shards import MANIFEST
from meddiff.errors import ConfigError, DataError
from meddiff.morphology.cluster import MorphologyModel
from meddiff.morphology.embed import describe, embed_precision
from meddiff.prompts import (
    check_table_tokens,
    prompt_table,
    prompts_for,
    read_prompt_table,
    write_prompt_table,
)

log = logging.getLogger(__name__)

WORK = "_work"
CHECKED = "checked"
PAIRS = "pairs"
MODEL_DIR = "morphology_model"
PROMPTS_CSV = "prompts.csv"
SUMMARY = "summary.json"
EMBEDDER_WEIGHTS = "embedder.safetensors"


# --- the job --------------------------------------------------------------------------------


def build_prompts(
    cfg: Config,
    source: str | Path,
    out: str | Path | storage.OutputLocation,
    *,
    overwrite: bool = False,
    split: str = "train",
    limit: int | None = None,
) -> dict[str, Any]:
    """Build (image, prompt) pairs from ``source`` into ``out``; returns a JSON-able summary.

    ``source`` is a PCam directory (its ``split``), a shard directory (e.g. whole-slide tiles), a
    slide or a directory of slides. ``cfg.prompts.strategy`` picks baseline (label only, cluster
    -1) or morphology prompts. Writes ``out/pairs`` (shards: image, label, cluster, prompt,
    provenance), ``out/prompts.csv``, ``out/morphology_model`` (morphology only),
    ``out/gallery.html`` with ``out/gallery/`` and ``out/summary.json``; logs them to MLflow.

    ``out`` is the command's :class:`~meddiff.storage.OutputLocation` (or a path, opened here).
    For an object-store location the Ray workers write their shard stages straight under it
    (``<out>/_work/checked``, ``<out>/pairs``) from any node, and the driver downloads them into
    the staging folder's partial folder, so on several nodes no shared filesystem is needed; the
    location's upload then replaces the workers' files with the final layout. A failed build
    removes what its workers wrote there; it never resumes from an earlier run.

    Raises:
        DataError: bad source, wrong patch size, nothing left after filtering, k larger than the
            number of patches, or ``out`` exists without ``overwrite``.
        ModelError: embedder weights missing or unloadable; a reused morphology model is invalid.
    """
    with storage.OutputLocation.use(out, overwrite=overwrite) as loc:
        loc.clear()  # room for the workers' shards: the earlier output (refused w/o overwrite)
        try:
            return _build_prompts(cfg, source, loc, split=split, limit=limit)
        except BaseException as err:
            loc.discard()
            if not isinstance(err, Exception):
                raise
            # Ray re-raises errors of Ray Data stages wrapped (RayTaskError(UserCodeException));
            # callers of the library get the DataError/ModelError itself, as the CLI prints it.
            from meddiff.cli import find_user_error

            user_error = find_user_error(err)
            if user_error is None or user_error is err:
                raise
            raise user_error.with_traceback(None) from None


def _build_prompts(
    cfg: Config,
    source: str | Path,
    loc: storage.OutputLocation,
    *,
    split: str,
    limit: int | None,
) -> dict[str, Any]:
    import mlflow

    from meddiff import runtime, tracking

    out = loc.staging
    pcfg = cfg.prompts
    morphology = pcfg.strategy == "morphology"
    partial = out.with_name(out.name + ".partial")
    checked = partial / WORK / CHECKED
    # Where Ray workers write pass 1 and the pairs: the partial folder (local, or on a shared
    # filesystem), or under the object-store prefix, which every node reaches.
    workers = loc.shared(partial)
    worker_checked = storage.join(workers, WORK, CHECKED)
    worker_pairs = storage.join(workers, PAIRS)
    where = loc.uri  # what the run and summary name: not the upload's staging folder
    seconds: dict[str, float] = {}

    runtime.connect(cfg.runtime)
    with tracking.start_run(cfg, "prompts", tags={"meddiff.strategy": pcfg.strategy}):
        mlflow.log_params({"input": str(source), "split": split, "out": where, "limit": limit})
        tracking.log_input(source, context="input")
        reused = _load_reused_model(cfg) if morphology and pcfg.cluster.model else None
        embed_cfg = _embedder_config(pcfg, reused)
        if morphology:  # which network made the features (a reused model brings its own)
            mlflow.log_param("embedder", describe(embed_cfg))
        key = fingerprint(cfg, source, split, limit, embed_cfg if morphology else None)

        start = time.perf_counter()
        resumed = _checkpoint_matches(checked, key)
        if resumed:
            log.info("resuming from %s (embedding pass already complete)", checked)
            rows_in = _read_manifest(checked)["rows"]
        else:
            shutil.rmtree(partial, ignore_errors=True)
            if morphology:
                preflight(embed_cfg, cfg.runtime.seed)
            from meddiff.data.datasets import patch_dataset

            ds = patch_dataset(source, cfg.data, split=split, limit=limit)
            manifest = check_and_embed(
                cfg,
                ds,
                worker_checked,
                embed_cfg if morphology else None,
                info={"fingerprint": key},
            )
            storage.fetch(worker_checked, checked, marker=MANIFEST)
            rows_in = manifest["rows"]
        seconds["embed"] = time.perf_counter() - start

        reasons = reject_counts(checked)
        kept = reasons.pop("", 0)
        removed = sum(reasons.values())
        log.info("quality filter: kept %d of %d patches; removed %s", kept, rows_in, reasons)
        if kept == 0:
            raise DataError(
                f"no patches left after the quality filter in {source}: all {rows_in} removed "
                f"({_fmt_counts(reasons)}); check the input or relax prompts.filter"
            )

        start = time.perf_counter()
        model, fit_info = None, {}
        if morphology:
            if reused is not None:
                model = reused
                fit_info = {"mode": "reused", "model": pcfg.cluster.model}
                # A copy of the model (with its embedder weights, if it has its own) keeps OUT
                # self-contained: it can be reused again.
                shutil.copytree(reused.info["path"], partial / MODEL_DIR, dirs_exist_ok=True)
            else:
                model, fit_info = fit_model(pcfg, checked, kept)
                model.info["embedder"] = embed_cfg.model_dump(mode="json")
                model.info["seed"] = cfg.runtime.seed
                model.save(partial / MODEL_DIR)
                if embed_cfg.weights is None:
                    _save_random_weights(embed_cfg, cfg.runtime.seed, partial / MODEL_DIR)
        seconds["cluster"] = time.perf_counter() - start

        start = time.perf_counter()
        pairs_manifest = write_pairs(cfg, worker_checked, worker_pairs, model)
        storage.fetch(worker_pairs, partial / PAIRS, marker=MANIFEST)
        labels, clusters = _columns(partial / PAIRS, ["label", "cluster"])
        table = prompt_table(labels, clusters, pcfg)
        # Before anything is named complete: a template too long for the text encoder fails here.
        tokens = check_table_tokens(
            cfg, [r.prompt for r in table], str(storage.join(where, PROMPTS_CSV))
        )
        write_prompt_table(partial / PROMPTS_CSV, table, pcfg)
        sizes = cluster_sizes(labels, clusters)
        seconds["write"] = time.perf_counter() - start

        summary: dict[str, Any] = {
            "strategy": pcfg.strategy,
            "source": str(source),
            "split": split,
            "out": where,
            "resumed": resumed,
            "rows_in": int(rows_in),
            "kept": int(kept),
            "removed": {"total": int(removed), "by_reason": reasons},
            "prompts": len(table),
            "tokens": tokens,
            "cluster_sizes": sizes,
            "pairs": {"rows": pairs_manifest["rows"], "files": len(pairs_manifest["files"])},
            "seconds": {k: round(v, 2) for k, v in seconds.items()},
        }
        if morphology:
            summary.update(
                {
                    "k": model.k,
                    "embedding_dim": model.dim,
                    "embedder": describe(embed_cfg),
                    "embedder_precision": _embedder_precision(cfg, embed_cfg),
                    **fit_info,
                }
            )
        start = time.perf_counter()
        gallery_page = make_gallery(cfg, partial, checked, summary)
        summary["seconds"]["gallery"] = round(time.perf_counter() - start, 2)
        if not resumed:  # a resumed run did not read the input: no rate to report
            summary["patches_per_s"] = round(rows_in / max(seconds["embed"], 1e-9), 2)

        shutil.rmtree(partial / WORK)
        (partial / SUMMARY).write_text(json.dumps(summary, indent=2))
        loc.install(partial)

        _log_run(cfg, out, summary, gallery_page.name, morphology and reused is None)
    log.info("wrote %d pairs with %d prompts to %s", kept, len(table), out)
    return summary


# --- pass 1: check + embed ------------------------------------------------------------------


def _embedder_precision(cfg: Config, embed_cfg: EmbedConfig) -> str:
    """The autocast the embedding actors ran (fp32/bf16/fp16; meddiff.precision)."""
    from meddiff.runtime import ray_address

    ecfg = resolve_embed(embed_cfg, embedded_ray=ray_address(cfg.runtime) is None)
    return embed_precision(embed_cfg, "cuda" if ecfg.num_gpus else "cpu")


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
) -> dict[str, Any]:
    """Pass 1: quality-flag every patch of ``ds`` and (if ``embed_cfg``) embed the kept ones;
    write all rows (with ``reject`` and ``embedding``) as shards under ``out_dir`` (a local
    folder or an object-store URI, written by the workers)."""
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
        ds, out_dir, rows_per_file=cfg.data.shards.rows_per_file, info=info, overwrite=True
    )


def fingerprint(
    cfg: Config, source: str | Path, split: str, limit: int | None, embed: EmbedConfig | None
) -> str:
    """What pass 1's output depends on: the source (and its files' sizes and times), the data
    and filter settings, and the embedder (not its scheduling: batch size, GPUs, actors)."""
    scheduling = {"batch_size", "num_gpus", "num_cpus", "threads", "concurrency", "max_concurrency"}
    parts = {
        "source": str(storage.resolve(source)),
        "stamp": storage.stamp(source),
        "split": split,
        "limit": limit,
        "data": cfg.data.model_dump(mode="json"),
        "patch_size": cfg.prompts.patch_size,
        "filter": cfg.prompts.filter.model_dump(mode="json"),
        "embed": embed.model_dump(mode="json", exclude=scheduling) if embed else None,
        "seed": cfg.runtime.seed if embed is not None and embed.weights is None else None,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _checkpoint_matches(checked: Path, key: str) -> bool:
    from meddiff.data.shards import is_shard_dir

    return is_shard_dir(checked) and _read_manifest(checked).get("fingerprint") == key


def _read_manifest(path: Path) -> dict[str, Any]:
    from meddiff.data.shards import read_manifest

    return read_manifest(path)


# --- pass 2: fit ----------------------------------------------------------------------------


def iter_column(
    shard_dir: Path, column: str, *, kept_only: bool = True, rows_per_batch: int = 8192
) -> Iterator[np.ndarray]:
    """Batches of one column of a shard directory, in file order (deterministic), on the driver.

    Embeddings come back as float32 (b, D); with ``kept_only`` rows with a ``reject`` reason are
    dropped. Only the requested columns are read (no images).
    """
    import pyarrow.parquet as pq
    import ray.data  # noqa: F401  (registers Ray's tensor column type with pyarrow before reading)

    manifest = _read_manifest(shard_dir)
    want = [column, "reject"] if kept_only and column != "reject" else [column]
    for name in manifest["files"]:
        pf = pq.ParquetFile(shard_dir / name)
        for batch in pf.iter_batches(batch_size=rows_per_batch, columns=want):
            values = _to_numpy(batch.column(0))
            if kept_only and column != "reject":
                keep = np.asarray(batch.column(1).to_pylist(), dtype=object) == ""
                values = values[keep]
            yield values


def _to_numpy(array: Any) -> np.ndarray:
    """A pyarrow column as numpy; Ray's tensor columns (embeddings) become (n, ...) arrays."""
    import pyarrow as pa

    if isinstance(array.type, pa.ExtensionType):
        return np.asarray(array.to_numpy())
    return array.to_numpy(zero_copy_only=False)


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
    """Fit the morphology model on the kept embeddings of pass 1; returns it and fit statistics."""
    from meddiff.morphology import cluster

    ccfg = pcfg.cluster
    cluster.check_k(ccfg, kept)
    first = next(iter_column(checked, "embedding"), None)
    dim = int(first.shape[1]) if first is not None and first.ndim == 2 else 0
    mode = cluster.choose_mode(ccfg, kept, dim)
    log.info("fitting K-means (k=%d, %s) on %d embeddings of dimension %d", ccfg.k, mode, kept, dim)
    if mode == "exact":
        # Filled in place: a list of batches plus their concatenation would hold two copies.
        x = np.empty((kept, dim), dtype=np.float32)
        at = 0
        for batch in iter_column(checked, "embedding"):
            x[at : at + len(batch)] = batch
            at += len(batch)
        x = x[:at][_row_order(checked)]
        model, labels, inertia = cluster.fit_exact(x, ccfg)
        pick = np.random.default_rng(ccfg.seed).permutation(at)[: ccfg.silhouette_sample]
        z, labels = model.normalise(x[np.sort(pick)]), labels[np.sort(pick)]
        del x
    else:
        scale = cluster.MinMax()
        for batch in iter_column(checked, "embedding"):
            scale.update(batch)
        model, z = cluster.fit_streaming(
            lambda: iter_column(checked, "embedding"), ccfg, scale.count, scale
        )
        inertia = cluster.inertia(model, iter_column(checked, "embedding"))
        model.info["inertia"] = inertia
        labels = model.nearest(z)
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


def _load_reused_model(cfg: Config) -> MorphologyModel:
    from meddiff.tracking import fetch_model

    path = fetch_model(cfg.prompts.cluster.model, cfg.tracking)
    model = MorphologyModel.load(path)
    model.info["path"] = str(path)
    return model


def _embedder_config(pcfg: PromptsConfig, reused: MorphologyModel | None) -> EmbedConfig:
    """The embedder to run: the config's, or for a reused model the one that model was fitted
    with (its architecture and weights; scheduling still comes from the config)."""
    if reused is None:
        return pcfg.embed
    saved = reused.info.get("embedder")
    if not saved:
        raise ConfigError(
            f"morphology model {pcfg.cluster.model} does not record its embedder; refit it"
        )
    keep = {"batch_size", "num_gpus", "num_cpus", "threads", "concurrency", "max_concurrency"}
    merged = {**saved, **{k: v for k, v in pcfg.embed.model_dump().items() if k in keep}}
    weights = saved.get("weights")
    if weights is None:
        local = Path(reused.info["path"]) / EMBEDDER_WEIGHTS
        if not local.is_file():
            raise ConfigError(
                f"morphology model {pcfg.cluster.model} was fitted on a random-weight embedder "
                f"but has no {EMBEDDER_WEIGHTS}"
            )
        merged["weights"] = str(local)
    return EmbedConfig.model_validate(merged)


def _save_random_weights(cfg: EmbedConfig, seed: int, model_dir: Path) -> None:
    """A random-weight embedder is part of the model: save it so assignment later is exact."""
    from safetensors.torch import save_file

    from meddiff.morphology.embed import build_network

    state = {k: v.contiguous() for k, v in build_network(cfg, seed).state_dict().items()}
    save_file(state, str(model_dir / EMBEDDER_WEIGHTS))


# --- pass 3: assign + write -----------------------------------------------------------------


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
    cfg: Config, checked: str | Path, out_dir: str | Path, model: MorphologyModel | None
) -> dict[str, Any]:
    """Pass 3: the kept rows of pass 1's shards ``checked`` with their cluster and prompt, as
    the pairs shard set ``out_dir`` (each a local folder or an object-store URI, read and
    written by the workers); returns its manifest."""
    from meddiff.data.shards import read_shards, write_shards

    ds = read_shards(checked).map_batches(
        AssignPrompts(cfg.prompts, model), batch_format="numpy", zero_copy_batch=True
    )
    info = {"strategy": cfg.prompts.strategy, "stage": "prompts"}
    return write_shards(
        ds, out_dir, rows_per_file=cfg.data.shards.rows_per_file, info=info, overwrite=True
    )


# --- reports --------------------------------------------------------------------------------


def reject_counts(checked: Path) -> dict[str, int]:
    """Rows per ``reject`` value of a pass-1 directory ("" = kept)."""
    counts: dict[str, int] = {}
    for batch in iter_column(checked, "reject", kept_only=False):
        values, n = np.unique(batch.astype(str), return_counts=True)
        for v, c in zip(values.tolist(), n.tolist(), strict=True):
            counts[v] = counts.get(v, 0) + c
    return counts


def _columns(shard_dir: Path, names: list[str]) -> list[np.ndarray]:
    out = []
    for name in names:
        parts = list(iter_column(shard_dir, name, kept_only=False))
        out.append(np.concatenate(parts) if parts else np.empty(0, np.int64))
    return out


def cluster_sizes(labels: np.ndarray, clusters: np.ndarray) -> dict[str, dict[str, int]]:
    """{cluster: {label: count, "total": count}} (JSON keys are strings)."""
    sizes: dict[str, dict[str, int]] = {}
    pairs, counts = np.unique(np.stack([clusters, labels], 1), axis=0, return_counts=True)
    for (c, lab), n in zip(pairs.tolist(), counts.tolist(), strict=True):
        cell = sizes.setdefault(str(c), {"total": 0})
        cell[str(lab)] = n
        cell["total"] += n
    return sizes


def sample_images(
    shard_dir: Path, key_columns: list[str], per_key: int, seed: int
) -> dict[tuple, np.ndarray]:
    """Up to ``per_key`` random images uint8 (m, H, W, C) per distinct value of ``key_columns``,
    reading only the row groups that hold a chosen row."""
    import pyarrow.parquet as pq

    from meddiff.data.shards import decode_batch

    manifest = _read_manifest(shard_dir)
    keys = (
        np.stack(
            [
                np.asarray(np.concatenate(list(iter_column(shard_dir, c, kept_only=False))))
                for c in key_columns
            ],
            axis=1,
        )
        if manifest["rows"]
        else np.empty((0, len(key_columns)))
    )
    rng = np.random.default_rng(seed)
    chosen: dict[tuple, np.ndarray] = {}
    for key in {tuple(k) for k in keys.tolist()}:
        rows = np.flatnonzero((keys == np.asarray(key, dtype=keys.dtype)).all(axis=1))
        chosen[key] = np.sort(rng.choice(rows, size=min(per_key, len(rows)), replace=False))
    wanted = np.sort(np.concatenate(list(chosen.values()))) if chosen else np.empty(0, int)
    images: dict[int, np.ndarray] = {}
    offset = 0
    cols = ["image", "height", "width", "channels"]
    for name in manifest["files"]:
        pf = pq.ParquetFile(shard_dir / name)
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            inside = wanted[(wanted >= offset) & (wanted < offset + n)]
            if inside.size:
                table = pf.read_row_group(g, columns=cols)
                batch = decode_batch({c: table[c].to_numpy(zero_copy_only=False) for c in cols})
                for row in inside:
                    images[int(row)] = batch["image"][row - offset]
            offset += n
    return {key: np.stack([images[int(r)] for r in rows]) for key, rows in chosen.items()}


def make_gallery(cfg: Config, partial: Path, checked: Path, summary: Mapping[str, Any]) -> Path:
    from meddiff.morphology.gallery import write_gallery
    from meddiff.prompts import label_word
    from meddiff.reports import provenance

    pcfg = cfg.prompts
    g = pcfg.gallery
    cells = sample_images(partial / PAIRS, ["cluster", "label"], g.examples, g.seed)
    cells = {(int(c), int(lab)): v for (c, lab), v in cells.items()}
    counts: dict[tuple[int, int], int] = {}
    for c, per_label in summary["cluster_sizes"].items():
        for lab, n in per_label.items():
            if lab != "total":
                counts[(int(c), int(lab))] = n
    labels = sorted({lab for _, lab in counts})
    prompts = {
        (r.cluster, r.label): r.prompt for r in read_prompt_table(partial / PROMPTS_CSV, pcfg)
    }
    rejected = {}
    if summary["removed"]["total"]:
        picked = sample_images(checked, ["reject"], g.examples, g.seed)
        rejected = {str(k[0]): v for k, v in picked.items() if k[0] != ""}
    stats = {
        "source": summary["source"],
        "strategy": summary["strategy"],
        "patches in": summary["rows_in"],
        "kept": summary["kept"],
        "removed": summary["removed"]["total"],
        "distinct prompts": summary["prompts"],
    }
    for key in ("k", "mode", "silhouette", "embedder"):
        if key in summary:
            stats[key] = summary[key]
    return write_gallery(
        partial,
        title=f"Morphology types ({summary['strategy']} prompts)",
        stats=stats,
        label_names={lab: label_word(lab, pcfg) for lab in labels},
        cells=cells,
        counts=counts,
        prompts=prompts,
        rejected=rejected,
        rejected_counts=summary["removed"]["by_reason"],
        thumb=g.thumb_size,
        provenance=provenance(
            cfg, model=summary.get("registered_model") or summary.get("embedder")
        ),
    )


def _log_run(cfg: Config, out: Path, summary: dict[str, Any], page: str, register: bool) -> None:
    import mlflow

    from meddiff.tracking import register_model

    metrics = {
        "rows_in": summary["rows_in"],
        "kept": summary["kept"],
        "removed": summary["removed"]["total"],
        "prompts": summary["prompts"],
        **{f"removed_{k}": v for k, v in summary["removed"]["by_reason"].items()},
        **{f"seconds_{k}": v for k, v in summary["seconds"].items()},
    }
    for key in ("silhouette", "inertia", "patches_per_s", "duplicate_patches"):
        if summary.get(key) is not None:
            metrics[key] = summary[key]
    mlflow.log_metrics(metrics)
    mlflow.log_dict(summary, SUMMARY)
    mlflow.log_dict(summary["cluster_sizes"], "cluster_sizes.json")
    mlflow.log_artifact(str(out / PROMPTS_CSV))
    mlflow.log_artifact(str(out / page))
    if (out / "gallery").is_dir():
        mlflow.log_artifacts(str(out / "gallery"), "gallery")
    model_dir = out / MODEL_DIR
    if model_dir.is_dir():
        name = cfg.prompts.cluster.registered_name
        if register and name:
            version = register_model(model_dir, name, artifact_path=MODEL_DIR)
            summary["registered_model"] = f"models:/{name}/{version}"
            (out / SUMMARY).write_text(json.dumps(summary, indent=2))
        else:
            mlflow.log_artifacts(str(model_dir), MODEL_DIR)


def _fmt_counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "none"
