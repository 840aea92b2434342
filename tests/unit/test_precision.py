"""``precision: auto`` per path and device (meddiff.precision), and the embedder following it."""

from __future__ import annotations

import pytest
import torch

from meddiff import precision as amp
from meddiff.config import load_config
from meddiff.config.prompts import RANDOM_TINY_VIT, EmbedConfig
from meddiff.morphology.embed import PatchEmbedder
from meddiff.training import resolve_precision
from meddiff.training.driver import check_training

PATHS = ("thor-inference", "embedding", "thor-training", "training", "generation")


@pytest.fixture(params=[False, True], ids=["cpu-without-bf16", "cpu-with-bf16"])
def native(request, monkeypatch) -> bool:
    monkeypatch.setattr(amp, "cpu_bf16_native", lambda: request.param)
    return request.param


def test_a_cpu_without_native_bf16_keeps_fp32_everywhere(monkeypatch):
    monkeypatch.setattr(amp, "cpu_bf16_native", lambda: False)
    assert {amp.resolve("auto", "cpu", p) for p in PATHS} == {"fp32"}
    assert resolve_precision("auto", cuda=False) == "fp32"


def test_a_cpu_with_native_bf16_picks_bf16_for_the_measured_paths_only(monkeypatch):
    monkeypatch.setattr(amp, "cpu_bf16_native", lambda: True)
    for p in PATHS:
        assert amp.resolve("auto", "cpu", p) == ("bf16" if p in amp.CPU_BF16_AUTO else "fp32")
    # THOR's loop gains from bf16 on such a CPU; the other loops (synthesis, classifier) do not.
    cfg = load_config("tiny")
    thor = cfg.thor.train.model_copy(update={"precision": "auto"})
    assert check_training(thor, use_gpu=False, section="thor.train") == "bf16"
    assert check_training(cfg.synthesis.train, use_gpu=False, section="synthesis.train") == "fp32"
    assert resolve_precision("auto", cuda=False) == "fp32"


def test_explicit_precision_always_wins(native):
    for value in ("fp32", "bf16", "fp16"):
        for device in ("cpu", "cuda"):
            assert {amp.resolve(value, device, p) for p in PATHS} == {value}
        assert resolve_precision(value, cuda=False) == value


def test_cuda_auto_is_unchanged(native):
    assert amp.resolve("auto", "cuda", "training") == "bf16"
    assert resolve_precision("auto", cuda=True) == "bf16"
    assert amp.resolve("auto", "cuda", "thor-inference") == "fp32"
    assert amp.resolve("auto", "cuda", "embedding") == "fp16"
    assert amp.resolve("auto", "cuda", "thor-training") == "bf16"
    assert amp.resolve("auto", "cuda", "generation") == "fp16"
    # Devices other than CPU and CUDA (mps, xpu) are not measured: fp32.
    assert amp.resolve("auto", "mps", "thor-inference") == "fp32"


def test_an_unknown_path_is_refused():
    with pytest.raises(ValueError, match="unknown precision path 'sampling'"):
        amp.resolve("auto", "cpu", "sampling")


def test_the_probe_agrees_with_the_cpu_flags():
    flags = amp.cpu_flags()
    if not flags or not torch.backends.mkldnn.is_available():
        pytest.skip("no /proc/cpuinfo flags or no oneDNN here")
    assert amp.cpu_bf16_native() == bool(flags & set(amp.CPU_FLAGS))
    cap = amp.cpu_capability()
    assert cap["bf16_native"] == amp.cpu_bf16_native()
    assert cap["amx_bf16"] == ("amx_bf16" in flags)


def test_autocast_casts_matmuls_for_bf16_only():
    a = torch.ones(2, 2)
    with amp.autocast("bf16", "cpu"):
        assert (a @ a).dtype == torch.bfloat16
    with amp.autocast("fp32", "cpu"):
        assert (a @ a).dtype == torch.float32


def test_the_embedder_follows_auto_and_runs_fp16_as_fp32_on_a_cpu(native):
    cfg = EmbedConfig.model_validate({**RANDOM_TINY_VIT, "precision": "auto"})
    auto = PatchEmbedder(cfg)
    wins = native and "embedding" in amp.CPU_BF16_AUTO
    assert auto.precision == ("bf16" if wins else "fp32")
    assert PatchEmbedder(cfg.model_copy(update={"precision": "fp16"})).precision == "fp32"
    explicit = PatchEmbedder(cfg.model_copy(update={"precision": "bf16"}))
    assert explicit.precision == "bf16"
    x = torch.rand(2, 3, cfg.image_size, cfg.image_size)
    # The features come back in fp32 whatever the autocast.
    assert explicit.forward(x).dtype == torch.float32
