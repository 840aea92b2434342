"""Self-contained HTML reports (pictures inlined as base64 PNG) and the metric × strategy table.

Nothing here computes a metric: it lays out what :mod:`fidelity`, :mod:`classifier` and
:mod:`coverage` produced, so a person can open one file and see the whole comparison.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from meddiff.files import write_text

METRIC_ORDER = ("precision", "recall", "density", "coverage")


def fmt(item: Any, digits: int = 4) -> str:
    """``value [lo, hi]`` for a metric dict, a plain number, or '–'."""
    if item is None:
        return "–"
    if isinstance(item, Mapping):
        if "value" not in item:
            return html.escape(str(item.get("skipped", "–")))
        text = _num(item["value"], digits)
        if item.get("ci"):
            lo, hi = item["ci"]
            text += f" [{_num(lo, digits)}, {_num(hi, digits)}]"
        if item.get("reliable") is False:
            text += " (unreliable: fewer samples than feature dimensions)"
        return text
    return _num(item, digits)


def _num(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{float(value):.{digits}g}"


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


def table_html(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{c if isinstance(c, _Raw) else fmt(c)}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class _Raw(str):
    """Text already escaped for HTML."""


def raw(text: str) -> _Raw:
    return _Raw(text)


def text_cell(text: str) -> _Raw:
    return _Raw(html.escape(text))


def png_data_uri(png: bytes | str | Path) -> str:
    data = Path(png).read_bytes() if isinstance(png, (str, Path)) else png
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def image_html(png: bytes | str | Path, caption: str = "", width: int | None = None) -> str:
    style = f' style="max-width:{width}px"' if width else ""
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return (
        f'<figure><img src="{png_data_uri(png)}"{style} alt="{html.escape(caption)}">{cap}</figure>'
    )


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W, 3) → PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}.note{background:#fff6d6;border:1px solid #e8d48a;padding:.6em;margin:.8em 0}
figure{display:inline-block;margin:.5em 1em .5em 0}figcaption{font-size:.85em;color:#555}
img{max-width:100%;image-rendering:pixelated}.small{color:#666;font-size:.85em}
"""


def html_page(title: str, blocks: Sequence[str]) -> str:
    body = "\n".join(blocks)
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n"
    )


def write_html(path: str | Path, title: str, blocks: Sequence[str]) -> Path:
    """Write the page to a temporary name and rename it (never a half-written report)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, html_page(title, blocks))
    return path


def heading(text: str, level: int = 2) -> str:
    return f"<h{level}>{html.escape(text)}</h{level}>"


def paragraph(text: str, cls: str = "") -> str:
    klass = f' class="{cls}"' if cls else ""
    return f"<p{klass}>{html.escape(text)}</p>"


def strata_block(report: Mapping[str, Any], key: str, title: str) -> list[str]:
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
        rows.append([text_cell(name), item.get("n_real"), item.get("n_synthetic"), *cells])
    return [heading(title, 3), table_html(["stratum", "n real", "n synthetic", *metrics], rows)]


def fidelity_blocks(name: str, report: Mapping[str, Any]) -> list[str]:
    """Overall and stratified tables of one fidelity report."""
    overall = report["overall"]
    metrics = metric_rows(report)
    blocks = [
        heading(f"Fidelity and diversity: {name}"),
        paragraph(
            f"Features: {report['network']} ({'FID Inception-v3' if report['is_fid'] else 'not the FID Inception: distances are named after this network'}). "
            f"Real set {report['real']} ({overall['n_real']} images), synthetic set "
            f"{report['synthetic']} ({overall['n_synthetic']} images). Brackets: bootstrap "
            "confidence intervals.",
            "small",
        ),
        table_html(["metric", "value [CI]"], [[text_cell(m), overall[m]] for m in metrics]),
    ]
    blocks += [
        paragraph(item["warning"], "note")
        for item in overall.values()
        if isinstance(item, Mapping) and item.get("warning")
    ]
    blocks += strata_block(report, "by_label", "Per label")
    blocks += strata_block(report, "by_prompt", "Per prompt")
    return blocks
