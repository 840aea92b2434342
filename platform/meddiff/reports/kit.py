"""Jinja2 environment, provenance header, value formatting, PNG data URIs and the run index."""

from __future__ import annotations

import base64
import hashlib
import io
import math
import os
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from meddiff.files import write_text


@dataclass(frozen=True)
class Provenance:
    """What produced a page; shown in every page's header. Empty fields are left out."""

    command: str = ""
    config_digest: str = ""
    model: str = ""
    code_version: str = ""
    time: str = ""


def provenance(cfg: Any = None, *, model: str | Path | None = None, command: str | None = None):
    """The :class:`Provenance` of a page made now by this process.

    ``cfg`` (a :class:`meddiff.config.Config`) gives the config digest: the first 12 hex digits of
    the SHA-256 of its YAML (the ``config.yaml`` every MLflow run logs), so two pages with the same
    digest came from the same settings. ``command`` defaults to this process's command line.
    """
    from meddiff.tracking import code_version

    digest = ""
    if cfg is not None:
        from meddiff.config import config_to_yaml

        digest = hashlib.sha256(config_to_yaml(cfg).encode()).hexdigest()[:12]
    return Provenance(
        command=command if command is not None else _command_line(),
        config_digest=digest,
        model=str(model) if model else "",
        code_version=code_version(),
        time=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


# The command this process runs, as the user typed it; set by meddiff.cli.main (which jobs and
# tests also call with their own argument lists, so sys.argv is not always it).
COMMAND: str | None = None


def _command_line() -> str:
    if COMMAND is not None:
        return COMMAND
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("meddiff", "__main__.py", "cli.py"):
        argv[0] = "meddiff"
    return shlex.join(argv)


def fmt(item: Any, digits: int = 4) -> str:
    """Text of a table cell: ``value [lo, hi]`` for a metric dict ({"value", "ci"}, flagged when
    ``"reliable": False``), its ``skipped`` reason, a number to ``digits`` significant digits, '–' for None/NaN, else str."""
    if item is None:
        return "–"
    if isinstance(item, Mapping):
        if "value" not in item:
            return str(item.get("skipped", "–"))
        text = _num(item["value"], digits)
        if item.get("ci"):
            lo, hi = item["ci"]
            text += f" [{_num(lo, digits)}, {_num(hi, digits)}]"
        if item.get("reliable") is False:
            text += " (unreliable: fewer samples than feature dimensions)"
        return text
    if isinstance(item, (bool, str)):
        return str(item)
    if isinstance(item, (int, float, np.integer, np.floating)):
        return _num(item, digits)
    return str(item)


def _num(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return "–"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{float(value):.{digits}g}"


def breakable(text: Any):
    """Escaped ``text`` that may wrap after ``_``, ``/`` and ``.`` (metric names and paths are
    long words: without this a table header or a path widens the page)."""
    from markupsafe import Markup, escape

    return Markup(re.sub(r"([_/.])", r"\1<wbr>", str(escape(str(text)))))


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W), (H, W, 3) or (H, W, 4) → PNG bytes (lossless).

    Raises:
        ValueError: another dtype or shape (a float image must be scaled to 0..255 first).
    """
    from PIL import Image

    a = np.asarray(image)
    if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ValueError(f"encode_png takes uint8 (H, W[, 3|4]); got {a.dtype} {a.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a)).save(buf, format="PNG")
    return buf.getvalue()


def png_data_uri(png: np.ndarray | bytes | str | Path) -> str:
    """``data:image/png;base64,...`` of a uint8 image array (see :func:`encode_png`), PNG bytes,
    or a PNG file's path."""
    if isinstance(png, np.ndarray):
        data = encode_png(png)
    elif isinstance(png, (str, Path)):
        data = Path(png).read_bytes()
    else:
        data = bytes(png)
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


@cache
def environment():
    """The kit's Jinja2 environment: package templates, autoescaping on, undefined names fail."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("meddiff.reports", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["fmt"] = fmt
    env.filters["breakable"] = breakable
    env.filters["datauri"] = png_data_uri
    return env


def render(template: str, /, **context: Any) -> str:
    """A package template (e.g. ``"thor.html"``) rendered with ``context``."""
    return environment().get_template(template).render(**context)


def render_source(source: str, /, **context: Any) -> str:
    """Template text (not a file: e.g. an HTTP handler's page) rendered in the kit's environment,
    so it can ``{% extends "base.html" %}`` and use ``macros.html``."""
    return environment().from_string(source).render(**context)


def write_page(path: str | Path, template: str, /, **context: Any) -> Path:
    """Render ``template`` and write it at ``path`` all or nothing; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, render(template, **context))
    return path


@dataclass
class IndexStep:
    """One row of a run index: a step, how it ended, how long it took, what it found and made.

    ``status``: ``done``, ``failed`` or ``not run``; ``links`` maps a label to a file (made
    relative to the index); ``figures`` maps a label to a value (formatted with :func:`fmt`).
    """

    name: str
    status: str = "done"
    seconds: float | None = None
    figures: Mapping[str, Any] = field(default_factory=dict)
    links: Mapping[str, str | Path] = field(default_factory=dict)
    error: str = ""


@dataclass
class Section:
    """A titled table on a run index (e.g. THOR vs DDPM), with an optional note under it."""

    title: str
    headers: Sequence[str]
    rows: Sequence[Sequence[Any]]
    note: str = ""


def write_index(
    out: str | Path,
    title: str,
    steps: Sequence[IndexStep],
    *,
    sections: Sequence[Section] = (),
    prov: Provenance | None = None,
) -> Path:
    """``out/index.html``: one row per step (status, time, figures, links to its reports), then
    the ``sections``. Links that point at missing files are listed as missing, not linked."""
    out = Path(out)
    rows = []
    for step in steps:
        links = []
        for label, target in step.links.items():
            p = Path(target)
            if not p.is_absolute() and not p.exists():
                p = out / p  # relative to the run folder (jobs' summaries name cwd-relative paths)
            links.append(
                {
                    "label": label,
                    "href": quote(Path(os.path.relpath(p.resolve(), out.resolve())).as_posix()),
                    "exists": p.exists(),
                }
            )
        rows.append({"step": step, "links": links})
    return write_page(
        out / "index.html",
        "index.html",
        title=title,
        steps=rows,
        sections=sections,
        provenance=prov or provenance(),
    )


def pages_under(out: str | Path, depth: int = 3) -> list[Path]:
    """The HTML pages under ``out`` (at most ``depth`` folders down), its own index left out."""
    out = Path(out)
    found = []
    for level in range(depth + 1):
        pattern = "/".join(["*"] * level + ["*.html"])
        found += [p for p in out.glob(pattern) if p != out / "index.html" and p.is_file()]
    return sorted(found)


def index_folder(
    out: str | Path,
    title: str,
    *,
    seconds: float | None = None,
    figures: Mapping[str, Any] | None = None,
    prov: Provenance | None = None,
) -> Path | None:
    """``out/index.html`` for a finished job: one row (the job, its time and figures) linking
    every page under ``out``. Returns None, writing nothing, when ``out`` holds no page (a shard
    folder, a model folder: nothing a person opens)."""
    pages = pages_under(out)
    if not pages:
        return None
    links = {p.relative_to(out).as_posix(): p for p in pages}
    step = IndexStep(title, "done", seconds, dict(figures or {}), links)
    return write_index(out, title, [step], prov=prov)
