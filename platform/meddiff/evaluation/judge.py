"""Judging synthetic sets against a real one end to end: features → metrics → UMAP → report.

``judge(cfg, real, {"baseline": dir1, "morphology": dir2}, out)`` extracts the real set's
features once, compares each synthetic set with it, draws every set into one UMAP, and writes
``fidelity.json``, ``umap.png`` and ``report.html`` under ``out``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from meddiff.config import Config
from meddiff.errors import DataError
from meddiff.evaluation import report as R
from meddiff.evaluation.features import (
    FeatureSet,
    Resolved,
    check_same_size,
    extract_sets,
    resolve_features,
)
from meddiff.evaluation.fidelity import evaluate_sets, read_prompts_csv
from meddiff.files import write_text
from meddiff.reports import provenance

if TYPE_CHECKING:
    from meddiff.tracking import RunLogger

log = logging.getLogger(__name__)


def load_features(
    cfg: Config,
    real: str | Path,
    synthetic: Mapping[str, str | Path],
    *,
    real_prompts: str | Path | None = None,
    use_ray: bool = True,
) -> tuple[Resolved, FeatureSet, dict[str, FeatureSet]]:
    """Check the sets (same image size, not empty) and extract the features of each."""
    ev = cfg.evaluation
    if not synthetic:
        raise DataError("no synthetic set given")
    sets = {"real": (real, ev.real_split)}
    sets.update({name: (path, ev.split) for name, path in synthetic.items()})
    check_same_size(sets)
    resolved = resolve_features(ev.features)
    seed = cfg.runtime.seed
    kwargs = dict(
        max_images=ev.features.max_images,
        seed=seed,
        use_ray=use_ray,
        data_cfg=cfg.data,
        progress=cfg.runtime.progress,
    )
    named = {"real": (real, ev.real_split)}
    named.update({f"synthetic:{name}": (path, ev.split) for name, path in synthetic.items()})
    feats = extract_sets(named, resolved, **kwargs)
    real_fs = feats["real"]
    if real_prompts is not None:
        from meddiff.data import pcam

        n = pcam.open_pcam(real, ev.real_split, patch_size=None).num_rows
        prompts = read_prompts_csv(real_prompts, n)
        real_fs.prompts = [prompts[int(i)] for i in real_fs.index]
    fakes = {name: feats[f"synthetic:{name}"] for name in synthetic}
    return resolved, real_fs, fakes


def judge(
    cfg: Config,
    real: str | Path,
    synthetic: Mapping[str, str | Path],
    out: str | Path | None = None,
    *,
    real_prompts: str | Path | None = None,
    use_ray: bool = True,
    umap: bool = True,
) -> dict[str, Any]:
    """Fidelity reports of each synthetic set against ``real``; with ``out`` also the UMAP
    picture, the features (``features/*.npz``) and the HTML report.

    Returns ``{"network", "note", "sets": {name: fidelity report}, "umap", "report"}``.
    """
    resolved, real_fs, fakes = load_features(
        cfg, real, synthetic, real_prompts=real_prompts, use_ray=use_ray
    )
    result = judge_features(cfg, resolved, real_fs, fakes, out, umap=umap)
    return result


def judge_features(
    cfg: Config,
    resolved: Resolved,
    real_fs: FeatureSet,
    fakes: Mapping[str, FeatureSet],
    out: str | Path | None = None,
    *,
    umap: bool = True,
    extra_blocks: list[R.Block] | None = None,
    title: str = "meddiff: judging synthetic data",
    precomputed: Mapping[str, dict[str, Any]] | None = None,
    table: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The metrics, picture and report from already extracted features.

    ``precomputed`` fidelity reports (per set) are used as they are; ``table`` replaces the
    metric × strategy table built from the reports (e.g. with classifier rows added).
    """
    ev = cfg.evaluation
    seed = cfg.runtime.seed
    reports = dict(precomputed or {})
    for name, fs in fakes.items():
        if name not in reports:
            reports[name] = evaluate_sets(
                real_fs, fs, ev.metrics, seed, resolved.note, memorization=ev.memorization
            )
    result: dict[str, Any] = {
        "network": resolved.network,
        "note": resolved.note,
        "sets": reports,
    }
    if out is None:
        return result
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    feats_dir = out / "features"
    feats_dir.mkdir(exist_ok=True)
    for name, fs in {"real": real_fs, **fakes}.items():
        np.savez_compressed(
            feats_dir / f"{name}.npz", features=fs.features, labels=fs.labels, index=fs.index
        )
    blocks: list[R.Block] = []
    if resolved.note:
        blocks.append(R.note(resolved.note))
    if table is None and len(reports) > 1:
        table = R.comparison_table(reports)
    if table is not None:
        blocks.append(R.heading("Metric × strategy"))
        blocks.append(comparison_html(table, list(reports)))
    if umap:
        from meddiff.evaluation.coverage import plot_umap, umap_embedding

        emb = umap_embedding(
            {"real": real_fs.features, **{n: f.features for n, f in fakes.items()}},
            ev.umap,
            seed,
        )
        png = plot_umap(emb, out / "umap.png", f"Coverage: 2-D UMAP of {resolved.network} features")
        result["umap"] = str(png)
        blocks.append(R.heading("Coverage"))
        blocks.append(R.figure(png, "Real vs synthetic features, one UMAP fitted on all sets"))
    blocks += sample_grids(cfg, real_fs, fakes)
    for name, rep in reports.items():
        blocks += R.fidelity_blocks(name, rep)
        if rep.get("memorization"):
            audit = rep["memorization"]
            if "per_image" in audit:
                audit["per_image_csv"] = str(write_per_image(audit, out / "memorization" / name))
            blocks += R.memorization_blocks(name, audit, closest_pairs(real_fs, fakes[name], audit))
    blocks += extra_blocks or []
    write_text(out / "fidelity.json", json.dumps(result, indent=2, default=_json_default))
    prov = provenance(cfg, model=resolved.network)
    result["report"] = str(R.write_html(out / "report.html", title, blocks, prov))
    return result


def write_per_image(audit: dict[str, Any], stem: Path) -> Path:
    """``stem.csv``: every synthetic image's nearest real images (moved out of ``audit``, whose
    ``per_image`` table would make the JSON as long as the set)."""
    import csv
    import io

    table = audit.pop("per_image")
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(list(table))
    writer.writerows(zip(*table.values(), strict=True))
    path = stem.with_suffix(".csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, buf.getvalue())
    return path


def closest_pairs(
    real_fs: FeatureSet, fake_fs: FeatureSet, audit: dict[str, Any]
) -> np.ndarray | None:
    """A grid of the audit's closest pairs, one per row: synthetic | nearest real image in
    features | nearest real image in pixels."""
    from meddiff import grids
    from meddiff.evaluation.memorization import read_images

    closest = audit["closest"]
    if not closest:
        return None
    fake = read_images(fake_fs.source, fake_fs.split, [c["synthetic_index"] for c in closest])
    rows = [c[k] for c in closest for k in ("nearest_real_features", "nearest_real_pixels")]
    real = read_images(real_fs.source, real_fs.split, rows).reshape(
        len(closest), 2, *fake.shape[1:]
    )
    triples = np.stack([fake, real[:, 0], real[:, 1]], axis=1).reshape(-1, *fake.shape[1:])
    return np.asarray(grids.grid(triples, cols=3))


def comparison_html(table: Mapping[str, Mapping[str, Any]], strategies: list[str]) -> R.Block:
    """The metric × strategy table as a report block."""
    rows = [[metric, *[cells.get(s) for s in strategies]] for metric, cells in table.items()]
    return R.table(["metric", *strategies], rows)


def sample_grids(
    cfg: Config, real_fs: FeatureSet, fakes: Mapping[str, FeatureSet]
) -> list[R.Block]:
    """A 5×5 grid of randomly chosen images of each set."""
    from meddiff import grids
    from meddiff.data import pcam

    rng = np.random.default_rng(cfg.runtime.seed)
    blocks = [R.heading("Samples")]
    for name, fs in [("real", real_fs), *fakes.items()]:
        opened = pcam.open_pcam(fs.source, fs.split, patch_size=None)
        pick = np.sort(rng.choice(opened.num_rows, min(25, opened.num_rows), replace=False))
        images = np.stack([pcam.read_rows(opened, int(i), int(i) + 1)["image"][0] for i in pick])
        grid = np.asarray(grids.grid(images, cols=5))
        blocks.append(R.figure(grid, f"{name}: {len(pick)} random images"))
    return blocks


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def run_fidelity(
    cfg: Config,
    real: str | Path,
    synthetic: Mapping[str, str | Path],
    out: str | Path,
    *,
    real_prompts: str | Path | None = None,
    use_ray: bool = True,
    umap: bool = True,
) -> dict[str, Any]:
    """:func:`judge` recorded as an MLflow run (nested under an active one): the overall metrics
    of each set, the JSON, the UMAP picture and the HTML report."""
    from meddiff import runtime, tracking
    from meddiff.evaluation.fidelity import flat_metrics

    if use_ray:
        runtime.connect(cfg.runtime)
    with tracking.start_run(cfg, "eval-fidelity") as run:  # nested under an active run
        run.log_params(
            {"real": str(real), **{f"synthetic.{k}": str(v) for k, v in synthetic.items()}}
        )
        result = judge(
            cfg, real, synthetic, out, real_prompts=real_prompts, use_ray=use_ray, umap=umap
        )
        run.set_tags({"meddiff.feature_network": result["network"]})
        for name, rep in result["sets"].items():
            run.log_metrics(flat_metrics(rep, prefix=f"{name}/"))
        log_outputs(run, result)
    record_audits(cfg, result)
    return result


def record_audits(cfg: Config, result: Mapping[str, Any]) -> None:
    """Tag the registry version that generated each judged set (its ``summary.json`` names it)
    with the set's memorization audit, for ``meddiff serve promote``'s check."""
    from meddiff.evaluation.memorization import record_on_model

    for name, rep in result["sets"].items():
        if rep.get("memorization"):
            where = record_on_model(rep.get("model"), rep["memorization"], cfg)
            if where:
                rep["memorization"]["recorded_on"] = where
                log.info("memorization audit of %s recorded on %s", name, where)


def log_outputs(run: RunLogger, result: Mapping[str, Any]) -> None:
    """Log a result's report, picture and JSON files as artifacts of ``run``."""
    for key in ("report", "umap", "roc"):
        if result.get(key):
            run.log_artifact(str(result[key]))
    report = result.get("report")
    if report and (Path(report).parent / "fidelity.json").is_file():
        run.log_artifact(str(Path(report).parent / "fidelity.json"))
