"""One table from several runs of ``meddiff eval compare-prompting`` or ``meddiff thor evaluate``
that differ only in their seed: each metric's value per seed, the mean and the sample standard
deviation across seeds, and in how many seeds each strategy (prompt strategy or THOR method) came
out best.

A compare-prompting run's ``evaluation/comparison.json`` (metric → strategy → value or
``{"value", "lo", "hi"}`` with the bootstrap interval) is read, plus the per-label strata of
``evaluation/fidelity.json`` (label 0 and label 1 are the baseline's two prompts, so both arms
have them); the intervals and the per-morphology-prompt strata stay in each run's report. A THOR
evaluation's ``metrics.json`` gives the pixel AUPRC, pixel AUROC, best Dice and image AUROC of
each method, and the pixel AUPRC per lesion-size stratum (all higher-is-better).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from meddiff.errors import DataError
from meddiff.files import write_text

TABLE = Path("evaluation") / "comparison.json"
THOR_METRICS = Path("metrics.json")  # written by `meddiff thor evaluate --out`
FIDELITY = Path("evaluation") / "fidelity.json"
# Distances (Fréchet, kernel: FID/KID or a stand-in network's FD/KD) and the memorization audit's
# copy rates: lower is better; every other metric in the table is higher-better.
LOWER_IS_BETTER = ("fd_", "kd_", "fid", "kid", "copy_rate")  # also "fid (label 0)" rows


def _value(cell: Any) -> float:
    value = cell["value"] if isinstance(cell, dict) else cell
    return float("nan") if value is None else float(value)


def read_runs(runs: list[str | Path]) -> list[dict[str, dict[str, Any]]]:
    """Each run's comparison table.

    Raises:
        DataError: a run has neither ``evaluation/comparison.json`` nor ``metrics.json`` (not
            finished), or fewer than two runs are given.
    """
    if len(runs) < 2:
        raise DataError(f"give at least two runs to compare across seeds, got {len(runs)}")
    tables = []
    for run in runs:
        path = Path(run) / TABLE
        if (Path(run) / THOR_METRICS).is_file() and not path.is_file():
            tables.append(_thor_rows(json.loads((Path(run) / THOR_METRICS).read_text())))
            continue
        if not path.is_file():
            raise DataError(
                f"{run}: no {TABLE} or {THOR_METRICS} "
                "(has `eval compare-prompting` or `thor evaluate` finished there?)"
            )
        table = json.loads(path.read_text())
        if (Path(run) / FIDELITY).is_file():
            table.update(_label_rows(json.loads((Path(run) / FIDELITY).read_text())))
        tables.append(table)
    return tables


def _label_rows(fidelity: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"<metric> (label L)": {strategy: value}}`` from the fidelity strata by label."""
    rows: dict[str, dict[str, Any]] = {}
    for strategy, result in fidelity.get("sets", {}).items():
        for label, cells in sorted(result.get("by_label", {}).items()):
            for metric, cell in cells.items():
                if isinstance(cell, dict) and "value" in cell:
                    rows.setdefault(f"{metric} (label {label})", {})[strategy] = cell["value"]
    return rows


def _thor_rows(metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{metric: {method: value}}`` from a ``thor evaluate`` metrics.json."""
    rows: dict[str, dict[str, Any]] = {}
    for method, result in metrics.get("methods", {}).items():
        m = result["metrics"]
        cells = {
            "pixel_auprc": m["pixel"]["auprc"],
            "pixel_auroc": m["pixel"]["auroc"],
            "best_dice": m["pixel"]["best_dice"],
            "image_auroc": m.get("image_auroc"),
            **{f"pixel_auprc ({k})": v["auprc"] for k, v in m.get("strata", {}).items()},
        }
        for metric, value in cells.items():
            rows.setdefault(metric, {})[method] = value
    return rows


def summarize(tables: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{metric: {strategy: {"values", "mean", "sd", "best_in"}}}`` over the metrics and
    strategies every table has; ``sd`` is the sample standard deviation (n - 1), ``best_in`` the
    number of seeds in which that strategy had the best value of the metric."""
    metrics = [m for m in tables[0] if all(m in t for t in tables)]
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for metric in metrics:
        strategies = [s for s in tables[0][metric] if all(s in t[metric] for t in tables)]
        values = {s: [_value(t[metric][s]) for t in tables] for s in strategies}
        lower = metric.startswith(LOWER_IS_BETTER)
        wins = dict.fromkeys(strategies, 0)
        for i in range(len(tables)):
            seed_values = {s: v[i] for s, v in values.items() if not math.isnan(v[i])}
            if len(seed_values) > 1 and len(set(seed_values.values())) > 1:
                pick = min if lower else max
                wins[pick(seed_values, key=seed_values.get)] += 1
        out[metric] = {
            s: {"values": v, "mean": _mean(v), "sd": _sd(v), "best_in": wins[s]}
            for s, v in values.items()
        }
    return out


def _mean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def _sd(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    if len(kept) < 2:
        return float("nan")
    m = sum(kept) / len(kept)
    return math.sqrt(sum((v - m) ** 2 for v in kept) / (len(kept) - 1))


def markdown(summary: dict[str, dict[str, dict[str, Any]]], seeds: int) -> str:
    """The summary as a Markdown table: ``mean ± sd (best in k/n)`` per strategy."""
    strategies = list(next(iter(summary.values()), {}))
    lines = [
        "| metric | " + " | ".join(strategies) + " |",
        "|---|" + "---|" * len(strategies),
    ]
    for metric, cells in summary.items():
        many = len(cells) > 1  # "best in" only means something with strategies to beat
        row = [
            f"{c['mean']:.3f} ± {c['sd']:.3f}"
            + (f" (best in {c['best_in']}/{seeds})" if many else "")
            for c in cells.values()
        ]
        lines.append(f"| {metric} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def table_csv(summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    """One row per metric and strategy: mean, sd, best_in and the per-seed values."""
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["metric", "strategy", "mean", "sd", "best_in", "values"])
    for metric, cells in summary.items():
        for strategy, c in cells.items():
            values = " ".join(f"{v:.6g}" for v in c["values"])
            writer.writerow([metric, strategy, f"{c['mean']:.6g}", f"{c['sd']:.6g}", c["best_in"],
                             values])  # fmt: skip
    return rows.getvalue()


def summarize_runs(runs: list[str | Path], out: str | Path | None = None) -> dict[str, Any]:
    """Read ``runs``, summarize, and (with ``out``) write ``seeds.json`` and ``seeds.csv`` there;
    the result's ``markdown`` is the table as the CLI prints it."""
    summary = summarize(read_runs(runs))
    text = markdown(summary, len(runs))
    result: dict[str, Any] = {"runs": [str(r) for r in runs], "table": summary, "markdown": text}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "seeds.json", json.dumps(result, indent=2, default=float))
        write_text(out / "seeds.csv", table_csv(summary))
        result["files"] = [str(out / "seeds.json"), str(out / "seeds.csv")]
    return result
