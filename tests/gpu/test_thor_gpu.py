"""THOR on CUDA: training with DDP and DeepSpeed in bf16 on one GPU worker, and inference on CUDA
equal to CPU within a stated tolerance. Skipped without CUDA (tests/gpu/conftest.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from meddiff.config import load_config
from meddiff.config.data import MriConfig
from meddiff.data.brain import BrainSampleSizes, sample_brain

SMALL = [
    "runtime.progress=false",
    "thor.model.image_size=32",
    "thor.model.channels=[16, 32]",
    "thor.model.attention_levels=[false, true]",
    "thor.model.num_head_channels=32",
    "thor.model.norm_groups=8",
    "thor.train.batch_size=4",
    "thor.train.max_steps=4",
    "thor.train.checkpoint_every=2",
    "thor.train.sample_every=2",
    "thor.train.num_samples=2",
    "thor.train.log_every=1",
    "thor.train.epoch_images=32",
    "thor.train.registered_name=null",
    "thor.train.use_gpu=true",
    "thor.train.precision=bf16",
]
# CUDA's convolution and attention kernels sum in another order than the CPU's (and may use
# TF32): the full THOR loop (8 denoising steps, maps blended back in) stays within this.
MAP_ATOL = 2e-3


@pytest.fixture(scope="module")
def brain(tmp_path_factory):
    out = tmp_path_factory.mktemp("thor-gpu") / "brain"
    sample_brain(out, MriConfig(image_size=32), BrainSampleSizes(lesion=4, normal=2), seed=0)
    return out


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_training_bf16_on_one_gpu(strategy, brain, tmp_path):
    from meddiff import runtime
    from meddiff.thor.model import load_model
    from meddiff.thor.train import train_thor

    cfg = load_config("tiny", overrides=[*SMALL, f"thor.train.strategy={strategy}"])
    runtime.connect(cfg.runtime)
    summary = train_thor(cfg, brain / "train", tmp_path / strategy)
    assert summary["steps"] == 4 and summary["precision"] == "bf16"
    assert np.isfinite(summary["final_loss"])
    saved = json.loads((tmp_path / strategy / "train_summary.json").read_text())
    assert saved["steps"] == 4
    model = load_model(summary["model"])  # saved in fp32 whatever the training precision
    assert all(p.dtype == torch.float32 for p in model.unet.parameters())


def test_inference_on_cuda_matches_cpu(brain):
    from meddiff.config.thor import UNetConfig
    from meddiff.data.images import read_png
    from meddiff.thor.inferer import ThorInferer
    from meddiff.thor.schedule import DDPMSchedule
    from meddiff.thor.unet import DiffusionUNet

    cfg = load_config("tiny", overrides=["thor.infer.lpips=off", "thor.infer.stride=50"])
    torch.manual_seed(0)
    unet = DiffusionUNet(
        UNetConfig(image_size=32, channels=(16, 32), attention_levels=(False, True),
                   num_head_channels=32, norm_groups=8)
    ).eval()  # fmt: skip
    paths = sorted((brain / "test" / "images").glob("*.png"))[:4]
    x = torch.stack([torch.from_numpy(read_png(p).astype(np.float32))[None] for p in paths])
    inferer = ThorInferer(DDPMSchedule(cfg.thor.schedule), cfg.thor.infer, cfg.thor.simplex)
    cpu = inferer(unet, x, seeds=range(len(x)))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    gpu = inferer(unet.cuda(), x, seeds=range(len(x)), device="cuda")
    np.testing.assert_allclose(gpu.anomaly_map.cpu(), cpu.anomaly_map, atol=MAP_ATOL)
    np.testing.assert_allclose(gpu.reconstruction.cpu(), cpu.reconstruction, atol=MAP_ATOL)
