"""The prompt table (``prompts.csv``) and the generation plan built from it.

``prompts.csv`` has one row per distinct prompt, with columns ``prompt``, ``label`` (0 healthy,
1 cancer), ``cluster`` (morphology cluster, -1 for a label-only prompt) and ``count`` (training
pairs with that prompt). The morphology-prompts stage writes it beside its (image, prompt) pairs.

A generation plan is one row per image to make: ``index``, ``prompt``, ``label``, ``cluster`` and
``seed`` (``generate.seed + index``, so any image can be regenerated alone).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meddiff.config.prompts import PromptsConfig
from meddiff.config.synthesis import GenerateConfig
from meddiff.errors import DataError

TABLE_COLUMNS = ("prompt", "label", "cluster", "count")


@dataclass(frozen=True)
class PromptRow:
    prompt: str
    label: int
    cluster: int
    count: int


def read_prompt_table(path: str | Path) -> list[PromptRow]:
    """Read and validate ``prompts.csv``.

    Raises:
        DataError: the file is missing, a column is missing, it has no rows, a value is not an
            integer, a label is not 0/1, or a prompt appears twice.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompt table {path} does not exist")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in TABLE_COLUMNS if c not in header]
        if missing:
            raise DataError(
                f"{path}: missing column(s) {', '.join(missing)}; "
                f"a prompt table has columns {', '.join(TABLE_COLUMNS)} (got {', '.join(header) or 'none'})"
            )
        rows = []
        for line, rec in enumerate(reader, start=2):
            try:
                row = PromptRow(
                    rec["prompt"].strip(), int(rec["label"]), int(rec["cluster"]), int(rec["count"])
                )
            except (AttributeError, TypeError, ValueError):  # a short row gives None fields
                raise DataError(
                    f"{path}, line {line}: label, cluster and count must be integers, got "
                    f"{rec['label']!r}, {rec['cluster']!r}, {rec['count']!r}"
                ) from None
            if row.label not in (0, 1):
                raise DataError(f"{path}, line {line}: label {row.label}; labels must be 0 or 1")
            if not row.prompt:
                raise DataError(f"{path}, line {line}: empty prompt")
            if row.count < 0:
                raise DataError(f"{path}, line {line}: negative count {row.count}")
            rows.append(row)
    if not rows:
        raise DataError(f"prompt table {path} has no rows; nothing to generate")
    seen: set[str] = set()
    for row in rows:
        if row.prompt in seen:
            raise DataError(f"{path}: prompt {row.prompt!r} appears more than once")
        seen.add(row.prompt)
    return rows


def write_prompt_table(path: str | Path, rows: list[PromptRow]) -> Path:
    """Write ``prompts.csv`` (the morphology-prompts stage's table, label-only tables)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(TABLE_COLUMNS)
        writer.writerows((r.prompt, r.label, r.cluster, r.count) for r in rows)
    return path


def label_only_table(rows: list[PromptRow], prompts: PromptsConfig) -> list[PromptRow]:
    """One label-only prompt per label present in ``rows`` (counts summed): the paper's baseline,
    worded by the prompts stage's ``baseline_template`` and ``label_words``."""
    from meddiff.morphology.prompts import prompt_for

    baseline = prompts.model_copy(update={"strategy": "baseline"})
    counts: dict[int, int] = {}
    for row in rows:
        counts[row.label] = counts.get(row.label, 0) + row.count
    return [
        PromptRow(prompt_for(lab, -1, baseline), lab, -1, n) for lab, n in sorted(counts.items())
    ]


def generation_plan(
    rows: list[PromptRow], cfg: GenerateConfig, prompts: PromptsConfig | None = None
) -> dict[str, np.ndarray]:
    """One entry per image to generate, grouped by prompt in table order.

    ``per_prompt``: ``images_per_prompt`` images for every prompt (balanced over the table).
    ``proportional``: ``total_images`` split by the ``count`` column (largest remainders), so the
    synthetic set has the real set's prompt mix.
    """
    if cfg.label_only:
        rows = label_only_table(rows, prompts or PromptsConfig())
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


def table_from_pairs(
    prompts: np.ndarray, labels: np.ndarray, clusters: np.ndarray
) -> list[PromptRow]:
    """The prompt table of a pairs set (one row per distinct prompt, in first-seen order)."""
    rows: dict[str, list[int]] = {}
    for p, lab, c in zip(prompts.tolist(), labels.tolist(), clusters.tolist(), strict=True):
        if p in rows:
            rows[p][2] += 1
        else:
            rows[p] = [int(lab), int(c), 1]
    return [PromptRow(p, lab, c, n) for p, (lab, c, n) in rows.items()]
