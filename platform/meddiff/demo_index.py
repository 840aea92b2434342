"""The demo's ``index.html``: every step with its status, time, key figures and reports.

The main job (:mod:`meddiff.demo`) calls :func:`write_demo_index` after each step, so the page
also tells how far an interrupted or failed run got. Steps this module does not know get their
plain numbers as figures and their ``.html`` outputs as links.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from meddiff.reports import IndexStep, Section, provenance, write_index

# Per known step: (label, summary key) of the figures a reader looks for first.
FIGURES = {
    "ingest": [("rows", "rows")],
    "ingest-wsi": [("tiles", "tiles")],
    "prompts": [
        ("prompts found", "prompts"),
        ("patches kept", "kept"),
        ("removed by the quality filter", "removed"),
        ("morphology types (k)", "k"),
        ("silhouette", "silhouette"),
    ],
    "synthesis": [
        ("training steps", "train_steps"),
        ("final loss", "final_loss"),
        ("images generated", "images"),
    ],
    "thor": [("training steps", "train_steps")],
}
LINKS = {
    "prompts": [("morphology gallery", "gallery")],
    "synthesis": [("PNG grid per prompt", "grids"), ("synthetic patches", "synthetic")],
    "thor": [("THOR report", "report")],
    "evaluate": [("evaluation report", "report"), ("reader study (blinded)", "reader_study")],
}


def step_row(name: str, summary: Mapping[str, Any] | None, status: str, seconds, error=""):
    """The index row of one step from its summary (None when it did not finish)."""
    summary = summary or {}
    if name in FIGURES:
        figures = {label: summary[k] for label, k in FIGURES[name] if summary.get(k) is not None}
    else:
        figures = {
            k: v
            for k, v in summary.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
    if name == "evaluate":
        figures = evaluation_figures(summary)
    links = {label: summary[k] for label, k in LINKS.get(name, []) if summary.get(k)}
    if name not in LINKS:
        links = {k: v for k, v in summary.items() if isinstance(v, str) and v.endswith(".html")}
    return IndexStep(name, status, seconds, figures, links, error)


def evaluation_figures(summary: Mapping[str, Any]) -> dict[str, Any]:
    """FD named with its feature network, and the classifier AUCs of the evaluate step."""
    metrics = summary.get("metrics") or {}
    network = summary.get("network", "?")
    figures: dict[str, Any] = {}
    for metric, cell in metrics.items():
        if metric == "fid" or metric.startswith("fd_"):
            figures[f"FD ({'Inception-v3, i.e. FID' if metric == 'fid' else network})"] = cell
        elif metric.startswith("classifier_") and metric.endswith("_auc"):
            arm = metric.removeprefix("classifier_").removesuffix("_auc")
            figures[f"classifier AUC, trained on {arm}"] = cell
    return figures


def thor_section(summary: Mapping[str, Any] | None) -> Section | None:
    """THOR vs the DDPM baselines from the THOR step's ``metrics.json`` (beside its report)."""
    from meddiff.thor.metrics import summary_row

    if not summary or not summary.get("report"):
        return None
    path = Path(summary["report"]).with_name("metrics.json")
    if not path.is_file():
        return None
    methods = json.loads(path.read_text())["methods"]
    cols = ["pixel_auprc", "pixel_auroc", "best_dice", "image_auroc"]
    cols += ["small_auprc", "medium_auprc", "large_auprc"]
    rows = []
    for method, r in methods.items():
        row = summary_row(r["metrics"])
        rows.append([method, r["plan"]["schedule"], *[row.get(c) for c in cols]])
    return Section(
        "THOR vs DDPM (lesion benchmark)",
        ["method", "schedule", *cols],
        rows,
        (
            f"Measured on {summary['evaluated_model']} ({summary.get('evaluated_model_steps')} "
            "training steps), not the brief demo training."
            if summary.get("evaluated_model")
            else ""
        ),
    )


def evaluation_section(summary: Mapping[str, Any] | None) -> Section | None:
    """Every metric of the evaluate step (value [bootstrap CI])."""
    if not summary or not summary.get("metrics"):
        return None
    rows = [[metric, cell] for metric, cell in summary["metrics"].items()]
    note = (
        f"Feature network: {summary.get('network', '?')}. Confidence intervals and the per-label "
        "and per-prompt strata are in the evaluation report."
    )
    return Section("Synthetic set vs real (evaluate step)", ["metric", "value [CI]"], rows, note)


def write_demo_index(
    cfg: Any,
    out: Path,
    names: Sequence[str],
    results: Mapping[str, Mapping[str, Any]],
    records: Mapping[str, Mapping[str, Any]],
) -> Path:
    """``out/index.html`` of a demo run. ``names``: every step in order; ``records[name]``:
    ``{"status", "seconds", "error"}`` of the steps run so far (the others show 'not run')."""
    steps = []
    for name in names:
        rec = records.get(name, {"status": "not run"})
        steps.append(
            step_row(
                name, results.get(name), rec["status"], rec.get("seconds"), rec.get("error", "")
            )
        )
    sections = [thor_section(results.get("thor")), evaluation_section(results.get("evaluate"))]
    return write_index(
        out,
        "meddiff demo: every step of the main job",
        steps,
        sections=[s for s in sections if s is not None],
        prov=provenance(cfg),
    )
