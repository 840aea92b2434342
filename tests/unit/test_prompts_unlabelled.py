"""Unlabelled patches (label -1, e.g. whole-slide tiles): one rule for their prompt, the table,
the gallery's label names and generation (issue 12, item 1)."""

from __future__ import annotations

import numpy as np
import pytest

from meddiff.config import load_config
from meddiff.errors import DataError
from meddiff.prompts import (
    PromptRow,
    check_rows,
    label_only_table,
    label_word,
    prompt_table,
    read_prompt_table,
    table_from_pairs,
    write_prompt_table,
)
from meddiff.synthesis.generate import generation_plan


@pytest.fixture()
def cfg():
    return load_config("tiny")


def test_unlabelled_tiles_get_a_morphology_prompt_the_reader_accepts(cfg, tmp_path):
    # Slide tiles: every label -1. The stage's table must read back (it did not: "labels must be
    # 0 or 1").
    table = prompt_table([-1, -1, -1, -1], [0, 5, 5, 12], cfg.prompts)
    assert [r.prompt for r in table] == [
        "Histology image of unlabelled tissue, morphology type zero",
        "Histology image of unlabelled tissue, morphology type five",
        "Histology image of unlabelled tissue, morphology type twelve",
    ]
    assert [r.count for r in table] == [1, 2, 1]
    path = write_prompt_table(tmp_path / "prompts.csv", table, cfg.prompts)
    assert read_prompt_table(path, cfg.prompts) == table


def test_the_unlabelled_word_comes_from_config(tmp_path):
    pcfg = load_config("tiny", overrides=["prompts.unlabelled_word=unstaged"]).prompts
    assert label_word(-1, pcfg) == "unstaged"
    [row] = prompt_table([-1], [3], pcfg)
    assert row.prompt == "Histology image of unstaged tissue, morphology type three"
    base = pcfg.model_copy(update={"strategy": "baseline"})
    assert [r.prompt for r in prompt_table([-1, 0], [3, 4], base)] == [
        "Histology image of unstaged tissue",
        "Histology image of healthy tissue",
    ]


def test_writer_and_reader_apply_one_label_rule(cfg, tmp_path):
    # More label words → more valid labels, for the writer and the reader alike.
    three = load_config("tiny", overrides=["prompts.label_words=[normal, benign, tumour]"]).prompts
    rows = prompt_table([2, -1], [1, 1], three)
    path = write_prompt_table(tmp_path / "three.csv", rows, three)
    assert read_prompt_table(path, three) == rows
    with pytest.raises(DataError, match=r"three.csv, line 3: label 2 has no word"):
        read_prompt_table(path, cfg.prompts)
    # The writer refuses what the reader would refuse, so a written table always reads back.
    with pytest.raises(DataError, match="label 5 has no word"):
        write_prompt_table(tmp_path / "bad.csv", [PromptRow("x", 5, 0, 1)], cfg.prompts)
    assert not (tmp_path / "bad.csv").exists()
    with pytest.raises(DataError, match="cluster -3"):
        check_rows([(2, PromptRow("x", 0, -3, 1))], cfg.prompts, "t.csv")


def test_every_table_builder_is_the_same_table(cfg):
    labels = np.array([-1, 0, 1, -1, 0])
    clusters = np.array([2, 2, 2, 2, 7])
    by_config = prompt_table(labels, clusters, cfg.prompts)
    texts = np.array([r.prompt for r in by_config], dtype=object)
    from_pairs = table_from_pairs(
        np.array([texts[0], texts[1], texts[3], texts[0], texts[2]], dtype=object),
        labels,
        clusters,
    )
    assert from_pairs == by_config
    assert label_only_table(by_config, cfg.prompts) == [
        PromptRow("Histology image of unlabelled tissue", -1, -1, 2),
        PromptRow("Histology image of healthy tissue", 0, -1, 2),
        PromptRow("Histology image of cancer tissue", 1, -1, 1),
    ]
    with pytest.raises(DataError, match="stands for label 0.*and for label 1"):
        table_from_pairs(np.array(["a", "a"], dtype=object), np.array([0, 1]), np.array([1, 1]))


def test_generation_leaves_unlabelled_prompts_out_and_says_so(cfg, caplog):
    rows = prompt_table([-1, -1, 0, 1], [3, 4, 3, 3], cfg.prompts)
    gen = cfg.synthesis.generate.model_copy(update={"images_per_prompt": 2})
    with caplog.at_level("WARNING"):
        plan = generation_plan(rows, gen, cfg.prompts, where="p.csv")
    assert set(plan["label"].tolist()) == {0, 1} and len(plan["index"]) == 4
    assert "p.csv: 2 unlabelled prompt(s) (label -1) left out" in caplog.text
    only = [r for r in rows if r.label == -1]
    with pytest.raises(DataError, match=r"p.csv: every prompt is unlabelled.*labels.csv"):
        generation_plan(only, gen, cfg.prompts, where="p.csv")


def test_gallery_names_the_unlabelled_column(cfg, tmp_path):
    from meddiff.morphology.gallery import write_gallery

    images = np.zeros((1, 8, 8, 3), np.uint8)
    page = write_gallery(
        tmp_path,
        title="t",
        stats={},
        label_names={-1: label_word(-1, cfg.prompts)},
        cells={(0, -1): images},
        counts={(0, -1): 1},
        prompts={(0, -1): prompt_table([-1], [0], cfg.prompts)[0].prompt},
        rejected={},
        rejected_counts={},
        thumb=16,
    )
    text = page.read_text()
    assert "unlabelled (label -1)" in text
    assert "Histology image of unlabelled tissue, morphology type zero" in text


def test_only_shards_of_one_kind_combine(tmp_path):
    import json

    from meddiff.data.shards import FORMAT, MANIFEST, concat_shards

    for name, columns in (("pairs", ["image", "label", "prompt"]), ("tiles", ["image", "label"])):
        (tmp_path / name).mkdir()
        manifest = {"format": FORMAT, "rows": 1, "files": [], "columns": columns}
        (tmp_path / name / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"tiles: columns \['image', 'label'\] differ"):
        concat_shards([tmp_path / "pairs", tmp_path / "tiles"], tmp_path / "out", rows_per_file=8)
    assert not (tmp_path / "out").exists()
