"""Prompt text: the label word, and for the morphology strategy the cluster index in words.

Paper A's prompts: "Histology image of {label} tissue, morphology type {cluster}" with the cluster
index written in English words ("zero", ..., "thirty-two"), and a baseline that carries the label
only. Templates and label words come from :class:`meddiff.config.prompts.PromptsConfig`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from meddiff.config.prompts import PromptsConfig
from meddiff.errors import DataError
from meddiff.synthesis.prompts import PromptRow

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


def label_word(label: int, cfg: PromptsConfig) -> str:
    """The word for a label: ``label_words[label]``, or ``unlabelled_word`` for -1."""
    label = int(label)
    if label == -1:
        return cfg.unlabelled_word
    if 0 <= label < len(cfg.label_words):
        return cfg.label_words[label]
    raise DataError(
        f"label {label} has no word in prompts.label_words {cfg.label_words} "
        "(labels are 0..n-1, or -1 for unlabelled)"
    )


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
    clusters = np.asarray(clusters, dtype=np.int64)
    if cfg.strategy == "baseline":
        clusters = np.full_like(labels, -1)
    pairs, inverse = np.unique(np.stack([labels, clusters], axis=1), axis=0, return_inverse=True)
    texts = np.array([prompt_for(lab, clu, cfg) for lab, clu in pairs], dtype=object)
    return texts[inverse.reshape(-1)] if len(labels) else np.empty(0, dtype=object)


def prompt_table(
    labels: Iterable[int], clusters: Iterable[int], cfg: PromptsConfig
) -> list[PromptRow]:
    """One row per distinct prompt with its pair count, sorted by label then cluster."""
    labels = np.asarray(list(labels), dtype=np.int64)
    clusters = np.asarray(list(clusters), dtype=np.int64)
    if cfg.strategy == "baseline":
        clusters = np.full_like(labels, -1)
    if len(labels) == 0:
        return []
    pairs, counts = np.unique(np.stack([labels, clusters], axis=1), axis=0, return_counts=True)
    return [
        PromptRow(prompt_for(int(lab), int(clu), cfg), int(lab), int(clu), int(count))
        for (lab, clu), count in zip(pairs, counts, strict=True)
    ]
