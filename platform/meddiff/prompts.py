"""Prompts: their text, the prompt table (``prompts.csv``) and the checks both stages share.

The one home of the prompt rules; the morphology-prompts stage writes with it, the gallery names
labels with it, and training and generation read with it.

**Text** (paper A, Osorio et al.): ``prompts.template`` ("Histology image of {label} tissue,
morphology type {cluster}") with the cluster index in English words ("zero" … "thirty-two"), or
``prompts.baseline_template`` (label only). ``{label}`` is ``prompts.label_words[label]``.

**Unknown labels.** Label -1 means "unknown" everywhere in meddiff (shards, pairs, the table):
tiles cut from a whole slide without a ``labels.csv`` have it. Their prompt uses the same template
with ``prompts.unlabelled_word`` as the label part ("Histology image of unlabelled tissue,
morphology type five"), so the morphology part is kept and the model learns it. The table holds
such rows like any other; generation, whose output is a labelled set (the PCam layout, labels 0/1),
makes images for the labelled rows only and says how many it left out.

**Table** (``prompts.csv``): one row per distinct prompt, columns ``prompt``, ``label`` (-1 or
0..len(label_words)-1), ``cluster`` (morphology type, -1 for a label-only prompt) and ``count``
(training pairs with that prompt). One builder (:func:`table_of`) makes every table; the writer and
the reader apply the same row check (:func:`check_rows`), so the reader accepts what the writer
writes.

**Length.** A text encoder reads at most ``tokenizer.model_max_length`` tokens (77 for Stable
Diffusion's CLIP, ``synthesis.model.arch.max_length`` for a model built from config) and drops the
rest. :func:`check_token_lengths` runs when the table is built and again before training: distinct
prompts that become the same tokens are an error, prompts that are only shortened a warning.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from meddiff.config.prompts import PromptsConfig
from meddiff.errors import DataError, ModelError

if TYPE_CHECKING:
    from meddiff.config import Config

log = logging.getLogger(__name__)

UNLABELLED = -1
TABLE_COLUMNS = ("prompt", "label", "cluster", "count")

# --- text -----------------------------------------------------------------------------------

_ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_SCALES = ((10**9, "billion"), (10**6, "million"), (1000, "thousand"))


def number_to_words(n: int) -> str:
    """English words for a non-negative integer: 32 → "thirty-two", 105 → "one hundred five"."""
    n = int(n)
    if n < 0:
        raise ValueError(f"number_to_words needs a non-negative integer, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return f"{_ONES[hundreds]} hundred" + (f" {number_to_words(rest)}" if rest else "")
    for value, name in _SCALES:
        if n >= value:
            head, rest = divmod(n, value)
            return f"{number_to_words(head)} {name}" + (f" {number_to_words(rest)}" if rest else "")
    raise AssertionError("unreachable")


def label_problem(label: int, cfg: PromptsConfig) -> str | None:
    """Why ``label`` is not a valid prompt label (None when it is): -1 or 0..n-1."""
    if label == UNLABELLED or 0 <= label < len(cfg.label_words):
        return None
    return (
        f"label {label} has no word in prompts.label_words {cfg.label_words} "
        f"(labels are 0..{len(cfg.label_words) - 1}, or -1 for unlabelled)"
    )


def label_word(label: int, cfg: PromptsConfig) -> str:
    """The word for a label: ``label_words[label]``, or ``unlabelled_word`` for -1.

    Raises:
        DataError: any other label.
    """
    label = int(label)
    problem = label_problem(label, cfg)
    if problem:
        raise DataError(problem)
    return cfg.unlabelled_word if label == UNLABELLED else cfg.label_words[label]


def prompt_for(label: int, cluster: int, cfg: PromptsConfig) -> str:
    """The prompt of one patch; ``cluster`` is ignored (and may be -1) for the baseline."""
    word = label_word(label, cfg)
    if cfg.strategy == "baseline":
        return cfg.baseline_template.format(label=word)
    if cluster < 0:
        raise DataError(f"the morphology strategy needs a cluster index, got {cluster}")
    return cfg.template.format(label=word, cluster=number_to_words(cluster))


def prompts_for(labels: Sequence[int], clusters: Sequence[int], cfg: PromptsConfig) -> np.ndarray:
    """Prompts of many patches (object array of str); each distinct pair is formatted once."""
    labels = np.asarray(labels, dtype=np.int64)
    clusters = _clusters(labels, clusters, cfg)
    if len(labels) == 0:
        return np.empty(0, dtype=object)
    pairs, inverse = np.unique(np.stack([labels, clusters], axis=1), axis=0, return_inverse=True)
    texts = np.array([prompt_for(lab, clu, cfg) for lab, clu in pairs], dtype=object)
    return texts[inverse.reshape(-1)]


def _clusters(labels: np.ndarray, clusters: Sequence[int], cfg: PromptsConfig) -> np.ndarray:
    """The cluster column as prompts use it: -1 throughout for the label-only baseline."""
    if cfg.strategy == "baseline":
        return np.full_like(labels, -1)
    return np.asarray(clusters, dtype=np.int64)


# --- the table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptRow:
    prompt: str
    label: int
    cluster: int
    count: int


def table_of(
    prompts: Iterable[str],
    labels: Iterable[int],
    clusters: Iterable[int],
    counts: Iterable[int] | None = None,
) -> list[PromptRow]:
    """The prompt table of (prompt, label, cluster) entries, each counted once or ``counts`` times:
    one row per distinct prompt, sorted by label, cluster, prompt.

    Raises:
        DataError: one prompt text stands for two (label, cluster) pairs (training could not tell
            them apart).
    """
    prompts, labels, clusters = list(prompts), list(labels), list(clusters)
    weights = [1] * len(prompts) if counts is None else list(counts)
    rows: dict[str, list[int]] = {}
    for p, lab, c, n in zip(prompts, labels, clusters, weights, strict=True):
        p, lab, c = str(p), int(lab), int(c)
        have = rows.setdefault(p, [lab, c, 0])
        if (have[0], have[1]) != (lab, c):
            raise DataError(
                f"prompt {p!r} stands for label {have[0]}, cluster {have[1]} and for label {lab}, "
                f"cluster {c}; each (label, cluster) needs its own prompt"
            )
        have[2] += int(n)
    table = [PromptRow(p, lab, c, n) for p, (lab, c, n) in rows.items()]
    return sorted(table, key=lambda r: (r.label, r.cluster, r.prompt))


def prompt_table(
    labels: Iterable[int], clusters: Iterable[int], cfg: PromptsConfig
) -> list[PromptRow]:
    """The table of patches with these labels and clusters, worded by ``cfg``."""
    labels = np.asarray(list(labels), dtype=np.int64)
    clusters = _clusters(labels, list(clusters), cfg)
    return table_of(prompts_for(labels, clusters, cfg), labels, clusters)


def table_from_pairs(
    prompts: np.ndarray, labels: np.ndarray, clusters: np.ndarray
) -> list[PromptRow]:
    """The table of a pairs set whose prompts are already written."""
    return table_of(prompts.tolist(), labels.tolist(), clusters.tolist())


def label_only_table(rows: list[PromptRow], cfg: PromptsConfig) -> list[PromptRow]:
    """One label-only prompt per label present in ``rows`` (counts summed): the paper's baseline,
    worded by ``baseline_template`` and ``label_words``."""
    baseline = cfg.model_copy(update={"strategy": "baseline"})
    return table_of(
        (prompt_for(r.label, -1, baseline) for r in rows),
        (r.label for r in rows),
        (-1 for _ in rows),
        (r.count for r in rows),
    )


def merge_tables(*tables: list[PromptRow]) -> list[PromptRow]:
    """One table over several (e.g. PCam pairs and slide-tile pairs trained together); counts of
    a prompt present in several are summed."""
    rows = [r for t in tables for r in t]
    return table_of(
        (r.prompt for r in rows),
        (r.label for r in rows),
        (r.cluster for r in rows),
        (r.count for r in rows),
    )


def labelled_rows(rows: list[PromptRow]) -> tuple[list[PromptRow], list[PromptRow]]:
    """The rows with a known label and those with label -1 (unknown), in table order."""
    known = [r for r in rows if r.label != UNLABELLED]
    return known, [r for r in rows if r.label == UNLABELLED]


def check_rows(rows: Iterable[tuple[int, PromptRow]], cfg: PromptsConfig, where: str) -> None:
    """The rule every table obeys, for (line, row) pairs: a non-empty prompt, a label
    :func:`label_problem` accepts, cluster ≥ -1, count ≥ 0, no prompt twice.

    Raises:
        DataError: naming ``where`` and the line.
    """
    seen: dict[str, int] = {}
    for line, row in rows:
        at = f"{where}, line {line}"
        if not row.prompt:
            raise DataError(f"{at}: empty prompt")
        problem = label_problem(row.label, cfg)
        if problem:
            raise DataError(f"{at}: {problem}")
        if row.cluster < -1:
            raise DataError(f"{at}: cluster {row.cluster}; clusters are 0..k-1, or -1 for none")
        if row.count < 0:
            raise DataError(f"{at}: negative count {row.count}")
        if row.prompt in seen:
            raise DataError(
                f"{where}: prompt {row.prompt!r} appears more than once (lines {seen[row.prompt]} "
                f"and {line})"
            )
        seen[row.prompt] = line


def read_prompt_table(path: str | Path, cfg: PromptsConfig | None = None) -> list[PromptRow]:
    """Read and check ``prompts.csv`` (labels against ``cfg``'s words; default: 0/1, -1).

    Raises:
        DataError: the file is missing, a column is missing, it has no rows, a value is not an
            integer, or a row breaks :func:`check_rows`.
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
            rows.append((line, row))
    if not rows:
        raise DataError(f"prompt table {path} has no rows; nothing to generate")
    check_rows(rows, cfg or PromptsConfig(), str(path))
    return [row for _, row in rows]


def write_prompt_table(
    path: str | Path, rows: list[PromptRow], cfg: PromptsConfig | None = None
) -> Path:
    """Write ``prompts.csv`` atomically after the reader's own check (so it always reads back).

    Raises:
        DataError: a row breaks :func:`check_rows`.
    """
    from meddiff.files import write_text

    path = Path(path)
    check_rows(enumerate(rows, start=2), cfg or PromptsConfig(), str(path))
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(TABLE_COLUMNS)
    writer.writerows((r.prompt, r.label, r.cluster, r.count) for r in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, buf.getvalue())
    return path


# --- length in tokens -----------------------------------------------------------------------


def check_token_lengths(prompts: Iterable[str], tokenizer: Any, where: str) -> dict[str, int]:
    """Check ``prompts`` against the text encoder's limit, ``tokenizer.model_max_length`` tokens
    (start and end tokens included), as training truncates them.

    Returns ``{"max_tokens", "limit", "shortened", "token_sequences"}``; logs a warning naming a
    shortened prompt when any is longer than the limit.

    Raises:
        DataError: distinct prompts become the same token sequence (truncation cut off what told
            them apart, e.g. the morphology type; or the tokenizer's normalisation merged them).
    """
    prompts = sorted({str(p) for p in prompts})
    limit = int(tokenizer.model_max_length)
    full = tokenizer(prompts, truncation=False, verbose=False)["input_ids"] if prompts else []
    cut = (
        tokenizer(prompts, truncation=True, max_length=limit, verbose=False)["input_ids"]
        if prompts
        else []
    )
    groups: dict[tuple[int, ...], list[str]] = {}
    for prompt, ids in zip(prompts, cut, strict=True):
        groups.setdefault(tuple(ids), []).append(prompt)
    shortened = [p for p, ids in zip(prompts, full, strict=True) if len(ids) > limit]
    merged = [g for g in groups.values() if len(g) > 1]
    if merged:
        a, b = merged[0][:2]
        truncated = a in shortened or b in shortened
        cause = f"are cut to the text encoder's {limit} tokens" if truncated else "tokenize alike"
        raise DataError(
            f"{where}: {len(prompts)} distinct prompts {cause} and become {len(groups)} token "
            f"sequences, e.g. {a!r} and {b!r}; shorten prompts.template (or prompts.label_words) "
            "so what tells prompts apart fits"
            + (", or raise synthesis.model.arch.max_length" if truncated else "")
        )
    if shortened:
        log.warning(
            "%s: %d of %d prompts are longer than the text encoder's %d tokens and are cut, "
            "e.g. %r (%d tokens); they stay distinct",
            where,
            len(shortened),
            len(prompts),
            limit,
            shortened[0],
            len(full[prompts.index(shortened[0])]),
        )
    return {
        "max_tokens": max((len(ids) for ids in full), default=0),
        "limit": limit,
        "shortened": len(shortened),
        "token_sequences": len(groups),
    }


def check_table_tokens(cfg: Config, prompts: Sequence[str], where: str) -> dict[str, int] | None:
    """:func:`check_token_lengths` with the tokenizer ``cfg.synthesis.model`` will train with, when
    the prompt table is built; None (and a log line) when that tokenizer is not at hand offline
    (a hub model not downloaded yet): training checks again."""
    from meddiff.synthesis.components import load_tokenizer

    try:
        tokenizer = load_tokenizer(cfg.synthesis.model, prompts, local_files_only=True)
    except ModelError as err:
        log.info("prompt lengths not checked now (%s); training checks them", err)
        return None
    return check_token_lengths(prompts, tokenizer, where)


def check_training_prompts(cfg: Config, pairs: str | Path, source: str | Path) -> dict[str, int]:
    """:func:`check_token_lengths` on the distinct prompts of the pairs directory ``pairs`` with
    the tokenizer of the model to fine-tune (``source``), on the driver before training.

    Raises:
        DataError: truncation merges distinct prompts.
        ModelError: the tokenizer cannot be loaded.
    """
    from meddiff.synthesis.cache import pair_prompts
    from meddiff.synthesis.components import load_tokenizer

    prompts = pair_prompts(pairs)
    tokenizer = load_tokenizer(cfg.synthesis.model, prompts, source=source)
    return check_token_lengths(prompts, tokenizer, str(pairs))
