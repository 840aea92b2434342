"""``build_prompts``: labelled patches → (image, prompt) pairs, with Ray Data and MLflow.

The job runs three passes over the data (each streamed, memory bounded by block size, not by
dataset size), each in its own module:

1. **check + embed** (Ray Data, :mod:`.stages`): read the source, flag outliers and, for the
   morphology strategy, embed the kept patches with the frozen network. Every row is written to
   ``<out>.partial/_work/checked`` with its ``reject`` reason and embedding. This is the
   expensive pass and the checkpoint (:mod:`.resume`): a rerun with the same source and settings
   resumes after it.
2. **fit** (driver, :mod:`.fit`): the min-max range and K-means, exact in memory or streaming
   mini-batch, reading only the embedding column; or a registered model reused.
3. **assign + write** (Ray Data, :mod:`.stages`): nearest centroid and prompt text per kept
   patch, written as the ``pairs`` shard directory; then ``prompts.csv``, the gallery
   (:mod:`.gallery`) and ``summary.json``.

Everything is built under ``<out>.partial`` and put in place at the end, so a directory named
``out`` is always complete. For an object-store output location the stages Ray workers write
(1 and 3) go straight under the URI from whichever node runs them and are downloaded into
``<out>.partial`` for the driver's passes, so no node needs a shared filesystem
(:class:`~meddiff.morphology.layout.Workspace`).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meddiff import storage
from meddiff.config import Config
from meddiff.data.shards import MANIFEST, producer_run
from meddiff.errors import DataError
from meddiff.morphology.cluster import MorphologyModel
from meddiff.morphology.columns import cluster_sizes, columns, reject_counts
from meddiff.morphology.embed import describe, embed_precision
from meddiff.morphology.layout import MODEL_DIR, PROMPTS_CSV, SUMMARY, WORK, Workspace
from meddiff.prompts import check_table_tokens, prompt_table, write_prompt_table

if TYPE_CHECKING:
    from meddiff.config.prompts import EmbedConfig
    from meddiff.tracking import RunLogger

log = logging.getLogger(__name__)


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
            from meddiff.errors import find_user_error

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
    from meddiff import runtime, tracking
    from meddiff.morphology.fit import embedder_config, load_reused_model, morphology_model
    from meddiff.morphology.resume import embed_or_resume

    pcfg = cfg.prompts
    morphology = pcfg.strategy == "morphology"
    ws = Workspace.of(loc)
    where = loc.uri  # what the run and summary name: not the upload's staging folder
    runtime.connect(cfg.runtime)
    with tracking.start_run(cfg, "prompts", tags={"meddiff.strategy": pcfg.strategy}) as run:
        run.log_params({"input": str(source), "split": split, "out": where, "limit": limit})
        run.log_input(source, context="input", producer_run=producer_run(source))
        reused = load_reused_model(cfg) if morphology and pcfg.cluster.model else None
        # Which network makes the features (a reused model brings its own); None: baseline.
        embed_cfg = embedder_config(pcfg, reused) if morphology else None
        if embed_cfg is not None:
            run.log_params({"embedder": describe(embed_cfg)})
        seconds: dict[str, float] = {}

        start = time.perf_counter()
        resumed, rows_in = embed_or_resume(
            cfg, source, ws, embed_cfg, split=split, limit=limit, run_id=run.run_id
        )
        seconds["embed"] = time.perf_counter() - start
        counts = _filter_counts(ws.checked, source, rows_in)
        kept = counts["kept"]

        start = time.perf_counter()
        model, fit_info = None, {}
        if embed_cfg is not None:
            model, fit_info = morphology_model(cfg, ws, kept, embed_cfg, reused)
        seconds["cluster"] = time.perf_counter() - start

        start = time.perf_counter()
        pairs = _write_prompts(cfg, ws, model, where, run.run_id)
        seconds["write"] = time.perf_counter() - start

        summary: dict[str, Any] = {
            "strategy": pcfg.strategy,
            "source": str(source),
            "split": split,
            "out": where,
            "resumed": resumed,
            **counts,
            **pairs,
            "seconds": {k: round(v, 2) for k, v in seconds.items()},
        }
        if embed_cfg is not None:
            summary.update(
                {
                    "k": model.k,
                    "embedding_dim": model.dim,
                    "embedder": describe(embed_cfg),
                    "embedder_precision": _embedder_precision(cfg, embed_cfg),
                }
            )
            summary.update(fit_info)
        if not resumed:  # a resumed run did not read the input: no rate to report
            summary["patches_per_s"] = round(rows_in / max(seconds["embed"], 1e-9), 2)
        _finish(run, cfg, loc, ws, summary, register=morphology and reused is None)
    log.info("wrote %d pairs with %d prompts to %s", kept, summary["prompts"], loc.staging)
    return summary


def _embedder_precision(cfg: Config, embed_cfg: EmbedConfig) -> str:
    """The autocast the embedding actors ran (fp32/bf16/fp16; meddiff.precision)."""
    from meddiff.morphology.stages import resolve_embed
    from meddiff.runtime import ray_address

    ecfg = resolve_embed(embed_cfg, embedded_ray=ray_address(cfg.runtime) is None)
    return embed_precision(embed_cfg, "cuda" if ecfg.num_gpus else "cpu")


def _filter_counts(checked: Path, source: str | Path, rows_in: int) -> dict[str, Any]:
    """The summary's counts of pass 1: rows read, patches the quality filter kept, and those it
    removed (in total and per reason).

    Raises:
        DataError: it kept none.
    """
    reasons = reject_counts(checked)
    kept = reasons.pop("", 0)
    log.info("quality filter: kept %d of %d patches; removed %s", kept, rows_in, reasons)
    if kept == 0:
        raise DataError(
            f"no patches left after the quality filter in {source}: all {rows_in} removed "
            f"({_fmt_counts(reasons)}); check the input or relax prompts.filter"
        )
    removed = {"total": int(sum(reasons.values())), "by_reason": reasons}
    return {"rows_in": int(rows_in), "kept": int(kept), "removed": removed}


def _write_prompts(
    cfg: Config, ws: Workspace, model: MorphologyModel | None, where: str, run_id: str
) -> dict[str, Any]:
    """Pass 3 and the prompt table: the pairs (fetched into ``ws.pairs``) and ``prompts.csv``
    in the partial folder; returns the summary's entries for them.

    Raises:
        ConfigError: a prompt is longer than the text encoder takes (before anything is named
            complete).
    """
    from meddiff.morphology.stages import write_pairs

    pcfg = cfg.prompts
    manifest = write_pairs(cfg, ws.worker_checked, ws.worker_pairs, model, run_id)
    storage.fetch(ws.worker_pairs, ws.pairs, marker=MANIFEST)
    labels, clusters = columns(ws.pairs, ["label", "cluster"])
    table = prompt_table(labels, clusters, pcfg)
    tokens = check_table_tokens(
        cfg, [r.prompt for r in table], str(storage.join(where, PROMPTS_CSV))
    )
    write_prompt_table(ws.partial / PROMPTS_CSV, table, pcfg)
    return {
        "prompts": len(table),
        "tokens": tokens,
        "cluster_sizes": cluster_sizes(labels, clusters),
        "pairs": {"rows": manifest["rows"], "files": len(manifest["files"])},
    }


def _finish(
    run: RunLogger,
    cfg: Config,
    loc: storage.OutputLocation,
    ws: Workspace,
    summary: dict[str, Any],
    *,
    register: bool,
) -> None:
    """The gallery and ``summary.json``, then the build put in place at ``loc`` and logged to
    ``run`` (the model registered when ``register``: it was fitted here)."""
    from meddiff.morphology.gallery import make_gallery

    start = time.perf_counter()
    page = make_gallery(cfg, ws, summary)
    summary["seconds"]["gallery"] = round(time.perf_counter() - start, 2)
    shutil.rmtree(ws.partial / WORK)
    (ws.partial / SUMMARY).write_text(json.dumps(summary, indent=2))
    loc.install(ws.partial)
    _log_run(run, cfg, loc.staging, summary, page.name, register)


def _log_run(
    run: RunLogger, cfg: Config, out: Path, summary: dict[str, Any], page: str, register: bool
) -> None:
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
    run.log_metrics(metrics)
    run.log_dict(summary, SUMMARY)
    run.log_dict(summary["cluster_sizes"], "cluster_sizes.json")
    run.log_artifact(str(out / PROMPTS_CSV))
    run.log_artifact(str(out / page))
    if (out / "gallery").is_dir():
        run.log_artifacts(str(out / "gallery"), "gallery")
    model_dir = out / MODEL_DIR
    if model_dir.is_dir():
        name = cfg.prompts.cluster.registered_name
        if register and name:
            version = register_model(model_dir, name, artifact_path=MODEL_DIR)
            summary["registered_model"] = f"models:/{name}/{version}"
            (out / SUMMARY).write_text(json.dumps(summary, indent=2))
        else:
            run.log_artifacts(str(model_dir), MODEL_DIR)


def _fmt_counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "none"
