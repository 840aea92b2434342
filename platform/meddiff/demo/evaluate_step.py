"""The demo's evaluation step: its synthetic set judged against the real one (one report)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from meddiff.config import Config
from meddiff.evaluation.experiment import evaluate_strategies
from meddiff.files import write_json


def evaluate_demo(
    cfg: Config,
    real: Path,
    synthetic: tuple[Path, str],
    pairs: Path | None,
    out: Path,
    *,
    classifier: bool = True,
) -> dict[str, Any]:
    """The main job's last step: judge the demo's synthetic set (``(directory, split)`` in the
    PCam layout) against ``real`` (fidelity, UMAP, classifier arms, reader-study kit) into
    ``out/report.html``; ``pairs`` are the prompt step's (image, prompt) shards, for per-prompt
    strata. Returns the recorded summary when ``out`` is already complete."""
    marker = out / "summary.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    result = evaluate_strategies(
        cfg,
        real,
        out,
        {"synthetic": synthetic},
        {"synthetic": pairs},
        classifier=classifier,
        title="meddiff demo: judging the synthetic set",
    )
    summary = {
        "report": result["report"],
        "synthetic": str(synthetic[0]),
        "network": result["network"],
        "metrics": {m: cells.get("synthetic") for m, cells in result["table"].items()},
        "reader_study": result["reader_studies"].get("synthetic"),
    }
    write_json(marker, summary)
    print(f"\nEvaluation: {headline(summary['metrics'])}. Report: {summary['report']}")
    return summary


def headline(metrics: dict[str, Any]) -> str:
    """'FID 93.1 [88.0, 97.9], copy rate 0.012 [...]' (or the stand-in network's FD) from the
    demo summary's metrics."""
    from meddiff.reports import fmt

    parts = []
    for name, cell in metrics.items():
        if name == "fid" or name.startswith("fd_"):
            label = "FID (TF-FID Inception-v3)" if name == "fid" else name
            parts.append(f"{label} {fmt(cell, 4)}")
    if "copy_rate" in metrics:
        parts.append(f"copy rate {fmt(metrics['copy_rate'], 3)}")
    return ", ".join(parts) or "no fidelity metrics"
