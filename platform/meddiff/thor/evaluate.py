"""Evaluate THOR and its baselines on a folder of images with masks: metrics, JSON, HTML report.

Every method runs on the same trained model and the same images; results are keyed by method
label (``thor``, ``ddpm``, ``anoddpm``, or a custom label such as ``thor-fast``). Every output
states how the maps were made (``map_kind``), in particular when they are residual-only because
LPIPS is off.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from meddiff.config import Config
from meddiff.files import write_json, write_text
from meddiff.reports import provenance
from meddiff.thor.detect import FolderResult
from meddiff.thor.metrics import evaluate_maps, summary_row
from meddiff.thor.report import schedule_label

log = logging.getLogger(__name__)


def method_config(cfg: Config, method: str, **infer: Any) -> Config:
    """``cfg`` with ``thor.infer.method`` set; baselines drop THOR-only settings (noise kind and
    harmonization steps follow the method), ``infer`` overrides other inference fields."""
    update: dict[str, Any] = {"method": method, **infer}
    if method != "thor":
        # Baselines take their own noise kind and T (250 for simplex), not THOR's settings.
        update.setdefault("noise", None)
        update.setdefault("noise_level", None)
        update.setdefault("harmonization_steps", None)
    data = cfg.model_dump(mode="json")
    data["thor"]["infer"].update(update)
    return Config.model_validate(data)


def evaluate_folder(
    cfg: Config,
    model_ref: str,
    images_dir: str | Path,
    masks_dir: str | Path,
    methods: Mapping[str, Config] | Sequence[str] = ("thor",),
    out_dir: str | Path | None = None,
    box_protocol: bool | None = None,
    title: str = "THOR anomaly detection",
) -> dict[str, Any]:
    """Run each method, compute metrics, and (with ``out_dir``) write ``metrics.json`` and
    ``report.html``. ``methods`` is a list of method names or a {label: config} mapping."""
    from meddiff import tracking
    from meddiff.thor.volumes import input_label, run_input

    if not isinstance(methods, Mapping):
        methods = {m: method_config(cfg, m) for m in methods}
    results: dict[str, Any] = {}
    outputs: dict[str, dict[str, np.ndarray]] = {}
    first: FolderResult | None = None
    with tracking.start_run(cfg, "thor-evaluate") as run:  # nested under an active run
        shown = input_label(images_dir)
        run.log_params({"thor.eval.images": shown, "thor.eval.masks": str(masks_dir)})
        for label, mcfg in methods.items():
            log.info("evaluating %s on %s", label, shown)
            res = run_input(mcfg, model_ref, images_dir, masks_dir)
            first = first or res
            metrics = evaluate_maps(res.maps, res.masks, res.scores, mcfg.thor.eval, box_protocol)
            results[label] = {
                "metrics": metrics,
                "plan": res.plan,
                "seconds": round(res.seconds, 2),
                "images_per_s": round(res.images_per_s, 4),
            }
            outputs[label] = {
                "maps": res.maps,
                "reconstructions": res.reconstructions,
                "scores": res.scores,
            }
            row = {f"{label}.{k}": v for k, v in summary_row(metrics).items() if v is not None}
            run.log_metrics({**row, f"{label}.images_per_s": res.images_per_s})
            run.set_tags({f"thor.map_kind.{label}": res.plan["map_kind"]})
        notes = _notes(results)
        summary = {
            "model": str(model_ref),
            "images": shown,
            "masks": str(masks_dir),
            "notes": notes,
            "methods": results,
        }
        run.log_dict(summary, "metrics.json")
        if out_dir is not None and first is not None:
            prov = provenance(cfg, model=model_ref)
            html = _report(title, results, first, outputs, cfg.thor.eval.report_rows, notes, prov)
            _write_outputs(Path(out_dir), summary, html)
            run.log_artifact(str(Path(out_dir) / "report.html"))
    return summary


def _notes(results: Mapping[str, Any]) -> list[str]:
    notes = []
    for label, r in results.items():
        if r["plan"]["method"] == "thor" and r["plan"]["residual_only"]:
            notes.append(
                f"{label}: anomaly maps are residual-only: the LPIPS perceptual term is off "
                "(thor.infer.lpips=off), so maps are |x0 - x| without the LPIPS factor."
            )
        elif "RANDOM" in r["plan"]["map_kind"]:
            notes.append(f"{label}: LPIPS used a RANDOM backbone (tests only); not perceptual.")
    # Every method read the same images: one note about them, from the first.
    check = next(iter(results.values()), {}).get("plan", {}).get("data_check") or {}
    if check.get("warning"):
        notes.append(f"Input: {check['warning']}.")
    return notes


def _report(title, results, first: FolderResult, outputs, rows, notes, prov) -> str:
    from meddiff.thor.report import render_report

    return render_report(
        title,
        results,
        first.names,
        first.images,
        first.masks,
        outputs,
        rows=rows,
        notes=notes,
        provenance=prov,
    )


def _write_outputs(out: Path, summary: dict[str, Any], html: str) -> None:
    """The report, then ``metrics.json`` last: its presence marks the evaluation complete."""
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "report.html", html)
    write_json(out / "metrics.json", summary)


def metric_table(summary: Mapping[str, Any]) -> str:
    """A plain-text table of the headline metrics, one row per method."""
    cols = ["pixel_auprc", "pixel_auprc_chance", "pixel_auroc", "best_dice", "image_auroc",
            "small_auprc", "medium_auprc", "large_auprc"]  # fmt: skip
    # The schedule column is as wide as its longest entry, so the numbers stay aligned.
    width = max([8, *(len(schedule_label(r["plan"])) for r in summary["methods"].values())])
    head = (
        f"{'method':<12} {'schedule':<{width}} "
        + " ".join(f"{c.replace('pixel_auprc_chance', 'auprc_chance'):>12}" for c in cols)
        + f" {'img/s':>8}"
    )
    lines = [head, "-" * len(head)]
    for label, r in summary["methods"].items():
        row = summary_row(r["metrics"])
        vals = " ".join(
            f"{row[c]:>12.3f}" if row.get(c) is not None else f"{'-':>12}" for c in cols
        )
        schedule = schedule_label(r["plan"])
        lines.append(f"{label:<12} {schedule:<{width}} {vals} {r['images_per_s']:>8.3f}")
    for note in summary.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)
