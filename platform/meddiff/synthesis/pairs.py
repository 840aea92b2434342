"""Label-only (image, prompt) pairs: the paper's baseline prompts, built from any patch shards.

The morphology-prompts stage makes the real pairs (a prompt per DINO cluster and label). This makes
the baseline ones ("Histology image of {healthy|cancer} tissue", cluster -1) in the same layout, so
synthesis can run on any ingested patch set, and the main job has pairs even without that stage.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from meddiff.config import Config
from meddiff.config.synthesis import GenerateConfig
from meddiff.data import shards
from meddiff.errors import DataError
from meddiff.synthesis.prompts import PromptRow, label_prompt, write_prompt_table


def add_label_prompts(batch: dict[str, np.ndarray], generate: dict) -> dict[str, np.ndarray]:
    """Add ``prompt`` (label only) and ``cluster`` (-1) columns to a patch batch."""
    cfg = GenerateConfig.model_validate(generate)
    labels = np.asarray(batch["label"])
    if len(labels) and not np.isin(labels, (0, 1)).all():
        raise DataError(f"label-only prompts need labels 0/1, got {sorted(set(labels.tolist()))}")
    texts = {lab: label_prompt(lab, cfg) for lab in (0, 1)}
    batch["prompt"] = np.array([texts[int(lab)] for lab in labels], dtype=object)
    batch["cluster"] = np.full(len(labels), -1, dtype=np.int64)
    return batch


def baseline_pairs(cfg: Config, source: str | Path, out: str | Path) -> tuple[Path, Path]:
    """Write ``out/pairs`` (shards with label-only prompts) and ``out/prompts.csv`` from the
    patch shards ``source``; reused when already complete. Returns both paths."""
    out = Path(out)
    pairs, table = out / "pairs", out / "prompts.csv"
    if shards.is_shard_dir(pairs) and table.is_file():
        return pairs, table
    ds = shards.read_shards(source).map_batches(
        add_label_prompts,
        fn_kwargs={"generate": cfg.synthesis.generate.model_dump(mode="json")},
        batch_format="numpy",
    )
    manifest = shards.write_shards(
        ds,
        pairs,
        rows_per_file=cfg.data.shards.rows_per_file,
        info={"source": str(source), "prompts": "label-only"},
        overwrite=True,
    )
    rows = [
        PromptRow(label_prompt(int(lab), cfg.synthesis.generate), int(lab), -1, int(n))
        for lab, n in sorted(manifest["labels"].items())
    ]
    write_prompt_table(table, rows)
    return pairs, table
