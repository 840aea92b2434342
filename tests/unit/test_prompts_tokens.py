"""Prompts longer than the text encoder reads (issue 12, item 6): checked against the tokenizer
when the table is built and before training; an error when truncation merges distinct prompts,
a warning when it only shortens them."""

from __future__ import annotations

import pytest

from meddiff.config import load_config
from meddiff.errors import DataError
from meddiff.prompts import check_table_tokens, check_token_lengths, prompt_table
from meddiff.synthesis.components import build_tokenizer

# 13 distinct prompts (7 healthy types, 6 cancer types), as in the report.
LABELS = [0] * 7 + [1] * 6
CLUSTERS = list(range(7)) + list(range(6))
LONG = "A hematoxylin and eosin stained histology image of {label} tissue, showing the morphology type {cluster}"


def _prompts(template: str | None = None) -> list[str]:
    over = [f"prompts.template={template}"] if template else []
    cfg = load_config("tiny", overrides=over)
    return [r.prompt for r in prompt_table(LABELS, CLUSTERS, cfg.prompts)]


def test_truncation_that_merges_prompts_is_an_error():
    prompts = _prompts(LONG)
    tok = build_tokenizer(prompts, 16)  # the tiny preset's text encoder: 16 tokens
    with pytest.raises(
        DataError,
        match=r"t.csv: 13 distinct prompts are cut to the text encoder's 16 tokens and become 2 token sequences.*max_length",
    ):
        check_token_lengths(prompts, tok, "t.csv")


def test_truncation_that_only_shortens_is_a_warning(caplog):
    prompts = _prompts(
        "Histology image of {label} tissue, morphology type {cluster}, stained with hematoxylin and eosin"
    )
    tok = build_tokenizer(prompts, 16)
    with caplog.at_level("WARNING"):
        report = check_token_lengths(prompts, tok, "t.csv")
    assert report["shortened"] == 13 and report["token_sequences"] == 13
    assert report["limit"] == 16 and report["max_tokens"] > 16
    assert "13 of 13 prompts are longer than the text encoder's 16 tokens" in caplog.text


def test_prompts_that_fit_pass_quietly(caplog):
    prompts = _prompts()
    with caplog.at_level("WARNING"):
        report = check_token_lengths(prompts, build_tokenizer(prompts, 16), "t.csv")
    assert report == {"max_tokens": 11, "limit": 16, "shortened": 0, "token_sequences": 13}
    assert caplog.text == ""


def test_the_table_check_uses_the_tokenizer_training_will_use(tmp_path):
    cfg = load_config("tiny", overrides=[f"prompts.template={LONG}"])
    with pytest.raises(DataError, match="become 2 token sequences"):
        check_table_tokens(cfg, _prompts(LONG), "prompts.csv")
    # A longer text encoder reads them whole.
    roomy = load_config(
        "tiny", overrides=[f"prompts.template={LONG}", "synthesis.model.arch.max_length=32"]
    )
    assert check_table_tokens(roomy, _prompts(LONG), "prompts.csv")["shortened"] == 0
    # A model directory that is not there: not checked now (training will fail on it anyway).
    gone = load_config(
        "tiny",
        overrides=[f"synthesis.model.source={tmp_path / 'none'}", "synthesis.model.resolution=64"],
    )
    assert check_table_tokens(gone, _prompts(), "prompts.csv") is None


def _pairs_dir(root, prompts):
    """A pairs shard directory with only the columns the check reads (no Ray)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from meddiff.data.shards import FORMAT, MANIFEST

    root.mkdir()
    pq.write_table(pa.table({"prompt": prompts}), root / "part-0.parquet")
    manifest = {
        "format": FORMAT,
        "rows": len(prompts),
        "files": ["part-0.parquet"],
        "columns": ["prompt"],
    }
    (root / MANIFEST).write_text(json.dumps(manifest))
    return root


def test_training_checks_the_pairs_prompts_against_its_model(tmp_path):
    from meddiff.prompts import check_training_prompts
    from meddiff.synthesis.components import build_components, save_pipeline

    cfg = load_config("tiny")
    pairs = _pairs_dir(tmp_path / "pairs", _prompts(LONG))
    # The base model training would fine-tune (built from config, its tokenizer saved with it).
    model = save_pipeline(
        build_components(cfg.synthesis.model, _prompts(LONG), seed=0), tmp_path / "m"
    )
    with pytest.raises(DataError, match=r"pairs: 13 distinct prompts are cut .* 16 tokens"):
        check_training_prompts(cfg, pairs, model)
    fine = _pairs_dir(tmp_path / "fine", _prompts())
    assert check_training_prompts(cfg, fine, model)["token_sequences"] == 13
