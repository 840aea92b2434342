"""The GPU path of synthesis: fine-tuning with DeepSpeed ZeRO-2 bf16 and with DDP bf16 on one
GPU worker each, generation in fp16 on CUDA.

Skipped without CUDA (tests/gpu/conftest.py); the CPU suite covers the same code in fp32 and the
core's bf16 step on CPU (tests/unit/test_training_core.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meddiff.config import load_config
from meddiff.prompts import PromptRow, write_prompt_table
from meddiff.synthesis import components as C
from meddiff.synthesis.generate import generate
from meddiff.synthesis.stages import ImageGenerator
from meddiff.synthesis.train import train_synthesis


def _pairs(cfg, sample_pcam_dir, root):
    from meddiff.data.datasets import patch_dataset
    from meddiff.data.shards import write_shards

    def label_prompts(batch):  # shipped by value: Ray workers cannot import test modules
        words = ("healthy", "cancer")
        batch["prompt"] = np.array(
            [f"Histology image of {words[lab]} tissue" for lab in batch["label"]], dtype=object
        )
        batch["cluster"] = np.full(len(batch["label"]), -1)
        return batch

    ds = patch_dataset(sample_pcam_dir, cfg.data, limit=64).map_batches(
        label_prompts, batch_format="numpy"
    )
    write_shards(ds, root / "pairs", rows_per_file=64)
    table = write_prompt_table(
        root / "prompts.csv",
        [
            PromptRow("Histology image of healthy tissue", 0, -1, 1),
            PromptRow("Histology image of cancer tissue", 1, -1, 1),
        ],
    )
    return root / "pairs", table


GPU_TRAIN = [
    "runtime.progress=false",
    "synthesis.model.arch.vae_warmup_steps=0",
    "synthesis.train.use_gpu=true",
    "synthesis.train.num_workers=1",
    "synthesis.train.max_steps=4",
    "synthesis.train.checkpoint_every=2",
    "synthesis.train.log_every=1",
    "synthesis.train.precision=bf16",
    "synthesis.generate.use_gpu=true",
    "synthesis.generate.images_per_prompt=2",
    "synthesis.generate.steps=3",
]


@pytest.mark.parametrize(
    "strategy", ["synthesis.train.strategy=deepspeed", "synthesis.train.strategy=ddp"]
)
def test_fine_tuning_bf16_on_one_gpu_and_generation(strategy, sample_pcam_dir, tmp_path):
    from meddiff import runtime

    cfg = load_config("tiny", overrides=[*GPU_TRAIN, strategy, "synthesis.train.zero_stage=2"])
    runtime.connect(cfg.runtime)
    pairs, table = _pairs(cfg, sample_pcam_dir, tmp_path)
    summary = train_synthesis(cfg, pairs, tmp_path / "train")
    assert summary["steps"] == 4 and summary["precision"] == "bf16"
    assert np.isfinite(summary["final_loss"])
    C.check_model_dir(summary["model"])
    out = generate(cfg, summary["model"], table, tmp_path / "gen")
    assert out["images"] == 4
    stage = ImageGenerator(summary["model"], cfg.synthesis.generate.model_dump())
    assert stage.pipe.unet.dtype == torch.float16 and stage.device == "cuda"


def test_deepspeed_bf16_on_one_gpu(sample_pcam_dir, tmp_path):
    from meddiff import runtime

    cfg = load_config(
        "tiny",
        overrides=[
            "runtime.progress=false",
            "synthesis.model.arch.vae_warmup_steps=0",
            "synthesis.train.use_gpu=true",
            "synthesis.train.num_workers=1",
            "synthesis.train.max_steps=4",
            "synthesis.train.checkpoint_every=2",
            "synthesis.train.log_every=1",
            "synthesis.generate.use_gpu=true",
            "synthesis.generate.images_per_prompt=2",
            "synthesis.generate.steps=3",
        ],
    )
    runtime.connect(cfg.runtime)
    pairs, table = _pairs(cfg, sample_pcam_dir, tmp_path)
    summary = train_synthesis(cfg, pairs, tmp_path / "train")
    assert summary["steps"] == 4 and np.isfinite(summary["final_loss"])
    C.check_model_dir(summary["model"])
    out = generate(cfg, summary["model"], table, tmp_path / "gen")
    assert out["images"] == 4
    stage = ImageGenerator(summary["model"], cfg.synthesis.generate.model_dump())
    assert stage.pipe.unet.dtype == torch.float16 and stage.device == "cuda"
