"""Prompt tables and generation plans."""

from __future__ import annotations

import numpy as np
import pytest

from meddiff.config import load_config
from meddiff.errors import DataError
from meddiff.prompts import PromptRow, read_prompt_table, table_from_pairs, write_prompt_table
from meddiff.synthesis.generate import generation_plan

ROWS = [
    PromptRow("Histology image of healthy tissue, morphology type one", 0, 1, 30),
    PromptRow("Histology image of healthy tissue, morphology type two", 0, 2, 10),
    PromptRow("Histology image of cancer tissue, morphology type one", 1, 1, 60),
]


@pytest.fixture()
def gen():
    return load_config("tiny").synthesis.generate


def test_table_round_trip(tmp_path):
    path = write_prompt_table(tmp_path / "prompts.csv", ROWS)
    assert read_prompt_table(path) == ROWS


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("prompt,label,cluster,count\n", "has no rows"),
        ("prompt,label,count\nx,0,3\n", "missing column.*cluster"),
        ("prompt,label,cluster,count\nx,2,0,1\n", "label 2"),
        ("prompt,label,cluster,count\nx,zero,0,1\n", "must be integers"),
        ("prompt,label,cluster,count\nx,0,0,1\nx,1,0,1\n", "more than once"),
        ("", "missing column"),
    ],
)
def test_bad_tables_are_clear_errors(tmp_path, text, match):
    path = tmp_path / "prompts.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=match):
        read_prompt_table(path)


def test_missing_table(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_prompt_table(tmp_path / "nope.csv")


def test_per_prompt_plan_is_balanced_with_a_seed_per_image(gen):
    plan = generation_plan(ROWS, gen.model_copy(update={"images_per_prompt": 3, "seed": 100}))
    assert len(plan["index"]) == 9
    prompts, counts = np.unique(plan["prompt"], return_counts=True)
    assert set(prompts) == {r.prompt for r in ROWS} and set(counts) == {3}
    assert plan["seed"].tolist() == list(range(100, 109))
    assert plan["label"].tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1]
    assert plan["cluster"].tolist() == [1, 1, 1, 2, 2, 2, 1, 1, 1]


def test_proportional_plan_follows_counts(gen):
    plan = generation_plan(
        ROWS, gen.model_copy(update={"plan": "proportional", "total_images": 11})
    )
    counts = {r.prompt: int((plan["prompt"] == r.prompt).sum()) for r in ROWS}
    assert sum(counts.values()) == 11
    # 30/100, 10/100, 60/100 of 11 → 3.3, 1.1, 6.6 → largest remainders give 3, 1, 7
    assert [counts[r.prompt] for r in ROWS] == [3, 1, 7]


def test_label_only_plan_is_the_baseline(gen):
    plan = generation_plan(
        ROWS, gen.model_copy(update={"label_only": True, "images_per_prompt": 2})
    )
    assert plan["prompt"].tolist() == [
        "Histology image of healthy tissue",
        "Histology image of healthy tissue",
        "Histology image of cancer tissue",
        "Histology image of cancer tissue",
    ]
    assert plan["cluster"].tolist() == [-1] * 4
    assert plan["label"].tolist() == [0, 0, 1, 1]


def test_table_from_pairs():
    prompts = np.array(["a", "b", "a", "a"], dtype=object)
    rows = table_from_pairs(prompts, np.array([0, 1, 0, 0]), np.array([3, 4, 3, 3]))
    assert rows == [PromptRow("a", 0, 3, 3), PromptRow("b", 1, 4, 1)]


def test_cli_reports_a_bad_table_in_one_line(tmp_path, capsys):
    from meddiff.cli import main

    (tmp_path / "prompts.csv").write_text("prompt,label,cluster,count\n")
    rc = main(
        [
            "synth",
            "generate",
            "--model",
            str(tmp_path),
            "--prompts",
            str(tmp_path / "prompts.csv"),
            "--out",
            str(tmp_path / "out"),
            "--preset",
            "tiny",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and "has no rows" in err[0]
