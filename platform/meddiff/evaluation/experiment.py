"""Paper A's comparison: label-only (baseline) vs morphology prompts, end to end.

For each strategy, under ``out/<strategy>/``: build prompts (``prompts/``), fine-tune the
synthesis model (``train/``), generate a synthetic set (``synthetic/``). Then judge all sets
together under ``out/evaluation/``: fidelity and diversity against the real set (overall, per
label, per prompt), one UMAP with every set, the downstream classifier (real only, synthetic only
and real + synthetic per strategy, all in one Ray Train run with the same seed and budget), and a
reader-study kit per strategy. The result is one metric × strategy table (``comparison.csv``,
``comparison.json``) and ``report.html``.

MLflow: one parent run ``compare-prompting``; one child run per strategy (holding the prompt,
training and generation runs of that strategy) and one ``evaluate`` child run.

Each finished step writes ``out/<strategy>/steps/<step>.json``; a rerun skips those steps, so an
interrupted experiment resumes (training itself resumes from its checkpoints).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from meddiff.config import Config
from meddiff.errors import ConfigError, DataError
from meddiff.files import write_json, write_text

if TYPE_CHECKING:
    from meddiff.evaluation.features import FeatureSet, Resolved
    from meddiff.reports import Provenance

log = logging.getLogger(__name__)

STRATEGIES = ("baseline", "morphology")

# Paper A's reported figures, shown beside ours for context (never compared numerically: other
# data, other scale, other networks).
PAPER = {
    "fid": {"baseline": 178.8, "morphology": 90.2},
    "classifier_synthetic_auc": {"morphology": 0.805},
    "reader_median_sensitivity": 0.55,
    "reader_median_specificity": 0.55,
}


def mlflow_name(name: str) -> str:
    """A metric name MLflow accepts ('real+synthetic' → 'real_plus_synthetic')."""
    import re

    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", name.replace("+", "_plus_"))


def with_strategy(cfg: Config, strategy: str) -> Config:
    """``cfg`` with ``prompts.strategy`` set (the prompt-building stage reads it)."""
    if "strategy" not in type(cfg.prompts).model_fields:
        raise ConfigError(
            "this build's prompts config has no 'strategy' key: the prompt-building stage "
            "(meddiff.morphology) is not installed"
        )
    data = cfg.model_dump()
    data["prompts"]["strategy"] = strategy
    return Config.model_validate(data)


def _stage_functions() -> dict[str, Callable]:
    """The three stages this experiment chains (imported late: heavy, and other areas' code)."""
    from meddiff.morphology.pipeline import build_prompts
    from meddiff.synthesis.generate import generate
    from meddiff.synthesis.train import train_synthesis

    return {"prompts": build_prompts, "train": train_synthesis, "generate": generate}


def _step(marker: Path, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run a step unless its marker (the JSON summary written after it finished) exists."""
    if marker.is_file():
        log.info("skipping %s (done: %s)", marker.stem, marker)
        return json.loads(marker.read_text())
    summary = run()
    marker.parent.mkdir(parents=True, exist_ok=True)
    write_json(marker, summary)
    return summary


def run_strategy(cfg: Config, data: Path, out: Path, strategy: str) -> dict[str, Any]:
    """Prompts → fine-tune → generate for one strategy; returns the three step summaries."""
    from meddiff import tracking

    stages = _stage_functions()
    scfg = with_strategy(cfg, strategy)
    root = out / strategy
    steps = root / "steps"
    with tracking.start_run(scfg, "strategy", run_name=f"strategy-{strategy}", nested=True) as run:
        run.set_tags({"meddiff.strategy": strategy})
        prompts = _step(
            steps / "prompts.json",
            lambda: stages["prompts"](scfg, data, root / "prompts", overwrite=True),
        )
        train = _step(
            steps / "train.json",
            lambda: stages["train"](scfg, root / "prompts" / "pairs", root / "train"),
        )
        gen = _step(
            steps / "generate.json",
            lambda: stages["generate"](
                scfg, train["model"], root / "prompts" / "prompts.csv", root / "synthetic"
            ),
        )
    return {"prompts": prompts, "train": train, "generate": gen}


def real_prompts_from_pairs(pairs: Path, num_rows: int) -> list[str | None]:
    """Each real row's prompt from a prompt stage's ``pairs`` shards (None for rows the quality
    filter removed): the real side of the per-prompt strata."""
    import pyarrow.parquet as pq

    from meddiff.data import shards

    if not shards.is_shard_dir(pairs):
        raise DataError(f"{pairs}: not a complete pairs shard directory")
    manifest = shards.read_manifest(pairs)
    if "prompt" not in manifest["columns"]:
        raise DataError(f"{pairs}: the pairs have no 'prompt' column")
    prompts: list[str | None] = [None] * num_rows
    # Only the two small columns: never the images (gigabytes at full size).
    for name in manifest["files"]:
        table = pq.read_table(Path(pairs) / name, columns=["index", "prompt"])
        for i, p in zip(table["index"].to_pylist(), table["prompt"].to_pylist(), strict=True):
            if 0 <= int(i) < num_rows:
                prompts[int(i)] = str(p)
    return prompts


def compare_prompting(
    cfg: Config,
    data: str | Path,
    out: str | Path,
    *,
    strategies: Sequence[str] = STRATEGIES,
    classifier: bool = True,
) -> dict[str, Any]:
    """Baseline vs morphology prompting end to end; returns the table and where the report is."""
    from meddiff import runtime, tracking
    from meddiff.data import pcam

    data, out = Path(data), Path(out)
    strategies = list(dict.fromkeys(strategies))
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad or not strategies:
        raise ConfigError(f"unknown strategies {bad}; expected some of {list(STRATEGIES)}")
    pcam.open_pcam(data, cfg.evaluation.real_split, patch_size=None)  # fail early on bad data
    out.mkdir(parents=True, exist_ok=True)
    runtime.connect(cfg.runtime)
    with tracking.start_run(cfg, "compare-prompting") as run:
        run.log_params({"data": str(data), "out": str(out), "strategies": ",".join(strategies)})
        runs = {s: run_strategy(cfg, data, out, s) for s in strategies}
        with tracking.start_run(cfg, "evaluate", run_name="evaluate", nested=True) as evaluation:
            synthetic = {
                s: (
                    Path(r["generate"].get("out", out / s / "synthetic")),
                    r["generate"].get("split", cfg.evaluation.split),
                )
                for s, r in runs.items()
            }
            pairs = {s: out / s / "prompts" / "pairs" for s in runs}
            result = evaluate_strategies(
                cfg, data, out / "evaluation", synthetic, pairs, classifier=classifier
            )
            for name in ("report", "umap", "roc", "table_csv", "table_json"):
                if result.get(name):
                    evaluation.log_artifact(result[name])
        # Once, on the parent run: the table compares strategies, so it belongs to the experiment.
        for strategy, cells in result["flat"].items():
            run.log_metrics({mlflow_name(f"{strategy}/{k}"): v for k, v in cells.items()})
    return {k: v for k, v in result.items() if k != "flat"}


def evaluate_strategies(
    cfg: Config,
    data: Path,
    eval_dir: Path,
    synthetic: dict[str, tuple[Path, str]],
    pairs: dict[str, Path | None] | None = None,
    *,
    classifier: bool = True,
    title: str = "meddiff: baseline vs morphology prompts",
) -> dict[str, Any]:
    """Judge each named synthetic set ``{name: (dir, split)}`` against the real ``data``: fidelity
    (per prompt too, with the real prompts from ``pairs[name]`` when given), classifier arms,
    reader-study kits, one table and one report under ``eval_dir``. Each step is a function below,
    called in this order."""
    from meddiff.reports import provenance

    synth = {s: (Path(d), split) for s, (d, split) in synthetic.items()}
    resolved, feats = extract_features(cfg, data, synth)
    fidelity = compute_fidelity(cfg, data, resolved, feats, synth, pairs or {})
    clf, roc, blocks = {}, None, []
    if classifier:
        clf, roc, blocks = train_classifier_arms(cfg, data, synth, eval_dir)
    prov = provenance(cfg, model=resolved.network)
    studies = export_reader_studies(cfg, data, synth, eval_dir, prov)
    table = strategy_table(fidelity, clf, list(synth))
    table_json, table_csv = write_table(table, list(synth), eval_dir)
    report = render_evaluation(
        cfg,
        resolved,
        feats,
        fidelity,
        table,
        eval_dir,
        blocks + context_blocks(resolved, studies),
        title,
    )
    return {
        "network": resolved.network,
        "note": resolved.note,
        "table": {m: {s: _value(c) for s, c in cells.items()} for m, cells in table.items()},
        "report": report["report"],
        "umap": report.get("umap"),
        "roc": roc,
        "table_csv": str(table_csv),
        "table_json": str(table_json),
        "reader_studies": studies,
        "classifier": {
            group: {k: {kk: vv for kk, vv in r.items() if kk != "roc"} for k, r in arms.items()}
            for group, arms in clf.items()
        },
        "synthetic": {s: str(p) for s, (p, _) in synth.items()},
        "flat": flat_table(table, list(synth)),
    }


def extract_features(
    cfg: Config, data: Path, synth: dict[str, tuple[Path, str]]
) -> tuple[Resolved, dict[str, FeatureSet]]:
    """Step 1: the feature network (resolved from config) and the features of the real set and
    of each synthetic set, ``{"real": FeatureSet, name: FeatureSet}``; DataError when the sets'
    image sizes differ."""
    from meddiff.evaluation.features import check_same_size, extract_sets, resolve_features

    ev = cfg.evaluation
    sets = {"real": (data, ev.real_split), **synth}
    check_same_size(sets)
    resolved = resolve_features(ev.features)
    feats = extract_sets(
        sets,
        resolved,
        max_images=ev.features.max_images,
        seed=cfg.runtime.seed,
        data_cfg=cfg.data,
        progress=cfg.runtime.progress,
    )
    return resolved, feats


def compute_fidelity(
    cfg: Config,
    data: Path,
    resolved: Resolved,
    feats: dict[str, FeatureSet],
    synth: dict[str, tuple[Path, str]],
    pairs: dict[str, Path | None],
) -> dict[str, dict[str, Any]]:
    """Step 2: a fidelity report per synthetic set against the real one; with the real prompts
    from that strategy's ``pairs`` shards, also per prompt."""
    from meddiff.data import pcam
    from meddiff.evaluation.fidelity import evaluate_sets

    ev = cfg.evaluation
    real = feats["real"]
    n_real = pcam.open_pcam(data, ev.real_split, patch_size=None).num_rows
    fidelity = {}
    for s in synth:
        pair_dir = pairs.get(s)
        real_s = real
        if pair_dir is not None and Path(pair_dir).exists():
            prompts = real_prompts_from_pairs(Path(pair_dir), n_real)
            real_s = _with_prompts(real, [prompts[int(i)] for i in real.index])
        fidelity[s] = evaluate_sets(
            real_s, feats[s], ev.metrics, cfg.runtime.seed, resolved.note, ev.memorization
        )
    return fidelity


def train_classifier_arms(
    cfg: Config, data: Path, synth: dict[str, tuple[Path, str]], eval_dir: Path
) -> tuple[dict[str, dict[str, Any]], str, list[dict[str, Any]]]:
    """Step 3: the downstream classifier's arms (real, per strategy synthetic and real +
    synthetic, as ``evaluation.classifier.arms`` says) in one Ray Train run; returns
    ``({strategy or "real": {arm kind: result}}, roc.png path, report blocks)``."""
    from meddiff.evaluation import report as R
    from meddiff.evaluation.classifier import plot_roc, train_plan

    ccfg = cfg.evaluation.classifier
    real_train = (data, ccfg.train_split)
    plan: dict[str, list] = {}
    if "real" in ccfg.arms:
        plan["real"] = [real_train]
    for s, pair in synth.items():
        if "synthetic" in ccfg.arms:
            plan[f"{s}/synthetic"] = [pair]
        if "real+synthetic" in ccfg.arms:
            plan[f"{s}/real+synthetic"] = [real_train, pair]
    results = train_plan(cfg, plan, data, eval_dir / "classifier", name="compare-prompting")
    roc = str(plot_roc(results, eval_dir / "roc.png", f"ROC on the real {ccfg.test_split} split"))
    clf: dict[str, dict[str, Any]] = {}
    for arm, res in results.items():
        strategy, _, kind = arm.rpartition("/")
        clf.setdefault(strategy or "real", {})[kind] = res
    rows = [
        [arm, res["auc"], res["accuracy"], res["n_train"], res["steps"]]
        for arm, res in results.items()
    ]
    blocks = [
        R.heading("Downstream classifier"),
        R.figure(roc, "ROC of every arm"),
        R.table(["arm", "AUC", "accuracy", "training images", "steps"], rows),
    ]
    return clf, roc, blocks


def export_reader_studies(
    cfg: Config,
    data: Path,
    synth: dict[str, tuple[Path, str]],
    eval_dir: Path,
    prov: Provenance | None,
) -> dict[str, str]:
    """Step 4: a blinded reader-study kit per strategy; returns ``{strategy: study.html}``."""
    from meddiff.data import pcam
    from meddiff.evaluation.reader_study import export_study

    ev = cfg.evaluation
    rs = ev.reader_study
    n_real = pcam.open_pcam(data, ev.real_split, patch_size=None).num_rows
    studies = {}
    for s, (path, split) in synth.items():
        n_syn = pcam.open_pcam(path, split, patch_size=None).num_rows
        key = export_study(
            data,
            path,
            eval_dir / "reader_study" / s,
            num_real=min(rs.num_real, n_real),
            num_synthetic=min(rs.num_synthetic, n_syn),
            real_split=ev.real_split,
            synthetic_split=split,
            seed=cfg.runtime.seed,
            display_size=rs.display_size,
            title=f"Real or synthetic? ({s} prompts)",
            provenance=prov,
        )
        studies[s] = str(eval_dir / "reader_study" / s / "study.html")
        log.info("reader study for %s: %s (%d images)", s, studies[s], len(key["items"]))
    return studies


def strategy_table(
    fidelity: dict[str, dict[str, Any]], clf: dict[str, dict[str, Any]], runs: list[str]
) -> dict[str, dict[str, Any]]:
    """Step 5: the metric × strategy table; the real-only classifier (one arm shared by every
    strategy) fills its rows for each."""
    from meddiff.evaluation import report as R

    table = R.comparison_table(fidelity, {s: clf[s] for s in runs if s in clf})
    if "real" in clf:
        for key in ("auc", "accuracy"):
            table[f"classifier_real_{key}"] = dict.fromkeys(runs, clf["real"]["real"][key])
    return table


def context_blocks(resolved: Resolved, studies: dict[str, str]) -> list[dict[str, Any]]:
    """Report blocks: paper A's figures for context, and where the reader-study kits are."""
    from meddiff.evaluation import report as R

    return [
        R.heading("Paper A, for context"),
        R.paragraph(
            "Reported with SD 1.5 at 512 px on PCam, Inception FID: FID "
            f"{PAPER['fid']['baseline']} (label prompts) → {PAPER['fid']['morphology']} "
            "(morphology prompts); classifier trained on synthetic data only AUC "
            f"{PAPER['classifier_synthetic_auc']['morphology']}; pathologists' median "
            f"sensitivity/specificity {PAPER['reader_median_sensitivity']}/"
            f"{PAPER['reader_median_specificity']}. Figures here come from this run's data, "
            f"models and feature network ({resolved.network}).",
            "small",
        ),
        R.heading("Reader study kits"),
        R.paragraph(
            "Blinded pages (keys kept apart): "
            + ", ".join(f"{s}: {p}" for s, p in studies.items())
            + ". Score answers with: meddiff eval reader-study score --key KEY ANSWERS...",
            "small",
        ),
    ]


def render_evaluation(
    cfg: Config,
    resolved: Resolved,
    feats: dict[str, FeatureSet],
    fidelity: dict[str, dict[str, Any]],
    table: dict[str, dict[str, Any]],
    eval_dir: Path,
    blocks: list[dict[str, Any]],
    title: str,
) -> dict[str, Any]:
    """Step 6: features saved, UMAP drawn, ``report.html`` written (see
    :func:`meddiff.evaluation.judge.judge_features`); returns its result."""
    from meddiff.evaluation.judge import judge_features

    return judge_features(
        cfg,
        resolved,
        feats["real"],
        {s: feats[s] for s in fidelity},
        eval_dir,
        extra_blocks=blocks,
        title=title,
        precomputed=fidelity,
        table=table,
    )


def flat_table(table: dict[str, dict[str, Any]], runs: list[str]) -> dict[str, dict[str, float]]:
    """``{strategy: {metric: value}}`` of the table, for MLflow."""
    return {
        s: {m: float(_value(cells[s])) for m, cells in table.items() if s in cells} for s in runs
    }


def _value(cell: Any) -> Any:
    return cell["value"] if isinstance(cell, dict) else cell


def _with_prompts(fs, prompts):
    from dataclasses import replace

    return replace(fs, prompts=prompts)


def write_table(
    table: dict[str, dict[str, Any]], strategies: list[str], out: Path
) -> tuple[Path, Path]:
    """``comparison.json`` (values and CIs) and ``comparison.csv`` (metric × strategy values)."""
    out.mkdir(parents=True, exist_ok=True)
    js, cs = out / "comparison.json", out / "comparison.csv"
    write_text(js, json.dumps(table, indent=2, default=float))  # numbers stay numbers
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["metric", *strategies])
    for metric, cells in table.items():
        row = [metric]
        for s in strategies:
            v = _value(cells.get(s))
            row.append("" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.6g}")
        writer.writerow(row)
    write_text(cs, rows.getvalue())
    return js, cs
