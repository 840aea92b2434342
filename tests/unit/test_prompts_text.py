"""Prompt text for both strategies, number words, and the distinct-prompt table."""

from __future__ import annotations

import numpy as np
import pytest

from meddiff.config import ConfigError, load_config
from meddiff.errors import DataError
from meddiff.prompts import number_to_words, prompt_for, prompt_table, prompts_for


def test_number_words():
    words = [number_to_words(i) for i in range(33)]
    assert words[:3] == ["zero", "one", "two"]
    assert words[13] == "thirteen" and words[20] == "twenty" and words[32] == "thirty-two"
    assert number_to_words(99) == "ninety-nine"
    assert number_to_words(105) == "one hundred five"
    assert number_to_words(2048) == "two thousand forty-eight"
    assert len(set(words)) == 33
    with pytest.raises(ValueError):
        number_to_words(-1)


def test_morphology_and_baseline_prompts():
    cfg = load_config("tiny").prompts
    assert prompt_for(1, 32, cfg) == "Histology image of cancer tissue, morphology type thirty-two"
    assert prompt_for(0, 0, cfg) == "Histology image of healthy tissue, morphology type zero"
    base = load_config("tiny", overrides=["prompts.strategy=baseline"]).prompts
    assert prompt_for(1, 7, base) == "Histology image of cancer tissue"
    assert prompt_for(0, -1, base) == "Histology image of healthy tissue"
    words = load_config(overrides=["prompts.label_words=[normal, tumour]"]).prompts
    assert prompt_for(1, 3, words) == "Histology image of tumour tissue, morphology type three"
    assert prompt_for(-1, 3, cfg).startswith("Histology image of unlabelled tissue")
    with pytest.raises(DataError, match="label 2"):
        prompt_for(2, 0, cfg)


def test_66_distinct_prompts_for_33_clusters_and_two_labels():
    cfg = load_config().prompts
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 330)
    clusters = np.tile(np.arange(33), 20)
    rng.shuffle(clusters)
    table = prompt_table(labels, clusters, cfg)
    assert len(table) == 66 == len({row.prompt for row in table})
    assert sum(row.count for row in table) == 660
    texts = prompts_for(labels, clusters, cfg)
    assert texts[0] == prompt_for(labels[0], clusters[0], cfg)
    base = load_config(overrides=["prompts.strategy=baseline"]).prompts
    assert [r.prompt for r in prompt_table(labels, clusters, base)] == [
        "Histology image of healthy tissue",
        "Histology image of cancer tissue",
    ]


def test_bad_templates_are_config_errors():
    with pytest.raises(ConfigError, match="cluster"):
        load_config(overrides=["prompts.template=Histology image of {label} tissue"])
    with pytest.raises(ConfigError, match="unknown field"):
        load_config(overrides=["prompts.baseline_template=An image of {label} {stain}"])
