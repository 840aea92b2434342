"""Synthesis at scale: a generation plan run as Ray Data batch inference into the PCam layout.

``generate(cfg, model, prompts, out)`` writes, under ``out``:

- ``camelyonpatch_level_2_split_<split>_{x,y}.h5``: the images (uint8 (N, 96, 96, 3)) and their
  labels, in the PCam layout every PCam reader understands;
- ``camelyonpatch_level_2_split_<split>_meta.csv``: per image its ``prompt``, ``cluster`` and
  ``seed`` (regenerate any image alone from its seed);
- ``grids/<nn>-<prompt>.png``: a grid of the first images of each prompt, and ``grids/index.json``;
- ``plan.csv`` (the plan) and ``summary.json``.

The model is a pipeline directory or a registry reference (``models:/NAME/VERSION``,
``models:/NAME@ALIAS``); a registry model is downloaded into ``out/_model`` first, so on a cluster
``out`` should be on storage every node sees (as any meddiff output).
"""

from __future__ import annotations

import csv
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from meddiff.config import Config
from meddiff.config.prompts import PromptsConfig
from meddiff.config.synthesis import GenerateConfig
from meddiff.data.pcam import PCamWriter, pcam_filename
from meddiff.errors import DataError
from meddiff.files import write_json
from meddiff.grids import save_grid, slug
from meddiff.prompts import PromptRow, label_only_table, labelled_rows, read_prompt_table
from meddiff.synthesis import components as C

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)


def resolve_model(cfg: Config, model: str | Path, out: Path) -> Path:
    """A validated local pipeline directory for ``model`` (a directory or registry reference).

    Raises:
        ModelError: the directory or a component is missing, or the registry has no such model.
    """
    from meddiff.tracking import fetch_model

    ref = str(model)
    if ref.startswith(("models:/", "runs:/")):
        dst = out / "_model"
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir(parents=True)
        local = fetch_model(ref, cfg.tracking, dst=dst)
    else:
        local = fetch_model(ref, cfg.tracking)
    return C.check_model_dir(local).resolve()


def generation_plan(
    rows: list[PromptRow],
    cfg: GenerateConfig,
    prompts: PromptsConfig | None = None,
    where: str = "the prompt table",
) -> dict[str, np.ndarray]:
    """One entry per image to generate, grouped by prompt in table order: ``index``, ``prompt``,
    ``label``, ``cluster`` and ``seed`` (``cfg.seed + index``, so any image can be regenerated
    alone).

    ``per_prompt``: ``images_per_prompt`` images for every prompt (balanced over the table).
    ``proportional``: ``total_images`` split by the ``count`` column (largest remainders), so the
    synthetic set has the real set's prompt mix. ``label_only`` first replaces the table by one
    label-only prompt per label (the paper's baseline). Rows with label -1 (unknown) are left out
    with a warning: the synthetic set is labelled (the PCam layout holds labels 0 and 1).

    Raises:
        DataError: every row is unlabelled, or ``proportional`` with no positive count.
    """
    if cfg.label_only:
        rows = label_only_table(rows, prompts or PromptsConfig())
    rows, unknown = labelled_rows(rows)
    if unknown and not rows:
        raise DataError(
            f"{where}: every prompt is unlabelled (label -1), and the synthetic set needs labels "
            "(PCam layout: 0 or 1); build prompts from labelled patches (for slides: a "
            "labels.csv beside them, data.wsi.labels_csv)"
        )
    if unknown:
        log.warning(
            "%s: %d unlabelled prompt(s) (label -1) left out of generation, e.g. %r; the "
            "synthetic set holds labelled images only",
            where,
            len(unknown),
            unknown[0].prompt,
        )
    if cfg.plan == "per_prompt":
        per = np.full(len(rows), cfg.images_per_prompt, dtype=np.int64)
    else:
        counts = np.array([r.count for r in rows], dtype=np.float64)
        if counts.sum() <= 0:
            raise DataError("plan=proportional needs positive counts in the prompt table")
        share = counts / counts.sum() * int(cfg.total_images or 0)
        per = np.floor(share).astype(np.int64)
        rest = int(cfg.total_images or 0) - int(per.sum())
        per[np.argsort(-(share - per), kind="stable")[:rest]] += 1
    which = np.repeat(np.arange(len(rows)), per)
    index = np.arange(len(which), dtype=np.int64)
    return {
        "index": index,
        "prompt": np.array([rows[i].prompt for i in which], dtype=object),
        "label": np.array([rows[i].label for i in which], dtype=np.int64),
        "cluster": np.array([rows[i].cluster for i in which], dtype=np.int64),
        "seed": cfg.seed + index,
    }


def _version_ref(cfg: Config, ref: str) -> str | None:
    """``models:/NAME/VERSION`` for a registry reference (an alias resolved now, so a report
    names the version it judged even after the alias moves on); None for a directory."""
    if not ref.startswith("models:/"):
        return None
    from meddiff.tracking.aliases import model_version

    mv = model_version(ref, cfg.tracking)
    return f"models:/{mv.name}/{mv.version}"


