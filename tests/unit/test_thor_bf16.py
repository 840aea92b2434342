"""THOR inference in bf16 autocast on the CPU: the shipped model on lesion slices gives finite maps
close to fp32's, and the result says which precision it used."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meddiff.config import load_config
from meddiff.data.brain import BrainSampleSizes, sample_brain
from meddiff.data.images import load_folder
from meddiff.thor.detect import image_seed
from meddiff.thor.evaluate import method_config
from meddiff.thor.inferer import ThorInferer
from meddiff.thor.model import load_model
from meddiff.thor.perceptual import load_perceptual
from meddiff.thor.shipped import SHIPPED_DIR

# How far bf16's maps may lie from fp32's. bf16 keeps 8 significant bits (relative error ≤ 2^-9
# per rounding); through the UNet passes and the LPIPS trunk the maps of 16 lesion-benchmark
# slices moved by at most 0.017 (of a [0, 1) map) and by 0.0003 on average, at the same pixel
# AUPRC (benchmarks/cpu_bf16.py, docs/performance.md): the bounds leave room for other images and
# CPUs while still catching a network that ran in the wrong dtype or layout.
MAX_ABS = 0.1
MEAN_ABS = 0.005
MIN_CORRELATION = 0.98


@pytest.mark.skipif(not SHIPPED_DIR.is_dir(), reason="no shipped model in this checkout")
def test_bf16_thor_on_the_cpu_is_finite_and_close_to_fp32(tmp_path):
    cfg = load_config("tiny")
    sample_brain(tmp_path / "brain", cfg.data.mri, BrainSampleSizes(lesion=1, normal=0))
    data = load_folder(tmp_path / "brain/test/images", size=64)
    images = torch.from_numpy(data.images)[:, None]
    seeds = [image_seed(n, 0) for n in data.names]
    model = load_model(SHIPPED_DIR)
    model.unet.to(memory_format=torch.channels_last)  # as thor detect runs it on a CPU
    perceptual = load_perceptual(cfg.thor.infer.lpips)  # HED's VGG16 trunk, under autocast too
    maps = {}
    for p in ("fp32", "bf16"):
        c = method_config(cfg, "thor", stride=50, precision=p)
        inferer = ThorInferer(model.schedule, c.thor.infer, c.thor.simplex, perceptual)
        det = inferer(model.unet, images, seeds=seeds)
        assert det.precision == p
        assert det.anomaly_map.dtype == torch.float32
        maps[p] = det.anomaly_map.numpy().ravel()
    assert np.isfinite(maps["bf16"]).all()
    diff = np.abs(maps["bf16"] - maps["fp32"])
    assert diff.max() < MAX_ABS and diff.mean() < MEAN_ABS
    assert np.corrcoef(maps["bf16"], maps["fp32"])[0, 1] > MIN_CORRELATION
