"""The evaluation report's content and the metric × strategy table.

Nothing here computes a metric: it lays out what :mod:`fidelity`, :mod:`classifier` and
:mod:`coverage` produced, so a person can open one file and see the whole comparison. A page is a
list of blocks (headings, paragraphs, notes, tables, figures: plain dicts built by the functions
below) that the report kit's ``evaluation.html`` template renders; pictures are inlined as PNG
data URIs, so the file opens offline and can be attached to an MLflow run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from meddiff.reports import Provenance, png_data_uri, write_page

METRIC_ORDER = ("precision", "recall", "density", "coverage")

Block = dict[str, Any]


def metric_rows(report: Mapping[str, Any]) -> list[str]:
    """Metric names of a fidelity report's overall block, distances first."""
    overall = report["overall"]
    return [report["fd_metric"], report["kd_metric"], *[m for m in METRIC_ORDER if m in overall]]


def comparison_table(
    fidelity: Mapping[str, Mapping[str, Any]],
    classifier: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """The paper-style table ``{metric: {strategy: value-dict}}``.

    ``fidelity`` maps strategy → fidelity report; ``classifier`` maps strategy → {arm: result}
    (synthetic-only and real + synthetic AUC/accuracy rows are added per strategy).
    """
    table: dict[str, dict[str, Any]] = {}
    for strategy, report in fidelity.items():
        for metric in metric_rows(report):
            table.setdefault(metric, {})[strategy] = report["overall"][metric]
    for strategy, arms in (classifier or {}).items():
        for arm, result in arms.items():
            for key in ("auc", "accuracy"):
                table.setdefault(f"classifier_{arm}_{key}", {})[strategy] = result[key]
    return table


def heading(text: str, level: int = 2) -> Block:
    return {"kind": "heading", "text": text, "level": level}


def paragraph(text: str, cls: str = "") -> Block:
    return {"kind": "paragraph", "text": text, "cls": cls}


def note(text: str) -> Block:
    """A highlighted remark a reader must not miss (e.g. the feature network is not FID's)."""
    return {"kind": "note", "text": text}


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> Block:
    """A table; the first cell of each row heads it, the others are values for
    :func:`meddiff.reports.fmt` (metric dicts show ``value [lo, hi]``)."""
    return {"kind": "table", "headers": list(headers), "rows": [list(r) for r in rows]}


def figure(png: np.ndarray | bytes | str | Path, caption: str = "") -> Block:
    """A picture (uint8 array, PNG bytes or PNG file), inlined, with its caption."""
    return {"kind": "figure", "src": png_data_uri(png), "caption": caption}


def write_html(
    path: str | Path, title: str, blocks: Sequence[Block], provenance: Provenance | None = None
) -> Path:
    """The page at ``path``, written all or nothing (never a half-written report)."""
    return write_page(path, "evaluation.html", title=title, blocks=blocks, provenance=provenance)


def strata_block(report: Mapping[str, Any], key: str, title: str) -> list[Block]:
    """A table of one stratification (``by_label`` / ``by_prompt``) of a fidelity report."""
    strata = report.get(key)
    if strata is None:
        return []
    if "skipped" in strata and isinstance(strata["skipped"], str):
        return [heading(title, 3), paragraph(f"Not computed: {strata['skipped']}.", "small")]
    metrics = metric_rows(report)
    rows = []
    for name, item in strata.items():
        cells = [item.get(m) if "skipped" not in item else None for m in metrics]
        if "skipped" in item:
            cells[0] = {"skipped": item["skipped"]}
        rows.append([name, item.get("n_real"), item.get("n_synthetic"), *cells])
    return [heading(title, 3), table(["stratum", "n real", "n synthetic", *metrics], rows)]


def fidelity_blocks(name: str, report: Mapping[str, Any]) -> list[Block]:
    """Overall and stratified tables of one fidelity report."""
    overall = report["overall"]
    metrics = metric_rows(report)
    kind = (
        "FID Inception-v3"
        if report["is_fid"]
        else "not the FID Inception: distances are named after this network"
    )
    blocks = [
        heading(f"Fidelity and diversity: {name}"),
        paragraph(
            f"Features: {report['network']} ({kind}). Real set {report['real']} "
            f"({overall['n_real']} images), synthetic set {report['synthetic']} "
            f"({overall['n_synthetic']} images). Brackets: bootstrap confidence intervals.",
            "small",
        ),
        table(["metric", "value [CI]"], [[m, overall[m]] for m in metrics]),
    ]
    blocks += [
        note(item["warning"])
        for item in overall.values()
        if isinstance(item, Mapping) and item.get("warning")
    ]
    blocks += strata_block(report, "by_label", "Per label")
    blocks += strata_block(report, "by_prompt", "Per prompt")
    return blocks