def generate(
    cfg: Config, model: str | Path, prompts: str | Path, out: str | Path
) -> dict[str, Any]:
    """Generate the plan's images with ``model`` for the prompt table ``prompts`` into ``out``.

    Returns a JSON-able summary (``out``, ``split``, ``images``, ``prompts``, ``grids``, ``model``).

    Raises:
        DataError: the prompt table is missing, malformed or has no rows.
        ModelError: the model directory is incomplete or the registry reference does not exist.
    """
    from meddiff import runtime, tracking

    g = cfg.synthesis.generate
    out = Path(out).resolve()
    rows = read_prompt_table(prompts, cfg.prompts)  # bad input fails before anything starts
    plan = generation_plan(rows, g, cfg.prompts, where=str(prompts))
    out.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model(cfg, model, out)
    runtime.connect(cfg.runtime)
    start = time.perf_counter()
    with tracking.start_run(cfg, "synthesis-generate") as run:
        run.log_params(
            {
                "model": str(model),
                "prompts": str(prompts),
                "out": str(out),
                "images": len(plan["index"]),
            }
        )
        _write_plan(out / "plan.csv", plan)
        ds = _generated_images(g, plan, model_dir)
        written, firsts = _write_images(cfg, ds, out, len(plan["index"]))
        grids = _write_grids(out / "grids", firsts, list(dict.fromkeys(plan["prompt"].tolist())))
        seconds = time.perf_counter() - start
        summary = {
            "out": str(out),
            "split": g.split,
            "x": str(out / pcam_filename(g.split, "x")),
            "images": written,
            "prompts": len(firsts),
            "grids": str(out / "grids"),
            "unlabelled_prompts_left_out": len(labelled_rows(rows)[1]),
            "model": str(model),
            "model_version": _version_ref(cfg, str(model)),
            "model_dir": str(model_dir),
            "scheduler": g.scheduler,
            "steps": g.steps,
            "guidance_scale": g.guidance_scale,
            "seconds": round(seconds, 2),
            "images_per_s": round(written / seconds, 3) if seconds else None,
        }
        run.log_metrics({"images": written, "images_per_s": written / max(seconds, 1e-9)})
        run.log_artifacts(str(out / "grids"), "grids")
        run.log_dict(summary, "summary.json")
    write_json(out / "summary.json", summary)
    log.info("generated %d images into %s; grids in %s", written, out, grids)
    return summary


def _generated_images(
    g: GenerateConfig, plan: dict[str, np.ndarray], model_dir: Path
) -> ray.data.Dataset:
    """The plan as a Ray dataset whose batches the generation actors (``ImageGenerator``, one
    pipeline each, ``g.concurrency`` of them) fill with an ``image`` column."""
    import pandas as pd
    import ray.data

    from meddiff.synthesis.stages import ImageGenerator

    return ray.data.from_pandas(pd.DataFrame(plan)).map_batches(
        ImageGenerator,
        fn_constructor_kwargs={
            "model_dir": str(model_dir),
            "generate": g.model_dump(mode="json"),
        },
        batch_size=g.batch_size,
        concurrency=g.concurrency,
        num_gpus=1 if g.use_gpu else 0,
        batch_format="numpy",
    )


def _write_images(
    cfg: Config, ds: ray.data.Dataset, out: Path, n: int
) -> tuple[int, dict[str, list[np.ndarray]]]:
    """Write the ``n`` generated rows of ``ds`` into the PCam layout under ``out``, in plan
    order; returns the number written and the first ``grid_images`` images of each prompt."""
    from meddiff import runtime

    g = cfg.synthesis.generate
    firsts: dict[str, list[np.ndarray]] = {}
    with PCamWriter(out, g.split, patch_size=g.output_size) as writer:
        # Rows are written in plan order: sort each batch, and the dataset keeps block order.
        batches = _in_order(ds, g.batch_size)
        total = -(-n // g.batch_size)
        for batch in runtime.progress(
            batches, total=total, desc="generate", show=cfg.runtime.progress
        ):
            writer.write(
                batch["image"],
                batch["label"],
                meta={
                    "prompt": batch["prompt"].tolist(),
                    "cluster": batch["cluster"].tolist(),
                    "seed": batch["seed"].tolist(),
                },
            )
            for img, prompt in zip(batch["image"], batch["prompt"], strict=True):
                keep = firsts.setdefault(str(prompt), [])
                if len(keep) < g.grid_images:
                    keep.append(img)
        written = writer.num_rows
    return written, firsts


def _in_order(ds, batch_size: int):
    """Output batches in plan order (generation actors may finish out of order)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    old = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
            order = np.argsort(batch["index"], kind="stable")
            yield {k: v[order] for k, v in batch.items()}
    finally:
        ctx.execution_options.preserve_order = old


def _write_plan(path: Path, plan: dict[str, np.ndarray]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "prompt", "label", "cluster", "seed"])
        writer.writerows(
            zip(
                *(plan[k].tolist() for k in ("index", "prompt", "label", "cluster", "seed")),
                strict=True,
            )
        )


def _write_grids(root: Path, firsts: dict[str, list[np.ndarray]], order: list[str]) -> Path:
    index = []
    for i, prompt in enumerate(p for p in order if p in firsts):
        name = f"{i:02d}-{slug(prompt)}.png"
        save_grid(root / name, np.stack(firsts[prompt]), caption=prompt)
        index.append({"file": name, "prompt": prompt, "images": len(firsts[prompt])})
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "index.json", {"grids": index})
    return root
